//! Write-back: new tokens into the gateway's record with one compare-and-set (SPEC 1.4).
//!
//! The Lua script writes `access_token`, `token_expiry`, `updated_at` and (only when the
//! provider returned one) `refresh_token`, and only if `refresh_token` still holds the value
//! the refresh started from. The timestamp strings are formatted by the caller in the
//! representation the fields already had.

use crate::keys::ProviderId;
use crate::store::{Connection, StoreError};

const COMPARE_AND_SET: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
local current = redis.call('HGET', KEYS[1], 'refresh_token')
if current == false then current = '' end
if current ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'access_token', ARGV[2], 'token_expiry', ARGV[4], 'updated_at', ARGV[5])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'refresh_token', ARGV[3])
end
return 1
"#;

/// What to write.
#[derive(Debug)]
pub struct WriteBack<'a> {
    /// The refresh token the refresh started from (`""`: the field was absent or empty).
    pub expected_refresh_token: &'a str,
    pub access_token: &'a str,
    /// `""`: keep the stored one.
    pub new_refresh_token: &'a str,
    pub token_expiry: &'a str,
    pub updated_at: &'a str,
}

/// The compare-and-set's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteResult {
    Written,
    /// `refresh_token` changed under us: someone else refreshed.
    Conflict,
    /// The record was deleted meanwhile.
    Gone,
}

pub async fn compare_and_set(
    conn: &mut Connection,
    id: &ProviderId,
    w: &WriteBack<'_>,
) -> Result<WriteResult, StoreError> {
    let n: i64 = redis::Script::new(COMPARE_AND_SET)
        .key(id.record_key())
        .arg(w.expected_refresh_token)
        .arg(w.access_token)
        .arg(w.new_refresh_token)
        .arg(w.token_expiry)
        .arg(w.updated_at)
        .invoke_async(conn)
        .await?;
    Ok(match n {
        1 => WriteResult::Written,
        0 => WriteResult::Conflict,
        _ => WriteResult::Gone,
    })
}
