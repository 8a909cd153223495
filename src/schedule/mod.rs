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

/// The longest a deadline waits in the queue at once. `DelayQueue` panics on a deadline
/// past its wheel (2^36 ms, about 795 days), and a plan can lie further out (a token expiring
/// in years with a catalog `max_refresh_interval_secs` as long): such a deadline wakes at
/// this horizon and goes back into the queue for the rest of its wait, unreported.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// One deadline per provider; setting one again moves it.
#[derive(Default)]
pub struct Deadlines {
    queue: DelayQueue<ProviderId>,
    /// The queue's key, the planned wall-clock time and the instant it is due.
    index: HashMap<ProviderId, (delay_queue::Key, DateTime<Utc>, Instant)>,
}

impl Deadlines {
    pub fn new() -> Deadlines {
        Deadlines::default()
    }

    /// Sets (or moves) the deadline of `id` to the wall-clock time `at`.
    pub fn set(&mut self, id: ProviderId, at: DateTime<Utc>) {
        let wait = (at - Utc::now()).to_std().unwrap_or_default();
        let now = Instant::now();
        let due = now.checked_add(wait).unwrap_or(now + MAX_WAIT);
        let wake = now + wait.min(MAX_WAIT);
        match self.index.get_mut(&id) {
            Some((key, planned, when)) => {
                self.queue.reset_at(key, wake);
                *planned = at;
                *when = due;
            }
            None => {
                let key = self.queue.insert_at(id.clone(), wake);
                self.index.insert(id, (key, at, due));
            }
        }
    }

    pub fn remove(&mut self, id: &ProviderId) {
        if let Some((key, _, _)) = self.index.remove(id) {
            self.queue.remove(&key);
        }
    }

    pub fn planned(&self, id: &ProviderId) -> Option<DateTime<Utc>> {
        self.index.get(id).map(|(_, at, _)| *at)
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
        loop {
            match this.queue.poll_expired(cx) {
                Poll::Ready(Some(expired)) => {
                    let id = expired.into_inner();
                    let now = Instant::now();
                    if let Some((key, _, when)) = this.index.get_mut(&id) {
                        if *when > now {
                            // Woken at the horizon: the rest of the wait.
                            *key = this.queue.insert_at(id, now + (*when - now).min(MAX_WAIT));
                            continue;
                        }
                    }
                    let planned = this
                        .index
                        .remove(&id)
                        .map(|(_, at, _)| at)
                        .unwrap_or_else(Utc::now);
                    return Poll::Ready(Some(Due { id, planned }));
                }
                // An empty queue is not the end of the stream: more deadlines will come.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
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
    async fn a_deadline_years_out_waits_past_the_queues_horizon() {
        let mut d = Deadlines::new();
        let far = ProviderId::new("t", "far");
        let near = ProviderId::new("t", "near");
        let years = chrono::Duration::days(5 * 365);
        // Past the queue's wheel (about 795 days): inserting it as is would panic.
        d.set(far.clone(), Utc::now() + years);
        d.set(near.clone(), Utc::now() + chrono::Duration::days(400));
        let first = d.next().await.expect("fires");
        assert_eq!(first.id, near, "the horizon's wake-up is not reported");
        let started = Instant::now();
        let second = d.next().await.expect("fires");
        assert_eq!(second.id, far);
        let waited = started.elapsed() + Duration::from_secs(400 * 86_400);
        assert!(
            waited >= Duration::from_secs(5 * 365 * 86_400 - 60),
            "fired after {waited:?}"
        );
        assert!(d.is_empty());
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
