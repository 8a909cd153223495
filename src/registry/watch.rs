//! Change events: the fast path of change detection, so that an idle fleet costs nothing.
//!
//! Two sources, tokenwarden never changes the server's configuration for either:
//! - keyspace notifications ([`listen`]), when the server has `notify-keyspace-events` on
//!   for hashes, sets and generic commands;
//! - otherwise client-side-caching invalidations ([`track`]): `CLIENT TRACKING ON BCAST
//!   PREFIX tenant:` on a RESP3 connection (Redis 6 and later, no server setting needed)
//!   makes the server push the name of every `tenant:` key that changes.
//!
//! Both are per node: [`follow_masters`] runs one source on every master (the one node, the
//! Sentinels' current master, or each master of a Cluster), re-reads the masters every
//! [`NODES_EVERY`] and after a master change (slot moves, failovers), and merges what they
//! report: [`Change::Resync`] once every master's source is live, [`Change::Lost`] as soon
//! as one is not.
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
use crate::store::{self, Connection, Pool, StoreError};

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

/// How often [`follow_masters`] re-reads the list of masters.
pub const NODES_EVERY: Duration = Duration::from_secs(10);

/// Which event source [`follow_masters`] runs on each master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Keyspace,
    Tracking,
}

/// Runs `source` on every master of `pool` until cancelled (see the module docs).
pub async fn follow_masters(
    pool: Pool,
    source: Source,
    timeout: Duration,
    tx: mpsc::Sender<Change>,
    cancel: CancellationToken,
) {
    use std::collections::{BTreeMap, BTreeSet};
    let (node_tx, mut node_rx) = mpsc::channel::<(String, Change)>(4096);
    let mut running: BTreeMap<String, CancellationToken> = BTreeMap::new();
    let mut live: BTreeSet<String> = BTreeSet::new();
    let mut all_live = false;
    let mut failovers = store::master_changes(&pool);
    let mut every = tokio::time::interval(NODES_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = every.tick() => {}
            changed = async {
                match failovers.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            } => {
                if !changed {
                    failovers = None;
                }
            }
            msg = node_rx.recv() => {
                let Some((node, change)) = msg else { break };
                if !running.contains_key(&node) {
                    continue;
                }
                match change {
                    Change::Resync => { live.insert(node); }
                    Change::Lost => { live.remove(&node); }
                    Change::Unsupported => {
                        let _ = tx.send(Change::Unsupported).await;
                        break;
                    }
                    other => {
                        if tx.send(other).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                let now = !running.is_empty() && running.keys().all(|n| live.contains(n));
                if now != all_live {
                    all_live = now;
                    let c = if now { Change::Resync } else { Change::Lost };
                    if tx.send(c).await.is_err() {
                        break;
                    }
                }
                continue;
            }
        }
        let resp3 = source == Source::Tracking;
        let nodes = match store::event_clients(&pool, resp3).await {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "masters for change events not known yet");
                continue;
            }
        };
        let names: BTreeSet<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
        let before = running.len();
        running.retain(|n, stop| {
            let keep = names.contains(n);
            if !keep {
                stop.cancel();
            }
            keep
        });
        live.retain(|n| running.contains_key(n));
        let mut added = false;
        for (name, client) in nodes {
            if running.contains_key(&name) {
                continue;
            }
            added = true;
            let stop = cancel.child_token();
            running.insert(name.clone(), stop.clone());
            let (one_tx, mut one_rx) = mpsc::channel::<Change>(1024);
            let fwd = node_tx.clone();
            let label = name.clone();
            tokio::spawn(async move {
                while let Some(c) = one_rx.recv().await {
                    if fwd.send((label.clone(), c)).await.is_err() {
                        return;
                    }
                }
            });
            match source {
                Source::Keyspace => {
                    let db = client.get_connection_info().redis_settings().db();
                    tokio::spawn(listen(client, db, one_tx, stop));
                }
                Source::Tracking => {
                    tokio::spawn(track(client, timeout, one_tx, stop));
                }
            }
        }
        if (added || running.len() != before) && all_live {
            // A new master (slot moves, a failover) is not live yet: events may be missed.
            all_live = false;
            if tx.send(Change::Lost).await.is_err() {
                break;
            }
        }
    }
    for stop in running.values() {
        stop.cancel();
    }
}

/// Whether the server sends the keyspace events tokenwarden needs: keyspace (`K`) channel
/// events for hashes (`h`), sets (`s`) and generic commands (`g`, for DEL and EXPIRE), or `A`.
/// A user without `CONFIG` (least privilege: NOPERM) counts as "off". On a Cluster every
/// master must have them on.
pub async fn notifications_enabled(conn: &mut Connection) -> Result<bool, StoreError> {
    for (_, mut node) in store::masters(conn).await? {
        let answer: Vec<String> = match redis::cmd("CONFIG")
            .arg("GET")
            .arg("notify-keyspace-events")
            .query_async(&mut node)
            .await
        {
            Ok(a) => a,
            Err(e) if e.code().is_some() => {
                tracing::info!(error = %e, "CONFIG GET refused: keyspace notifications taken as off");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        if !answer.get(1).is_some_and(|flags| flags_suffice(flags)) {
            return Ok(false);
        }
    }
    Ok(true)
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
#[cfg(test)]
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
    client: redis::Client,
    timeout: Duration,
    tx: mpsc::Sender<Change>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let (push_tx, mut pushes) = mpsc::unbounded_channel::<redis::PushInfo>();
        let setup = async {
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
