//! Keyspace notifications: the fast path of change detection.
//!
//! When the server has `notify-keyspace-events` on for hashes, sets and generic commands
//! (tokenwarden never changes the server's configuration), a subscriber turns each event on a
//! `tenant:*` key into a [`Change`] for the engine. A lost subscription sends
//! [`Change::Resync`] so that the engine rescans what it may have missed.

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
