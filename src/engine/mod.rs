//! The engine: the one task that applies every decision and starts due refreshes.
//!
//! Every event about a provider reaches it as a [`Msg`]: records read by the registry
//! follower, providers gone, finished attempts, probe results, journal replays. For each, the
//! engine asks [`transition::transition`] what it means, stores the new state in the fleet
//! (the only writer), keeps the provider's deadline equal to the new state's `next_refresh`
//! (one source of truth: [`Deadlines`] is only its index), and hands the health fields and
//! the event to the [`health::writer`](crate::health::writer), counts the metric and logs.
//!
//! Fired deadlines go to a ready queue; an attempt starts for each as soon as a slot of the
//! `refresh.max_concurrent` semaphore is free and token calls are allowed (Redis up, the
//! recovery grace over), after checking against the fleet that it is still due. Attempts run
//! on a `TaskTracker` so that shutdown can drain them. The loop beats the heartbeat that
//! `/healthz` and the systemd watchdog watch.
//!
//! In observe mode (`refresh.mode`, read again after every reload) a fired deadline becomes
//! [`Input::WouldRefresh`] instead of an attempt, and [`Msg::Refresh`] answers
//! `Skipped(Observing)` without a call; a change of mode is applied to the providers it
//! touches ([`Input::Mode`]). A transition that asks for a stale-write repair starts
//! [`refresh::repair`] on the same tracker, its outcome coming back as [`Msg::Repaired`].

pub mod transition;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::{Context, ReadTicket};
use crate::fleet::{ProbeResult, Verdict};
use crate::health::writer::HealthOp;
use crate::health::StoredHealth;
use crate::keys::{FastMap as HashMap, FastSet as HashSet, ProviderId};
use crate::refresh::{self, Plan, Trigger};
use crate::registry::record::RecordState;
use crate::schedule::Deadlines;
use crate::telemetry::metrics as m;
use transition::{Attempt, Env, Input, Policies, RepairRequest, Repaired, Replayed, Transition};

/// Everything the engine is told.
#[derive(Debug)]
pub enum Msg {
    /// Records read from Redis; `read_version` is [`crate::fleet::Fleet::version`] taken
    /// before the read. A record the engine did not know may come with what its health hash
    /// held ([`Input::Read`]'s `stored`).
    Records {
        batch: Vec<(ProviderId, RecordState, Option<StoredHealth>)>,
        read_version: u64,
        ticket: ReadTicket,
        done: Option<oneshot::Sender<()>>,
    },
    /// Providers now served by another replica: forgotten here, their health left as it is.
    Released {
        ids: Vec<ProviderId>,
        done: Option<oneshot::Sender<()>>,
    },
    /// Providers that left the registry.
    Gone {
        ids: Vec<ProviderId>,
        ticket: ReadTicket,
        done: Option<oneshot::Sender<()>>,
    },
    /// An attempt finished; `seen` is the record it read under the lock when that differed
    /// from what the engine knew.
    Finished {
        id: ProviderId,
        seen: Option<RecordState>,
        outcome: Attempt,
        ticket: ReadTicket,
    },
    /// Health probe results with the fleet version each was planned at.
    Probes(Vec<(ProviderId, u64, ProbeResult)>),
    /// Refresh `id` now, outside its schedule (an operator's `refresh`, a probe's 401, a
    /// sync that needs a fresh token): through the same lock, reservation and journal, at most
    /// `refresh.max_concurrent` at once with the scheduled ones. `Trigger::Forced` ignores
    /// `reauth_required` and due times; `Trigger::Scheduled` refreshes early but respects a
    /// re-authorisation verdict. The outcome is sent to `reply` once applied (joined to an
    /// attempt already in flight for `id`).
    Refresh {
        id: ProviderId,
        trigger: Trigger,
        reply: Option<oneshot::Sender<Attempt>>,
    },
    /// A held answer was replayed; `seen` is the record read after it.
    Replayed {
        id: ProviderId,
        seen: Option<RecordState>,
        outcome: Replayed,
        ticket: ReadTicket,
    },
    /// A stale-write repair ran ([`refresh::repair`]); `seen` is the record read after it.
    Repaired {
        id: ProviderId,
        seen: Option<RecordState>,
        outcome: Repaired,
        ticket: ReadTicket,
    },
}

