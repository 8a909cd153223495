//! A rotated refresh token is never lost: the journal, the reservation and the replay, end
//! to end against a real `redis-server` (killed, frozen, stopped) and the strict fake provider
//! (single-use refresh tokens, `reuse` counted).
//!
//! - Redis killed right after the provider answered and the daemon SIGKILLed: the answer
//!   reaches Redis from the journal after both restart; the old refresh token was sent once.
//! - Redis frozen (SIGSTOP) during a call: noticed (`/readyz` 503, `redis_up` 0), the write-back
//!   is held and replayed, never retried with the used token.
//! - Journal entries under a key the daemon does not have, and a garbage entry: quarantined,
//!   reported, never deleted; the provider is served.
//! - A held answer older than what the gateway wrote since: nothing is overwritten.
//! - Two replicas, Redis down longer than the lock's expiry with an answer held: the other
//!   replica never sends the old refresh token.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use support::metrics::metric_sum;
use support::{
    assert_no_secrets, hget, oauth_record, provider_key, seed_provider, seed_tenant_config,
    unique_temp_dir, wait_for_log, wait_until, wait_until_async, Daemon, FakeProvider, RedisServer,
};
use tokenwarden::journal::{self, Entry, EntryId, Journal, JournalKeys};
use tokenwarden::secret::Secret;

/// Quick settings: outages noticed within 1.5 s, a 1 s recovery grace, heartbeats that die
/// 3 s after their replica.
const ENV: [(&str, &str); 10] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
    ("TOKENWARDEN_REFRESH_RETRY_MAX_SECS", "2"),
    ("TOKENWARDEN_REFRESH_LOCK_BUSY_RETRY_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "3"),
    ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "1000"),
    ("TOKENWARDEN_REDIS_PING_INTERVAL_MS", "500"),
    ("TOKENWARDEN_REDIS_COMMAND_TIMEOUT_MS", "1000"),
];

fn env_with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut v = ENV.to_vec();
    v.extend_from_slice(extra);
    v
}

