//! Following the registry: keeps the fleet and the deadlines in step with Redis.
//!
//! It only reads: what a record read means is decided by the engine
//! ([`crate::engine::transition`]), to which every read is sent ([`Msg::Records`],
//! [`Msg::Gone`]); a full read goes on reading while the engine applies what it sent, and
//! ends once all of it is applied. [`run`] is the loop: a full read at start and every
//! `full_rescan_interval_secs`; in between, change events ([`watch`]: keyspace
//! notifications when the server sends them, else client-tracking invalidations), and a
//! light change scan every `change_scan_interval_secs` while no event source is live.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Notifications;
use crate::context::Context;
use crate::context::ReadTicket;
use crate::engine::Msg;
use crate::keys::ProviderId;
use crate::registry::watch::{self, Change};
use crate::registry::{EngineRead, Members, ReadStats, Registry, Reported, PIPELINE_DEPTH};
use crate::store::bulk::BulkConn;
use crate::store::{self, StoreError};
use crate::telemetry::metrics as m;

// The full read's sets of tenants and ids, hashed as the fleet map is (SipHash was 4 % of a
// start).
use crate::keys::FastSet as HashSet;

/// Records read, applied and committed per step of a full read.
const APPLY_SLICE: usize = 5_000;
/// Tenants whose members are read together during a full read.
const TENANT_SLICE: usize = 1_000;

/// Forgets providers that left the registry (the engine drops their deadline, fleet entry
/// and health hash).
async fn remove(
    ctx: &Context,
    gone: Vec<ProviderId>,
    ticket: ReadTicket,
) -> Result<(), StoreError> {
    if gone.is_empty() {
        return Ok(());
    }
    ctx.engine
        .send_and_wait(|done| Msg::Gone {
            ids: gone,
            ticket,
            done: Some(done),
        })
        .await;
    Ok(())
}

/// Forgets providers another replica serves now (their health hash stays: it is the
/// owner's to write).
async fn release(ctx: &Context, ids: Vec<ProviderId>) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    tracing::info!(providers = ids.len(), "providers handed to another replica");
    ctx.engine
        .send_and_wait(|done| Msg::Released {
            ids,
            done: Some(done),
        })
        .await;
    Ok(())
}

/// Splits providers that left this replica's view into those served elsewhere now (their
/// tenant is in `unowned`) and those gone from the registry; forgets both accordingly.
async fn drop_ids(
    ctx: &Context,
    ids: Vec<ProviderId>,
    unowned: &HashSet<String>,
    ticket: ReadTicket,
) -> Result<(), StoreError> {
    let (elsewhere, gone): (Vec<ProviderId>, Vec<ProviderId>) = ids
        .into_iter()
        .partition(|id| unowned.contains(&*id.tenant));
    release(ctx, elsewhere).await?;
    remove(ctx, gone, ticket).await
}

