//! The sync scheduler's cost at 50,000 tenants, idle.
//!
//! ```text
//! cargo bench --bench sync_scheduler                  # SYNC_BENCH_TENANTS=50000
//! SYNC_BENCH_TENANTS=1000 SYNC_BENCH_IDLE_SECS=3 cargo bench --bench sync_scheduler
//! ```
//!
//! It starts its own `redis-server`, seeds N tenants (`tenant:{t}:providers` and a
//! `tenant:{t}:config` with a `sync_schedule` and one of several IANA zones), then measures
//! in this process, with the library:
//! - the pure deadline queue ([`tokenwarden::sync::Queue`]): the first `update` of N
//!   tenants (every next run computed with crontab semantics in the tenant's zone), an
//!   `update` with nothing changed (what each periodic re-read costs besides Redis), and
//!   popping one full day of due runs of the default `*/15` schedule;
//! - the real scheduler task (`tokenwarden::sync::run`) over the seeded Redis, idle (every
//!   tenant's next run hours away), with its `tokio-cron-scheduler` job re-reading every
//!   tenant's config every `SYNC_BENCH_REREAD_SECS` (default 60, as configured): CPU of
//!   this process (getrusage) and of `redis-server` over `SYNC_BENCH_IDLE_SECS` (default
//!   65, so the window holds a re-read), as a share of one core.
//!
//! Target: under 1 % of a core for the scheduler at 50,000 tenants.

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokenwarden::config::Config;
use tokenwarden::sync::schedule::Cron;
use tokenwarden::sync::{Queue, TenantConf};
use tokio_util::sync::CancellationToken;

const ZONES: [&str; 5] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Sydney",
];

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn confs(n: usize, schedule: &str) -> Vec<TenantConf> {
    (0..n)
        .map(|i| TenantConf {
            tenant: format!("tenant-{i:06}"),
            schedule: Some(schedule.to_string()),
            timezone: Some(ZONES[i % ZONES.len()].to_string()),
        })
        .collect()
}

fn main() {
    let n = env_num("SYNC_BENCH_TENANTS", 50_000) as usize;
    let idle_secs = env_num("SYNC_BENCH_IDLE_SECS", 65);
    let reread = env_num("SYNC_BENCH_REREAD_SECS", 60);
    println!("# sync scheduler, {n} tenants\n");
    println!("| measurement | value |\n| --- | --- |");

    // The pure queue.
    let now: DateTime<Utc> = Utc::now();
    let default = Cron::parse("*/15 * * * *").unwrap_or_else(|e| panic!("{e}"));
    let mut q = Queue::new(default.clone(), 300);
    let t = Instant::now();
    let bad = q.update(confs(n, "*/15 * * * *"), now);
    assert!(bad.is_empty());
    println!(
        "| queue: first update ({n} next runs, 5 zones) | {:.1} ms |",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    q.update(confs(n, "*/15 * * * *"), now);
    println!(
        "| queue: re-read with nothing changed | {:.1} ms |",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let mut fired = 0usize;
    let mut at = now;
    let end = now + chrono::Duration::days(1);
    while at < end {
        at += chrono::Duration::minutes(1);
        fired += q.pop_due(at).len();
    }
    println!(
        "| queue: one day of `*/15` runs popped and rescheduled | {fired} runs, {:.1} ms ({:.2} µs each) |",
        t.elapsed().as_secs_f64() * 1e3,
        t.elapsed().as_secs_f64() * 1e6 / fired.max(1) as f64
    );

    // The real task, idle, over Redis.
    let redis = support::RedisServer::start();
    {
        let mut conn = redis.conn();
        for chunk in (0..n).collect::<Vec<_>>().chunks(2000) {
            let mut pipe = redis::pipe();
            for i in chunk {
                let t = format!("tenant-{i:06}");
                pipe.cmd("SADD")
                    .arg(format!("tenant:{t}:providers"))
                    .arg("zoom")
                    .ignore();
                pipe.cmd("HSET")
                    .arg(format!("tenant:{t}:config"))
                    .arg("sync_schedule")
                    .arg("0 3 * * *")
                    .arg("timezone")
                    .arg(ZONES[i % ZONES.len()])
                    .ignore();
            }
            let _: () = pipe
                .query(&mut conn)
                .unwrap_or_else(|e| panic!("seed: {e}"));
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let mut env = std::collections::BTreeMap::new();
    env.insert("TOKENWARDEN_REDIS_URL".to_string(), redis.url());
    env.insert(
        "TOKENWARDEN_SYNC_CONFIG_REREAD_SECS".to_string(),
        reread.to_string(),
    );
    let config = Config::load_from(None, &env).unwrap_or_else(|e| panic!("config: {e}"));
    rt.block_on(async {
        let (ctx, _inboxes) = tokenwarden::daemon::context(config, None).unwrap_or_else(|e| panic!("{e}"));
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(tokenwarden::sync::run(Arc::clone(&ctx), cancel.clone()));
        // Startup: the first read of every tenant and their next runs.
        let cpu0 = cpu_secs();
        tokio::time::sleep(Duration::from_secs(3)).await;
        println!(
            "| task: start (first read of {n} tenants, 3 s window) | {:.2} s CPU |",
            cpu_secs() - cpu0
        );
        let redis_pid = redis.pid().unwrap_or(0);
        let r0 = support::process::cpu_ticks(redis_pid);
        let c0 = cpu_secs();
        let w0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(idle_secs)).await;
        let wall = w0.elapsed().as_secs_f64();
        let cpu = (cpu_secs() - c0) / wall * 100.0;
        let redis_cpu = (support::process::cpu_ticks(redis_pid) - r0) as f64
            / support::process::clk_tck() as f64
            / wall
            * 100.0;
        println!(
            "| task: idle CPU over {idle_secs} s (re-read every {reread} s) | {cpu:.2} % of a core ({}) |",
            if cpu < 1.0 { "met: < 1 %" } else { "MISSED: >= 1 %" }
        );
        println!("| redis-server CPU meanwhile (the re-reads) | {redis_cpu:.2} % of a core |");
        let rereads = (idle_secs / reread.max(1)).max(1);
        let per_reread = (cpu_secs() - c0) / rereads as f64;
        println!(
            "| task: CPU per re-read of {n} tenants (all idle CPU / {rereads} re-reads) | {:.0} ms |",
            per_reread * 1e3
        );
        cancel.cancel();
        let _ = task.await;
        let _ = started;
    });
}
