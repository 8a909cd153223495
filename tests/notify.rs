//! systemd's notify protocol, end to end: the real daemon started with `NOTIFY_SOCKET`
//! pointing at a Unix datagram socket this test owns (as systemd would) and
//! `WATCHDOG_USEC=2000000`. Asserts `READY=1` once the first registry scan is done (and
//! `/readyz` agrees), `WATCHDOG=1` about every second, `RELOADING=1` (with `MONOTONIC_USEC`)
//! then `READY=1` on SIGHUP, `STOPPING=1` on SIGTERM, and a `STATUS=` line. The messages are
//! printed as received.

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{seed_provider, wait_until, Daemon, RedisServer};

/// One received datagram, with when it arrived.
#[derive(Debug, Clone)]
struct Message {
    at: Instant,
    text: String,
}

/// The service manager's end: a datagram socket in a fresh directory, read by a thread.
struct NotifySocket {
    dir: PathBuf,
    path: PathBuf,
    received: Arc<Mutex<Vec<Message>>>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = std::env::temp_dir().join(format!(
            "tw-notify-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&dir).expect("create the socket directory");
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("set a read timeout");
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&received);
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        eprintln!("[notify] {}", text.trim_end().replace('\n', " | "));
                        sink.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Message {
                                at: Instant::now(),
                                text,
                            });
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if Arc::strong_count(&sink) == 1 {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        NotifySocket {
            dir,
            path,
            received,
        }
    }

    fn messages(&self) -> Vec<Message> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Index of the first message at or after `from` that has the line `line`.
    fn find(&self, from: usize, line: &str) -> Option<usize> {
        self.messages()
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, m)| m.text.lines().any(|l| l == line))
            .map(|(i, _)| i)
    }

    async fn wait_for(&self, from: usize, line: &str, timeout: Duration) -> usize {
        wait_until(&format!("{line} on the notify socket"), timeout, || {
            self.find(from, line).is_some()
        })
        .await;
        self.find(from, line).unwrap_or_default()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_systemds_notify_protocol() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    // One active record whose token is good for hours: nothing to refresh, so the test sees
    // only the protocol.
    let expiry = (chrono::Utc::now() + chrono::Duration::hours(6)).to_rfc3339();
    seed_provider(
        &mut conn,
        "acme",
        "goto",
        &[
            ("provider_type", "goto"),
            ("status", "active"),
            ("auth_type", "oauth"),
            ("client_id", "cid"),
            ("client_secret", "notify-test-secret"),
            ("account_key", "1"),
            ("access_token", "at-notify"),
            ("refresh_token", "rt-notify"),
            ("token_expiry", expiry.as_str()),
            ("token_url", "http://127.0.0.1:9/token"),
        ],
    );
    let socket = NotifySocket::bind();
    let sock = socket.path.to_string_lossy().into_owned();
    let daemon = Daemon::start(
        &redis,
        &[
            ("NOTIFY_SOCKET", sock.as_str()),
            ("WATCHDOG_USEC", "2000000"),
            ("TOKENWARDEN_HEALTH_ENABLED", "false"),
        ],
    );

    // READY=1 once the first scan is done: /readyz agrees at that moment.
    let ready = socket.wait_for(0, "READY=1", Duration::from_secs(20)).await;
    let (code, body) = daemon.get("/readyz").await;
    assert_eq!(code, 200, "READY=1 sent but /readyz says {code} {body}");
    let status = socket
        .messages()
        .iter()
        .take(ready + 1)
        .flat_map(|m| m.text.lines().map(str::to_string).collect::<Vec<_>>())
        .find(|l| l.starts_with("STATUS="));
    assert_eq!(
        status.as_deref(),
        Some("STATUS=tracking 1 provider, redis up, journal 0 pending"),
        "no STATUS line with (or before) READY=1"
    );

    // WATCHDOG=1 every WATCHDOG_USEC/2 = 1 s: at least four in the next ~4.5 s, none more
    // than 1.5 s apart.
    let first_ping = socket
        .wait_for(0, "WATCHDOG=1", Duration::from_secs(5))
        .await;
    wait_until("four watchdog pings", Duration::from_secs(8), || {
        socket
            .messages()
            .iter()
            .skip(first_ping)
            .filter(|m| m.text.lines().any(|l| l == "WATCHDOG=1"))
            .count()
            >= 4
    })
    .await;
    let pings: Vec<Instant> = socket
        .messages()
        .iter()
        .filter(|m| m.text.lines().any(|l| l == "WATCHDOG=1"))
        .map(|m| m.at)
        .collect();
    for w in pings.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap < Duration::from_millis(1500) && gap > Duration::from_millis(500),
            "watchdog pings {gap:?} apart (expected about 1 s)"
        );
    }

    // SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
    let before = socket.messages().len();
    daemon.sighup();
    let reloading = socket
        .wait_for(before, "RELOADING=1", Duration::from_secs(10))
        .await;
    let text = &socket.messages()[reloading].text;
    assert!(
        text.lines().any(|l| l.starts_with("MONOTONIC_USEC=")
            && l["MONOTONIC_USEC=".len()..].parse::<u64>().is_ok()),
        "RELOADING=1 without MONOTONIC_USEC: {text:?}"
    );
    socket
        .wait_for(reloading, "READY=1", Duration::from_secs(10))
        .await;

    // SIGTERM: STOPPING=1, then a clean exit.
    let before = socket.messages().len();
    daemon.sigterm();
    socket
        .wait_for(before, "STOPPING=1", Duration::from_secs(10))
        .await;
    let code = daemon.wait_exit(Duration::from_secs(30));
    assert_eq!(code, Some(0), "logs:\n{}", daemon.logs());

    println!("notify messages, in order:");
    for m in socket.messages() {
        println!("  {}", m.text.trim_end().replace('\n', " | "));
    }
    assert!(!daemon.logs().contains("notify-test-secret"));
}
