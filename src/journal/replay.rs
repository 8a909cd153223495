//! Replaying a journal entry into the gateway's record: one Lua script on the record key.
//!
//! Decided in Redis, atomically, in this order:
//! 1. the record is missing: [`ReplayResult::Gone`] (-1);
//! 2. the answer is already there: [`ReplayResult::AlreadyApplied`] (2). "There" means the
//!    record's `refresh_token` equals the entry's new refresh token; when the answer had
//!    none (or returned the same refresh token it was given, so that the refresh token tells
//!    nothing), that the record's `access_token` equals the entry's access token;
//! 3. the record still holds what the attempt started from (`refresh_token` and
//!    `access_token` both equal the entry's old ones): the answer is written,
//!    [`ReplayResult::Written`] (1): `access_token`, `refresh_token` (only when the answer
//!    had one), `token_expiry`, `updated_at`, exactly as a write-back would (SPEC 1.4);
//! 4. anything else: a newer token is there, and an old answer must never overwrite it:
//!    [`ReplayResult::Superseded`] (0), nothing written.
//!
//! No other field and no other key is touched. A missing field compares as `""`.

use std::fmt;

use super::Entry;
use crate::store::{Connection, StoreError};

/// KEYS[1] record; ARGV: 1 old refresh token, 2 old access token, 3 new access token,
/// 4 new refresh token (`""`: none), 5 token_expiry, 6 updated_at.
const REPLAY: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local rt = redis.call('HGET', KEYS[1], 'refresh_token')
if rt == false then rt = '' end
local at = redis.call('HGET', KEYS[1], 'access_token')
if at == false then at = '' end
if ARGV[4] ~= '' and ARGV[4] ~= ARGV[1] then
  if rt == ARGV[4] then return 2 end
else
  if at == ARGV[3] then return 2 end
end
if rt == ARGV[1] and at == ARGV[2] then
  redis.call('HSET', KEYS[1], 'access_token', ARGV[3], 'token_expiry', ARGV[5], 'updated_at', ARGV[6])
  if ARGV[4] ~= '' then
    redis.call('HSET', KEYS[1], 'refresh_token', ARGV[4])
  end
  return 1
end
return 0
"#;

/// What replaying one entry found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayResult {
    /// The record held the old tokens; it now holds the entry's.
    Written,
    /// The record already holds the entry's tokens.
    AlreadyApplied,
    /// The record holds other (newer) tokens; nothing written.
    Superseded,
    /// The record no longer exists; nothing written.
    Gone,
}

impl ReplayResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplayResult::Written => "written",
            ReplayResult::AlreadyApplied => "already_applied",
            ReplayResult::Superseded => "superseded",
            ReplayResult::Gone => "gone",
        }
    }

    /// Redis has the entry's tokens (confirm it); otherwise it will never be applied (drop it).
    pub fn applied(self) -> bool {
        matches!(self, ReplayResult::Written | ReplayResult::AlreadyApplied)
    }
}

impl fmt::Display for ReplayResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Replays `e` into its record (see the module docs).
pub async fn replay_entry(conn: &mut Connection, e: &Entry) -> Result<ReplayResult, StoreError> {
    let new_refresh = e.refresh_token.as_ref().map_or("", |s| s.expose());
    let n: i64 = redis::Script::new(REPLAY)
        .key(e.provider_id().record_key())
        .arg(e.old_refresh_token.expose())
        .arg(e.old_access_token.expose())
        .arg(e.access_token.expose())
        .arg(new_refresh)
        .arg(&e.token_expiry)
        .arg(&e.updated_at)
        .invoke_async(conn)
        .await?;
    match n {
        1 => Ok(ReplayResult::Written),
        2 => Ok(ReplayResult::AlreadyApplied),
        0 => Ok(ReplayResult::Superseded),
        -1 => Ok(ReplayResult::Gone),
        _ => Err(StoreError::Redis(redis::RedisError::from((
            redis::ErrorKind::UnexpectedReturnType,
            "unexpected answer of the journal replay script",
        )))),
    }
}