/// Applies one input for `id`: the one place where the fleet changes.
pub fn apply(
    ctx: &Context,
    pol: &Policies,
    id: &ProviderId,
    input: Input<'_>,
    rng: &mut fastrand::Rng,
) -> Transition {
    let now = Utc::now();
    let tr = {
        let mut fleet = ctx.fleet.write();
        let version = fleet.bump();
        let prev = fleet.providers.get(id).map(|t| &**t);
        let tr = transition::transition(prev, input, pol, &mut Env { now, rng, version });
        if tr.changed {
            match &tr.tracked {
                Some(t) => match fleet.providers.get_mut(id) {
                    Some(slot) => (**slot).clone_from(t),
                    None => {
                        fleet.providers.insert(id.clone(), Box::new(t.clone()));
                    }
                },
                None => {
                    fleet.providers.remove(id);
                }
            }
        }
        tr
    };
    if let Some(label) = tr.result {
        metrics::counter!(m::TOKEN_REFRESH_TOTAL, "provider" => id.provider.to_string(), "result" => label)
            .increment(1);
    }
    if let Some(reason) = tr.invalid {
        metrics::counter!(m::REGISTRY_INVALID_RECORDS, "reason" => reason).increment(1);
    }
    if tr.stale_write {
        metrics::counter!(m::STALE_WRITES_TOTAL, "provider" => id.provider.to_string())
            .increment(1);
    }
    if let Some(l) = &tr.log {
        let span = match input {
            Input::Attempt(_) | Input::Replay(_) | Input::Repair(_) => {
                tracing::info_span!("refresh", tenant = %id.tenant, provider = %id.provider)
            }
            _ => tracing::info_span!("provider", tenant = %id.tenant, provider = %id.provider),
        };
        span.in_scope(|| emit(l));
    }
    tr
}

fn emit(l: &transition::Log) {
    let d = l.detail.as_str();
    match l.level {
        tracing::Level::ERROR => tracing::error!(detail = %d, "{}", l.message),
        tracing::Level::WARN => tracing::warn!(detail = %d, "{}", l.message),
        tracing::Level::INFO => tracing::info!(detail = %d, "{}", l.message),
        _ => tracing::debug!(detail = %d, "{}", l.message),
    }
}

/// The engine's own state: deadlines, the ready queue and what is in flight.
struct Engine {
    ctx: Arc<Context>,
    deadlines: Deadlines,
    ready: VecDeque<(ProviderId, DateTime<Utc>)>,
    queued: HashSet<ProviderId>,
    in_flight: HashSet<ProviderId>,
    rng: fastrand::Rng,
    pol: Policies,
    pol_generation: usize,
    slots: Arc<Semaphore>,
    tracker: TaskTracker,
    /// Who waits for the outcome of the attempt in flight for a provider.
    waiters: HashMap<ProviderId, Vec<oneshot::Sender<Attempt>>>,
    draining: bool,
}

impl Engine {
    /// Applies `input` and keeps the deadline, health and events in step.
    fn apply(&mut self, id: &ProviderId, input: Input<'_>) {
        let tr = apply(&self.ctx, &self.pol, id, input, &mut self.rng);
        if !tr.changed {
            return;
        }
        if let Some(req) = tr.repair {
            self.start_repair(id, req);
        }
        self.follow_deadline(
            id,
            tr.tracked.as_ref().and_then(|t| t.next_refresh),
            tr.tracked.is_none(),
        );
        let op = HealthOp {
            id: id.clone(),
            health: tr.health,
            event: tr.event,
        };
        self.ctx.health.send(op);
    }

