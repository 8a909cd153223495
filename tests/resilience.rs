//! Resilience of the real daemon, end to end: several replicas on one Redis, a registry that
//! changes under a running daemon, Redis going away and coming back, signals in the middle
//! of a token call (SIGTERM drains, SIGKILL leaves the lock to expire), the HTTP endpoints, the
//! one-shot commands and configuration reload.
//!
//! Every test runs its own `redis-server`, its own fake provider and the real `tokenwarden`
//! binary, with token lifetimes of a few seconds so that rotations happen while it watches.
//! Waits are bounded by deadlines; the one fixed-length wait is the two-replica soak, whose
//! length is the point of the test. Every test also checks that no seeded secret or token
//! reached the daemon's output.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use support::metrics::{metric_sum, samples};
use support::{
    assert_no_secrets, free_port, health_key, hget, hgetall, oauth_record, provider_key,
    seed_provider, seed_tenant_config, wait_for_log, wait_until, wait_until_async, Daemon,
    FakeProvider, RedisServer,
};

// -----------------------------------------------------------------------------------------
// Helpers

/// Settings that keep the daemon quick enough for tests: a light registry scan every second,
/// short retries, a replica that found a lock busy looks again after a second, a heartbeat
/// that dies 3 s after its replica, a 1 s recovery grace. Health
/// probes are off: their own tests are in tests/health.rs, and the state asserted here is
/// the one refreshes give.
const FAST: [(&str, &str); 8] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "3"),
    ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "1000"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
    ("TOKENWARDEN_REFRESH_RETRY_MAX_SECS", "2"),
    ("TOKENWARDEN_REFRESH_LOCK_BUSY_RETRY_SECS", "1"),
];

/// [`FAST`] followed by `extra` (later entries win).
fn fast_env<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = FAST.to_vec();
    env.extend_from_slice(extra);
    env
}

/// `now + ms`, as Python's `datetime.isoformat()` writes an aware UTC time.
fn iso_in(ms: i64) -> String {
    (Utc::now() + chrono::Duration::milliseconds(ms))
        .format("%Y-%m-%dT%H:%M:%S%.6f+00:00")
        .to_string()
}

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{:016x}{:08x}",
        fastrand::u64(..),
        fastrand::u32(..)
    )
}

fn lock_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}:lock")
}

fn exists(conn: &mut redis::Connection, key: &str) -> bool {
    redis::cmd("EXISTS")
        .arg(key)
        .query::<i64>(conn)
        .unwrap_or_else(|e| panic!("EXISTS {key}: {e}"))
        == 1
}

fn get(conn: &mut redis::Connection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("GET {key}: {e}"))
}

fn pttl(conn: &mut redis::Connection, key: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("PTTL {key}: {e}"))
}

/// One provider record seeded in Redis and registered at the fake.
#[derive(Debug, Clone)]
struct Seeded {
    tenant: String,
    provider: String,
    client_id: String,
    secret: String,
    seed_rt: String,
}

impl Seeded {
    fn key(&self) -> String {
        provider_key(&self.tenant, &self.provider)
    }
    fn health(&self) -> String {
        health_key(&self.tenant, &self.provider)
    }
    fn lock(&self) -> String {
        lock_key(&self.tenant, &self.provider)
    }
    /// `tenant="..",provider=".."`, as the per-provider series label it.
    fn labels(&self) -> String {
        format!("tenant=\"{}\",provider=\"{}\"", self.tenant, self.provider)
    }
}

/// Registers a client at the fake (with `fake_extra` options such as `delay_ms`) and writes
/// a GoTo-shaped record for it whose access token expires at `token_expiry`.
async fn seed_oauth(
    conn: &mut redis::Connection,
    fake: &FakeProvider,
    tenant: &str,
    provider: &str,
    token_expiry: &str,
    fake_extra: Value,
) -> Seeded {
    let s = Seeded {
        tenant: tenant.to_string(),
        provider: provider.to_string(),
        client_id: format!("client-{tenant}-{provider}"),
        secret: unique("secret"),
        seed_rt: unique("rt-seed"),
    };
    let mut client = json!({
        "client_id": s.client_id,
        "client_secret": s.secret,
        "refresh_token": s.seed_rt,
    });
    if let (Some(c), Some(extra)) = (client.as_object_mut(), fake_extra.as_object()) {
        c.extend(extra.clone());
    }
    fake.seed(client).await;
    seed_tenant_config(conn, tenant);
    let record = oauth_record(fake, &s.client_id, &s.secret, &s.seed_rt, token_expiry);
    seed_provider(conn, tenant, provider, &record);
    s
}

/// Every secret a daemon must never print: the client secrets, the seeded refresh tokens, the
/// seeded access token, and the tokens the records hold now.
fn secrets_of(conn: &mut redis::Connection, seeded: &[Seeded]) -> Vec<String> {
    let mut out = vec!["at-initial".to_string()];
    for s in seeded {
        out.push(s.secret.clone());
        out.push(s.seed_rt.clone());
        for field in ["access_token", "refresh_token"] {
            if let Some(v) = hget(conn, &s.key(), field) {
                if !v.is_empty() {
                    out.push(v);
                }
            }
        }
    }
    out
}

