//! Schedule: when each token is refreshed next.
//!
//! [`policy`] computes a refresh time from a token's lifetime; [`Deadlines`] keeps one
//! deadline per provider in a `tokio_util` `DelayQueue` driven by the engine's single task
//! (cheap at 100,000 deadlines and accurate to milliseconds; cron is for human-scheduled
//! periodic work such as a tenant's sync, not for this).

pub mod policy;

use std::pin::Pin;
use std::task::{Context, Poll};

use chrono::{DateTime, Utc};
use futures_util::Stream;
use tokio::time::Instant;
use tokio_util::time::{delay_queue, DelayQueue};

use crate::keys::{FastMap as HashMap, ProviderId};

/// A deadline that fired.
#[derive(Debug)]
pub struct Due {
    pub id: ProviderId,
    /// When it was planned to fire (wall clock).
    pub planned: DateTime<Utc>,
}

/// One deadline per provider; setting one again moves it.
#[derive(Default)]
pub struct Deadlines {
    queue: DelayQueue<ProviderId>,
    index: HashMap<ProviderId, (delay_queue::Key, DateTime<Utc>)>,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines::default()
    }

    /// Sets (or moves) the deadline of `id` to the wall-clock time `at`.
    pub fn set(&mut self, id: ProviderId, at: DateTime<Utc>) {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let when = Instant::now() + wait;
        match self.index.get_mut(&id) {
            Some((key, planned)) => {
                self.queue.reset_at(key, when);
                *planned = at;
            }
            None => {
                let key = self.queue.insert_at(id.clone(), when);
                self.index.insert(id, (key, at));
            }
        }
    }

    pub fn remove(&mut self, id: &ProviderId) {
        if let Some((key, _)) = self.index.remove(id) {
            self.queue.remove(&key);
        }
    }

    pub fn planned(&self, id: &ProviderId) -> Option<DateTime<Utc>> {
        self.index.get(id).map(|(_, at)| *at)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

impl Stream for Deadlines {
    type Item = Due;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Due>> {
        let this = &mut *self;
        match this.queue.poll_expired(cx) {
            Poll::Ready(Some(expired)) => {
                let id = expired.into_inner();
                let planned = this
                    .index
                    .remove(&id)
                    .map(|(_, at)| at)
                    .unwrap_or_else(Utc::now);
                Poll::Ready(Some(Due { id, planned }))
            }
            // An empty queue is not the end of the stream: more deadlines will come.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn fires_in_order_and_moves() {
        let mut d = Deadlines::new();
        let now = Utc::now();
        let a = ProviderId::new("t", "a");
        let b = ProviderId::new("t", "b");
        d.set(a.clone(), now + chrono::Duration::seconds(10));
        d.set(b.clone(), now + chrono::Duration::seconds(5));
        assert_eq!(d.len(), 2);
        let first = d.next().await.expect("fires");
        assert_eq!(first.id, b);
        // Move a earlier than it was, then remove nothing else.
        d.set(a.clone(), now + chrono::Duration::seconds(6));
        let second = d.next().await.expect("fires");
        assert_eq!(second.id, a);
        assert!(d.is_empty());
        // An empty queue stays pending instead of ending.
        let pending = tokio::time::timeout(Duration::from_secs(3600), d.next()).await;
        assert!(pending.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn removed_deadlines_never_fire() {
        let mut d = Deadlines::new();
        let now = Utc::now();
        let a = ProviderId::new("t", "a");
        d.set(a.clone(), now + chrono::Duration::seconds(1));
        d.remove(&a);
        let r = tokio::time::timeout(Duration::from_secs(60), d.next()).await;
        assert!(r.is_err());
        assert_eq!(d.planned(&a), None);
    }
}
