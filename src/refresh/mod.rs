//! Refresh: one attempt to renew one provider's token, from lock to write-back.
//!
//! An attempt makes calls and returns a typed [`Finished`]; it never touches the fleet or the
//! health hash (the engine applies the outcome through [`crate::engine::transition`]). In
//! order, each step awaited before the next:
//! 1. one pipeline: take the lock (`SET NX PX` in [`lock`]'s script), read the record (with the access token the
//!    attempt starts from) and the reservation; a lock held elsewhere is `Locked` (a lock key
//!    without expiry gets one, a wrong-typed one is `LockStuck`), a live reservation of another
//!    replica for this refresh token is `Reserved`;
//! 2. [`transition::precheck`]: still due, still refreshable;
//! 3. set the reservation ([`reserve`]) when the grant can rotate the refresh token;
//! 4. the token call ([`client`]), renewing the lock and the reservation while it runs; a
//!    failure before the request was sent is retried soon, a call that was sent is awaited
//!    up to `refresh.response_timeout_secs` (the provider may have used the token);
//! 5. an answer with a new refresh token goes to the journal ([`crate::journal`]) before
//!    anything else, then the compare-and-set write-back ([`writeback`]);
//! 6. confirmed: reservation deleted and lock released in one pipeline, journal entry
//!    confirmed. Not confirmed (Redis down, frozen, timed out): the answer is handed to the
//!    [`replay::Replayer`], which keeps trying until Redis says yes; the lock is left to
//!    expire, the reservation stands.
//!
//! Permanent errors re-read the refresh token under the lock first: if it changed, someone
//! else refreshed and this is a `Conflict`, not `reauth_required`.
//!
//! In observe mode ([`transition::may_call`]) an attempt returns `Skipped(Observing)` before
//! step 1: no lock, no call, no write. [`repair`] restores the newer tokens after a stale
//! whole-record write.

pub mod auth;
pub mod budget;
pub mod client;
pub mod failover;
pub mod grant;
pub mod repair;
pub mod replay;
pub mod reserve;
pub mod writeback;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use redis::Value;
use tracing::Instrument;

use crate::catalog::Grant;
use crate::context::Context;
use crate::engine::transition::{self, Attempt, Env, Policies, Refreshed};
use crate::fleet::Tracked;
use crate::journal::{Entry, EntryId};
use crate::keys::ProviderId;
use crate::lock::{self, Acquire, LockGuard};
use crate::registry::record::{ProviderRecord, RecordState};
use crate::registry::{parse_fields_value, Registry, RECORD_FIELDS_AND_TOKEN};
use crate::secret::Secret;
use crate::store::{self, Connection, StoreError};
use crate::telemetry::metrics as m;
use crate::timestamp::{self, TimestampFormat};
use client::{TokenError, TokenGrant, TokenRequest};
use replay::Held;
use reserve::Reservation;
use writeback::{WriteBack, WriteResult};

/// Why an attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its deadline fired.
    Scheduled,
    /// An operator asked (`tokenwarden refresh`): ignores `reauth_required` and due times.
    Forced,
}

/// What the engine knew when it started the attempt.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: ProviderId,
    pub known: Option<Tracked>,
    pub trigger: Trigger,
}

/// An attempt's result.
#[derive(Debug, Clone)]
pub struct Finished {
    /// The record as read under the lock, when it differs from what the engine knew.
    pub seen: Option<RecordState>,
    pub outcome: Attempt,
}

impl Finished {
    fn new(seen: Option<RecordState>, outcome: Attempt) -> Finished {
        Finished { seen, outcome }
    }
}

/// Runs one attempt on `plan.id` inside a span named after it.
pub async fn attempt(ctx: &Context, plan: &Plan) -> Finished {
    let id = &plan.id;
    let span = tracing::info_span!("refresh", tenant = %id.tenant, provider = %id.provider);
    let pol = Arc::new(Policies::from_config(&ctx.config()));
    attempt_with(ctx, plan, &pol).instrument(span).await
}

