//! One replica alone against `FLEET_REPLICAS` replicas sharing the fleet (`replica.share_fleet`,
//! the default): time to ready, resident memory per replica and per provider, idle CPU and the
//! `/metrics` scrape, at each size. This is the measurement for the large sizes
//! (`FLEET_SIZES=1000000 FLEET_REPLICAS=4`): it runs instead of the full table. Health probes
//! are off in both runs (the endpoint would need a live access token per record, and at a
//! million records the probes, about 60 µs of daemon CPU each, are their own cost: see
//! `idle.rs`).

use std::time::{Duration, Instant};

use anyhow::Result;
use chrono::{TimeDelta, Utc};

use crate::idle::cpu_over;
use crate::memory::per_provider_bytes;
use crate::ready::{spawn_daemon, time_to_ready};
use crate::records::{py_iso, seed, Group, Seeding};
use crate::scan::redis_benchmark;
use crate::support::metrics::metric;
use crate::support::Daemon;
use crate::{ms, Bench};

const STOP_GRACE: Duration = Duration::from_secs(60);

/// What one replica costs.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    pub ready_s: f64,
    pub owned: f64,
    pub rss_mb: f64,
    pub per_provider_b: f64,
    pub idle_cpu: f64,
    pub scrape_ms: f64,
    pub scrape_mb: f64,
}

/// One size: seeding, one replica alone, then `k` sharing.
#[derive(Debug, Default)]
pub struct ReplicaRow {
    pub n: usize,
    pub keys: u64,
    pub seed_s: f64,
    pub alone: Sample,
    pub shared: Vec<Sample>,
    /// Spawn of the first to the last replica ready.
    pub shared_ready_s: f64,
    /// Every start of one replica alone to ready (`FLEET_READY_RUNS`); `alone.ready_s` is
    /// their median.
    pub alone_ready_runs: Vec<f64>,
    /// The Redis limit of the reads a start needs: N pipelined `HGETALL`s of one record by
    /// `redis-benchmark -P 16`, 50 clients and 1 client, in seconds.
    pub limit_s: (f64, f64),
}

fn env() -> Vec<(&'static str, String)> {
    vec![("TOKENWARDEN_HEALTH_ENABLED", "false".into())]
}

async fn sample(b: &mut Bench, d: &Daemon, n_owned_of: usize, baseline_mb: f64) -> Sample {
    let mut s = Sample::default();
    let body = d.metrics().await;
    s.owned = metric(&body, "tokenwarden_owned_providers", &[]).unwrap_or(f64::NAN);
    let owned = if s.owned.is_finite() && s.owned > 0.0 {
        s.owned as usize
    } else {
        n_owned_of
    };
    let started = Instant::now();
    let body = d.metrics().await;
    s.scrape_ms = ms(started.elapsed());
    s.scrape_mb = body.len() as f64 / 1e6;
    drop(body);
    let (cpu, _) = cpu_over(b, &[d.pid()], b.opts.idle_secs).await;
    s.idle_cpu = cpu[0];
    s.rss_mb = d.rss_mb();
    s.per_provider_b = per_provider_bytes(s.rss_mb, baseline_mb, owned.max(1));
    s
}

