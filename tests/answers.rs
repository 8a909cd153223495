//! Hostile token answers against the real daemon, a real redis-server and the fake provider
//! (issue "hostile input", answers): `expires_in` of every odd shape, an identity provider
//! that echoes the secrets it was sent, and userinfo in a token URL. Each time: a sane
//! `token_expiry` that Python can read, no panic, the new refresh token written back, no
//! secret in health, events, `status` or the logs, and the other tenants refreshed at their
//! normal pace meanwhile.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::{
    assert_no_secrets, health_key, hget, hgetall, oauth_record, provider_key, seed_provider,
    seed_tenant_config, wait_until, wait_until_async, Daemon, FakeProvider, RedisServer,
};

const FAST: [(&str, &str); 5] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
    ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "200"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
];

/// `refresh.max_token_lifetime_secs` (30 days): a longer `expires_in` is clamped to it.
const MAX_LIFETIME: i64 = 2_592_000;

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

fn now_iso() -> String {
    Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

struct Seeded {
    tenant: String,
    client_id: String,
    secret: String,
    seed_rt: String,
    seed_at: String,
}

impl Seeded {
    fn key(&self) -> String {
        provider_key(&self.tenant, "goto")
    }
}

/// A `goto` provider of `tenant`, due now, whose client at the fake has `options`; the
/// record's fields are overridden by `record`.
async fn seed(
    conn: &mut redis::Connection,
    fake: &FakeProvider,
    tenant: &str,
    options: Value,
    record: &[(&str, String)],
) -> Seeded {
    let s = Seeded {
        tenant: tenant.to_string(),
        client_id: unique("cid"),
        secret: unique("secret"),
        seed_rt: unique("rt"),
        seed_at: unique("at"),
    };
    let mut client = json!({
        "client_id": s.client_id, "client_secret": s.secret,
        "refresh_token": s.seed_rt, "access_token": s.seed_at,
    });
    if let (Some(c), Some(o)) = (client.as_object_mut(), options.as_object()) {
        c.extend(o.clone());
    }
    fake.seed(client).await;
    seed_tenant_config(conn, tenant);
    let mut fields = oauth_record(fake, &s.client_id, &s.secret, &s.seed_rt, &now_iso());
    for (k, v) in fields.iter_mut() {
        if k == "access_token" {
            *v = s.seed_at.clone();
        }
        if let Some((_, value)) = record.iter().find(|(name, _)| *name == k.as_str()) {
            *v = value.clone();
        }
    }
    seed_provider(conn, tenant, "goto", &fields);
    s
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Python's `datetime.fromisoformat` on each value: the gateway reads them with it.
fn python_reads(values: &[String]) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, datetime\n\
             for v in sys.argv[1:]:\n    print(datetime.datetime.fromisoformat(v).isoformat())",
        )
        .args(values)
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    assert!(
        out.status.success(),
        "Python cannot read {values:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn parse_time(v: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or_else(|e| panic!("{v:?} is not RFC 3339: {e}"))
}

/// Refreshes of the normal tenants: counted over `window` while the hostile ones are there.
async fn normal_pace(fake: &FakeProvider, normal: &[Seeded], window: Duration) -> Vec<u64> {
    let before: Vec<u64> = {
        let mut v = Vec::new();
        for s in normal {
            v.push(u64_of(&fake.client_stats(&s.client_id).await, "refresh_ok"));
        }
        v
    };
    tokio::time::sleep(window).await;
    let mut out = Vec::new();
    for (s, b) in normal.iter().zip(before) {
        out.push(u64_of(&fake.client_stats(&s.client_id).await, "refresh_ok") - b);
    }
    out
}

#[tokio::test]
async fn odd_expires_in_values_give_sane_expiries_and_leave_the_others_alone() {
    let redis = RedisServer::start();
    // Normal tenants get 4 s tokens: refreshed every 2 s (refresh at L/2 for short tokens).
    let fake = FakeProvider::start(4);
    let mut conn = redis.conn();
    // (expires_in as sent, the lifetime tokenwarden must schedule from)
    let cases: Vec<(Value, i64)> = vec![
        (json!(1e13), MAX_LIFETIME),
        (json!(9_300_000_000_000_000_u64), MAX_LIFETIME),
        (json!(u64::MAX), MAX_LIFETIME),
        (json!(1e300), MAX_LIFETIME),
        (json!(0), 3600),
        (json!(-5), 3600),
        (json!(-1e13), 3600),
        (json!("3600"), 3600),
        (json!(" 7200 "), 7200),
        (json!("soon"), 3600),
        (json!(1799.5), 1799),
        (json!([3600]), 3600),
    ];
    let mut hostile = Vec::new();
    for (i, (raw, _)) in cases.iter().enumerate() {
        hostile.push(
            seed(
                &mut conn,
                &fake,
                &format!("odd{i}"),
                json!({"expires_in_raw": raw}),
                &[],
            )
            .await,
        );
    }
    let mut normal = Vec::new();
    for t in ["normal-a", "normal-b"] {
        normal.push(seed(&mut conn, &fake, t, json!({}), &[]).await);
    }
    let daemon = Daemon::start(&redis, &FAST);
    daemon.wait_ready(Duration::from_secs(20)).await;
    for s in &hostile {
        wait_until_async(
            "each odd provider refreshed once",
            Duration::from_secs(20),
            || {
                let (fake, id) = (&fake, s.client_id.clone());
                async move { u64_of(&fake.client_stats(&id).await, "refresh_ok") >= 1 }
            },
        )
        .await;
    }
    let started = Utc::now();

    // The other tenants keep their pace while the odd ones are tracked.
    let window = Duration::from_secs(8);
    let pace = normal_pace(&fake, &normal, window).await;
    eprintln!("normal tenants' refreshes in {window:?}: {pace:?}");
    for n in &pace {
        assert!(
            (3..=8).contains(n),
            "normal pace broken: {pace:?} in {window:?}"
        );
    }

    let mut expiries = Vec::new();
    for (s, (raw, lifetime)) in hostile.iter().zip(&cases) {
        let stats = fake.client_stats(&s.client_id).await;
        // One refresh, no storm (a zero lifetime once gave 11,900 refreshes in 30 s).
        assert_eq!(u64_of(&stats, "refresh_ok"), 1, "expires_in {raw}: {stats}");
        let record = hgetall(&mut conn, &s.key());
        // The new refresh token is written back.
        assert_eq!(
            stats["live_refresh_token"].as_str(),
            record.get("refresh_token").map(String::as_str),
            "expires_in {raw}: refresh token not written back"
        );
        assert_ne!(record.get("refresh_token"), Some(&s.seed_rt));
        let expiry = record.get("token_expiry").cloned().unwrap_or_default();
        let at = parse_time(&expiry);
        let scheduled = (at - started).num_seconds();
        assert!(
            (lifetime - 60..=*lifetime + 5).contains(&scheduled),
            "expires_in {raw}: token_expiry {expiry} is {scheduled} s away, want about {lifetime}"
        );
        let health = hgetall(&mut conn, &health_key(&s.tenant, "goto"));
        assert_eq!(
            health.get("state").map(String::as_str),
            Some("healthy"),
            "{health:?}"
        );
        expiries.push(expiry);
        if let Some(h) = health.get("token_expiry") {
            expiries.push(h.clone());
        }
        if let Some(h) = health.get("next_refresh_at") {
            expiries.push(h.clone());
        }
        eprintln!(
            "expires_in {raw}: token_expiry {} reason {:?}",
            record.get("token_expiry").map_or("", String::as_str),
            health.get("reason")
        );
    }
    python_reads(&expiries);
    daemon.assert_running();
    let logs = daemon.logs();
    assert!(!logs.contains("panicked"), "the daemon panicked");
    let mut secrets = Vec::new();
    for s in hostile.iter().chain(&normal) {
        secrets.extend([s.secret.clone(), s.seed_rt.clone(), s.seed_at.clone()]);
    }
    assert_no_secrets("daemon logs", &logs, &secrets);
}

#[tokio::test]
async fn an_idp_that_echoes_secrets_never_gets_them_stored_printed_or_logged() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(4);
    let mut conn = redis.conn();
    // invalid_grant: a permanent error (reauth_required); invalid_request: a transient one
    // whose description is kept in last_error. One authenticates in the body, one with Basic.
    let permanent = seed(
        &mut conn,
        &fake,
        "echo-permanent",
        json!({"echo_secrets": "invalid_grant"}),
        &[],
    )
    .await;
    let transient = seed(
        &mut conn,
        &fake,
        "echo-transient",
        json!({"echo_secrets": "invalid_request", "auth": "basic"}),
        &[("token_auth_method", "client_secret_basic".into())],
    )
    .await;
    let normal = vec![seed(&mut conn, &fake, "normal", json!({}), &[]).await];
    let daemon = Daemon::start(&redis, &FAST);
    daemon.wait_ready(Duration::from_secs(20)).await;
    let url = redis.url();
    wait_until_async(
        "both echoing providers answered",
        Duration::from_secs(20),
        || {
            let conn = redis.client();
            async move {
                let Ok(mut c) = conn.get_connection() else {
                    return false;
                };
                let p = hget(&mut c, &health_key("echo-permanent", "goto"), "state");
                let t = hget(&mut c, &health_key("echo-transient", "goto"), "last_error");
                p.as_deref() == Some("reauth_required") && t.is_some_and(|e| !e.is_empty())
            }
        },
    )
    .await;
    let pace = normal_pace(&fake, &normal, Duration::from_secs(6)).await;
    assert!(
        pace[0] >= 2,
        "the normal tenant slowed down: {pace:?} in 6 s"
    );

    let mut secrets = Vec::new();
    for s in [&permanent, &transient, &normal[0]] {
        secrets.extend([s.secret.clone(), s.seed_rt.clone(), s.seed_at.clone()]);
    }
    // The Basic header as sent (id and secret form-urlencoded, then base64).
    use base64::Engine as _;
    secrets.push(
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", transient.client_id, transient.secret)),
    );
    let mut seen: HashMap<&str, String> = HashMap::new();
    for s in [&permanent, &transient] {
        let health = hgetall(&mut conn, &health_key(&s.tenant, "goto"));
        let last_error = health.get("last_error").cloned().unwrap_or_default();
        eprintln!("{}: last_error {last_error:?}", s.tenant);
        assert!(last_error.contains("[redacted]"), "{last_error:?}");
        assert!(
            last_error.contains("grant_type=refresh_token"),
            "the description was dropped: {last_error:?}"
        );
        seen.insert(
            if s.tenant.contains("permanent") {
                "permanent"
            } else {
                "transient"
            },
            last_error,
        );
        assert_no_secrets("health hash", &format!("{health:?}"), &secrets);
    }
    let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("XRANGE: {e}"));
    assert!(!events.is_empty());
    assert_no_secrets("events stream", &format!("{events:?}"), &secrets);
    for args in [vec!["status"], vec!["status", "--json"]] {
        let out = Daemon::cli(&args, &[("TOKENWARDEN_REDIS_URL", url.as_str())]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        // The table cuts long errors; the JSON has them whole.
        if args.contains(&"--json") {
            assert!(text.contains("[redacted]"), "{text}");
        }
        assert_no_secrets("status", &text, &secrets);
    }
    // An operator's refresh of the permanent one: the answer, too, is scrubbed.
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            "echo-permanent",
            "--provider",
            "goto",
            "--wait",
        ],
        &[("TOKENWARDEN_REDIS_URL", url.as_str())],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(5), "{text}");
    assert_no_secrets("refresh answer", &text, &secrets);
    let commands: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:commands")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap_or_else(|e| panic!("XRANGE: {e}"));
    assert_no_secrets("commands stream", &format!("{commands:?}"), &secrets);
    assert_no_secrets("daemon logs", &daemon.logs(), &secrets);
    daemon.assert_running();
}