/// As [`attempt`], with the policies given (the engine keeps them).
pub async fn attempt_with(ctx: &Context, plan: &Plan, pol: &Policies) -> Finished {
    if let Err(reason) = transition::may_call(pol) {
        // Observe mode: not even the lock is taken.
        return Finished::new(None, Attempt::Skipped(reason));
    }
    if ctx.replayer.holds(&plan.id) {
        // An answer for this provider waits for its write-back: its refresh token is used.
        return Finished::new(None, Attempt::Reserved);
    }
    // Taken before the connection: a master change after this makes the write-back check.
    let generation = store::master_generation(&ctx.pool);
    match store::conn(&ctx.pool).await {
        Ok(mut conn) => locked(ctx, &mut conn, plan, pol, generation).await,
        Err(e) => redis_failed(&e),
    }
}

fn redis_failed(e: &StoreError) -> Finished {
    Finished::new(
        None,
        Attempt::Redis {
            detail: e.to_string(),
        },
    )
}

/// Formats `at` like the field's current value; empty fields get ISO with `+00:00`.
fn like(at: DateTime<Utc>, current: Option<&timestamp::Timestamp>) -> String {
    let format = current.map_or(
        TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: 0,
        },
        |t| t.format,
    );
    timestamp::format(at, format)
}

/// The lifetime to schedule from: `expires_in` when it is positive and sane, else the
/// catalog's default; above `max` it is clamped. The note says which, for health.
pub fn bounded_lifetime(
    expires_in: Option<Duration>,
    default: Duration,
    max: Duration,
) -> (Duration, Option<String>) {
    match expires_in {
        None => (
            default.min(max),
            Some(format!(
                "expires_in missing from the token answer: assumed {} s",
                default.min(max).as_secs()
            )),
        ),
        Some(d) if d > max => (
            max,
            Some(format!(
                "expires_in {} s above refresh.max_token_lifetime_secs: clamped to {} s",
                d.as_secs(),
                max.as_secs()
            )),
        ),
        Some(d) => (d, None),
    }
}

/// Refresh tokens are kept for at most this long in our own arithmetic.
const MAX_REFRESH_TOKEN_LIFETIME: Duration = Duration::from_secs(400 * 24 * 3600);

/// Releases the lock (and deletes our reservation) in one round trip; failures only leave
/// the lock to expire.
async fn release(conn: &mut Connection, guard: &LockGuard, reservation: Option<&Reservation>) {
    let mut pipe = redis::pipe();
    if let Some(r) = reservation {
        r.add_delete(&mut pipe);
    }
    guard.add_release(&mut pipe);
    // In this order on a Cluster too (the reservation and the lock sit on different slots).
    if let Err(e) = store::query_ordered(conn, &pipe).await {
        tracing::warn!(error = %e, "lock release failed; it will expire");
    }
}

