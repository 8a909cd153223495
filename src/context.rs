//! [`Context`]: what every part of a running tokenwarden shares, passed by `Arc`.
//!
//! The live configuration (swapped on SIGHUP), the Redis pool, the token client, the fleet,
//! the replica's identity, liveness and readiness flags, and the handle to the engine that
//! owns the deadlines. No globals: tests and the one-shot CLI commands build their own.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use deadpool_redis::Pool;
use tokio::sync::mpsc;

use crate::config::Config;
use crate::fleet::SharedFleet;
use crate::keys::ProviderId;
use crate::refresh::client::TokenClient;

/// The configuration in force; replaced whole on reload.
#[derive(Debug)]
pub struct Settings(RwLock<Arc<Config>>);

impl Settings {
    pub fn new(c: Config) -> Settings {
        Settings(RwLock::new(Arc::new(c)))
    }

    pub fn get(&self) -> Arc<Config> {
        self.0
            .read()
            .map(|g| Arc::clone(&g))
            .unwrap_or_else(|p| Arc::clone(&p.into_inner()))
    }

    pub fn replace(&self, c: Config) {
        let mut g = self.0.write().unwrap_or_else(|p| p.into_inner());
        *g = Arc::new(c);
    }
}

/// Liveness and readiness, read by `/healthz`, `/readyz` and `/metrics`.
#[derive(Debug, Default)]
pub struct Status {
    redis_up: AtomicBool,
    first_scan_done: AtomicBool,
    /// Unix ms of the engine loop's last turn.
    heartbeat_ms: AtomicI64,
    /// Due tokens waiting for a refresh slot.
    pub queue_len: AtomicUsize,
}

impl Status {
    /// Records whether Redis answered; returns whether this changed the flag.
    pub fn set_redis_up(&self, up: bool) -> bool {
        self.redis_up.swap(up, Ordering::Relaxed) != up
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn set_first_scan_done(&self) {
        self.first_scan_done.store(true, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.redis_up() && self.first_scan_done.load(Ordering::Relaxed)
    }

    pub fn beat(&self) {
        self.heartbeat_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Milliseconds since the engine loop last turned.
    pub fn since_heartbeat_ms(&self) -> i64 {
        Utc::now().timestamp_millis() - self.heartbeat_ms.load(Ordering::Relaxed)
    }
}

/// Orders for the engine, the single owner of the deadlines.
#[derive(Debug)]
pub enum Command {
    /// Refresh `id` at this time (moves an existing deadline).
    Schedule(ProviderId, DateTime<Utc>),
    /// Forget the deadline of `id`.
    Unschedule(ProviderId),
    /// An attempt on `id` finished; schedule its next one if given.
    Finished(ProviderId, Option<DateTime<Utc>>),
}

/// Sends [`Command`]s to the engine. Sending after shutdown is a no-op.
#[derive(Debug, Clone)]
pub struct EngineHandle(mpsc::UnboundedSender<Command>);

impl EngineHandle {
    pub fn channel() -> (EngineHandle, mpsc::UnboundedReceiver<Command>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EngineHandle(tx), rx)
    }

    pub fn send(&self, c: Command) {
        let _ = self.0.send(c);
    }
}

/// Everything shared.
pub struct Context {
    pub settings: Settings,
    pub pool: Pool,
    pub client: TokenClient,
    pub fleet: SharedFleet,
    /// This replica's id (host name and process id): the prefix of lock owner values.
    pub replica: String,
    pub status: Status,
    pub engine: EngineHandle,
}

impl Context {
    pub fn config(&self) -> Arc<Config> {
        self.settings.get()
    }
}

/// A replica id: host name, process id and a random part.
pub fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "tokenwarden".into());
    format!(
        "{host}:{}:{:06x}",
        std::process::id(),
        fastrand::u32(..0x100_0000)
    )
}