/// Keeps the tenants this replica serves; the others go to `unowned`.
fn keep_owned(ctx: &Context, tenants: &mut Vec<String>, unowned: &mut HashSet<String>) {
    tenants.retain(|t| {
        let mine = ctx.membership.owns(t);
        if !mine {
            unowned.insert(t.clone());
        }
        mine
    });
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

/// Whether the engine does not know one of `ids` yet (every one at start, a takeover's).
fn any_unknown(ctx: &Context, ids: &[ProviderId]) -> bool {
    let fleet = ctx.fleet.read();
    ids.iter().any(|id| !fleet.providers.contains_key(id))
}

/// Reads records for the engine. Where it does not know one of them yet, each comes with
/// what its health hash holds: the plans and health a previous process left are kept where
/// they still hold (see `engine::transition`).
async fn read_for_engine(
    ctx: &Context,
    registry: &Registry,
    conn: &mut store::Connection,
    ids: &[ProviderId],
    stats: &mut ReadStats,
) -> Result<Vec<EngineRead>, StoreError> {
    if any_unknown(ctx, ids) {
        return registry.read_records_and_health(conn, ids, stats).await;
    }
    let states = registry.read_records(conn, ids, stats).await?;
    Ok(states.into_iter().map(|s| (s, None)).collect())
}

/// A socket of the full read's record feed: a bulk socket of its own where the topology
/// offers one ([`BulkConn`]), else a pooled connection.
#[derive(Clone)]
enum FeedConn {
    Bulk(Arc<BulkConn<EngineRead>>),
    Pooled(store::Connection),
}

impl FeedConn {
    /// [`FEED_SOCKETS`] sockets: bulk sockets where offered, else pooled connections on
    /// distinct sockets.
    async fn open(ctx: &Context) -> Result<Vec<FeedConn>, StoreError> {
        let mut bulk = Vec::with_capacity(FEED_SOCKETS);
        while bulk.len() < FEED_SOCKETS {
            match BulkConn::open(&ctx.pool).await {
                Ok(Some(b)) => bulk.push(FeedConn::Bulk(Arc::new(b))),
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "no bulk socket for the registry read: reading through the pool");
                    break;
                }
            }
        }
        if bulk.len() == FEED_SOCKETS {
            return Ok(bulk);
        }
        let pooled = store::distinct_conns(&ctx.pool, FEED_SOCKETS).await?;
        Ok(pooled.into_iter().map(FeedConn::Pooled).collect())
    }

    async fn read(
        &self,
        ctx: &Context,
        registry: &Registry,
        ids: &[ProviderId],
        stats: &mut ReadStats,
    ) -> Result<Vec<EngineRead>, StoreError> {
        match self {
            FeedConn::Bulk(b) => {
                let with_health = any_unknown(ctx, ids);
                registry.read_records_bulk(b, ids, with_health, stats).await
            }
            FeedConn::Pooled(c) => read_for_engine(ctx, registry, &mut c.clone(), ids, stats).await,
        }
    }
}