async fn locked(
    ctx: &Context,
    conn: &mut Connection,
    plan: &Plan,
    pol: &Policies,
    generation: u64,
) -> Finished {
    let cfg = ctx.config();
    let id = &plan.id;
    let ttl = Duration::from_secs(cfg.refresh.lock_ttl_secs);
    let owner = lock::owner_value(&ctx.replica);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    lock::add_acquire(&mut pipe, id, &owner, ttl);
    pipe.cmd("HMGET")
        .arg(id.record_key())
        .arg(&RECORD_FIELDS_AND_TOKEN[..]);
    pipe.cmd("GET").arg(id.inflight_key());
    // Lock first, then the reads under it: one pipeline on one node (or the Sentinels'
    // master); on a Cluster the three keys sit on different slots, so each reply is awaited
    // before the next command is sent.
    let values: Vec<Value> = match store::query_ordered(conn, &pipe).await {
        Ok(v) => v,
        Err(e) => return redis_failed(&StoreError::from(e)),
    };
    let mut it = values.into_iter();
    let (Some(taken), Some(rec), Some(res)) = (it.next(), it.next(), it.next()) else {
        return redis_failed(&StoreError::Pool("short pipeline answer".into()));
    };
    let guard = match lock::acquired(&taken, id, owner) {
        Acquire::Held(g) => g,
        Acquire::Busy => return Finished::new(None, Attempt::Locked),
        Acquire::Stuck => return Finished::new(None, Attempt::LockStuck),
    };
    let state = parse_fields_value(rec, &RECORD_FIELDS_AND_TOKEN);
    let changed = plan
        .known
        .as_ref()
        .is_none_or(|t| t.fingerprint != state.fingerprint());
    let seen = changed.then(|| state.clone());
    let now = Utc::now();
    let mut rng = fastrand::Rng::new();
    let decision = transition::precheck(
        plan.known.as_ref(),
        &state,
        plan.trigger == Trigger::Forced,
        pol,
        &mut Env {
            now,
            rng: &mut rng,
            version: 0,
        },
    );
    if let Err(reason) = decision {
        release(conn, &guard, None).await;
        return Finished::new(seen, Attempt::Skipped(reason));
    }
    let RecordState::Valid(record) = &state else {
        release(conn, &guard, None).await;
        return Finished::new(
            seen,
            Attempt::Skipped(transition::SkipReason::NotRefreshable),
        );
    };
    // Another live replica holds an unconfirmed answer for the refresh token we would send?
    let mut saw_foreign = false;
    if let Value::BulkString(bytes) = &res {
        if let Some(f) = std::str::from_utf8(bytes).ok().and_then(reserve::parse) {
            let same_token = f.token_hash == reserve::token_hash(record.refresh_token.expose());
            if f.replica != ctx.replica && same_token {
                saw_foreign = true;
                match reserve::replica_alive(conn, &f.replica).await {
                    Ok(true) => {
                        release(conn, &guard, None).await;
                        return Finished::new(seen, Attempt::Reserved);
                    }
                    Ok(false) => tracing::info!(
                        "a reservation of a replica without heartbeat is not waited for"
                    ),
                    Err(e) => {
                        release(conn, &guard, None).await;
                        return Finished::new(seen, redis_failed(&e).outcome);
                    }
                }
            }
        }
    }
    let fallback = plan.known.as_ref().is_some_and(|t| t.fallback);
    let resolved = if fallback {
        record.fallback_endpoint(&pol.catalog)
    } else {
        record.endpoint(&pol.catalog)
    };
    let endpoint = match resolved {
        Ok(e) => e,
        Err(_) => {
            release(conn, &guard, None).await;
            return Finished::new(
                seen,
                Attempt::Skipped(transition::SkipReason::NotRefreshable),
            );
        }
    };
    // The budget first: a call it does not allow is not sent (and nothing is reserved).
    let budget_key = endpoint.budget.as_ref().map(|b| {
        (
            *b,
            budget::key(
                "token",
                b,
                id,
                &record.provider_type,
                &record.client_id,
                &record.account_key,
            ),
        )
    });
    if let Some((b, key)) = &budget_key {
        let mut ticket = plan.known.as_ref().and_then(|t| t.budget_ticket);
        let mut slot = budget::take(conn, key, b, ticket).await;
        // An operator's refresh waits (briefly) for the slot the budget reserved for it,
        // holding the lock, instead of failing.
        if let (Trigger::Forced, Ok(budget::Slot::Wait(wait))) = (plan.trigger, &slot) {
            if *wait <= Duration::from_secs(10) {
                ticket = Some(transition::add(Utc::now(), *wait));
                tokio::time::sleep(*wait).await;
                slot = budget::take(conn, key, b, ticket).await;
            }
        }
        match slot {
            Ok(budget::Slot::Go) => {}
            Ok(budget::Slot::Wait(wait)) => {
                release(conn, &guard, None).await;
                return Finished::new(seen, Attempt::Throttled { wait });
            }
            Err(e) => {
                release(conn, &guard, None).await;
                return Finished::new(seen, redis_failed(&StoreError::from(e)).outcome);
            }
        }
    }
    let rotating = endpoint.grant == Grant::RefreshToken && endpoint.rotates;
    if rotating && !ctx.status.journal_ok() {
        release(conn, &guard, None).await;
        return Finished::new(seen, Attempt::JournalUnavailable);
    }
    let reservation = rotating.then(|| {
        Reservation::new(
            id,
            &ctx.replica,
            record.refresh_token.expose(),
            now.timestamp_millis(),
        )
    });
    let reservation_ttl = Duration::from_secs(cfg.refresh.reservation_ttl_secs);
    if let Some(r) = &reservation {
        let mut pipe = redis::pipe();
        r.add_set(&mut pipe, reservation_ttl);
        if let Err(e) = pipe.query_async::<()>(conn).await {
            // Nothing was sent to the provider.
            release(conn, &guard, None).await;
            return Finished::new(seen, redis_failed(&StoreError::from(e)).outcome);
        }
    }
    let request = TokenRequest {
        provider: &id.provider,
        endpoint: &endpoint,
        client_id: &record.client_id,
        client_secret: &record.client_secret,
        refresh_token: &record.refresh_token,
        access_token: &record.access_token,
        account_key: &record.account_key,
        scopes: &record.scopes,
        credentials: &record.credentials,
    };
    tracing::debug!(grant = endpoint.grant.as_str(), "token call");
    let started = Instant::now();
    let answer = call_renewing(ctx, conn, &guard, reservation.as_ref(), request).await;
    metrics::histogram!(m::TOKEN_REFRESH_DURATION, "provider" => id.provider.to_string())
        .record(started.elapsed().as_secs_f64());
    let status = match &answer {
        Ok(g) => Some(g.status),
        Err(TokenError::Permanent { status, .. }) => Some(*status).filter(|s| *s > 0),
        Err(TokenError::Transient { status, .. }) => *status,
    };
    m::provider_api_call(&id.provider, "token", status);
    if let (
        Err(TokenError::Transient {
            status: Some(429),
            retry_after,
            ..
        }),
        Some((b, key)),
    ) = (&answer, &budget_key)
    {
        // A 429 slows this budget (every replica), not the fleet.
        if let Err(e) = budget::penalize(conn, key, b, *retry_after).await {
            tracing::warn!(error = %e, "token budget penalty not recorded");
        }
    }
    let recovering = ctx.status.since_recovery_ms().is_some_and(|ms| {
        let window = pol.recovery_grace.saturating_add(pol.lock_ttl);
        u128::try_from(ms).unwrap_or(0) < window.as_millis()
    });
    match answer {
        Ok(grant) => {
            let lifetimes = (
                endpoint.default_expires_in,
                Duration::from_secs(cfg.refresh.max_token_lifetime_secs),
            );
            answered(
                ctx,
                conn,
                id,
                record,
                grant,
                lifetimes,
                guard,
                reservation,
                seen,
                generation,
            )
            .await
        }
        Err(e) if e.is_permanent() => {
            permanent(
                ctx,
                conn,
                id,
                record,
                &e,
                &guard,
                reservation.as_ref(),
                seen,
                (recovering || saw_foreign, endpoint.fallback.is_some()),
            )
            .await
        }
        Err(e) => {
            let TokenError::Transient {
                kind,
                retry_after,
                maybe_in_flight,
                ..
            } = &e
            else {
                release(conn, &guard, reservation.as_ref()).await;
                return Finished::new(
                    seen,
                    Attempt::Redis {
                        detail: e.to_string(),
                    },
                );
            };
            if *maybe_in_flight {
                // The provider may have used the token; we hold no answer, so the
                // reservation protects nothing. The lock is left to expire.
                if let Some(r) = &reservation {
                    let _ = r.delete(conn).await;
                }
                guard.abandon();
            } else {
                release(conn, &guard, reservation.as_ref()).await;
            }
            Finished::new(
                seen,
                Attempt::Transient {
                    kind: kind.as_str(),
                    detail: e.to_string(),
                    retry_after: *retry_after,
                    in_flight: *maybe_in_flight,
                },
            )
        }
    }
}

