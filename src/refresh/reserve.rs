//! Reservations `tenant:{t}:provider:{p}:inflight` (SPEC 2): which replica may hold an answer
//! for which refresh token.
//!
//! A replica sets one, holding the lock, before a token call: its value is the replica id,
//! the SHA-1 of the refresh token sent and the start time. It is renewed while that replica
//! holds an answer Redis has not confirmed, and deleted with the confirmed write (or when the
//! attempt ends holding nothing). Another replica that finds a reservation for the record's
//! current refresh token, whose replica still has a live heartbeat, does not call: after an
//! outage longer than the lock's expiry it would otherwise send a refresh token the provider
//! has already rotated. A reservation whose replica is gone (no heartbeat) is not waited for.

use std::time::Duration;

use crate::keys::{self, ProviderId};
use crate::store::{Connection, StoreError};

/// Deletes or renews the key only while it holds our value.
const COMPARE_DELETE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

const COMPARE_EXPIRE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// SHA-1 (hex) of a refresh token: what a reservation names, never the token.
pub fn token_hash(refresh_token: &str) -> String {
    sha1_smol::Sha1::from(refresh_token.as_bytes())
        .digest()
        .to_string()
}

/// SHA-1 of a refresh token as bytes: what the engine remembers of replaced tokens.
pub fn token_digest(refresh_token: &str) -> crate::fleet::TokenHash {
    sha1_smol::Sha1::from(refresh_token.as_bytes())
        .digest()
        .bytes()
}

/// The [`crate::fleet::ShortHash`] of a refresh token.
pub fn token_short(refresh_token: &str) -> crate::fleet::ShortHash {
    crate::fleet::short_hash(&token_digest(refresh_token))
}

/// Lower-case hex of a digest (as [`token_hash`] and Redis' `redis.sha1hex` write it).
pub fn hex(d: &crate::fleet::TokenHash) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// One reservation, as this replica wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub key: String,
    pub value: String,
}

impl Reservation {
    pub fn new(id: &ProviderId, replica: &str, refresh_token: &str, start_ms: i64) -> Reservation {
        Reservation {
            key: id.inflight_key(),
            value: format!("{replica}|{}|{start_ms}", token_hash(refresh_token)),
        }
    }

    /// Adds the `SET ... PX` to a pipeline.
    pub fn add_set(&self, pipe: &mut redis::Pipeline, ttl: Duration) {
        pipe.cmd("SET")
            .arg(&self.key)
            .arg(&self.value)
            .arg("PX")
            .arg(ms(ttl))
            .ignore();
    }

    /// Adds the compare-and-delete to a pipeline.
    pub fn add_delete(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("EVAL")
            .arg(COMPARE_DELETE)
            .arg(1)
            .arg(&self.key)
            .arg(&self.value)
            .ignore();
    }

    pub async fn delete(&self, conn: &mut Connection) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        self.add_delete(&mut pipe);
        pipe.query_async::<()>(conn).await?;
        Ok(())
    }

    /// Extends it while it is still ours; `false` when it is not any more.
    pub async fn renew(&self, conn: &mut Connection, ttl: Duration) -> Result<bool, StoreError> {
        let n: i64 = redis::Script::new(COMPARE_EXPIRE)
            .key(&self.key)
            .arg(&self.value)
            .arg(ms(ttl))
            .invoke_async(conn)
            .await?;
        Ok(n == 1)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A reservation value read from Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub replica: String,
    pub token_hash: String,
}

/// Parses a reservation value (`replica|sha1|start_ms`); `None` for anything else.
pub fn parse(value: &str) -> Option<Foreign> {
    let mut parts = value.rsplitn(3, '|');
    let _start = parts.next()?;
    let hash = parts.next()?;
    let replica = parts.next()?;
    if replica.is_empty() || hash.len() != 40 {
        return None;
    }
    Some(Foreign {
        replica: replica.to_string(),
        token_hash: hash.to_string(),
    })
}

/// Whether `replica` has a live heartbeat.
pub async fn replica_alive(conn: &mut Connection, replica: &str) -> Result<bool, StoreError> {
    let n: i64 = redis::cmd("EXISTS")
        .arg(keys::replica_key(replica))
        .query_async(conn)
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_name_no_token() {
        let id = ProviderId::new("acme", "goto");
        let r = Reservation::new(&id, "host:12:abcdef", "rt-secret", 1_700_000_000_000);
        assert!(!r.value.contains("rt-secret"));
        assert_eq!(r.key, "tenant:acme:provider:goto:inflight");
        let f = parse(&r.value).expect("parses");
        assert_eq!(f.replica, "host:12:abcdef");
        assert_eq!(f.token_hash, token_hash("rt-secret"));
        assert_eq!(parse("garbage"), None);
        assert_eq!(parse("a|short|1"), None);
        assert_eq!(hex(&token_digest("rt-secret")), token_hash("rt-secret"));
    }
}
