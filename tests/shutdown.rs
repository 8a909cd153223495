//! SIGTERM with a rotated token not yet in Redis (issue "operations", 7.2): the daemon keeps
//! trying until `shutdown.drain_deadline_secs`, logs each entry left, exits 0 within the
//! deadline plus the flush margin the stop timeouts allow for (`deploy/`: systemd's
//! `TimeoutStopSec` and Kubernetes' `terminationGracePeriodSeconds`, checked by
//! scripts/check-deploy.sh); the next start on the same state directory replays the entry
//! and the token reaches Redis.

mod support;

use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::json;
use support::metrics::metric;
use support::process::TempDir;
use support::{
    assert_no_secrets, hget, oauth_record, provider_key, seed_provider, seed_tenant_config,
    wait_for_log, wait_until_async, Daemon, FakeProvider, RedisServer,
};

/// The drain deadline of this test.
const DRAIN_SECS: u64 = 3;
/// After the deadline the health writer gets up to 3 s to flush and the heartbeat and
/// command tasks 1 s each: the bound the deploy files' stop timeouts add to the deadline.
const FLUSH_MARGIN_SECS: u64 = 5;

#[tokio::test]
async fn sigterm_with_an_answer_held_logs_it_exits_0_and_the_next_start_replays_it() {
    let mut redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let (client_id, secret, seed_rt) = (
        format!("cid-{:x}", fastrand::u64(..)),
        format!("secret-{:x}", fastrand::u64(..)),
        format!("rt-seed-{:x}", fastrand::u64(..)),
    );
    // The token call takes 2 s: Redis goes away while it is in flight.
    fake.seed(json!({
        "client_id": client_id, "client_secret": secret, "refresh_token": seed_rt,
        "delay_ms": 2000,
    }))
    .await;
    seed_tenant_config(&mut conn, "acme");
    let now = Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string();
    let record = oauth_record(&fake, &client_id, &secret, &seed_rt, &now);
    seed_provider(&mut conn, "acme", "goto", &record);
    drop(conn);

    let state = TempDir::new("tw-shutdown-state");
    let state_dir = state.path().display().to_string();
    let drain = DRAIN_SECS.to_string();
    let env = [
        ("TOKENWARDEN_HEALTH_ENABLED", "false"),
        ("TOKENWARDEN_STATE_DIR", state_dir.as_str()),
        ("TOKENWARDEN_SHUTDOWN_DRAIN_DEADLINE_SECS", drain.as_str()),
        ("TOKENWARDEN_REDIS_COMMAND_TIMEOUT_MS", "500"),
        ("TOKENWARDEN_REDIS_PING_INTERVAL_MS", "200"),
        ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "500"),
        ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
        ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "3"),
    ];
    let daemon = Daemon::start(&redis, &env);
    daemon.wait_ready(Duration::from_secs(20)).await;
    wait_until_async("the token call in flight", Duration::from_secs(10), || {
        let fake = &fake;
        async move { fake.stats_summary().await["in_flight"].as_u64() == Some(1) }
    })
    .await;
    redis.stop();
    // The answer comes back, its write-back fails: held in the journal.
    wait_until_async("journal_pending 1", Duration::from_secs(15), || {
        let daemon = &daemon;
        async move {
            let body = daemon.metrics().await;
            metric(&body, "tokenwarden_journal_pending", &[]) == Some(1.0)
        }
    })
    .await;
    let new_rt = fake.client_stats(&client_id).await["live_refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(new_rt.starts_with("rt-"), "the fake rotated no token");

    let sent = Instant::now();
    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(DRAIN_SECS + FLUSH_MARGIN_SECS + 5));
    let took = sent.elapsed();
    eprintln!("SIGTERM to exit: {took:?} (drain deadline {DRAIN_SECS} s)");
    assert_eq!(code, Some(0), "exit status after SIGTERM");
    assert!(
        took <= Duration::from_secs(DRAIN_SECS + FLUSH_MARGIN_SECS),
        "took {took:?}, more than the deadline {DRAIN_SECS} s + {FLUSH_MARGIN_SECS} s"
    );
    assert!(
        took >= Duration::from_secs(DRAIN_SECS) - Duration::from_millis(200),
        "gave up before the deadline: {took:?}"
    );
    let logs = daemon.logs();
    let left: Vec<&str> = logs
        .lines()
        .filter(|l| {
            l.contains("answer not confirmed in Redis before exit: it stays in the journal")
        })
        .collect();
    assert_eq!(left.len(), 1, "one line per entry left:\n{logs}");
    assert!(
        left[0].contains("tenant=acme") && left[0].contains("provider=goto"),
        "{}",
        left[0]
    );

    // Redis back (with the old token in its dump), a new start on the same journal: the
    // entry is replayed, the rotated token reaches Redis, the old one is never sent again.
    redis.restart();
    let mut conn = redis.conn();
    assert_eq!(
        hget(&mut conn, &provider_key("acme", "goto"), "refresh_token").as_deref(),
        Some(seed_rt.as_str()),
        "the dump should hold the token from before"
    );
    fake.faults(json!({"client_id": client_id, "delay_ms": 0}))
        .await;
    let next = Daemon::start(&redis, &env);
    next.wait_ready(Duration::from_secs(20)).await;
    wait_until_async("the held token in Redis", Duration::from_secs(20), || {
        let client = redis.client();
        let want = new_rt.clone();
        async move {
            let Ok(mut c) = client.get_connection() else {
                return false;
            };
            hget(&mut c, &provider_key("acme", "goto"), "refresh_token").as_deref()
                == Some(want.as_str())
        }
    })
    .await;
    wait_for_log(&next, "replayed", Duration::from_secs(5)).await;
    let stats = fake.client_stats(&client_id).await;
    assert_eq!(
        stats["reuse"],
        json!(0),
        "the old refresh token was sent again: {stats}"
    );
    assert_eq!(stats["invalid_grant"], json!(0), "{stats}");
    let secrets = [secret, seed_rt, new_rt];
    assert_no_secrets("first daemon", &logs, &secrets);
    assert_no_secrets("second daemon", &next.logs(), &secrets);
}
