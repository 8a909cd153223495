//! [`FakeProvider`]: a running `tokenwarden-fake-provider` (the example built from
//! `tests/fake_provider/`), a strict OAuth token endpoint, with async helpers for its control
//! endpoints; and [`fake_provider_bin`], which finds that binary.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::process::{capture_lines, http_client, kill_and_reap, STARTUP_DEADLINE};

/// The example's name (`[[example]]` in Cargo.toml).
pub const FAKE_PROVIDER: &str = "tokenwarden-fake-provider";
/// Overrides where the binary is looked for.
pub const FAKE_PROVIDER_BIN_ENV: &str = "FAKE_PROVIDER_BIN";

/// The `tokenwarden-fake-provider` binary. Cargo builds examples for `cargo test` and
/// `cargo nextest run` (whole-package runs) but gives their path to no test, so it is found
/// beside the running test or benchmark: `target/<profile>/deps/<this binary>` ->
/// `target/<profile>/examples/tokenwarden-fake-provider` (or `$FAKE_PROVIDER_BIN`).
///
/// Panics, naming the command that builds it, when it is missing or older than its sources
/// (a run filtered to some tests, such as `cargo nextest run --test refresh`, or a
/// `cargo bench --bench fleet`, does not build examples).
pub fn fake_provider_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_fake_provider).clone()
}

fn locate_fake_provider() -> PathBuf {
    if let Some(path) = std::env::var_os(FAKE_PROVIDER_BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{FAKE_PROVIDER_BIN_ENV}={} is not a file",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("cannot tell where this test binary is: {e}"));
    let mut profile_dir = exe
        .parent()
        .unwrap_or_else(|| panic!("{} has no parent directory", exe.display()))
        .to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let bin = profile_dir.join("examples").join(FAKE_PROVIDER);
    let build = build_command(&profile_dir);
    let Some(built) = modified(&bin) else {
        panic!(
            "{} is missing: build it with `{build}` (`cargo nextest run` and `cargo test` \
             without target filters build it; filtered runs and `cargo bench` do not)",
            bin.display()
        );
    };
    let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_provider");
    if let Some(newer) = newer_source(&sources, built) {
        panic!(
            "{} is older than {}: rebuild it with `{build}`",
            bin.display(),
            newer.display()
        );
    }
    bin
}

/// The `cargo build` command that puts the example in `profile_dir`.
fn build_command(profile_dir: &Path) -> String {
    let profile = profile_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let flag = match profile.as_str() {
        "debug" => String::new(),
        "release" => "--release ".to_string(),
        other => format!("--profile {other} "),
    };
    format!("cargo build {flag}--example {FAKE_PROVIDER}")
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A `.rs` file under `dir` modified after `built`, if any.
fn newer_source(dir: &Path, built: SystemTime) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if let Some(found) = newer_source(&path, built) {
                return Some(found);
            }
        } else if path.extension().is_some_and(|e| e == "rs")
            && modified(&path).is_some_and(|m| m > built)
        {
            return Some(path);
        }
    }
    None
}

/// A running `tokenwarden-fake-provider`.
pub struct FakeProvider {
    port: u16,
    child: Child,
    http: reqwest::Client,
}

impl FakeProvider {
    /// Starts the fake with access tokens living `ttl_secs` seconds.
    pub fn start(ttl_secs: u64) -> FakeProvider {
        let path = fake_provider_bin();
        let bin = path.display();
        let mut child = Command::new(&path)
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
            http: http_client(Duration::from_secs(30)),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The fake's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
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

    /// Registers any number of clients, in requests of at most 25,000.
    pub async fn seed_many(&self, clients: &[Value]) {
        for chunk in clients.chunks(25_000) {
            self.seed_bulk(chunk.to_vec()).await;
        }
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
