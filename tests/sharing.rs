//! Replicas share the fleet: each tenant is served by exactly one live replica (rendezvous
//! hashing over the heartbeats), a killed replica's tenants are taken over in time, and a
//! rolling restart keeps every token refreshed. Real `redis-server`, the strict fake provider,
//! three real daemons.

mod support;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use support::metrics::metric_sum;
use support::{
    oauth_record, provider_key, seed_provider, seed_tenant_config, unique_temp_dir, Daemon,
    FakeProvider, RedisServer,
};

const TENANTS: usize = 60;
const TOKEN_SECS: u64 = 6;

const ENV: [(&str, &str); 10] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
    ("TOKENWARDEN_REFRESH_RETRY_MAX_SECS", "2"),
    ("TOKENWARDEN_REFRESH_LOCK_BUSY_RETRY_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_SECS", "1"),
    ("TOKENWARDEN_REPLICA_HEARTBEAT_TTL_SECS", "4"),
    ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "500"),
    ("TOKENWARDEN_REDIS_PING_INTERVAL_MS", "500"),
    ("TOKENWARDEN_SHUTDOWN_DRAIN_DEADLINE_SECS", "5"),
];

fn tenant(i: usize) -> String {
    format!("share-{i:02}")
}

fn client_id(i: usize) -> String {
    format!("client-share-{i:02}")
}

