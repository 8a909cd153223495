//! Refresh behaviour of the real daemon, end to end: a `redis-server` and a fake OAuth provider
//! of each test's own, and the `tokenwarden` binary between them.
//!
//! Tokens live a few seconds, the change scan runs every second, jitter is off and retries
//! start at 200 ms, so every behaviour shows within seconds. Waits are bounded by deadlines;
//! where a test must show that something does *not* happen, it watches for a window of
//! several scan intervals and checks the invariant at every step. Every test ends by checking
//! that no secret it seeded, or that the fake issued, appears in the daemon's output.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, FixedOffset, NaiveDateTime, TimeDelta, Utc};
use serde_json::{json, Value};
use support::metrics::{metric, parse_labels};
use support::{
    health_key, hget, hgetall, oauth_record, provider_key, seed_provider, seed_tenant_config,
    wait_until, wait_until_async, Daemon, FakeProvider, RedisServer, Secrets,
};

const TENANT: &str = "cloudwarriors";
const READY: Duration = Duration::from_secs(10);

// -----------------------------------------------------------------------------------------
// Setup helpers

/// Settings that make the daemon quick enough for tests.
/// Health probes are off: their own tests are in tests/health.rs, and the state asserted
/// here is the one refreshes give.
const FAST_ENV: [(&str, &str); 5] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
    // Debug output of our own crate: more chances for a secret to leak, so a stronger check.
    ("TOKENWARDEN_LOG", "tokenwarden=debug,info"),
];

async fn start_daemon(redis: &RedisServer) -> Daemon {
    let daemon = Daemon::start(redis, &FAST_ENV);
    daemon.wait_ready(READY).await;
    daemon
}

/// A value unique to this run, recognisable in a failure message by its prefix.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}

async fn seed_client(fake: &FakeProvider, id: &str, secret: &str, rt: &str, extra: Value) {
    let mut client = json!({"client_id": id, "client_secret": secret, "refresh_token": rt});
    if let (Some(client), Some(extra)) = (client.as_object_mut(), extra.as_object()) {
        client.extend(extra.clone());
    }
    fake.seed(client).await;
}

/// A GoTo-shaped record against `fake`, with a unique access token and `changes` applied
/// (set as given, empty values included).
fn record(
    fake: &FakeProvider,
    creds: &(String, String, String),
    token_expiry: &str,
    changes: &[(&str, &str)],
    secrets: &mut Secrets,
) -> Vec<(String, String)> {
    let (id, secret, rt) = creds;
    let mut fields = oauth_record(fake, id, secret, rt, token_expiry);
    let at = unique("at-seed");
    secrets.add(&at);
    set_field(&mut fields, "access_token", &at);
    for (k, v) in changes {
        set_field(&mut fields, k, v);
    }
    fields
}

fn set_field(fields: &mut Vec<(String, String)>, name: &str, value: &str) {
    match fields.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value.to_string(),
        None => fields.push((name.to_string(), value.to_string())),
    }
}

fn remove_field(fields: &mut Vec<(String, String)>, name: &str) {
    fields.retain(|(k, _)| k != name);
}

fn hset(conn: &mut redis::Connection, key: &str, fields: &[(&str, &str)]) {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key);
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query::<()>(conn)
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
}

fn key_type(conn: &mut redis::Connection, key: &str) -> String {
    redis::cmd("TYPE")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("TYPE {key}: {e}"))
}

/// The serialized bytes of a key (`DUMP`), `None` if it does not exist.
fn dump(conn: &mut redis::Connection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("DUMP")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("DUMP {key}: {e}"))
}

fn field<'a>(map: &'a HashMap<String, String>, name: &str) -> &'a str {
    map.get(name).map(String::as_str).unwrap_or("")
}

