//! The gateway side, end to end: a `redis-server`, the strict fake provider, the daemon, and
//! a gateway that refreshes by itself (the reference implementation
//! `scripts/gateway_refresh.py`, run with `python3` and redis-py, or whole-record writes made
//! here).
//!
//! - observe mode beside a gateway that refreshes: tokenwarden makes no token call (the
//!   fake's per-client counters equal the gateway's refreshes), its expiry metric follows the
//!   record throughout, health says when it would have refreshed; a SIGHUP to `active` and
//!   tokenwarden refreshes;
//! - the gateway's protocol: both refreshing the same providers for a while, no refresh
//!   token reused, none lost;
//! - a stale whole-record write after tokenwarden rotated: detected, repaired from the
//!   journal, and the provider keeps working.
//!
//! Access tokens live a few seconds, so every behaviour shows in seconds; the figures are
//! printed (`cargo nextest run --test gateway --no-capture`).

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::metrics::{metric, metric_sum};
use support::process::TempDir;
use support::{
    health_key, hget, hgetall, oauth_record, provider_key, seed_provider, wait_until_async, Daemon,
    FakeProvider, RedisServer, Secrets,
};

const TENANT: &str = "gwtenant";
const READY: Duration = Duration::from_secs(10);

fn fast_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TOKENWARDEN_HEALTH_ENABLED", "false"),
        ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
        ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
        ("TOKENWARDEN_REFRESH_LOCK_BUSY_RETRY_SECS", "1"),
        ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "0"),
    ]
}

fn iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

fn expiry_of(rec: &HashMap<String, String>) -> Option<f64> {
    let v = rec.get("token_expiry")?;
    DateTime::parse_from_rfc3339(v)
        .ok()
        .map(|t| t.timestamp_millis() as f64 / 1000.0)
}

/// Seeds `n` providers `p0..` whose tokens expire in `expires_in` seconds; returns their
/// names and client ids.
async fn seed(
    redis: &RedisServer,
    fake: &FakeProvider,
    n: usize,
    expires_in: i64,
) -> Vec<(String, String)> {
    let mut conn = redis.conn();
    let mut out = Vec::new();
    for i in 0..n {
        let provider = format!("p{i}");
        let client = format!("gw-client-{i}-{:08x}", fastrand::u32(..));
        let rt = format!("rt-seed-{i}-{:016x}", fastrand::u64(..));
        fake.seed(
            json!({"client_id": client, "client_secret": "gw-secret-value", "refresh_token": rt}),
        )
        .await;
        let expiry = iso(Utc::now() + chrono::TimeDelta::seconds(expires_in));
        let fields = oauth_record(fake, &client, "gw-secret-value", &rt, &expiry);
        seed_provider(&mut conn, TENANT, &provider, &fields);
        out.push((provider, client));
    }
    out
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gateway_refresh.py")
}

/// Starts the reference gateway on `providers` for `seconds`.
fn start_gateway(
    redis: &RedisServer,
    providers: &[(String, String)],
    seconds: u64,
    min_remaining: f64,
) -> Child {
    let names: Vec<&str> = providers.iter().map(|(p, _)| p.as_str()).collect();
    Command::new("python3")
        .arg(script())
        .args(["--redis", &redis.url(), "--tenant", TENANT])
        .args(["--providers", &names.join(",")])
        .args(["--seconds", &seconds.to_string()])
        .args(["--min-remaining", &min_remaining.to_string()])
        .arg("--verbose")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run python3 {}: {e}", script().display()))
}

