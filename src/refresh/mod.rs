//! Refresh: one attempt to renew one provider's token, from lock to write-back.
//!
//! An attempt takes the provider's lock, re-reads the record under it, makes one token call
//! ([`client`]), writes the new tokens back with a compare-and-set ([`writeback`]), records
//! the outcome in the fleet, the health hash and the event stream, releases the lock, and
//! says when the next attempt is due. Outcomes are typed:
//! - success: written back, next refresh from the new lifetime;
//! - permanent (`invalid_grant`, ...): the record is re-read still holding the lock; if its
//!   refresh token changed meanwhile someone else refreshed and all is well, otherwise
//!   `reauth_required` and no further attempt until the record changes;
//! - transient (429, 5xx, timeouts, connection errors): retried with backoff, never
//!   discarding a refresh token; a call that may still be in flight leaves the lock to expire.

pub mod client;
pub mod writeback;

use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::Instrument;

use crate::config::Config;
use crate::context::{Command, Context};
use crate::fleet::{Tracked, Verdict};
use crate::health::{self, HealthUpdate};
use crate::keys::ProviderId;
use crate::lock::{self, LockGuard};
use crate::registry::follow;
use crate::registry::record::{ProviderRecord, RecordState};
use crate::registry::Registry;
use crate::schedule::policy::Lifetime;
use crate::store::{self, Connection, StoreError};
use crate::telemetry::metrics::{self as m, result};
use crate::timestamp::{self, TimestampFormat};
use client::{TokenError, TokenGrant, TokenRequest};
use writeback::{WriteBack, WriteResult};

/// Why an attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Its deadline fired.
    Scheduled,
    /// An operator asked (`tokenwarden refresh`): ignores `reauth_required` and due times.
    Forced,
}

/// What an attempt did.
#[derive(Debug, Clone)]
pub struct Report {
    /// A `token_refresh_total{result}` value.
    pub result: &'static str,
    /// When the next attempt is due (`None`: not scheduled, e.g. reauth required).
    pub next: Option<DateTime<Utc>>,
    /// One line for the operator; never a secret.
    pub detail: String,
}

impl Report {
    fn new(result: &'static str, next: Option<DateTime<Utc>>, detail: impl Into<String>) -> Report {
        Report {
            result,
            next,
            detail: detail.into(),
        }
    }
}

/// Runs one attempt on `id` inside a span named after it.
pub async fn attempt(ctx: &Context, id: &ProviderId, trigger: Trigger) -> Report {
    let span = tracing::info_span!("refresh", tenant = %id.tenant, provider = %id.provider);
    async {
        let report = match attempt_inner(ctx, id, trigger).await {
            Ok(r) => r,
            Err(e) => redis_failed(ctx, id, &e),
        };
        metrics::counter!(m::TOKEN_REFRESH_TOTAL, "provider" => id.provider.to_string(), "result" => report.result)
            .increment(1);
        report
    }
    .instrument(span)
    .await
}

fn redis_failed(ctx: &Context, id: &ProviderId, e: &StoreError) -> Report {
    let cfg = ctx.config();
    let mut fleet = ctx.fleet.write();
    let failures = fleet
        .providers
        .get(id)
        .map_or(1, |t| t.consecutive_failures.saturating_add(1));
    let delay = cfg
        .retry_policy()
        .delay(failures, None, &mut fastrand::Rng::new());
    let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
    let version = fleet.bump();
    if let Some(t) = fleet.providers.get_mut(id) {
        t.next_refresh = Some(next);
        t.version = version;
    }
    drop(fleet);
    if ctx.status.set_redis_up(false) {
        tracing::error!(error = %e, "redis unreachable: refreshes wait, state is kept in memory");
    }
    tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "refresh postponed: redis error");
    Report::new(result::REDIS_ERROR, Some(next), format!("redis error: {e}"))
}

async fn attempt_inner(
    ctx: &Context,
    id: &ProviderId,
    trigger: Trigger,
) -> Result<Report, StoreError> {
    let cfg = ctx.config();
    let mut conn = store::conn(&ctx.pool).await?;
    let ttl = Duration::from_secs(cfg.refresh.lock_ttl_secs);
    let Some(guard) = lock::acquire(&mut conn, id, &ctx.replica, ttl).await? else {
        let next = Utc::now() + chrono::Duration::seconds(cfg.refresh.lock_busy_retry_secs as i64);
        tracing::debug!("lock held by another replica; looking again later");
        return Ok(Report::new(
            result::LOCKED,
            Some(next),
            "lock held by another replica",
        ));
    };
    let outcome = locked(ctx, &mut conn, id, trigger, &guard).await;
    match outcome {
        Ok((report, keep_lock)) => {
            if keep_lock {
                guard.abandon();
            } else if let Err(e) = guard.release(&mut conn).await {
                tracing::warn!(error = %e, "lock release failed; it will expire");
            }
            Ok(report)
        }
        Err(e) => {
            // Nothing is in flight at the provider when Redis fails around the call; the
            // lock may still be released if Redis answers again.
            let _ = guard.release(&mut conn).await;
            Err(e)
        }
    }
}