/// The token call, renewing the lock (and the reservation) while it runs.
async fn call_renewing(
    ctx: &Context,
    conn: &mut Connection,
    guard: &LockGuard,
    reservation: Option<&Reservation>,
    request: TokenRequest<'_>,
) -> Result<TokenGrant, TokenError> {
    let cfg = ctx.config();
    let ttl = Duration::from_secs(cfg.refresh.lock_ttl_secs);
    let reservation_ttl = Duration::from_secs(cfg.refresh.reservation_ttl_secs);
    let slow = Duration::from_secs(cfg.refresh.http_timeout_secs);
    let call = ctx.client.request(request);
    tokio::pin!(call);
    let mut renew = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    renew.tick().await;
    let slow_at = tokio::time::sleep(slow);
    tokio::pin!(slow_at);
    let mut warned = false;
    loop {
        tokio::select! {
            r = &mut call => return r,
            _ = renew.tick() => {
                // A lost renewal is not fatal: the reservation still names our token.
                let _ = guard.renew(conn, ttl).await;
                if let Some(r) = reservation {
                    let _ = r.renew(conn, reservation_ttl).await;
                }
            }
            _ = &mut slow_at, if !warned => {
                warned = true;
                tracing::warn!(
                    waiting_up_to_secs = cfg.refresh.response_timeout_secs,
                    "token endpoint slow: still waiting for its answer (the request was sent; the provider may have used the refresh token)"
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn answered(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    record: &ProviderRecord,
    grant: TokenGrant,
    (default_lifetime, max_lifetime): (Duration, Duration),
    guard: LockGuard,
    reservation: Option<Reservation>,
    seen: Option<RecordState>,
    generation: u64,
) -> Finished {
    let issued = Utc::now();
    let (lifetime, note) = bounded_lifetime(grant.expires_in, default_lifetime, max_lifetime);
    let expiry = transition::add(issued, lifetime);
    let rt_expiry = grant
        .refresh_token_expires_in
        .map(|d| transition::add(issued, d.min(MAX_REFRESH_TOKEN_LIFETIME)));
    let token_expiry = like(expiry, record.token_expiry.as_ref());
    let updated_at = like(issued, record.updated_at.as_ref());
    let new_rt = grant.refresh_token.clone();
    let rt_now = new_rt.as_ref().unwrap_or(&record.refresh_token);
    let refreshed = Refreshed {
        issued,
        expiry,
        refresh_token_expiry: rt_expiry,
        rotated: new_rt.is_some(),
        fingerprint: record.fingerprint_after_write(rt_now.expose(), &token_expiry, &updated_at),
        note,
        refresh_hash: Some(reserve::token_short(rt_now.expose())),
        replaced_hash: new_rt
            .as_ref()
            .map(|_| reserve::token_short(record.refresh_token.expose())),
    };
    // A new refresh token is durable before anything else happens to it.
    let mut entry: Option<Entry> = None;
    let mut journaled_id: Option<EntryId> = None;
    if let Some(rt) = &new_rt {
        let e = Entry {
            id: EntryId::random(),
            version: crate::journal::FORMAT_VERSION,
            created_at: issued,
            tenant: id.tenant.to_string(),
            provider: id.provider.to_string(),
            old_refresh_token: record.refresh_token.clone(),
            old_access_token: record.access_token.clone(),
            access_token: grant.access_token.clone(),
            refresh_token: Some(rt.clone()),
            token_expiry: token_expiry.clone(),
            updated_at: updated_at.clone(),
            expires_at: expiry,
            refresh_token_expires_at: rt_expiry,
        };
        let journaled = match &ctx.journal {
            Some(j) => match j.append(&e).await {
                Ok(()) => true,
                Err(err) => {
                    if ctx.status.set_journal_ok(false) {
                        tracing::error!(error = %err, "journal cannot be written: this answer is written back anyway, and no new rotating refresh starts until the journal works again (/readyz 503)");
                    }
                    false
                }
            },
            None => false,
        };
        if journaled {
            journaled_id = Some(e.id.clone());
        }
        entry = Some(e);
    }
    // A master change since this attempt took its connection: that connection may still
    // reach the former master, which accepts writes until the Sentinels demote it and then
    // drops them. The write-back goes to the new master.
    let mut fresh = None;
    let mut write_generation = generation;
    if store::master_generation(&ctx.pool) != generation {
        write_generation = store::master_generation(&ctx.pool);
        fresh = store::conn(&ctx.pool).await.ok();
    }
    let conn: &mut Connection = match fresh.as_mut() {
        Some(c) => c,
        None => conn,
    };
    let write = WriteBack {
        expected_refresh_token: record.refresh_token.expose(),
        access_token: grant.access_token.expose(),
        new_refresh_token: new_rt.as_ref().map_or("", Secret::expose),
        token_expiry: &token_expiry,
        updated_at: &updated_at,
    };
    // One round trip for the write-back, the release and the `WAIT` (when configured) on one
    // node or a Sentinel master; a Cluster's keys sit on different slots, so there the
    // release and the `WAIT` follow the write-back.
    let together = !store::is_cluster(conn);
    let wait = ctx.config().redis.wait();
    let echo = ctx.echoes.expect(id);
    let written = if together {
        writeback::compare_and_set_then(
            conn,
            id,
            &write,
            |pipe| {
                if let Some(r) = &reservation {
                    r.add_delete(pipe);
                }
                guard.add_release(pipe);
            },
            wait,
        )
        .await
    } else {
        writeback::compare_and_set(conn, id, &write)
            .await
            .map(|r| (r, None))
    };
    echo.written(matches!(written, Ok((WriteResult::Written, _))));
    let settle = |ctx: &Context| {
        if let (Some(j), Some(eid)) = (&ctx.journal, &journaled_id) {
            if let Err(err) = j.confirm(eid) {
                tracing::warn!(error = %err, "journal entry could not be marked confirmed");
            }
        }
    };
    let written = match written {
        Ok((WriteResult::Written, confirmed)) => {
            match (wait, confirmed) {
                (Some((wanted, _)), Some(n)) => writeback::note_replicated(wanted, Ok(n)),
                // Replicated (WAIT) while still under the lock and the reservation.
                _ => writeback::confirm_replicated(&ctx.config().redis, conn, id).await,
            }
            if entry.is_some() && store::master_generation(&ctx.pool) != write_generation {
                // It may have reached the former master only: replayed on the new one (the
                // journal's compare-and-set makes a second write of it harmless).
                Err(StoreError::Pool(
                    "the Redis master changed during the write-back".into(),
                ))
            } else {
                Ok(WriteResult::Written)
            }
        }
        Ok((other, _)) => Ok(other),
        Err(e) => Err(e),
    };
    match written {
        Ok(WriteResult::Written) => {
            if !together {
                release(conn, &guard, reservation.as_ref()).await;
            }
            settle(ctx);
            Finished::new(seen, Attempt::Refreshed(refreshed))
        }
        Ok(WriteResult::Conflict) => {
            settle(ctx);
            let seen = Registry::read_record(conn, id).await.ok().or(seen);
            if !together {
                release(conn, &guard, reservation.as_ref()).await;
            }
            Finished::new(
                seen,
                Attempt::Conflict {
                    detail: "refresh token changed during the call".into(),
                },
            )
        }
        Ok(WriteResult::Gone) => {
            settle(ctx);
            if !together {
                release(conn, &guard, reservation.as_ref()).await;
            }
            Finished::new(seen, Attempt::RecordGone)
        }
        Err(err) => match entry {
            Some(e) => {
                tracing::warn!(error = %err, "write-back not confirmed: the answer is held and replayed until Redis confirms it");
                ctx.replayer.hold(Held {
                    id: id.clone(),
                    journaled: journaled_id.is_some(),
                    entry: e,
                    reservation,
                    lock: Some(guard),
                    refreshed: refreshed.clone(),
                });
                Finished::new(seen, Attempt::Unconfirmed(refreshed))
            }
            None => {
                // No new refresh token: the stored one still works; try again later.
                guard.abandon();
                Finished::new(
                    seen,
                    Attempt::Redis {
                        detail: err.to_string(),
                    },
                )
            }
        },
    }
}

#[allow(clippy::too_many_arguments)]
async fn permanent(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    record: &ProviderRecord,
    e: &TokenError,
    guard: &LockGuard,
    reservation: Option<&Reservation>,
    seen: Option<RecordState>,
    (during_recovery, can_fall_back): (bool, bool),
) -> Finished {
    let _ = ctx;
    // Still holding the lock: did someone else refresh while we called?
    let current: Result<Option<String>, _> = redis::cmd("HGET")
        .arg(id.record_key())
        .arg("refresh_token")
        .query_async(conn)
        .await;
    let current = match current {
        Ok(c) => c,
        Err(err) => {
            release(conn, guard, reservation).await;
            return Finished::new(
                seen,
                Attempt::Redis {
                    detail: err.to_string(),
                },
            );
        }
    };
    if current.as_deref().unwrap_or("") != record.refresh_token.expose() {
        tracing::info!(error = %e, "provider refused a refresh token that had meanwhile been replaced: someone else refreshed, nothing is broken");
        let seen = Registry::read_record(conn, id).await.ok().or(seen);
        release(conn, guard, reservation).await;
        return Finished::new(
            seen,
            Attempt::Conflict {
                detail: "refresh token replaced by another writer during the call".into(),
            },
        );
    }
    release(conn, guard, reservation).await;
    let (code, detail) = match e {
        TokenError::Permanent { code, detail, .. } => (code.clone(), detail.clone()),
        TokenError::Transient { .. } => ("invalid_grant".to_string(), e.to_string()),
    };
    Finished::new(
        seen,
        Attempt::Permanent {
            code,
            detail,
            during_recovery,
            can_fall_back,
        },
    )
}
