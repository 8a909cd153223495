//! The replayer: owns every token answer whose write-back Redis has not confirmed.
//!
//! An attempt whose compare-and-set failed or timed out (Redis down, frozen, a failover)
//! hands its answer here ([`Replayer::hold`]); at start, the journal's pending entries are
//! loaded too (a previous run died holding them). [`run`] replays them with the journal's
//! compare-and-set ([`crate::journal::replay_entry`]: it writes only where the record still
//! holds the refresh and access tokens the attempt started from, and counts a record that
//! already holds the answer as written), as soon as Redis answers and then with backoff,
//! renews the reservation of each answer still held, confirms or drops journal entries, and
//! reports each outcome to the engine. It also notices when a journal that could not be
//! written works again.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::engine::transition::{Refreshed, Replayed};
use crate::engine::Msg;
use crate::journal::{replay_entry, Entry, ReplayResult};
use crate::keys::ProviderId;
use crate::lock::LockGuard;
use crate::refresh::reserve::{token_short, Reservation};
use crate::registry::Registry;
use crate::store;

/// One answer held.
#[derive(Debug, Clone)]
pub struct Held {
    pub id: ProviderId,
    pub entry: Entry,
    /// Whether the entry is in the journal (else it is in memory only).
    pub journaled: bool,
    pub reservation: Option<Reservation>,
    /// The lock of the call whose answer this is, kept until the answer is settled and then
    /// released, so that the next refresh need not wait for it to expire (after a Redis
    /// restart that kept it, up to `refresh.lock_ttl_secs`). `None` for a previous run's
    /// entries: their locks expire.
    pub lock: Option<LockGuard>,
    pub refreshed: Refreshed,
}

/// The answers held, shared by attempts and the replay task.
#[derive(Debug, Clone, Default)]
pub struct Replayer {
    held: Arc<Mutex<HashMap<String, Held>>>,
    wake: Arc<Notify>,
}

impl Replayer {
    pub fn hold(&self, h: Held) {
        self.lock().insert(h.entry.id.as_str().to_string(), h);
        self.wake.notify_one();
    }

    /// Whether an answer for `id` is held: no new call for it until it is settled.
    pub fn holds(&self, id: &ProviderId) -> bool {
        self.lock().values().any(|h| &h.id == id)
    }

    /// Answers held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wakes the replay task (Redis came back).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What is held, for the shutdown log (no secrets).
    pub fn summary(&self) -> Vec<(ProviderId, String, bool)> {
        self.lock()
            .values()
            .map(|h| (h.id.clone(), h.entry.id.as_str().to_string(), h.journaled))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Vec<Held> {
        self.lock().values().cloned().collect()
    }

    fn settle(&self, entry_id: &str) {
        self.lock().remove(entry_id);
    }
}

/// A held answer as the engine sees it once Redis has it.
fn refreshed_of(e: &Entry) -> Refreshed {
    Refreshed {
        issued: e.created_at,
        expiry: e.expires_at,
        refresh_token_expiry: e.refresh_token_expires_at,
        rotated: e.refresh_token.is_some(),
        fingerprint: 0,
        note: None,
        refresh_hash: e.refresh_token.as_ref().map(|rt| token_short(rt.expose())),
        replaced_hash: e
            .refresh_token
            .as_ref()
            .map(|_| token_short(e.old_refresh_token.expose())),
    }
}

/// Loads the journal's pending entries (a previous run's) into the replayer.
pub fn load_journal(ctx: &Context) -> usize {
    let Some(j) = &ctx.journal else { return 0 };
    match j.pending() {
        Ok(entries) => {
            let n = entries.len();
            for e in entries {
                let id = e.provider_id();
                let refreshed = refreshed_of(&e);
                ctx.replayer.hold(Held {
                    id,
                    entry: e,
                    journaled: true,
                    reservation: None,
                    lock: None,
                    refreshed,
                });
            }
            if n > 0 {
                tracing::warn!(entries = n, "journal holds token answers of an earlier run: replaying them before any token call");
            }
            n
        }
        Err(e) => {
            tracing::error!(error = %e, "journal could not be read");
            0
        }
    }
}

/// Replays until `stop`; after `stop`, [`drain`] takes over.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        let wait = if ctx.replayer.is_empty() && ctx.status.journal_ok() {
            Duration::from_secs(1)
        } else {
            backoff
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ctx.replayer.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        check_journal(&ctx);
        if last_prune.elapsed() >= Duration::from_secs(60) {
            last_prune = tokio::time::Instant::now();
            prune(&ctx);
        }
        match pass(&ctx).await {
            Ok(()) => backoff = Duration::from_millis(200),
            Err(()) => backoff = (backoff * 2).min(Duration::from_secs(5)),
        }
    }
}