async fn metrics(daemon: &Daemon) -> String {
    let (status, body) = daemon.get("/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body
}

fn refreshes(body: &str, result: &str) -> f64 {
    metric_sum(
        body,
        "tokenwarden_token_refresh_total",
        &[("result", result)],
    )
}

fn u64_of(v: &Value, field: &str) -> u64 {
    v[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field:?} in {v}"))
}

/// How many of `pairs` (refresh token, access token) the fake holds alive / live.
async fn verify(fake: &FakeProvider, pairs: &[(String, String)]) -> Value {
    let pairs: Vec<[&str; 2]> = pairs
        .iter()
        .map(|(rt, at)| [rt.as_str(), at.as_str()])
        .collect();
    fake.post("/verify", json!({ "pairs": pairs })).await
}

/// A bounded wait written as a loop: `tick` sleeps a little, or panics once `what` has taken
/// longer than allowed.
struct Deadline {
    what: String,
    start: Instant,
    limit: Duration,
}

impl Deadline {
    fn new(what: &str, limit: Duration) -> Deadline {
        Deadline {
            what: what.to_string(),
            start: Instant::now(),
            limit,
        }
    }
    async fn tick(&self) {
        assert!(
            self.start.elapsed() < self.limit,
            "timed out after {:?} waiting for {}",
            self.limit,
            self.what
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn fake_in_flight(fake: &FakeProvider) -> u64 {
    u64_of(&fake.stats_summary().await, "in_flight")
}

// -----------------------------------------------------------------------------------------
// 1. Two replicas on one Redis

#[tokio::test]
async fn two_daemons_share_one_fleet_without_reusing_a_refresh_token() {
    const PROVIDERS: usize = 20;
    const SOAK: Duration = Duration::from_secs(20);
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3);
    let mut conn = redis.conn();
    let mut seeded = Vec::new();
    for i in 0..PROVIDERS {
        // Four tenants of five providers; first expiries spread over the first 3 s.
        let tenant = format!("soak-{}", i / 5);
        let provider = format!("prov{i}");
        let expiry = iso_in((i as i64) * 150);
        seeded.push(seed_oauth(&mut conn, &fake, &tenant, &provider, &expiry, json!({})).await);
    }

    // Both replicas serve every tenant, so that they meet at the locks (shared fleets are
    // tested in tests/sharing.rs).
    let env = fast_env(&[("TOKENWARDEN_REPLICA_SHARE_FLEET", "false")]);
    let a = Daemon::start(&redis, &env);
    let b = Daemon::start(&redis, &env);
    a.wait_ready(Duration::from_secs(10)).await;
    b.wait_ready(Duration::from_secs(10)).await;

    // The soak: the fake must never see a used refresh token again, nor the same one twice
    // at once. Checked as it goes, so a failure points at the moment it happened.
    let soak_end = Instant::now() + SOAK;
    while Instant::now() < soak_end {
        let stats = fake.stats_summary().await;
        assert_eq!(u64_of(&stats, "reuse"), 0, "refresh token reused: {stats}");
        assert_eq!(
            u64_of(&stats, "concurrent_same_rt"),
            0,
            "same refresh token sent twice at once: {stats}"
        );
        assert_eq!(a.exit_status(), None, "daemon A exited during the soak");
        assert_eq!(b.exit_status(), None, "daemon B exited during the soak");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The fake's count before the scrape bounds the daemons' counters from below, its count
    // after they stopped from above (refreshes go on between the two scrapes and SIGTERM).
    let fake_ok_before = u64_of(&fake.stats_summary().await, "refresh_ok");
    let (ma, mb) = (metrics(&a).await, metrics(&b).await);
    a.sigterm();
    b.sigterm();
    assert_eq!(
        a.wait_exit(Duration::from_secs(15)),
        Some(0),
        "daemon A exit"
    );
    assert_eq!(
        b.wait_exit(Duration::from_secs(15)),
        Some(0),
        "daemon B exit"
    );

    let stats = fake.stats().await;
    assert_eq!(u64_of(&stats, "reuse"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "concurrent_same_rt"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "invalid_grant"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "bad_client"), 0, "{stats}");
    for s in &seeded {
        let c = &stats["clients"][&s.client_id];
        assert!(
            u64_of(c, "refresh_ok") >= 5,
            "{}/{} refreshed only {} times in {SOAK:?} with 3 s tokens",
            s.tenant,
            s.provider,
            c["refresh_ok"]
        );
    }

    // With both replicas stopped, every record must hold the refresh token the fake holds
    // alive: not one rotation was lost.
    let mut pairs = Vec::new();
    for s in &seeded {
        let record = hgetall(&mut conn, &s.key());
        let rt = record.get("refresh_token").cloned().unwrap_or_default();
        let at = record.get("access_token").cloned().unwrap_or_default();
        assert_eq!(
            stats["clients"][&s.client_id]["live_refresh_token"],
            json!(rt),
            "{}/{}: the record's refresh token is not the fake's live one",
            s.tenant,
            s.provider
        );
        pairs.push((rt, at));
        let health = hgetall(&mut conn, &s.health());
        assert_eq!(
            health.get("state").map(String::as_str),
            Some("healthy"),
            "{}/{} health: {health:?}",
            s.tenant,
            s.provider
        );
    }
    let verified = verify(&fake, &pairs).await;
    assert_eq!(
        u64_of(&verified, "refresh_alive"),
        PROVIDERS as u64,
        "{verified}"
    );

    let (ok_a, ok_b) = (refreshes(&ma, "success"), refreshes(&mb, "success"));
    let locked = refreshes(&ma, "locked") + refreshes(&mb, "locked");
    let skipped = refreshes(&ma, "skipped") + refreshes(&mb, "skipped");
    let coordinated = locked + skipped;
    assert!(ok_a > 0.0, "daemon A refreshed nothing:\n{ma}");
    assert!(ok_b > 0.0, "daemon B refreshed nothing:\n{mb}");
    assert!(
        coordinated > 0.0,
        "no `locked` or `skipped` attempt on either replica: they never met at a lock"
    );
    for (name, m) in [("A", &ma), ("B", &mb)] {
        for bad in ["conflict", "reauth_required", "transient_error"] {
            assert_eq!(refreshes(m, bad), 0.0, "daemon {name} counted {bad}:\n{m}");
        }
    }
    let counted = (ok_a + ok_b) as u64;
    // An answer the fake gave just before the scrape may still be on its way to the engine
    // (write-back, release, the outcome applied): at most one per provider.
    let lowest = fake_ok_before.saturating_sub(PROVIDERS as u64);
    assert!(
        (lowest..=u64_of(&stats, "refresh_ok")).contains(&counted),
        "the daemons counted {counted} successes; the fake refreshed {fake_ok_before} before \
         the scrape and {} in all",
        stats["refresh_ok"]
    );

    let secrets = secrets_of(&mut conn, &seeded);
    assert_no_secrets("daemon A logs", &a.logs(), &secrets);
    assert_no_secrets("daemon B logs", &b.logs(), &secrets);
    println!(
        "two daemons, {PROVIDERS} providers, 3 s tokens, {SOAK:?}: daemon A {ok_a} refreshes, \
         daemon B {ok_b}, locked {locked}, skipped {skipped}, refresh-token reuses {}, \
         concurrent same-token calls {}",
        stats["reuse"], stats["concurrent_same_rt"]
    );
}

// -----------------------------------------------------------------------------------------
// 2. Registry changes while running (change scan)

#[tokio::test]
async fn providers_added_and_removed_while_running_are_followed() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    // One provider that stays, not due for an hour.
    let stays = seed_oauth(
        &mut conn,
        &fake,
        "steady",
        "goto",
        &iso_in(3_600_000),
        json!({}),
    )
    .await;
    let daemon = Daemon::start(&redis, &fast_env(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;

    // Added after the daemon is ready, already due.
    let added = Instant::now();
    let late = seed_oauth(&mut conn, &fake, "late", "goto", &iso_in(0), json!({})).await;
    wait_until_async(
        "the new provider to be refreshed",
        Duration::from_secs(10),
        || {
            let fake = &fake;
            let id = late.client_id.clone();
            async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
        },
    )
    .await;
    println!(
        "new provider refreshed {:?} after it was added",
        added.elapsed()
    );
    wait_until(
        "the new provider's health to record the success",
        Duration::from_secs(5),
        || hget(&mut conn, &late.health(), "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let rt = hget(&mut conn, &late.key(), "refresh_token").unwrap_or_default();
    assert_ne!(rt, late.seed_rt, "record not rotated");
    assert_eq!(
        fake.client_stats(&late.client_id).await["live_refresh_token"],
        json!(rt)
    );
    assert_eq!(
        hget(&mut conn, &late.health(), "state").as_deref(),
        Some("healthy")
    );
    let m = metrics(&daemon).await;
    assert!(
        m.contains(&late.labels()),
        "no series for the new provider:\n{m}"
    );
    let secrets = secrets_of(&mut conn, &[stays.clone(), late.clone()]);

    // Removed from the registry: SREM then DEL, as the gateway does.
    redis::cmd("SREM")
        .arg("tenant:late:providers")
        .arg("goto")
        .query::<()>(&mut conn)
        .expect("SREM");
    redis::cmd("DEL")
        .arg(late.key())
        .query::<()>(&mut conn)
        .expect("DEL");
    wait_until(
        "the removed provider's health hash to be deleted",
        Duration::from_secs(10),
        || !exists(&mut conn, &late.health()),
    )
    .await;
    let labels = late.labels();
    wait_until_async(
        "the removed provider's series to vanish from /metrics",
        Duration::from_secs(10),
        || {
            let daemon = &daemon;
            let labels = labels.clone();
            async move { !metrics(daemon).await.contains(&labels) }
        },
    )
    .await;
    // The provider that stayed is still tracked and untouched.
    let m = metrics(&daemon).await;
    assert!(
        m.contains(&stays.labels()),
        "the remaining provider lost its series:\n{m}"
    );
    assert!(exists(&mut conn, &stays.health()));
    assert_eq!(fake.client_stats(&stays.client_id).await["calls"], json!(0));
    assert!(daemon.logs().contains("provider left the registry"));
    assert_no_secrets("daemon logs", &daemon.logs(), &secrets);
}

// -----------------------------------------------------------------------------------------
// 3. Keyspace notifications

#[tokio::test]
async fn keyspace_notifications_bring_changes_in_without_waiting_for_a_scan() {
    let redis = RedisServer::start_with_args(&["--notify-keyspace-events", "KEA"]);
    // A change scan every 30 s: only notifications can explain a pickup within 3 s.
    let env = fast_env(&[("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "30")]);
    changes_are_followed(
        &redis,
        &env,
        "subscribed to keyspace notifications",
        "keyspace notifications",
    )
    .await;
}

#[tokio::test]
async fn client_tracking_brings_changes_in_without_notifications_or_scans() {
    // The server sends no keyspace notifications; a change scan every 30 s.
    let redis = RedisServer::start();
    let env = fast_env(&[("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "30")]);
    changes_are_followed(
        &redis,
        &env,
        "following registry changes through client-tracking invalidations",
        "client tracking",
    )
    .await;
}

#[tokio::test]
async fn change_scans_bring_changes_in_when_no_event_source_is_used() {
    let redis = RedisServer::start_with_args(&["--notify-keyspace-events", "KEA"]);
    let env = fast_env(&[
        ("TOKENWARDEN_REGISTRY_KEYSPACE_NOTIFICATIONS", "off"),
        ("TOKENWARDEN_REGISTRY_CLIENT_TRACKING", "off"),
    ]);
    changes_are_followed(&redis, &env, "following the registry", "change scan").await;
}

#[tokio::test]
async fn own_write_backs_are_not_read_back_through_keyspace_notifications() {
    let redis = RedisServer::start_with_args(&["--notify-keyspace-events", "KEA"]);
    own_write_backs_are_not_read_back(&redis, "subscribed to keyspace notifications").await;
}

#[tokio::test]
async fn own_write_backs_are_not_read_back_through_client_tracking() {
    let redis = RedisServer::start();
    own_write_backs_are_not_read_back(
        &redis,
        "following registry changes through client-tracking invalidations",
    )
    .await;
}

/// A restart finds the health hashes its predecessor left for the same tokens: it keeps
/// their plans (`next_refresh_at` as it was) and writes no health for them at start, as the
/// server's command log shows; a provider whose token the gateway changed while no daemon
/// ran is planned anew and its health written.
#[tokio::test]
async fn a_restart_keeps_the_plans_and_health_it_finds() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut seeded = Vec::new();
    for i in 0..5 {
        let expiry = iso_in(3_600_000 + i * 60_000);
        seeded.push(
            seed_oauth(
                &mut conn,
                &fake,
                "restart",
                &format!("p{i}"),
                &expiry,
                json!({}),
            )
            .await,
        );
    }
    let env = fast_env(&[]);
    let first = Daemon::start(&redis, &env);
    first.wait_ready(Duration::from_secs(10)).await;
    let field = |conn: &mut redis::Connection, s: &Seeded, f: &str| {
        hget(conn, &s.health(), f).unwrap_or_default()
    };
    wait_until(
        "a plan in every health hash",
        Duration::from_secs(10),
        || {
            seeded
                .iter()
                .all(|s| !field(&mut conn, s, "next_refresh_at").is_empty())
        },
    )
    .await;
    assert_eq!(first.terminate(Duration::from_secs(10)).await, 0);
    let before: Vec<std::collections::HashMap<String, String>> = seeded
        .iter()
        .map(|s| hgetall(&mut conn, &s.health()))
        .collect();

    // While no daemon runs, the gateway re-authorises p4: a new token, a new expiry.
    let changed = &seeded[4];
    redis::cmd("HSET")
        .arg(changed.key())
        .arg("token_expiry")
        .arg(iso_in(7_200_000))
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("HSET: {e}"));

    let monitor = support::redis::Monitor::start(&redis).await;
    let second = Daemon::start(&redis, &env);
    second.wait_ready(Duration::from_secs(10)).await;
    let old_expiry = before[4].get("token_expiry").cloned().unwrap_or_default();
    wait_until(
        "the changed provider's health written",
        Duration::from_secs(10),
        || field(&mut conn, changed, "token_expiry") != old_expiry,
    )
    .await;
    let after: Vec<std::collections::HashMap<String, String>> = seeded
        .iter()
        .map(|s| hgetall(&mut conn, &s.health()))
        .collect();
    for (i, s) in seeded.iter().enumerate().take(4) {
        assert_eq!(
            after[i], before[i],
            "{}: health rewritten at restart",
            s.provider
        );
    }
    assert_ne!(
        after[4].get("next_refresh_at"),
        before[4].get("next_refresh_at"),
        "a new token gets a new plan"
    );
    // The health script, by the server's command log: called for p4 only.
    let health_writes = |s: &Seeded| {
        monitor
            .client_commands("EVALSHA")
            .iter()
            .chain(monitor.client_commands("EVAL").iter())
            .filter(|l| l.contains(&format!("\"{}\"", s.health())))
            .count()
    };
    for s in seeded.iter().take(4) {
        assert_eq!(
            health_writes(s),
            0,
            "{}: health written at restart",
            s.provider
        );
    }
    assert!(
        health_writes(changed) >= 1,
        "the changed provider's health is written"
    );
    // The kept plans are the schedule: the daemon's own view says the same.
    let body = metrics(&second).await;
    for (i, s) in seeded.iter().enumerate().take(4) {
        let plan = before[i]
            .get("next_refresh_at")
            .cloned()
            .unwrap_or_default();
        let planned = chrono::DateTime::parse_from_rfc3339(&plan)
            .unwrap_or_else(|e| panic!("{}: next_refresh_at {plan:?}: {e}", s.provider))
            .timestamp() as f64;
        let scheduled = metric_sum(
            &body,
            "tokenwarden_token_next_refresh_timestamp_seconds",
            &[
                ("tenant", s.tenant.as_str()),
                ("provider", s.provider.as_str()),
            ],
        );
        assert_eq!(
            scheduled, planned,
            "{}: scheduled for another time",
            s.provider
        );
    }
    println!("restart: 4 plans kept, 0 health writes for them; the changed provider re-planned");
}

/// Each write-back causes a change event (the daemon's own); the follower knows it and does
/// not read the record back: over a dozen refreshes the server sees no `HMGET` (the
/// follower's read; a refresh reads under its lock with `HGETALL`), the skips are counted,
/// and a write by the gateway right after a refresh is still followed within 3 s.
async fn own_write_backs_are_not_read_back(redis: &RedisServer, log: &str) {
    const PROVIDERS: usize = 4;
    // Tokens of 3 s: each provider is refreshed about every 2 s.
    let fake = FakeProvider::start(3);
    let mut conn = redis.conn();
    let mut seeded = Vec::new();
    for i in 0..PROVIDERS {
        let expiry = iso_in(500 + (i as i64) * 200);
        seeded.push(
            seed_oauth(
                &mut conn,
                &fake,
                "echo",
                &format!("p{i}"),
                &expiry,
                json!({}),
            )
            .await,
        );
    }
    // No change scans (events are live) and no full rescan during the test.
    let env = fast_env(&[("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "60")]);
    let daemon = Daemon::start(redis, &env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_for_log(&daemon, log, Duration::from_secs(5)).await;
    let monitor = support::redis::Monitor::start(redis).await;
    // Write-backs: the daemon's compare-and-set.
    let write_backs = |m: &support::redis::Monitor| {
        m.client_commands("EVAL")
            .iter()
            .filter(|l| l.contains("'refresh_token', ARGV[3]"))
            .count()
    };
    wait_until("a dozen write-backs", Duration::from_secs(20), || {
        write_backs(&monitor) >= 12
    })
    .await;
    // Let the last write-back's event arrive and be handled.
    wait_for_log(&daemon, "token refreshed", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes = write_backs(&monitor);
    // Record reads by the follower: HMGET of the record fields without the access token (a
    // refresh reads under its lock with it; the health script's HMGET runs in Lua).
    let reads: Vec<String> = monitor
        .client_commands("HMGET")
        .into_iter()
        .filter(|l| !l.contains("\"access_token\""))
        .collect();
    assert!(
        reads.is_empty(),
        "records read back after {writes} own write-backs: {reads:#?}"
    );
    let skipped = metric_sum(
        &metrics(&daemon).await,
        "tokenwarden_registry_echoes_skipped_total",
        &[],
    );
    println!("{writes} write-backs, {skipped} echoes skipped, no record read back");
    assert!(skipped >= 12.0, "echoes skipped: {skipped}");

    // The gateway deactivates a provider right after its refresh: still followed.
    let target = &seeded[0];
    let refreshed = u64_of(&fake.client_stats(&target.client_id).await, "refresh_ok");
    wait_until_async(
        "the next refresh of the provider the gateway will change",
        Duration::from_secs(10),
        || {
            let fake = &fake;
            let id = target.client_id.clone();
            async move { u64_of(&fake.client_stats(&id).await, "refresh_ok") > refreshed }
        },
    )
    .await;
    redis::cmd("HSET")
        .arg(target.key())
        .arg("status")
        .arg("inactive")
        .query::<()>(&mut conn)
        .expect("HSET status");
    wait_until(
        "the gateway's change to be followed",
        Duration::from_secs(3),
        || hget(&mut conn, &target.health(), "state").as_deref() == Some("inactive"),
    )
    .await;
    let stats = fake.stats_summary().await;
    assert_eq!(u64_of(&stats, "reuse"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "invalid_grant"), 0, "{stats}");
}

/// New tenants, new providers of known tenants, changed and removed records are all
/// followed within 3 s by a daemon started with `env`, which says `log` once its event
/// source is up and names `source` in its "following the registry" line.
async fn changes_are_followed(redis: &RedisServer, env: &[(&str, &str)], log: &str, source: &str) {
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let first = seed_oauth(
        &mut conn,
        &fake,
        "notified",
        "goto",
        &iso_in(3_600_000),
        json!({}),
    )
    .await;
    let daemon = Daemon::start(redis, env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_for_log(&daemon, log, Duration::from_secs(5)).await;
    assert!(
        daemon
            .logs()
            .lines()
            .any(|l| l.contains("following the registry") && l.contains(source)),
        "the daemon does not say it follows the registry by {source}"
    );

    // A new provider in a new tenant.
    let added = Instant::now();
    let fresh = seed_oauth(&mut conn, &fake, "newcomer", "teams", &iso_in(0), json!({})).await;
    wait_until_async(
        "the new provider to be refreshed (by notification)",
        Duration::from_secs(3),
        || {
            let fake = &fake;
            let id = fresh.client_id.clone();
            async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
        },
    )
    .await;
    println!(
        "notified provider refreshed {:?} after it was added",
        added.elapsed()
    );

    // A provider added to an existing tenant.
    let second = seed_oauth(&mut conn, &fake, "notified", "zoom", &iso_in(0), json!({})).await;
    wait_until_async(
        "a provider added to a known tenant to be refreshed",
        Duration::from_secs(3),
        || {
            let fake = &fake;
            let id = second.client_id.clone();
            async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
        },
    )
    .await;

    // A record changed by the gateway (a new expiry, due now) is refreshed at once too.
    redis::cmd("HSET")
        .arg(first.key())
        .arg("token_expiry")
        .arg(iso_in(0))
        .query::<()>(&mut conn)
        .expect("HSET token_expiry");
    wait_until_async(
        "a changed record to be refreshed",
        Duration::from_secs(3),
        || {
            let fake = &fake;
            let id = first.client_id.clone();
            async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
        },
    )
    .await;

    // And a removal is noticed as quickly.
    let secrets = secrets_of(&mut conn, &[first.clone(), fresh.clone(), second.clone()]);
    // The gateway removes a provider in one transaction: SREM + DEL.
    redis::pipe()
        .atomic()
        .cmd("SREM")
        .arg("tenant:newcomer:providers")
        .arg("teams")
        .ignore()
        .cmd("DEL")
        .arg(fresh.key())
        .ignore()
        .query::<()>(&mut conn)
        .expect("MULTI SREM DEL EXEC");
    let removed = Deadline::new(
        "the removed provider's health hash to be deleted",
        Duration::from_secs(3),
    );
    while exists(&mut conn, &fresh.health()) {
        if removed.start.elapsed() >= removed.limit {
            panic!(
                "the removed provider's health hash still exists {:?} after SREM + DEL: {:?}",
                removed.limit,
                hgetall(&mut conn, &fresh.health())
            );
        }
        removed.tick().await;
    }
    // ... and stays deleted, and the provider is no longer tracked.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!exists(&mut conn, &fresh.health()), "health hash recreated");
    let m = metrics(&daemon).await;
    assert!(
        !m.contains(&fresh.labels()),
        "series of the removed provider:\n{m}"
    );
    assert_eq!(
        metric_sum(&m, "tokenwarden_registry_providers", &[]),
        2.0,
        "tracked providers after the removal:\n{m}"
    );
    let stats = fake.stats_summary().await;
    assert_eq!(u64_of(&stats, "reuse"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "invalid_grant"), 0, "{stats}");
    assert_no_secrets("daemon logs", &daemon.logs(), &secrets);
}

// -----------------------------------------------------------------------------------------
// 4. Redis stopped and restarted

#[tokio::test]
async fn daemon_survives_a_redis_restart_and_keeps_refreshing() {
    let mut redis = RedisServer::start();
    let fake = FakeProvider::start(3);
    let mut conn = redis.conn();
    let mut seeded = Vec::new();
    for p in ["goto", "teams", "zoom"] {
        seeded.push(seed_oauth(&mut conn, &fake, "bounce", p, &iso_in(0), json!({})).await);
    }
    let daemon = Daemon::start(&redis, &fast_env(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    for s in &seeded {
        wait_until_async(
            "a first refresh of each provider",
            Duration::from_secs(10),
            || {
                let fake = &fake;
                let id = s.client_id.clone();
                async move { u64_of(&fake.client_stats(&id).await, "refresh_ok") >= 1 }
            },
        )
        .await;
    }
    assert!(metrics(&daemon).await.contains("tokenwarden_redis_up 1"));
    let mut secrets = secrets_of(&mut conn, &seeded);
    drop(conn);

    redis.stop();
    let stopped = Instant::now();
    wait_until_async(
        "/readyz to answer 503 while Redis is down",
        Duration::from_secs(10),
        || {
            let daemon = &daemon;
            async move { daemon.get("/readyz").await.0 == 503 }
        },
    )
    .await;
    wait_until_async("tokenwarden_redis_up 0", Duration::from_secs(10), || {
        let daemon = &daemon;
        async move { metrics(daemon).await.contains("tokenwarden_redis_up 0") }
    })
    .await;
    // Down for a few token lifetimes' worth of refresh deadlines.
    while stopped.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            daemon.exit_status(),
            None,
            "daemon exited while Redis was down"
        );
        let (status, body) = daemon.get("/healthz").await;
        assert_eq!(status, 200, "/healthz while Redis is down: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before: Vec<u64> = {
        let stats = fake.stats().await;
        seeded
            .iter()
            .map(|s| u64_of(&stats["clients"][&s.client_id], "refresh_ok"))
            .collect()
    };

    redis.restart();
    let mut conn = redis.conn();
    let rts_at_restart: Vec<String> = seeded
        .iter()
        .map(|s| hget(&mut conn, &s.key(), "refresh_token").unwrap_or_default())
        .collect();
    daemon.wait_ready(Duration::from_secs(15)).await;
    wait_until_async("tokenwarden_redis_up 1", Duration::from_secs(10), || {
        let daemon = &daemon;
        async move { metrics(daemon).await.contains("tokenwarden_redis_up 1") }
    })
    .await;
    for (i, s) in seeded.iter().enumerate() {
        let what = format!(
            "{}/{} to rotate again after the restart",
            s.tenant, s.provider
        );
        let deadline = Deadline::new(&what, Duration::from_secs(15));
        loop {
            let c = fake.client_stats(&s.client_id).await;
            let rt = hget(&mut conn, &s.key(), "refresh_token").unwrap_or_default();
            if u64_of(&c, "refresh_ok") > before[i]
                && rt != rts_at_restart[i]
                && c["live_refresh_token"] == json!(rt)
            {
                break;
            }
            deadline.tick().await;
        }
        wait_until(
            "health to be healthy after the restart",
            Duration::from_secs(5),
            || hget(&mut conn, &s.health(), "state").as_deref() == Some("healthy"),
        )
        .await;
    }
    assert!(daemon.logs().contains("redis unreachable"));
    assert!(daemon.logs().contains("redis reachable"));
    let stats = fake.stats_summary().await;
    assert_eq!(u64_of(&stats, "reuse"), 0, "{stats}");
    assert_eq!(u64_of(&stats, "invalid_grant"), 0, "{stats}");
    secrets.extend(secrets_of(&mut conn, &seeded));
    assert_no_secrets("daemon logs", &daemon.logs(), &secrets);
}

// -----------------------------------------------------------------------------------------
// 5. SIGTERM during a slow token call

#[tokio::test]
async fn sigterm_drains_an_in_flight_refresh_and_releases_its_lock() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(
        &mut conn,
        &fake,
        "drain",
        "goto",
        &iso_in(0),
        json!({"delay_ms": 3000}),
    )
    .await;
    let daemon = Daemon::start(&redis, &fast_env(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_until_async(
        "the token call to be in flight",
        Duration::from_secs(5),
        || {
            let fake = &fake;
            async move { fake_in_flight(fake).await >= 1 }
        },
    )
    .await;
    assert!(exists(&mut conn, &s.lock()), "no lock held during the call");
    let signalled = Instant::now();
    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(15));
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert!(
        took >= Duration::from_millis(2000),
        "exited {took:?} after SIGTERM: it did not wait for the 3 s call"
    );

    // The answer was written back, and the lock released (not left to expire).
    let c = fake.client_stats(&s.client_id).await;
    assert_eq!(c["refresh_ok"], json!(1), "{c}");
    assert_eq!(c["calls"], json!(1), "{c}");
    let rt = hget(&mut conn, &s.key(), "refresh_token").unwrap_or_default();
    assert_ne!(rt, s.seed_rt, "the new token was not written back");
    assert_eq!(c["live_refresh_token"], json!(rt));
    assert!(
        !exists(&mut conn, &s.lock()),
        "lock still present after a drained refresh"
    );
    assert_eq!(
        hget(&mut conn, &s.health(), "last_refresh_result").as_deref(),
        Some("success")
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("drained: every in-flight refresh finished"),
        "{logs}"
    );
    assert_no_secrets("daemon logs", &logs, &secrets_of(&mut conn, &[s]));
}

#[tokio::test]
async fn sigterm_past_the_drain_deadline_leaves_the_lock_to_expire() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(
        &mut conn,
        &fake,
        "abandon",
        "goto",
        &iso_in(0),
        json!({"delay_ms": 5000}),
    )
    .await;
    let daemon = Daemon::start(
        &redis,
        &fast_env(&[("TOKENWARDEN_SHUTDOWN_DRAIN_DEADLINE_SECS", "1")]),
    );
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_until_async(
        "the token call to be in flight",
        Duration::from_secs(5),
        || {
            let fake = &fake;
            async move { fake_in_flight(fake).await >= 1 }
        },
    )
    .await;
    let owner = get(&mut conn, &s.lock()).expect("no lock held during the call");
    let signalled = Instant::now();
    daemon.sigterm();
    let code = daemon.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert_eq!(code, Some(0), "exit code after SIGTERM");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(3500),
        "exited {took:?} after SIGTERM with a 1 s drain deadline"
    );
    // The call may still complete at the provider: the lock stays, with its expiry.
    assert_eq!(
        get(&mut conn, &s.lock()).as_deref(),
        Some(owner.as_str()),
        "the lock of an abandoned call was released or changed"
    );
    let ttl = pttl(&mut conn, &s.lock());
    assert!(ttl > 0 && ttl <= 30_000, "lock PTTL {ttl}");
    // Nothing was written back.
    assert_eq!(
        hget(&mut conn, &s.key(), "refresh_token").as_deref(),
        Some(s.seed_rt.as_str())
    );
    let logs = daemon.logs();
    assert!(logs.contains("drain deadline passed"), "{logs}");
    assert_no_secrets("daemon logs", &logs, &secrets_of(&mut conn, &[s]));
}

// -----------------------------------------------------------------------------------------
// 6. SIGKILL in the middle of a token call

#[tokio::test]
async fn sigkill_mid_refresh_leaves_the_lock_and_a_successor_respects_it() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(
        &mut conn,
        &fake,
        "crash",
        "goto",
        &iso_in(0),
        json!({"delay_ms": 1500}),
    )
    .await;
    let seeded_record = hgetall(&mut conn, &s.key());
    let env = fast_env(&[
        ("TOKENWARDEN_REFRESH_LOCK_TTL_SECS", "4"),
        ("TOKENWARDEN_REFRESH_HTTP_TIMEOUT_SECS", "2"),
        // The lock is what this test is about: with the fleet shared, the successor would
        // not even look at the dead replica's tenant until its heartbeat expired.
        ("TOKENWARDEN_REPLICA_SHARE_FLEET", "false"),
    ]);
    let first = Daemon::start(&redis, &env);
    first.wait_ready(Duration::from_secs(10)).await;
    wait_until_async(
        "the token call to be in flight",
        Duration::from_secs(5),
        || {
            let fake = &fake;
            async move { fake_in_flight(fake).await >= 1 }
        },
    )
    .await;
    first.sigkill();
    let killed = Instant::now();

    let owner = get(&mut conn, &s.lock()).expect("the lock vanished with the killed daemon");
    let ttl = pttl(&mut conn, &s.lock());
    assert!(ttl > 0 && ttl <= 4000, "lock PTTL {ttl} after SIGKILL");
    assert_eq!(
        hgetall(&mut conn, &s.key()),
        seeded_record,
        "the record changed when its refresher was killed"
    );

    // Let the abandoned call end at the fake (it may or may not complete), then make the
    // fake fast again for the successor.
    wait_until_async(
        "the abandoned call to end at the fake",
        Duration::from_secs(5),
        || {
            let fake = &fake;
            async move { fake_in_flight(fake).await == 0 }
        },
    )
    .await;
    fake.faults(json!({"client_id": s.client_id, "delay_ms": 0}))
        .await;
    let after_kill = fake.client_stats(&s.client_id).await;
    let rotated = u64_of(&after_kill, "refresh_ok") == 1;
    let calls_after_kill = u64_of(&after_kill, "calls");
    assert_eq!(calls_after_kill, 1, "{after_kill}");
    println!(
        "abandoned call {} at the fake",
        if rotated {
            "completed (token rotated)"
        } else {
            "was dropped"
        }
    );

    // A successor, started while the lock is held, must not call before it expires.
    let second = Daemon::start(&redis, &env);
    second.wait_ready(Duration::from_secs(10)).await;
    let deadline = Deadline::new("the abandoned lock to expire", Duration::from_secs(8));
    loop {
        let calls = u64_of(&fake.client_stats(&s.client_id).await, "calls");
        if get(&mut conn, &s.lock()).as_deref() != Some(owner.as_str()) {
            break;
        }
        assert_eq!(
            calls, calls_after_kill,
            "the successor called the token endpoint while the dead replica's lock was held"
        );
        deadline.tick().await;
    }
    let expired_after = killed.elapsed();
    assert!(
        metrics(&second).await.contains("result=\"locked\""),
        "the successor never met the held lock (no `locked` attempt)"
    );

    // Then it reports what is true: success if the fake never rotated the seeded token,
    // otherwise reauth_required (the rotated token died with the killed replica).
    let (state, result) = if rotated {
        ("reauth_required", "reauth_required")
    } else {
        ("healthy", "success")
    };
    // A reservation of the killed replica is honoured until its heartbeat expires (3 s);
    // an invalid_grant after a foreign reservation is re-read once after the grace.
    wait_until(
        "the successor's outcome in the health hash",
        Duration::from_secs(20),
        || hget(&mut conn, &s.health(), "last_refresh_result").as_deref() == Some(result),
    )
    .await;
    let health = hgetall(&mut conn, &s.health());
    assert_eq!(
        health.get("state").map(String::as_str),
        Some(state),
        "{health:?}"
    );
    let m = metrics(&second).await;
    assert!(
        refreshes(&m, result) >= 1.0,
        "no {result} in /metrics:\n{m}"
    );
    let reauth_gauge = metric_sum(
        &m,
        "tokenwarden_provider_reauth_required",
        &[("tenant", "crash")],
    );
    let c = fake.client_stats(&s.client_id).await;
    let rt = hget(&mut conn, &s.key(), "refresh_token").unwrap_or_default();
    if rotated {
        assert_eq!(
            health.get("reason").map(String::as_str),
            Some("invalid_grant"),
            "{health:?}"
        );
        assert_eq!(reauth_gauge, 1.0, "{m}");
        assert_eq!(rt, s.seed_rt, "the record must keep what it had");
        assert_eq!(u64_of(&c, "reuse"), 1, "{c}");
    } else {
        assert_eq!(reauth_gauge, 0.0, "{m}");
        assert_ne!(rt, s.seed_rt);
        assert_eq!(c["live_refresh_token"], json!(rt), "{c}");
        assert_eq!(u64_of(&c, "reuse"), 0, "{c}");
    }
    println!("abandoned lock gone {expired_after:?} after SIGKILL; successor: {result}");
    let secrets = secrets_of(&mut conn, &[s]);
    assert_no_secrets("first daemon logs", &first.logs(), &secrets);
    assert_no_secrets("second daemon logs", &second.logs(), &secrets);
}

// -----------------------------------------------------------------------------------------
// 7. HTTP endpoints and the exposition format

#[tokio::test]
async fn healthz_and_metrics_exposition() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(&mut conn, &fake, "expo", "goto", &iso_in(0), json!({})).await;
    let daemon = Daemon::start(&redis, &fast_env(&[]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_until_async("a first refresh", Duration::from_secs(10), || {
        let fake = &fake;
        let id = s.client_id.clone();
        async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
    })
    .await;
    wait_until(
        "the refresh to be recorded in health",
        Duration::from_secs(5),
        || hget(&mut conn, &s.health(), "last_refresh_result").as_deref() == Some("success"),
    )
    .await;

    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "/healthz: {body}");
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200, "/readyz: {body}");

    let m = metrics(&daemon).await;
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    for line in m.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            if let (Some(n), Some(t)) = (it.next(), it.next()) {
                types.insert(n.to_string(), t.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            if let Some(n) = rest.split_whitespace().next() {
                helped.insert(n.to_string());
            }
        }
    }
    let family = |series: &str| -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = series.strip_suffix(suffix) {
                if types.get(base).is_some_and(|t| t == "histogram") {
                    return base.to_string();
                }
            }
        }
        series.to_string()
    };
    let mut exposed: BTreeSet<String> = BTreeSet::new();
    for line in m
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let series = line.split(['{', ' ']).next().unwrap_or("");
        if series.starts_with("tokenwarden_") {
            exposed.insert(family(series));
        }
    }
    let missing: Vec<&String> = exposed.iter().filter(|n| !helped.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "metrics without # HELP: {missing:?}\n{m}"
    );
    let untyped: Vec<&String> = exposed.iter().filter(|n| !types.contains_key(*n)).collect();
    assert!(
        untyped.is_empty(),
        "metrics without # TYPE: {untyped:?}\n{m}"
    );

    // Histograms with explicit buckets, never summaries.
    assert!(
        !types.values().any(|t| t == "summary") && !m.contains("quantile="),
        "summaries exposed:\n{m}"
    );
    for h in [
        "tokenwarden_token_refresh_duration_seconds",
        "tokenwarden_registry_scan_duration_seconds",
    ] {
        assert_eq!(
            types.get(h).map(String::as_str),
            Some("histogram"),
            "{h}\n{m}"
        );
        let buckets = samples(&m, &format!("{h}_bucket"));
        assert!(
            buckets.len() >= 5 && buckets.iter().any(|(l, _)| l.contains("le=\"+Inf\"")),
            "{h} has no explicit buckets:\n{m}"
        );
        assert!(
            buckets.iter().all(|(l, _)| !l.contains("tenant=")),
            "{h} carries a tenant label"
        );
        assert!(
            metric_sum(&m, &format!("{h}_count"), &[]) >= 1.0,
            "{h} has no observation"
        );
    }
    assert_eq!(
        types
            .get("tokenwarden_token_refresh_total")
            .map(String::as_str),
        Some("counter")
    );

    let build = samples(&m, "tokenwarden_build_info");
    assert_eq!(build.len(), 1, "{m}");
    assert!(build[0].0.contains("version=\""), "{build:?}");
    assert_eq!(build[0].1, 1.0);
    assert_eq!(metric_sum(&m, "tokenwarden_redis_up", &[]), 1.0);
    assert_eq!(
        metric_sum(
            &m,
            "tokenwarden_registry_providers",
            &[("state", "healthy")]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(refreshes(&m, "success"), 1.0, "{m}");
    let expiry = metric_sum(
        &m,
        "tokenwarden_token_expiry_timestamp_seconds",
        &[("tenant", "expo"), ("provider", "goto")],
    );
    let now = Utc::now().timestamp() as f64;
    assert!(
        (expiry - (now + 3600.0)).abs() < 60.0,
        "token expiry gauge {expiry}, now {now}"
    );
    assert_no_secrets(
        "/metrics",
        &m,
        &secrets_of(&mut conn, std::slice::from_ref(&s)),
    );
    assert_no_secrets("daemon logs", &daemon.logs(), &secrets_of(&mut conn, &[s]));
}

// -----------------------------------------------------------------------------------------
// 8. The one-shot commands

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn check_config_exit_codes() {
    let ok = Daemon::cli(&["check-config"], &[]);
    assert_eq!(code(&ok), 0, "{}", text(&ok));
    assert!(
        String::from_utf8_lossy(&ok.stdout).starts_with("ok:"),
        "{}",
        text(&ok)
    );

    let bad = Daemon::cli(
        &["check-config"],
        &[("TOKENWARDEN_REFRESH_LOCK_TTL_SECS", "1")],
    );
    assert_eq!(code(&bad), 2, "{}", text(&bad));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("refresh.lock_ttl_secs"),
        "the error does not name the setting: {}",
        text(&bad)
    );

    let not_a_number = Daemon::cli(
        &["check-config"],
        &[("TOKENWARDEN_REFRESH_MAX_CONCURRENT", "many")],
    );
    assert_eq!(code(&not_a_number), 2, "{}", text(&not_a_number));
    assert!(
        text(&not_a_number).contains("TOKENWARDEN_REFRESH_MAX_CONCURRENT"),
        "{}",
        text(&not_a_number)
    );

    let missing = "/nonexistent/tokenwarden-test.toml";
    let no_file = Daemon::cli(&["check-config", "--config", missing], &[]);
    assert_eq!(code(&no_file), 2, "{}", text(&no_file));
    assert!(text(&no_file).contains(missing), "{}", text(&no_file));

    let unknown = Daemon::cli(&["frobnicate"], &[]);
    assert_eq!(code(&unknown), 2, "{}", text(&unknown));
    let incomplete = Daemon::cli(&["refresh", "--tenant", "t"], &[]);
    assert_eq!(code(&incomplete), 2, "{}", text(&incomplete));
}

#[tokio::test]
async fn status_and_refresh_commands() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let acme = seed_oauth(&mut conn, &fake, "acme", "goto", &iso_in(0), json!({})).await;
    let globex = seed_oauth(
        &mut conn,
        &fake,
        "globex",
        "teams",
        &iso_in(0),
        json!({"revoked": true}),
    )
    .await;
    let url = redis.url();
    // No daemon runs: `refresh --local` refreshes in this process, journaling in its own
    // state directory.
    let state = support::process::TempDir::new("tw-cli-state");
    let state_dir = state.path().display().to_string();
    let env = [
        ("TOKENWARDEN_REDIS_URL", url.as_str()),
        ("TOKENWARDEN_STATE_DIR", state_dir.as_str()),
    ];
    let mut outputs = String::new();

    // Without --local, nothing runs to take the request: exit 6, naming --local.
    let out = Daemon::cli(&["refresh", "--tenant", "acme", "--provider", "goto"], &env);
    assert_eq!(code(&out), 6, "{}", text(&out));
    assert!(text(&out).contains("--local"), "{}", text(&out));

    // A refresh through the lock: exit 0, the record rotated, the lock released.
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--local",
        ],
        &env,
    );
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("success"),
        "{}",
        text(&out)
    );
    let rt = hget(&mut conn, &acme.key(), "refresh_token").unwrap_or_default();
    assert_ne!(rt, acme.seed_rt);
    let c = fake.client_stats(&acme.client_id).await;
    assert_eq!(c["live_refresh_token"], json!(rt), "{c}");
    assert_eq!(c["calls"], json!(1), "{c}");
    assert!(!exists(&mut conn, &acme.lock()));

    // A revoked grant: exit 5, reauth_required recorded.
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            "globex",
            "--provider",
            "teams",
            "--local",
        ],
        &env,
    );
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 5, "{}", text(&out));
    assert!(text(&out).contains("reauth_required"), "{}", text(&out));

    // status --json: every provider, with its state.
    let out = Daemon::cli(&["status", "--json"], &env);
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 0, "{}", text(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let rows = rows.as_array().expect("status --json is an array");
    let state_of = |rows: &[Value], t: &str, p: &str| -> Option<String> {
        rows.iter()
            .find(|r| r["tenant"] == json!(t) && r["provider"] == json!(p))
            .map(|r| r["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        state_of(rows, "acme", "goto").as_deref(),
        Some("healthy"),
        "{rows:?}"
    );
    assert_eq!(
        state_of(rows, "globex", "teams").as_deref(),
        Some("reauth_required"),
        "{rows:?}"
    );
    let globex_row = rows
        .iter()
        .find(|r| r["tenant"] == json!("globex"))
        .expect("globex row");
    assert_eq!(globex_row["reason"], json!("invalid_grant"), "{globex_row}");
    assert_eq!(globex_row["status"], json!("active"), "{globex_row}");

    // status --tenant filters.
    let out = Daemon::cli(&["status", "--tenant", "acme", "--json"], &env);
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 0, "{}", text(&out));
    let rows: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let rows = rows.as_array().expect("an array");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["tenant"], json!("acme"));
    assert_eq!(rows[0]["last_refresh_result"], json!("success"));
    // The table form names both, too.
    let out = Daemon::cli(&["status"], &env);
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 0, "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("acme") && table.contains("globex"),
        "{table}"
    );

    // The lock held by someone else: no call, exit 3, the lock untouched.
    redis::cmd("SET")
        .arg(acme.lock())
        .arg("another-replica:0001")
        .arg("PX")
        .arg(30_000)
        .query::<()>(&mut conn)
        .expect("SET lock");
    let calls_before = u64_of(&fake.client_stats(&acme.client_id).await, "calls");
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            "acme",
            "--provider",
            "goto",
            "--local",
        ],
        &env,
    );
    outputs.push_str(&text(&out));
    assert_eq!(code(&out), 3, "{}", text(&out));
    assert!(text(&out).contains("locked"), "{}", text(&out));
    assert_eq!(
        u64_of(&fake.client_stats(&acme.client_id).await, "calls"),
        calls_before,
        "the provider was called although the lock was held"
    );
    assert_eq!(
        hget(&mut conn, &acme.key(), "refresh_token").as_deref(),
        Some(rt.as_str())
    );
    assert_eq!(
        get(&mut conn, &acme.lock()).as_deref(),
        Some("another-replica:0001")
    );

    assert_no_secrets(
        "command output",
        &outputs,
        &secrets_of(&mut conn, &[acme, globex]),
    );
}

// -----------------------------------------------------------------------------------------
// 9. SIGHUP reload

/// `tokenwarden run --config FILE` with no environment but the Redis URL, so that every other
/// setting, `http.listen` and `log.level` included, comes from the file (the harness's
/// [`Daemon`] pins both by environment, which would hide a change in the file).
struct FileDaemon {
    child: Child,
    logs: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    listen: String,
    http: reqwest::Client,
}

impl FileDaemon {
    fn start(redis: &RedisServer, config: &Path, listen: &str) -> FileDaemon {
        let bin = env!("CARGO_BIN_EXE_tokenwarden");
        let mut cmd = Command::new(bin);
        cmd.arg("run").arg("--config").arg(config);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOKENWARDEN_") {
                cmd.env_remove(key);
            }
        }
        let mut child = cmd
            .env("TOKENWARDEN_REDIS_URL", redis.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let logs = Arc::new(Mutex::new(String::new()));
        let pid = child.id();
        let streams: Vec<Box<dyn Read + Send>> = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut readers = Vec::new();
        for stream in streams {
            let logs = Arc::clone(&logs);
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[tokenwarden {pid}] {line}");
                    let mut l = logs.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            }));
        }
        FileDaemon {
            child,
            logs,
            readers,
            listen: listen.to_string(),
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
        }
    }

    fn logs(&self) -> String {
        self.logs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{name} failed");
    }

    async fn status_of(&self, listen: &str, path: &str) -> u16 {
        match self.http.get(format!("http://{listen}{path}")).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    async fn get(&self, path: &str) -> u16 {
        self.status_of(&self.listen, path).await
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if let Ok(Some(status)) = self.child.try_wait() {
                for reader in self.readers.drain(..) {
                    let _ = reader.join();
                }
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for FileDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

#[tokio::test]
async fn sighup_reloads_the_config_file_and_refuses_a_broken_one() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(
        &mut conn,
        &fake,
        "reload",
        "goto",
        &iso_in(3_600_000),
        json!({}),
    )
    .await;
    let dir = std::env::temp_dir().join(unique("tokenwarden-test-reload"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("tokenwarden.toml");
    let listen = format!("127.0.0.1:{}", free_port());
    let other_listen = format!("127.0.0.1:{}", free_port());
    let config = |listen: &str, level: &str, scan: u32| {
        format!(
            "[http]\nlisten = \"{listen}\"\n\n[log]\nlevel = \"{level}\"\n\n\
             [registry]\nchange_scan_interval_secs = {scan}\n\n\
             [refresh]\nretry_base_ms = 200\nretry_max_secs = 2\n"
        )
    };
    write_config(&path, &config(&listen, "info", 1));
    let mut daemon = FileDaemon::start(&redis, &path, &listen);
    let ready = Deadline::new("the daemon to be ready", Duration::from_secs(10));
    while daemon.get("/readyz").await != 200 {
        assert!(daemon.running(), "daemon exited:\n{}", daemon.logs());
        ready.tick().await;
    }
    assert!(
        !daemon.logs().contains("DEBUG"),
        "debug lines at log.level = \"info\""
    );

    // A valid new file: a [reload] setting, the log level, and a [restart] one.
    write_config(&path, &config(&other_listen, "debug", 2));
    daemon.signal("HUP");
    let logs = Deadline::new("\"configuration reloaded\"", Duration::from_secs(5));
    while !daemon.logs().contains("configuration reloaded") {
        logs.tick().await;
    }
    let warning = daemon
        .logs()
        .lines()
        .find(|l| l.contains("take effect only after a restart"))
        .map(str::to_string)
        .unwrap_or_default();
    assert!(
        warning.contains("http.listen"),
        "no warning naming http.listen as needing a restart; logs:\n{}",
        daemon.logs()
    );
    assert!(
        !warning.contains("change_scan_interval"),
        "change_scan_interval_secs is a [reload] setting: {warning}"
    );
    // The listener stays where it was until a restart.
    assert_eq!(daemon.get("/healthz").await, 200);
    assert_eq!(daemon.status_of(&other_listen, "/healthz").await, 0);
    // The new log level applies: a refresh now logs its debug lines.
    redis::cmd("HSET")
        .arg(s.key())
        .arg("token_expiry")
        .arg(iso_in(0))
        .query::<()>(&mut conn)
        .expect("HSET token_expiry");
    let debug = Deadline::new("debug lines after the reload", Duration::from_secs(10));
    while !daemon.logs().contains("DEBUG") {
        debug.tick().await;
    }
    wait_until_async(
        "the refresh after the reload",
        Duration::from_secs(10),
        || {
            let fake = &fake;
            let id = s.client_id.clone();
            async move { fake.client_stats(&id).await["refresh_ok"] == json!(1) }
        },
    )
    .await;

    // A file with a syntax error: refused, the daemon keeps running.
    write_config(&path, "[http\nlisten = \n");
    daemon.signal("HUP");
    let refused = Deadline::new("\"reload refused\"", Duration::from_secs(5));
    while !daemon.logs().contains("reload refused") {
        refused.tick().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(daemon.running(), "the daemon exited after a broken reload");
    assert_eq!(daemon.get("/healthz").await, 200);
    assert_eq!(daemon.get("/readyz").await, 200);

    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)), Some(0));
    let logs = daemon.logs();
    assert_no_secrets("daemon logs", &logs, &secrets_of(&mut conn, &[s]));
    let _ = std::fs::remove_dir_all(&dir);
}

// -----------------------------------------------------------------------------------------
// 10. JSON logs

#[tokio::test]
async fn json_logs_carry_the_refresh_span_and_no_secret() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let s = seed_oauth(&mut conn, &fake, "jsonlogs", "goto", &iso_in(0), json!({})).await;
    let daemon = Daemon::start(&redis, &fast_env(&[("TOKENWARDEN_LOG_FORMAT", "json")]));
    daemon.wait_ready(Duration::from_secs(10)).await;
    wait_for_log(&daemon, "token refreshed", Duration::from_secs(10)).await;
    let logs = daemon.logs();
    let mut refreshed = None;
    for line in logs.lines().filter(|l| l.contains('{')) {
        // The harness prefixes each captured line; the JSON object starts at the first '{'.
        let json_part = &line[line.find('{').unwrap_or(0)..];
        let v: Value = serde_json::from_str(json_part)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        if v["fields"]["message"] == json!("token refreshed") {
            refreshed = Some(v);
        }
    }
    let v = refreshed.expect("a JSON line for the refresh");
    assert_eq!(v["span"]["name"], json!("refresh"), "{v}");
    assert_eq!(v["span"]["tenant"], json!("jsonlogs"), "{v}");
    assert_eq!(v["span"]["provider"], json!("goto"), "{v}");
    assert_eq!(v["level"], json!("INFO"), "{v}");
    let secrets = secrets_of(&mut conn, &[s]);
    assert_no_secrets("daemon logs", &logs, &secrets);
}
