//! Integration-test harness, shared by every `tests/*.rs` file as `mod support;`.
//!
//! Each test gets real processes of its own, on ports of its own:
//! - [`RedisServer`]: a `redis-server` with its own temporary directory, stoppable with
//!   `SHUTDOWN SAVE` and restartable from its dump;
//! - [`FakeProvider`]: the `tokenwarden-fake-provider` binary, a strict OAuth token endpoint,
//!   with async helpers for its control endpoints;
//! - [`Daemon`]: the `tokenwarden` binary, its output captured for assertions and echoed to
//!   the test's stderr (shown when a test fails).
//!
//! Nothing here skips: a missing `redis-server` or binary makes the test panic with a message
//! that says what to install. Waits are bounded by deadlines ([`wait_until`]), never blind
//! sleeps. Every process is killed when its handle is dropped, also when a test panics.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// How long a spawned server may take to answer for the first time.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// How long a one-shot `tokenwarden` command may run.
const CLI_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding a lock must not hide its own failure behind ours.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this test process has not
/// handed out before.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0 to find a free port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr of a bound listener: {e}"))
            .port();
        if lock(handed_out).insert(port) {
            return port;
        }
    }
    panic!("no new free port found in 100 tries");
}

/// A fresh, empty directory under the system temp dir.
fn unique_temp_dir(kind: &str) -> PathBuf {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "tokenwarden-test-{kind}-{}-{}-{nanos}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed),
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", dir.display()));
    dir
}

/// Exit code of a finished process; a process killed by signal N reports 128 + N, as a
/// shell would.
fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(-1)
}

/// Waits for `child` to exit, up to `timeout`.
fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for process {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Copies `stream` line by line into `sink` (if any) and to the test's stderr, prefixed.
fn capture_lines(
    stream: impl Read + Send + 'static,
    prefix: String,
    sink: Option<Arc<Mutex<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']);
                    eprintln!("{prefix} {line}");
                    if let Some(sink) = &sink {
                        let mut sink = lock(sink);
                        sink.push_str(line);
                        sink.push('\n');
                    }
                }
            }
        }
    })
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("cannot build an HTTP client: {e}"))
}

// -----------------------------------------------------------------------------------------
// Redis

/// A `redis-server` of this test's own, on 127.0.0.1, persisting only on `stop()`.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with_args(&[])
    }

    /// Starts with extra arguments, e.g. `&["--notify-keyspace-events", "KEA"]`.
    pub fn start_with_args(extra_args: &[&str]) -> RedisServer {
        let dir = unique_temp_dir("redis");
        // Removes the directory if we panic before a RedisServer owns it.
        let mut cleanup = RemoveDirOnDrop(Some(dir.clone()));
        let extra_args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        let mut failures = Vec::new();
        // A port found free can be taken by another test process before redis binds it.
        for _ in 0..3 {
            let port = free_port();
            match spawn_redis(port, &dir, &extra_args) {
                Ok(child) => {
                    cleanup.0 = None;
                    return RedisServer {
                        port,
                        dir,
                        extra_args,
                        child: Some(child),
                    };
                }
                Err(e) => failures.push(format!("port {port}: {e}")),
            }
        }
        panic!("redis-server did not start:\n{}", failures.join("\n"));
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url())
            .unwrap_or_else(|e| panic!("bad redis URL {}: {e}", self.url()))
    }

    /// A synchronous connection.
    pub fn conn(&self) -> redis::Connection {
        self.client()
            .get_connection_with_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("cannot connect to redis at {}: {e}", self.url()))
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `SHUTDOWN SAVE` (the data survives in the dump), then waits for the process to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            panic!(
                "RedisServer::stop: redis-server on port {} is not running",
                self.port
            );
        };
        let mut conn = match self
            .client()
            .get_connection_with_timeout(Duration::from_secs(5))
        {
            Ok(conn) => conn,
            Err(e) => {
                kill_and_reap(&mut child);
                panic!(
                    "cannot connect to redis-server on port {} to stop it: {e}",
                    self.port
                );
            }
        };
        match redis::cmd("SHUTDOWN").arg("SAVE").query::<()>(&mut conn) {
            Ok(()) => {}
            // The server closes the connection instead of answering: that is success.
            Err(e)
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() => {}
            Err(e) => {
                kill_and_reap(&mut child);
                panic!(
                    "redis-server on port {} refused SHUTDOWN SAVE: {e}",
                    self.port
                );
            }
        }
        if wait_child(&mut child, STARTUP_DEADLINE).is_none() {
            kill_and_reap(&mut child);
            panic!(
                "redis-server on port {} did not exit within {STARTUP_DEADLINE:?} of SHUTDOWN SAVE",
                self.port
            );
        }
    }

    /// Kills the server with SIGKILL: nothing is saved, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Starts again on the same port and directory (loading `dump.rdb`) and waits for PING.
    /// A running server is stopped first with `SHUTDOWN SAVE`.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        match spawn_redis(self.port, &self.dir, &self.extra_args) {
            Ok(child) => self.child = Some(child),
            Err(e) => panic!("redis-server did not restart on port {}: {e}", self.port),
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct RemoveDirOnDrop(Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Spawns redis-server and waits until it answers PING; on failure it is killed and the
/// error carries its log.
fn spawn_redis(port: u16, dir: &Path, extra_args: &[String]) -> Result<Child, String> {
    let url = format!("redis://127.0.0.1:{port}/0");
    let client =
        redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("bad redis URL {url}: {e}"));
    let log_path = dir.join("redis.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone {}: {e}", log_path.display()));
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--dbfilename", "dump.rdb"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run redis-server ({e}): the integration tests need a real Redis on \
                 PATH (Debian/Ubuntu: apt-get install redis-server)"
            )
        });
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + STARTUP_DEADLINE;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server exited with {status}; its log:\n{}",
                read_log()
            ));
        }
        let last_error = match client.get_connection_with_timeout(Duration::from_millis(500)) {
            Ok(mut conn) => match redis::cmd("PING").query::<String>(&mut conn) {
                Ok(pong) if pong == "PONG" => return Ok(child),
                Ok(other) => format!("PING answered {other:?}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Err(format!(
                "no PING answer within {STARTUP_DEADLINE:?} (last error: {last_error}); its log:\n{}",
                read_log()
            ));
        }
        std::thread::sleep(POLL);
    }
}