/// Polls the record at `key` until `cond` holds; returns it.
async fn wait_record(
    conn: &mut redis::Connection,
    key: &str,
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let rec = hgetall(conn, key);
        if cond(&rec) {
            return rec;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; {key} is now {rec:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One client's counter at the fake (0 when absent).
fn count(client: &Value, name: &str) -> u64 {
    client[name].as_u64().unwrap_or(0)
}

/// Watches for `window`: `check` must hold at every look (a few per scan interval).
async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let end = Instant::now() + window;
    loop {
        if let Err(e) = check().await {
            panic!("{what} stopped holding: {e}");
        }
        if Instant::now() >= end {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// -----------------------------------------------------------------------------------------
// Metrics

async fn scrape(daemon: &Daemon) -> String {
    let (status, body) = daemon.get("/metrics").await;
    assert_eq!(status, 200, "/metrics answered {status}: {body}");
    body
}

/// Scrapes until the series of `name` with `labels` sums to `want` (counters are counted a
/// moment after the Redis writes a test watches); returns that scrape.
async fn wait_metric(daemon: &Daemon, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let body = scrape(daemon).await;
        if metric(&body, name, labels) == Some(want) {
            return body;
        }
        if Instant::now() >= deadline {
            panic!(
                "{name}{labels:?} is {:?}, expected {want}:\n{body}",
                metric(&body, name, labels)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// -----------------------------------------------------------------------------------------
// Timestamps, classified independently of the daemon's own parser

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    IsoNaive { sep: char },
    IsoOffset { sep: char, offset: String },
    IsoZulu { sep: char },
    EpochSeconds,
    EpochFloat,
    EpochMillis,
}

/// What kind of timestamp `value` is, and its instant. Panics on anything unreadable,
/// and on ISO text that Python's `datetime.isoformat()` would not write (a fraction of other
/// than six digits).
fn classify(value: &str) -> (Kind, DateTime<Utc>) {
    let v = value.trim();
    assert!(!v.is_empty(), "empty timestamp");
    if v.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        if v.contains('.') {
            let f: f64 = v.parse().unwrap_or_else(|e| panic!("bad epoch {v:?}: {e}"));
            if f > 1e11 {
                let at = DateTime::from_timestamp_millis(f as i64)
                    .unwrap_or_else(|| panic!("epoch ms out of range: {v:?}"));
                return (Kind::EpochMillis, at);
            }
            let at = DateTime::from_timestamp_micros((f * 1e6).round() as i64)
                .unwrap_or_else(|| panic!("epoch out of range: {v:?}"));
            return (Kind::EpochFloat, at);
        }
        let n: i64 = v.parse().unwrap_or_else(|e| panic!("bad epoch {v:?}: {e}"));
        if n > 100_000_000_000 {
            let at = DateTime::from_timestamp_millis(n)
                .unwrap_or_else(|| panic!("epoch ms out of range: {v:?}"));
            return (Kind::EpochMillis, at);
        }
        let at =
            DateTime::from_timestamp(n, 0).unwrap_or_else(|| panic!("epoch out of range: {v:?}"));
        return (Kind::EpochSeconds, at);
    }
    assert!(
        v.is_ascii() && v.len() >= 19,
        "not an ISO 8601 timestamp: {v:?}"
    );
    let sep = v.as_bytes()[10] as char;
    assert!(sep == 'T' || sep == ' ', "bad date/time separator in {v:?}");
    let normalized = format!("{}T{}", &v[..10], &v[11..]);
    let tail = &normalized[19..];
    if let Some(frac) = tail.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        assert_eq!(
            digits, 6,
            "{v:?}: Python's isoformat() writes a fraction of exactly six digits"
        );
    }
    if let Some(naive) = normalized.strip_suffix('Z') {
        let at = NaiveDateTime::parse_from_str(naive, "%Y-%m-%dT%H:%M:%S%.f")
            .unwrap_or_else(|e| panic!("bad ISO timestamp {v:?}: {e}"))
            .and_utc();
        return (Kind::IsoZulu { sep }, at);
    }
    if let Some(pos) = tail.find(['+', '-']) {
        let offset = tail[pos..].to_string();
        let at = DateTime::parse_from_str(&normalized, "%Y-%m-%dT%H:%M:%S%.f%:z")
            .unwrap_or_else(|e| panic!("bad ISO timestamp {v:?}: {e}"))
            .with_timezone(&Utc);
        return (Kind::IsoOffset { sep, offset }, at);
    }
    let at = NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%dT%H:%M:%S%.f")
        .unwrap_or_else(|e| panic!("bad ISO timestamp {v:?}: {e}"))
        .and_utc();
    (Kind::IsoNaive { sep }, at)
}

fn instant(value: &str) -> DateTime<Utc> {
    classify(value).1
}

/// `2026-11-28T03:20:00.123456`, as Python's `datetime.utcnow().isoformat()` writes it.
fn iso_naive_micros(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

fn iso_utc(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

fn millis(n: i64) -> TimeDelta {
    TimeDelta::milliseconds(n)
}

fn assert_close(what: &str, got: DateTime<Utc>, want: DateTime<Utc>, tolerance: TimeDelta) {
    let diff = (got - want).abs();
    assert!(
        diff <= tolerance,
        "{what}: got {got}, expected {want} (within {tolerance}), off by {diff}"
    );
}

// -----------------------------------------------------------------------------------------
// Events

/// This provider's entries of `tokenwarden:events`: (server time in ms, fields).
fn events(
    conn: &mut redis::Connection,
    tenant: &str,
    provider: &str,
) -> Vec<(u64, HashMap<String, String>)> {
    let raw: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:events")
        .arg("-")
        .arg("+")
        .query(conn)
        .unwrap_or_else(|e| panic!("XRANGE tokenwarden:events: {e}"));
    raw.into_iter()
        .filter(|(_, f)| field(f, "tenant") == tenant && field(f, "provider") == provider)
        .map(|(id, f)| {
            let ms = id
                .split('-')
                .next()
                .and_then(|ms| ms.parse().ok())
                .unwrap_or_else(|| panic!("bad stream id {id}"));
            (ms, f)
        })
        .collect()
}

// -----------------------------------------------------------------------------------------
// 1. Refresh ahead of expiry

#[tokio::test]
async fn refreshes_ahead_of_expiry_and_reports_it() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("ahead");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"expires_in": 3600}),
    )
    .await;

    let seeded_at = Utc::now();
    let old_expiry = seeded_at + secs(4);
    seed_tenant_config(&mut conn, TENANT);
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(old_expiry),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    let after = wait_record(
        &mut conn,
        &key,
        "the token to be refreshed",
        Duration::from_secs(8),
        |r| field(r, "refresh_token") != creds.2,
    )
    .await;
    let seen_at = Utc::now();
    secrets.add_record(&after);

    // Replaced before the old token expired, and not at once either: at about half of the
    // remaining life (jitter is off), so no earlier than ~2 s after seeding.
    assert!(
        seen_at < old_expiry,
        "the record changed at {seen_at}, after the old token expired at {old_expiry}"
    );
    let written_at = instant(field(&after, "updated_at"));
    assert!(
        written_at < old_expiry,
        "updated_at {written_at} is not before the old expiry {old_expiry}"
    );
    assert!(
        written_at >= seeded_at + millis(1500),
        "refreshed at {written_at}, too early for a token seeded at {seeded_at} expiring at {old_expiry}"
    );
    assert_ne!(
        field(&after, "access_token"),
        field_of(&fields, "access_token")
    );
    let new_expiry = instant(field(&after, "token_expiry"));
    assert_close("new expiry", new_expiry, written_at + secs(3600), secs(2));
    assert_eq!(
        field(&after, "client_secret"),
        creds.1,
        "a gateway field changed"
    );

    // The health hash follows the record write in the next round trip.
    let health_key = health_key(TENANT, "goto");
    wait_until(
        "last_refresh_result success",
        Duration::from_secs(2),
        || hget(&mut conn, &health_key, "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let health = hgetall(&mut conn, &health_key);
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    assert_eq!(field(&health, "consecutive_failures"), "0", "{health:?}");
    assert_eq!(field(&health, "last_error"), "", "{health:?}");
    assert_close(
        "health token_expiry",
        instant(field(&health, "token_expiry")),
        new_expiry,
        millis(1),
    );
    // Two thirds of the 3600 s lifetime (lead 300 s is later), jitter off.
    let next = instant(field(&health, "next_refresh_at"));
    assert_close("next_refresh_at", next, written_at + secs(2400), secs(2));
    assert_close(
        "last_refresh_at",
        instant(field(&health, "last_refresh_at")),
        written_at,
        secs(1),
    );

    let body = wait_metric(
        &daemon,
        "tokenwarden_token_refresh_total",
        &[("provider", "goto"), ("result", "success")],
        1.0,
    )
    .await;
    let labels = [("tenant", TENANT), ("provider", "goto")];
    assert_eq!(
        metric(&body, "tokenwarden_token_expiry_timestamp_seconds", &labels),
        Some(new_expiry.timestamp() as f64),
        "expiry gauge in:\n{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_next_refresh_timestamp_seconds",
            &labels
        ),
        Some(next.timestamp() as f64),
        "next refresh gauge in:\n{body}"
    );
    assert_eq!(
        metric(&body, "tokenwarden_provider_reauth_required", &labels),
        Some(0.0)
    );

    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "calls"), 1, "{client}");
    assert_eq!(
        client["live_refresh_token"],
        json!(field(&after, "refresh_token"))
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

fn field_of<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

// -----------------------------------------------------------------------------------------
// 2. Rotation

#[tokio::test]
async fn rotating_refresh_tokens_are_used_once_each() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("rotate");
    // Each token lives 2 s: refreshed every second.
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"expires_in": 2}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_utc(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    // Watch the record through several rotations, remembering every refresh token seen.
    let mut seen: Vec<String> = vec![creds.2.clone()];
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let rec = hgetall(&mut conn, &key);
        secrets.add_record(&rec);
        let rt = field(&rec, "refresh_token").to_string();
        if seen.last() != Some(&rt) {
            assert!(
                !seen.contains(&rt),
                "a refresh token came back into the record: {seen:?} then {rt}"
            );
            seen.push(rt);
        }
        let client = fake.client_stats(&creds.0).await;
        if count(&client, "refresh_ok") >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 4 refreshes within 12 s: {client}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.len() >= 3,
        "expected to watch at least two rotations, saw {seen:?}"
    );

    // The record ends with the fake's one live token, once the last write-back is in.
    wait_until_async(
        "the record to hold the fake's live refresh token",
        Duration::from_secs(3),
        || {
            let key = key.clone();
            let fake = &fake;
            let id = creds.0.clone();
            let rec = hgetall(&mut redis.conn(), &key);
            async move {
                let live = fake.client_stats(&id).await["live_refresh_token"].clone();
                live.as_str() == Some(field(&rec, "refresh_token"))
            }
        },
    )
    .await;

    let stats = fake.stats().await;
    let client = &stats["clients"][creds.0.as_str()];
    assert_eq!(
        count(client, "reuse"),
        0,
        "a refresh token was used twice: {stats}"
    );
    assert_eq!(count(client, "invalid_grant"), 0, "{stats}");
    assert_eq!(count(&stats, "concurrent_same_rt"), 0, "{stats}");
    assert_eq!(count(client, "bad_client"), 0, "{stats}");
    assert_eq!(count(&stats, "invalid_request"), 0, "{stats}");
    // Every call was a successful refresh (but the next one may be in flight now).
    assert!(
        count(client, "calls") <= count(client, "refresh_ok") + 1,
        "{stats}"
    );
    // Every refresh token the record held before the current one is dead at the provider.
    let old: Vec<Value> = seen[..seen.len() - 1]
        .iter()
        .map(|rt| json!([rt, ""]))
        .collect();
    let verdict = fake.post("/verify", json!({ "pairs": old })).await;
    assert_eq!(verdict["refresh_alive"], 0, "{verdict}");

    let health = hgetall(&mut conn, &health_key(TENANT, "goto"));
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    wait_until_async(
        "token_refresh_total{result=success} >= 4",
        Duration::from_secs(3),
        || async {
            let body = scrape(&daemon).await;
            metric(
                &body,
                "tokenwarden_token_refresh_total",
                &[("provider", "goto"), ("result", "success")],
            )
            .is_some_and(|n| n >= 4.0)
        },
    )
    .await;

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

#[tokio::test]
async fn a_refresh_token_that_is_not_rotated_is_kept() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("goto-style");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"expires_in": 2, "omit_refresh_token": true}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_utc(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    let mut access_tokens = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rec = hgetall(&mut conn, &key);
        secrets.add_record(&rec);
        assert_eq!(
            field(&rec, "refresh_token"),
            creds.2,
            "the refresh token changed although the provider returned none"
        );
        access_tokens.insert(field(&rec, "access_token").to_string());
        let client = fake.client_stats(&creds.0).await;
        if count(&client, "refresh_ok") >= 3 && access_tokens.len() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than 3 refreshes within 10 s: {client}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "invalid_grant"), 0, "{client}");
    assert_eq!(count(&client, "reuse"), 0, "{client}");
    // Still the live one at the provider.
    assert_eq!(client["live_refresh_token"], json!(creds.2), "{client}");
    let health = hgetall(&mut conn, &health_key(TENANT, "goto"));
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    assert_eq!(field(&health, "last_refresh_result"), "success");

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 3. Timestamp formats kept

struct FormatCase {
    provider: &'static str,
    expiry: String,
    updated_at: String,
    expiry_after: Kind,
    updated_after: Kind,
}

#[tokio::test]
async fn timestamp_formats_are_written_back_as_found() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let now = Utc::now();
    let exp = now + secs(3);
    let upd = now - secs(86_400) + millis(123);
    let eastern = FixedOffset::west_opt(5 * 3600).unwrap_or_else(|| unreachable!());
    let naive_t = Kind::IsoNaive { sep: 'T' };
    let utc_t = Kind::IsoOffset {
        sep: 'T',
        offset: "+00:00".into(),
    };
    let minus5 = Kind::IsoOffset {
        sep: 'T',
        offset: "-05:00".into(),
    };
    // Each token_expiry kind, with updated_at of another kind, so each field is seen to keep
    // its own.
    let cases = vec![
        FormatCase {
            provider: "naive",
            expiry: exp.format("%Y-%m-%dT%H:%M:%S").to_string(),
            updated_at: upd.timestamp().to_string(),
            expiry_after: naive_t.clone(),
            updated_after: Kind::EpochSeconds,
        },
        FormatCase {
            provider: "naivemicros",
            expiry: iso_naive_micros(exp),
            updated_at: format!("{:.6}", upd.timestamp_micros() as f64 / 1e6),
            expiry_after: naive_t.clone(),
            updated_after: Kind::EpochFloat,
        },
        FormatCase {
            provider: "naivespace",
            expiry: exp.format("%Y-%m-%d %H:%M:%S%.6f").to_string(),
            updated_at: upd.timestamp_millis().to_string(),
            expiry_after: Kind::IsoNaive { sep: ' ' },
            updated_after: Kind::EpochMillis,
        },
        FormatCase {
            provider: "utcoffset",
            expiry: iso_utc(exp),
            updated_at: upd.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            expiry_after: utc_t.clone(),
            updated_after: utc_t.clone(),
        },
        FormatCase {
            provider: "eastern",
            expiry: exp
                .with_timezone(&eastern)
                .format("%Y-%m-%dT%H:%M:%S%.6f%:z")
                .to_string(),
            updated_at: iso_naive_micros(upd),
            expiry_after: minus5.clone(),
            updated_after: naive_t.clone(),
        },
        FormatCase {
            provider: "zulu",
            expiry: exp.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            updated_at: upd
                .with_timezone(&eastern)
                .format("%Y-%m-%dT%H:%M:%S%:z")
                .to_string(),
            expiry_after: utc_t.clone(),
            updated_after: minus5.clone(),
        },
        FormatCase {
            provider: "epochint",
            expiry: exp.timestamp().to_string(),
            updated_at: iso_utc(upd),
            expiry_after: Kind::EpochSeconds,
            updated_after: utc_t.clone(),
        },
        FormatCase {
            provider: "epochfloat",
            expiry: format!("{:.6}", exp.timestamp_micros() as f64 / 1e6),
            updated_at: upd.timestamp().to_string(),
            expiry_after: Kind::EpochFloat,
            updated_after: Kind::EpochSeconds,
        },
        FormatCase {
            provider: "epochms",
            expiry: exp.timestamp_millis().to_string(),
            updated_at: upd.format("%Y-%m-%dT%H:%M:%S").to_string(),
            expiry_after: Kind::EpochMillis,
            updated_after: naive_t.clone(),
        },
        FormatCase {
            provider: "empty",
            expiry: String::new(),
            updated_at: String::new(),
            expiry_after: utc_t.clone(),
            updated_after: utc_t.clone(),
        },
    ];
    // The seeded values are of the kinds the test says they are.
    for c in &cases {
        if !c.expiry.is_empty() {
            let (kind, at) = classify(&c.expiry);
            let expected_seed = match &c.expiry_after {
                Kind::IsoOffset { offset, .. } if c.expiry.ends_with('Z') => {
                    assert_eq!(offset, "+00:00");
                    Kind::IsoZulu { sep: 'T' }
                }
                k => k.clone(),
            };
            assert_eq!(kind, expected_seed, "seed of {}", c.provider);
            assert_close("seeded expiry", at, exp, secs(1));
        }
    }

    let mut creds_of = HashMap::new();
    for c in &cases {
        let creds = secrets.creds(c.provider);
        seed_client(
            &fake,
            &creds.0,
            &creds.1,
            &creds.2,
            json!({"expires_in": 3600}),
        )
        .await;
        let fields = record(
            &fake,
            &creds,
            &c.expiry,
            &[("updated_at", &c.updated_at)],
            &mut secrets,
        );
        seed_provider(&mut conn, TENANT, c.provider, &fields);
        creds_of.insert(c.provider, creds);
    }
    let daemon = start_daemon(&redis).await;
    let ready_at = Utc::now();

    let mut after = HashMap::new();
    for c in &cases {
        let key = provider_key(TENANT, c.provider);
        let rt0 = creds_of[c.provider].2.clone();
        let rec = wait_record(
            &mut conn,
            &key,
            &format!("{} to be refreshed", c.provider),
            Duration::from_secs(10),
            |r| field(r, "refresh_token") != rt0,
        )
        .await;
        secrets.add_record(&rec);
        after.insert(c.provider, rec);
    }

    for c in &cases {
        let rec = &after[c.provider];
        let (expiry_kind, expiry) = classify(field(rec, "token_expiry"));
        let (updated_kind, updated) = classify(field(rec, "updated_at"));
        assert_eq!(
            expiry_kind,
            c.expiry_after,
            "{}: token_expiry {:?} written back as {:?}",
            c.provider,
            c.expiry,
            field(rec, "token_expiry")
        );
        assert_eq!(
            updated_kind,
            c.updated_after,
            "{}: updated_at {:?} written back as {:?}",
            c.provider,
            c.updated_at,
            field(rec, "updated_at")
        );
        // The values mean the right instants: updated just now, expiring in an hour (to
        // within the whole seconds of the epoch-seconds and second-only forms).
        let resolution = secs(2);
        assert_close(
            &format!("{} updated_at", c.provider),
            updated,
            Utc::now(),
            secs(12),
        );
        assert!(
            updated > now - secs(1),
            "{}: updated_at {updated} is not from this refresh",
            c.provider
        );
        assert_close(
            &format!("{} token_expiry", c.provider),
            expiry,
            updated + secs(3600),
            resolution,
        );
        let hk = health_key(TENANT, c.provider);
        wait_until(
            &format!("{} last_refresh_result success", c.provider),
            Duration::from_secs(2),
            || hget(&mut conn, &hk, "last_refresh_result").as_deref() == Some("success"),
        )
        .await;
        let health = hgetall(&mut conn, &hk);
        assert_eq!(
            field(&health, "state"),
            "healthy",
            "{}: {health:?}",
            c.provider
        );
        assert_close(
            &format!("{} health token_expiry", c.provider),
            instant(field(&health, "token_expiry")),
            expiry,
            resolution,
        );
    }

    // An empty token_expiry is refreshed at once, before the ones expiring in 3 s are due.
    let empty_at = instant(field(&after["empty"], "updated_at"));
    assert!(
        empty_at <= ready_at + secs(1),
        "the record with an empty token_expiry was refreshed at {empty_at}, not at once (ready at {ready_at})"
    );
    for c in cases.iter().filter(|c| c.provider != "empty") {
        let at = instant(field(&after[c.provider], "updated_at"));
        assert!(
            empty_at < at,
            "empty expiry refreshed at {empty_at}, after {} at {at}",
            c.provider
        );
    }

    let keys: Vec<String> = cases
        .iter()
        .map(|c| provider_key(TENANT, c.provider))
        .collect();
    secrets.collect(&mut conn, &keys, &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 4. Inactive records

#[tokio::test]
async fn inactive_records_are_left_alone() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let idle = secrets.creds("inactive");
    let busy = secrets.creds("active");
    seed_client(&fake, &idle.0, &idle.1, &idle.2, json!({})).await;
    seed_client(&fake, &busy.0, &busy.1, &busy.2, json!({"expires_in": 2})).await;
    // Long expired: it would be refreshed at once if it were active.
    let idle_fields = record(
        &fake,
        &idle,
        "2025-01-15T10:30:00",
        &[("status", "inactive")],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "teams", &idle_fields);
    let busy_fields = record(
        &fake,
        &busy,
        &iso_utc(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &busy_fields);
    let idle_key = provider_key(TENANT, "teams");
    let before = dump(&mut conn, &idle_key);
    let before_fields = hgetall(&mut conn, &idle_key);
    let daemon = start_daemon(&redis).await;

    // Over several scan intervals, shown by the active sibling's refreshes (one a second).
    let started = Instant::now();
    wait_until_async(
        "the active sibling to be refreshed three times",
        Duration::from_secs(10),
        || async { count(&fake.client_stats(&busy.0).await, "refresh_ok") >= 3 },
    )
    .await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    let health_of_idle = health_key(TENANT, "teams");
    holds_for(
        "the inactive record untouched",
        Duration::from_secs(1),
        || {
            let after = dump(&mut conn, &idle_key);
            let fake = &fake;
            let id = idle.0.clone();
            let same = after == before;
            async move {
                if !same {
                    return Err("the record's bytes changed".into());
                }
                let calls = count(&fake.client_stats(&id).await, "calls");
                if calls != 0 {
                    return Err(format!(
                        "the fake saw {calls} call(s) for the inactive client"
                    ));
                }
                Ok(())
            }
        },
    )
    .await;
    assert_eq!(hgetall(&mut conn, &idle_key), before_fields);

    let health = hgetall(&mut conn, &health_of_idle);
    assert_eq!(field(&health, "state"), "inactive", "{health:?}");
    assert_eq!(field(&health, "last_refresh_result"), "", "{health:?}");
    let body = scrape(&daemon).await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_registry_providers",
            &[("state", "inactive")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_expiry_timestamp_seconds",
            &[("tenant", TENANT), ("provider", "teams")]
        ),
        None,
        "an inactive provider has no expiry series"
    );

    secrets
        .collect(&mut conn, &[idle_key, provider_key(TENANT, "goto")], &fake)
        .await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 5. Malformed records

/// Fields changed in a record: `(field, value)`.
type Changes = &'static [(&'static str, &'static str)];

#[tokio::test]
async fn malformed_records_are_reported_and_left_alone() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let soon = iso_naive_micros(Utc::now() + secs(2));

    // provider name, changes, expected reason
    let bad_hashes: [(&str, Changes, &str); 4] = [
        ("nocid", &[("client_id", "")], "missing_field"),
        (
            "badexpiry",
            &[("token_expiry", "next tuesday")],
            "bad_token_expiry",
        ),
        (
            "badscopes",
            &[("scopes", "voice-admin.v1.read identity:scim.org")],
            "bad_scopes",
        ),
        (
            "myspace",
            &[("provider_type", "myspace")],
            "unknown_provider_type",
        ),
    ];
    let mut keys = Vec::new();
    let mut client_ids = Vec::new();
    for (name, changes, _) in &bad_hashes {
        let creds = secrets.creds(name);
        seed_client(&fake, &creds.0, &creds.1, &creds.2, json!({})).await;
        let mut fields = record(&fake, &creds, &soon, changes, &mut secrets);
        if field_of(&fields, "client_id").is_empty() {
            remove_field(&mut fields, "client_id");
        }
        seed_provider(&mut conn, TENANT, name, &fields);
        keys.push(provider_key(TENANT, name));
        client_ids.push(creds.0);
    }
    // A record key that is a string, and a listed provider with no record at all.
    let string_key = provider_key(TENANT, "strkey");
    let string_value = unique("rt-in-a-string");
    secrets.add(&string_value);
    redis::cmd("SET")
        .arg(&string_key)
        .arg(&string_value)
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("SET: {e}"));
    let empty: [(&str, &str); 0] = [];
    seed_provider(&mut conn, TENANT, "strkey", &empty);
    seed_provider(&mut conn, TENANT, "ghost", &empty);
    keys.push(string_key.clone());
    keys.push(provider_key(TENANT, "ghost"));
    let expected: Vec<(&str, &str)> = bad_hashes
        .iter()
        .map(|(n, _, r)| (*n, *r))
        .chain([("strkey", "wrong_type"), ("ghost", "missing_record")])
        .collect();

    // A valid sibling, refreshed every second.
    let good = secrets.creds("good");
    seed_client(&fake, &good.0, &good.1, &good.2, json!({"expires_in": 2})).await;
    let good_fields = record(&fake, &good, &soon, &[], &mut secrets);
    seed_provider(&mut conn, TENANT, "goto", &good_fields);

    let dumps_before: Vec<Option<Vec<u8>>> = keys.iter().map(|k| dump(&mut conn, k)).collect();
    let daemon = start_daemon(&redis).await;

    for (name, reason) in &expected {
        let hk = health_key(TENANT, name);
        wait_until(
            &format!("{name} to be reported invalid_record"),
            Duration::from_secs(5),
            || hget(&mut conn, &hk, "state").as_deref() == Some("invalid_record"),
        )
        .await;
        let health = hgetall(&mut conn, &hk);
        let got = field(&health, "reason");
        assert!(
            got.starts_with(&format!("{reason}:")) || got == *reason,
            "{name}: reason {got:?}, expected {reason}"
        );
    }
    // The sibling is served all along: refreshed repeatedly, over several scan intervals.
    wait_until_async(
        "the valid sibling to be refreshed three times",
        Duration::from_secs(10),
        || async { count(&fake.client_stats(&good.0).await, "refresh_ok") >= 3 },
    )
    .await;
    let good_health = hgetall(&mut conn, &health_key(TENANT, "goto"));
    assert_eq!(field(&good_health, "state"), "healthy", "{good_health:?}");

    // Nothing malformed was touched or sent to the provider.
    for (key, before) in keys.iter().zip(&dumps_before) {
        assert_eq!(&dump(&mut conn, key), before, "{key} was modified");
    }
    assert_eq!(
        key_type(&mut conn, &provider_key(TENANT, "ghost")),
        "none",
        "the missing record was created"
    );
    for id in &client_ids {
        let client = fake.client_stats(id).await;
        assert_eq!(count(&client, "calls"), 0, "{id}: {client}");
    }

    let body = scrape(&daemon).await;
    for (_, reason) in &expected {
        let n = metric(
            &body,
            "tokenwarden_registry_invalid_records_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0);
        assert!(
            n >= 1.0,
            "registry_invalid_records_total{{reason={reason}}} = {n}:\n{body}"
        );
    }
    assert_eq!(
        metric(
            &body,
            "tokenwarden_registry_providers",
            &[("state", "invalid_record")]
        ),
        Some(expected.len() as f64),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_registry_providers",
            &[("state", "healthy")]
        ),
        Some(1.0),
        "{body}"
    );

    keys.push(provider_key(TENANT, "goto"));
    secrets.collect(&mut conn, &keys, &fake).await;
    secrets.assert_not_logged(&daemon);
}