fn u64_of(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

struct Fleet {
    redis: RedisServer,
    fake: FakeProvider,
    states: Vec<std::path::PathBuf>,
    daemons: Vec<Option<Daemon>>,
}

impl Fleet {
    async fn new() -> Fleet {
        let redis = RedisServer::start();
        let fake = FakeProvider::start(TOKEN_SECS);
        let mut conn = redis.conn();
        let clients: Vec<Value> = (0..TENANTS)
            .map(|i| {
                json!({
                    "client_id": client_id(i),
                    "client_secret": format!("secret-{i}"),
                    "refresh_token": format!("rt-seed-{i}"),
                })
            })
            .collect();
        fake.seed_many(&clients).await;
        for i in 0..TENANTS {
            seed_tenant_config(&mut conn, &tenant(i));
            let expiry = Utc::now() + chrono::TimeDelta::milliseconds(fastrand::i64(500..6_000));
            let record = oauth_record(
                &fake,
                &client_id(i),
                &format!("secret-{i}"),
                &format!("rt-seed-{i}"),
                &expiry.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string(),
            );
            seed_provider(&mut conn, &tenant(i), "goto", &record);
        }
        // Replica ids kept in each state directory (as a StatefulSet pod keeps its own), so
        // the shares checked below are the same in every run.
        let states = (0..3)
            .map(|i| {
                let dir = unique_temp_dir(&format!("share-{i}"));
                std::fs::create_dir_all(&dir).expect("state dir");
                std::fs::write(dir.join("replica-id"), format!("share-replica-{i}\n"))
                    .expect("replica-id");
                dir
            })
            .collect();
        let mut f = Fleet {
            redis,
            fake,
            states,
            daemons: vec![None, None, None],
        };
        for i in 0..3 {
            f.start(i);
        }
        for d in f.daemons.iter().flatten() {
            d.wait_ready(Duration::from_secs(15)).await;
        }
        f
    }

    fn start(&mut self, i: usize) {
        let state = self.states[i].display().to_string();
        let mut env = ENV.to_vec();
        env.push(("TOKENWARDEN_STATE_DIR", &state));
        self.daemons[i] = Some(Daemon::start(&self.redis, &env));
    }

    /// `owned_providers` of each running replica.
    async fn shares(&self) -> Vec<(usize, f64, f64)> {
        let mut out = Vec::new();
        for (i, d) in self.daemons.iter().enumerate() {
            if let Some(d) = d {
                let m = d.metrics().await;
                out.push((
                    i,
                    metric_sum(&m, "tokenwarden_owned_providers", &[]),
                    metric_sum(&m, "tokenwarden_replicas", &[]),
                ));
            }
        }
        out
    }

    /// Waits until the running replicas' shares add up to every provider, each seeing
    /// `replicas` live replicas; returns how long it took.
    async fn wait_shared(&self, replicas: f64, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let shares = self.shares().await;
            let total: f64 = shares.iter().map(|s| s.1).sum();
            if total == TENANTS as f64 && shares.iter().all(|s| s.2 == replicas) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "shares never added up to {TENANTS} over {replicas} replicas: {shares:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every token's expiry now (`None` for unreadable ones).
    fn expiries(&self) -> Vec<Option<DateTime<Utc>>> {
        let mut conn = self.redis.conn();
        (0..TENANTS)
            .map(|i| {
                redis::cmd("HGET")
                    .arg(provider_key(&tenant(i), "goto"))
                    .arg("token_expiry")
                    .query::<Option<String>>(&mut conn)
                    .ok()
                    .flatten()
                    .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
                    .map(|d| d.with_timezone(&Utc))
            })
            .collect()
    }

    /// The longest any token stays expired while `during` runs.
    async fn worst_expired_during(&self, during: Duration) -> Duration {
        let until = Instant::now() + during;
        let mut worst = Duration::ZERO;
        while Instant::now() < until {
            let now = Utc::now();
            for e in self.expiries().into_iter().flatten() {
                if e < now {
                    worst = worst.max((now - e).to_std().unwrap_or_default());
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        worst
    }

    async fn reuses(&self) -> u64 {
        u64_of(&self.fake.stats_summary().await, "reuse")
    }
}

#[tokio::test]
async fn three_replicas_share_the_fleet_fairly_and_a_killed_ones_tenants_are_taken_over() {
    let mut f = Fleet::new().await;
    let took = f.wait_shared(3.0, Duration::from_secs(20)).await;
    let shares = f.shares().await;
    println!("shares of {TENANTS} providers over 3 replicas: {shares:?} (settled in {took:?})");
    for (i, owned, _) in &shares {
        assert!(
            (8.0..=35.0).contains(owned),
            "replica {i} owns {owned} of {TENANTS}: {shares:?}"
        );
    }
    // Tokens keep being refreshed, each by its one owner.
    let worst = f.worst_expired_during(Duration::from_secs(8)).await;
    assert!(
        worst < Duration::from_secs(3),
        "a token stayed expired {worst:?}"
    );

    // One replica dies: its tenants are taken over within 30 s, and refreshed.
    let victim = fastrand::usize(0..3);
    if let Some(d) = f.daemons[victim].take() {
        d.sigkill();
        d.wait_exit(Duration::from_secs(5));
    }
    let killed = Instant::now();
    let takeover = f.wait_shared(2.0, Duration::from_secs(30)).await;
    println!(
        "replica {victim} SIGKILLed: its tenants taken over in {:?}",
        killed.elapsed()
    );
    assert!(takeover <= Duration::from_secs(30));
    let worst_after = f.worst_expired_during(Duration::from_secs(8)).await;
    println!("after the takeover, worst time a token stayed expired: {worst_after:?}");
    assert!(
        worst_after < Duration::from_secs(15),
        "a taken-over token stayed expired {worst_after:?}"
    );
    assert_eq!(f.reuses().await, 0, "a refresh token was sent twice");
    let mut conn = f.redis.conn();
    let live: Vec<String> = redis::cmd("ZRANGE")
        .arg("tokenwarden:replicas")
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .unwrap_or_default();
    assert_eq!(live.len(), 2, "{live:?}");
    f.start(victim);
    if let Some(d) = &f.daemons[victim] {
        d.wait_ready(Duration::from_secs(15)).await;
    }
    let back = f.wait_shared(3.0, Duration::from_secs(20)).await;
    println!(
        "replica {victim} back: shares {:?} after {back:?}",
        f.shares().await
    );
    assert_eq!(f.reuses().await, 0, "a refresh token was sent twice");
}

#[tokio::test]
async fn a_rolling_restart_of_all_three_keeps_every_token_refreshed() {
    let mut f = Fleet::new().await;
    f.wait_shared(3.0, Duration::from_secs(20)).await;
    let mut worst = Duration::ZERO;
    for i in 0..3 {
        if let Some(d) = f.daemons[i].take() {
            d.sigterm();
            assert_eq!(d.wait_exit(Duration::from_secs(10)), Some(0));
        }
        worst = worst.max(f.worst_expired_during(Duration::from_secs(2)).await);
        f.start(i);
        if let Some(d) = &f.daemons[i] {
            d.wait_ready(Duration::from_secs(15)).await;
        }
        f.wait_shared(3.0, Duration::from_secs(20)).await;
        worst = worst.max(f.worst_expired_during(Duration::from_secs(2)).await);
    }
    println!("rolling restart of 3 replicas: worst time a token stayed expired {worst:?}");
    assert!(
        worst < Duration::from_secs(4),
        "a token stayed expired {worst:?}"
    );
    assert_eq!(f.reuses().await, 0, "a refresh token was sent twice");
}
