//! Repair of a stale whole-record write: the newer tokens back from the journal.
//!
//! A gateway that reads a whole record, lets tokenwarden rotate its refresh token meanwhile,
//! then writes the whole record back restores a refresh token the provider has already
//! replaced (single use: it is dead). The engine notices (the record's refresh token hashes
//! to one it remembers as replaced, [`crate::engine::transition`]) and asks for a repair with
//! the hash of the stale token and of the one the record held before the write.
//!
//! The engine's hashes say a repair may be due; the journal decides. [`run`] takes this
//! provider's recent confirmed entries ([`crate::journal::Journal::recent_confirmed`], kept
//! `journal.confirmed_retention_secs`) and restores their chain
//! ([`crate::journal::chain::restore`]): only where the record holds a refresh token one of
//! them consumed (dead at the provider) are the newest tokens written, in one script; a
//! token this replica never consumed is left alone, whatever the engine remembered (still
//! the stale one: [`Repaired::Unrepairable`]; another one: [`Repaired::Superseded`]). It
//! writes `access_token`, `refresh_token`, `token_expiry` and `updated_at`, nothing else,
//! and returns a typed [`Repaired`]; the engine decides what it means. While a master
//! change is being repaired ([`Context::reads_trusted`]) it waits (a `Redis` outcome: the
//! engine asks again later).

use crate::context::Context;
use crate::engine::transition::{Refreshed, RepairRequest, Repaired};
use crate::journal::chain::{self, Restored};
use crate::journal::Entry;
use crate::keys::ProviderId;
use crate::refresh::reserve::token_short;
use crate::registry::record::RecordState;
use crate::registry::Registry;
use crate::store;

/// This provider's entries among `entries`, oldest first (as `entries` is ordered).
pub fn entries_of<'a>(entries: &'a [Entry], id: &ProviderId) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| *e.tenant == *id.tenant && *e.provider == *id.provider)
        .collect()
}

/// Tries the repair once; returns the record as read after it, when it could be read.
pub async fn run(
    ctx: &Context,
    id: &ProviderId,
    req: RepairRequest,
) -> (Option<RecordState>, Repaired) {
    let Some(journal) = &ctx.journal else {
        return (None, Repaired::Unrepairable);
    };
    if !ctx.reads_trusted() {
        return (
            None,
            Repaired::Redis {
                detail: "the Redis master changed: waiting for the failover replay".into(),
            },
        );
    }
    let entries = match journal.recent_confirmed() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "journal: recent confirmed entries could not be read");
            return (None, Repaired::Unrepairable);
        }
    };
    let chain = entries_of(&entries, id);
    let Some(newest) = chain.last().copied() else {
        return (None, Repaired::Unrepairable);
    };
    let redis_failed = |e: store::StoreError| {
        (
            None,
            Repaired::Redis {
                detail: e.to_string(),
            },
        )
    };
    let mut conn = match store::conn(&ctx.pool).await {
        Ok(c) => c,
        Err(e) => return redis_failed(e),
    };
    let written = match chain::restore(&mut conn, id, &chain, Some(&req.stale)).await {
        Ok(w) => w,
        Err(e) => return redis_failed(e),
    };
    let seen = Registry::read_record(&mut conn, id).await.ok();
    let outcome = match written {
        Restored::Written | Restored::AlreadyThere => Repaired::Written(Refreshed {
            issued: newest.created_at,
            expiry: newest.expires_at,
            refresh_token_expiry: newest.refresh_token_expires_at,
            rotated: true,
            fingerprint: seen.as_ref().map_or(0, RecordState::fingerprint),
            note: None,
            refresh_hash: Some(token_short(chain::live_refresh_token(newest))),
            replaced_hash: None,
        }),
        // Seen replaced, but not by a rotation this journal holds: the newer token came
        // from another writer (or another replica, whose own repair may still come).
        Restored::StillStale => Repaired::Unrepairable,
        Restored::Other => Repaired::Superseded,
        Restored::Gone => Repaired::Gone,
    };
    tracing::info!(tenant = %id.tenant, provider = %id.provider, result = %written, "stale write repair ran");
    (seen, outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{EntryId, FORMAT_VERSION};
    use crate::secret::Secret;
    use chrono::{TimeDelta, Utc};

    fn entry(provider: &str, new_rt: Option<&str>, at: &str, secs: i64) -> Entry {
        Entry {
            id: EntryId::random(),
            version: FORMAT_VERSION,
            created_at: Utc::now() + TimeDelta::seconds(secs),
            tenant: "acme".into(),
            provider: provider.into(),
            old_refresh_token: Secret::new("old"),
            old_access_token: Secret::new("old-at"),
            access_token: Secret::new(at),
            refresh_token: new_rt.map(Secret::new),
            token_expiry: String::new(),
            updated_at: String::new(),
            expires_at: Utc::now(),
            refresh_token_expires_at: None,
        }
    }

    #[test]
    fn the_chain_is_this_providers_entries_in_order() {
        let id = ProviderId::new("acme", "goto");
        let entries = vec![
            entry("goto", Some("rt-a"), "at-1", 0),
            entry("zoom", Some("rt-b"), "at-2", 1),
            entry("goto", None, "at-3", 2),
            entry("goto", Some("rt-b"), "at-4", 3),
        ];
        let chain: Vec<&str> = entries_of(&entries, &id)
            .iter()
            .map(|e| e.access_token.expose())
            .collect();
        assert_eq!(chain, ["at-1", "at-3", "at-4"]);
        assert!(entries_of(&entries, &ProviderId::new("other", "goto")).is_empty());
    }
}