#[tokio::test]
async fn userinfo_in_a_token_url_is_sent_as_basic_auth_and_never_kept() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    // The fake's client must authenticate with Basic, with the URL's credentials; the
    // record's own client_secret is a wrong one, so only the userinfo can succeed.
    let url_secret = format!("{}/with@odd:chars", unique("pw"));
    let encoded: String = url_secret
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let client_id = unique("urlclient");
    fake.seed(json!({"client_id": client_id, "client_secret": url_secret, "auth": "basic"}))
        .await;
    let token_url =
        fake.token_url()
            .replacen("http://", &format!("http://{client_id}:{encoded}@"), 1);
    let s = seed(
        &mut conn,
        &fake,
        "userinfo",
        json!({}),
        &[("token_url", token_url.clone())],
    )
    .await;
    // The refresh token is registered for the seeded client: register it for the URL's.
    fake.seed(json!({
        "client_id": client_id, "client_secret": url_secret, "auth": "basic",
        "refresh_token": s.seed_rt,
    }))
    .await;
    let daemon = Daemon::start(
        &redis,
        &[
            FAST.as_slice(),
            &[("TOKENWARDEN_LOG", "trace,h2=info,rustls=info")],
        ]
        .concat(),
    );
    daemon.wait_ready(Duration::from_secs(20)).await;
    wait_until_async(
        "a refresh with the URL's credentials",
        Duration::from_secs(20),
        || {
            let (fake, id) = (&fake, client_id.clone());
            async move { u64_of(&fake.client_stats(&id).await, "refresh_ok") >= 1 }
        },
    )
    .await;
    // The fake counts the refresh when it answers; the write-back follows.
    let stats = fake.client_stats(&client_id).await;
    let live = stats["live_refresh_token"].as_str().map(str::to_string);
    wait_until(
        "the rotated refresh token in the record",
        Duration::from_secs(10),
        || hget(&mut conn, &s.key(), "refresh_token") == live,
    )
    .await;
    let record = hgetall(&mut conn, &s.key());
    assert_eq!(u64_of(&stats, "bad_client"), 0, "{stats}");
    // The record is the gateway's: its token_url is kept as written.
    assert_eq!(record.get("token_url"), Some(&token_url));
    let health = hgetall(&mut conn, &health_key("userinfo", "goto"));
    assert_eq!(
        health.get("state").map(String::as_str),
        Some("healthy"),
        "{health:?}"
    );
    let logs = daemon.logs();
    assert!(logs.contains("TRACE"), "trace logs are not on");
    let leaks = [url_secret.clone(), encoded.clone(), s.seed_rt.clone()];
    assert_no_secrets("trace logs", &logs, &leaks);
    assert_no_secrets("health", &format!("{health:?}"), &leaks);
    let out = Daemon::cli(
        &["status", "--json"],
        &[("TOKENWARDEN_REDIS_URL", redis.url().as_str())],
    );
    assert_no_secrets("status", &String::from_utf8_lossy(&out.stdout), &leaks);
}