/// The part of an attempt done holding the lock. Returns the report and whether the lock
/// must be left to expire.
async fn locked(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    trigger: Trigger,
    guard: &LockGuard,
) -> Result<(Report, bool), StoreError> {
    let cfg = ctx.config();
    let read_version = ctx.fleet.write().bump();
    let state = Registry::read_record(conn, id).await?;
    let now = Utc::now();
    let known = ctx.fleet.read().providers.get(id).cloned();
    let record = match &state {
        RecordState::Valid(r) => r.clone(),
        _ => {
            reapply(ctx, id, &state, read_version).await?;
            return Ok((
                Report::new(result::SKIPPED, None, "record is not refreshable now"),
                false,
            ));
        }
    };
    let changed = known
        .as_ref()
        .is_none_or(|t| t.fingerprint != record.fingerprint);
    if changed {
        // Someone (another replica, the gateway) changed the record since we planned this.
        reapply(ctx, id, &state, read_version).await?;
        let next = ctx
            .fleet
            .read()
            .providers
            .get(id)
            .and_then(|t| t.next_refresh);
        let due_now = next.is_none_or(|n| n <= now + chrono::Duration::seconds(1));
        if trigger == Trigger::Scheduled && !due_now {
            tracing::debug!("record changed since scheduled; not due any more");
            return Ok((
                Report::new(result::SKIPPED, next, "already refreshed elsewhere"),
                false,
            ));
        }
    } else if trigger == Trigger::Scheduled && known.as_ref().is_some_and(|t| t.reauth.is_some()) {
        return Ok((Report::new(result::SKIPPED, None, "reauth required"), false));
    }
    let endpoint = match record.endpoint(&cfg.catalog) {
        Ok(e) => e,
        Err(_) => {
            reapply(ctx, id, &state, read_version).await?;
            return Ok((Report::new(result::SKIPPED, None, "invalid record"), false));
        }
    };
    let request = TokenRequest {
        endpoint: &endpoint,
        client_id: &record.client_id,
        client_secret: &record.client_secret,
        refresh_token: &record.refresh_token,
        account_key: &record.account_key,
        scopes: &record.scopes,
    };
    tracing::debug!(
        grant = endpoint.grant.as_str(),
        owner = guard.owner(),
        "token call"
    );
    let started = std::time::Instant::now();
    let answer = ctx.client.request(request).await;
    metrics::histogram!(m::TOKEN_REFRESH_DURATION, "provider" => id.provider.to_string())
        .record(started.elapsed().as_secs_f64());
    match answer {
        Ok(grant) => succeeded(ctx, conn, id, &record, grant, endpoint.default_expires_in)
            .await
            .map(|r| (r, false)),
        Err(e) if e.is_permanent() => permanent(ctx, conn, id, &record, &e)
            .await
            .map(|r| (r, false)),
        Err(e) => Ok(transient(ctx, conn, id, &e).await),
    }
}

/// Re-applies a record read under the lock through the registry's one code path.
async fn reapply(
    ctx: &Context,
    id: &ProviderId,
    state: &RecordState,
    read_version: u64,
) -> Result<(), StoreError> {
    let cfg = ctx.config();
    let applied = {
        let mut fleet = ctx.fleet.write();
        follow::apply(&mut fleet, &cfg, id, state, read_version, Utc::now())
    };
    // The caller reports the next deadline; the engine learns it from the report.
    let applied = follow::Applied {
        schedule: match applied.schedule {
            Some(Command::Unschedule(i)) => Some(Command::Unschedule(i)),
            _ => None,
        },
        ..applied
    };
    follow::commit(ctx, vec![(id.clone(), applied)]).await
}

