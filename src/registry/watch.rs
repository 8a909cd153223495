//! Change events: the fast path of change detection, so that an idle fleet costs nothing.
//!
//! Two sources, tokenwarden never changes the server's configuration for either:
//! - keyspace notifications ([`listen`]), when the server has `notify-keyspace-events` on
//!   for hashes, sets and generic commands;
//! - otherwise client-side-caching invalidations ([`track`]): `CLIENT TRACKING ON BCAST
//!   PREFIX tenant:` on a RESP3 connection (Redis 6 and later, no server setting needed)
//!   makes the server push the name of every `tenant:` key that changes.
//!
//! Each key becomes a [`Change`] for the registry follower. An established source sends
//! [`Change::Resync`] (events may have been missed before), a lost one [`Change::Lost`] (the
//! follower falls back to change scans until it is back), and a source the server refuses
//! [`Change::Unsupported`].

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::keys::{self, KeyKind, ProviderId};
use crate::store::{Connection, StoreError};

/// Something changed in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A tenant's provider set changed (or was deleted).
    Tenant(String),
    /// A provider record changed (or was deleted).
    Record(ProviderId),
    /// The subscription was (re)established: events may have been missed.
    Resync,
    /// The subscription was lost; events are missed until the next [`Change::Resync`].
    Lost,
    /// The server refused this event source.
    Unsupported,
}

/// Whether the server sends the keyspace events tokenwarden needs: keyspace (`K`) channel
/// events for hashes (`h`), sets (`s`) and generic commands (`g`, for DEL and EXPIRE), or `A`.
pub async fn notifications_enabled(conn: &mut Connection) -> Result<bool, StoreError> {
    let answer: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .query_async(conn)
        .await?;
    Ok(answer.get(1).is_some_and(|flags| flags_suffice(flags)))
}

fn flags_suffice(flags: &str) -> bool {
    let has = |c: char| flags.contains(c);
    has('K') && (has('A') || (has('h') && has('s') && has('g')))
}

/// Classifies a keyspace channel name (`__keyspace@0__:tenant:...`).
pub fn change_of_channel(channel: &str) -> Option<Change> {
    let key = channel.split_once("__:").map(|(_, k)| k)?;
    match keys::classify(key)? {
        KeyKind::ProvidersSet { tenant } => Some(Change::Tenant(tenant.to_string())),
        KeyKind::Record { tenant, provider } => {
            Some(Change::Record(ProviderId::new(tenant, provider)))
        }
    }
}

