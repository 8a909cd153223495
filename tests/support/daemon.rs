//! [`Daemon`]: the `tokenwarden` binary as a child process (`tokenwarden run`), its output
//! captured for assertions and echoed to the test's stderr (shown when a test fails), or
//! written to a file; and [`Daemon::cli`] for the one-shot commands.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::process::{
    capture_lines, exit_code, free_port, http_client, hwm_mb, kill_and_reap, lock, rss_mb,
    send_signal, unique_temp_dir, wait_child, wait_child_async,
};
use super::redis::RedisServer;

/// How long a one-shot `tokenwarden` command may run.
const CLI_DEADLINE: Duration = Duration::from_secs(60);

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
    logs: Logs,
    readers: Mutex<Vec<JoinHandle<()>>>,
    http: reqwest::Client,
    started: Instant,
}

/// Where a daemon's output goes.
enum Logs {
    /// Kept in memory and echoed to the test's stderr, line by line.
    Captured(Arc<Mutex<String>>),
    /// Written straight into a file (the benchmark's large fleets).
    File(PathBuf),
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
        Daemon::spawn(redis, args, env, None)
    }

    /// As [`Daemon::start`], its output written into the file `log` (created or truncated)
    /// instead of kept in memory and echoed: for daemons that log a lot.
    /// [`Daemon::logs`] reads that file.
    pub fn start_logging_to(redis: &RedisServer, env: &[(&str, &str)], log: &Path) -> Daemon {
        Daemon::spawn(redis, &[], env, Some(log))
    }

    fn spawn(
        redis: &RedisServer,
        args: &[&str],
        env: &[(&str, &str)],
        log_file: Option<&Path>,
    ) -> Daemon {
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
        // A journal of its own, unless the test names one (to restart on the same one).
        cmd.env("TOKENWARDEN_REDIS_URL", redis.url())
            .env("TOKENWARDEN_LISTEN", &listen)
            .env("TOKENWARDEN_LOG", "info")
            .env("TOKENWARDEN_STATE_DIR", unique_temp_dir("state"))
            // The data sync is off unless a test turns it on (`tests/sync.rs`): a scheduled
            // sync refreshes expiring tokens first, which would disturb refresh counts.
            .env("TOKENWARDEN_SYNC_ENABLED", "false")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        match log_file {
            Some(path) => {
                let out = File::create(path)
                    .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
                let err = out
                    .try_clone()
                    .unwrap_or_else(|e| panic!("cannot clone {}: {e}", path.display()));
                cmd.stdout(out).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let pid = child.id();
        let mut readers = Vec::new();
        let logs = match log_file {
            Some(path) => Logs::File(path.to_path_buf()),
            None => {
                let logs = Arc::new(Mutex::new(String::new()));
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
                Logs::Captured(logs)
            }
        };
        Daemon {
            child: Mutex::new(child),
            pid,
            listen,
            logs,
            readers: Mutex::new(readers),
            http: http_client(Duration::from_secs(30)),
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the daemon wrote so far, stdout and stderr interleaved by line.
    pub fn logs(&self) -> String {
        match &self.logs {
            Logs::Captured(logs) => lock(logs).clone(),
            Logs::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// The last `lines` lines of [`Daemon::logs`], for failure messages.
    pub fn logs_tail(&self, lines: usize) -> String {
        let logs = self.logs();
        let all: Vec<&str> = logs.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// When the process was spawned.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// `http://LISTEN`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.listen)
    }

    /// GET on the daemon's listener: (status, body); status 0 with the error text when the
    /// request could not be made (not listening yet, or gone).
    pub async fn get(&self, path: &str) -> (u16, String) {
        self.get_with_timeout(path, Duration::from_secs(5)).await
    }

    /// As [`Daemon::get`], waiting up to `timeout` for the whole answer.
    pub async fn get_with_timeout(&self, path: &str, timeout: Duration) -> (u16, String) {
        let url = format!("{}{path}", self.base_url());
        let resp = match self.http.get(&url).timeout(timeout).send().await {
            Ok(resp) => resp,
            Err(e) => {
                // reqwest's message names the URL only; the cause is in its sources.
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text.push_str(&format!(": {s}"));
                    source = s.source();
                }
                return (0, text);
            }
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

    /// Polls `/readyz` every `poll` until it answers 200: the time from spawn to that answer.
    /// Panics (with the tail of the logs) on timeout or if the daemon exits first.
    pub async fn ready_after(&self, timeout: Duration, poll: Duration) -> Duration {
        loop {
            self.assert_running();
            if self.get("/readyz").await.0 == 200 {
                return self.started.elapsed();
            }
            if self.started.elapsed() > timeout {
                panic!(
                    "tokenwarden not ready within {timeout:?}; log tail:\n{}",
                    self.logs_tail(30)
                );
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// Panics, with the tail of the logs, if the daemon has exited.
    pub fn assert_running(&self) {
        if let Some(code) = self.exit_status() {
            panic!(
                "tokenwarden exited with {code}; log tail:\n{}",
                self.logs_tail(30)
            );
        }
    }

    /// `GET /metrics` (waiting up to 120 s for a large exposition); panics unless 200.
    pub async fn metrics(&self) -> String {
        let (status, body) = self
            .get_with_timeout("/metrics", Duration::from_secs(120))
            .await;
        assert_eq!(
            status,
            200,
            "/metrics answered {status}: {body}; log tail:\n{}",
            self.logs_tail(30)
        );
        body
    }

    /// Resident memory, MiB.
    pub fn rss_mb(&self) -> f64 {
        rss_mb(self.pid)
    }

    /// Peak resident memory, MiB.
    pub fn hwm_mb(&self) -> f64 {
        hwm_mb(self.pid)
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; awaits the exit without
    /// blocking the runtime. Its exit code (128 + N for signal N).
    pub async fn terminate(&self, grace: Duration) -> i32 {
        if self.exit_status().is_none() {
            send_signal(self.pid, "TERM");
        }
        let status = match wait_child_async(&self.child, grace).await {
            Some(status) => status,
            None => {
                let mut child = lock(&self.child);
                let _ = child.kill();
                child
                    .wait()
                    .unwrap_or_else(|e| panic!("waiting for tokenwarden {}: {e}", self.pid))
            }
        };
        self.join_readers();
        exit_code(status)
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
        cmd.env("TOKENWARDEN_STATE_DIR", unique_temp_dir("cli-state"))
            .envs(env.iter().copied())
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
