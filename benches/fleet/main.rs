//! Fleet benchmark: what tokenwarden costs at 1k, 10k and 100k tracked providers.
//!
//! ```text
//! cargo bench --bench fleet                        # FLEET_SIZES=1000,10000,100000
//! FLEET_SIZES=1000 cargo bench --bench fleet       # the smoke run CI does
//! ```
//!
//! It starts its own `redis-server` (a free port, `--save '' --appendonly no`), the
//! `tokenwarden-fake-provider` token endpoint and the real `tokenwarden` binary, seeds
//! records shaped like the gateway's (SPEC 1.3: four provider types per tenant, a
//! JWT-sized access token, a health hash per record), and for each size N measures:
//!
//! - registry scan and parse in process with the library (`Registry::discover` +
//!   `read_records`), its Redis round trips, against a naive scan (`KEYS` + one `HGETALL`
//!   per record) and against the physical limit measured in the same run (a raw pipelined
//!   `HGETALL` of every record, batches of 1000, no parsing; and `redis-benchmark -P 16`);
//! - the daemon: start to `/readyz` 200, resident memory (`/proc/PID/status`), idle CPU
//!   (`/proc/PID/stat`) with every token far in the future, `/metrics` scrape time and size
//!   with per-provider series on and off;
//! - refresh throughput: N expired tokens, end to end (lock, token call, compare-and-set
//!   write-back) counted by the daemon's own `token_refresh_total{result="success"}`, at
//!   `refresh.max_concurrent` 64 (the default) and 256;
//! - scheduling lateness: 1,000 tokens due at the same instant, then 1,000 due within one
//!   second, with N other tokens tracked. The actual start of each refresh is the moment its
//!   lock key is set (a `__keyevent@0__:set` notification), the planned start is the
//!   `next_refresh_at` the daemon wrote into the health hash.
//!
//! It prints a Markdown table and, for every target, `met` or `MISSED`. A broken setup (no
//! `redis-server`, a daemon that exits or never gets ready, refreshes that stall) exits
//! non-zero; a missed target does not. Environment: `FLEET_SIZES` (comma separated),
//! `FLEET_IDLE_SECS` (idle CPU window, default 10), `FLEET_BURST` (default 1000),
//! `FLEET_DAEMON_ENV` (`K=V,K=V` added to every daemon's environment, for experiments),
//! `FLEET_SCAN_BATCH` (batch of the in-process library scan, default 2000 as configured),
//! `FLEET_REPLICAS` (one replica alone against this many sharing the fleet, instead of the
//! full table: `replicas.rs`, for the large sizes),
//! `FLEET_PERF_DIR` (record `perf` profiles of each phase there; the numbers of such a run
//! are perturbed by the profiler and only the profiles are meant to be read).
//!
//! Other load on the machine skews every number: the table shows the CPU used by processes
//! that are not part of the benchmark while refreshing ("foreign CPU").
//!
//! The processes come from the test kit (`tests/support/`); the fake provider is an example,
//! built with `cargo build --release --example tokenwarden-fake-provider` (`cargo bench`
//! does not build examples). One file per measurement: `scan.rs`, `ready.rs`, `memory.rs`,
//! `idle.rs`, `scrape.rs`, `throughput.rs`, `lateness.rs`; the records in `records.rs`, the
//! table in `report.rs`, profiles in `perf.rs`.

#[path = "../../tests/support/mod.rs"]
mod support;

mod idle;
mod lateness;
mod memory;
mod perf;
mod ready;
mod records;
mod replicas;
mod report;
mod scan;
mod scrape;
mod throughput;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use chrono::{TimeDelta, Utc};
use redis::aio::MultiplexedConnection;

use records::{py_iso, seed, Group, Seeding};
use report::Row;
use support::process::{clk_tck, TempDir};
use support::{FakeProvider, RedisServer};

/// `registry.scan_batch` default (config/tokenwarden.toml).
const SCAN_BATCH: usize = 2000;
/// The slow-endpoint runs: token answer delay and tokens due.
const SLOW_ENDPOINT_MS: u64 = 100;
const SLOW_TOKENS: usize = 2000;
/// Access token lifetime at the token endpoint (its default).
pub const FAKE_TTL_SECS: u64 = 3600;

fn main() -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fleet benchmark: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fleet benchmark: setup broken: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// -----------------------------------------------------------------------------------------
// Options

pub struct Options {
    pub sizes: Vec<usize>,
    pub idle_secs: u64,
    pub burst: usize,
    pub perf_dir: Option<PathBuf>,
    pub scan_batch: usize,
    /// `FLEET_REPLICAS`: measure one replica alone against this many sharing, instead of
    /// the full table (0: the full table).
    pub replicas: usize,
    /// `FLEET_READY_RUNS`: starts of one replica alone timed in the replicas mode (median).
    pub ready_runs: usize,
}