#[tokio::test]
async fn a_provider_list_that_is_not_a_set_is_reported_and_skipped() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let soon = iso_naive_micros(Utc::now() + secs(2));

    // Tenant "broken": its provider list is a string; its record is fine but unlisted.
    let hidden = secrets.creds("hidden");
    seed_client(&fake, &hidden.0, &hidden.1, &hidden.2, json!({})).await;
    let hidden_fields = record(&fake, &hidden, &soon, &[], &mut secrets);
    let hidden_key = provider_key("broken", "goto");
    {
        let pairs: Vec<(&str, &str)> = hidden_fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        hset(&mut conn, &hidden_key, &pairs);
    }
    redis::cmd("SET")
        .arg("tenant:broken:providers")
        .arg("goto")
        .query::<()>(&mut conn)
        .unwrap_or_else(|e| panic!("SET: {e}"));
    // Tenant "fine": served.
    let good = secrets.creds("fine");
    seed_client(&fake, &good.0, &good.1, &good.2, json!({"expires_in": 2})).await;
    let good_fields = record(&fake, &good, &soon, &[], &mut secrets);
    seed_provider(&mut conn, "fine", "goto", &good_fields);

    let before_list = dump(&mut conn, "tenant:broken:providers");
    let before_record = dump(&mut conn, &hidden_key);
    let daemon = start_daemon(&redis).await;

    wait_until_async(
        "registry_invalid_records_total{reason=wrong_type}",
        Duration::from_secs(5),
        || async {
            let body = scrape(&daemon).await;
            metric(
                &body,
                "tokenwarden_registry_invalid_records_total",
                &[("reason", "wrong_type")],
            )
            .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    wait_until_async(
        "the other tenant's provider to be refreshed three times",
        Duration::from_secs(10),
        || async { count(&fake.client_stats(&good.0).await, "refresh_ok") >= 3 },
    )
    .await;

    assert_eq!(dump(&mut conn, "tenant:broken:providers"), before_list);
    assert_eq!(dump(&mut conn, &hidden_key), before_record);
    let client = fake.client_stats(&hidden.0).await;
    assert_eq!(count(&client, "calls"), 0, "{client}");
    assert_eq!(
        key_type(&mut conn, &health_key("broken", "goto")),
        "none",
        "a provider not listed in a set got a health hash"
    );
    let good_health = hgetall(&mut conn, &health_key("fine", "goto"));
    assert_eq!(field(&good_health, "state"), "healthy", "{good_health:?}");

    secrets
        .collect(
            &mut conn,
            &[hidden_key, provider_key("fine", "goto")],
            &fake,
        )
        .await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 6. invalid_grant and re-authorisation

#[tokio::test]
async fn invalid_grant_needs_reauth_until_the_record_changes() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("revoked");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"revoked": true, "expires_in": 3600}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let hk = health_key(TENANT, "goto");
    let before = hgetall(&mut conn, &key);
    let daemon = start_daemon(&redis).await;

    wait_until("state reauth_required", Duration::from_secs(6), || {
        hget(&mut conn, &hk, "state").as_deref() == Some("reauth_required")
    })
    .await;
    let health = hgetall(&mut conn, &hk);
    assert_eq!(field(&health, "reason"), "invalid_grant", "{health:?}");
    assert_eq!(
        field(&health, "last_refresh_result"),
        "reauth_required",
        "{health:?}"
    );
    assert_eq!(field(&health, "next_refresh_at"), "", "{health:?}");
    assert!(
        field(&health, "last_error").contains("invalid_grant"),
        "{health:?}"
    );

    // Exactly one token call, and no more over several scan intervals.
    holds_for("one token call only", Duration::from_secs(3), || async {
        let client = fake.client_stats(&creds.0).await;
        match count(&client, "calls") {
            1 => Ok(()),
            n => Err(format!("{n} calls: {client}")),
        }
    })
    .await;
    assert_eq!(hgetall(&mut conn, &key), before, "the record was modified");
    let body = scrape(&daemon).await;
    let labels = [("tenant", TENANT), ("provider", "goto")];
    assert_eq!(
        metric(&body, "tokenwarden_provider_reauth_required", &labels),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_refresh_total",
            &[("provider", "goto"), ("result", "reauth_required")]
        ),
        Some(1.0),
        "{body}"
    );
    let reauth_events: Vec<_> = events(&mut conn, TENANT, "goto")
        .into_iter()
        .filter(|(_, e)| field(e, "type") == "reauth_required")
        .collect();
    assert_eq!(reauth_events.len(), 1, "{reauth_events:?}");

    // A human re-authorised: the gateway writes the new refresh token into the record.
    let new_rt = unique("rt-reauthorised");
    secrets.add(&new_rt);
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &new_rt,
        json!({"revoked": false}),
    )
    .await;
    hset(&mut conn, &key, &[("refresh_token", &new_rt)]);

    let after = wait_record(
        &mut conn,
        &key,
        "the re-authorised token to be refreshed",
        Duration::from_secs(6),
        |r| {
            let rt = field(r, "refresh_token");
            rt != new_rt && rt != creds.2
        },
    )
    .await;
    secrets.add_record(&after);
    wait_until(
        "last_refresh_result success again",
        Duration::from_secs(3),
        || hget(&mut conn, &hk, "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let health = hgetall(&mut conn, &hk);
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    assert_eq!(field(&health, "reason"), "", "{health:?}");
    assert_eq!(field(&health, "last_error"), "", "{health:?}");
    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "calls"), 2, "{client}");
    assert_eq!(count(&client, "refresh_ok"), 1, "{client}");
    let body = scrape(&daemon).await;
    assert_eq!(
        metric(&body, "tokenwarden_provider_reauth_required", &labels),
        Some(0.0),
        "{body}"
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 7. A lost race is a conflict, never invalid_grant

/// Starts a daemon on a record whose refresh takes 1.5 s at the fake, and waits until that
/// call is in flight. Returns the daemon, the record key and the client's credentials.
async fn slow_refresh_in_flight(
    redis: &RedisServer,
    fake: &FakeProvider,
    conn: &mut redis::Connection,
    secrets: &mut Secrets,
    name: &str,
) -> (Daemon, String, (String, String, String)) {
    let creds = secrets.creds(name);
    seed_client(
        fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"delay_ms": 1500, "expires_in": 3600}),
    )
    .await;
    let fields = record(
        fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(2)),
        &[],
        secrets,
    );
    seed_provider(conn, TENANT, "goto", &fields);
    let daemon = start_daemon(redis).await;
    wait_until_async(
        "the daemon's token call to be in flight",
        Duration::from_secs(6),
        || async {
            let client = fake.client_stats(&creds.0).await;
            count(&client, "calls") == 1 && count(&client, "refresh_ok") == 0
        },
    )
    .await;
    (daemon, provider_key(TENANT, "goto"), creds)
}

