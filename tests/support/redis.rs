//! [`RedisServer`]: a `redis-server` of the test's own, on a free port of 127.0.0.1 and in a
//! temporary directory of its own, persisting only on `stop()` (`SHUTDOWN SAVE`), restartable
//! from its dump; with synchronous and async connections and the `INFO` readers the
//! benchmark uses.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::process::{
    free_port, kill_and_reap, unique_temp_dir, wait_child, RemoveDirOnDrop, POLL, STARTUP_DEADLINE,
};

/// Per-command `(calls, microseconds)` from `INFO commandstats`.
pub type CommandStats = HashMap<String, (u64, u64)>;

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

impl RedisServer {
    /// Saves the data, then starts again on the same port loading it slowly: `delay_us`
    /// microseconds per key, the clients served between keys, so that every data command
    /// answers `-LOADING` meanwhile (as a Redis restarting with a large dump does). Returns
    /// once the server answers `LOADING`; [`RedisServer::wait_loaded`] waits for the end.
    pub fn restart_loading(&mut self, delay_us: u32) {
        if self.child.is_some() {
            self.stop();
        }
        let mut args = self.extra_args.clone();
        args.extend(
            [
                "--key-load-delay",
                &delay_us.to_string(),
                "--loading-process-events-interval-bytes",
                "1024",
            ]
            .map(String::from),
        );
        let child = redis_command(self.port, &self.dir, &args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let answer = self
                .client()
                .get_connection_with_timeout(Duration::from_millis(500))
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    redis::cmd("EXISTS")
                        .arg("x")
                        .query::<i64>(&mut c)
                        .map_err(|e| e.to_string())
                });
            match answer {
                // The redis crate says `BusyLoading: Redis is loading the dataset in memory`.
                Err(e) if e.to_lowercase().contains("loading") => return,
                Ok(_) => panic!(
                    "redis-server on port {} loaded its dump before it was seen loading: give it more keys or a longer delay",
                    self.port
                ),
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Err(e) => panic!("redis-server on port {} never answered LOADING: {e}", self.port),
            }
        }
    }

    /// Waits until a data command is answered (the dump loaded).
    pub fn wait_loaded(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let answer = self
                .client()
                .get_connection_with_timeout(Duration::from_millis(500))
                .and_then(|mut c| redis::cmd("EXISTS").arg("x").query::<i64>(&mut c));
            match answer {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!("redis-server on port {} still not loaded: {e}", self.port)
                }
                Err(_) => std::thread::sleep(POLL),
            }
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