pub async fn measure(b: &mut Bench, n: usize, k: usize, baseline_mb: f64) -> Result<ReplicaRow> {
    let mut row = ReplicaRow {
        n,
        ..ReplicaRow::default()
    };
    b.flush().await?;
    let group = Group { prefix: "r", n };
    let far = py_iso(Utc::now() + TimeDelta::hours(20));
    let far_fn = move |_: usize| far.clone();
    let started = Instant::now();
    seed(
        &mut b.conn,
        &Seeding {
            group: &group,
            gen: 0,
            endpoint: "http://127.0.0.1:9",
            expiry: &far_fn,
            health: true,
        },
    )
    .await?;
    row.seed_s = started.elapsed().as_secs_f64();
    row.keys = redis::cmd("DBSIZE").query_async(&mut b.conn).await?;
    eprintln!(
        "seeded {n} providers ({} keys) in {:.1} s",
        row.keys, row.seed_s
    );

    let record = group.id(0).record_key();
    let limit = |one_client: bool| {
        redis_benchmark(b.redis.port(), &record, n, one_client)
            .map_or(f64::NAN, |rps| n as f64 / rps)
    };
    row.limit_s = (limit(false), limit(true));
    eprintln!(
        "redis limit: {n} HGETALL in {:.3} s (50 clients), {:.3} s (1 client)",
        row.limit_s.0, row.limit_s.1
    );
    // Starts to ready but the last: each stopped once ready (its heartbeat cleared).
    for run in 1..b.opts.ready_runs {
        let d = spawn_daemon(b, &format!("alone-{n}-start-{run}"), &env())?;
        row.alone_ready_runs.push(time_to_ready(&d).await);
        d.terminate(STOP_GRACE).await;
        redis::cmd("DEL")
            .arg("tokenwarden:replicas")
            .query_async::<()>(&mut b.conn)
            .await?;
    }
    let alone = spawn_daemon(b, &format!("alone-{n}"), &env())?;
    row.alone_ready_runs.push(time_to_ready(&alone).await);
    eprintln!(
        "one replica alone, start to ready: {:?}",
        row.alone_ready_runs
    );
    let mut sorted = row.alone_ready_runs.clone();
    sorted.sort_by(f64::total_cmp);
    row.alone.ready_s = sorted[sorted.len() / 2];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ready_s = row.alone.ready_s;
    row.alone = sample(b, &alone, n, baseline_mb).await;
    row.alone.ready_s = ready_s;
    alone.assert_running();
    alone.terminate(STOP_GRACE).await;
    eprintln!("one replica: {:?}", row.alone);

    // The alone run's heartbeat is gone once it stopped; wait out its TTL so that the
    // shared run's replicas do not count it.
    redis::cmd("DEL")
        .arg("tokenwarden:replicas")
        .query_async::<()>(&mut b.conn)
        .await?;
    let spawned = Instant::now();
    let mut daemons = Vec::new();
    for i in 0..k {
        daemons.push(spawn_daemon(b, &format!("shared-{n}-{i}"), &env())?);
    }
    let mut ready = Vec::new();
    for d in &daemons {
        ready.push(time_to_ready(d).await);
    }
    row.shared_ready_s = spawned.elapsed().as_secs_f64();
    // Shares settle once every replica saw the others' heartbeats.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (d, r) in daemons.iter().zip(ready) {
        // A replica that died shows its log tail here, not as a failed scrape.
        d.assert_running();
        let mut s = sample(b, d, n / k, baseline_mb).await;
        s.ready_s = r;
        d.assert_running();
        eprintln!("shared: {s:?}");
        row.shared.push(s);
    }
    for d in &daemons {
        d.terminate(STOP_GRACE).await;
    }
    Ok(row)
}

pub fn print(machine: &str, idle_secs: u64, baseline_mb: f64, rows: &[ReplicaRow]) {
    println!("\n## One replica alone and replicas sharing the fleet ({machine})\n");
    println!(
        "Health probes off; idle CPU over {idle_secs} s; per provider over the empty-registry daemon ({baseline_mb:.1} MB).\n"
    );
    println!("| N | run | ready (s) | owned providers | RSS (MB) | per provider (B) | idle CPU (% of a core) | /metrics (ms, MB) |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let line = |run: &str, s: &Sample| {
            println!(
                "| {} | {run} | {:.2} | {:.0} | {:.1} | {:.0} | {:.2} | {:.0}, {:.1} |",
                r.n,
                s.ready_s,
                s.owned,
                s.rss_mb,
                s.per_provider_b,
                s.idle_cpu,
                s.scrape_ms,
                s.scrape_mb
            )
        };
        line("alone", &r.alone);
        for (i, s) in r.shared.iter().enumerate() {
            line(&format!("replica {} of {}", i + 1, r.shared.len()), s);
        }
        let runs: Vec<String> = r
            .alone_ready_runs
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect();
        let target = 2.0 * r.limit_s.0 + 1.0;
        println!(
            "| {} | one alone, start to ready: median {:.2} s of {} starts ({}); Redis limit {:.3} s (50 clients), {:.3} s (1 client); target 2x limit + 1 s = {:.2} s: {} | | | | | | |",
            r.n,
            r.alone.ready_s,
            runs.len(),
            runs.join(", "),
            r.limit_s.0,
            r.limit_s.1,
            target,
            if r.alone.ready_s <= target { "met" } else { "MISSED" }
        );
        let total: f64 = r.shared.iter().map(|s| s.rss_mb).sum();
        println!(
            "| {} | {} sharing: all ready after {:.2} s; RSS summed {:.1} MB ({:.2}x one alone); seeded {} keys in {:.0} s | | | | | | |",
            r.n,
            r.shared.len(),
            r.shared_ready_s,
            total,
            total / r.alone.rss_mb,
            r.keys,
            r.seed_s
        );
    }
}