/// What the gateway writes after it refreshed on its own: all three token fields.
fn gateway_write(conn: &mut redis::Connection, key: &str, rt: &str, at: &str) -> DateTime<Utc> {
    let expiry = Utc::now() + secs(3600);
    hset(
        conn,
        key,
        &[
            ("refresh_token", rt),
            ("access_token", at),
            ("token_expiry", &iso_naive_micros(expiry)),
            ("updated_at", &iso_naive_micros(Utc::now())),
        ],
    );
    expiry
}

async fn assert_conflict_reported(daemon: &Daemon, conn: &mut redis::Connection) {
    let hk = health_key(TENANT, "goto");
    wait_until(
        "last_refresh_result conflict",
        Duration::from_secs(5),
        || hget(conn, &hk, "last_refresh_result").as_deref() == Some("conflict"),
    )
    .await;
    let health = hgetall(conn, &hk);
    assert_ne!(field(&health, "state"), "reauth_required", "{health:?}");
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    let body = wait_metric(
        daemon,
        "tokenwarden_token_refresh_total",
        &[("provider", "goto"), ("result", "conflict")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_refresh_total",
            &[("provider", "goto"), ("result", "reauth_required")]
        ),
        None,
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_provider_reauth_required",
            &[("tenant", TENANT), ("provider", "goto")]
        ),
        Some(0.0),
        "{body}"
    );
    let conflicts = events(conn, TENANT, "goto")
        .into_iter()
        .filter(|(_, e)| field(e, "type") == "conflict")
        .count();
    assert_eq!(conflicts, 1);
}