fn iso_now() -> String {
    Utc::now().format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

struct Seeded {
    tenant: String,
    client_id: String,
    secret: String,
    seed_rt: String,
}

impl Seeded {
    fn key(&self) -> String {
        provider_key(&self.tenant, "goto")
    }
}

/// A `goto` record due now, its client at the fake with `extra` faults.
async fn seed(
    conn: &mut redis::Connection,
    fake: &FakeProvider,
    tenant: &str,
    extra: Value,
) -> Seeded {
    let s = Seeded {
        tenant: tenant.to_string(),
        client_id: format!("client-{tenant}"),
        secret: format!("secret-{tenant}-{:08x}", fastrand::u32(..)),
        seed_rt: format!("rt-seed-{tenant}-{:08x}", fastrand::u32(..)),
    };
    let mut client = json!({
        "client_id": s.client_id,
        "client_secret": s.secret,
        "refresh_token": s.seed_rt,
    });
    if let (Some(c), Some(e)) = (client.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    fake.seed(client).await;
    seed_tenant_config(conn, tenant);
    let record = oauth_record(fake, &s.client_id, &s.secret, &s.seed_rt, &iso_now());
    seed_provider(conn, tenant, "goto", &record);
    s
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

async fn client(fake: &FakeProvider, id: &str) -> Value {
    fake.client_stats(id).await
}

fn pending_files(state: &Path) -> Vec<PathBuf> {
    dir_files(&journal::dir_in(state).join("pending"))
}

fn dir_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default()
}

fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

fn redis_conn_retry(redis: &RedisServer) -> redis::Connection {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(c) = redis
            .client()
            .get_connection_with_timeout(Duration::from_secs(1))
        {
            return c;
        }
        assert!(Instant::now() < deadline, "redis did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_in_flight(fake: &FakeProvider, id: &str) {
    wait_until_async(
        "the token call to be in flight",
        Duration::from_secs(10),
        || async move { u64_of(&client(fake, id).await, "in_flight") >= 1 },
    )
    .await;
}

/// The record holds the provider's live refresh token, different from the seed.
async fn wait_rotated_and_stored(
    fake: &FakeProvider,
    redis: &RedisServer,
    s: &Seeded,
    within: Duration,
) -> String {
    let mut conn = redis_conn_retry(redis);
    let mut stored = String::new();
    wait_until_async("the rotated token in Redis", within, || {
        let rt = hget(&mut conn, &s.key(), "refresh_token").unwrap_or_default();
        stored = rt.clone();
        let id = s.client_id.clone();
        let seed = s.seed_rt.clone();
        async move {
            let c = client(fake, &id).await;
            rt != seed && c["live_refresh_token"] == json!(rt)
        }
    })
    .await;
    stored
}

#[tokio::test]
async fn an_answer_redis_lost_reaches_it_from_the_journal_after_both_restart() {
    let mut redis =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed(&mut conn, &fake, "journaled", json!({"delay_ms": 1500})).await;
    let state = unique_temp_dir("state-journaled");
    let state_s = state.display().to_string();
    let env = env_with(&[("TOKENWARDEN_STATE_DIR", &state_s)]);
    let first = Daemon::start(&redis, &env);
    first.wait_ready(Duration::from_secs(10)).await;
    wait_in_flight(&fake, &s.client_id).await;
    // Redis dies while the provider is answering: the answer has nowhere to go but the journal.
    redis.kill();
    wait_until("the answer in the journal", Duration::from_secs(10), || {
        !pending_files(&state).is_empty()
    })
    .await;
    wait_for_log(&first, "write-back not confirmed", Duration::from_secs(5)).await;
    first.sigkill();
    assert!(first.wait_exit(Duration::from_secs(5)).is_some());
    let after_kill = client(&fake, &s.client_id).await;
    assert_eq!(u64_of(&after_kill, "refresh_ok"), 1, "{after_kill}");

    redis.restart();
    let mut conn = redis_conn_retry(&redis);
    assert_eq!(
        hget(&mut conn, &s.key(), "refresh_token").as_deref(),
        Some(s.seed_rt.as_str()),
        "nothing should have reached Redis before the replay"
    );
    let second = Daemon::start(&redis, &env);
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(15)).await;
    second.wait_ready(Duration::from_secs(10)).await;
    let c = client(&fake, &s.client_id).await;
    println!("journal replay: stored {stored}, provider {c}");
    assert_eq!(
        u64_of(&c, "reuse"),
        0,
        "the used refresh token was sent again: {c}"
    );
    assert_eq!(u64_of(&c, "invalid_grant"), 0, "{c}");
    assert!(
        pending_files(&state).is_empty(),
        "the entry was not settled"
    );
    wait_for_log(
        &second,
        "held token answer replayed",
        Duration::from_secs(5),
    )
    .await;
    let secrets = vec![s.secret.clone(), s.seed_rt.clone(), stored];
    assert_no_secrets("first daemon", &first.logs(), &secrets);
    assert_no_secrets("second daemon", &second.logs(), &secrets);
}

/// Redis dies while the provider answers and comes back from its append-only file with the
/// refresh lock still set (30 s, the default). Once the held answer is replayed the lock is
/// released: the next refresh of the 6 s token follows on time instead of waiting for the
/// lock to expire.
#[tokio::test]
async fn a_held_answer_settled_after_a_redis_restart_releases_its_lock() {
    let mut redis =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let fake = FakeProvider::start(6);
    let mut conn = redis.conn();
    let s = seed(&mut conn, &fake, "relock", json!({"delay_ms": 1000})).await;
    let lock_key = format!("{}:lock", s.key());
    let daemon = Daemon::start(&redis, &env_with(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_in_flight(&fake, &s.client_id).await;
    redis.kill();
    wait_for_log(&daemon, "write-back not confirmed", Duration::from_secs(10)).await;
    redis.restart();
    let mut conn = redis_conn_retry(&redis);
    let kept: Option<String> = redis::cmd("GET")
        .arg(&lock_key)
        .query(&mut conn)
        .unwrap_or(None);
    assert!(kept.is_some(), "the restarted Redis kept the call's lock");
    wait_for_log(
        &daemon,
        "held token answer replayed",
        Duration::from_secs(15),
    )
    .await;
    let replayed = Instant::now();
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(5)).await;
    // The 6 s token is refreshed about 3 s after the replay (a call takes 1 s); the lock
    // would have held it back for up to 30 s.
    wait_until_async(
        "the next refresh after the replay",
        Duration::from_secs(12),
        || {
            let fake = &fake;
            let id = s.client_id.clone();
            async move { u64_of(&client(fake, &id).await, "refresh_ok") >= 2 }
        },
    )
    .await;
    let c = client(&fake, &s.client_id).await;
    println!(
        "next refresh {:?} after the replay: {c}",
        replayed.elapsed()
    );
    assert_eq!(u64_of(&c, "reuse"), 0, "{c}");
    assert_eq!(u64_of(&c, "invalid_grant"), 0, "{c}");
    let secrets = vec![s.secret.clone(), s.seed_rt.clone(), stored];
    assert_no_secrets("daemon", &daemon.logs(), &secrets);
}

#[tokio::test]
async fn a_frozen_redis_is_noticed_and_the_held_answer_is_replayed_not_retried() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed(&mut conn, &fake, "frozen", json!({"delay_ms": 2000})).await;
    let daemon = Daemon::start(&redis, &env_with(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_in_flight(&fake, &s.client_id).await;
    let pid = redis.pid().expect("redis runs");
    signal_pid(pid, "STOP");
    let frozen = Instant::now();
    // Noticed within 10 s, also by an idle daemon: /readyz 503 and redis_up 0.
    wait_until_async(
        "/readyz 503 while Redis is frozen",
        Duration::from_secs(10),
        || {
            let d = &daemon;
            async move {
                d.get_with_timeout("/readyz", Duration::from_secs(2))
                    .await
                    .0
                    == 503
            }
        },
    )
    .await;
    let noticed = frozen.elapsed();
    let m = daemon.metrics().await;
    assert_eq!(metric_sum(&m, "tokenwarden_redis_up", &[]), 0.0, "{m}");
    wait_for_log(&daemon, "write-back not confirmed", Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(frozen.elapsed())).await;
    signal_pid(pid, "CONT");
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(15)).await;
    let c = client(&fake, &s.client_id).await;
    println!(
        "frozen {:?}, noticed after {noticed:?}; provider {c}",
        frozen.elapsed()
    );
    assert!(
        noticed <= Duration::from_secs(10),
        "noticed after {noticed:?}"
    );
    assert_eq!(
        u64_of(&c, "calls"),
        1,
        "the token endpoint was called again: {c}"
    );
    assert_eq!(u64_of(&c, "reuse"), 0, "{c}");
    assert_eq!(u64_of(&c, "invalid_grant"), 0, "{c}");
    daemon.wait_ready(Duration::from_secs(10)).await;
    assert_no_secrets(
        "daemon",
        &daemon.logs(),
        &[s.secret.clone(), s.seed_rt.clone(), stored],
    );
}

fn write_key_file(dir: &Path, name: &str) -> PathBuf {
    use base64::Engine as _;
    let key: [u8; 32] = std::array::from_fn(|_| fastrand::u8(..));
    let path = dir.join(name);
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(key))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn entry(tenant: &str, old_rt: &str, old_at: &str, new_rt: &str) -> Entry {
    let now = Utc::now();
    Entry {
        id: EntryId::random(),
        version: journal::FORMAT_VERSION,
        created_at: now,
        tenant: tenant.to_string(),
        provider: "goto".to_string(),
        old_refresh_token: Secret::new(old_rt),
        old_access_token: Secret::new(old_at),
        access_token: Secret::new(format!("at-held-{tenant}")),
        refresh_token: Some(Secret::new(new_rt)),
        token_expiry: (now + chrono::TimeDelta::seconds(3600))
            .format("%Y-%m-%dT%H:%M:%S%.6f")
            .to_string(),
        updated_at: now.format("%Y-%m-%dT%H:%M:%S%.6f").to_string(),
        expires_at: now + chrono::TimeDelta::seconds(3600),
        refresh_token_expires_at: None,
    }
}

#[tokio::test]
async fn entries_the_daemon_cannot_read_are_quarantined_and_the_provider_is_served() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed(&mut conn, &fake, "quarantine", json!({})).await;
    let state = unique_temp_dir("state-quarantine");
    let keys_dir = unique_temp_dir("keys");
    let key_a = write_key_file(&keys_dir, "a.key");
    let key_b = write_key_file(&keys_dir, "b.key");
    {
        let keys = JournalKeys::load(&key_a).expect("key a loads");
        let j = Journal::open(&journal::dir_in(&state), Some(keys)).expect("journal opens");
        j.append(&entry(
            "quarantine",
            &s.seed_rt,
            "at-initial",
            "rt-held-elsewhere",
        ))
        .await
        .expect("append");
    }
    let garbage = journal::dir_in(&state)
        .join("pending")
        .join("0123456789abcdef0123456789abcdef.json");
    std::fs::write(&garbage, b"{\"format\":1,\"id\":").expect("write garbage");
    assert_eq!(pending_files(&state).len(), 2);

    // A key file that is not a key: refused at start, naming it.
    let bad = keys_dir.join("bad.key");
    std::fs::write(&bad, "not base64 at all").expect("write bad key");
    let out = Daemon::cli(
        &["run"],
        &[
            ("TOKENWARDEN_REDIS_URL", &redis.url()),
            ("TOKENWARDEN_STATE_DIR", &state.display().to_string()),
            ("TOKENWARDEN_JOURNAL_KEY_FILE", &bad.display().to_string()),
        ],
    );
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("bad.key") || stderr.contains("journal"),
        "{stderr}"
    );

    // With key b, the entry under key a and the garbage cannot be read.
    let state_s = state.display().to_string();
    let key_b_s = key_b.display().to_string();
    let daemon = Daemon::start(
        &redis,
        &env_with(&[
            ("TOKENWARDEN_STATE_DIR", &state_s),
            ("TOKENWARDEN_JOURNAL_KEY_FILE", &key_b_s),
        ]),
    );
    daemon.wait_ready(Duration::from_secs(10)).await;
    let quarantine = journal::dir_in(&state).join("quarantine");
    wait_until("both entries quarantined", Duration::from_secs(5), || {
        dir_files(&quarantine).len() == 2
    })
    .await;
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(10)).await;
    // Nothing of the unreadable entries is left pending (the refresh that just ran had an
    // entry of its own while it was in flight: confirmed now).
    wait_until("no journal entry pending", Duration::from_secs(5), || {
        pending_files(&state).is_empty()
    })
    .await;
    assert!(
        daemon.logs().contains("quarantine"),
        "not reported:\n{}",
        daemon.logs()
    );
    assert_no_secrets(
        "daemon",
        &daemon.logs(),
        &[s.secret.clone(), s.seed_rt.clone(), stored],
    );
}