/// Reads the given records and applies them, a slice at a time so that parsed records never
/// pile up in memory.
async fn read_and_apply(
    ctx: &Context,
    registry: &Registry,
    ids: &[ProviderId],
    stats: &mut ReadStats,
    ticket: ReadTicket,
) -> Result<(), StoreError> {
    for slice in ids.chunks(APPLY_SLICE) {
        let read_version = ctx.fleet.read().version();
        let mut conn = store::conn(&ctx.pool).await?;
        let states = read_for_engine(ctx, registry, &mut conn, slice, stats).await?;
        drop(conn);
        let batch: Vec<_> = slice
            .iter()
            .cloned()
            .zip(states)
            .map(|(id, (state, stored))| (id, state, stored))
            .collect();
        ctx.engine
            .send_and_wait(|done| Msg::Records {
                batch,
                read_version,
                ticket,
                done: Some(done),
            })
            .await;
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
                if !known.1.contains(&tenant) {
                    tracing::warn!(tenant = %tenant, "tenant:{{t}}:providers is not a set: skipped");
                    metrics::counter!(m::REGISTRY_INVALID_RECORDS, "reason" => "wrong_type")
                        .increment(1);
                }
                next.1.insert(tenant.clone());
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

/// Sockets a full read's record batches are spread over (see [`store::distinct_conns`]).
const FEED_SOCKETS: usize = 2;

/// Parsed record batches handed to the engine and not yet applied, during a full read: the
/// next batches are read while the engine applies these.
const APPLY_WINDOW: usize = 4;

/// The record reads of a full read, in a task of their own: the ids of each tenant slice go
/// in as soon as its members are read, `HMGET` batches stay [`PIPELINE_DEPTH`] in flight
/// across slices (no drain between them), and each parsed batch goes to the engine while
/// the next ones are read, at most [`APPLY_WINDOW`] of them not yet applied. Ends, with its
/// read counts, once the sender is dropped and everything read is applied.
fn spawn_record_feed(
    ctx: Arc<Context>,
    registry: Registry,
    conns: Vec<FeedConn>,
    ticket: ReadTicket,
) -> (
    mpsc::UnboundedSender<Vec<ProviderId>>,
    tokio::task::JoinHandle<Result<ReadStats, StoreError>>,
) {
    let (tx, rx) = mpsc::unbounded_channel::<Vec<ProviderId>>();
    let task = tokio::spawn(async move {
        let ids = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|ids| (ids, rx))
        })
        .flat_map(futures_util::stream::iter);
        let mut turn = 0usize;
        let reads = ids.ready_chunks(registry.batch()).map(|chunk| {
            // Batches take the sockets in turn.
            turn = turn.wrapping_add(1);
            let conn = conns.get(turn % conns.len().max(1)).cloned();
            let registry = registry.clone();
            // Taken as the read is sent: a local change after it wins over what it returns.
            let read_version = ctx.fleet.read().version();
            let ctx = Arc::clone(&ctx);
            async move {
                let conn = conn.ok_or_else(|| {
                    StoreError::Pool("no connection for the registry read".into())
                })?;
                let mut stats = ReadStats::default();
                let read = conn.read(&ctx, &registry, &chunk, &mut stats).await?;
                Ok::<_, StoreError>((chunk, read, read_version, stats))
            }
        });
        let mut reads = std::pin::pin!(reads.buffered(PIPELINE_DEPTH));
        let mut stats = ReadStats::default();
        let mut unapplied = std::collections::VecDeque::new();
        while let Some(read) = reads.next().await {
            let (chunk, states, read_version, s) = read?;
            stats.round_trips += s.round_trips;
            stats.keys += s.keys;
            while unapplied.len() >= APPLY_WINDOW {
                if let Some(applied) = unapplied.pop_front() {
                    let _ = applied.await;
                }
            }
            let (done, applied) = tokio::sync::oneshot::channel();
            ctx.engine.send(Msg::Records {
                batch: chunk
                    .into_iter()
                    .zip(states)
                    .map(|(id, (state, stored))| (id, state, stored))
                    .collect(),
                read_version,
                ticket,
                done: Some(done),
            });
            unapplied.push_back(applied);
        }
        for applied in unapplied {
            let _ = applied.await;
        }
        Ok(stats)
    });
    (tx, task)
}

/// Every record, read in full: SCAN, the members of each slice of tenants and their records
/// overlap (see [`spawn_record_feed`]); the read ends once everything read is applied.
/// What a full read did.
struct FullScan {
    /// The membership generation the read's result is right for, when no tenant it skipped
    /// as another replica's is this one's since (`None`: read again).
    settled: Option<u64>,
}

