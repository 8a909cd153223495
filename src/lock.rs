//! The per-provider refresh lock `tenant:{t}:provider:{p}:lock` (SPEC 2).
//!
//! `SET NX PX` with a random owner value taken per hold; released by a compare-and-delete
//! script only once the outcome is written. A hold whose token call may still be in flight
//! (a timeout, a shutdown past the drain deadline, a crash) is never released: it expires.
//! The expiry is at least twice the token call's timeout (checked by config validation).

use std::time::Duration;

use crate::keys::ProviderId;
use crate::store::{Connection, StoreError};

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A held lock. Dropping it does not release it: call [`LockGuard::release`] once the outcome
/// is written, or let it expire.
#[derive(Debug)]
pub struct LockGuard {
    key: String,
    owner: String,
}

/// Owner value: replica id plus a random part unique to this hold.
fn owner_value(replica: &str) -> String {
    format!("{replica}:{:016x}", fastrand::u64(..))
}

/// Tries to take the lock once; `None` when another owner holds it.
pub async fn acquire(
    conn: &mut Connection,
    id: &ProviderId,
    replica: &str,
    ttl: Duration,
) -> Result<Option<LockGuard>, StoreError> {
    let key = id.lock_key();
    let owner = owner_value(replica);
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    let ok: Option<String> = redis::cmd("SET")
        .arg(&key)
        .arg(&owner)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .query_async(conn)
        .await?;
    Ok(ok.map(|_| LockGuard { key, owner }))
}

impl LockGuard {
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