    /// Starts the repair of a stale write of `id` (unless an attempt or repair is in flight:
    /// its outcome is applied first, and a stale token makes an attempt skip and ask again).
    fn start_repair(&mut self, id: &ProviderId, req: RepairRequest) {
        if self.draining || !self.in_flight.insert(id.clone()) {
            return;
        }
        self.deadlines.remove(id);
        let ctx = Arc::clone(&self.ctx);
        let id = id.clone();
        self.tracker.spawn(async move {
            let ticket = ctx.read_ticket();
            let (seen, outcome) = refresh::repair::run(&ctx, &id, req).await;
            ctx.engine.send(Msg::Repaired {
                id,
                seen,
                outcome,
                ticket,
            });
        });
    }

    /// Observe mode: a due provider is recorded as "would refresh", no call is made.
    fn would_refresh(&mut self, id: &ProviderId, planned: DateTime<Utc>) {
        self.apply(id, Input::WouldRefresh { planned });
        let next = self
            .ctx
            .fleet
            .read()
            .providers
            .get(id)
            .and_then(|t| t.next_refresh)
            // A deadline that stays in the past would fire again at once.
            .filter(|n| *n > Utc::now() + chrono::TimeDelta::seconds(1));
        self.follow_deadline(id, next, false);
    }

    /// `refresh.mode` changed: every provider the mode touched is told.
    fn mode_changed(&mut self) {
        let ids: Vec<ProviderId> = self
            .ctx
            .fleet
            .read()
            .providers
            .iter()
            .filter(|(_, t)| t.would_refresh_at.is_some() || t.stale_write.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        tracing::info!(
            mode = if self.pol.observe {
                "observe"
            } else {
                "active"
            },
            providers = ids.len(),
            "refresh.mode changed"
        );
        for id in &ids {
            self.apply(id, Input::Mode);
        }
    }

    /// The deadline of `id` follows its tracked `next_refresh` (while nothing is in flight).
    fn follow_deadline(&mut self, id: &ProviderId, next: Option<DateTime<Utc>>, forget: bool) {
        if forget {
            self.deadlines.remove(id);
            if self.queued.remove(id) {
                self.ready.retain(|(r, _)| r != id);
            }
            return;
        }
        if self.in_flight.contains(id) {
            return;
        }
        match next {
            Some(at) => {
                if !self.queued.contains(id) {
                    self.deadlines.set(id.clone(), at);
                }
            }
            None => {
                self.deadlines.remove(id);
                if self.queued.remove(id) {
                    self.ready.retain(|(r, _)| r != id);
                }
            }
        }
    }

    /// A call for `id` ended: the record it read (when it differed) and its outcome are
    /// applied, and the deadline follows the new state.
    fn settle(&mut self, id: &ProviderId, seen: Option<&RecordState>, outcome: Input<'_>) {
        self.in_flight.remove(id);
        if let Some(state) = seen {
            self.apply(id, Input::Seen(state));
        }
        self.apply(id, outcome);
        let next = self
            .ctx
            .fleet
            .read()
            .providers
            .get(id)
            .and_then(|t| t.next_refresh);
        let gone = !self.ctx.fleet.read().providers.contains_key(id);
        self.follow_deadline(id, next, gone);
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Records {
                batch,
                read_version,
                ticket,
                done,
            } => {
                // After a master change, what the new master holds is not the registry's
                // state until the failover replay is done: such reads are dropped (the
                // registry reads everything again then).
                let batch = if self.ctx.ticket_valid(ticket) {
                    batch
                } else {
                    tracing::debug!(
                        records = batch.len(),
                        "record reads dropped: a master change is being repaired"
                    );
                    Vec::new()
                };
                for (id, state, stored) in &batch {
                    self.apply(
                        id,
                        Input::Read {
                            state,
                            read_version,
                            stored: stored.as_ref(),
                        },
                    );
                }
                drop(batch);
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Msg::Released { ids, done } => {
                for id in &ids {
                    self.apply(id, Input::Released);
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Msg::Gone { ids, ticket, done } => {
                let ids = if self.ctx.ticket_valid(ticket) {
                    ids
                } else {
                    Vec::new()
                };
                for id in &ids {
                    self.apply(id, Input::Gone);
                }
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Msg::Finished {
                id,
                seen,
                outcome,
                ticket,
            } => {
                let seen = seen.filter(|_| self.ctx.ticket_valid(ticket));
                self.settle(&id, seen.as_ref(), Input::Attempt(&outcome));
                for w in self.waiters.remove(&id).unwrap_or_default() {
                    let _ = w.send(outcome.clone());
                }
            }
            Msg::Refresh { id, trigger, reply } => {
                if let Some(r) = reply {
                    self.waiters.entry(id.clone()).or_default().push(r);
                }
                if let (Err(reason), false) = (
                    transition::may_call(&self.pol),
                    self.in_flight.contains(&id),
                ) {
                    tracing::info!(tenant = %id.tenant, provider = %id.provider, "refresh asked in observe mode: no call made");
                    for w in self.waiters.remove(&id).unwrap_or_default() {
                        let _ = w.send(Attempt::Skipped(reason));
                    }
                    return;
                }
                if self.draining {
                    for w in self.waiters.remove(&id).unwrap_or_default() {
                        let _ = w.send(Attempt::Redis {
                            detail: "shutting down: no new refresh starts".into(),
                        });
                    }
                    return;
                }
                if self.in_flight.insert(id.clone()) {
                    self.deadlines.remove(&id);
                    let known = self
                        .ctx
                        .fleet
                        .read()
                        .providers
                        .get(&id)
                        .map(|t| (**t).clone());
                    let plan = Plan { id, known, trigger };
                    let ctx = Arc::clone(&self.ctx);
                    let slots = Arc::clone(&self.slots);
                    self.tracker.spawn(async move {
                        let permit = slots.acquire_owned().await;
                        let ticket = ctx.read_ticket();
                        let finished = refresh::attempt(&ctx, &plan).await;
                        drop(permit);
                        ctx.engine.send(Msg::Finished {
                            id: plan.id,
                            seen: finished.seen,
                            outcome: finished.outcome,
                            ticket,
                        });
                    });
                }
            }
            Msg::Probes(results) => {
                for (id, version, result) in &results {
                    self.apply(
                        id,
                        Input::Probe {
                            result,
                            probed_version: *version,
                        },
                    );
                }
            }
            Msg::Replayed {
                id,
                seen,
                outcome,
                ticket,
            } => {
                if let Some(state) = seen.filter(|_| self.ctx.ticket_valid(ticket)).as_ref() {
                    self.apply(&id, Input::Seen(state));
                }
                self.apply(&id, Input::Replay(&outcome));
            }
            Msg::Repaired {
                id,
                seen,
                outcome,
                ticket,
            } => {
                let seen = seen.filter(|_| self.ctx.ticket_valid(ticket));
                self.settle(&id, seen.as_ref(), Input::Repair(&outcome));
            }
        }
    }

    /// Whether `id` is still due now, as the fleet says.
    fn still_due(&self, id: &ProviderId) -> Option<refresh::Plan> {
        let fleet = self.ctx.fleet.read();
        let t = fleet.providers.get(id)?;
        if t.verdict != Verdict::Active || t.pending {
            return None;
        }
        let due = t
            .next_refresh
            .is_some_and(|n| n <= Utc::now() + chrono::TimeDelta::milliseconds(500));
        due.then(|| Plan {
            id: id.clone(),
            known: Some((**t).clone()),
            trigger: Trigger::Scheduled,
        })
    }
}

/// Starts refreshes until `cancel`; then keeps applying what in-flight attempts (on
/// `tracker`) and replays report, until `stop`.
pub async fn run(
    ctx: Arc<Context>,
    mut inbox: mpsc::UnboundedReceiver<Msg>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    stop: CancellationToken,
) {
    let cfg = ctx.config();
    let slots = Arc::new(Semaphore::new(cfg.refresh.max_concurrent));
    let mut e = Engine {
        ctx: Arc::clone(&ctx),
        deadlines: Deadlines::new(),
        ready: VecDeque::new(),
        queued: HashSet::default(),
        in_flight: HashSet::default(),
        rng: fastrand::Rng::new(),
        pol: Policies::from_config(&cfg),
        pol_generation: ctx.settings.generation(),
        slots: Arc::clone(&slots),
        tracker: tracker.clone(),
        waiters: HashMap::default(),
        draining: false,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ctx.status.beat();
        ctx.status.queue_len.store(e.ready.len(), Ordering::Relaxed);
        if e.pol_generation != ctx.settings.generation() {
            e.pol_generation = ctx.settings.generation();
            let was_observe = e.pol.observe;
            e.pol = Policies::from_config(&ctx.config());
            if was_observe != e.pol.observe {
                e.mode_changed();
            }
        }
        let grace_ms = u64::try_from(e.pol.recovery_grace.as_millis()).unwrap_or(u64::MAX);
        let draining = cancel.is_cancelled();
        e.draining = draining;
        let cfg_now = ctx.config();
        let beat_ok = !cfg_now.replica.share_fleet
            || ctx
                .status
                .heartbeat_live(cfg_now.replica.heartbeat_ttl_secs.saturating_mul(1000));
        let may_call = !draining
            && !e.ready.is_empty()
            && beat_ok
            && ctx.status.calls_allowed(grace_ms)
            && ctx.reads_trusted();
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                // What finished before the stop is still applied.
                while let Ok(msg) = inbox.try_recv() {
                    e.handle(msg);
                }
                break;
            }
            _ = cancel.cancelled(), if !draining => {
                tracing::info!(
                    scheduled = e.deadlines.len(),
                    in_flight = e.in_flight.len(),
                    "engine draining: no new refreshes start"
                );
            }
            msg = inbox.recv() => match msg {
                None => break,
                Some(msg) => {
                    e.handle(msg);
                    // Drain what is already queued before polling anything else.
                    for _ in 0..1024 {
                        match inbox.try_recv() {
                            Ok(msg) => e.handle(msg),
                            Err(_) => break,
                        }
                    }
                }
            },
            permit = Arc::clone(&slots).acquire_owned(), if may_call => {
                let Ok(permit) = permit else { break };
                let Some((id, planned)) = e.ready.pop_front() else { continue };
                e.queued.remove(&id);
                if e.in_flight.contains(&id) {
                    continue;
                }
                if e.pol.observe {
                    drop(permit);
                    e.would_refresh(&id, planned);
                    continue;
                }
                let Some(plan) = e.still_due(&id) else {
                    // Moved meanwhile: its tracked deadline stands.
                    let next = ctx.fleet.read().providers.get(&id).and_then(|t| (!t.pending).then_some(t.next_refresh).flatten());
                    e.follow_deadline(&id, next, false);
                    continue;
                };
                let late = (Utc::now() - planned).num_milliseconds().max(0) as f64 / 1000.0;
                metrics::histogram!(m::SCHEDULE_LATENESS).record(late);
                e.in_flight.insert(id.clone());
                let ctx = Arc::clone(&ctx);
                tracker.spawn(async move {
                    let ticket = ctx.read_ticket();
                    let finished = refresh::attempt(&ctx, &plan).await;
                    drop(permit);
                    ctx.engine.send(Msg::Finished {
                        id: plan.id,
                        seen: finished.seen,
                        outcome: finished.outcome,
                        ticket,
                    });
                });
            }
            due = e.deadlines.next(), if !draining => {
                let Some(due) = due else { continue };
                if e.pol.observe {
                    e.would_refresh(&due.id, due.planned);
                    continue;
                }
                if e.queued.insert(due.id.clone()) {
                    e.ready.push_back((due.id, due.planned));
                }
            }
            _ = tick.tick() => {}
        }
    }
    tracing::debug!(in_flight = e.in_flight.len(), "engine stopped");
}
