//! Following the registry: keeps the fleet and the deadlines in step with Redis.
//!
//! [`apply`] is the one place where a record read from Redis changes what tokenwarden
//! believes (new, changed, inactive, invalid); refresh attempts use it too when they re-read
//! a record under the lock. [`run`] is the loop: a full read at start and every
//! `full_rescan_interval_secs`; in between, change events ([`watch`]: keyspace
//! notifications when the server sends them, else client-tracking invalidations), and a
//! light change scan every `change_scan_interval_secs` while no event source is live.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Notifications};
use crate::context::{Command, Context};
use crate::fleet::{Fleet, Tracked, Verdict};
use crate::health::{self, HealthUpdate};
use crate::keys::ProviderId;
use crate::registry::record::RecordState;
use crate::registry::watch::{self, Change};
use crate::registry::{Members, ReadStats, Registry};
use crate::schedule::policy::Lifetime;
use crate::store::{self, StoreError};
use crate::telemetry::metrics as m;

/// Records read, applied and committed per step of a full read.
const APPLY_SLICE: usize = 5_000;
/// Tenants whose members are read together during a full read.
const TENANT_SLICE: usize = 1_000;

/// What [`apply`] decided, to be sent to Redis and the engine after the fleet lock is gone.
#[derive(Debug, Default)]
pub struct Applied {
    pub schedule: Option<Command>,
    pub health: Option<HealthUpdate>,
    pub event: Option<(&'static str, String)>,
}

/// Applies one record read to the fleet. `read_version` is the fleet version taken before the
/// read: an entry changed locally since then is newer than the read, and is left alone.
pub fn apply(
    fleet: &mut Fleet,
    cfg: &Config,
    id: &ProviderId,
    state: &RecordState,
    read_version: u64,
    now: DateTime<Utc>,
) -> Applied {
    let fp = state.fingerprint();
    let previous = fleet.providers.get(id);
    if let Some(t) = previous {
        if t.version > read_version || t.fingerprint == fp {
            return Applied::default();
        }
    }
    let last_refresh = previous.map_or(now, |t| t.last_refresh);
    let was_active = previous.is_some_and(|t| t.verdict == Verdict::Active && t.reauth.is_none());
    let failing_after = cfg.refresh.failing_after;
    let mut out = Applied::default();
    let tracked = match state {
        RecordState::Inactive { provider_type, .. } => {
            tracing::info!(tenant = %id.tenant, provider = %id.provider, "provider inactive: tracked, not refreshed");
            out.schedule = Some(Command::Unschedule(id.clone()));
            Tracked::new(provider_type, Verdict::Inactive, fp, now)
        }
        RecordState::Invalid { error, .. } => {
            invalid(id, &error.reason_and_detail(), fp, now, &mut out)
        }
        RecordState::Valid(r) => match r.endpoint(&cfg.catalog) {
            Err(e) => invalid(id, &(e.reason, e.detail.clone()), fp, now, &mut out),
            Ok(_) => {
                let mut t = Tracked::new(&r.provider_type, Verdict::Active, fp, now);
                t.last_refresh = last_refresh;
                t.refresh_token_expiry = previous.and_then(|p| p.refresh_token_expiry);
                t.token_expiry = r.token_expiry.map(|e| e.at);
                let next = match t.token_expiry {
                    None => now,
                    Some(expiry) => cfg.refresh_policy().next_refresh(
                        Lifetime {
                            issued: now,
                            expiry,
                        },
                        last_refresh,
                        t.refresh_token_expiry,
                        now,
                        &mut fastrand::Rng::new(),
                    ),
                };
                t.next_refresh = Some(next);
                out.schedule = Some(Command::Schedule(id.clone(), next));
                if previous.is_none() {
                    tracing::debug!(tenant = %id.tenant, provider = %id.provider, next_refresh = %next, "tracking provider");
                }
                t
            }
        },
    };
    let mut h = HealthUpdate::from_tracked(&tracked, failing_after, now);
    if tracked.verdict == Verdict::Active && (previous.is_none() || was_active) {
        // Another replica may know more about this provider's health: do not overwrite it.
        let state = tracked.state(failing_after).as_str();
        h = HealthUpdate::default();
        h.set_if_absent("state", state);
        h.set(
            "token_expiry",
            tracked
                .token_expiry
                .map(crate::timestamp::iso_utc)
                .unwrap_or_default(),
        );
        h.set(
            "next_refresh_at",
            tracked
                .next_refresh
                .map(crate::timestamp::iso_utc)
                .unwrap_or_default(),
        );
        h.set("updated_at", crate::timestamp::iso_utc(now));
    }
    out.health = Some(h);
    let mut tracked = tracked;
    tracked.version = read_version;
    fleet.providers.insert(id.clone(), tracked);
    out
}

fn invalid(
    id: &ProviderId,
    (reason, detail): &(&'static str, String),
    fp: u64,
    now: DateTime<Utc>,
    out: &mut Applied,
) -> Tracked {
    tracing::warn!(tenant = %id.tenant, provider = %id.provider, reason, detail = %detail, "invalid provider record: not refreshed until it changes");
    metrics::counter!(m::REGISTRY_INVALID_RECORDS, "reason" => *reason).increment(1);
    out.schedule = Some(Command::Unschedule(id.clone()));
    out.event = Some(("invalid_record", format!("{reason}: {detail}")));
    Tracked::new(
        "",
        Verdict::Invalid {
            reason,
            detail: detail.clone(),
        },
        fp,
        now,
    )
}

trait ReasonAndDetail {
    fn reason_and_detail(&self) -> (&'static str, String);
}

impl ReasonAndDetail for crate::registry::record::InvalidRecord {
    fn reason_and_detail(&self) -> (&'static str, String) {
        (self.reason, self.detail.clone())
    }
}

/// Sends what [`apply`] decided for many records: health and events in one pipeline.
pub async fn commit(ctx: &Context, decided: Vec<(ProviderId, Applied)>) -> Result<(), StoreError> {
    if decided.is_empty() {
        return Ok(());
    }
    let cfg = ctx.config();
    let mut pipe = redis::pipe();
    let mut n = 0usize;
    for (id, a) in decided {
        if let Some(c) = a.schedule {
            ctx.engine.send(c);
        }
        if let Some(h) = &a.health {
            h.add_to(&mut pipe, &id);
            n += 1;
        }
        if let Some((kind, detail)) = &a.event {
            health::add_event(&mut pipe, cfg.events.stream_maxlen, kind, &id, kind, detail);
            n += 1;
        }
    }
    if n > 0 {
        let mut conn = store::conn(&ctx.pool).await?;
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(())
}

/// Forgets providers that left the registry: deadline, fleet entry, health hash.
async fn remove(ctx: &Context, gone: Vec<ProviderId>) -> Result<(), StoreError> {
    if gone.is_empty() {
        return Ok(());
    }
    let cfg = ctx.config();
    let mut pipe = redis::pipe();
    {
        let mut fleet = ctx.fleet.write();
        for id in &gone {
            fleet.providers.remove(id);
        }
    }
    for id in &gone {
        tracing::info!(tenant = %id.tenant, provider = %id.provider, "provider left the registry: forgotten");
        ctx.engine.send(Command::Unschedule(id.clone()));
        health::add_delete(&mut pipe, id);
        health::add_event(
            &mut pipe,
            cfg.events.stream_maxlen,
            "removed",
            id,
            "removed",
            "",
        );
    }
    let mut conn = store::conn(&ctx.pool).await?;
    pipe.query_async::<()>(&mut conn).await?;
    Ok(())
}

/// The registry as last discovered: tenant -> provider names, and the tenants whose provider
/// set has the wrong Redis type (reported once, when first seen so).
#[derive(Default)]
struct Known(BTreeMap<String, BTreeSet<String>>, BTreeSet<String>);

impl Known {
    fn ids(&self) -> Vec<ProviderId> {
        let mut out = Vec::new();
        for (t, names) in &self.0 {
            let tenant: Arc<str> = Arc::from(t.as_str());
            for p in names {
                out.push(ProviderId::new(Arc::clone(&tenant), p.as_str()));
            }
        }
        out
    }
}

/// Reads the given records and applies them, a slice at a time so that parsed records never
/// pile up in memory.
async fn read_and_apply(
    ctx: &Context,
    registry: &Registry,
    ids: &[ProviderId],
    stats: &mut ReadStats,
) -> Result<(), StoreError> {
    for slice in ids.chunks(APPLY_SLICE) {
        let read_version = ctx.fleet.write().bump();
        let mut conn = store::conn(&ctx.pool).await?;
        let states = registry.read_records(&mut conn, slice, stats).await?;
        drop(conn);
        let cfg = ctx.config();
        let now = Utc::now();
        let decided: Vec<(ProviderId, Applied)> = {
            let mut fleet = ctx.fleet.write();
            slice
                .iter()
                .zip(states.iter())
                .map(|(id, s)| {
                    (
                        id.clone(),
                        apply(&mut fleet, &cfg, id, s, read_version, now),
                    )
                })
                .collect()
        };
        commit(ctx, decided).await?;
    }
    Ok(())
}

/// Tenants whose provider set could be read, with their names; wrong-typed sets are kept as
/// they were known (a wrong type is reported, never a reason to forget providers).
fn reconcile(known: &Known, discovered: BTreeMap<String, Members>) -> Known {
    let mut next = Known::default();
    for (tenant, members) in discovered {
        match members {
            Members::Names(names) => {
                if !names.is_empty() {
                    next.0.insert(tenant, names);
                }
            }
            Members::WrongType => {
                tracing::warn!(tenant = %tenant, "tenant:{{t}}:providers is not a set: skipped");
                metrics::counter!(m::REGISTRY_INVALID_RECORDS, "reason" => "wrong_type")
                    .increment(1);
                if let Some(names) = known.0.get(&tenant) {
                    next.0.insert(tenant, names.clone());
                }
            }
        }
    }
    next
}

fn gone_ids(before: &Known, after: &Known) -> Vec<ProviderId> {
    let after_ids: HashSet<ProviderId> = after.ids().into_iter().collect();
    before
        .ids()
        .into_iter()
        .filter(|id| !after_ids.contains(id))
        .collect()
}

/// Every record, read in full.
async fn full_scan(
    ctx: &Context,
    registry: &Registry,
    known: &mut Known,
) -> Result<ReadStats, StoreError> {
    let started = Instant::now();
    let mut stats = ReadStats::default();
    // SCAN runs on its own connection while the tenants it found are read: the full read
    // takes about as long as the longer of the two, not their sum.
    let (tx, mut pages) = mpsc::unbounded_channel::<Vec<String>>();
    let mut scan_conn = store::conn(&ctx.pool).await?;
    let scanner_registry = Registry::new(registry.batch());
    let scanner = tokio::spawn(async move {
        let mut stats = ReadStats::default();
        let r = scanner_registry
            .scan_tenants(&mut scan_conn, &mut stats, &tx)
            .await;
        r.map(|()| stats)
    });
    let mut seen: HashSet<String> = HashSet::new();
    let mut next = Known::default();
    let mut ids: Vec<ProviderId> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    loop {
        let page = pages.recv().await;
        let done = page.is_none();
        for t in page.into_iter().flatten() {
            if seen.insert(t.clone()) {
                pending.push(t);
            }
        }
        if pending.len() >= TENANT_SLICE || (done && !pending.is_empty()) {
            let mut conn = store::conn(&ctx.pool).await?;
            let discovered = registry
                .read_members(&mut conn, &pending, &mut stats)
                .await?;
            drop(conn);
            let part = reconcile(known, discovered);
            let part_ids = part.ids();
            read_and_apply(ctx, registry, &part_ids, &mut stats).await?;
            ids.extend(part_ids);
            next.0.extend(part.0);
            next.1.extend(part.1);
            pending.clear();
        }
        if done {
            break;
        }
    }
    match scanner.await {
        Ok(Ok(s)) => stats.round_trips += s.round_trips,
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(StoreError::Pool(format!("registry scan task failed: {e}"))),
    }
    let gone = gone_ids(known, &next);
    // Fleet entries not in the registry at all (e.g. after a Redis restart without data).
    let listed: HashSet<&ProviderId> = ids.iter().collect();
    let mut stray: Vec<ProviderId> = ctx
        .fleet
        .read()
        .providers
        .keys()
        .filter(|id| !listed.contains(id))
        .cloned()
        .collect();
    stray.retain(|id| !gone.contains(id));
    remove(ctx, gone).await?;
    remove(ctx, stray).await?;
    *known = next;
    metrics::histogram!(m::REGISTRY_SCAN_DURATION, "kind" => "full")
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(
        providers = ids.len(),
        round_trips = stats.round_trips,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "full registry scan"
    );
    Ok(stats)
}

/// Discovery plus the light fields of known records; full reads only of what changed.
async fn light_scan(
    ctx: &Context,
    registry: &Registry,
    known: &mut Known,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut stats = ReadStats::default();
    let mut conn = store::conn(&ctx.pool).await?;
    let discovered = registry.discover(&mut conn, &mut stats).await?;
    let next = reconcile(known, discovered);
    let ids = next.ids();
    let (tracked, untracked): (Vec<ProviderId>, Vec<ProviderId>) = {
        let fleet = ctx.fleet.read();
        ids.into_iter()
            .partition(|id| fleet.providers.contains_key(id))
    };
    let fps = registry.read_light(&mut conn, &tracked, &mut stats).await?;
    drop(conn);
    let mut changed = untracked;
    {
        let fleet = ctx.fleet.read();
        for (id, fp) in tracked.into_iter().zip(fps) {
            if fleet
                .providers
                .get(&id)
                .is_some_and(|t| t.fingerprint != fp)
            {
                changed.push(id);
            }
        }
    }
    read_and_apply(ctx, registry, &changed, &mut stats).await?;
    remove(ctx, gone_ids(known, &next)).await?;
    *known = next;
    metrics::histogram!(m::REGISTRY_SCAN_DURATION, "kind" => "light")
        .record(started.elapsed().as_secs_f64());
    Ok(())
}

/// Re-reads what notifications named.
async fn targeted(
    ctx: &Context,
    registry: &Registry,
    known: &mut Known,
    changes: Vec<Change>,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let mut stats = ReadStats::default();
    let mut tenants = BTreeSet::new();
    let mut records = BTreeSet::new();
    for c in changes {
        match c {
            Change::Tenant(t) => {
                tenants.insert(t);
            }
            Change::Record(id) => {
                if known
                    .0
                    .get(&*id.tenant)
                    .is_some_and(|n| n.contains(&*id.provider))
                {
                    records.insert(id);
                } else {
                    tenants.insert(id.tenant.to_string());
                }
            }
            Change::Resync | Change::Lost | Change::Unsupported => {}
        }
    }
    if !tenants.is_empty() {
        let list: Vec<String> = tenants.iter().cloned().collect();
        let mut conn = store::conn(&ctx.pool).await?;
        let discovered = registry.read_members(&mut conn, &list, &mut stats).await?;
        drop(conn);
        let mut before = Known::default();
        let mut after_all = Known(known.0.clone(), known.1.clone());
        for t in &list {
            if let Some(n) = known.0.get(t) {
                before.0.insert(t.clone(), n.clone());
            }
            if known.1.contains(t) {
                before.1.insert(t.clone());
            }
            after_all.0.remove(t);
            after_all.1.remove(t);
        }
        let after = reconcile(&before, discovered);
        for id in after.ids() {
            records.insert(id);
        }
        remove(ctx, gone_ids(&before, &after)).await?;
        after_all.0.extend(after.0);
        after_all.1.extend(after.1);
        *known = after_all;
    }
    // Only what is still listed: a record deleted with its set entry is gone, not invalid.
    let ids: Vec<ProviderId> = records
        .into_iter()
        .filter(|id| {
            known
                .0
                .get(&*id.tenant)
                .is_some_and(|n| n.contains(&*id.provider))
        })
        .collect();
    read_and_apply(ctx, registry, &ids, &mut stats).await?;
    metrics::histogram!(m::REGISTRY_SCAN_DURATION, "kind" => "targeted")
        .record(started.elapsed().as_secs_f64());
    Ok(())
}

async fn ping(ctx: &Context) -> Result<(), StoreError> {
    let mut conn = store::conn(&ctx.pool).await?;
    redis::cmd("PING").query_async::<String>(&mut conn).await?;
    Ok(())
}

/// Sets `redis_up` and logs transitions only.
pub fn note_redis(ctx: &Context, result: &Result<(), StoreError>) {
    match result {
        Ok(()) => {
            if ctx.status.set_redis_up(true) {
                tracing::info!("redis reachable");
            }
        }
        Err(e) => {
            if ctx.status.set_redis_up(false) {
                tracing::error!(error = %e, "redis unreachable: refreshes wait, state is kept in memory");
            } else {
                tracing::debug!(error = %e, "redis still unreachable");
            }
        }
    }
}

/// The follow loop, until cancelled.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let cfg = ctx.config();
    let (tx, mut rx) = mpsc::channel::<Change>(4096);
    let mut source = "change scan";
    if cfg.registry.keyspace_notifications == Notifications::Auto {
        let enabled = match store::conn(&ctx.pool).await {
            Ok(mut conn) => watch::notifications_enabled(&mut conn)
                .await
                .unwrap_or(false),
            Err(_) => false,
        };
        if enabled {
            match redis::Client::open(cfg.redis.url.as_str()) {
                Ok(client) => {
                    let db = client.get_connection_info().redis_settings().db();
                    tokio::spawn(watch::listen(client, db, tx.clone(), cancel.clone()));
                    source = "keyspace notifications";
                }
                Err(e) => tracing::warn!(error = %e, "cannot open a subscriber connection"),
            }
        }
    }
    if source == "change scan" && cfg.registry.client_tracking == Notifications::Auto {
        let timeout = Duration::from_millis(cfg.redis.command_timeout_ms);
        tokio::spawn(watch::track(
            cfg.redis.url.clone(),
            timeout,
            tx.clone(),
            cancel.clone(),
        ));
        source = "client tracking";
    }
    drop(tx);
    tracing::info!(
        events = source,
        change_scan_interval_secs = cfg.registry.change_scan_interval_secs,
        "following the registry (change scans run while no event source is live)"
    );
    let mut known = Known::default();
    let mut next_full = Instant::now();
    let mut next_light = Instant::now();
    let mut failures: u32 = 0;
    // An event source is running, and live: its events stand in for change scans.
    let mut listening = source != "change scan";
    let mut live = false;
    loop {
        let cfg = ctx.config();
        let registry = Registry::new(cfg.registry.scan_batch);
        let light_every = Duration::from_secs(cfg.registry.change_scan_interval_secs);
        let wake = next_full.min(next_light);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(wake.into()) => {}
            change = rx.recv(), if listening => {
                let Some(first) = change else {
                    listening = false;
                    live = false;
                    continue;
                };
                let mut batch = vec![first];
                while let Ok(c) = rx.try_recv() {
                    batch.push(c);
                    if batch.len() >= 10_000 {
                        break;
                    }
                }
                if batch.contains(&Change::Unsupported) {
                    tracing::info!("no event source: changes are found by change scans");
                    listening = false;
                    live = false;
                    continue;
                }
                if let Some(pos) = batch.iter().rposition(|c| matches!(c, Change::Lost | Change::Resync)) {
                    live = batch[pos] == Change::Resync;
                    if live {
                        // Events may have been missed before the source was (re)established.
                        next_full = Instant::now();
                    } else {
                        next_light = Instant::now();
                    }
                    continue;
                }
                if !live {
                    continue;
                }
                let r = targeted(&ctx, &registry, &mut known, batch).await;
                note_redis(&ctx, &r);
                continue;
            }
        }
        let now = Instant::now();
        let result = if now >= next_full {
            let r = full_scan(&ctx, &registry, &mut known).await.map(|_| ());
            if r.is_ok() {
                ctx.status.set_first_scan_done();
                next_full = now + Duration::from_secs(cfg.registry.full_rescan_interval_secs);
            }
            r
        } else if live {
            ping(&ctx).await
        } else {
            light_scan(&ctx, &registry, &mut known).await
        };
        note_redis(&ctx, &result);
        if result.is_ok() {
            failures = 0;
            next_light = Instant::now() + light_every;
        } else {
            failures = failures.saturating_add(1);
            let backoff = Duration::from_millis(250u64 << failures.min(5)).min(light_every);
            next_light = Instant::now() + backoff;
            if next_full <= now {
                next_full = next_light;
            }
        }
    }
}
