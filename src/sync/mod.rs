//! Data sync: each tenant's directory, on its own schedule, from every provider into Redis,
//! with one cross-provider directory.
//!
//! # The model
//! Five features ([`model::Feature`]): `users`, `extensions`, `call_queues`,
//! `auto_attendants`, `phone_numbers`, each normalised into one documented serde type of
//! [`model`] by a per-provider adapter ([`adapters`]). The catalog's
//! `[providers.<type>.sync.<feature>]` tables ([`endpoints`]) say where each feature is
//! listed and how it pages; a feature without such a table is not synced for that type.
//!
//! # Keys (SPEC 2)
//! - `tenant:{t}:sync:{p}:{feature}`: hash, field = the provider's record id, value = the
//!   normalised record as JSON; replaced whole through `{K}:staging` and `RENAME`
//!   ([`store`]); expires `data_retention_days` after the last successful run.
//! - `tenant:{t}:directory:users`: hash, field = a stable unified id, value = a
//!   [`directory::UnifiedUser`] with its id at each provider ([`directory`]).
//! - `tenant:{t}:sync:lock`: the replica running the tenant's sync now ([`lock`]).
//! - `tenant:{t}:sync:last_slot`: the last scheduled slot run (our addition), so that
//!   replicas firing the same slot run it once.
//! - Health `last_sync_at`, `last_sync_result`; `sync` events on `tokenwarden:events`.
//!
//! # The flow
//! The scheduler task ([`run`]) keeps one deadline per tenant in a [`Queue`] (an ordered
//! set plus a map: no scan of every tenant per tick) and sleeps until the earliest. A
//! tenant's next run comes from its `sync_schedule` in its `timezone` with crontab
//! semantics ([`schedule`]), plus a stable offset within `sync.spread_secs`. The tenant
//! list and configs are re-read every `sync.config_reread_secs` by a `tokio-cron-scheduler`
//! job (fleet-wide periodic work, where that crate fits), so tenants appearing, changing
//! or leaving are followed. A due tenant runs [`run::run_tenant`] (at most
//! `sync.max_concurrent_tenants` at once, never twice at once in this replica, and never
//! overlapping across replicas: the lock); [`strategy`] decides its providers and
//! features, [`fetch`] reads them, [`store`] writes them. On shutdown no run starts, runs
//! in flight stop between pages (writing nothing) or finish within the drain deadline.

pub mod adapters;
pub mod directory;
pub mod endpoints;
pub mod fetch;
pub mod lock;
pub mod model;
pub mod run;
pub mod schedule;
pub mod store;
pub mod strategy;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::store::Pool;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::context::Context;
use crate::keys::{self, ProviderId};
use crate::store::StoreError;
use schedule::{Cron, TenantSchedule};

pub use run::{run_tenant, Line, Outcome, Report};
pub use strategy::Selection;

/// A tenant's schedule settings as read from `tenant:{t}:config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantConf {
    pub tenant: String,
    pub schedule: Option<String>,
    pub timezone: Option<String>,
}