/// Waits for the gateway to exit; returns its refreshes per provider and its summary.
fn finish_gateway(child: Child) -> (HashMap<String, u64>, Value) {
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("gateway script: {e}"));
    assert!(
        out.status.success(),
        "gateway script failed: {:?}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut refreshed: HashMap<String, u64> = HashMap::new();
    let mut summary = Value::Null;
    for line in text.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("gateway script printed {line:?}: {e}"));
        if v.get("summary").is_some() {
            summary = v["summary"].clone();
        } else if v["outcome"] == "refreshed" {
            *refreshed
                .entry(v["provider"].as_str().unwrap_or_default().to_string())
                .or_default() += 1;
        }
    }
    assert!(
        summary.is_object(),
        "no summary from the gateway script:\n{text}"
    );
    (refreshed, summary)
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// Every client's refresh token in Redis is the live one at the fake: nothing lost. A
/// refresh in progress (the fake answered, the write-back not yet done) is waited out; a lost
/// token never converges.
async fn assert_nothing_lost(
    redis: &RedisServer,
    fake: &FakeProvider,
    providers: &[(String, String)],
) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut conn = redis.conn();
    loop {
        let stats = fake.stats().await;
        let mut mismatch = None;
        for (p, client) in providers {
            let live = stats["clients"][client]["live_refresh_token"]
                .as_str()
                .map(str::to_string);
            let stored = hget(&mut conn, &provider_key(TENANT, p), "refresh_token");
            if live.is_none() || stored != live {
                mismatch = Some(format!(
                    "{p}: the record's refresh token is not the live one (lost): stored {stored:?}, client {}",
                    stats["clients"][client]
                ));
            }
        }
        assert_eq!(n(&stats["reuse"]), 0, "refresh tokens reused: {stats}");
        assert_eq!(
            n(&stats["invalid_grant"]),
            0,
            "invalid_grant answers: {stats}"
        );
        match mismatch {
            None => return,
            Some(m) if Instant::now() >= deadline => panic!("{m}"),
            Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// The records' secrets (and the seeded client secret) are nowhere in the daemon's output.
fn assert_no_secret_logged(redis: &RedisServer, daemon: &Daemon, providers: &[(String, String)]) {
    let mut secrets = Secrets::default();
    secrets.add("gw-secret-value");
    let mut conn = redis.conn();
    for (p, _) in providers {
        secrets.add_record(&hgetall(&mut conn, &provider_key(TENANT, p)));
    }
    secrets.assert_not_logged(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_beside_a_gateway_that_refreshes_then_sighup_to_active() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(6);
    let providers = seed(&redis, &fake, 3, 6).await;
    let dir = TempDir::new("gateway-observe");
    let config = dir.path().join("tokenwarden.toml");
    std::fs::write(&config, "[refresh]\nmode = \"observe\"\n").expect("write config");
    let config_arg = config.display().to_string();
    let daemon = Daemon::start_with_args(&redis, &["--config", &config_arg], &fast_env());
    daemon.wait_ready(READY).await;

    // The gateway refreshes each token 2 s before it expires; tokenwarden's own schedule
    // (half of a 6 s lifetime) comes first, so every token is one it would have refreshed.
    let gateway = start_gateway(&redis, &providers, 14, 2.0);
    let mut conn = redis.conn();
    let mut samples = 0u32;
    let mut exact = 0u32;
    let mut changes = 0u32;
    let mut last: HashMap<String, (f64, Instant)> = HashMap::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(13) {
        let body = daemon.metrics().await;
        for (p, _) in &providers {
            let rec = hgetall(&mut conn, &provider_key(TENANT, p));
            let Some(expiry) = expiry_of(&rec) else {
                panic!("{p}: record without a readable token_expiry: {rec:?}")
            };
            let seen = last.entry(p.clone()).or_insert((expiry, Instant::now()));
            if (seen.0 - expiry).abs() > 0.001 {
                *seen = (expiry, Instant::now());
                changes += 1;
            }
            let m = metric(
                &body,
                "tokenwarden_token_expiry_timestamp_seconds",
                &[("tenant", TENANT), ("provider", p)],
            );
            samples += 1;
            match m {
                Some(v) if (v - expiry).abs() < 1.0 => exact += 1,
                // The record changed since the metrics were rendered or within the change
                // scan's interval: the metric may lag by that much, not more.
                other => assert!(
                    seen.1.elapsed() < Duration::from_millis(2500),
                    "{p}: expiry metric {other:?} differs from the record's {expiry} for {:?}",
                    seen.1.elapsed()
                ),
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (refreshed, summary) = finish_gateway(gateway);
    let stats = fake.stats().await;
    let mut gateway_total = 0;
    for (p, client) in &providers {
        let calls = n(&stats["clients"][client]["calls"]);
        let by_gateway = refreshed.get(p).copied().unwrap_or(0);
        gateway_total += by_gateway;
        assert!(
            by_gateway >= 2,
            "{p}: the gateway refreshed {by_gateway} times"
        );
        assert_eq!(
            calls, by_gateway,
            "{p}: token calls at the fake {calls}, by the gateway {by_gateway}: tokenwarden called in observe mode"
        );
        let h = hgetall(&mut conn, &health_key(TENANT, p));
        let would = h.get("would_refresh_at").map(String::as_str).unwrap_or("");
        assert!(
            !would.is_empty(),
            "{p}: health has no would_refresh_at: {h:?}"
        );
        assert_eq!(
            h.get("last_refresh_result"),
            None,
            "{p}: no attempt in observe mode: {h:?}"
        );
    }
    let body = daemon.metrics().await;
    let tw_attempts = metric_sum(&body, "tokenwarden_token_refresh_total", &[]);
    assert_eq!(
        tw_attempts, 0.0,
        "no refresh attempt counted in observe mode"
    );
    let would_events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap_or_default();
    let would_events = would_events
        .iter()
        .filter(|(_, f)| f.get("type").map(String::as_str) == Some("would_refresh"))
        .count();
    assert!(
        would_events >= providers.len(),
        "would_refresh events: {would_events}"
    );
    assert!(
        exact * 10 >= samples * 8,
        "expiry metric exact in {exact} of {samples} samples"
    );
    println!(
        "observe mode: {} s, gateway refreshes {gateway_total} ({summary}), token calls at the fake {}, by tokenwarden 0; \
         expiry metric sampled {samples} times, equal to the record in {exact}, the rest within 2.5 s of a change ({changes} changes); \
         would_refresh events {would_events}",
        started.elapsed().as_secs(),
        n(&stats["calls"]),
    );
    assert_nothing_lost(&redis, &fake, &providers).await;

    // An operator's refresh in observe mode makes no call either.
    let (p0, _) = &providers[0];
    let out = Daemon::cli(
        &[
            "refresh",
            "--tenant",
            TENANT,
            "--provider",
            p0,
            "--local",
            "--config",
            &config_arg,
        ],
        &[("TOKENWARDEN_REDIS_URL", &redis.url())],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "refresh in observe mode: {text}"
    );
    assert!(text.contains("observe mode: no token call"), "{text}");
    assert_eq!(
        n(&fake.stats().await["calls"]),
        n(&stats["calls"]),
        "the CLI called"
    );

    // Switch: only the setting, and a SIGHUP.
    std::fs::write(&config, "[refresh]\nmode = \"active\"\n").expect("write config");
    daemon.sighup();
    let switched = Instant::now();
    let before = n(&stats["refresh_ok"]);
    wait_until_async(
        "tokenwarden to refresh every provider after the switch",
        Duration::from_secs(20),
        || async {
            let body = daemon.metrics().await;
            providers.iter().all(|(p, _)| {
                metric_sum(
                    &body,
                    "tokenwarden_token_refresh_total",
                    &[("provider", p), ("result", "success")],
                ) >= 1.0
            })
        },
    )
    .await;
    let stats = fake.stats().await;
    for (p, _) in &providers {
        let h = hgetall(&mut conn, &health_key(TENANT, p));
        assert_eq!(
            h.get("last_refresh_result").map(String::as_str),
            Some("success"),
            "{p}: {h:?}"
        );
        assert_eq!(
            h.get("would_refresh_at").map(String::as_str),
            Some(""),
            "{p}: cleared"
        );
    }
    println!(
        "after SIGHUP to active: every provider refreshed by tokenwarden within {:.1} s; token calls at the fake {} -> {}",
        switched.elapsed().as_secs_f64(),
        before,
        n(&stats["refresh_ok"])
    );
    assert_nothing_lost(&redis, &fake, &providers).await;
    assert_no_secret_logged(&redis, &daemon, &providers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_and_tokenwarden_refresh_the_same_providers_without_losing_a_token() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(6);
    let providers = seed(&redis, &fake, 4, 3).await;
    let daemon = Daemon::start(&redis, &fast_env());
    daemon.wait_ready(READY).await;
    // The gateway refreshes at 3 s left: tokenwarden's schedule is 3 s +- 0.3 s left.
    let seconds = 30;
    let gateway = start_gateway(&redis, &providers, seconds, 3.0);
    let (refreshed, summary) = finish_gateway(gateway);
    let gw_total: u64 = refreshed.values().sum();
    // tokenwarden goes on refreshing: compare the fake's count with tokenwarden's between
    // two scrapes that agree (no refresh of tokenwarden's in between), so that a refresh the
    // fake has answered and tokenwarden not yet written back is waited out, not miscounted.
    let success = |body: &str| {
        metric_sum(
            body,
            "tokenwarden_token_refresh_total",
            &[("result", "success")],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (body, quiet) = loop {
        let first = daemon.metrics().await;
        let fake_ok = n(&fake.stats_summary().await["refresh_ok"]);
        let second = daemon.metrics().await;
        let tw = success(&second);
        if success(&first) == tw && fake_ok == gw_total + tw as u64 {
            break (second, (fake_ok, tw));
        }
        if Instant::now() >= deadline {
            // Reported by the assertion below, with the figures.
            break (second, (fake_ok, tw));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let tw_success = quiet.1;
    let tw_conflict = metric_sum(
        &body,
        "tokenwarden_token_refresh_total",
        &[("result", "conflict")],
    );
    let tw_locked = metric_sum(
        &body,
        "tokenwarden_token_refresh_total",
        &[("result", "locked")],
    );
    let tw_skipped = metric_sum(
        &body,
        "tokenwarden_token_refresh_total",
        &[("result", "skipped")],
    );
    let stats = fake.stats().await;
    println!(
        "protocol run: {seconds} s, {} providers, 6 s tokens; gateway refreshes {gw_total} (outcomes {summary}); \
         tokenwarden success {tw_success}, locked {tw_locked}, skipped {tw_skipped}, conflict {tw_conflict}; \
         fake: refresh_ok {}, reuse {}, invalid_grant {}, concurrent_same_rt {}",
        providers.len(),
        n(&stats["refresh_ok"]),
        n(&stats["reuse"]),
        n(&stats["invalid_grant"]),
        n(&stats["concurrent_same_rt"]),
    );
    assert!(gw_total > 0, "the gateway refreshed nothing");
    assert!(tw_success > 0.0, "tokenwarden refreshed nothing");
    assert_eq!(
        quiet.0,
        gw_total + tw_success as u64,
        "every successful token call was written by its caller"
    );
    assert_eq!(n(&stats["concurrent_same_rt"]), 0);
    assert_nothing_lost(&redis, &fake, &providers).await;
    assert_no_secret_logged(&redis, &daemon, &providers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_whole_record_write_is_detected_and_repaired_from_the_journal() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(4);
    let providers = seed(&redis, &fake, 1, 1).await;
    let (p, _) = &providers[0];
    let key = provider_key(TENANT, p);
    let mut conn = redis.conn();
    // What the gateway read before tokenwarden's refresh: the whole record.
    let snapshot = hgetall(&mut conn, &key);
    let rt0 = snapshot.get("refresh_token").cloned().unwrap_or_default();
    let daemon = Daemon::start(&redis, &fast_env());
    daemon.wait_ready(READY).await;
    wait_until_async(
        "tokenwarden's first rotation",
        Duration::from_secs(10),
        || async { hget(&mut redis.conn(), &key, "refresh_token").is_some_and(|rt| rt != rt0) },
    )
    .await;
    let rotated = hget(&mut conn, &key, "refresh_token").unwrap_or_default();
    // The gateway writes the whole record it read back: the used refresh token returns.
    let mut hset = redis::cmd("HSET");
    hset.arg(&key);
    for (k, v) in &snapshot {
        hset.arg(k).arg(v);
    }
    hset.query::<()>(&mut conn).expect("HSET the stale record");
    let written = Instant::now();
    wait_until_async(
        "the stale write repaired",
        Duration::from_secs(10),
        || async { hget(&mut redis.conn(), &key, "refresh_token").is_some_and(|rt| rt != rt0) },
    )
    .await;
    let repaired_in = written.elapsed();
    let now_rt = hget(&mut conn, &key, "refresh_token").unwrap_or_default();
    let body = daemon.metrics().await;
    let stale = metric_sum(&body, "tokenwarden_stale_writes_total", &[("provider", p)]);
    assert_eq!(stale, 1.0, "stale_writes_total");
    let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .unwrap_or_default();
    let stale_events: Vec<&str> = events
        .iter()
        .filter(|(_, f)| f.get("type").map(String::as_str) == Some("stale_write"))
        .map(|(_, f)| f.get("result").map(String::as_str).unwrap_or(""))
        .collect();
    assert_eq!(stale_events, vec!["stale_write", "repaired"], "events");
    // The provider keeps working: more rotations, none reused, nothing lost.
    let ok_before = n(&fake.stats().await["refresh_ok"]);
    wait_until_async("two more refreshes", Duration::from_secs(15), || async {
        n(&fake.stats().await["refresh_ok"]) >= ok_before + 2
    })
    .await;
    let h = hgetall(&mut conn, &health_key(TENANT, p));
    assert_eq!(h.get("state").map(String::as_str), Some("healthy"), "{h:?}");
    let stats = fake.stats().await;
    println!(
        "stale write: rotated once, the whole old record written back, repaired in {:.0} ms (record back on {}); \
         then refresh_ok {} -> {}, reuse {}, invalid_grant {}",
        repaired_in.as_secs_f64() * 1000.0,
        if now_rt == rotated { "the rotated token" } else { "a newer token" },
        ok_before,
        n(&stats["refresh_ok"]),
        n(&stats["reuse"]),
        n(&stats["invalid_grant"]),
    );
    assert_nothing_lost(&redis, &fake, &providers).await;
    assert_no_secret_logged(&redis, &daemon, &providers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_write_the_journal_cannot_repair_is_reported_and_never_sent() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let providers = seed(&redis, &fake, 1, 3600).await;
    let (p, client) = &providers[0];
    let key = provider_key(TENANT, p);
    let mut conn = redis.conn();
    let snapshot = hgetall(&mut conn, &key);
    let daemon = Daemon::start(&redis, &fast_env());
    daemon.wait_ready(READY).await;
    // The gateway rotates by itself (tokenwarden has no journal entry of it) and writes the
    // fields it changed.
    let answer: Value = reqwest::Client::new()
        .post(fake.token_url())
        .basic_auth(client, Some("gw-secret-value"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("refresh_token", snapshot["refresh_token"].as_str()),
        ])
        .send()
        .await
        .expect("token call")
        .json()
        .await
        .expect("token answer");
    // Not the seeded expiry (3600 s from the seeding, a moment ago): the wait below must
    // see the rotation read, not the first read.
    let expiry = iso(Utc::now() + chrono::TimeDelta::seconds(7200));
    let rt1 = answer["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let at1 = answer["access_token"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            ("access_token", at1.as_str()),
            ("refresh_token", rt1.as_str()),
            ("token_expiry", expiry.as_str()),
        ])
        .query::<()>(&mut conn)
        .expect("HSET");
    let want = DateTime::parse_from_rfc3339(&expiry)
        .map(|t| t.timestamp())
        .unwrap_or(0) as f64;
    wait_until_async(
        "tokenwarden to read the gateway's rotation",
        Duration::from_secs(30),
        || async {
            metric(
                &daemon.metrics().await,
                "tokenwarden_token_expiry_timestamp_seconds",
                &[("provider", p)],
            )
            .is_some_and(|v| (v - want).abs() < 1.0)
        },
    )
    .await;
    // Then it writes back the whole record it read before.
    let mut hset = redis::cmd("HSET");
    hset.arg(&key);
    for (k, v) in &snapshot {
        hset.arg(k).arg(v);
    }
    hset.query::<()>(&mut conn).expect("HSET the stale record");
    let written = Instant::now();
    wait_until_async(
        "the unrepairable stale write reported",
        Duration::from_secs(30),
        || async {
            let h = hgetall(&mut redis.conn(), &health_key(TENANT, p));
            h.get("reason")
                .is_some_and(|r| r.contains("re-authorisation may follow"))
        },
    )
    .await;
    let reported_in = written.elapsed();
    let h = hgetall(&mut conn, &health_key(TENANT, p));
    assert_eq!(
        h.get("state").map(String::as_str),
        Some("degraded"),
        "{h:?}"
    );
    let body = daemon.metrics().await;
    assert_eq!(
        metric_sum(&body, "tokenwarden_stale_writes_total", &[("provider", p)]),
        1.0
    );
    let stats = fake.stats().await;
    assert_eq!(
        n(&stats["calls"]),
        1,
        "only the gateway's call: the stale token was never sent"
    );
    assert_eq!(n(&stats["reuse"]), 0);
    println!(
        "unrepairable stale write: reported in {:.1} s (health reason: {}); token calls 1 (the gateway's), reuse 0",
        reported_in.as_secs_f64(),
        h.get("reason").map(String::as_str).unwrap_or("")
    );
    let mut secrets = Secrets::default();
    secrets.add_record(&snapshot);
    secrets.add(&rt1);
    secrets.add(&at1);
    secrets.assert_not_logged(&daemon);
}

/// Restoring a provider's journal chain writes its newest tokens, in one step, only where
/// the record holds a token the chain consumed: over any of them (not just the last), never
/// over a token the chain did not consume, "already there" once done, only the four token
/// fields, and nothing where the record is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_restore_writes_the_newest_tokens_only_over_a_consumed_one() {
    use tokenwarden::journal::chain::{restore, Restored};
    use tokenwarden::journal::{Entry, EntryId, FORMAT_VERSION};
    use tokenwarden::keys::ProviderId;
    use tokenwarden::refresh::reserve::token_digest;
    use tokenwarden::secret::Secret;

    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let mut aconn = tokenwarden::store::Connection::Node(redis.async_conn().await);
    let id = ProviderId::new(TENANT, "goto");
    let key = provider_key(TENANT, "goto");
    let fields = [
        ("provider_type", "goto"),
        ("status", "active"),
        ("client_id", "cid"),
        ("client_secret", "secret-value-1"),
        ("refresh_token", "rt-value-1"),
        ("access_token", "at-value-1"),
        ("token_expiry", "2026-12-01T10:00:00+00:00"),
        ("scopes", "[\"a\"]"),
        ("updated_at", "2026-12-01T09:00:00+00:00"),
    ];
    seed_provider(&mut conn, TENANT, "goto", &fields);
    let entry = |old: (&str, &str), new_at: &str, new_rt: Option<&str>, n: i64| Entry {
        id: EntryId::random(),
        version: FORMAT_VERSION,
        created_at: Utc::now() + chrono::TimeDelta::seconds(n),
        tenant: TENANT.into(),
        provider: "goto".into(),
        old_refresh_token: Secret::new(old.0),
        old_access_token: Secret::new(old.1),
        access_token: Secret::new(new_at),
        refresh_token: new_rt.map(Secret::new),
        token_expiry: format!("2026-12-01T1{n}:00:00+00:00"),
        updated_at: format!("2026-12-01T1{n}:30:00+00:00"),
        expires_at: Utc::now(),
        refresh_token_expires_at: None,
    };
    // rt-1 -> rt-2 -> rt-3 -> rt-4, each answer rotating the refresh token.
    let entries = [
        entry(
            ("rt-value-1", "at-value-1"),
            "at-value-2",
            Some("rt-value-2"),
            1,
        ),
        entry(
            ("rt-value-2", "at-value-2"),
            "at-value-3",
            Some("rt-value-3"),
            2,
        ),
        entry(
            ("rt-value-3", "at-value-3"),
            "at-value-4",
            Some("rt-value-4"),
            3,
        ),
    ];
    let chain: Vec<&Entry> = entries.iter().collect();
    let newest = |conn: &mut redis::Connection| {
        let mut want: HashMap<String, String> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in [
            ("refresh_token", "rt-value-4"),
            ("access_token", "at-value-4"),
            ("token_expiry", "2026-12-01T13:00:00+00:00"),
            ("updated_at", "2026-12-01T13:30:00+00:00"),
        ] {
            want.insert(k.into(), v.into());
        }
        assert_eq!(
            hgetall(conn, &key),
            want,
            "the newest tokens, only the four token fields"
        );
    };
    // The record holds the first token: the newest are written, not the entry after it.
    let w = restore(&mut aconn, &id, &chain, None).await.expect("redis");
    assert_eq!(w, Restored::Written);
    newest(&mut conn);
    assert_eq!(
        restore(&mut aconn, &id, &chain, None).await.expect("redis"),
        Restored::AlreadyThere
    );
    // Back to a token in the middle (consumed too): the newest again.
    seed_provider(&mut conn, TENANT, "goto", &fields);
    redis::cmd("HSET")
        .arg(&key)
        .arg("refresh_token")
        .arg("rt-value-3")
        .arg("access_token")
        .arg("at-value-3")
        .query::<()>(&mut conn)
        .expect("HSET");
    assert_eq!(
        restore(&mut aconn, &id, &chain, None).await.expect("redis"),
        Restored::Written
    );
    newest(&mut conn);
    // A token the chain never consumed (a re-authorisation, another replica): left alone.
    redis::cmd("HSET")
        .arg(&key)
        .arg("refresh_token")
        .arg("rt-third-value")
        .query::<()>(&mut conn)
        .expect("HSET");
    assert_eq!(
        restore(&mut aconn, &id, &chain, None).await.expect("redis"),
        Restored::Other
    );
    assert_eq!(
        hget(&mut conn, &key, "refresh_token").as_deref(),
        Some("rt-third-value")
    );
    // Named by a repair as the stale token, though the chain never consumed it: said so.
    let third = token_digest("rt-third-value");
    assert_eq!(
        restore(&mut aconn, &id, &chain, Some(&third))
            .await
            .expect("redis"),
        Restored::StillStale
    );
    let other = token_digest("rt-fourth-value");
    assert_eq!(
        restore(&mut aconn, &id, &chain, Some(&other))
            .await
            .expect("redis"),
        Restored::Other
    );
    assert_eq!(
        hget(&mut conn, &key, "refresh_token").as_deref(),
        Some("rt-third-value")
    );
    // An answer without a refresh token keeps the one it started from: over rt-1 (consumed
    // by the first entry) the chain writes rt-2 with the newest access token; a record
    // holding rt-2 with another access token than the one that answer started from is left
    // alone (rt-2 was not consumed).
    let kept = [
        entry(
            ("rt-value-1", "at-value-1"),
            "at-value-2",
            Some("rt-value-2"),
            1,
        ),
        entry(("rt-value-2", "at-value-2"), "at-value-3", None, 2),
    ];
    let kept: Vec<&Entry> = kept.iter().collect();
    seed_provider(&mut conn, TENANT, "goto", &fields);
    assert_eq!(
        restore(&mut aconn, &id, &kept, None).await.expect("redis"),
        Restored::Written
    );
    assert_eq!(
        hget(&mut conn, &key, "refresh_token").as_deref(),
        Some("rt-value-2")
    );
    assert_eq!(
        hget(&mut conn, &key, "access_token").as_deref(),
        Some("at-value-3")
    );
    redis::cmd("HSET")
        .arg(&key)
        .arg("access_token")
        .arg("at-from-the-gateway")
        .query::<()>(&mut conn)
        .expect("HSET");
    assert_eq!(
        restore(&mut aconn, &id, &kept, None).await.expect("redis"),
        Restored::Other
    );
    redis::cmd("HSET")
        .arg(&key)
        .arg("access_token")
        .arg("at-value-2")
        .query::<()>(&mut conn)
        .expect("HSET");
    assert_eq!(
        restore(&mut aconn, &id, &kept, None).await.expect("redis"),
        Restored::Written,
        "the state the answer without a refresh token started from"
    );
    redis::cmd("DEL")
        .arg(&key)
        .query::<()>(&mut conn)
        .expect("DEL");
    assert_eq!(
        restore(&mut aconn, &id, &chain, None).await.expect("redis"),
        Restored::Gone
    );
    assert_eq!(
        support::seed::key_type(&mut conn, &key),
        "none",
        "nothing recreated"
    );
}