async fn full_scan(
    ctx: &Arc<Context>,
    registry: &Registry,
    known: &mut Known,
) -> Result<FullScan, StoreError> {
    let started = Instant::now();
    let _burst = crate::allocator::burst();
    let ticket = ctx.read_ticket();
    let mut stats = ReadStats::default();
    // SCAN runs on its own connection while the tenants it found are read: the full read
    // takes about as long as the longer of the two, not their sum.
    let (tx, mut pages) = mpsc::unbounded_channel::<Vec<String>>();
    let mut scan_conn = store::conn(&ctx.pool).await?;
    let scanner_registry = registry.clone();
    let scanner = tokio::spawn(async move {
        let mut stats = ReadStats::default();
        let r = scanner_registry
            .scan_tenants(&mut scan_conn, &mut stats, &tx)
            .await;
        r.map(|()| stats)
    });
    let feed_conns = FeedConn::open(ctx).await?;
    let (feed, feeder) = spawn_record_feed(Arc::clone(ctx), registry.clone(), feed_conns, ticket);
    let mut seen: HashSet<String> = HashSet::default();
    let mut unowned: HashSet<String> = HashSet::default();
    let mut next = Known::default();
    let mut listed: HashSet<ProviderId> = HashSet::default();
    let mut pending: Vec<String> = Vec::new();
    let mut conn = store::conn(&ctx.pool).await?;
    let mut feed_gone = false;
    loop {
        let page = pages.recv().await;
        let done = page.is_none();
        for t in page.into_iter().flatten() {
            if seen.insert(t.clone()) {
                pending.push(t);
            }
        }
        keep_owned(ctx, &mut pending, &mut unowned);
        if pending.len() >= TENANT_SLICE || (done && !pending.is_empty()) {
            let discovered = registry
                .read_members(&mut conn, &pending, &mut stats)
                .await?;
            let part = reconcile(known, discovered);
            let part_ids = part.ids();
            listed.extend(part_ids.iter().cloned());
            if feed.send(part_ids).is_err() {
                // The feed failed: its error is returned below.
                feed_gone = true;
                break;
            }
            next.0.extend(part.0);
            next.1.extend(part.1);
            pending.clear();
        }
        if done {
            break;
        }
    }
    drop(conn);
    drop(feed);
    let fed = match feeder.await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Pool(format!("registry read task failed: {e}"))),
    };
    let read = fed?;
    if feed_gone {
        return Err(StoreError::Pool("registry read task ended early".into()));
    }
    stats.round_trips += read.round_trips;
    stats.keys += read.keys;
    match scanner.await {
        Ok(Ok(s)) => stats.round_trips += s.round_trips,
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(StoreError::Pool(format!("registry scan task failed: {e}"))),
    }
    // The membership may have changed during the read (a replica joining while the others
    // read): tenants read while they were ours and no longer are go to their owner now, as
    // strays below, not after another full read.
    let generation = ctx.membership.generation();
    let lost: Vec<String> = next
        .0
        .keys()
        .filter(|t| !ctx.membership.owns(t))
        .cloned()
        .collect();
    for t in lost {
        if let Some(names) = next.0.remove(&t) {
            for p in names {
                listed.remove(&ProviderId::new(t.as_str(), p.as_str()));
            }
        }
        next.1.remove(&t);
        unowned.insert(t);
    }
    // A joining replica only takes tenants; a leaving one gives some: only then is another
    // full read needed (a tenant skipped as another's is ours now).
    let settled = (!unowned.iter().any(|t| ctx.membership.owns(t))).then_some(generation);
    let gone = gone_ids(known, &next);
    // Fleet entries not in the registry at all (e.g. after a Redis restart without data), and
    // those handed over above.
    let mut stray: Vec<ProviderId> = ctx
        .fleet
        .read()
        .providers
        .keys()
        .filter(|id| !listed.contains(id))
        .cloned()
        .collect();
    let gone_set: HashSet<&ProviderId> = gone.iter().collect();
    stray.retain(|id| !gone_set.contains(id));
    drop(gone_set);
    drop_ids(ctx, gone, &unowned, ticket).await?;
    drop_ids(ctx, stray, &unowned, ticket).await?;
    *known = next;
    metrics::histogram!(m::REGISTRY_SCAN_DURATION, "kind" => "full")
        .record(started.elapsed().as_secs_f64());
    tracing::debug!(
        providers = listed.len(),
        round_trips = stats.round_trips,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "full registry scan"
    );
    Ok(FullScan { settled })
}