#[tokio::test]
async fn a_record_rewritten_during_the_call_is_a_conflict_and_keeps_the_gateways_token() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let (daemon, key, creds) =
        slow_refresh_in_flight(&redis, &fake, &mut conn, &mut secrets, "cas").await;

    // The gateway refreshed without the lock (its token is live at the provider) and wrote
    // the record while the daemon's call is still in flight.
    let gw_rt = unique("rt-gateway");
    let gw_at = unique("at-gateway");
    secrets.add(&gw_rt);
    secrets.add(&gw_at);
    fake.seed(json!({"client_id": creds.0, "client_secret": creds.1, "refresh_token": gw_rt}))
        .await;
    let gw_expiry = gateway_write(&mut conn, &key, &gw_rt, &gw_at);
    assert_eq!(
        count(&fake.client_stats(&creds.0).await, "refresh_ok"),
        0,
        "the daemon's call finished before the gateway wrote: the race was not set up"
    );

    assert_conflict_reported(&daemon, &mut conn).await;
    // The provider did answer the daemon; the compare-and-set refused to write over the
    // gateway's token.
    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "refresh_ok"), 1, "{client}");
    let rec = hgetall(&mut conn, &key);
    assert_eq!(field(&rec, "refresh_token"), gw_rt);
    assert_eq!(field(&rec, "access_token"), gw_at);
    assert_close(
        "token_expiry",
        instant(field(&rec, "token_expiry")),
        gw_expiry,
        millis(1),
    );
    // Rescheduled from the gateway's expiry: no more calls.
    holds_for("no further token call", Duration::from_secs(2), || async {
        match count(&fake.client_stats(&creds.0).await, "calls") {
            1 => Ok(()),
            n => Err(format!("{n} calls")),
        }
    })
    .await;
    let health = hgetall(&mut conn, &health_key(TENANT, "goto"));
    assert_close(
        "health token_expiry",
        instant(field(&health, "token_expiry")),
        gw_expiry,
        millis(1),
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

#[tokio::test]
async fn invalid_grant_after_the_gateway_won_the_race_is_a_conflict() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let (daemon, key, creds) =
        slow_refresh_in_flight(&redis, &fake, &mut conn, &mut secrets, "race").await;

    // The gateway refreshes with the same refresh token, faster, and writes the record: the
    // daemon's call, answered later, finds its token already used.
    fake.faults(json!({"client_id": creds.0, "delay_ms": 0}))
        .await;
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("HTTP client: {e}"))
        .post(fake.token_url())
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", creds.2.as_str()),
            ("client_id", creds.0.as_str()),
            ("client_secret", creds.1.as_str()),
        ])
        .send()
        .await
        .unwrap_or_else(|e| panic!("gateway refresh: {e}"));
    assert_eq!(resp.status().as_u16(), 200);
    let grant: Value = resp
        .json()
        .await
        .unwrap_or_else(|e| panic!("gateway refresh answer: {e}"));
    let gw_rt = grant["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let gw_at = grant["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    secrets.add(&gw_rt);
    secrets.add(&gw_at);
    gateway_write(&mut conn, &key, &gw_rt, &gw_at);
    assert_eq!(
        count(&fake.client_stats(&creds.0).await, "invalid_grant"),
        0,
        "the daemon's call finished before the gateway wrote: the race was not set up"
    );

    assert_conflict_reported(&daemon, &mut conn).await;
    let client = fake.client_stats(&creds.0).await;
    // The daemon's call was the loser: one reuse at the provider, which the daemon saw as
    // the race it is.
    assert_eq!(count(&client, "reuse"), 1, "{client}");
    assert_eq!(count(&client, "calls"), 2, "{client}");
    assert_eq!(client["live_refresh_token"], json!(gw_rt), "{client}");
    let rec = hgetall(&mut conn, &key);
    assert_eq!(field(&rec, "refresh_token"), gw_rt);
    assert_eq!(field(&rec, "access_token"), gw_at);
    holds_for("no further token call", Duration::from_secs(2), || async {
        match count(&fake.client_stats(&creds.0).await, "calls") {
            2 => Ok(()),
            n => Err(format!("{n} calls")),
        }
    })
    .await;

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 8. Transient errors are retried

#[tokio::test]
async fn unavailable_provider_is_retried_until_success() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("flaky");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"fail_503": 2, "expires_in": 3600}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    let after = wait_record(
        &mut conn,
        &key,
        "the token to be refreshed after the 503s",
        Duration::from_secs(8),
        |r| field(r, "refresh_token") != creds.2,
    )
    .await;
    secrets.add_record(&after);
    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "calls"), 3, "{client}");
    assert_eq!(count(&client, "refresh_ok"), 1, "{client}");
    assert_eq!(count(&fake.stats_summary().await, "unavailable"), 2);

    let hk = health_key(TENANT, "goto");
    wait_until(
        "last_refresh_result success",
        Duration::from_secs(2),
        || hget(&mut conn, &hk, "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let health = hgetall(&mut conn, &hk);
    assert_eq!(field(&health, "consecutive_failures"), "0", "{health:?}");
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    assert_eq!(field(&health, "last_error"), "", "{health:?}");

    let body = wait_metric(
        &daemon,
        "tokenwarden_token_refresh_total",
        &[("provider", "goto"), ("result", "success")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_refresh_total",
            &[("provider", "goto"), ("result", "transient_error")]
        ),
        Some(2.0),
        "{body}"
    );
    let evs = events(&mut conn, TENANT, "goto");
    let kinds: Vec<(&str, &str)> = evs
        .iter()
        .map(|(_, e)| (field(e, "type"), field(e, "result")))
        .filter(|(t, _)| *t == "failure" || *t == "refresh")
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("failure", "transient_error"),
            ("failure", "transient_error"),
            ("refresh", "success")
        ],
        "{evs:?}"
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

#[tokio::test]
async fn rate_limit_waits_for_retry_after() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("limited");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"rate_limit": 1, "retry_after": "1", "expires_in": 3600}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    // Watch the fake's counters closely: when the 429 was answered, when the retry succeeded.
    let mut first_call: Option<Instant> = None;
    let retried_ok: Instant;
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let client = fake.client_stats(&creds.0).await;
        let now = Instant::now();
        if first_call.is_none() && count(&client, "calls") >= 1 {
            first_call = Some(now);
        }
        if count(&client, "refresh_ok") >= 1 {
            retried_ok = now;
            break;
        }
        assert!(now < deadline, "no successful retry within 8 s: {client}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_call = first_call.unwrap_or(retried_ok);
    let waited = retried_ok - first_call;
    // Our observations can be late by a poll each; the backoff alone would be ~200 ms.
    assert!(
        waited >= Duration::from_millis(900),
        "retried {waited:?} after the 429, sooner than its Retry-After: 1"
    );
    let client = fake.client_stats(&creds.0).await;
    assert_eq!(count(&client, "calls"), 2, "{client}");
    assert_eq!(count(&fake.stats_summary().await, "rate_limited"), 1);

    let after = wait_record(
        &mut conn,
        &key,
        "the token to be written back",
        Duration::from_secs(2),
        |r| field(r, "refresh_token") != creds.2,
    )
    .await;
    secrets.add_record(&after);
    // The same from the daemon's own event times (Redis server clock, ms).
    let hk = health_key(TENANT, "goto");
    wait_until(
        "last_refresh_result success",
        Duration::from_secs(2),
        || hget(&mut conn, &hk, "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let evs = events(&mut conn, TENANT, "goto");
    let failure = evs
        .iter()
        .find(|(_, e)| field(e, "type") == "failure")
        .unwrap_or_else(|| panic!("no failure event: {evs:?}"));
    let success = evs
        .iter()
        .find(|(_, e)| field(e, "type") == "refresh" && field(e, "result") == "success")
        .unwrap_or_else(|| panic!("no refresh event: {evs:?}"));
    assert_eq!(field(&failure.1, "result"), "transient_error");
    assert!(
        success.0 >= failure.0 + 980,
        "success event {} ms after the failure event, expected >= 1000",
        success.0.saturating_sub(failure.0)
    );
    let health = hgetall(&mut conn, &hk);
    assert_eq!(field(&health, "consecutive_failures"), "0", "{health:?}");
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    let body = scrape(&daemon).await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_refresh_total",
            &[("provider", "goto"), ("result", "transient_error")]
        ),
        Some(1.0),
        "{body}"
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 9. No expires_in

#[tokio::test]
async fn missing_expires_in_uses_the_catalog_default() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(5);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("noexp");
    seed_client(
        &fake,
        &creds.0,
        &creds.1,
        &creds.2,
        json!({"omit_expires_in": true}),
    )
    .await;
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(2)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    let after = wait_record(
        &mut conn,
        &key,
        "the token to be refreshed",
        Duration::from_secs(6),
        |r| field(r, "refresh_token") != creds.2,
    )
    .await;
    secrets.add_record(&after);
    let written = instant(field(&after, "updated_at"));
    let expiry = instant(field(&after, "token_expiry"));
    assert_close(
        "token_expiry with the goto default lifetime",
        expiry,
        written + secs(3600),
        secs(1),
    );
    let hk = health_key(TENANT, "goto");
    wait_until(
        "last_refresh_result success",
        Duration::from_secs(2),
        || hget(&mut conn, &hk, "last_refresh_result").as_deref() == Some("success"),
    )
    .await;
    let health = hgetall(&mut conn, &hk);
    let reason = field(&health, "reason");
    assert!(
        reason.contains("expires_in") && reason.contains("missing"),
        "health reason {reason:?} does not say expires_in was missing"
    );
    assert!(reason.contains("3600"), "reason {reason:?}");
    assert_eq!(field(&health, "state"), "healthy", "{health:?}");
    // Scheduled from the assumed hour, not from the fake's real 5 s.
    assert_close(
        "next_refresh_at",
        instant(field(&health, "next_refresh_at")),
        written + secs(2400),
        secs(2),
    );

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 10. Client authentication methods

#[tokio::test]
async fn client_auth_method_follows_the_record() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let soon = iso_naive_micros(Utc::now() + secs(2));
    // provider, record's method, fake's mode
    let cases = [
        ("bodyauth", "body", "body"),
        ("basicauth", "basic", "basic"),
        ("mismatch", "body", "basic"),
    ];
    let mut creds_of = HashMap::new();
    for (name, method, mode) in cases {
        let creds = secrets.creds(name);
        seed_client(
            &fake,
            &creds.0,
            &creds.1,
            &creds.2,
            json!({"auth": mode, "expires_in": 3600}),
        )
        .await;
        let fields = record(
            &fake,
            &creds,
            &soon,
            &[("token_auth_method", method)],
            &mut secrets,
        );
        seed_provider(&mut conn, TENANT, name, &fields);
        creds_of.insert(name, creds);
    }
    let daemon = start_daemon(&redis).await;

    for name in ["bodyauth", "basicauth"] {
        let rt0 = creds_of[name].2.clone();
        let rec = wait_record(
            &mut conn,
            &provider_key(TENANT, name),
            &format!("{name} to be refreshed"),
            Duration::from_secs(6),
            |r| field(r, "refresh_token") != rt0,
        )
        .await;
        secrets.add_record(&rec);
        let client = fake.client_stats(&creds_of[name].0).await;
        assert_eq!(count(&client, "refresh_ok"), 1, "{name}: {client}");
        assert_eq!(count(&client, "bad_client"), 0, "{name}: {client}");
    }
    let hk = health_key(TENANT, "mismatch");
    wait_until(
        "the mismatched client to need re-authorisation",
        Duration::from_secs(6),
        || hget(&mut conn, &hk, "state").as_deref() == Some("reauth_required"),
    )
    .await;
    let health = hgetall(&mut conn, &hk);
    assert_eq!(field(&health, "reason"), "invalid_client", "{health:?}");
    let id = creds_of["mismatch"].0.clone();
    holds_for("one rejected call only", Duration::from_secs(2), || async {
        let client = fake.client_stats(&id).await;
        if count(&client, "calls") == 1 && count(&client, "bad_client") == 1 {
            Ok(())
        } else {
            Err(client.to_string())
        }
    })
    .await;
    for name in ["bodyauth", "basicauth"] {
        let health = hgetall(&mut conn, &health_key(TENANT, name));
        assert_eq!(field(&health, "state"), "healthy", "{name}: {health:?}");
    }
    let body = scrape(&daemon).await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_provider_reauth_required",
            &[("tenant", TENANT), ("provider", "mismatch")]
        ),
        Some(1.0),
        "{body}"
    );

    let keys: Vec<String> = cases
        .iter()
        .map(|(n, _, _)| provider_key(TENANT, n))
        .collect();
    secrets.collect(&mut conn, &keys, &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// 11. The gateway refreshed on its own

#[tokio::test]
async fn a_token_the_gateway_refreshed_is_rescheduled_without_a_call() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let mut secrets = Secrets::default();
    let creds = secrets.creds("gwrefresh");
    seed_client(&fake, &creds.0, &creds.1, &creds.2, json!({})).await;
    // Expires in a minute: due in about 30 s, well after this test.
    let fields = record(
        &fake,
        &creds,
        &iso_naive_micros(Utc::now() + secs(60)),
        &[],
        &mut secrets,
    );
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let key = provider_key(TENANT, "goto");
    let hk = health_key(TENANT, "goto");
    let daemon = start_daemon(&redis).await;

    wait_until("next_refresh_at to be set", Duration::from_secs(3), || {
        hget(&mut conn, &hk, "next_refresh_at").is_some_and(|v| !v.is_empty())
    })
    .await;
    let first_next = instant(&hget(&mut conn, &hk, "next_refresh_at").unwrap_or_default());
    assert!(
        first_next < Utc::now() + secs(40),
        "first next_refresh_at {first_next}"
    );

    let gw_rt = unique("rt-gateway-own");
    let gw_at = unique("at-gateway-own");
    secrets.add(&gw_rt);
    secrets.add(&gw_at);
    let written = Instant::now();
    let gw_expiry = gateway_write(&mut conn, &key, &gw_rt, &gw_at);
    wait_until(
        "next_refresh_at to move to the new expiry",
        Duration::from_secs(3),
        || {
            hget(&mut conn, &hk, "next_refresh_at")
                .filter(|v| !v.is_empty())
                .is_some_and(|v| instant(&v) > first_next + secs(1000))
        },
    )
    .await;
    let picked_up = written.elapsed();
    assert!(
        picked_up <= Duration::from_millis(2500),
        "the change took {picked_up:?} to be seen with a 1 s change scan"
    );
    let health = hgetall(&mut conn, &hk);
    let next = instant(field(&health, "next_refresh_at"));
    assert!(
        next < gw_expiry,
        "next refresh {next} not before expiry {gw_expiry}"
    );
    assert!(next > Utc::now() + secs(1500), "next refresh {next}");
    assert_close(
        "health token_expiry",
        instant(field(&health, "token_expiry")),
        gw_expiry,
        millis(1),
    );
    let body = scrape(&daemon).await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_expiry_timestamp_seconds",
            &[("tenant", TENANT), ("provider", "goto")]
        ),
        Some(gw_expiry.timestamp() as f64),
        "{body}"
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_token_next_refresh_timestamp_seconds",
            &[("tenant", TENANT), ("provider", "goto")]
        ),
        Some(next.timestamp() as f64),
        "{body}"
    );
    holds_for("no token call", Duration::from_secs(1), || async {
        match count(&fake.client_stats(&creds.0).await, "calls") {
            0 => Ok(()),
            n => Err(format!("{n} calls")),
        }
    })
    .await;
    let rec = hgetall(&mut conn, &key);
    assert_eq!(field(&rec, "refresh_token"), gw_rt);
    assert_eq!(field(&rec, "access_token"), gw_at);

    secrets.collect(&mut conn, &[key], &fake).await;
    secrets.assert_not_logged(&daemon);
}