/// At shutdown: keeps replaying until nothing is held or `deadline`; logs what is left.
pub async fn drain(ctx: &Context, deadline: tokio::time::Instant) {
    let mut backoff = Duration::from_millis(100);
    while !ctx.replayer.is_empty() && tokio::time::Instant::now() < deadline {
        if pass(ctx).await.is_err() {
            tokio::time::sleep(
                backoff.min(deadline.saturating_duration_since(tokio::time::Instant::now())),
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
    for (id, entry, journaled) in ctx.replayer.summary() {
        if journaled {
            tracing::warn!(tenant = %id.tenant, provider = %id.provider, entry = %entry, "answer not confirmed in Redis before exit: it stays in the journal and is replayed at the next start (or with `tokenwarden journal replay`)");
        } else {
            tracing::error!(tenant = %id.tenant, provider = %id.provider, entry = %entry, "answer not confirmed in Redis before exit and the journal could not be written: this refresh token is lost");
        }
    }
}

fn check_journal(ctx: &Context) {
    let Some(j) = &ctx.journal else { return };
    if !ctx.status.journal_ok() && j.writable_check().is_ok() && ctx.status.set_journal_ok(true) {
        tracing::info!("journal writable again: rotating refreshes resume");
    }
    ctx.status
        .journal_pending
        .store(ctx.replayer.len().max(j.pending_count()), Ordering::Relaxed);
}

fn prune(ctx: &Context) {
    let Some(j) = &ctx.journal else { return };
    let keep = Duration::from_secs(ctx.config().journal.confirmed_retention_secs);
    if let Err(e) = j.prune_confirmed(keep) {
        tracing::warn!(error = %e, "journal: confirmed entries could not be pruned");
    }
}

/// One pass over what is held. `Err` when Redis did not answer.
async fn pass(ctx: &Context) -> Result<(), ()> {
    let held = ctx.replayer.snapshot();
    if held.is_empty() {
        return Ok(());
    }
    let mut conn = store::conn(&ctx.pool).await.map_err(|_| ())?;
    let ttl = Duration::from_secs(ctx.config().refresh.reservation_ttl_secs);
    for h in held {
        let ticket = ctx.read_ticket();
        let result = match replay_entry(&mut conn, &h.entry).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "replay waits for redis");
                return Err(());
            }
        };
        if result.applied() {
            crate::refresh::writeback::confirm_replicated(&ctx.config().redis, &mut conn, &h.id)
                .await;
        }
        if let Some(j) = &ctx.journal {
            if h.journaled {
                let settled = if result.applied() {
                    j.confirm(&h.entry.id)
                } else {
                    j.drop_entry(&h.entry.id)
                };
                if let Err(e) = settled {
                    tracing::warn!(error = %e, "journal entry could not be settled");
                }
            }
        }
        if let Some(r) = &h.reservation {
            let _ = r.delete(&mut conn).await;
        }
        // The call the lock guarded is over and its answer settled.
        if let Some(l) = h.lock.clone() {
            let _ = l.release(&mut conn).await;
        }
        let seen = Registry::read_record(&mut conn, &h.id).await.ok();
        let outcome = match result {
            ReplayResult::Written | ReplayResult::AlreadyApplied => {
                let mut done = h.refreshed.clone();
                done.fingerprint = seen.as_ref().map_or(0, |s| s.fingerprint());
                Replayed::Applied(done)
            }
            ReplayResult::Superseded => Replayed::Superseded,
            ReplayResult::Gone => Replayed::Gone,
        };
        tracing::info!(tenant = %h.id.tenant, provider = %h.id.provider, result = result.as_str(), "held token answer replayed");
        ctx.replayer.settle(h.entry.id.as_str());
        ctx.engine.send(Msg::Replayed {
            id: h.id.clone(),
            seen,
            outcome,
            ticket,
        });
    }
    // Answers still held (none now, unless new ones arrived): keep their reservations.
    for h in ctx.replayer.snapshot() {
        if let Some(r) = &h.reservation {
            let _ = r.renew(&mut conn, ttl).await;
        }
    }
    check_journal(ctx);
    Ok(())
}