// -----------------------------------------------------------------------------------------
// Fake OAuth provider

/// A running `tokenwarden-fake-provider`.
pub struct FakeProvider {
    port: u16,
    child: Child,
    http: reqwest::Client,
}

impl FakeProvider {
    /// Starts the fake with access tokens living `ttl_secs` seconds.
    pub fn start(ttl_secs: u64) -> FakeProvider {
        let bin = env!("CARGO_BIN_EXE_tokenwarden-fake-provider");
        let mut child = Command::new(bin)
            .args(["--listen", "127.0.0.1:0", "--ttl", &ttl_secs.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let pid = child.id();
        let stdout = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("fake provider stdout was not piped"));
        if let Some(stderr) = child.stderr.take() {
            capture_lines(stderr, format!("[fake-provider {pid}]"), None);
        }
        // The first stdout line is the port; the rest (none expected) is echoed.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let read = reader.read_line(&mut first).map(|_| first);
            let _ = tx.send(read);
            let mut line = String::new();
            while matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                eprintln!("[fake-provider {pid}] {}", line.trim_end());
                line.clear();
            }
        });
        let port = match rx.recv_timeout(STARTUP_DEADLINE) {
            Ok(Ok(line)) => line.trim().parse::<u16>().ok(),
            _ => None,
        };
        let Some(port) = port else {
            kill_and_reap(&mut child);
            panic!("{bin} did not print its port within {STARTUP_DEADLINE:?}");
        };
        FakeProvider {
            port,
            child,
            http: http_client(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn token_url(&self) -> String {
        format!("{}/token", self.url())
    }

    /// A base URL for provider API calls (`/api/...` answers 200 to a live access token).
    pub fn api_url(&self) -> String {
        format!("{}/api", self.url())
    }

    /// POSTs JSON to a control endpoint; panics unless it answers 2xx.
    pub async fn post(&self, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.url());
        let resp = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: {e}"));
        let status = resp.status();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("POST {url}: reading the answer: {e}"));
        assert!(
            status.is_success(),
            "POST {url} {body} answered {status}: {text}"
        );
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("POST {url} answered non-JSON ({e}): {text}"))
    }

    /// Registers or updates a client: `{"client_id", "client_secret", "refresh_token"?, ...}`.
    pub async fn seed(&self, client: Value) -> Value {
        self.post("/seed", client).await
    }

    /// Registers many clients in one request.
    pub async fn seed_bulk(&self, clients: Vec<Value>) -> Value {
        self.post("/seed-bulk", serde_json::json!({ "clients": clients }))
            .await
    }

    /// Switches a client's faults: `{"client_id": .., "fail_503": 2, ...}`.
    pub async fn faults(&self, faults: Value) -> Value {
        self.post("/faults", faults).await
    }

    /// Global behaviour: `{"delay_ms": D}`.
    pub async fn mode(&self, mode: Value) -> Value {
        self.post("/mode", mode).await
    }

    /// All counters, with per-client detail under `"clients"`.
    pub async fn stats(&self) -> Value {
        self.get_json("/stats").await
    }

    /// Counters without the per-client map.
    pub async fn stats_summary(&self) -> Value {
        self.get_json("/stats?summary=1").await
    }

    /// One client's counters and `live_refresh_token`.
    pub async fn client_stats(&self, client_id: &str) -> Value {
        let stats = self.stats().await;
        stats["clients"][client_id].clone()
    }

    async fn get_json(&self, path: &str) -> Value {
        let url = format!("{}{path}", self.url());
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = resp.status();
        let text = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: reading the answer: {e}"));
        assert!(status.is_success(), "GET {url} answered {status}: {text}");
        serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {url} answered non-JSON ({e}): {text}"))
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

// -----------------------------------------------------------------------------------------
// The daemon and the CLI

/// Removes the caller's `TOKENWARDEN_*` variables so a test sees only what it sets.
fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOKENWARDEN_") {
            cmd.env_remove(key);
        }
    }
}