/// Writes an attempt's outcome in one round trip: the health entry (the whole state from
/// `tracked`, or only the attempt's fields) and one event.
async fn record_outcome(
    conn: &mut Connection,
    cfg: &Config,
    id: &ProviderId,
    tracked: Option<&Tracked>,
    at: DateTime<Utc>,
    (result, error): (&str, Option<&str>),
    (event, detail): (&str, &str),
) -> Result<(), StoreError> {
    let mut h = match tracked {
        Some(t) => HealthUpdate::from_tracked(t, cfg.refresh.failing_after, at),
        None => HealthUpdate::default(),
    };
    h.attempt(at, result, error);
    let mut pipe = redis::pipe();
    h.add_to(&mut pipe, id);
    health::add_event(
        &mut pipe,
        cfg.events.stream_maxlen,
        event,
        id,
        result,
        detail,
    );
    pipe.query_async::<()>(conn).await?;
    Ok(())
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

async fn succeeded(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    record: &ProviderRecord,
    grant: TokenGrant,
    default_lifetime: Duration,
) -> Result<Report, StoreError> {
    let cfg = ctx.config();
    let issued = Utc::now();
    let defaulted = grant.expires_in.is_none();
    let lifetime = grant.expires_in.unwrap_or(default_lifetime);
    let expiry = issued + chrono::Duration::from_std(lifetime).unwrap_or_default();
    let token_expiry = like(expiry, record.token_expiry.as_ref());
    let updated_at = like(issued, record.updated_at.as_ref());
    let new_rt = grant.refresh_token.as_ref().map_or("", |s| s.expose());
    let written = writeback::compare_and_set(
        conn,
        id,
        &WriteBack {
            expected_refresh_token: record.refresh_token.expose(),
            access_token: grant.access_token.expose(),
            new_refresh_token: new_rt,
            token_expiry: &token_expiry,
            updated_at: &updated_at,
        },
    )
    .await?;
    match written {
        WriteResult::Written => {}
        WriteResult::Gone => {
            tracing::warn!("record deleted during the refresh; new tokens discarded");
            return Ok(Report::new(
                result::CONFLICT,
                None,
                "record deleted during the refresh",
            ));
        }
        WriteResult::Conflict => {
            tracing::warn!("refresh token changed under us during the call: another writer refreshed without the lock; the tokens of this call were discarded");
            return conflict(ctx, conn, id, "refresh token changed during the call").await;
        }
    }
    let rt_now = if new_rt.is_empty() {
        record.refresh_token.expose()
    } else {
        new_rt
    };
    let note = defaulted.then(|| {
        format!(
            "expires_in missing from the token answer: assumed {} s",
            lifetime.as_secs()
        )
    });
    let tracked = {
        let mut fleet = ctx.fleet.write();
        let version = fleet.bump();
        let t = fleet
            .providers
            .entry(id.clone())
            .or_insert_with(|| Tracked::new(&record.provider_type, Verdict::Active, 0, issued));
        t.verdict = Verdict::Active;
        t.fingerprint = record.fingerprint_after_write(rt_now, &token_expiry, &updated_at);
        t.reauth = None;
        t.consecutive_failures = 0;
        // A probe's verdict was about the access token just replaced.
        t.probe = None;
        t.note = note.clone();
        t.token_expiry = Some(expiry);
        t.issued_at = issued;
        t.last_refresh = issued;
        if let Some(rte) = grant.refresh_token_expires_in {
            t.refresh_token_expiry =
                Some(issued + chrono::Duration::from_std(rte).unwrap_or_default());
        }
        t.next_refresh = Some(cfg.refresh_policy().next_refresh(
            Lifetime { issued, expiry },
            issued,
            t.refresh_token_expiry,
            issued,
            &mut fastrand::Rng::new(),
        ));
        t.last_result = Some(result::SUCCESS);
        t.version = version;
        t.clone()
    };
    record_outcome(
        conn,
        &cfg,
        id,
        Some(&tracked),
        issued,
        (result::SUCCESS, None),
        ("refresh", note.as_deref().unwrap_or("")),
    )
    .await?;
    tracing::info!(
        expires_in_secs = lifetime.as_secs(),
        rotated = !new_rt.is_empty(),
        elapsed_ms = grant.elapsed.as_millis() as u64,
        next_refresh = %tracked.next_refresh.map(timestamp::iso_utc).unwrap_or_default(),
        "token refreshed"
    );
    Ok(Report::new(
        result::SUCCESS,
        tracked.next_refresh,
        "refreshed",
    ))
}

/// The refresh token changed under us: re-read and reschedule from what is there now.
async fn conflict(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    detail: &str,
) -> Result<Report, StoreError> {
    let cfg = ctx.config();
    let read_version = ctx.fleet.write().bump();
    let state = Registry::read_record(conn, id).await?;
    reapply(ctx, id, &state, read_version).await?;
    let next = ctx
        .fleet
        .read()
        .providers
        .get(id)
        .and_then(|t| t.next_refresh);
    record_outcome(
        conn,
        &cfg,
        id,
        None,
        Utc::now(),
        (result::CONFLICT, Some(detail)),
        ("conflict", detail),
    )
    .await?;
    Ok(Report::new(result::CONFLICT, next, detail))
}

async fn permanent(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    record: &ProviderRecord,
    e: &TokenError,
) -> Result<Report, StoreError> {
    let cfg = ctx.config();
    // Still holding the lock: did someone else refresh while we called?
    let current: Option<String> = redis::cmd("HGET")
        .arg(id.record_key())
        .arg("refresh_token")
        .query_async(conn)
        .await?;
    if current.as_deref().unwrap_or("") != record.refresh_token.expose() {
        tracing::info!(error = %e, "provider refused a refresh token that had meanwhile been replaced: someone else refreshed, nothing is broken");
        return conflict(
            ctx,
            conn,
            id,
            "refresh token replaced by another writer during the call",
        )
        .await;
    }
    let TokenError::Permanent { code, .. } = e else {
        return Ok(Report::new(result::TRANSIENT_ERROR, None, e.to_string()));
    };
    let now = Utc::now();
    let tracked = {
        let mut fleet = ctx.fleet.write();
        let version = fleet.bump();
        let t = fleet.providers.entry(id.clone()).or_insert_with(|| {
            Tracked::new(
                &record.provider_type,
                Verdict::Active,
                record.fingerprint,
                now,
            )
        });
        t.reauth = Some(code.clone());
        t.next_refresh = None;
        t.last_result = Some(result::REAUTH_REQUIRED);
        t.fingerprint = record.fingerprint;
        t.version = version;
        t.clone()
    };
    let error = e.to_string();
    record_outcome(
        conn,
        &cfg,
        id,
        Some(&tracked),
        now,
        (result::REAUTH_REQUIRED, Some(&error)),
        ("reauth_required", &error),
    )
    .await?;
    tracing::error!(error = %error, "re-authorisation required: no further attempts until the record changes");
    Ok(Report::new(result::REAUTH_REQUIRED, None, error))
}

/// Returns the report and whether the lock must be left to expire.
async fn transient(
    ctx: &Context,
    conn: &mut Connection,
    id: &ProviderId,
    e: &TokenError,
) -> (Report, bool) {
    let cfg = ctx.config();
    let (retry_after, in_flight) = match e {
        TokenError::Transient {
            retry_after,
            maybe_in_flight,
            ..
        } => (*retry_after, *maybe_in_flight),
        TokenError::Permanent { .. } => (None, false),
    };
    let now = Utc::now();
    let tracked = {
        let mut fleet = ctx.fleet.write();
        let version = fleet.bump();
        let Some(t) = fleet.providers.get_mut(id) else {
            return (
                Report::new(result::TRANSIENT_ERROR, None, e.to_string()),
                in_flight,
            );
        };
        t.consecutive_failures = t.consecutive_failures.saturating_add(1);
        let mut delay = cfg.retry_policy().delay(
            t.consecutive_failures,
            retry_after,
            &mut fastrand::Rng::new(),
        );
        if in_flight {
            // The lock is left to expire: no point in trying before it does.
            delay = delay.max(Duration::from_secs(cfg.refresh.lock_ttl_secs));
        }
        t.next_refresh = Some(now + chrono::Duration::from_std(delay).unwrap_or_default());
        t.last_result = Some(result::TRANSIENT_ERROR);
        t.version = version;
        t.clone()
    };
    let error = e.to_string();
    tracing::warn!(
        error = %error,
        consecutive_failures = tracked.consecutive_failures,
        retry_at = %tracked.next_refresh.map(timestamp::iso_utc).unwrap_or_default(),
        "token call failed; will retry"
    );
    let written = record_outcome(
        conn,
        &cfg,
        id,
        Some(&tracked),
        now,
        (result::TRANSIENT_ERROR, Some(&error)),
        ("failure", &error),
    )
    .await;
    if let Err(err) = written {
        tracing::warn!(error = %err, "health write failed");
    }
    (
        Report::new(result::TRANSIENT_ERROR, tracked.next_refresh, error),
        in_flight,
    )
}