impl Options {
    fn from_env() -> Result<Options> {
        let sizes = match std::env::var("FLEET_SIZES") {
            Ok(s) if !s.trim().is_empty() => s
                .split(',')
                .map(|v| {
                    v.trim()
                        .replace('_', "")
                        .parse::<usize>()
                        .map_err(|e| anyhow!("FLEET_SIZES: {v:?}: {e}"))
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![1_000, 10_000, 100_000],
        };
        if sizes.iter().any(|&n| n < 4) {
            bail!("FLEET_SIZES: every size must be at least 4");
        }
        let num = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => {
                    v.trim().parse().map_err(|e| anyhow!("{name}: {v:?}: {e}"))
                }
                _ => Ok(default),
            }
        };
        Ok(Options {
            sizes,
            idle_secs: num("FLEET_IDLE_SECS", 10)?.max(1),
            burst: (num("FLEET_BURST", 1000)? as usize).max(4),
            scan_batch: (num("FLEET_SCAN_BATCH", SCAN_BATCH as u64)? as usize).max(1),
            replicas: num("FLEET_REPLICAS", 0)? as usize,
            ready_runs: (num("FLEET_READY_RUNS", 3)? as usize).max(1),
            perf_dir: std::env::var_os("FLEET_PERF_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
        })
    }
}

// -----------------------------------------------------------------------------------------
// The run

/// What every measurement shares: the options, one redis-server, a connection to it, and a
/// directory for the daemons' logs.
pub struct Bench {
    pub opts: Options,
    pub dir: TempDir,
    pub redis: RedisServer,
    pub redis_pid: u32,
    pub conn: MultiplexedConnection,
    pub clk_tck: u64,
}

impl Bench {
    pub async fn flush(&mut self) -> Result<()> {
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }
}

/// A counter of the token endpoint's `/stats` (0 if absent).
pub fn stat(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

async fn run() -> Result<()> {
    let opts = Options::from_env()?;
    let dir = TempDir::new("fleet");
    let redis = RedisServer::start();
    let redis_pid = redis
        .pid()
        .ok_or_else(|| anyhow!("redis-server has no process id"))?;
    let conn = redis.async_conn().await;
    let mut b = Bench {
        opts,
        dir,
        redis,
        redis_pid,
        conn,
        clk_tck: clk_tck(),
    };
    let machine = machine();
    eprintln!("fleet benchmark: {machine}");
    eprintln!(
        "sizes {:?}, idle window {} s, burst {}",
        b.opts.sizes, b.opts.idle_secs, b.opts.burst
    );

    // A daemon with nothing to track: the memory baseline.
    let baseline_mb = memory::baseline(&mut b).await?;

    if b.opts.replicas > 0 {
        let k = b.opts.replicas;
        let mut rows = Vec::new();
        for n in b.opts.sizes.clone() {
            eprintln!(
                "\n== N = {n}, one replica alone and {} sharing ==",
                b.opts.replicas
            );
            rows.push(replicas::measure(&mut b, n, k, baseline_mb).await?);
        }
        replicas::print(&machine, b.opts.idle_secs, baseline_mb, &rows);
        return Ok(());
    }
    let mut rows = Vec::new();
    for n in b.opts.sizes.clone() {
        eprintln!("\n== N = {n} ==");
        let row = measure(&mut b, n, baseline_mb).await?;
        rows.push(row);
    }
    // Against a slow endpoint (real providers answer in 100-300 ms), what bounds throughput
    // is how many token calls can be in flight.
    // As many tokens as the largest fleet, at most SLOW_TOKENS (the CI smoke stays short).
    let slow_tokens = SLOW_TOKENS.min(b.opts.sizes.iter().copied().max().unwrap_or(SLOW_TOKENS));
    eprintln!("\n== endpoint latency {SLOW_ENDPOINT_MS} ms, {slow_tokens} tokens due ==");
    let mut slow = Vec::new();
    for (gen, concurrency) in [(5u32, 64usize), (6, 256)] {
        slow.push(
            throughput::throughput_with_delay(
                &mut b,
                slow_tokens,
                concurrency,
                gen,
                SLOW_ENDPOINT_MS,
            )
            .await?,
        );
    }
    report::print_report(&machine, &b.opts, baseline_mb, &rows);
    println!(
        "\n### Refresh throughput against an endpoint answering in {SLOW_ENDPOINT_MS} ms ({slow_tokens} tokens due)\n"
    );
    println!("| max_concurrent | refreshes/s (steady) | token calls in flight at the endpoint (max) | bound max_concurrent / latency |");
    println!("|---:|---:|---:|---:|");
    for t in &slow {
        println!(
            "| {} | {:.0}/s | {} | {:.0}/s |",
            t.concurrency,
            t.steady_rps,
            t.max_in_flight,
            t.concurrency as f64 * 1000.0 / SLOW_ENDPOINT_MS as f64
        );
    }
    Ok(())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split_once(':')
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cores} cores, {model}, {:.1} GiB RAM",
        mem_kb as f64 / 1024.0 / 1024.0
    )
}

async fn measure(b: &mut Bench, n: usize, baseline_mb: f64) -> Result<Row> {
    let mut row = Row {
        n,
        ..Row::default()
    };
    let main = Group { prefix: "t", n };
    let far = py_iso(Utc::now() + TimeDelta::hours(20));
    let far_fn = move |_: usize| far.clone();

    // ---- registry scans, in process ----
    b.flush().await?;
    let fake = FakeProvider::start(FAKE_TTL_SECS);
    let started = Instant::now();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen: 0,
            endpoint: &fake.url(),
            expiry: &far_fn,
            health: true,
        },
    )
    .await?;
    row.redis_keys = redis::cmd("DBSIZE").query_async(&mut b.conn).await?;
    fake.seed_many(&main.fake_clients(0, true)).await;
    eprintln!(
        "seeded {n} providers ({} keys) in {:.1} s",
        row.redis_keys,
        started.elapsed().as_secs_f64()
    );
    scan::measure(b, n, &main, &mut row).await?;

    // ---- the daemon, every token far in the future ----
    idle::default_config(b, n, &fake, baseline_mb, &mut row).await?;
    idle::change_scan_alone(b, n, &mut row).await?;
    idle::notifications(b, n, &mut row).await?;
    drop(fake);

    // ---- lateness ----
    row.lateness = Some(lateness::lateness(b, n).await?);

    // ---- refresh throughput ----
    for (gen, concurrency) in [(1u32, 64usize), (2, 256)] {
        row.throughput
            .push(throughput::throughput(b, n, concurrency, gen).await?);
    }
    Ok(row)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
