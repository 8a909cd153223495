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
//! `FLEET_SCAN_BATCH` (batch of the in-process library scan, default 500 as configured),
//! `FLEET_PERF_DIR` (record `perf` profiles of each phase there; the numbers of such a run
//! are perturbed by the profiler and only the profiles are meant to be read).
//!
//! Other load on the machine skews every number: the table shows the CPU used by processes
//! that are not part of the benchmark while refreshing ("foreign CPU").

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde_json::json;
use tokenwarden::config::RedisConfig;
use tokenwarden::keys::{self, KeyKind, ProviderId};
use tokenwarden::registry::record::RecordState;
use tokenwarden::registry::{parse_record_value, Members, ReadStats, Registry, RECORD_FIELDS};

/// Per-command (calls, µs) from `INFO commandstats`, and a count taken with them.
type CommandStatsAt = (HashMap<String, (u64, u64)>, u64);

/// `registry.scan_batch` default (config/tokenwarden.toml).
const SCAN_BATCH: usize = 500;
/// Batch of the raw pipelined read (the physical limit).
const RAW_BATCH: usize = 1000;
const PROVIDER_TYPES: [&str; 4] = ["goto", "teams", "ringcentral", "zoom"];
/// An expiry long past: due at once.
const EXPIRED: &str = "2025-01-15T11:30:00.123456";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// `schedule.lead_secs` of the lateness runs (see [`lateness`]).
const LATE_LEAD_SECS: u64 = 20;
/// The slow-endpoint runs: token answer delay and tokens due.
const SLOW_ENDPOINT_MS: u64 = 100;
const SLOW_TOKENS: usize = 2000;
/// A refresh run with no progress for this long is broken.
const STALL: Duration = Duration::from_secs(30);

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

struct Options {
    sizes: Vec<usize>,
    idle_secs: u64,
    burst: usize,
    perf_dir: Option<PathBuf>,
    scan_batch: usize,
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
            perf_dir: std::env::var_os("FLEET_PERF_DIR")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
        })
    }
}

// -----------------------------------------------------------------------------------------
// Processes