#[tokio::test]
async fn a_held_answer_older_than_the_gateways_write_overwrites_nothing() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    // The gateway refreshed by itself meanwhile: the record holds its newer token, live at
    // the provider, and expiring in an hour.
    let s = seed(&mut conn, &fake, "newer", json!({})).await;
    let later = (Utc::now() + chrono::TimeDelta::seconds(3600))
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string();
    redis::cmd("HSET")
        .arg(s.key())
        .arg("token_expiry")
        .arg(&later)
        .query::<()>(&mut conn)
        .expect("hset");
    let state = unique_temp_dir("state-newer");
    {
        let j = Journal::open(&journal::dir_in(&state), None).expect("journal opens");
        j.append(&entry(
            "newer",
            "rt-before-the-gateway",
            "at-before",
            "rt-stale-answer",
        ))
        .await
        .expect("append");
    }
    let state_s = state.display().to_string();
    let daemon = Daemon::start(&redis, &env_with(&[("TOKENWARDEN_STATE_DIR", &state_s)]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_for_log(
        &daemon,
        "held token answer replayed",
        Duration::from_secs(10),
    )
    .await;
    assert!(daemon.logs().contains("superseded"), "{}", daemon.logs());
    assert!(pending_files(&state).is_empty());
    let record_rt = hget(&mut conn, &s.key(), "refresh_token");
    assert_eq!(
        record_rt.as_deref(),
        Some(s.seed_rt.as_str()),
        "the gateway's newer token was overwritten"
    );
    assert_eq!(
        hget(&mut conn, &s.key(), "access_token").as_deref(),
        Some("at-initial")
    );
    let c = client(&fake, &s.client_id).await;
    assert_eq!(u64_of(&c, "calls"), 0, "{c}");
}

#[tokio::test]
async fn with_an_answer_held_through_a_long_outage_the_other_replica_never_resends_the_token() {
    let mut redis =
        RedisServer::start_with_args(&["--appendonly", "yes", "--appendfsync", "always"]);
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed(&mut conn, &fake, "reserved", json!({"delay_ms": 2000})).await;
    let env = env_with(&[
        ("TOKENWARDEN_REFRESH_HTTP_TIMEOUT_SECS", "1"),
        ("TOKENWARDEN_REFRESH_RESPONSE_TIMEOUT_SECS", "5"),
        ("TOKENWARDEN_REFRESH_LOCK_TTL_SECS", "3"),
        ("TOKENWARDEN_REFRESH_RESERVATION_TTL_SECS", "60"),
        ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "15"),
    ]);
    let a = Daemon::start(&redis, &env);
    let b = Daemon::start(&redis, &env);
    a.wait_ready(Duration::from_secs(10)).await;
    b.wait_ready(Duration::from_secs(10)).await;
    wait_in_flight(&fake, &s.client_id).await;
    // Down for longer than the lock's expiry (3 s) while the answer comes back.
    redis.stop();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    redis.restart();
    let outage = down.elapsed();
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(20)).await;
    // Let both replicas run on for a while: the held token must never be sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = client(&fake, &s.client_id).await;
    let holder = if a.logs().contains("write-back not confirmed") {
        "a"
    } else {
        "b"
    };
    println!("outage {outage:?}; holder {holder}; provider {c}");
    assert!(
        a.logs().contains("write-back not confirmed")
            || b.logs().contains("write-back not confirmed"),
        "no answer was held through the outage"
    );
    assert_eq!(
        u64_of(&c, "calls"),
        1,
        "the other replica called the token endpoint: {c}"
    );
    assert_eq!(u64_of(&c, "reuse"), 0, "{c}");
    let mut conn = redis_conn_retry(&redis);
    assert_eq!(
        hget(&mut conn, &s.key(), "refresh_token").as_deref(),
        Some(stored.as_str())
    );
    let secrets = vec![s.secret.clone(), s.seed_rt.clone(), stored];
    assert_no_secrets("replica a", &a.logs(), &secrets);
    assert_no_secrets("replica b", &b.logs(), &secrets);
}

