//! The per-provider refresh lock `tenant:{t}:provider:{p}:lock` (SPEC 2).
//!
//! `SET NX PX` with a random owner value taken per hold; released by a compare-and-delete
//! script only once the outcome is written. A hold whose token call may still be in flight
//! (a timeout, a shutdown past the drain deadline, a crash) is never released: it expires.
//! The expiry is at least twice the token call's timeout (checked by config validation).
//!
//! A lock key someone else left broken is not "held" forever: taking the lock is one script
//! that, when the key exists, also looks at it. A string without expiry (PTTL -1) gets the
//! lock's expiry and one warning, so it frees itself; a key of another type cannot be a lock
//! at all, and the attempt says so ([`Acquire::Stuck`]) instead of waiting on it for ever.

use std::time::Duration;

use crate::keys::ProviderId;
use crate::store::{Connection, StoreError};

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// `SET NX PX`; when the key exists, the answer says what holds it: 0 a live lock, -1 a
/// string that had no expiry (it has the lock's now), -2 a key that is not a string.
const ACQUIRE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
  return 0
end
if t ~= 'string' then
  return -2
end
if redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return -1
end
return 0
"#;

/// What an attempt to take the lock found.
#[derive(Debug)]
pub enum Acquire {
    /// Taken: this hold owns the key.
    Held(LockGuard),
    /// Another owner holds it (with an expiry, so it frees itself).
    Busy,
    /// The lock key is not a string (a hash, a list, ...): it can never be taken, and
    /// tokenwarden does not delete a key it did not write. The provider is stuck until an
    /// operator removes the key.
    Stuck,
}

/// A held lock. Dropping it does not release it: call [`LockGuard::release`] once the outcome
/// is written, or let it expire. A clone names the same hold (the replayer keeps one for an
/// answer it holds); a release is a compare-and-delete, so a second one changes nothing.
#[derive(Debug, Clone)]
pub struct LockGuard {
    key: String,
    owner: String,
}

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// Owner value: replica id plus a random part unique to this hold.
pub fn owner_value(replica: &str) -> String {
    format!("{replica}:{:016x}", fastrand::u64(..))
}

/// Adds the taking of the lock (the [`ACQUIRE`] script) to a pipeline, so that the record
/// can be read under it in the same round trip; [`acquired`] reads the answer.
pub fn add_acquire(pipe: &mut redis::Pipeline, id: &ProviderId, owner: &str, ttl: Duration) {
    // Redis takes at most i64 milliseconds; config validation keeps the TTL far below.
    let ttl_ms = u64::try_from(ttl.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64);
    pipe.cmd("EVAL")
        .arg(ACQUIRE)
        .arg(1)
        .arg(id.lock_key())
        .arg(owner)
        .arg(ttl_ms);
}

/// What the [`add_acquire`] answer says. A lock string found without expiry was given the
/// lock's expiry (and a warning); the attempt still reports [`Acquire::Busy`], and the next
/// one finds it expired.
pub fn acquired(answer: &redis::Value, id: &ProviderId, owner: String) -> Acquire {
    match answer {
        redis::Value::Int(1) => Acquire::Held(LockGuard::taken(id, owner)),
        redis::Value::Int(-1) => {
            tracing::warn!(
                "lock key had no expiry (not written by tokenwarden's protocol): expiry set, the provider is refreshed once it lapses"
            );
            Acquire::Busy
        }
        redis::Value::Int(-2) => Acquire::Stuck,
        _ => Acquire::Busy,
    }
}

impl LockGuard {
    /// A hold taken by a `SET key owner NX PX` sent elsewhere (in a pipeline).
    pub fn taken(id: &ProviderId, owner: String) -> LockGuard {
        LockGuard {
            key: id.lock_key(),
            owner,
        }
    }

    /// Extends the hold while it is still ours; `false` when it is not any more.
    pub async fn renew(&self, conn: &mut Connection, ttl: Duration) -> Result<bool, StoreError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let n: i64 = redis::Script::new(RENEW)
            .key(&self.key)
            .arg(&self.owner)
            .arg(ttl_ms)
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }

    /// Adds the release to a pipeline (compare-and-delete).
    pub fn add_release(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("EVAL")
            .arg(RELEASE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.owner)
            .ignore();
    }

    /// Compare-and-delete: releases only if this hold still owns the key. Returns whether it
    /// did (false: it had expired and maybe been taken by someone else).
    pub async fn release(self, conn: &mut Connection) -> Result<bool, StoreError> {
        let n: i64 = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.owner)
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }

    /// Leaves the lock to expire (the call it guarded may still be in flight).
    pub fn abandon(self) {}

    pub fn owner(&self) -> &str {
        &self.owner
    }
}
