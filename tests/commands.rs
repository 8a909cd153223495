//! Operator commands through the running replicas (`tokenwarden refresh|sync`, the stream
//! `tokenwarden:commands`): against a real redis-server, the fake provider and real
//! daemons. Each answer's exit code, exactly one answer per request with two replicas, the
//! stream's cap, and what the CLI says when no replica runs.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::{json, Value};
use support::{
    assert_no_secrets, hget, oauth_record, provider_key, seed_provider, seed_tenant_config,
    wait_until, Daemon, FakeProvider, RedisServer,
};

const STREAM: &str = "tokenwarden:commands";

const FAST: [(&str, &str); 5] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "3"),
    ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "200"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
];

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

fn iso_in(secs: i64) -> String {
    (Utc::now() + chrono::Duration::seconds(secs))
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string()
}

struct Seeded {
    client_id: String,
    secret: String,
    seed_rt: String,
    key: String,
}

/// A provider whose token is valid for an hour (the daemon leaves it alone until asked).
async fn seed(
    conn: &mut redis::Connection,
    fake: &FakeProvider,
    tenant: &str,
    provider: &str,
    faults: Value,
) -> Seeded {
    let s = Seeded {
        client_id: unique("cid"),
        secret: unique("secret"),
        seed_rt: unique("rt"),
        key: provider_key(tenant, provider),
    };
    let mut client = json!({
        "client_id": s.client_id, "client_secret": s.secret, "refresh_token": s.seed_rt,
    });
    if let (Some(c), Some(f)) = (client.as_object_mut(), faults.as_object()) {
        c.extend(f.clone());
    }
    fake.seed(client).await;
    seed_tenant_config(conn, tenant);
    let record = oauth_record(fake, &s.client_id, &s.secret, &s.seed_rt, &iso_in(3600));
    seed_provider(conn, tenant, provider, &record);
    s
}