#[tokio::test]
async fn a_journal_that_cannot_be_written_stops_new_rotating_refreshes_until_it_can() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let state = unique_temp_dir("state-broken");
    let state_s = state.display().to_string();
    let daemon = Daemon::start(&redis, &env_with(&[("TOKENWARDEN_STATE_DIR", &state_s)]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    // The journal's pending directory becomes a plain file: no append can succeed.
    let pending = journal::dir_in(&state).join("pending");
    let aside = journal::dir_in(&state).join("pending.aside");
    std::fs::rename(&pending, &aside).expect("move pending aside");
    std::fs::write(&pending, b"not a directory").expect("block pending");
    let first = seed(&mut conn, &fake, "broken-first", json!({})).await;
    // Its answer is written back anyway...
    let stored = wait_rotated_and_stored(&fake, &redis, &first, Duration::from_secs(10)).await;
    wait_for_log(&daemon, "journal cannot be written", Duration::from_secs(5)).await;
    // ...and the daemon says it is not ready, and starts no other rotating refresh.
    wait_until_async(
        "/readyz 503 with the journal broken",
        Duration::from_secs(5),
        || {
            let d = &daemon;
            async move { d.get("/readyz").await.0 == 503 }
        },
    )
    .await;
    let second = seed(&mut conn, &fake, "broken-second", json!({})).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let c = client(&fake, &second.client_id).await;
    assert_eq!(
        u64_of(&c, "calls"),
        0,
        "a rotating refresh started without a journal: {c}"
    );
    let m = daemon.metrics().await;
    assert!(m.contains("result=\"journal_unavailable\""), "{m}");
    // The journal works again: refreshes resume and the daemon is ready.
    std::fs::remove_file(&pending).expect("unblock");
    std::fs::rename(&aside, &pending).expect("move pending back");
    let stored2 = wait_rotated_and_stored(&fake, &redis, &second, Duration::from_secs(10)).await;
    daemon.wait_ready(Duration::from_secs(10)).await;
    assert!(
        daemon.logs().contains("journal writable again"),
        "{}",
        daemon.logs()
    );
    let secrets = vec![
        first.secret,
        first.seed_rt,
        stored,
        second.secret,
        second.seed_rt,
        stored2,
    ];
    assert_no_secrets("daemon", &daemon.logs(), &secrets);
}

#[tokio::test]
async fn a_wrong_typed_event_stream_or_health_key_never_turns_a_refresh_into_a_retry() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    redis::cmd("SET")
        .arg("tokenwarden:events")
        .arg("not a stream")
        .query::<()>(&mut conn)
        .expect("set events");
    let s = seed(&mut conn, &fake, "wrongtype", json!({})).await;
    redis::cmd("RPUSH")
        .arg(support::health_key("wrongtype", "goto"))
        .arg("not a hash")
        .query::<()>(&mut conn)
        .expect("rpush health");
    let daemon = Daemon::start(&redis, &env_with(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    let stored = wait_rotated_and_stored(&fake, &redis, &s, Duration::from_secs(10)).await;
    // Refreshed once, counted a success, and not refreshed again over the next seconds.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let c = client(&fake, &s.client_id).await;
    assert_eq!(u64_of(&c, "calls"), 1, "refreshed again: {c}");
    let m = daemon.metrics().await;
    assert_eq!(
        metric_sum(
            &m,
            "tokenwarden_token_refresh_total",
            &[("result", "success")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric_sum(
            &m,
            "tokenwarden_token_refresh_total",
            &[("result", "redis_error")]
        ),
        0.0,
        "{m}"
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("refused by Redis"),
        "the refused write was not reported:\n{logs}"
    );
    assert_no_secrets(
        "daemon",
        &logs,
        &[s.secret.clone(), s.seed_rt.clone(), stored],
    );
}