/// A running `tokenwarden run`.
pub struct Daemon {
    child: Mutex<Child>,
    pid: u32,
    listen: String,
    logs: Arc<Mutex<String>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
    http: reqwest::Client,
}

impl Daemon {
    /// `tokenwarden run` against `redis`, listening on a free port, log level `info`;
    /// `env` adds or overrides variables (including `TOKENWARDEN_LISTEN` and
    /// `TOKENWARDEN_LOG`).
    pub fn start(redis: &RedisServer, env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_args(redis, &[], env)
    }

    /// As [`Daemon::start`], with extra arguments after `run` (e.g. `--config FILE`).
    pub fn start_with_args(redis: &RedisServer, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let bin = env!("CARGO_BIN_EXE_tokenwarden");
        let listen = env
            .iter()
            .rev()
            .find(|(k, _)| *k == "TOKENWARDEN_LISTEN")
            .map(|(_, v)| v.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let mut cmd = Command::new(bin);
        cmd.arg("run").args(args);
        clean_env(&mut cmd);
        cmd.env("TOKENWARDEN_REDIS_URL", redis.url())
            .env("TOKENWARDEN_LISTEN", &listen)
            .env("TOKENWARDEN_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let pid = child.id();
        let logs = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(capture_lines(
                out,
                format!("[tokenwarden {pid}]"),
                Some(Arc::clone(&logs)),
            ));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(capture_lines(
                err,
                format!("[tokenwarden {pid} stderr]"),
                Some(Arc::clone(&logs)),
            ));
        }
        Daemon {
            child: Mutex::new(child),
            pid,
            listen,
            logs,
            readers: Mutex::new(readers),
            http: http_client(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the daemon wrote so far, stdout and stderr interleaved by line.
    pub fn logs(&self) -> String {
        lock(&self.logs).clone()
    }

    /// `http://LISTEN`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// GET on the daemon's listener: (status, body); status 0 with the error text when the
    /// request could not be made (not listening yet, or gone).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.base_url());
        let resp = match self
            .http
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(resp) => resp,
            Err(e) => return (0, e.to_string()),
        };
        let status = resp.status().as_u16();
        match resp.text().await {
            Ok(body) => (status, body),
            Err(e) => (status, format!("<unreadable body: {e}>")),
        }
    }

    /// Waits until `/readyz` answers 200; panics (with the logs) on timeout or if the
    /// daemon exits first.
    pub async fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) = self.exit_status() {
                panic!(
                    "tokenwarden exited with {code} before it was ready; logs:\n{}",
                    self.logs()
                );
            }
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tokenwarden not ready within {timeout:?} (last /readyz: {status} {body}); logs:\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit code if the daemon has exited (128 + N for signal N), without waiting.
    pub fn exit_status(&self) -> Option<i32> {
        match lock(&self.child).try_wait() {
            Ok(Some(status)) => Some(exit_code(status)),
            Ok(None) => None,
            Err(e) => panic!("waiting for tokenwarden {}: {e}", self.pid),
        }
    }

    /// Sends a signal by name (`TERM`, `HUP`, `INT`, ...) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid.to_string())
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill -{name} {}: {e}", self.pid));
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.pid
        );
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    pub fn sighup(&self) {
        self.signal("HUP");
    }

    /// SIGKILL, and reap the process.
    pub fn sigkill(&self) {
        let mut child = lock(&self.child);
        kill_and_reap(&mut child);
        drop(child);
        self.join_readers();
    }