/// Every tenant (`SCAN MATCH tenant:*:providers`) with its `sync_schedule` and `timezone`,
/// read in pipelines of `batch`.
pub async fn read_tenants(pool: &Pool, batch: usize) -> Result<Vec<TenantConf>, StoreError> {
    let mut conn = crate::store::conn(pool).await?;
    let mut cursor: u64 = 0;
    let mut tenants: Vec<String> = Vec::new();
    loop {
        let (next, found): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(keys::PROVIDERS_PATTERN)
            .arg("COUNT")
            .arg(batch.max(10))
            .query_async(&mut conn)
            .await?;
        for k in &found {
            if let Some(t) =
                keys::tenant_part_of_providers_key(k).and_then(|t| keys::tenant_id(t).ok())
            {
                tenants.push(t.to_string());
            }
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    tenants.sort();
    tenants.dedup();
    let mut out = Vec::with_capacity(tenants.len());
    for chunk in tenants.chunks(batch.max(1)) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for t in chunk {
            pipe.cmd("HMGET")
                .arg(keys::tenant_config_key(t))
                .arg("sync_schedule")
                .arg("timezone");
        }
        let values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
        for (t, v) in chunk.iter().zip(values) {
            let (schedule, timezone) =
                redis::from_redis_value::<(Option<String>, Option<String>)>(v).unwrap_or_default();
            out.push(TenantConf {
                tenant: t.clone(),
                schedule,
                timezone,
            });
        }
    }
    Ok(out)
}

struct Entry {
    conf: TenantConf,
    schedule: TenantSchedule,
    next: Option<DateTime<Utc>>,
}

/// The deadline queue of tenant runs: pure data, no I/O.
pub struct Queue {
    tenants: HashMap<String, Entry>,
    due: BTreeSet<(DateTime<Utc>, String)>,
    default: Cron,
    spread_secs: u64,
}

impl Queue {
    pub fn new(default: Cron, spread_secs: u64) -> Queue {
        Queue {
            tenants: HashMap::new(),
            due: BTreeSet::new(),
            default,
            spread_secs,
        }
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// Applies a fresh tenant list: new tenants scheduled, changed ones rescheduled, gone
    /// ones dropped. Returns `(tenant, why)` for each new or changed tenant whose own
    /// schedule could not be used (`bad_schedule`).
    pub fn update(&mut self, confs: Vec<TenantConf>, now: DateTime<Utc>) -> Vec<(String, String)> {
        let mut bad = Vec::new();
        let present: HashSet<&str> = confs.iter().map(|c| c.tenant.as_str()).collect();
        let gone: Vec<String> = self
            .tenants
            .keys()
            .filter(|t| !present.contains(t.as_str()))
            .cloned()
            .collect();
        for t in gone {
            if let Some(e) = self.tenants.remove(&t) {
                if let Some(n) = e.next {
                    self.due.remove(&(n, t));
                }
            }
        }
        for conf in confs {
            if self
                .tenants
                .get(&conf.tenant)
                .is_some_and(|e| e.conf == conf)
            {
                continue;
            }
            let r = TenantSchedule::resolve(
                &conf.tenant,
                conf.schedule.as_deref(),
                conf.timezone.as_deref(),
                &self.default,
                self.spread_secs,
            );
            if let Some(why) = r.bad {
                bad.push((conf.tenant.clone(), why));
            }
            let next = r.schedule.next_after(now);
            if let Some(old) = self.tenants.remove(&conf.tenant) {
                if let Some(n) = old.next {
                    self.due.remove(&(n, conf.tenant.clone()));
                }
            }
            if let Some(n) = next {
                self.due.insert((n, conf.tenant.clone()));
            }
            self.tenants.insert(
                conf.tenant.clone(),
                Entry {
                    conf,
                    schedule: r.schedule,
                    next,
                },
            );
        }
        bad
    }

    /// The earliest deadline.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.due.first().map(|(at, _)| *at)
    }

    /// Tenants due at `now`, each with its slot; each is rescheduled after its slot.
    pub fn pop_due(&mut self, now: DateTime<Utc>) -> Vec<(String, DateTime<Utc>)> {
        let mut out = Vec::new();
        while let Some((at, _)) = self.due.first() {
            if *at > now {
                break;
            }
            let Some((at, t)) = self.due.pop_first() else {
                break;
            };
            if let Some(e) = self.tenants.get_mut(&t) {
                // From the later of the slot and now: a late wake-up does not replay slots.
                let next = e
                    .schedule
                    .next_after(at.max(now - chrono::Duration::seconds(1)));
                e.next = next;
                if let Some(n) = next {
                    self.due.insert((n, t.clone()));
                }
            }
            out.push((t, at));
        }
        out
    }

    /// When `tenant` runs next.
    pub fn next_of(&self, tenant: &str) -> Option<DateTime<Utc>> {
        self.tenants.get(tenant).and_then(|e| e.next)
    }
}

/// Reports a tenant whose schedule was replaced by the default: a log line and an event.
async fn report_bad(ctx: &Context, bad: &[(String, String)]) {
    if bad.is_empty() {
        return;
    }
    let maxlen = ctx.config().events.stream_maxlen;
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for (t, why) in bad {
        tracing::warn!(tenant = %crate::text::escape_control(t), reason = %why, "bad_schedule: using the default sync schedule");
        crate::health::add_event(
            &mut pipe,
            maxlen,
            "sync",
            &ProviderId::new(t.as_str(), ""),
            "bad_schedule",
            why,
        );
        pipe.ignore();
    }
    if let Ok(mut conn) = crate::store::conn(&ctx.pool).await {
        let _: Result<(), _> = pipe.query_async(&mut conn).await;
    }
}

/// The fleet-wide periodic job: re-read every tenant's schedule settings into `tx`.
async fn start_reread_job(
    ctx: &Arc<Context>,
    tx: mpsc::Sender<Vec<TenantConf>>,
) -> Result<tokio_cron_scheduler::JobScheduler, tokio_cron_scheduler::JobSchedulerError> {
    use tokio_cron_scheduler::{Job, JobScheduler};
    let every = Duration::from_secs(ctx.config().sync.config_reread_secs.max(1));
    let sched = JobScheduler::new().await?;
    let (pool, batch) = (ctx.pool.clone(), ctx.config().registry.scan_batch);
    let job = Job::new_repeated_async(every, move |_, _| {
        let (pool, tx) = (pool.clone(), tx.clone());
        Box::pin(async move {
            match read_tenants(&pool, batch).await {
                Ok(confs) => {
                    let _ = tx.try_send(confs);
                }
                Err(e) => tracing::debug!(error = %e, "sync: tenant configs not re-read (redis)"),
            }
        })
    })?;
    sched.add(job).await?;
    sched.start().await?;
    Ok(sched)
}

fn sleep_for(deadline: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Duration {
    // Woken at least every minute, so a clock step is noticed.
    let cap = Duration::from_secs(60);
    match deadline {
        None => cap,
        Some(d) => (d - now).to_std().unwrap_or(Duration::ZERO).min(cap),
    }
}

/// The scheduler task: runs until `cancel`, then lets runs in flight stop or finish for
/// at most `shutdown.drain_deadline_secs`.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let cfg = ctx.config();
    if !cfg.sync.enabled {
        return;
    }
    let default = match Cron::parse(&cfg.sync.default_schedule) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "sync.default_schedule unusable: sync disabled");
            return;
        }
    };
    let mut queue = Queue::new(default, cfg.sync.spread_secs);
    let (tx, mut rx) = mpsc::channel::<Vec<TenantConf>>(2);
    let mut cron = match start_reread_job(&ctx, tx.clone()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "sync: periodic config re-read not started; reading once");
            None
        }
    };
    // The first read once the registry's first full read is done (its own SCAN and the
    // tenants' config reads would otherwise share Redis with the start), not after the
    // first period.
    {
        let (pool, batch, tx) = (ctx.pool.clone(), cfg.registry.scan_batch, tx.clone());
        let (status_ctx, first_cancel) = (Arc::clone(&ctx), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = first_cancel.cancelled() => return,
                _ = status_ctx.status.first_scan_done() => {}
            }
            if let Ok(confs) = read_tenants(&pool, batch).await {
                let _ = tx.send(confs).await;
            }
        });
    }
    let slots = Arc::new(Semaphore::new(cfg.sync.max_concurrent_tenants.max(1)));
    let tracker = TaskTracker::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut running: HashSet<String> = HashSet::new();
    loop {
        let wait = sleep_for(queue.next_deadline(), Utc::now());
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(confs) = rx.recv() => {
                let bad = queue.update(confs, Utc::now());
                report_bad(&ctx, &bad).await;
            }
            Some(t) = done_rx.recv() => {
                running.remove(&t);
            }
            _ = tokio::time::sleep(wait) => {
                for (tenant, slot) in queue.pop_due(Utc::now()) {
                    // Replicas share the fleet: another replica syncs its own tenants (the
                    // tenant keeps its next slot, for when this replica owns it again).
                    if !ctx.membership.owns(&tenant) {
                        continue;
                    }
                    if !running.insert(tenant.clone()) {
                        tracing::debug!(tenant = %crate::text::escape_control(&tenant), "sync still running: slot skipped");
                        continue;
                    }
                    let (ctx, slots, done, stop) = (Arc::clone(&ctx), Arc::clone(&slots), done_tx.clone(), cancel.clone());
                    tracker.spawn(async move {
                        if let Ok(_permit) = slots.acquire_owned().await {
                            if !stop.is_cancelled() {
                                let report = run_tenant(&ctx, &tenant, &Selection::default(), Some(slot.timestamp()), &stop).await;
                                if let Outcome::Failed(why) = &report.outcome {
                                    tracing::warn!(tenant = %crate::text::escape_control(&tenant), error = %why, "sync run failed");
                                }
                            }
                        }
                        let _ = done.send(tenant);
                    });
                }
            }
        }
    }
    if let Some(c) = cron.as_mut() {
        let _ = c.shutdown().await;
    }
    tracker.close();
    let drain = Duration::from_secs(ctx.config().shutdown.drain_deadline_secs);
    if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
        tracing::warn!(
            abandoned = tracker.len(),
            "sync runs abandoned at the drain deadline: their locks expire"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(t: &str, s: Option<&str>) -> TenantConf {
        TenantConf {
            tenant: t.into(),
            schedule: s.map(str::to_string),
            timezone: None,
        }
    }

    #[test]
    fn the_queue_follows_tenants_appearing_changing_and_leaving() {
        let now = DateTime::parse_from_rfc3339("2026-06-01T00:00:30Z")
            .expect("t")
            .with_timezone(&Utc);
        let mut q = Queue::new(Cron::parse("*/15 * * * *").expect("cron"), 0);
        let bad = q.update(
            vec![
                conf("a", None),
                conf("b", Some("0 9 * * *")),
                conf("c", Some("nope")),
            ],
            now,
        );
        assert_eq!(bad.len(), 1);
        assert_eq!(
            q.next_deadline().map(|d| d.to_rfc3339()),
            Some("2026-06-01T00:15:00+00:00".into())
        );
        let due = q.pop_due(now + chrono::Duration::minutes(15));
        let names: Vec<&str> = due.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(
            q.next_of("a").map(|d| d.to_rfc3339()),
            Some("2026-06-01T00:30:00+00:00".into())
        );
        q.update(
            vec![conf("a", Some("0 * * * *")), conf("b", Some("0 9 * * *"))],
            now,
        );
        assert_eq!(q.len(), 2);
        assert_eq!(
            q.next_of("a").map(|d| d.to_rfc3339()),
            Some("2026-06-01T01:00:00+00:00".into())
        );
        assert_eq!(q.next_of("c"), None);
    }
}
