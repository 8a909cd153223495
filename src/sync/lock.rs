//! The tenant's sync lock `tenant:{t}:sync:lock` (SPEC 2): one run per tenant across
//! replicas. `SET NX PX` with an owner value unique to the hold, renewed by a
//! compare-and-`PEXPIRE` while the run lasts, released by compare-and-delete. A run whose
//! renewal fails (the hold expired and may be someone else's, or Redis is gone) stops before
//! it writes anything: [`SyncLock::lost`] is cancelled and the store checks it again just
//! before each replace.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::lock::owner_value;
use crate::store::{Connection, StoreError};

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// A held sync lock.
#[derive(Debug)]
pub struct SyncLock {
    key: String,
    owner: String,
    ttl: Duration,
    lost: CancellationToken,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64)
}

impl SyncLock {
    /// Takes the lock, or `None` when another run holds it.
    pub async fn acquire(
        conn: &mut Connection,
        key: String,
        replica: &str,
        ttl: Duration,
    ) -> Result<Option<SyncLock>, StoreError> {
        let owner = owner_value(replica);
        let set: Option<String> = redis::cmd("SET")
            .arg(&key)
            .arg(&owner)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(conn)
            .await?;
        Ok(set.map(|_| SyncLock {
            key,
            owner,
            ttl,
            lost: CancellationToken::new(),
        }))
    }

    /// Extends the hold; `false` (and [`SyncLock::lost`] cancelled) when it is not ours.
    pub async fn renew(&self, conn: &mut Connection) -> bool {
        let n: Result<i64, _> = redis::Script::new(RENEW)
            .key(&self.key)
            .arg(&self.owner)
            .arg(ms(self.ttl))
            .invoke_async(conn)
            .await;
        let ok = matches!(n, Ok(1));
        if !ok {
            self.lost.cancel();
        }
        ok
    }

    /// Cancelled once a renewal failed: the run must not write.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Compare-and-delete.
    pub async fn release(&self, conn: &mut Connection) -> Result<bool, StoreError> {
        let n: i64 = redis::Script::new(RELEASE)
            .key(&self.key)
            .arg(&self.owner)
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }
}
