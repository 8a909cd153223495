//! A provider's chain of journal entries, restored into its record in one step.
//!
//! The journal's confirmed entries of one provider, oldest first, say two things: which
//! tokens this replica has *consumed* (the refresh token an entry started from, when the
//! answer rotated it: the provider has replaced it, it is dead) and which tokens are the
//! newest it holds (the last entry's, its refresh token being the answer's or, when the
//! answer had none, the one it started from). A record that holds a consumed token went
//! back in time (a failover dropped write-backs, or a whole record was written back stale):
//! the newest tokens belong there, not the entry right after the consumed one, which is
//! dead too when later entries exist.
//!
//! [`restore`] decides that inside Redis with one script (`RESTORE`), so that no reader
//! ever sees the record walk through the intermediate, dead tokens:
//! 1. no record: [`Restored::Gone`];
//! 2. the record holds the newest tokens already: [`Restored::AlreadyThere`];
//! 3. the record holds a consumed refresh token (or, for an entry that did not rotate, its
//!    refresh *and* access token): the newest tokens are written, [`Restored::Written`]
//!    (`access_token`, `refresh_token`, `token_expiry`, `updated_at`, nothing else);
//! 4. anything else (a token this replica never consumed, e.g. from a re-authorisation or
//!    another replica): nothing written, [`Restored::StillStale`] if it is the token a
//!    stale-write repair named (the engine saw it replaced, but not by this chain), else
//!    [`Restored::Other`].

use std::collections::BTreeMap;

use super::{Entry, ReplayResult};
use crate::fleet::TokenHash;
use crate::keys::ProviderId;
use crate::refresh::reserve::hex;
use crate::store::{Connection, StoreError};

/// KEYS[1] record; ARGV: 1 access token, 2 refresh token, 3 token_expiry, 4 updated_at (the
/// newest), 5 `1` when the newest entry rotated the refresh token, 6 SHA-1 (hex) of the
/// token a repair names as stale or `""`; then per entry: its old refresh token, its old
/// access token, `1` when it rotated. 1 written, 2 already there, 3 the record holds the
/// named stale token and the chain did not consume it, 0 another token, -1 no record.
const RESTORE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local rt = redis.call('HGET', KEYS[1], 'refresh_token')
if rt == false then rt = '' end
local at = redis.call('HGET', KEYS[1], 'access_token')
if at == false then at = '' end
if rt == ARGV[2] and (ARGV[5] == '1' or at == ARGV[1]) then
  return 2
end
for i = 7, #ARGV, 3 do
  if rt == ARGV[i] and (ARGV[i + 2] == '1' or at == ARGV[i + 1]) then
    redis.call('HSET', KEYS[1], 'access_token', ARGV[1], 'refresh_token', ARGV[2], 'token_expiry', ARGV[3], 'updated_at', ARGV[4])
    return 1
  end
end
if ARGV[6] ~= '' and redis.sha1hex(rt) == ARGV[6] then
  return 3
end
return 0
"#;

/// What [`restore`] found (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restored {
    /// The record held a consumed token; it now holds the newest.
    Written,
    /// The record already holds the newest tokens.
    AlreadyThere,
    /// The record holds the token the repair named stale, which this chain did not consume.
    StillStale,
    /// The record holds another token: nothing written.
    Other,
    /// No record.
    Gone,
}

impl Restored {
    /// The metric label, as the journal replay's ([`ReplayResult::as_str`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Restored::Written => ReplayResult::Written.as_str(),
            Restored::AlreadyThere => ReplayResult::AlreadyApplied.as_str(),
            Restored::StillStale | Restored::Other => ReplayResult::Superseded.as_str(),
            Restored::Gone => ReplayResult::Gone.as_str(),
        }
    }
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether the answer of `e` replaced the refresh token it started from.
pub fn rotated(e: &Entry) -> bool {
    e.refresh_token
        .as_ref()
        .is_some_and(|rt| rt.expose() != e.old_refresh_token.expose())
}

/// The refresh token the record holds once `e` is written: the answer's, or the one the
/// attempt started from when the answer had none.
pub fn live_refresh_token(e: &Entry) -> &str {
    e.refresh_token
        .as_ref()
        .map_or(e.old_refresh_token.expose(), |rt| rt.expose())
}

/// Entries grouped by provider, each group oldest first (as `entries` is ordered).
pub fn by_provider(entries: &[Entry]) -> BTreeMap<ProviderId, Vec<&Entry>> {
    let mut out: BTreeMap<ProviderId, Vec<&Entry>> = BTreeMap::new();
    for e in entries {
        out.entry(e.provider_id()).or_default().push(e);
    }
    out
}

/// Restores the newest tokens of `chain` (one provider's entries, oldest first) where the
/// record holds one it consumed (see the module docs); `stale`: the digest of the token a
/// stale-write repair found. An empty chain writes nothing.
pub async fn restore(
    conn: &mut Connection,
    id: &ProviderId,
    chain: &[&Entry],
    stale: Option<&TokenHash>,
) -> Result<Restored, StoreError> {
    let Some(newest) = chain.last() else {
        return Ok(Restored::Other);
    };
    let restore = redis::Script::new(RESTORE);
    let mut script = restore.prepare_invoke();
    script
        .key(id.record_key())
        .arg(newest.access_token.expose())
        .arg(live_refresh_token(newest))
        .arg(&newest.token_expiry)
        .arg(&newest.updated_at)
        .arg(flag(rotated(newest)))
        .arg(stale.map(hex).unwrap_or_default());
    for e in chain {
        script
            .arg(e.old_refresh_token.expose())
            .arg(e.old_access_token.expose())
            .arg(flag(rotated(e)));
    }
    let n: i64 = script.invoke_async(conn).await?;
    match n {
        1 => Ok(Restored::Written),
        2 => Ok(Restored::AlreadyThere),
        3 => Ok(Restored::StillStale),
        0 => Ok(Restored::Other),
        -1 => Ok(Restored::Gone),
        _ => Err(StoreError::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected answer of the journal chain script",
        )))),
    }
}

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}
