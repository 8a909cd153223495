//! This replica as Redis and the other replicas see it.
//!
//! [`run`] pings Redis every `redis.ping_interval_ms`, also when the daemon has nothing else to
//! do, so that a refused connection or a frozen server (a `PING` that does not answer within
//! `redis.command_timeout_ms`) turns `redis_up` to 0 and `/readyz` to 503 within seconds; when
//! Redis answers again it wakes the replayer and the recovery grace starts. Every
//! `replica.heartbeat_secs` it writes the heartbeat `tokenwarden:replica:{id}` (SPEC 2: `version`,
//! `started_at`, `journal_pending`, `owned_providers`; expiring after
//! `replica.heartbeat_ttl_secs`) and keeps the index `tokenwarden:replicas` (a sorted set of
//! replica ids by last heartbeat, our addition) from which it learns the live replicas: the
//! membership [`crate::ownership`] shares the tenants by.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::keys;
use crate::registry::follow::note_redis;
use crate::store::{self, StoreError};
use crate::timestamp::iso_utc;

/// The sorted set of replica ids, scored by their last heartbeat (Unix ms).
pub const REPLICAS_INDEX: &str = "tokenwarden:replicas";

/// Pings and beats until `stop`; then deletes this replica's heartbeat.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let cfg = ctx.config();
    let started_at = iso_utc(Utc::now());
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.redis.ping_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_beat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let beat = tokio::time::Instant::now() >= next_beat;
        let r = ping(&ctx, beat.then_some(started_at.as_str())).await;
        if r.is_ok() && beat {
            next_beat = tokio::time::Instant::now()
                + Duration::from_secs(ctx.config().replica.heartbeat_secs);
        }
        note_redis(&ctx, &r);
    }
    if let Ok(mut conn) = store::conn(&ctx.pool).await {
        let _: Result<(), _> = redis::pipe()
            .cmd("DEL")
            .arg(keys::replica_key(&ctx.replica))
            .ignore()
            .cmd("ZREM")
            .arg(REPLICAS_INDEX)
            .arg(&ctx.replica)
            .ignore()
            .query_async(&mut conn)
            .await;
    }
}

async fn ping(ctx: &Context, beat: Option<&str>) -> Result<(), StoreError> {
    let mut conn = store::conn(&ctx.pool).await?;
    let Some(started_at) = beat else {
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        return Ok(());
    };
    let cfg = ctx.config();
    let ttl_ms = cfg.replica.heartbeat_ttl_secs.saturating_mul(1000);
    let now_ms = Utc::now().timestamp_millis();
    let key = keys::replica_key(&ctx.replica);
    let owned = ctx.fleet.read().providers.len();
    let pending = ctx.status.journal_pending.load(Ordering::Relaxed);
    let (live,): (Vec<String>,) = redis::pipe()
        .cmd("HSET")
        .arg(&key)
        .arg("version")
        .arg(env!("CARGO_PKG_VERSION"))
        .arg("started_at")
        .arg(started_at)
        .arg("journal_pending")
        .arg(pending)
        .arg("owned_providers")
        .arg(owned)
        .ignore()
        .cmd("PEXPIRE")
        .arg(&key)
        .arg(ttl_ms)
        .ignore()
        .cmd("ZADD")
        .arg(REPLICAS_INDEX)
        .arg(now_ms)
        .arg(&ctx.replica)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(REPLICAS_INDEX)
        .arg("-inf")
        .arg(now_ms.saturating_sub(i64::try_from(ttl_ms).unwrap_or(i64::MAX)))
        .ignore()
        .cmd("ZRANGE")
        .arg(REPLICAS_INDEX)
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    ctx.status.beat_confirmed();
    ctx.status
        .replicas
        .store(live.len().max(1), Ordering::Relaxed);
    if ctx.membership.update(live, cfg.replica.share_fleet) {
        tracing::info!(replicas = ?ctx.membership.live(), "replica membership changed: tenants are shared anew");
    }
    Ok(())
}
