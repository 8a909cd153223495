//! Write-back: new tokens into the gateway's record with one compare-and-set (SPEC 1.4).
//!
//! The Lua script writes `access_token`, `token_expiry`, `updated_at` and (only when the
//! provider returned one) `refresh_token`, and only if `refresh_token` still holds the value
//! the refresh started from. The timestamp strings are formatted by the caller in the
//! representation the fields already had.

use std::time::Duration;

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
-- One HSET: one change event for the whole write-back.
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'access_token', ARGV[2], 'token_expiry', ARGV[4], 'updated_at', ARGV[5], 'refresh_token', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'access_token', ARGV[2], 'token_expiry', ARGV[4], 'updated_at', ARGV[5])
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

fn result_of(n: i64) -> WriteResult {
    match n {
        1 => WriteResult::Written,
        0 => WriteResult::Conflict,
        _ => WriteResult::Gone,
    }
}

/// The compare-and-set, then `release` (commands added to the pipeline it gets, e.g. the
/// lock's and the reservation's compare-and-deletes), then `WAIT` when `wait` is set, in one
/// round trip on one node (a Sentinel master included). The release is right whatever the
/// compare-and-set found: written, the record no longer holds the refresh token the
/// reservation protects; not written, there is nothing to protect. `WAIT` after the release
/// is as safe as before it: a replica applies the master's writes in order, so one that has
/// the reservation's delete has the write-back too, and a failover to a replica without the
/// write-back keeps the reservation. The answer is the compare-and-set's and, with `wait`,
/// how many replicas confirmed. An error leaves it unknown whether any of it ran (the caller
/// holds the answer for the journal's replay, which is safe either way).
pub async fn compare_and_set_then(
    conn: &mut Connection,
    id: &ProviderId,
    w: &WriteBack<'_>,
    release: impl FnOnce(&mut redis::Pipeline),
    wait: Option<(u32, Duration)>,
) -> Result<(WriteResult, Option<u32>), StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(COMPARE_AND_SET)
        .arg(1)
        .arg(id.record_key())
        .arg(w.expected_refresh_token)
        .arg(w.access_token)
        .arg(w.new_refresh_token)
        .arg(w.token_expiry)
        .arg(w.updated_at);
    release(&mut pipe);
    if let Some((replicas, timeout)) = wait {
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        pipe.cmd("WAIT").arg(replicas).arg(ms);
    }
    let answers: Vec<i64> = pipe.query_async(conn).await?;
    let n = answers.first().copied().unwrap_or(-1);
    let confirmed = match (wait, answers.get(1)) {
        (Some(_), Some(&c)) => Some(u32::try_from(c.max(0)).unwrap_or(u32::MAX)),
        (Some(_), None) => Some(0),
        (None, _) => None,
    };
    Ok((result_of(n), confirmed))
}

/// The compare-and-set alone (a release or a `WAIT` must come after it, in its own round
/// trip: a Cluster, whose keys sit on different slots).
pub async fn compare_and_set(
    conn: &mut Connection,
    id: &ProviderId,
    w: &WriteBack<'_>,
) -> Result<WriteResult, StoreError> {
    compare_and_set_then(conn, id, w, |_| {}, None)
        .await
        .map(|(r, _)| r)
}

/// Counts and logs a `WAIT` that `wanted` replicas did not all answer (`Err`: the `WAIT`
/// itself failed). A shortfall is not an error: the write is on the master, and the journal
/// keeps the entry for `journal.confirmed_retention_secs` to re-apply it after a master
/// change.
pub fn note_replicated(wanted: u32, confirmed: Result<u32, &StoreError>) {
    match confirmed {
        Ok(n) if n >= wanted => {}
        Ok(n) => {
            metrics::counter!(crate::telemetry::metrics::REDIS_WAIT_SHORTFALL).increment(1);
            tracing::warn!(
                confirmed = n,
                wanted,
                "write-back confirmed by fewer replicas than redis.wait_replicas; the journal keeps it for a failover"
            );
        }
        Err(e) => {
            metrics::counter!(crate::telemetry::metrics::REDIS_WAIT_SHORTFALL).increment(1);
            tracing::warn!(error = %e, "WAIT for replicas failed; the journal keeps the entry for a failover");
        }
    }
}

/// After a written write-back: `WAIT` until `redis.wait_replicas` replicas have it (see
/// [`crate::config::RedisConfig::wait`]), so that a failover right after it does not lose
/// it. A shortfall is logged and counted, not an error: the write is on the master, and the
/// journal keeps the entry for `journal.confirmed_retention_secs` to re-apply it after a
/// master change.
pub async fn confirm_replicated(
    cfg: &crate::config::RedisConfig,
    conn: &mut Connection,
    id: &ProviderId,
) {
    let Some((replicas, timeout)) = cfg.wait() else {
        return;
    };
    let confirmed = crate::store::wait_replicas(conn, &id.record_key(), replicas, timeout).await;
    note_replicated(replicas, confirmed.as_ref().copied());
}