fn run(args: &[&str], url: &str) -> (i32, String) {
    let out = Daemon::cli(args, &[("TOKENWARDEN_REDIS_URL", url)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Every entry of the commands stream, oldest first.
fn entries(conn: &mut redis::Connection) -> Vec<(String, HashMap<String, String>)> {
    redis::cmd("XRANGE")
        .arg(STREAM)
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE: {e}"))
}

fn answers_to<'a>(
    all: &'a [(String, HashMap<String, String>)],
    request: &str,
) -> Vec<&'a HashMap<String, String>> {
    all.iter()
        .filter(|(_, f)| {
            f.get("type").map(String::as_str) == Some("answer")
                && f.get("request").map(String::as_str) == Some(request)
        })
        .map(|(_, f)| f)
        .collect()
}

#[tokio::test]
async fn refresh_and_sync_through_the_running_replicas() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let good = seed(&mut conn, &fake, "acme", "goto", json!({})).await;
    let revoked = seed(&mut conn, &fake, "acme", "zoom", json!({"revoked": true})).await;
    let busy = seed(&mut conn, &fake, "globex", "teams", json!({})).await;
    let url = redis.url();

    // No replica runs yet: exit 6, and the message says what to do.
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--wait",
        ],
        &url,
    );
    assert_eq!(code, 6, "{out}");
    assert!(out.contains("--local --state-dir"), "{out}");

    let a = Daemon::start(&redis, &FAST);
    let b = Daemon::start(&redis, &FAST);
    a.wait_ready(Duration::from_secs(20)).await;
    b.wait_ready(Duration::from_secs(20)).await;
    // Both have a heartbeat (the CLI checks for a live replica before it sends).
    wait_until("two live replicas", Duration::from_secs(10), || {
        redis::cmd("ZCARD")
            .arg("tokenwarden:replicas")
            .query::<u64>(&mut conn)
            .unwrap_or(0)
            == 2
    })
    .await;
    let mut outputs = String::new();

    // ok: refreshed through the daemon, the new refresh token in the record.
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--wait",
        ],
        &url,
    );
    outputs.push_str(&out);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("acme/goto: ok: success (expires in 3600 s)"),
        "{out}"
    );
    let rt = hget(&mut conn, &good.key, "refresh_token").unwrap_or_default();
    assert_ne!(rt, good.seed_rt, "not rotated");
    let stats = fake.client_stats(&good.client_id).await;
    assert_eq!(stats["calls"], json!(1), "{stats}");
    assert_eq!(stats["live_refresh_token"], json!(rt), "{stats}");

    // reauth required: exit 5.
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "zoom",
            "--wait",
        ],
        &url,
    );
    outputs.push_str(&out);
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("reauth_required"), "{out}");
    assert_eq!(
        hget(&mut conn, &format!("{}:health", revoked.key), "state").as_deref(),
        Some("reauth_required")
    );

    // not in the registry: exit 4, nothing written for it.
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "ghost",
            "--wait",
        ],
        &url,
    );
    outputs.push_str(&out);
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("not in the registry"), "{out}");
    let ghost_health: bool = redis::cmd("EXISTS")
        .arg(provider_key("acme", "ghost") + ":health")
        .query::<i64>(&mut conn)
        .map(|n| n > 0)
        .unwrap_or(true);
    assert!(
        !ghost_health,
        "a health hash was written for a provider not in the registry"
    );

    // lock busy: exit 3, no call made.
    redis::cmd("SET")
        .arg(provider_key("globex", "teams") + ":lock")
        .arg("another-replica:1")
        .arg("PX")
        .arg(30_000)
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("SET: {e}"));
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "globex",
            "--provider",
            "teams",
            "--wait",
        ],
        &url,
    );
    outputs.push_str(&out);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("locked"), "{out}");
    assert_eq!(fake.client_stats(&busy.client_id).await["calls"], json!(0));

    // Without --wait: the request id, exit 0; the answer lands in the stream.
    let (code, out) = run(&["refresh", "--tenant", "acme", "--provider", "goto"], &url);
    outputs.push_str(&out);
    assert_eq!(code, 0, "{out}");
    let request = out
        .split("request ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id in {out:?}"))
        .to_string();
    wait_until("the answer to the request", Duration::from_secs(20), || {
        !answers_to(&entries(&mut conn), &request).is_empty()
    })
    .await;

    // sync: run by one replica through the data sync, answered with its lines.
    let (code, out) = run(&["sync", "--tenant", "acme", "--wait"], &url);
    outputs.push_str(&out);
    assert!(code == 0 || code == 1, "{out}");
    assert!(!out.contains("not available in this build"), "{out}");
    assert!(out.contains("acme"), "{out}");

    // Exactly one replica answered each request (the consumer group), and an answer holds
    // the documented fields.
    let all = entries(&mut conn);
    let requests: Vec<&String> = all
        .iter()
        .filter(|(_, f)| f.get("type").map(String::as_str) != Some("answer"))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(requests.len(), 6, "{all:?}");
    let mut by_replica: HashMap<String, usize> = HashMap::new();
    for id in &requests {
        let answers = answers_to(&all, id);
        assert_eq!(answers.len(), 1, "request {id}: {answers:?}");
        for field in ["command", "tenant", "result", "detail", "replica"] {
            assert!(
                answers[0].contains_key(field),
                "{field} missing: {answers:?}"
            );
        }
        *by_replica.entry(answers[0]["replica"].clone()).or_default() += 1;
    }
    eprintln!("answers by replica: {by_replica:?}");

    // The stream stays capped: 3,000 old entries, then one more request.
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("type")
            .arg("answer")
            .arg("request")
            .arg(format!("0-{i}"))
            .ignore();
    }
    pipe.query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("XADD: {e}"));
    let (code, out) = run(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--wait",
        ],
        &url,
    );
    assert_eq!(code, 0, "{out}");
    let len: u64 = redis::cmd("XLEN")
        .arg(STREAM)
        .query(&mut conn)
        .unwrap_or(u64::MAX);
    assert!(len <= 1200, "commands stream not capped: {len} entries");

    let mut secrets = vec![rt];
    for s in [&good, &revoked, &busy] {
        secrets.extend([s.secret.clone(), s.seed_rt.clone()]);
        secrets.push(hget(&mut conn, &s.key, "access_token").unwrap_or_default());
    }
    secrets.retain(|s| s.len() >= 8);
    let stream_text = format!("{:?}", entries(&mut conn));
    assert_no_secrets("command output", &outputs, &secrets);
    assert_no_secrets("the commands stream", &stream_text, &secrets);
    assert_no_secrets("daemon a", &a.logs(), &secrets);
    assert_no_secrets("daemon b", &b.logs(), &secrets);
}

#[tokio::test]
async fn refresh_local_needs_a_writable_state_dir() {
    let redis = RedisServer::start();
    let url = redis.url();
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--local",
        ],
        &[
            ("TOKENWARDEN_REDIS_URL", url.as_str()),
            ("TOKENWARDEN_STATE_DIR", "/proc/tokenwarden-not-writable"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("not writable"), "{text}");

    // --help names every exit code and how to run without a daemon.
    let out = Daemon::cli(&["refresh", "--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{help}");
    for needle in [
        "--local",
        "--state-dir",
        "--wait",
        "3  lock busy",
        "4  not found",
        "5  re-authorisation required",
        "6  no replica answered",
    ] {
        assert!(help.contains(needle), "{needle:?} not in:\n{help}");
    }
}