/// `redis-server` on `port` in `dir` (nothing saved but by `SHUTDOWN SAVE`), its output
/// appended to `dir/redis.log`.
fn redis_command(port: u16, dir: &Path, extra_args: &[String]) -> Command {
    let log_path = dir.join("redis.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
    let log_err = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone {}: {e}", log_path.display()));
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--dbfilename", "dump.rdb"])
        .args(extra_args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    cmd
}

/// Spawns redis-server and waits until it answers PING; on failure it is killed and the
/// error carries its log.
fn spawn_redis(port: u16, dir: &Path, extra_args: &[String]) -> Result<Child, String> {
    let url = format!("redis://127.0.0.1:{port}/0");
    let client =
        redis::Client::open(url.as_str()).unwrap_or_else(|e| panic!("bad redis URL {url}: {e}"));
    let log_path = dir.join("redis.log");
    let mut child = redis_command(port, dir, extra_args)
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

impl RedisServer {
    /// The server's process id (`None` while stopped or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The URL of database `db`.
    pub fn url_db(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// An async multiplexed connection to database 0: 5 s to connect, answers awaited up to
    /// 120 s (the benchmark's bulk reads).
    pub async fn async_conn(&self) -> MultiplexedConnection {
        let cfg = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(120)));
        self.client()
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to redis at {}: {e}", self.url()))
    }
}

/// A `MONITOR` connection: every command the server runs from now on, as the server prints
/// it (`<time> [<db> <client address>|lua] "<command>" "<arg>" ...`).
pub struct Monitor {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Monitor {
    /// Starts monitoring `redis` (the server confirmed `MONITOR` when this returns).
    pub async fn start(redis: &RedisServer) -> Monitor {
        use futures_util::StreamExt;
        let monitor = redis
            .client()
            .get_async_monitor()
            .await
            .unwrap_or_else(|e| panic!("MONITOR on {}: {e}", redis.url()));
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        let task = tokio::spawn(async move {
            let mut stream = monitor.into_on_message::<String>();
            while let Some(line) = stream.next().await {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Monitor { lines, task }
    }

    /// The lines seen so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The lines of `command` (any case) sent by a client, not run by a script.
    pub fn client_commands(&self, command: &str) -> Vec<String> {
        let quoted = format!("\"{}\"", command.to_ascii_lowercase());
        self.lines()
            .into_iter()
            .filter(|l| !l.contains(" lua]"))
            .filter(|l| {
                l.split_once("] ")
                    .is_some_and(|(_, cmd)| cmd.to_ascii_lowercase().starts_with(&quoted))
            })
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `CONFIG SET key value`.
pub async fn config_set(conn: &mut MultiplexedConnection, key: &str, value: &str) {
    redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async::<()>(conn)
        .await
        .unwrap_or_else(|e| panic!("CONFIG SET {key} {value:?}: {e}"));
}

/// `total_commands_processed` of `INFO stats`.
pub async fn total_commands(conn: &mut MultiplexedConnection) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("INFO stats: {e}"));
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO stats has no total_commands_processed"))
}

/// `INFO commandstats`: command -> (calls, microseconds).
pub async fn commandstats(conn: &mut MultiplexedConnection) -> CommandStats {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .unwrap_or_else(|e| panic!("INFO commandstats: {e}"));
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
    out
}

/// Commands issued between two [`commandstats`] snapshots as (command, calls, µs), most
/// frequent first.
pub fn command_delta(before: &CommandStats, after: &CommandStats) -> Vec<(String, u64, u64)> {
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

/// A Sentinel (`redis-server --sentinel`) watching the master `mymaster` at `127.0.0.1:
/// master_port`, with a quick failover (`down-after-milliseconds` 1000).
pub struct SentinelServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// The master name [`SentinelServer`] monitors.
pub const SENTINEL_MASTER: &str = "mymaster";

impl SentinelServer {
    pub fn start(master_port: u16) -> SentinelServer {
        let dir = unique_temp_dir("sentinel");
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master_port} 1\n\
             sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
             sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
             sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
            dir.display()
        );
        std::fs::write(&conf, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", conf.display()));
        let log = std::fs::File::create(dir.join("sentinel.log"))
            .unwrap_or_else(|e| panic!("cannot create the sentinel log: {e}"));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot clone the log: {e}"));
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run redis-server --sentinel: {e}"));
        let s = SentinelServer {
            port,
            dir,
            child: Some(child),
        };
        let client = redis::Client::open(s.url().as_str()).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            let master: Option<Vec<String>> = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .ok()
                .and_then(|mut c| {
                    redis::cmd("SENTINEL")
                        .arg("GET-MASTER-ADDR-BY-NAME")
                        .arg(SENTINEL_MASTER)
                        .query(&mut c)
                        .ok()
                });
            if master.is_some_and(|m| m.len() == 2) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel did not come up; its log:\n{}",
                std::fs::read_to_string(s.dir.join("sentinel.log")).unwrap_or_default()
            );
            std::thread::sleep(POLL);
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The master's port as this Sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let client = redis::Client::open(self.url().as_str()).ok()?;
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let addr: Vec<String> = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(SENTINEL_MASTER)
            .query(&mut c)
            .ok()?;
        addr.get(1)?.parse().ok()
    }

    /// `SENTINEL FAILOVER mymaster`: promotes a replica now.
    pub fn failover(&self) {
        let client = redis::Client::open(self.url().as_str()).unwrap_or_else(|e| panic!("{e}"));
        let mut c = client
            .get_connection_with_timeout(Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("sentinel: {e}"));
        redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query::<()>(&mut c)
            .unwrap_or_else(|e| panic!("SENTINEL FAILOVER: {e}"));
    }
}

impl Drop for SentinelServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_and_reap(&mut c);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A throwaway CA and a server certificate for 127.0.0.1/localhost (and a client
/// certificate), made with the `openssl` command line in a temporary directory.
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        let dir = unique_temp_dir("tls");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=tokenwarden test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap_or_else(|e| panic!("cannot write san.ext: {e}"));
        for name in ["server", "client"] {
            run(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ]);
            run(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "san.ext",
                "-out",
                &format!("{name}.crt"),
            ]);
        }
        TlsFiles { dir }
    }

    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// `redis-server` arguments for a TLS port next to the plain one, client certificates
    /// required when `mutual`.
    pub fn server_args(&self, tls_port: u16, mutual: bool) -> Vec<String> {
        vec![
            "--tls-port".into(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            self.path("server.crt"),
            "--tls-key-file".into(),
            self.path("server.key"),
            "--tls-ca-cert-file".into(),
            self.path("ca.crt"),
            "--tls-auth-clients".into(),
            if mutual { "yes" } else { "no" }.into(),
        ]
    }
}

impl Drop for TlsFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