/// Subscribes to `__keyspace@{db}__:tenant:*` and forwards changes until cancelled,
/// resubscribing after a lost connection.
pub async fn listen(
    client: redis::Client,
    db: i64,
    tx: mpsc::Sender<Change>,
    cancel: CancellationToken,
) {
    let pattern = format!("__keyspace@{db}__:tenant:*");
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            _ = cancel.cancelled() => return,
            r = session => r,
        };
        match pubsub {
            Ok(mut pubsub) => {
                backoff = Duration::from_millis(200);
                tracing::info!("subscribed to keyspace notifications");
                if tx.send(Change::Resync).await.is_err() {
                    return;
                }
                let mut stream = pubsub.on_message();
                loop {
                    let msg = tokio::select! {
                        _ = cancel.cancelled() => return,
                        m = stream.next() => m,
                    };
                    let Some(msg) = msg else { break };
                    if let Some(change) = change_of_channel(msg.get_channel_name()) {
                        if tx.send(change).await.is_err() {
                            return;
                        }
                    }
                }
                tracing::warn!("keyspace notification subscription lost; resubscribing");
                if tx.send(Change::Lost).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to keyspace notifications");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Classifies a key named by an invalidation.
fn change_of_key(key: &str) -> Option<Change> {
    match keys::classify(key)? {
        KeyKind::ProvidersSet { tenant } => Some(Change::Tenant(tenant.to_string())),
        KeyKind::Record { tenant, provider } => {
            Some(Change::Record(ProviderId::new(tenant, provider)))
        }
    }
}

/// `url` asking for RESP3, which carries invalidation pushes on the same connection.
fn resp3_url(url: &str) -> String {
    if url.contains("protocol=") {
        return url.to_string();
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}protocol=resp3")
}

/// Follows `CLIENT TRACKING ON BCAST PREFIX tenant:` invalidations until cancelled,
/// re-establishing a lost connection. Sends [`Change::Unsupported`] and returns if the
/// server refuses tracking.
pub async fn track(
    url: String,
    timeout: Duration,
    tx: mpsc::Sender<Change>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
        let setup = async {
            let client = redis::Client::open(resp3_url(&url))?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_push_sender(push_tx);
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("CLIENT")
                .arg("TRACKING")
                .arg("ON")
                .arg("BCAST")
                .arg("PREFIX")
                .arg("tenant:")
                .query_async::<()>(&mut conn)
                .await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = tokio::select! {
            _ = cancel.cancelled() => return,
            r = setup => r,
        };
        match conn {
            // A refusal by the server (unknown command, RESP3 not spoken, ACL), as opposed to
            // a connection problem or a server that is still loading.
            Err(e)
                if e.code()
                    .is_some_and(|c| !matches!(c, "LOADING" | "BUSY" | "TRYAGAIN")) =>
            {
                tracing::info!(error = %e, "the server refuses client tracking");
                let _ = tx.send(Change::Unsupported).await;
                return;
            }
            Err(e) => tracing::debug!(error = %e, "cannot set up client tracking yet"),
            Ok(mut conn) => {
                backoff = Duration::from_millis(200);
                tracing::info!("following registry changes through client-tracking invalidations");
                if tx.send(Change::Resync).await.is_err() {
                    return;
                }
                let mut keepalive = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = keepalive.tick() => {
                            if redis::cmd("PING").query_async::<()>(&mut conn).await.is_err() {
                                break;
                            }
                        }
                        push = pushes.recv() => {
                            let Some(push) = push else { break };
                            match push.kind {
                                redis::PushKind::Invalidate => {
                                    for change in invalidated(push.data) {
                                        if tx.send(change).await.is_err() {
                                            return;
                                        }
                                    }
                                }
                                redis::PushKind::Disconnection => break,
                                _ => {}
                            }
                        }
                    }
                }
                tracing::warn!("client-tracking connection lost; reconnecting");
                if tx.send(Change::Lost).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// The changes named by one invalidation push (`Nil`: everything, after a flush).
fn invalidated(data: Vec<redis::Value>) -> Vec<Change> {
    let mut out = Vec::new();
    for v in data {
        match v {
            redis::Value::Array(keys) | redis::Value::Set(keys) => {
                for k in keys {
                    if let redis::Value::BulkString(b) = k {
                        if let Some(c) = std::str::from_utf8(&b).ok().and_then(change_of_key) {
                            out.push(c);
                        }
                    }
                }
            }
            redis::Value::Nil => out.push(Change::Resync),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags() {
        assert!(flags_suffice("KEA"));
        assert!(flags_suffice("Khsg"));
        assert!(!flags_suffice("Eh"));
        assert!(!flags_suffice(""));
        assert!(!flags_suffice("Kh"));
    }

    #[test]
    fn invalidations_name_keys() {
        use redis::Value;
        let data = vec![Value::Array(vec![
            Value::BulkString(b"tenant:cw:provider:goto".to_vec()),
            Value::BulkString(b"tenant:cw:provider:goto:lock".to_vec()),
            Value::BulkString(b"tenant:cw:providers".to_vec()),
        ])];
        assert_eq!(
            invalidated(data),
            vec![
                Change::Record(ProviderId::new("cw", "goto")),
                Change::Tenant("cw".into())
            ]
        );
        assert_eq!(invalidated(vec![Value::Nil]), vec![Change::Resync]);
        assert_eq!(resp3_url("redis://h:1/0"), "redis://h:1/0?protocol=resp3");
        assert_eq!(
            resp3_url("redis://h:1/0?x=1"),
            "redis://h:1/0?x=1&protocol=resp3"
        );
    }

    #[test]
    fn channels() {
        assert_eq!(
            change_of_channel("__keyspace@0__:tenant:a:b:provider:goto"),
            Some(Change::Record(ProviderId::new("a:b", "goto")))
        );
        assert_eq!(
            change_of_channel("__keyspace@3__:tenant:cw:providers"),
            Some(Change::Tenant("cw".into()))
        );
        assert_eq!(
            change_of_channel("__keyspace@0__:tenant:cw:provider:goto:health"),
            None
        );
    }
}