/// Discovery plus the light fields of known records; full reads only of what changed.
async fn light_scan(
    ctx: &Context,
    registry: &Registry,
    known: &mut Known,
) -> Result<(), StoreError> {
    let started = Instant::now();
    let ticket = ctx.read_ticket();
    let mut stats = ReadStats::default();
    let mut conn = store::conn(&ctx.pool).await?;
    let mut discovered = registry.discover(&mut conn, &mut stats).await?;
    let mut unowned: HashSet<String> = HashSet::default();
    discovered.retain(|t, _| {
        let mine = ctx.membership.owns(t);
        if !mine {
            unowned.insert(t.clone());
        }
        mine
    });
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
    read_and_apply(ctx, registry, &changed, &mut stats, ticket).await?;
    drop_ids(ctx, gone_ids(known, &next), &unowned, ticket).await?;
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
    let ticket = ctx.read_ticket();
    let mut stats = ReadStats::default();
    let mut tenants = BTreeSet::new();
    let mut records = BTreeSet::new();
    let mut echoes = 0u64;
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
                    // This replica's own write-back: the engine knows what it wrote.
                    if ctx.echoes.is_echo(&id, started) {
                        echoes += 1;
                        continue;
                    }
                    records.insert(id);
                } else {
                    tenants.insert(id.tenant.to_string());
                }
            }
            Change::Resync | Change::Lost | Change::Unsupported => {}
        }
    }
    // Another replica's tenants: not ours to read (a membership change is followed by a full
    // scan, which hands over what moved).
    tenants.retain(|t| ctx.membership.owns(t));
    records.retain(|id| ctx.membership.owns(&id.tenant));
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
        remove(ctx, gone_ids(&before, &after), ticket).await?;
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
    read_and_apply(ctx, registry, &ids, &mut stats, ticket).await?;
    if echoes > 0 {
        metrics::counter!(m::REGISTRY_ECHOES_SKIPPED).increment(echoes);
    }
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
                ctx.replayer.wake();
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
            // One subscriber per master (see `watch::follow_masters`).
            tokio::spawn(watch::follow_masters(
                ctx.pool.clone(),
                watch::Source::Keyspace,
                Duration::from_millis(cfg.redis.command_timeout_ms),
                tx.clone(),
                cancel.clone(),
            ));
            source = "keyspace notifications";
        }
    }
    if source == "change scan" && cfg.registry.client_tracking == Notifications::Auto {
        let timeout = Duration::from_millis(cfg.redis.command_timeout_ms);
        tokio::spawn(watch::follow_masters(
            ctx.pool.clone(),
            watch::Source::Tracking,
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
    // Bad names are reported once for the life of the loop, not once per read.
    let reported = Reported::default();
    // Shared fleet: learn the other replicas (our first heartbeat) before the first read, so
    // that a starting replica does not take every tenant for a moment.
    if cfg.replica.share_fleet {
        let ttl_ms = cfg.replica.heartbeat_ttl_secs.saturating_mul(1000);
        let until = Instant::now() + Duration::from_secs(5);
        while !ctx.status.heartbeat_live(ttl_ms) && Instant::now() < until {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
    let mut next_full = Instant::now();
    let mut membership = ctx.membership.generation();
    let mut next_light = Instant::now();
    let mut failures: u32 = 0;
    // An event source is running, and live: its events stand in for change scans.
    let mut listening = source != "change scan";
    let mut live = false;
    loop {
        if !ctx.reads_trusted() {
            // A master change is being repaired (see `crate::refresh::failover`): what the
            // new master holds is not the registry's state yet. Read it in full once it is.
            next_full = Instant::now();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
            continue;
        }
        let cfg = ctx.config();
        let registry = Registry::new(cfg.registry.scan_batch).reporting_to(&reported);
        let light_every = Duration::from_secs(cfg.registry.change_scan_interval_secs);
        if ctx.membership.generation() != membership {
            // Tenants moved between replicas: a full read takes over and hands over.
            membership = ctx.membership.generation();
            next_full = Instant::now();
        }
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
                    // Echoes expected may never come, or came unseen.
                    ctx.echoes.forget();
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
            _ = ctx.echoes.rereads_wanted() => {
                // Events held back for a write-back that did not write: someone else's.
                let batch: Vec<Change> = ctx.echoes.take_rereads().into_iter().map(Change::Record).collect();
                if live && !batch.is_empty() {
                    let r = targeted(&ctx, &registry, &mut known, batch).await;
                    note_redis(&ctx, &r);
                }
                continue;
            }
        }
        let now = Instant::now();
        let result = if now >= next_full {
            let r = full_scan(&ctx, &registry, &mut known).await;
            if let Ok(scan) = &r {
                ctx.status.set_first_scan_done();
                next_full = now + Duration::from_secs(cfg.registry.full_rescan_interval_secs);
                if let Some(generation) = scan.settled {
                    membership = generation;
                }
            }
            r.map(|_| ())
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
