//! Child processes and what `/proc` says about them: spawning helpers shared by the servers of
//! the kit (exit codes, bounded waits, kill on drop, output capture, temp dirs), and the CPU
//! and memory readers the benchmark uses.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long a spawned server may take to answer for the first time.
pub(crate) const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
pub(crate) const POLL: Duration = Duration::from_millis(20);

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
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
pub fn unique_temp_dir(kind: &str) -> PathBuf {
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

/// A [`unique_temp_dir`], removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        TempDir(unique_temp_dir(kind))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes a directory when dropped, unless disarmed by taking it out.
pub(crate) struct RemoveDirOnDrop(pub(crate) Option<PathBuf>);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Exit code of a finished process; a process killed by signal N reports 128 + N, as a
/// shell would.
pub(crate) fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(-1)
}

/// Waits for `child` to exit, up to `timeout`.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
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

/// As [`wait_child`], sleeping on the async runtime instead of blocking its thread.
pub(crate) async fn wait_child_async(
    child: &Mutex<Child>,
    timeout: Duration,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let polled = lock(child).try_wait();
        match polled {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for a child process: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

pub(crate) fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Sends a signal by name (`TERM`, `HUP`, `INT`, ...) with `kill(1)`; whether it was delivered.
pub fn send_signal(pid: u32, name: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Copies `stream` line by line into `sink` (if any) and to the test's stderr, prefixed.
pub(crate) fn capture_lines(
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

pub(crate) fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        // The daemon closes a kept-alive connection after `http.header_timeout_ms` (5 s;
        // 1.5 s in the slow-loris test) without a request: a connection idle that long is
        // never reused, or a request sent just as the daemon closes it fails ("error
        // sending request").
        .pool_idle_timeout(Duration::from_secs(1))
        .build()
        .unwrap_or_else(|e| panic!("cannot build an HTTP client: {e}"))
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// -----------------------------------------------------------------------------------------
// CPU and memory, from /proc

/// (utime + stime) of a process, in clock ticks (see [`clk_tck`]).
pub fn cpu_ticks(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let rest = stat
        .rfind(')')
        .map(|at| &stat[at + 1..])
        .unwrap_or_else(|| panic!("{path}: unexpected format: {stat:?}"));
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command name: state(0) ppid(1) ... utime(11) stime(12).
    let get = |i: usize| -> u64 {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("{path}: no number in field {i}: {stat:?}"))
    };
    get(11) + get(12)
}

/// A `/proc/PID/status` field in kB (`VmRSS`, `VmHWM`).
pub fn status_kb(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{path} has no {field}"))
}

/// Resident memory of a process, in MiB.
pub fn rss_mb(pid: u32) -> f64 {
    status_kb(pid, "VmRSS") as f64 / 1024.0
}

/// Peak resident memory of a process, in MiB.
pub fn hwm_mb(pid: u32) -> f64 {
    status_kb(pid, "VmHWM") as f64 / 1024.0
}

/// Busy clock ticks of the whole machine (all CPUs), from `/proc/stat`.
pub fn machine_busy_ticks() -> u64 {
    let stat =
        std::fs::read_to_string("/proc/stat").unwrap_or_else(|e| panic!("reading /proc/stat: {e}"));
    let line = stat.lines().next().unwrap_or_default();
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let get = |i: usize| v.get(i).copied().unwrap_or(0);
    get(0) + get(1) + get(2) + get(5) + get(6) + get(7)
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 if it cannot be asked).
pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}