// -----------------------------------------------------------------------------------------
// The helpers above, checked on their own

#[test]
fn timestamp_classifier_and_metric_parser_read_what_they_should() {
    let cases = [
        ("2026-11-28T03:20:00", Kind::IsoNaive { sep: 'T' }),
        ("2026-11-28 03:20:00.123456", Kind::IsoNaive { sep: ' ' }),
        (
            "2026-11-28T03:20:00+00:00",
            Kind::IsoOffset {
                sep: 'T',
                offset: "+00:00".into(),
            },
        ),
        (
            "2026-11-27T22:20:00.000001-05:00",
            Kind::IsoOffset {
                sep: 'T',
                offset: "-05:00".into(),
            },
        ),
        ("2026-11-28T03:20:00Z", Kind::IsoZulu { sep: 'T' }),
        ("1795836000", Kind::EpochSeconds),
        ("1795836000.5", Kind::EpochFloat),
        ("1795836000000", Kind::EpochMillis),
    ];
    let want = NaiveDateTime::parse_from_str("2026-11-28T03:20:00", "%Y-%m-%dT%H:%M:%S")
        .unwrap_or_else(|e| panic!("{e}"))
        .and_utc();
    for (text, kind) in cases {
        let (got_kind, at) = classify(text);
        assert_eq!(got_kind, kind, "{text}");
        assert_close(text, at, want, secs(1));
    }
    assert!(std::panic::catch_unwind(|| classify("2026-11-28T03:20:00.123")).is_err());
    assert!(std::panic::catch_unwind(|| classify("next tuesday")).is_err());

    let body = "# TYPE x counter\n\
        tokenwarden_token_refresh_total{provider=\"goto\",result=\"success\"} 2\n\
        tokenwarden_token_refresh_total{provider=\"teams\",result=\"success\"} 3\n\
        tokenwarden_token_refresh_total{provider=\"goto\",result=\"conflict\"} 1\n\
        tokenwarden_redis_up 1\n";
    let name = "tokenwarden_token_refresh_total";
    assert_eq!(metric(body, name, &[("result", "success")]), Some(5.0));
    assert_eq!(
        metric(body, name, &[("provider", "goto"), ("result", "success")]),
        Some(2.0)
    );
    assert_eq!(metric(body, name, &[("result", "skipped")]), None);
    assert_eq!(metric(body, "tokenwarden_redis_up", &[]), Some(1.0));
    let labels = parse_labels(r#"tenant="a\"b",provider="p""#);
    assert_eq!(labels.get("tenant").map(String::as_str), Some("a\"b"));
    assert_eq!(labels.get("provider").map(String::as_str), Some("p"));
}
