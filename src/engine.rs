//! The engine: the one task that owns every refresh deadline and starts due refreshes.
//!
//! It turns [`Command`]s from the registry follower and from finished attempts into
//! deadlines ([`Deadlines`]), moves fired deadlines to a ready queue, and starts an attempt
//! for each as soon as a slot of the `refresh.max_concurrent` semaphore is free, so a burst
//! of already-expired tokens is refreshed at once but with bounded concurrency. Attempts run
//! on a `TaskTracker` so that shutdown can drain them. The loop beats a heartbeat that
//! `/healthz` watches.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{Command, Context};
use crate::keys::ProviderId;
use crate::refresh::{self, Trigger};
use crate::schedule::Deadlines;
use crate::telemetry::metrics as m;

/// Runs until `cancel`; in-flight attempts keep running on `tracker`.
pub async fn run(
    ctx: Arc<Context>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(ctx.config().refresh.max_concurrent));
    let mut deadlines = Deadlines::new();
    let mut ready: VecDeque<(ProviderId, chrono::DateTime<Utc>)> = VecDeque::new();
    let mut queued: HashSet<ProviderId> = HashSet::new();
    let mut in_flight: HashSet<ProviderId> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ctx.status.beat();
        ctx.status.queue_len.store(ready.len(), Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            cmd = commands.recv() => match cmd {
                None => break,
                Some(Command::Schedule(id, at)) => {
                    if !queued.contains(&id) {
                        deadlines.set(id, at);
                    }
                }
                Some(Command::Unschedule(id)) => {
                    deadlines.remove(&id);
                    if queued.remove(&id) {
                        ready.retain(|(r, _)| r != &id);
                    }
                }
                Some(Command::Finished(id, next)) => {
                    in_flight.remove(&id);
                    if let Some(at) = next {
                        deadlines.set(id, at);
                    }
                }
            },
            permit = Arc::clone(&slots).acquire_owned(), if !ready.is_empty() => {
                let Ok(permit) = permit else { break };
                let Some((id, planned)) = ready.pop_front() else { continue };
                queued.remove(&id);
                let late = (Utc::now() - planned).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!(m::SCHEDULE_LATENESS).record(late);
                if !in_flight.insert(id.clone()) {
                    // Already being refreshed: its finish schedules the next one.
                    continue;
                }
                let ctx = Arc::clone(&ctx);
                tracker.spawn(async move {
                    let report = refresh::attempt(&ctx, &id, Trigger::Scheduled).await;
                    drop(permit);
                    ctx.engine.send(Command::Finished(id, report.next));
                });
            }
            due = deadlines.next() => {
                let Some(due) = due else { continue };
                if queued.insert(due.id.clone()) {
                    ready.push_back((due.id, due.planned));
                }
            }
            _ = tick.tick() => {}
        }
    }
    tracing::info!(
        scheduled = deadlines.len(),
        in_flight = in_flight.len(),
        "engine stopped: no new refreshes start"
    );
}