    /// Waits up to `timeout` for the daemon to exit: its exit code (128 + N for signal N), or
    /// `None` if it is still running. Once it has exited, [`Daemon::logs`] is complete.
    /// Blocks the calling thread (the daemon is another process, so this is safe in tests).
    pub fn wait_exit(&self, timeout: Duration) -> Option<i32> {
        let status = wait_child(&mut lock(&self.child), timeout)?;
        self.join_readers();
        Some(exit_code(status))
    }

    fn join_readers(&self) {
        let readers: Vec<_> = lock(&self.readers).drain(..).collect();
        for reader in readers {
            let _ = reader.join();
        }
    }

    /// Runs a one-shot command (`status`, `refresh`, `check-config`, ...) to completion
    /// (60 s at most) with only the given `TOKENWARDEN_*` environment. Its output is also
    /// echoed to the test's stderr.
    pub fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
        let bin = env!("CARGO_BIN_EXE_tokenwarden");
        let mut cmd = Command::new(bin);
        cmd.args(args);
        clean_env(&mut cmd);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let collect = |stream: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut stream) = stream {
                    let _ = stream.read_to_end(&mut buf);
                }
                buf
            })
        };
        let stdout = collect(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let stderr = collect(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let Some(status) = wait_child(&mut child, CLI_DEADLINE) else {
            kill_and_reap(&mut child);
            panic!(
                "`tokenwarden {}` did not finish within {CLI_DEADLINE:?}",
                args.join(" ")
            );
        };
        let output = Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        eprintln!(
            "[tokenwarden {}] exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
            args.join(" "),
            exit_code(status),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
        output
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        kill_and_reap(&mut lock(&self.child));
    }
}

// -----------------------------------------------------------------------------------------
// Redis records

pub fn provider_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}")
}

pub fn health_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}:health")
}

/// Writes a provider record (`HSET tenant:{t}:provider:{p}`) and registers it
/// (`SADD tenant:{t}:providers p`). Fields as `&[("k", "v")]` or `&[(String, String)]`.
pub fn seed_provider<K: AsRef<str>, V: AsRef<str>>(
    conn: &mut redis::Connection,
    tenant: &str,
    provider: &str,
    fields: &[(K, V)],
) {
    let key = provider_key(tenant, provider);
    if !fields.is_empty() {
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (k, v) in fields {
            hset.arg(k.as_ref()).arg(v.as_ref());
        }
        hset.query::<()>(conn)
            .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
    }
    redis::cmd("SADD")
        .arg(format!("tenant:{tenant}:providers"))
        .arg(provider)
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("SADD tenant:{tenant}:providers: {e}"));
}

/// Writes `tenant:{t}:config` as the gateway's migration writes it for CloudWarriors.
pub fn seed_tenant_config(conn: &mut redis::Connection, tenant: &str) {
    let key = format!("tenant:{tenant}:config");
    redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            ("name", "Cloud Warriors"),
            ("primary_provider", "goto"),
            ("sync_strategy", "primary"),
            ("data_retention_days", "90"),
            ("timezone", "America/New_York"),
            ("created_at", "2025-01-15T10:30:00.123456"),
            ("updated_at", "2025-01-15T10:30:00.123456"),
        ])
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
}

/// A GoTo-shaped OAuth record (as the gateway's migration writes it) whose token endpoint and
/// API are `fake`'s; add or override fields before seeding.
pub fn oauth_record(
    fake: &FakeProvider,
    client_id: &str,
    client_secret: &str,
    refresh_token: &str,
    token_expiry: &str,
) -> Vec<(String, String)> {
    [
        ("provider_type", "goto"),
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("account_key", "4266846632996939781"),
        ("access_token", "at-initial"),
        ("refresh_token", refresh_token),
        ("token_expiry", token_expiry),
        ("scopes", r#"["voice-admin.v1.read", "identity:scim.org"]"#),
        ("api_base_url", &fake.api_url()),
        (
            "features_enabled",
            r#"["users", "extensions", "call_queues", "auto_attendants"]"#,
        ),
        ("sync_enabled", "True"),
        ("created_at", "2025-01-15T10:30:00.123456"),
        ("updated_at", "2025-01-15T10:30:00.123456"),
        ("token_url", &fake.token_url()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub fn hgetall(conn: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("HGETALL {key}: {e}"))
}

pub fn hget(conn: &mut redis::Connection, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(conn)
        .unwrap_or_else(|e| panic!("HGET {key} {field}: {e}"))
}

// -----------------------------------------------------------------------------------------
// Waiting

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut condition: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As [`wait_until`], for a condition that must itself await (an HTTP call, ...).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the daemon's output contains `needle`.
pub async fn wait_for_log(daemon: &Daemon, needle: &str, timeout: Duration) {
    let what = format!("tokenwarden to log {needle:?}");
    wait_until(&what, timeout, || daemon.logs().contains(needle)).await;
}
