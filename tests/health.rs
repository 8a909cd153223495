//! Health probes of the real daemon: each provider's API is called with its current access
//! token, and the answer shows up in the health hash and on `/metrics`.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{
    health_key, hget, oauth_record, seed_provider, wait_until, wait_until_async, Daemon,
    FakeProvider, RedisServer,
};

const TENANT: &str = "cloudwarriors";

/// A GoTo-shaped record whose token is valid for an hour, probed at `{api}/me`.
async fn seed(
    fake: &FakeProvider,
    redis: &RedisServer,
    client: &str,
    access_token: &str,
    live: bool,
) {
    let mut seed = json!({
        "client_id": client,
        "client_secret": format!("secret-{client}"),
        "refresh_token": format!("rt0-{client}"),
    });
    if live {
        seed["access_token"] = json!(access_token);
        seed["expires_in"] = json!(3600);
    }
    fake.seed(seed).await;
    let expiry = (chrono::Utc::now() + chrono::Duration::hours(1))
        .naive_utc()
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    let mut fields = oauth_record(
        fake,
        client,
        &format!("secret-{client}"),
        &format!("rt0-{client}"),
        &expiry,
    );
    fields.retain(|(k, _)| k != "access_token");
    fields.push(("access_token".into(), access_token.into()));
    fields.push(("health_path".into(), "/me".into()));
    seed_provider(&mut redis.conn(), TENANT, client, &fields);
}

fn probe_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TOKENWARDEN_HEALTH_PROBE_INTERVAL_SECS", "1"),
        ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ]
}

#[tokio::test]
async fn a_live_token_makes_the_provider_up() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    seed(&fake, &redis, "goto", "at-live-goto", true).await;
    let daemon = Daemon::start(&redis, &probe_env());
    daemon.wait_ready(Duration::from_secs(10)).await;

    let mut conn = redis.conn();
    wait_until("a health check recorded", Duration::from_secs(10), || {
        hget(
            &mut conn,
            &health_key(TENANT, "goto"),
            "last_health_check_at",
        )
        .is_some()
    })
    .await;
    let latency = hget(&mut conn, &health_key(TENANT, "goto"), "health_latency_ms")
        .expect("latency recorded");
    assert!(latency.parse::<u64>().is_ok(), "latency {latency:?}");
    assert_eq!(
        hget(&mut conn, &health_key(TENANT, "goto"), "state").as_deref(),
        Some("healthy")
    );
    wait_until_async(
        "provider_up 1 on /metrics",
        Duration::from_secs(5),
        || async {
            let (_, body) = daemon.get("/metrics").await;
            body.contains(r#"tokenwarden_provider_up{tenant="cloudwarriors",provider="goto"} 1"#)
                && body.contains("tokenwarden_provider_health_check_duration_seconds_bucket")
        },
    )
    .await;
    let stats = fake.stats().await;
    assert!(stats["api_ok"].as_u64().unwrap_or(0) >= 1, "{stats}");
    // No token call was needed: the token lives for an hour.
    assert_eq!(stats["refresh_ok"].as_u64(), Some(0), "{stats}");
    assert!(!daemon.logs().contains("at-live-goto"));
    assert!(!daemon.logs().contains("secret-goto"));
}

#[tokio::test]
async fn a_rejected_token_degrades_the_provider_until_a_refresh() {
    // Degraded by the probe's 401, then refreshed once by that 401 itself (the token was
    // believed valid), and refreshed again by an operator: healthy each time.
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    seed(&fake, &redis, "teams", "at-dead-teams", false).await;
    let daemon = Daemon::start(&redis, &probe_env());
    daemon.wait_ready(Duration::from_secs(10)).await;

    let mut conn = redis.conn();
    let key = health_key(TENANT, "teams");
    // Degraded for as long as the refresh takes (the state may be healthy again before a
    // poll of Redis sees it): the engine's log says it.
    support::wait_for_log(
        &daemon,
        "health probe changed the provider's state detail=from=healthy to=degraded",
        Duration::from_secs(10),
    )
    .await;
    // A 401 to a token believed valid (an hour left) triggers one refresh by itself; the
    // refreshed token is live, so the provider recovers without an operator.
    support::wait_for_log(
        &daemon,
        "the provider refused an access token that should be valid; refreshing once",
        Duration::from_secs(10),
    )
    .await;
    wait_until(
        "healthy after the probe's own refresh",
        Duration::from_secs(15),
        || hget(&mut conn, &key, "state").as_deref() == Some("healthy"),
    )
    .await;

    // An operator refreshes: the new token is live, the next probe finds the provider up.
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            TENANT,
            "--provider",
            "teams",
            "--wait",
        ],
        &[("TOKENWARDEN_REDIS_URL", redis.url().as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until(
        "healthy after refresh and probe",
        Duration::from_secs(15),
        || hget(&mut conn, &key, "state").as_deref() == Some("healthy"),
    )
    .await;
    wait_until_async("provider_up back to 1", Duration::from_secs(10), || async {
        let (_, body) = daemon.get("/metrics").await;
        body.contains(r#"tokenwarden_provider_up{tenant="cloudwarriors",provider="teams"} 1"#)
    })
    .await;
    assert!(!daemon.logs().contains("secret-teams"));
}
