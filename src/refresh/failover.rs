//! Following a master change (a Sentinel failover) without losing a rotated token.
//!
//! Replication is asynchronous: a failover can drop writes the old master had acknowledged,
//! a write-back of a rotated refresh token included. The journal keeps confirmed entries
//! for `journal.confirmed_retention_secs`; when the pool reports a new master
//! ([`crate::store::master_changes`]), [`run`] holds back new token calls and registry
//! reads (the engine ignores reads until [`crate::context::Context::reads_trusted`]),
//! then restores, provider by provider, the chain of kept entries with one script each
//! ([`crate::journal::chain::restore`]): where the record holds a token this replica
//! consumed, i.e. where the failover lost write-backs, the newest tokens are written in
//! one step; anywhere else nothing changes. One step matters: a record that walked through
//! its intermediate tokens one write at a time would show readers tokens already dead.
//! Once done, reads resume with a full registry read of the new master, and token calls
//! after the recovery grace (`redis.recovery_grace_ms`).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::journal::chain::{self, Restored};
use crate::store;
use crate::telemetry::metrics as m;

/// What one re-application pass found: `kept` entries, the other counts per provider.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reapplied {
    pub kept: usize,
    pub written: usize,
    pub already: usize,
    pub superseded: usize,
    pub gone: usize,
}

/// Replays the kept journal entries into the (new) master. `Err` when Redis did not answer.
pub async fn reapply_kept(ctx: &Context) -> Result<Reapplied, store::StoreError> {
    let Some(journal) = &ctx.journal else {
        return Ok(Reapplied::default());
    };
    let entries = match journal.recent_confirmed() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "journal: kept entries cannot be read for the failover replay");
            return Ok(Reapplied::default());
        }
    };
    let mut out = Reapplied {
        kept: entries.len(),
        ..Reapplied::default()
    };
    let mut conn = store::conn(&ctx.pool).await?;
    for (id, entries) in chain::by_provider(&entries) {
        let r = chain::restore(&mut conn, &id, &entries, None).await?;
        metrics::counter!(m::JOURNAL_REAPPLIED, "result" => r.as_str()).increment(1);
        match r {
            Restored::Written => {
                out.written += 1;
                tracing::warn!(tenant = %id.tenant, provider = %id.provider, "write-backs lost in the failover were re-applied from the journal: the newest tokens are back");
            }
            Restored::AlreadyThere => out.already += 1,
            Restored::StillStale | Restored::Other => out.superseded += 1,
            Restored::Gone => out.gone += 1,
        }
    }
    Ok(out)
}

/// Waits for master changes and re-applies the kept entries after each, until cancelled.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let Some(mut changes) = store::master_changes(&ctx.pool) else {
        return;
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
        }
        let generation = *changes.borrow_and_update();
        metrics::counter!(m::REDIS_MASTER_CHANGES).increment(1);
        // No new token call or registry read until the kept entries are back (the replayed
        // generation is still the former one: see the module docs).
        ctx.status.start_recovery();
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match reapply_kept(&ctx).await {
                Ok(r) => {
                    tracing::info!(
                        kept = r.kept,
                        rewritten = r.written,
                        already_there = r.already,
                        superseded = r.superseded,
                        gone = r.gone,
                        "master changed: kept journal entries replayed"
                    );
                    ctx.status.set_replayed_generation(generation);
                    ctx.status.start_recovery();
                    // Answers held because the master changed under their write-back go
                    // to the new master now.
                    ctx.replayer.wake();
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "failover replay waits for the new master");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                    ctx.status.start_recovery();
                }
            }
        }
    }
}
