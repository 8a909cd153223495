//! [`Context`]: what every part of a running tokenwarden shares, passed by `Arc`.
//!
//! The live configuration (swapped on SIGHUP), the Redis pool, the token client, the fleet,
//! the replica's identity, liveness and readiness flags, and the handle to the engine that
//! owns the deadlines. No globals: tests and the one-shot CLI commands build their own.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::store::Pool;
use chrono::Utc;
use tokio::sync::{mpsc, Notify};

use crate::config::Config;
use crate::engine::Msg;
use crate::fleet::SharedFleet;
use crate::health::writer::HealthWriter;
use crate::journal::Journal;
use crate::ownership::Membership;
use crate::refresh::client::TokenClient;
use crate::refresh::replay::Replayer;

/// The configuration in force; replaced whole on reload.
#[derive(Debug)]
pub struct Settings(RwLock<Arc<Config>>, AtomicUsize);

impl Settings {
    pub fn new(c: Config) -> Settings {
        Settings(RwLock::new(Arc::new(c)), AtomicUsize::new(0))
    }

    /// Bumped by every [`Settings::replace`], so holders of derived values know to rebuild.
    pub fn generation(&self) -> usize {
        self.1.load(Ordering::Relaxed)
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
        self.1.fetch_add(1, Ordering::Relaxed);
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
    /// Token answers held whose write-back Redis has not confirmed.
    pub journal_pending: AtomicUsize,
    /// Live replicas seen in the heartbeats.
    pub replicas: AtomicUsize,
    /// The journal cannot be written: no new rotating refresh starts, `/readyz` 503.
    journal_down: AtomicBool,
    /// Unix ms of this replica's last heartbeat that Redis confirmed (0: none yet).
    last_beat_ms: AtomicI64,
    /// Unix ms when Redis last became reachable again after an outage (0: never).
    recovered_at_ms: AtomicI64,
    ever_up: AtomicBool,
    /// The master generation ([`crate::store::master_generation`]) whose failover replay
    /// is done: reads are trusted while it is the current one.
    replayed_generation: AtomicU64,
    /// Woken when the first registry scan completes ([`Status::first_scan_done`]).
    first_scan: Notify,
}

impl Status {
    /// Records whether Redis answered; returns whether this changed the flag. Coming up
    /// starts the recovery grace.
    pub fn set_redis_up(&self, up: bool) -> bool {
        let changed = self.redis_up.swap(up, Ordering::Relaxed) != up;
        // The first connection is no recovery: nothing was held through an outage.
        if changed && up && self.ever_up.swap(true, Ordering::Relaxed) {
            self.recovered_at_ms
                .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
        }
        changed
    }

