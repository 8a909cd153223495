//! Writing synced data so that readers never see half a sync (SPEC 2).
//!
//! A feature's key `K` = `tenant:{t}:sync:{p}:{feature}` (and the directory) is replaced
//! whole: its records go into the staging key `{K}:staging` (same Cluster slot as `K`) in
//! chunks of `sync.chunk_size` fields, one `HSET` each, so no command blocks Redis for long
//! or meets Lua's argument limit; the lock is renewed, then `RENAME` staging over `K` and
//! `EXPIRE` it `data_retention_days` in one `MULTI`. A run that fails before that leaves
//! `K` untouched (its staging key is deleted, or expires after `sync.staging_ttl_secs`).
//! Records gone at the provider are gone from `K`; an empty answer deletes `K`.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::Value;

use super::directory::UnifiedUser;
use super::lock::SyncLock;
use super::model::User;
use crate::keys;
use crate::store::{Connection, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sync lock lost before the write: nothing replaced")]
    LockLost,
}

impl WriteError {
    pub fn label(&self) -> &'static str {
        match self {
            WriteError::Store(_) => "redis_error",
            WriteError::LockLost => "lock_lost",
        }
    }
}

impl From<redis::RedisError> for WriteError {
    fn from(e: redis::RedisError) -> Self {
        WriteError::Store(StoreError::Redis(e))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, i64::MAX as u64)
}

/// Replaces `key` with `entries` (`field`, JSON value), expiring it after `retention`.
pub async fn replace(
    conn: &mut Connection,
    lock: &SyncLock,
    key: &str,
    entries: &[(String, String)],
    chunk: usize,
    retention: Duration,
    staging_ttl: Duration,
) -> Result<(), WriteError> {
    let staging = keys::staging_key(key);
    let _: () = redis::cmd("DEL").arg(&staging).query_async(conn).await?;
    for part in entries.chunks(chunk.max(1)) {
        if lock.lost().is_cancelled() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&staging).query_async(conn).await;
            return Err(WriteError::LockLost);
        }
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("HSET").arg(&staging);
        for (f, v) in part {
            cmd.arg(f).arg(v);
        }
        pipe.ignore()
            .cmd("PEXPIRE")
            .arg(&staging)
            .arg(ms(staging_ttl))
            .ignore();
        let _: () = pipe.query_async(conn).await?;
    }
    if !lock.renew(conn).await {
        let _: Result<(), _> = redis::cmd("DEL").arg(&staging).query_async(conn).await;
        return Err(WriteError::LockLost);
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    if entries.is_empty() {
        pipe.cmd("DEL")
            .arg(key)
            .ignore()
            .cmd("DEL")
            .arg(&staging)
            .ignore();
    } else {
        pipe.cmd("RENAME")
            .arg(&staging)
            .arg(key)
            .ignore()
            .cmd("PEXPIRE")
            .arg(key)
            .arg(ms(retention))
            .ignore();
    }
    let _: () = pipe.query_async(conn).await?;
    Ok(())
}

/// Every field of a hash, as text (values that are not UTF-8 are skipped).
async fn hgetall(conn: &mut Connection, key: &str) -> Result<Vec<(String, String)>, StoreError> {
    let v: Value = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
    let mut out = Vec::new();
    if let Value::Map(pairs) = v {
        for (k, v) in pairs {
            if let (Value::BulkString(k), Value::BulkString(v)) = (k, v) {
                if let (Ok(k), Ok(v)) = (String::from_utf8(k), String::from_utf8(v)) {
                    out.push((k, v));
                }
            }
        }
    } else if let Value::Array(items) = v {
        let mut it = items.into_iter();
        while let (Some(Value::BulkString(k)), Some(Value::BulkString(v))) = (it.next(), it.next())
        {
            if let (Ok(k), Ok(v)) = (String::from_utf8(k), String::from_utf8(v)) {
                out.push((k, v));
            }
        }
    }
    Ok(out)
}

/// The stored users of each provider (values that do not parse are skipped).
pub async fn read_users(
    conn: &mut Connection,
    tenant: &str,
    providers: &[String],
) -> Result<BTreeMap<String, Vec<User>>, StoreError> {
    let mut out = BTreeMap::new();
    for p in providers {
        let fields = hgetall(conn, &keys::sync_key(tenant, p, "users")).await?;
        let users: Vec<User> = fields
            .iter()
            .filter_map(|(_, v)| serde_json::from_str::<User>(v).ok())
            .filter(|u| u.provider == *p)
            .collect();
        if !users.is_empty() {
            out.insert(p.clone(), users);
        }
    }
    Ok(out)
}

/// The directory as stored.
pub async fn read_directory(
    conn: &mut Connection,
    tenant: &str,
) -> Result<Vec<UnifiedUser>, StoreError> {
    let fields = hgetall(conn, &keys::directory_key(tenant)).await?;
    Ok(fields
        .iter()
        .filter_map(|(_, v)| serde_json::from_str::<UnifiedUser>(v).ok())
        .collect())
}

/// A hash's fields as text: the tenant config and provider records.
pub async fn read_hash(
    conn: &mut Connection,
    key: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    hgetall(conn, key).await
}