/// A child process, killed when dropped.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn terminate(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("tokenwarden-fleet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// (utime + stime) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: unexpected format"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state(0) ppid(1) ... utime(11) stime(12).
    let get = |i: usize| -> Result<u64> {
        f.get(i)
            .ok_or_else(|| anyhow!("/proc/{pid}/stat: short"))?
            .parse::<u64>()
            .map_err(|e| anyhow!("/proc/{pid}/stat: {e}"))
    };
    Ok(get(11)? + get(12)?)
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`).
fn status_kb(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {field}"))
}

/// Busy clock ticks of the whole machine (all CPUs), from `/proc/stat`.
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .next()
        .ok_or_else(|| anyhow!("/proc/stat is empty"))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(get(0) + get(1) + get(2) + get(5) + get(6) + get(7))
}

/// A `perf record` attached to one process, when `FLEET_PERF_DIR` is set.
struct Perf(Option<Proc>);

impl Perf {
    fn start(opts: &Options, pid: u32, name: &str) -> Perf {
        let Some(dir) = &opts.perf_dir else {
            return Perf(None);
        };
        let _ = std::fs::create_dir_all(dir);
        let out = dir.join(format!("{name}.data"));
        match Command::new("perf")
            .args([
                "record",
                "-q",
                "-F",
                "499",
                "--call-graph",
                "dwarf,16384",
                "-p",
            ])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => {
                eprintln!("perf: recording {name} into {}", out.display());
                Perf(Some(Proc { child }))
            }
            Err(e) => {
                eprintln!("perf: cannot run perf ({e}); no profile for {name}");
                Perf(None)
            }
        }
    }

    /// SIGINT makes perf write its data and exit.
    async fn stop(self) {
        if let Some(mut p) = self.0 {
            let _ = Command::new("kill")
                .arg("-INT")
                .arg(p.pid().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(120);
            while p.exited().is_none() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

// -----------------------------------------------------------------------------------------
// HTTP

#[derive(Clone)]
struct Http(reqwest::Client);

impl Http {
    fn new() -> Result<Http> {
        Ok(Http(
            reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(120))
                .build()?,
        ))
    }

    async fn get(&self, url: &str) -> Result<(u16, String)> {
        let resp = self.0.get(url).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }

    async fn post_json(&self, url: &str, body: &serde_json::Value) -> Result<(u16, String)> {
        let resp = self.0.post(url).json(body).send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.text().await?))
    }
}

// -----------------------------------------------------------------------------------------
// Redis

struct RedisServer {
    proc: Proc,
    port: u16,
}

impl RedisServer {
    async fn start(dir: &Path) -> Result<RedisServer> {
        let port = free_port()?;
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow!("cannot run redis-server ({e}); install it: apt-get install redis-server redis-tools")
            })?;
        let mut server = RedisServer {
            proc: Proc { child },
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = server.proc.exited() {
                bail!(
                    "redis-server exited ({st}):\n{}",
                    tail(&dir.join("redis.log"), 20)
                );
            }
            if let Ok(mut c) = server.conn(0).await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return Ok(server);
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {port} did not answer within 10 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    async fn conn(&self, db: u8) -> Result<MultiplexedConnection> {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(120)));
        Ok(redis::Client::open(self.url(db))?
            .get_multiplexed_async_connection_with_config(&cfg)
            .await?)
    }
}

async fn redis_commands(conn: &mut MultiplexedConnection) -> Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(conn).await?;
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("INFO stats has no total_commands_processed"))
}

/// `INFO commandstats`: command -> (calls, microseconds).
async fn commandstats(conn: &mut MultiplexedConnection) -> Result<HashMap<String, (u64, u64)>> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let mut out = HashMap::new();
    for line in info.lines() {
        let Some((name, rest)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let field = |key: &str| -> u64 {
            rest.split(',')
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        out.insert(name.to_string(), (field("calls"), field("usec")));
    }
    Ok(out)
}

/// Commands issued between two `commandstats` snapshots, most frequent first.
fn command_delta(
    before: &HashMap<String, (u64, u64)>,
    after: &HashMap<String, (u64, u64)>,
) -> Vec<(String, u64, u64)> {
    let mut out: Vec<(String, u64, u64)> = after
        .iter()
        .map(|(k, (c, u))| {
            let (c0, u0) = before.get(k).copied().unwrap_or((0, 0));
            (k.clone(), c.saturating_sub(c0), u.saturating_sub(u0))
        })
        .filter(|(_, c, _)| *c > 0)
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.1));
    out
}

async fn config_set(conn: &mut MultiplexedConnection, key: &str, value: &str) -> Result<()> {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

// -----------------------------------------------------------------------------------------
// Fake token endpoint

struct Fake {
    proc: Proc,
    base: String,
}

impl Fake {
    fn start() -> Result<Fake> {
        let bin = env!("CARGO_BIN_EXE_tokenwarden-fake-provider");
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {bin}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout from the fake provider"))?;
        let proc = Proc { child };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow!("the fake provider did not print its port within 10 s"))?;
        let port: u16 = line
            .trim()
            .parse()
            .map_err(|e| anyhow!("the fake provider printed {line:?}, not a port: {e}"))?;
        Ok(Fake {
            proc,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn seed(&self, http: &Http, clients: Vec<serde_json::Value>) -> Result<()> {
        for chunk in clients.chunks(25_000) {
            let (status, body) = http
                .post_json(
                    &format!("{}/seed-bulk", self.base),
                    &json!({ "clients": chunk }),
                )
                .await?;
            if status != 200 {
                bail!("fake /seed-bulk answered {status}: {body}");
            }
        }
        Ok(())
    }

    async fn stats(&self, http: &Http) -> Result<serde_json::Value> {
        let (status, body) = http.get(&format!("{}/stats?summary=1", self.base)).await?;
        if status != 200 {
            bail!("fake /stats answered {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }
}

fn stat(v: &serde_json::Value, key: &str) -> u64 {
    v.get(key).and_then(serde_json::Value::as_u64).unwrap_or(0)
}

// -----------------------------------------------------------------------------------------
// The daemon

struct Daemon {
    proc: Proc,
    base: String,
    log: PathBuf,
    spawned: Instant,
}

impl Daemon {
    fn spawn(dir: &Path, name: &str, redis_url: &str, extra: &[(&str, String)]) -> Result<Daemon> {
        let port = free_port()?;
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let bin = env!("CARGO_BIN_EXE_tokenwarden");
        let mut cmd = Command::new(bin);
        cmd.arg("run");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("TOKENWARDEN_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG")
            .env("TOKENWARDEN_REDIS_URL", redis_url)
            .env("TOKENWARDEN_LISTEN", format!("127.0.0.1:{port}"))
            .env("TOKENWARDEN_LOG", "info");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        if let Ok(more) = std::env::var("FLEET_DAEMON_ENV") {
            for kv in more.split(',').filter(|kv| !kv.trim().is_empty()) {
                let (k, v) = kv
                    .split_once('=')
                    .ok_or_else(|| anyhow!("FLEET_DAEMON_ENV: {kv:?} is not K=V"))?;
                cmd.env(k.trim(), v.trim());
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out));
        let spawned = Instant::now();
        let child = cmd.spawn().with_context(|| format!("cannot run {bin}"))?;
        Ok(Daemon {
            proc: Proc { child },
            base: format!("http://127.0.0.1:{port}"),
            log,
            spawned,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(st) = self.proc.exited() {
            bail!(
                "tokenwarden exited ({st}); log tail:\n{}",
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// Polls `/readyz` every 10 ms; the time from spawn to the first 200.
    async fn wait_ready(&mut self, http: &Http) -> Result<Duration> {
        loop {
            self.check_alive()?;
            if let Ok((200, _)) = http.get(&format!("{}/readyz", self.base)).await {
                return Ok(self.spawned.elapsed());
            }
            if self.spawned.elapsed() > READY_TIMEOUT {
                bail!(
                    "tokenwarden not ready within {READY_TIMEOUT:?}; log tail:\n{}",
                    tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn metrics(&self, http: &Http) -> Result<String> {
        let (status, body) = http.get(&format!("{}/metrics", self.base)).await?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        Ok(body)
    }

    fn rss_mb(&self) -> Result<f64> {
        Ok(status_kb(self.pid(), "VmRSS")? as f64 / 1024.0)
    }

    fn hwm_mb(&self) -> Result<f64> {
        Ok(status_kb(self.pid(), "VmHWM")? as f64 / 1024.0)
    }

    async fn stop(mut self) {
        self.proc.terminate(Duration::from_secs(30)).await;
    }
}

// -----------------------------------------------------------------------------------------
// Prometheus text

/// `(labels, value)` of every sample of `name`.
fn samples<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((head, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match head.find('{') {
            Some(at) => (&head[..at], head[at + 1..].trim_end_matches('}')),
            None => (head, ""),
        };
        if n == name {
            if let Ok(v) = value.trim().parse::<f64>() {
                out.push((labels, v));
            }
        }
    }
    out
}

fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("{key}=\"");
    let start = labels.find(&pat)? + pat.len();
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// `token_refresh_total` summed by `result`.
fn refresh_results(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for (labels, v) in samples(text, "tokenwarden_token_refresh_total") {
        let r = label(labels, "result").unwrap_or("?").to_string();
        *out.entry(r).or_insert(0.0) += v;
    }
    out
}

/// (count, mean seconds) of the daemon's registry scans of one kind.
fn scan_stats(text: &str, kind: &str) -> (f64, f64) {
    let pick = |suffix: &str| -> f64 {
        samples(
            text,
            &format!("tokenwarden_registry_scan_duration_seconds_{suffix}"),
        )
        .iter()
        .filter(|(labels, _)| label(labels, "kind") == Some(kind))
        .map(|(_, v)| v)
        .sum::<f64>()
    };
    let count = pick("count");
    (
        count,
        if count > 0.0 {
            pick("sum") / count
        } else {
            f64::NAN
        },
    )
}

/// Cumulative buckets `(le, count)` of a histogram, summed over label sets.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for (labels, v) in samples(text, &format!("{name}_bucket")) {
        let le = match label(labels, "le") {
            Some("+Inf") => f64::INFINITY,
            Some(s) => match s.parse() {
                Ok(x) => x,
                Err(_) => continue,
            },
            None => continue,
        };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(e) => e.1 += v,
            None => by_le.push((le, v)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// Upper bound of the bucket holding quantile `q` of `after - before`.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let base = |le: f64| {
        before
            .iter()
            .find(|(l, _)| *l == le)
            .map_or(0.0, |(_, c)| *c)
    };
    let diff: Vec<(f64, f64)> = after.iter().map(|(le, c)| (*le, c - base(*le))).collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    diff.iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

// -----------------------------------------------------------------------------------------
// Records

/// A set of providers: tenant `{prefix}{i/4}`, provider type `PROVIDER_TYPES[i % 4]`.
struct Group<'a> {
    prefix: &'a str,
    n: usize,
}

impl Group<'_> {
    fn tenant(&self, i: usize) -> String {
        format!("{}{:06}", self.prefix, i / 4)
    }

    fn provider(i: usize) -> &'static str {
        PROVIDER_TYPES[i % 4]
    }

    fn id(&self, i: usize) -> ProviderId {
        ProviderId::new(self.tenant(i), Self::provider(i))
    }

    fn client_id(&self, i: usize) -> String {
        format!("cid-{}-{i:07}", self.prefix)
    }

    fn secret(&self, i: usize) -> String {
        format!("sec-{}-{i:07}-Zk4qT9vB2mXw8RfL", self.prefix)
    }

    fn refresh_token(&self, gen: u32, i: usize) -> String {
        format!("rt-{}-{gen}-{i:07}-4f1c9a0e2b7d4e8a", self.prefix)
    }

    fn access_token(&self, gen: u32, i: usize, body: &str) -> String {
        format!("eyJhbGciOiJSUzI1NiJ9.{}{gen}{i:08}.{body}", self.prefix)
    }

    /// The endpoint's clients; with `access`, the records' access tokens are live too (for
    /// health probes).
    fn fake_clients(&self, gen: u32, access: bool) -> Vec<serde_json::Value> {
        let body = access_token_body();
        (0..self.n)
            .map(|i| {
                let mut c = json!({
                    "client_id": self.client_id(i),
                    "client_secret": self.secret(i),
                    "refresh_token": self.refresh_token(gen, i),
                });
                if access {
                    c["access_token"] = json!(self.access_token(gen, i, &body));
                }
                c
            })
            .collect()
    }
}

/// `datetime.isoformat()` of a naive UTC datetime, as the gateway writes `token_expiry`.
fn py_iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// A JWT-sized access token body (GoTo and Microsoft tokens are 1-2 KB).
fn access_token_body() -> String {
    let mut rng = fastrand::Rng::with_seed(7);
    let alphabet: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(['-', '_'])
        .collect();
    (0..880)
        .map(|_| alphabet[rng.usize(..alphabet.len())])
        .collect()
}

struct Seeding<'a> {
    group: &'a Group<'a>,
    gen: u32,
    /// The token endpoint's base URL: `/token`, and `/api/...` for the records' API.
    endpoint: &'a str,
    expiry: &'a dyn Fn(usize) -> String,
    /// Also write a health hash per record, as a running daemon leaves it.
    health: bool,
}

/// Writes tenant configs, provider sets and records (and health hashes) in pipelines of
/// 1000 records.
async fn seed(conn: &mut MultiplexedConnection, s: &Seeding<'_>) -> Result<()> {
    let g = s.group;
    let body = access_token_body();
    let stamp = "2025-01-15T10:30:00.123456";
    for start in (0..g.n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(g.n) {
            let tenant = g.tenant(i);
            let ptype = Group::provider(i);
            if i % 4 == 0 {
                pipe.cmd("HSET")
                    .arg(keys::tenant_config_key(&tenant))
                    .arg(&[
                        ("name", format!("Tenant {tenant}").as_str()),
                        ("primary_provider", "goto"),
                        ("sync_strategy", "primary"),
                        ("data_retention_days", "90"),
                        ("timezone", "America/New_York"),
                        ("created_at", stamp),
                        ("updated_at", stamp),
                    ])
                    .ignore();
            }
            let (api, scopes) = match ptype {
                "goto" => (
                    "voice-admin/v1",
                    r#"["voice-admin.v1.read", "identity:scim.org"]"#,
                ),
                "teams" => (
                    "",
                    r#"["https://graph.microsoft.com/.default", "offline_access"]"#,
                ),
                "ringcentral" => ("", r#"["ReadAccounts", "ReadCallLog", "CallControl"]"#),
                _ => ("v2", r#"["phone:read:admin", "user:read:admin"]"#),
            };
            let id = g.id(i);
            // The API (health probes) and the token endpoint are the local fake's.
            let api = format!("{}/api/{ptype}/{api}", s.endpoint)
                .trim_end_matches('/')
                .to_string();
            let mut fields: Vec<(&str, String)> = vec![
                ("provider_type", ptype.into()),
                ("status", "active".into()),
                ("auth_type", "oauth".into()),
                ("client_id", g.client_id(i)),
                ("client_secret", g.secret(i)),
                (
                    "account_key",
                    format!("{}", 4_266_846_632_996_939_781u64 + i as u64),
                ),
                ("access_token", g.access_token(s.gen, i, &body)),
                ("refresh_token", g.refresh_token(s.gen, i)),
                ("token_expiry", (s.expiry)(i)),
                ("scopes", scopes.into()),
                ("api_base_url", api),
                (
                    "features_enabled",
                    r#"["users", "extensions", "call_queues", "auto_attendants"]"#.into(),
                ),
                ("sync_enabled", "True".into()),
                ("created_at", stamp.into()),
                ("updated_at", stamp.into()),
                ("token_url", format!("{}/token", s.endpoint)),
            ];
            if ptype == "goto" {
                // The catalog probes GoTo at an absolute URL; point the probe at the fake.
                fields.push(("health_path", "/admin/rest/v1/me".into()));
            }
            pipe.cmd("HSET").arg(id.record_key()).arg(&fields).ignore();
            pipe.cmd("SADD")
                .arg(keys::providers_set_key(&tenant))
                .arg(ptype)
                .ignore();
            if s.health {
                pipe.cmd("HSET")
                    .arg(id.health_key())
                    .arg(&[
                        ("state", "healthy"),
                        ("token_expiry", "2026-01-01T00:00:00.000000+00:00"),
                        ("next_refresh_at", "2026-01-01T00:00:00.000000+00:00"),
                        ("last_refresh_result", "success"),
                        ("consecutive_failures", "0"),
                        ("updated_at", "2026-01-01T00:00:00.000000+00:00"),
                    ])
                    .ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

// -----------------------------------------------------------------------------------------
// In-process registry scans

struct LibScan {
    total: Duration,
    discover: Duration,
    round_trips: u64,
    valid: usize,
}

/// Tenants whose members and records are read together while SCAN goes on (the daemon's
/// full read uses the same slice).
const TENANT_SLICE: usize = 1000;

/// Provider ids of a discovery, in order.
fn ids_of(discovered: &tokenwarden::registry::Discovery) -> Vec<ProviderId> {
    let mut ids = Vec::new();
    for (tenant, members) in discovered {
        if let Members::Names(names) = members {
            let tenant: Arc<str> = Arc::from(tenant.as_str());
            for p in names {
                ids.push(ProviderId::new(Arc::clone(&tenant), p.as_str()));
            }
        }
    }
    ids
}

/// The registry read as the daemon's full read does it: `Registry::scan_tenants` on a
/// connection of its own, while each slice of tenants found is read (`read_members`, then
/// `read_records`, parsed) on another.
async fn library_scan(pool: &deadpool_redis::Pool, batch: usize) -> Result<LibScan> {
    let registry = Registry::new(batch);
    let started = Instant::now();
    let (tx, mut pages) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
    let mut scan_conn = tokenwarden::store::conn(pool).await?;
    let scanner = tokio::spawn(async move {
        let mut stats = ReadStats::default();
        Registry::new(batch)
            .scan_tenants(&mut scan_conn, &mut stats, &tx)
            .await
            .map(|()| stats)
    });
    let mut conn = tokenwarden::store::conn(pool).await?;
    let mut stats = ReadStats::default();
    let mut seen = std::collections::HashSet::new();
    let mut pending: Vec<String> = Vec::new();
    let mut valid = 0;
    loop {
        let page = pages.recv().await;
        let done = page.is_none();
        for t in page.into_iter().flatten() {
            if seen.insert(t.clone()) {
                pending.push(t);
            }
        }
        if pending.len() >= TENANT_SLICE || (done && !pending.is_empty()) {
            let discovered = registry
                .read_members(&mut conn, &pending, &mut stats)
                .await?;
            let ids = ids_of(&discovered);
            let states = registry.read_records(&mut conn, &ids, &mut stats).await?;
            valid += states
                .iter()
                .filter(|s| matches!(s, RecordState::Valid(_)))
                .count();
            pending.clear();
        }
        if done {
            break;
        }
    }
    let scan_stats = scanner.await.map_err(|e| anyhow!("scan task: {e}"))??;
    Ok(LibScan {
        total: started.elapsed(),
        discover: Duration::ZERO,
        round_trips: stats.round_trips + scan_stats.round_trips,
        valid,
    })
}

/// `Registry::discover` (SCAN, then SMEMBERS), then `read_records`: one after the other.
async fn library_scan_sequential(pool: &deadpool_redis::Pool, batch: usize) -> Result<LibScan> {
    let mut conn = tokenwarden::store::conn(pool).await?;
    let registry = Registry::new(batch);
    let mut stats = ReadStats::default();
    let started = Instant::now();
    let discovered = registry.discover(&mut conn, &mut stats).await?;
    let ids = ids_of(&discovered);
    let discover = started.elapsed();
    let states = registry.read_records(&mut conn, &ids, &mut stats).await?;
    let total = started.elapsed();
    let valid = states
        .iter()
        .filter(|s| matches!(s, RecordState::Valid(_)))
        .count();
    Ok(LibScan {
        total,
        discover,
        round_trips: stats.round_trips,
        valid,
    })
}

/// `KEYS` + one `HGETALL` per record, parsed the same way.
async fn naive_scan(conn: &mut MultiplexedConnection) -> Result<(Duration, u64, usize)> {
    let started = Instant::now();
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("tenant:*:provider:*")
        .query_async(conn)
        .await?;
    let mut round_trips = 1u64;
    let mut valid = 0usize;
    for key in all
        .iter()
        .filter(|k| matches!(keys::classify(k), Some(KeyKind::Record { .. })))
    {
        let v: Value = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
        round_trips += 1;
        if matches!(parse_record_value(v), RecordState::Valid(_)) {
            valid += 1;
        }
    }
    Ok((started.elapsed(), round_trips, valid))
}

/// Pipelined `HGETALL` of known keys (no discovery), nothing parsed, `in_flight` pipelines
/// at once on one connection: what one connection can move.
async fn raw_pipelined(
    conn: &MultiplexedConnection,
    record_keys: &[String],
    in_flight: usize,
) -> Result<(Duration, u64, Vec<Value>)> {
    raw_pipelined_with(conn, record_keys, in_flight, None).await
}

/// As [`raw_pipelined`]; with `fields`, `HMGET` of those fields instead of `HGETALL`.
async fn raw_pipelined_with(
    conn: &MultiplexedConnection,
    record_keys: &[String],
    in_flight: usize,
    fields: Option<&[&str]>,
) -> Result<(Duration, u64, Vec<Value>)> {
    let started = Instant::now();
    let answers: Vec<redis::RedisResult<Vec<Value>>> =
        futures_util::stream::iter(record_keys.chunks(RAW_BATCH))
            .map(|chunk| {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                for k in chunk {
                    match fields {
                        Some(f) => pipe.cmd("HMGET").arg(k).arg(f),
                        None => pipe.cmd("HGETALL").arg(k),
                    };
                }
                async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
            })
            .buffered(in_flight.max(1))
            .collect()
            .await;
    let elapsed = started.elapsed();
    let round_trips = answers.len() as u64;
    let mut out = Vec::with_capacity(record_keys.len());
    for a in answers {
        out.extend(a?);
    }
    Ok((elapsed, round_trips, out))
}

/// `redis-benchmark -P 16 [-c 1]` HGETALL of one record: requests per second.
fn redis_benchmark(port: u16, key: &str, requests: usize, one_client: bool) -> Option<f64> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-P", "16"]);
    if one_client {
        cmd.args(["-c", "1"]);
    }
    let out = cmd
        .args(["-n", &requests.to_string(), "--csv", "HGETALL", key])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().rev().find(|l| l.contains("HGETALL"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// -----------------------------------------------------------------------------------------
// Results

#[derive(Default)]
struct Row {
    n: usize,
    redis_keys: u64,
    lib_ms: f64,
    lib_min_ms: f64,
    /// `discover()` then `read_records()`, one after the other.
    lib_seq_ms: f64,
    lib_discover_ms: f64,
    lib_round_trips: u64,
    /// Commands of one more library scan, with their server time in ms; and that scan's time.
    lib_server: Vec<(String, u64, f64)>,
    lib_check_ms: f64,
    parse_ms: f64,
    naive_ms: f64,
    naive_round_trips: u64,
    /// The faster of `raw1_ms` (one pipeline at a time) and `raw4_ms` (four in flight).
    raw_ms: f64,
    raw1_ms: f64,
    raw4_ms: f64,
    /// Four in flight, `HMGET` of the fields the library reads (`RECORD_FIELDS`).
    raw_hmget_ms: f64,
    raw_round_trips: u64,
    /// The daemon's own `registry_scan_duration_seconds`: (count, mean) of full and light.
    daemon_full_scan: (f64, f64),
    daemon_light_scan: (f64, f64),
    rb_ms: Option<f64>,
    rb1_ms: Option<f64>,
    ready_s: f64,
    rss_ready_mb: f64,
    rss_steady_mb: f64,
    rss_hwm_mb: f64,
    rss_per_provider_b: f64,
    idle_cpu: f64,
    idle_redis_cpu: f64,
    idle_fake_cpu: f64,
    /// Daemon CPU seconds from start to ready (dominated by the first full read).
    first_scan_cpu_s: f64,
    probes_per_s: f64,
    idle_cpu_scan: f64,
    idle_redis_cpu_scan: f64,
    idle_redis_cmds: f64,
    ready_notify_s: f64,
    idle_cpu_notify: f64,
    idle_redis_cpu_notify: f64,
    rss_notify_mb: f64,
    scrape_on_ms: f64,
    scrape_on_bytes: usize,
    rss_after_scrape_mb: f64,
    scrape_off_ms: f64,
    scrape_off_bytes: usize,
    throughput: Vec<Throughput>,
    lateness: Option<Lateness>,
}

struct Throughput {
    concurrency: usize,
    ready_s: f64,
    steady_rps: f64,
    overall_rps: f64,
    drain_s: f64,
    failures: f64,
    max_in_flight: u64,
    reuse: u64,
    invalid_grant: u64,
    rotated: (usize, usize),
    rss_end_mb: f64,
    hwm_mb: f64,
    /// Redis commands per refresh after the first scan: (command, calls, server µs).
    per_refresh: Vec<(String, f64, f64)>,
    /// CPU in percent of one core while refreshing: daemon, redis-server, token endpoint,
    /// and processes that are not part of the benchmark.
    cpu: [f64; 4],
}

struct Spread {
    /// Latest minus earliest planned start, as the daemon planned them.
    planned_span_ms: f64,
    p50: f64,
    p99: f64,
    max: f64,
    drain_ms: f64,
    hist_p50: Option<f64>,
    hist_p99: Option<f64>,
}

struct Lateness {
    same_instant: Spread,
    one_second: Spread,
}

struct Bench {
    opts: Options,
    dir: TempDir,
    redis: RedisServer,
    conn: MultiplexedConnection,
    http: Http,
    clk_tck: u64,
}

impl Bench {
    async fn flush(&mut self) -> Result<()> {
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }

    /// CPU use in percent of one core over `secs`, for each pid; and Redis commands per second.
    async fn idle(&mut self, pids: &[u32], secs: u64) -> Result<(Vec<f64>, f64)> {
        let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Result<_>>()?;
        let cmds_before = redis_commands(&mut self.conn).await?;
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let after: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Result<_>>()?;
        let cmds_after = redis_commands(&mut self.conn).await?;
        let wall = started.elapsed().as_secs_f64();
        let pct = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a - b) as f64 / self.clk_tck as f64 / wall * 100.0)
            .collect();
        Ok((
            pct,
            cmds_after.saturating_sub(cmds_before + 1) as f64 / wall,
        ))
    }

    /// Median time of three `/metrics` scrapes, the size, and the last body.
    async fn scrape(&self, d: &Daemon) -> Result<(f64, usize, String)> {
        let mut times = Vec::new();
        let mut body = String::new();
        for _ in 0..3 {
            let started = Instant::now();
            body = d.metrics(&self.http).await?;
            times.push(ms(started.elapsed()));
        }
        Ok((median(times), body.len(), body))
    }
}

async fn run() -> Result<()> {
    let opts = Options::from_env()?;
    let dir = TempDir::new()?;
    let redis = RedisServer::start(&dir.0).await?;
    let conn = redis.conn(0).await?;
    let mut b = Bench {
        opts,
        dir,
        redis,
        conn,
        http: Http::new()?,
        clk_tck: clk_tck(),
    };
    let machine = machine();
    eprintln!("fleet benchmark: {machine}");
    eprintln!(
        "sizes {:?}, idle window {} s, burst {}",
        b.opts.sizes, b.opts.idle_secs, b.opts.burst
    );

    // A daemon with nothing to track: the memory baseline.
    b.flush().await?;
    let mut d0 = Daemon::spawn(&b.dir.0, "empty", &b.redis.url(0), &[])?;
    d0.wait_ready(&b.http).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_mb = d0.rss_mb()?;
    d0.stop().await;
    eprintln!("empty registry: RSS {baseline_mb:.1} MB");

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
            throughput_with_delay(&mut b, slow_tokens, concurrency, gen, SLOW_ENDPOINT_MS).await?,
        );
    }
    print_report(&machine, &b.opts, baseline_mb, &rows);
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
    let fake = Fake::start()?;
    let started = Instant::now();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen: 0,
            endpoint: &fake.base,
            expiry: &far_fn,
            health: true,
        },
    )
    .await?;
    row.redis_keys = redis::cmd("DBSIZE").query_async(&mut b.conn).await?;
    fake.seed(&b.http, main.fake_clients(0, true)).await?;
    eprintln!(
        "seeded {n} providers ({} keys) in {:.1} s",
        row.redis_keys,
        started.elapsed().as_secs_f64()
    );
    let pool = tokenwarden::store::pool(&RedisConfig {
        url: b.redis.url(0),
        pool_size: 2,
        command_timeout_ms: 120_000,
    })?;
    let record_keys: Vec<String> = (0..n).map(|i| main.id(i).record_key()).collect();
    let (mut lib, mut lib_seq, mut lib_disc, mut raw1, mut raw4, mut raw_hmget, mut parse) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        let (t, _, _) = raw_pipelined(&b.conn, &record_keys, 1).await?;
        raw1.push(ms(t));
        let (t, rts, values) = raw_pipelined(&b.conn, &record_keys, 4).await?;
        raw4.push(ms(t));
        let (t, _, _) = raw_pipelined_with(&b.conn, &record_keys, 4, Some(RECORD_FIELDS)).await?;
        raw_hmget.push(ms(t));
        row.raw_round_trips = rts;
        let started = Instant::now();
        let states: Vec<RecordState> = values.into_iter().map(parse_record_value).collect();
        parse.push(ms(started.elapsed()));
        let valid = states
            .iter()
            .filter(|s| matches!(s, RecordState::Valid(_)))
            .count();
        if valid != n {
            bail!("only {valid} of {n} seeded records parse as valid");
        }
        let s = library_scan(&pool, b.opts.scan_batch).await?;
        if s.valid != n {
            bail!("library scan found {} valid records of {n}", s.valid);
        }
        lib.push(ms(s.total));
        row.lib_round_trips = s.round_trips;
        let s = library_scan_sequential(&pool, b.opts.scan_batch).await?;
        if s.valid != n {
            bail!(
                "sequential library scan found {} valid records of {n}",
                s.valid
            );
        }
        lib_seq.push(ms(s.total));
        lib_disc.push(ms(s.discover));
    }
    row.lib_min_ms = lib.iter().copied().fold(f64::INFINITY, f64::min);
    row.lib_ms = median(lib);
    row.lib_discover_ms = median(lib_disc);
    row.lib_seq_ms = median(lib_seq);
    row.raw1_ms = median(raw1);
    row.raw4_ms = median(raw4);
    row.raw_hmget_ms = median(raw_hmget);
    row.raw_ms = row.raw1_ms.min(row.raw4_ms);
    row.parse_ms = median(parse);
    let (t, rts, valid) = naive_scan(&mut b.conn).await?;
    if valid != n {
        bail!("naive scan found {valid} valid records of {n}");
    }
    row.naive_ms = ms(t);
    row.naive_round_trips = rts;
    let requests = n.max(100_000);
    row.rb_ms = redis_benchmark(b.redis.port, &record_keys[0], requests, false)
        .map(|rps| n as f64 / rps * 1000.0);
    row.rb1_ms = redis_benchmark(b.redis.port, &record_keys[0], requests, true)
        .map(|rps| n as f64 / rps * 1000.0);
    // Where the library scan's time goes on the server.
    let before = commandstats(&mut b.conn).await?;
    let s = library_scan(&pool, b.opts.scan_batch).await?;
    let after = commandstats(&mut b.conn).await?;
    row.lib_server = command_delta(&before, &after)
        .into_iter()
        .filter(|(c, _, _)| c != "info")
        .map(|(c, calls, usec)| (c, calls, usec as f64 / 1000.0))
        .collect();
    row.lib_check_ms = ms(s.total);
    if b.opts.perf_dir.is_some() {
        let perf = Perf::start(&b.opts, std::process::id(), &format!("scan-library-{n}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            library_scan(&pool, b.opts.scan_batch).await?;
        }
        perf.stop().await;
    }
    drop(pool);
    eprintln!(
        "scan: library {:.0} ms ({} round trips), raw pipelined {:.0} ms, naive {:.0} ms",
        row.lib_ms, row.lib_round_trips, row.raw_ms, row.naive_ms
    );

    // ---- the daemon, every token far in the future: default configuration ----
    let mut d1 = Daemon::spawn(&b.dir.0, &format!("idle-{n}"), &b.redis.url(0), &[])?;
    let perf = Perf::start(&b.opts, d1.pid(), &format!("first-scan-daemon-{n}"));
    row.ready_s = d1.wait_ready(&b.http).await?.as_secs_f64();
    // CPU of start-up and the first full read: what each periodic full rescan costs again.
    row.first_scan_cpu_s = cpu_ticks(d1.pid())? as f64 / b.clk_tck as f64;
    perf.stop().await;
    row.rss_ready_mb = d1.rss_mb()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let perf = Perf::start(&b.opts, d1.pid(), &format!("idle-daemon-{n}"));
    let probes_before = stat(&fake.stats(&b.http).await?, "api_ok");
    let (cpu, _) = b
        .idle(
            &[d1.pid(), b.redis.proc.pid(), fake.proc.pid()],
            b.opts.idle_secs,
        )
        .await?;
    let probes = stat(&fake.stats(&b.http).await?, "api_ok").saturating_sub(probes_before);
    perf.stop().await;
    d1.check_alive()?;
    row.idle_cpu = cpu[0];
    row.idle_redis_cpu = cpu[1];
    row.idle_fake_cpu = cpu[2];
    row.probes_per_s = probes as f64 / b.opts.idle_secs as f64;
    row.rss_steady_mb = d1.rss_mb()?;
    row.rss_per_provider_b = (row.rss_steady_mb - baseline_mb) * 1024.0 * 1024.0 / n as f64;
    let (t, size, text) = b.scrape(&d1).await?;
    (row.scrape_on_ms, row.scrape_on_bytes) = (t, size);
    row.daemon_full_scan = scan_stats(&text, "full");

    row.rss_after_scrape_mb = d1.rss_mb()?;
    row.rss_hwm_mb = d1.hwm_mb()?;
    d1.stop().await;
    eprintln!(
        "daemon: ready in {:.2} s, RSS {:.1} MB, idle CPU {:.2} % (redis {:.2} %), /metrics {:.0} ms {} bytes",
        row.ready_s, row.rss_steady_mb, row.idle_cpu, row.idle_redis_cpu, row.scrape_on_ms, row.scrape_on_bytes
    );

    // ---- health probes off, no change events: the change scan alone ----
    let no_probes = ("TOKENWARDEN_HEALTH_ENABLED", "false".to_string());
    let mut d2 = Daemon::spawn(
        &b.dir.0,
        &format!("no-probes-{n}"),
        &b.redis.url(0),
        &[
            no_probes.clone(),
            ("TOKENWARDEN_REGISTRY_CLIENT_TRACKING", "off".into()),
        ],
    )?;
    d2.wait_ready(&b.http).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu, cmds) = b
        .idle(&[d2.pid(), b.redis.proc.pid()], b.opts.idle_secs)
        .await?;
    row.daemon_light_scan = scan_stats(&d2.metrics(&b.http).await?, "light");
    d2.check_alive()?;
    row.idle_cpu_scan = cpu[0];
    row.idle_redis_cpu_scan = cpu[1];
    row.idle_redis_cmds = cmds;
    d2.stop().await;
    eprintln!(
        "change scan alone: idle CPU {:.2} % (redis {:.2} %, {:.0} commands/s)",
        row.idle_cpu_scan, row.idle_redis_cpu_scan, row.idle_redis_cmds
    );

    // ---- keyspace notifications on, probes off, per-provider series off ----
    config_set(&mut b.conn, "notify-keyspace-events", "KEA").await?;
    let mut d3 = Daemon::spawn(
        &b.dir.0,
        &format!("notify-{n}"),
        &b.redis.url(0),
        &[
            ("TOKENWARDEN_METRICS_PER_PROVIDER_SERIES", "false".into()),
            no_probes.clone(),
        ],
    )?;
    row.ready_notify_s = d3.wait_ready(&b.http).await?.as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu, _) = b
        .idle(&[d3.pid(), b.redis.proc.pid()], b.opts.idle_secs)
        .await?;
    d3.check_alive()?;
    row.idle_cpu_notify = cpu[0];
    row.idle_redis_cpu_notify = cpu[1];
    row.rss_notify_mb = d3.rss_mb()?;
    let (t, size, _) = b.scrape(&d3).await?;
    (row.scrape_off_ms, row.scrape_off_bytes) = (t, size);
    d3.stop().await;
    config_set(&mut b.conn, "notify-keyspace-events", "").await?;
    drop(fake);
    eprintln!(
        "notifications: idle CPU {:.2} % (redis {:.2} %); series off: /metrics {:.1} ms {} bytes",
        row.idle_cpu_notify, row.idle_redis_cpu_notify, row.scrape_off_ms, row.scrape_off_bytes
    );

    // ---- lateness ----
    row.lateness = Some(lateness(b, n).await?);

    // ---- refresh throughput ----
    for (gen, concurrency) in [(1u32, 64usize), (2, 256)] {
        row.throughput
            .push(throughput(b, n, concurrency, gen).await?);
    }
    Ok(row)
}

/// N expired tokens, refreshed at `concurrency`; counted by the daemon's success counter.
async fn throughput(b: &mut Bench, n: usize, concurrency: usize, gen: u32) -> Result<Throughput> {
    throughput_with_delay(b, n, concurrency, gen, 0).await
}

/// As [`throughput`], with every token answer delayed by `delay_ms` at the endpoint.
async fn throughput_with_delay(
    b: &mut Bench,
    n: usize,
    concurrency: usize,
    gen: u32,
    delay_ms: u64,
) -> Result<Throughput> {
    b.flush().await?;
    let fake = Fake::start()?;
    if delay_ms > 0 {
        let (status, body) = b
            .http
            .post_json(
                &format!("{}/mode", fake.base),
                &json!({ "delay_ms": delay_ms }),
            )
            .await?;
        if status != 200 {
            bail!("fake /mode answered {status}: {body}");
        }
    }
    let main = Group { prefix: "t", n };
    let expired = |_: usize| EXPIRED.to_string();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen,
            endpoint: &fake.base,
            expiry: &expired,
            health: false,
        },
    )
    .await?;
    fake.seed(&b.http, main.fake_clients(gen, false)).await?;
    let mut d = Daemon::spawn(
        &b.dir.0,
        &format!("refresh-{n}-{concurrency}-{delay_ms}"),
        &b.redis.url(0),
        &[
            (
                "TOKENWARDEN_REFRESH_MAX_CONCURRENT",
                concurrency.to_string(),
            ),
            ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0".into()),
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
            ("TOKENWARDEN_METRICS_PER_PROVIDER_SERIES", "false".into()),
        ],
    )?;
    let mut ready: Option<f64> = None;
    // Redis commands and refreshes done when the first scan was over.
    let mut at_ready: Option<CommandStatsAt> = None;
    let mut series: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    let mut last_progress = Instant::now();
    let mut results = HashMap::new();
    let perf = Perf::start(
        &b.opts,
        d.pid(),
        &format!("refresh-daemon-{n}-{concurrency}"),
    );
    let pids = [
        d.pid(),
        b.redis.proc.pid(),
        fake.proc.pid(),
        std::process::id(),
    ];
    // Daemon, redis-server, endpoint, this process, the whole machine.
    let ticks = |pids: &[u32; 4]| -> Result<[u64; 5]> {
        Ok([
            cpu_ticks(pids[0])?,
            cpu_ticks(pids[1])?,
            cpu_ticks(pids[2])?,
            cpu_ticks(pids[3])?,
            machine_busy_ticks()?,
        ])
    };
    let mut window_start: Option<(Instant, [u64; 5])> = None;
    let done_at: f64;
    loop {
        d.check_alive()?;
        let now = d.spawned.elapsed().as_secs_f64();
        if ready.is_none() {
            if let Ok((200, _)) = b.http.get(&format!("{}/readyz", d.base)).await {
                ready = Some(now);
                at_ready = Some((
                    commandstats(&mut b.conn).await?,
                    stat(&fake.stats(&b.http).await?, "refresh_ok"),
                ));
            }
        }
        // Progress is read from the endpoint's counter (O(1)); the daemon's /metrics walks
        // the whole fleet under its lock, so it is only read once the endpoint is done.
        let fake_ok = stat(&fake.stats(&b.http).await?, "refresh_ok") as f64;
        if fake_ok > series.last().map_or(0.0, |s| s.1) {
            last_progress = Instant::now();
            if window_start.is_none() {
                window_start = Some((Instant::now(), ticks(&pids)?));
            }
        }
        series.push((d.spawned.elapsed().as_secs_f64(), fake_ok));
        if fake_ok >= n as f64 {
            let text = d.metrics(&b.http).await?;
            results = refresh_results(&text);
            let ok = results.get("success").copied().unwrap_or(0.0);
            if ok >= n as f64 {
                done_at = d.spawned.elapsed().as_secs_f64();
                break;
            }
        }
        if last_progress.elapsed() > STALL {
            bail!(
                "refreshes stalled at {:?} (endpoint {:?}) of {n} for {STALL:?}; log tail:\n{}",
                results,
                series.last(),
                tail(&d.log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = match window_start {
        Some((since, before)) => {
            let after = ticks(&pids)?;
            let wall = since.elapsed().as_secs_f64().max(1e-3);
            let pct = |i: usize| {
                after[i].saturating_sub(before[i]) as f64 / b.clk_tck as f64 / wall * 100.0
            };
            let ours = pct(0) + pct(1) + pct(2) + pct(3);
            [pct(0), pct(1), pct(2), (pct(4) - ours).max(0.0)]
        }
        None => [f64::NAN; 4],
    };
    perf.stop().await;
    // Time at which the endpoint's count first reached `k`, interpolated between samples.
    let at = |k: f64| -> f64 {
        for w in series.windows(2) {
            let ((t0, c0), (t1, c1)) = (w[0], w[1]);
            if c1 >= k && c1 > c0 {
                return t0 + (t1 - t0) * ((k - c0).max(0.0) / (c1 - c0));
            }
        }
        series.last().map_or(0.0, |s| s.0)
    };
    let nf = n as f64;
    let (t10, t90) = (at(0.1 * nf), at(0.9 * nf));
    let first = at(1.0);
    // Done: every write-back counted by the daemon.
    let done = done_at.max(at(nf));
    let steady_rps = 0.8 * nf / (t90 - t10).max(1e-6);
    let overall_rps = (nf - 1.0) / (done - first).max(1e-6);
    let failures: f64 = results
        .iter()
        .filter(|(r, _)| r.as_str() != "success")
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0;
    let stats = fake.stats(&b.http).await?;
    // Redis commands per refresh after the first scan (change scans shown apart).
    let mut per_refresh = Vec::new();
    if let Some((before, ok_before)) = &at_ready {
        let after = commandstats(&mut b.conn).await?;
        let refreshed = stat(&stats, "refresh_ok").saturating_sub(*ok_before).max(1) as f64;
        for (name, calls, usec) in command_delta(before, &after) {
            if name == "info" {
                continue;
            }
            per_refresh.push((name, calls as f64 / refreshed, usec as f64 / refreshed));
        }
    }
    // A sample of records must hold rotated refresh tokens.
    let mut pipe = redis::pipe();
    let sample: Vec<usize> = (0..n).step_by((n / 200).max(1)).collect();
    for &i in &sample {
        pipe.cmd("HGET")
            .arg(main.id(i).record_key())
            .arg("refresh_token");
    }
    let tokens: Vec<Option<String>> = pipe.query_async(&mut b.conn).await?;
    let rotated = sample
        .iter()
        .zip(&tokens)
        .filter(|(i, t)| {
            t.as_deref()
                .is_some_and(|t| t != main.refresh_token(gen, **i))
        })
        .count();
    let t = Throughput {
        concurrency,
        ready_s: ready.unwrap_or(f64::NAN),
        steady_rps,
        overall_rps,
        drain_s: done - first,
        failures,
        max_in_flight: stat(&stats, "max_in_flight"),
        reuse: stat(&stats, "reuse"),
        invalid_grant: stat(&stats, "invalid_grant"),
        rotated: (rotated, sample.len()),
        rss_end_mb: d.rss_mb()?,
        hwm_mb: d.hwm_mb()?,
        cpu,
        per_refresh,
    };
    d.stop().await;
    drop(fake);
    eprintln!(
        "refresh c={concurrency}: steady {:.0}/s, overall {:.0}/s, {:.2} s for {n}; endpoint max in flight {}, failures {}, reuse {}, rotated {}/{}; CPU daemon {:.0} % redis {:.0} % endpoint {:.0} % foreign {:.0} %",
        t.steady_rps, t.overall_rps, t.drain_s, t.max_in_flight, t.failures, t.reuse, t.rotated.0, t.rotated.1,
        t.cpu[0], t.cpu[1], t.cpu[2], t.cpu[3]
    );
    Ok(t)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// N far-future tokens plus two bursts: `burst` tokens due at the same instant, then `burst`
/// tokens due within one second.
async fn lateness(b: &mut Bench, n: usize) -> Result<Lateness> {
    b.flush().await?;
    let fake = Fake::start()?;
    let main = Group { prefix: "t", n };
    let burst = b.opts.burst;
    let same = Group {
        prefix: "burst-a",
        n: burst,
    };
    let spread = Group {
        prefix: "burst-b",
        n: burst,
    };
    let far = py_iso(Utc::now() + TimeDelta::hours(20));
    let far_fn = move |_: usize| far.clone();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen: 0,
            endpoint: &fake.base,
            expiry: &far_fn,
            health: false,
        },
    )
    .await?;
    // The policy refreshes a token of remaining life L (first seen at s) at
    // s + max(L/2, min(2L/3, L - lead)); for 2 lead < L < 3 lead that is expiry - lead,
    // whenever the daemon first sees the record. With lead = LATE_LEAD_SECS and expiries
    // 50-55 s ahead, every first sight within the next 10 s gives planned = expiry - lead:
    // the first group all at one instant, the second spread evenly over one second.
    let t0 = Utc::now();
    let secs = |s: f64| TimeDelta::milliseconds((s * 1000.0) as i64);
    let t_same = py_iso(t0 + secs(50.0));
    let same_fn = move |_: usize| t_same.clone();
    let t_spread = t0 + secs(54.0);
    let step_ms = 1000.0 / burst as f64;
    let spread_fn = move |i: usize| py_iso(t_spread + secs(i as f64 * step_ms / 1000.0));
    for (g, f) in [
        (&same, &same_fn as &dyn Fn(usize) -> String),
        (&spread, &spread_fn as &dyn Fn(usize) -> String),
    ] {
        seed(
            &mut b.conn,
            &Seeding {
                group: g,
                gen: 0,
                endpoint: &fake.base,
                expiry: f,
                health: false,
            },
        )
        .await?;
        fake.seed(&b.http, g.fake_clients(0, false)).await?;
    }

    // Lock keys being set: the actual start of each refresh.
    config_set(&mut b.conn, "notify-keyspace-events", "E$").await?;
    let mut pubsub = redis::Client::open(b.redis.url(0))?
        .get_async_pubsub()
        .await?;
    pubsub.subscribe("__keyevent@0__:set").await?;
    let mut stream = pubsub.into_on_message();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(DateTime<Utc>, String)>();
    let listener = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let at = Utc::now();
            if let Ok(key) = msg.get_payload::<String>() {
                if key.starts_with("tenant:burst-") && tx.send((at, key)).is_err() {
                    return;
                }
            }
        }
    });

    let mut d = Daemon::spawn(
        &b.dir.0,
        &format!("lateness-{n}"),
        &b.redis.url(0),
        &[
            ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0".into()),
            ("TOKENWARDEN_SCHEDULE_LEAD_SECS", LATE_LEAD_SECS.to_string()),
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
        ],
    )?;
    d.wait_ready(&b.http).await?;
    // Planned starts, as the daemon wrote them.
    let mut planned: HashMap<String, DateTime<Utc>> = HashMap::new();
    for g in [&same, &spread] {
        let mut pipe = redis::pipe();
        for i in 0..burst {
            pipe.cmd("HGET")
                .arg(g.id(i).health_key())
                .arg("next_refresh_at");
        }
        let values: Vec<Option<String>> = pipe.query_async(&mut b.conn).await?;
        for (i, v) in values.into_iter().enumerate() {
            let v = v.ok_or_else(|| anyhow!("no next_refresh_at for {}", g.id(i)))?;
            let at = DateTime::parse_from_rfc3339(&v)
                .map_err(|e| anyhow!("next_refresh_at {v:?}: {e}"))?
                .with_timezone(&Utc);
            planned.insert(g.id(i).lock_key(), at);
        }
    }
    let first_due = planned.values().min().copied().unwrap_or(t0);
    if first_due < Utc::now() {
        eprintln!("warning: the first burst fell due before the daemon was ready");
    }
    let last_due = planned.values().max().copied().unwrap_or(t0);
    let deadline = last_due + TimeDelta::seconds(60);
    let h0 = buckets(
        &d.metrics(&b.http).await?,
        "tokenwarden_schedule_lateness_seconds",
    );
    let mut seen: HashMap<String, DateTime<Utc>> = HashMap::new();
    let count = |seen: &HashMap<String, DateTime<Utc>>, prefix: &str| {
        seen.keys()
            .filter(|k| k.starts_with(&format!("tenant:{prefix}")))
            .count()
    };
    let mut h_same = None;
    loop {
        while let Ok((at, key)) = rx.try_recv() {
            seen.entry(key).or_insert(at);
        }
        if h_same.is_none() && count(&seen, "burst-a") >= burst {
            h_same = Some(buckets(
                &d.metrics(&b.http).await?,
                "tokenwarden_schedule_lateness_seconds",
            ));
        }
        if h_same.is_some() && count(&seen, "burst-b") >= burst {
            break;
        }
        d.check_alive()?;
        if Utc::now() > deadline {
            bail!(
                "only {} of {} burst refreshes started by 60 s after the last was due; log tail:\n{}",
                seen.len(),
                2 * burst,
                tail(&d.log, 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the last refreshes finish before reading the histogram.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h_end = buckets(
        &d.metrics(&b.http).await?,
        "tokenwarden_schedule_lateness_seconds",
    );
    let h_same = h_same.unwrap_or_default();
    d.stop().await;
    listener.abort();
    config_set(&mut b.conn, "notify-keyspace-events", "").await?;
    drop(fake);

    let spread_of = |prefix: &str, before: &[(f64, f64)], after: &[(f64, f64)]| -> Spread {
        let mut late: Vec<f64> = Vec::new();
        let mut starts: Vec<DateTime<Utc>> = Vec::new();
        let plans: Vec<DateTime<Utc>> = planned
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("tenant:{prefix}")))
            .map(|(_, p)| *p)
            .collect();
        let planned_span_ms = match (plans.iter().min(), plans.iter().max()) {
            (Some(a), Some(z)) => (*z - *a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            _ => f64::NAN,
        };
        for (key, at) in &seen {
            if !key.starts_with(&format!("tenant:{prefix}")) {
                continue;
            }
            if let Some(p) = planned.get(key) {
                late.push((*at - *p).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                starts.push(*at);
            }
        }
        late.sort_by(f64::total_cmp);
        starts.sort();
        let drain_ms = match (starts.first(), starts.last()) {
            (Some(a), Some(z)) => (*z - *a).num_milliseconds() as f64,
            _ => f64::NAN,
        };
        Spread {
            planned_span_ms,
            p50: quantile(&late, 0.5),
            p99: quantile(&late, 0.99),
            max: late.last().copied().unwrap_or(f64::NAN),
            drain_ms,
            hist_p50: bucket_quantile(before, after, 0.5),
            hist_p99: bucket_quantile(before, after, 0.99),
        }
    };
    let l = Lateness {
        same_instant: spread_of("burst-a", &h0, &h_same),
        one_second: spread_of("burst-b", &h_same, &h_end),
    };
    eprintln!(
        "lateness: same instant (planned span {:.0} ms) p50 {:.0} p99 {:.0} max {:.0} ms; within 1 s (planned span {:.0} ms) p50 {:.0} p99 {:.0} max {:.0} ms",
        l.same_instant.planned_span_ms,
        l.same_instant.p50,
        l.same_instant.p99,
        l.same_instant.max,
        l.one_second.planned_span_ms,
        l.one_second.p50,
        l.one_second.p99,
        l.one_second.max
    );
    Ok(l)
}

// -----------------------------------------------------------------------------------------
// Report

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn fmt_bound(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "> 30 s".into(),
        Some(x) => format!("<= {:.0} ms", x * 1000.0),
        None => "-".into(),
    }
}

fn print_report(machine: &str, opts: &Options, baseline_mb: f64, rows: &[Row]) {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |label: &str, f: &dyn Fn(&Row) -> String| {
        lines.push((label.to_string(), rows.iter().map(f).collect()));
    };
    add(
        "Redis keys (records, provider sets, tenant configs, health hashes)",
        &|r| r.redis_keys.to_string(),
    );
    let label = format!(
        "**Registry scan + parse, library**, as the daemon's full read (SCAN on its own connection, overlapped with pipelined SMEMBERS + record reads per {TENANT_SLICE} tenants; batch {}), median of 3",
        opts.scan_batch
    );
    add(&label, &|r| format!("{:.0} ms", r.lib_ms));
    add(
        "  sequential instead: `discover()` then `read_records()`; of which discovery",
        &|r| format!("{:.0} ms; {:.0} ms", r.lib_seq_ms, r.lib_discover_ms),
    );
    add(
        "  parse alone (`parse_record_value` of the raw HGETALL answers)",
        &|r| format!("{:.0} ms", r.parse_ms),
    );
    add("  Redis round trips", &|r| r.lib_round_trips.to_string());
    add(
        "  server time of one more scan (INFO commandstats): command calls / ms, of the scan's total",
        &|r| {
            let parts: Vec<String> = r
                .lib_server
                .iter()
                .map(|(c, calls, ms)| format!("{c} {calls} / {ms:.0} ms"))
                .collect();
            format!("{}; of {:.0} ms", parts.join(", "), r.lib_check_ms)
        },
    );
    add("Naive scan (KEYS + one HGETALL per record, parsed)", &|r| {
        format!("{:.0} ms, {} round trips", r.naive_ms, r.naive_round_trips)
    });
    add(
        "Physical limit: raw pipelined HGETALL of every record, batch 1000, not parsed (1 / 4 pipelines in flight)",
        &|r| {
            format!(
                "{:.0} / {:.0} ms, {} round trips",
                r.raw1_ms, r.raw4_ms, r.raw_round_trips
            )
        },
    );
    add(
        "  the same data as the library reads: HMGET of `registry::RECORD_FIELDS` (no access_token), 4 in flight",
        &|r| format!("{:.0} ms", r.raw_hmget_ms),
    );
    add(
        "redis-benchmark -P 16 HGETALL, N requests (50 clients / 1 client)",
        &|r| match (r.rb_ms, r.rb1_ms) {
            (Some(a), Some(c)) => format!("{a:.0} ms / {c:.0} ms"),
            _ => "not available".into(),
        },
    );
    add(
        "Ratio library / raw read of the same fields (HMGET); library / raw HGETALL",
        &|r| {
            format!(
                "{:.2}x; {:.2}x",
                r.lib_ms / r.raw_hmget_ms,
                r.lib_ms / r.raw_ms
            )
        },
    );
    add("Ratio naive / library", &|r| {
        format!("{:.1}x", r.naive_ms / r.lib_ms)
    });
    add("**Start to /readyz 200**", &|r| {
        format!("{:.2} s", r.ready_s)
    });
    add(
        "  daemon's own registry scans, from its histogram: full (first) / light change scan (mean of n, change-scan-only daemon)",
        &|r| {
            let light = if r.daemon_light_scan.0 > 0.0 {
                format!(
                    "{:.0} ms (n = {:.0})",
                    r.daemon_light_scan.1 * 1000.0,
                    r.daemon_light_scan.0
                )
            } else {
                "-".into()
            };
            format!("{:.0} ms / {light}", r.daemon_full_scan.1 * 1000.0)
        },
    );
    add(
        "**Resident memory** after ready + idle window (at ready; peak)",
        &|r| {
            format!(
                "{:.1} MB ({:.1}; peak {:.1})",
                r.rss_steady_mb, r.rss_ready_mb, r.rss_hwm_mb
            )
        },
    );
    add(
        "  per tracked provider (over the empty-registry daemon)",
        &|r| format!("{:.0} B", r.rss_per_provider_b),
    );
    add("  after a /metrics scrape with per-provider series", &|r| {
        format!("{:.1} MB", r.rss_after_scrape_mb)
    });
    add(
        "**Idle CPU**, default configuration (health probes on, change events by client tracking): daemon / redis-server / endpoint",
        &|r| {
            format!(
                "{:.2} % / {:.2} % / {:.2} %",
                r.idle_cpu, r.idle_redis_cpu, r.idle_fake_cpu
            )
        },
    );
    add("  health probes per second in that window", &|r| {
        format!("{:.0}", r.probes_per_s)
    });
    add(
        "  plus each full rescan (every 300 s): daemon CPU of start + first full read; that averaged over 300 s",
        &|r| {
            format!(
                "{:.2} s; {:.2} %",
                r.first_scan_cpu_s,
                r.first_scan_cpu_s / 300.0 * 100.0
            )
        },
    );
    add(
        "Idle CPU, probes off, change scan alone (client_tracking off, no notifications): daemon / redis-server; Redis commands/s",
        &|r| {
            format!(
                "{:.2} % / {:.2} %; {:.0}",
                r.idle_cpu_scan, r.idle_redis_cpu_scan, r.idle_redis_cmds
            )
        },
    );
    add(
        "Idle CPU, probes off, keyspace notifications: daemon / redis-server",
        &|r| {
            format!(
                "{:.2} % / {:.2} %",
                r.idle_cpu_notify, r.idle_redis_cpu_notify
            )
        },
    );
    for (k, c) in [(0usize, 64usize), (1, 256)] {
        let label = format!(
            "**Refresh throughput**, max_concurrent {c}{}: steady (10-90 %) / first to last",
            if c == 64 { " (default)" } else { "" }
        );
        add(&label, &|r| match r.throughput.get(k) {
            Some(t) => format!("{:.0}/s / {:.0}/s", t.steady_rps, t.overall_rps),
            None => "-".into(),
        });
        add(
            "  CPU while refreshing, % of one core: daemon / redis-server / token endpoint (foreign)",
            &|r| match r.throughput.get(k) {
                Some(t) => format!(
                    "{:.0} / {:.0} / {:.0} ({:.0})",
                    t.cpu[0], t.cpu[1], t.cpu[2], t.cpu[3]
                ),
                None => "-".into(),
            },
        );
        add(
            "  token calls in flight at the endpoint (max); failures; reuse",
            &|r| match r.throughput.get(k) {
                Some(t) => format!(
                    "{}; {:.0}; {}",
                    t.max_in_flight,
                    t.failures,
                    t.reuse + t.invalid_grant
                ),
                None => "-".into(),
            },
        );
    }
    add(
        "  Redis commands per refresh at 64 after the first scan (server µs per refresh); registry reads (SCAN, SMEMBERS, HMGET) apart",
        &|r| match r.throughput.first() {
            Some(t) => {
                let scan = ["scan", "smembers", "hmget"];
                let own: Vec<String> = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| !scan.contains(&c.as_str()))
                    .filter(|(_, calls, _)| *calls >= 0.05)
                    .map(|(c, calls, _)| format!("{c} {calls:.1}"))
                    .collect();
                let usec: f64 = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| !scan.contains(&c.as_str()))
                    .map(|(_, _, u)| u)
                    .sum();
                let scans: Vec<String> = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| scan.contains(&c.as_str()))
                    .filter(|(_, calls, _)| *calls >= 0.05)
                    .map(|(c, calls, _)| format!("{c} {calls:.1}"))
                    .collect();
                let scans = if scans.is_empty() {
                    "none".to_string()
                } else {
                    scans.join(", ")
                };
                format!("{} ({usec:.0} µs); registry reads {scans}", own.join(", "))
            }
            None => "-".into(),
        },
    );
    add(
        "  start to /readyz 200 with N tokens due (64 / 256)",
        &|r| {
            r.throughput
                .iter()
                .map(|t| format!("{:.2} s", t.ready_s))
                .collect::<Vec<_>>()
                .join(" / ")
        },
    );
    add(
        "  daemon RSS after refreshing all N at 64 (peak)",
        &|r| match r.throughput.first() {
            Some(t) => format!("{:.1} MB ({:.1})", t.rss_end_mb, t.hwm_mb),
            None => "-".into(),
        },
    );
    add(
        "**Lateness**, 1,000 due within one second: p50 / p99 / max",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} / {:.0} / {:.0} ms",
                l.one_second.p50, l.one_second.p99, l.one_second.max
            ),
            None => "-".into(),
        },
    );
    add(
        "  planned starts span; daemon histogram p50 / p99 bucket",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} ms; {} / {}",
                l.one_second.planned_span_ms,
                fmt_bound(l.one_second.hist_p50),
                fmt_bound(l.one_second.hist_p99)
            ),
            None => "-".into(),
        },
    );
    add(
        "Lateness, 1,000 due at the same instant: p50 / p99 / max",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} / {:.0} / {:.0} ms",
                l.same_instant.p50, l.same_instant.p99, l.same_instant.max
            ),
            None => "-".into(),
        },
    );
    add(
        "  planned starts span; first to last actual start; histogram p50 / p99 bucket",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} ms; {:.0} ms; {} / {}",
                l.same_instant.planned_span_ms,
                l.same_instant.drain_ms,
                fmt_bound(l.same_instant.hist_p50),
                fmt_bound(l.same_instant.hist_p99)
            ),
            None => "-".into(),
        },
    );
    add("**/metrics scrape**, per-provider series on", &|r| {
        format!(
            "{:.0} ms, {:.2} MB",
            r.scrape_on_ms,
            r.scrape_on_bytes as f64 / 1024.0 / 1024.0
        )
    });
    add("/metrics scrape, per-provider series off", &|r| {
        format!(
            "{:.1} ms, {:.1} KB",
            r.scrape_off_ms,
            r.scrape_off_bytes as f64 / 1024.0
        )
    });

    println!("\n## tokenwarden fleet benchmark\n");
    println!(
        "- command: `FLEET_SIZES={} cargo bench --bench fleet`",
        opts.sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("- machine: {machine}");
    println!(
        "- load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("- date: {}", Utc::now().format("%Y-%m-%d %H:%M UTC"));
    println!(
        "- empty-registry daemon RSS: {baseline_mb:.1} MB; idle window {} s\n",
        opts.idle_secs
    );
    let header: Vec<String> = rows.iter().map(|r| format!("N = {}", r.n)).collect();
    println!("| | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(rows.len()));
    for (label, values) in &lines {
        println!("| {label} | {} |", values.join(" | "));
    }

    println!("\n### Targets\n");
    let largest = rows.iter().max_by_key(|r| r.n);
    let at_100k = rows.iter().find(|r| r.n == 100_000);
    let target = |name: &str, result: Option<(bool, String)>| match result {
        Some((ok, detail)) => println!("- {}: {name} ({detail})", verdict(ok)),
        None => println!("- not measured: {name} (N = 100000 not in FLEET_SIZES)"),
    };
    target(
        "scan and parse 100k providers in under 2 s",
        at_100k.map(|r| (r.lib_ms < 2000.0, format!("{:.0} ms", r.lib_ms))),
    );
    target(
        "scan within 2x of the raw pipelined read of the same fields at 100k",
        at_100k.map(|r| {
            let ratio = r.lib_ms / r.raw_hmget_ms;
            (
                ratio <= 2.0,
                format!(
                    "{ratio:.2}x of {:.0} ms; {:.2}x of a raw HGETALL read",
                    r.raw_hmget_ms,
                    r.lib_ms / r.raw_ms
                ),
            )
        }),
    );
    target(
        "under 200 MB resident at 100k",
        at_100k.map(|r| {
            let after_refresh = r.throughput.first().map_or(0.0, |t| t.rss_end_mb);
            let peak = r
                .throughput
                .iter()
                .map(|t| t.hwm_mb)
                .fold(r.rss_hwm_mb, f64::max);
            (
                r.rss_steady_mb.max(after_refresh) < 200.0,
                format!(
                    "idle {:.1} MB, after refreshing all {:.1} MB, peak {:.1} MB",
                    r.rss_steady_mb, after_refresh, peak
                ),
            )
        }),
    );
    for r in rows {
        target(
            &format!(
                "idle CPU under 1 % at N = {} (default configuration: idle window plus full rescans averaged over 300 s)",
                r.n
            ),
            Some({
                let avg = r.idle_cpu + r.first_scan_cpu_s / 300.0 * 100.0;
                (
                    avg < 1.0,
                    format!(
                        "{avg:.2} % = {:.2} % + {:.2} %",
                        r.idle_cpu,
                        r.first_scan_cpu_s / 300.0 * 100.0
                    ),
                )
            }),
        );
        target(
            &format!(
                "idle CPU under 1 % at N = {} (probes off: change scan alone)",
                r.n
            ),
            Some((r.idle_cpu_scan < 1.0, format!("{:.2} %", r.idle_cpu_scan))),
        );
    }
    if let Some(r) = largest {
        target(
            &format!(
                "at least 2,000 refreshes/s at max_concurrent 64 (N = {})",
                r.n
            ),
            r.throughput
                .first()
                .map(|t| (t.steady_rps >= 2000.0, format!("{:.0}/s", t.steady_rps))),
        );
    }
    for r in rows {
        if let Some(l) = &r.lateness {
            target(
                &format!(
                    "p99 lateness under 250 ms, 1,000 due within one second (N = {})",
                    r.n
                ),
                Some((
                    l.one_second.p99 < 250.0,
                    format!("{:.0} ms", l.one_second.p99),
                )),
            );
            target(
                &format!(
                    "p99 lateness under 250 ms, 1,000 due at the same instant (N = {})",
                    r.n
                ),
                Some((
                    l.same_instant.p99 < 250.0,
                    format!("{:.0} ms", l.same_instant.p99),
                )),
            );
        }
    }
    for r in rows {
        for t in &r.throughput {
            if t.reuse + t.invalid_grant > 0 || t.failures > 0.0 {
                println!(
                    "- WARNING: N = {} max_concurrent {}: {} failures, {} refresh-token reuses, {} invalid_grant",
                    r.n, t.concurrency, t.failures, t.reuse, t.invalid_grant
                );
            }
            if t.rotated.0 != t.rotated.1 {
                println!(
                    "- WARNING: N = {} max_concurrent {}: only {} of {} sampled records rotated",
                    r.n, t.concurrency, t.rotated.0, t.rotated.1
                );
            }
        }
    }
}