    /// Starts the recovery grace now, as a reconnection does (a master change: no token
    /// call until the kept journal entries were replayed into the new master).
    pub fn start_recovery(&self) {
        self.recovered_at_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// The failover replay for master generation `generation` is done.
    pub fn set_replayed_generation(&self, generation: u64) {
        self.replayed_generation
            .store(generation, Ordering::Relaxed);
    }

    /// Whether reads may be taken as the registry's state while the master generation is
    /// `generation`: its failover replay is done (while one runs, the replayed generation is
    /// still the former one).
    pub fn reads_trusted(&self, generation: u64) -> bool {
        self.replayed_generation.load(Ordering::Relaxed) == generation
    }

    /// Milliseconds since Redis last became reachable (`None`: not reachable now).
    pub fn since_recovery_ms(&self) -> Option<i64> {
        if !self.redis_up() {
            return None;
        }
        let at = self.recovered_at_ms.load(Ordering::Relaxed);
        Some(Utc::now().timestamp_millis().saturating_sub(at))
    }

    /// Token calls may start: Redis is up and the recovery grace is over (and, checked by
    /// the engine with [`Context::reads_trusted`], no master change is being repaired).
    pub fn calls_allowed(&self, grace_ms: u64) -> bool {
        self.since_recovery_ms()
            .is_some_and(|ms| ms >= i64::try_from(grace_ms).unwrap_or(i64::MAX))
    }

    pub fn beat_confirmed(&self) {
        self.last_beat_ms
            .store(Utc::now().timestamp_millis(), Ordering::Relaxed);
    }

    /// Whether this replica's heartbeat is live: the others count on it to serve its
    /// tenants; without it they take them over, so it must stop calling providers.
    pub fn heartbeat_live(&self, ttl_ms: u64) -> bool {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        last > 0
            && Utc::now().timestamp_millis().saturating_sub(last)
                < i64::try_from(ttl_ms).unwrap_or(i64::MAX)
    }

    pub fn set_journal_ok(&self, ok: bool) -> bool {
        self.journal_down.swap(!ok, Ordering::Relaxed) == ok
    }

    pub fn journal_ok(&self) -> bool {
        !self.journal_down.load(Ordering::Relaxed)
    }

    pub fn redis_up(&self) -> bool {
        self.redis_up.load(Ordering::Relaxed)
    }

    pub fn set_first_scan_done(&self) {
        self.first_scan_done.store(true, Ordering::Relaxed);
        self.first_scan.notify_waiters();
    }

    /// Returns once the first registry scan has completed (at once if it has).
    pub async fn first_scan_done(&self) {
        loop {
            let woken = self.first_scan.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.first_scan_done.load(Ordering::Relaxed) {
                return;
            }
            woken.await;
        }
    }

    pub fn ready(&self) -> bool {
        self.redis_up() && self.first_scan_done.load(Ordering::Relaxed) && self.journal_ok()
    }

    pub fn is_first_scan_done(&self) -> bool {
        self.first_scan_done.load(Ordering::Relaxed)
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

/// Sends [`Msg`]s to the engine, the one task that applies decisions. Sending after
/// shutdown is a no-op.
#[derive(Debug, Clone)]
pub struct EngineHandle(mpsc::UnboundedSender<Msg>);

impl EngineHandle {
    pub fn channel() -> (EngineHandle, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (EngineHandle(tx), rx)
    }

    pub fn send(&self, m: Msg) {
        let _ = self.0.send(m);
    }

    /// Asks the engine to refresh `id` now ([`Msg::Refresh`]) and waits for the outcome;
    /// `None` when the engine is gone.
    pub async fn refresh_now(
        &self,
        id: crate::keys::ProviderId,
        trigger: crate::refresh::Trigger,
    ) -> Option<crate::engine::transition::Attempt> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0
            .send(Msg::Refresh {
                id,
                trigger,
                reply: Some(tx),
            })
            .ok()?;
        rx.await.ok()
    }

    /// Sends a message carrying an acknowledgement and waits until the engine applied it
    /// (or is gone).
    pub async fn send_and_wait(&self, make: impl FnOnce(tokio::sync::oneshot::Sender<()>) -> Msg) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.0.send(make(tx)).is_ok() {
            let _ = rx.await;
        }
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
    /// Health hash and event writes, in their own task.
    pub health: HealthWriter,
    /// The local journal of rotated tokens (`None`: not configured or not openable).
    pub journal: Option<Journal>,
    /// Answers whose write-back is not confirmed, and their replay.
    pub replayer: Replayer,
    /// The live replicas and which tenants are this replica's.
    pub membership: Membership,
    /// This replica's write-backs, so that the change events they cause are not re-read.
    pub echoes: crate::registry::echo::Echoes,
}

impl Context {
    pub fn config(&self) -> Arc<Config> {
        self.settings.get()
    }

    /// Whether what Redis answers now is the registry's state. Not after a master change
    /// until the journal's kept entries are back in the new master
    /// ([`crate::refresh::failover`]): the new master may hold tokens already consumed, and
    /// a record read from it then would be taken for a stale write, a deleted provider or a
    /// token to refresh.
    pub fn reads_trusted(&self) -> bool {
        self.read_ticket().0.is_some()
    }

    /// Taken before a read from Redis, carried with what was read: the engine applies the
    /// read only while [`Context::ticket_valid`] (the same master as then, and reads were
    /// trusted then), so that a read of a new master racing its failover replay is dropped.
    pub fn read_ticket(&self) -> ReadTicket {
        let generation = crate::store::master_generation(&self.pool);
        ReadTicket(self.status.reads_trusted(generation).then_some(generation))
    }

    /// Whether a read taken under `ticket` may be applied now.
    pub fn ticket_valid(&self, ticket: ReadTicket) -> bool {
        ticket.0.is_some() && ticket == self.read_ticket()
    }
}

/// See [`Context::read_ticket`]: the master generation a read was taken under, when reads
/// were trusted then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTicket(Option<u64>);

/// A replica id: host name, process id and a random part.
pub fn replica_id() -> String {
    fresh_replica_id()
}

/// The replica id kept in `{state_dir}/replica-id`, made there on first use: a replica that
/// restarts on its state directory (a StatefulSet pod, a systemd unit) keeps its id, so its
/// reservations and its share of the fleet survive a quick restart. Falls back to a fresh id
/// (with a warning) when the file cannot be read or written.
pub fn stable_replica_id(state_dir: &std::path::Path) -> String {
    let path = state_dir.join("replica-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let id = text.trim();
        let ok = !id.is_empty()
            && id.len() <= 128
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
        if ok {
            return id.to_string();
        }
        tracing::warn!(path = %path.display(), "replica-id file is not a replica id: a new one is made");
    }
    let id = fresh_replica_id();
    let written =
        std::fs::create_dir_all(state_dir).and_then(|()| std::fs::write(&path, format!("{id}\n")));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "replica id not kept: it changes at every start");
    }
    id
}

fn fresh_replica_id() -> String {
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
