//! Health probes: is each provider's API answering its current access token?
//!
//! Every `health.probe_interval_secs` (spread evenly over the interval), each active provider that is not waiting for a
//! re-authorisation and has a probe URL (the record's `health_path`, else the catalog's
//! `health_path` or `health_url`) gets one call: the catalog's `health_method` (GET), with
//! `Authorization: Bearer <access_token>` (or, for `auth_type=api_key`, the record's key in the
//! catalog's `api_key_header` / `api_key_query`), healthy when it answers the catalog's
//! `health_expect_status` (200). At most `health.max_concurrent` run at a time. Results go to
//! the engine, which decides what they mean (`provider_up`, the health hash's
//! `last_health_check_at`, `health_latency_ms`, `degraded` for a slow or intermittent answer,
//! `failing` after `refresh.failing_after` failed probes in a row); the probe itself records
//! `provider_health_check_duration_seconds` and `provider_api_calls_total{call="probe"}`.
//!
//! A provider with an `api_budget` is probed only when the budget has a slot free now
//! ([`crate::refresh::budget::try_take`], shared by every replica); otherwise the probe is
//! skipped this round (`health_probes_deferred_total`). A 429 slows that budget.
//!
//! A 401 to an access token tokenwarden believes valid (not expired) asks the engine for one
//! refresh ([`crate::context::EngineHandle::refresh_now`], through the lock); until a probe of
//! that provider passes again no further 401 does, so a provider that refuses every token is
//! not refreshed in a loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::catalog::{Probe, ProbeAuth};
use crate::context::Context;
use crate::engine::Msg;
use crate::fleet::{ProbeResult, Verdict};
use crate::keys::ProviderId;
use crate::refresh::{budget, Trigger};
use crate::registry::record::RecordState;
use crate::registry::{ReadStats, Registry};
use crate::store::{self, StoreError};
use crate::telemetry::metrics as m;

/// Providers probed per step (one pipelined read, one pipelined write).
const STEP: usize = 200;

/// A probe's API budget and its Redis key.
type Budgeted = (crate::catalog::Budget, String);

/// Probes the fleet every interval until cancelled, the first time as soon as the first
/// registry scan is done.
pub async fn run(ctx: Arc<Context>, cancel: CancellationToken) {
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        let cfg = ctx.config();
        if !cfg.health.enabled || !ctx.status.ready() {
            next = tokio::time::Instant::now() + Duration::from_secs(1);
            continue;
        }
        let started = Instant::now();
        match probe_all(&ctx, &cancel).await {
            Ok(n) => tracing::debug!(
                probed = n,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "health probes done"
            ),
            Err(e) => tracing::warn!(error = %e, "health probes interrupted"),
        }
        next = tokio::time::Instant::now() + Duration::from_secs(cfg.health.probe_interval_secs);
    }
}

/// Probes every eligible provider once; returns how many were probed.
pub async fn probe_all(ctx: &Context, cancel: &CancellationToken) -> Result<usize, StoreError> {
    // With the version of each entry: a refresh or a record change in the meantime makes
    // the probe's answer stale (it was about the previous access token).
    let ids: Vec<(ProviderId, u64)> = ctx
        .fleet
        .read()
        .providers
        .iter()
        .filter(|(_, t)| t.verdict == Verdict::Active && t.reauth.is_none())
        .map(|(id, t)| (id.clone(), t.version))
        .collect();
    // Spread over most of the interval, so that a large fleet is probed at an even pace
    // (N / interval per second) rather than in bursts.
    let steps = ids.len().div_ceil(STEP).max(1) as u32;
    let pace = Duration::from_secs(ctx.config().health.probe_interval_secs).mul_f64(0.9) / steps;
    let mut probed = 0;
    for step in ids.chunks(STEP) {
        let started = Instant::now();
        probed += probe_step(ctx, step).await?;
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(pace.saturating_sub(started.elapsed())) => {}
        }
    }
    Ok(probed)
}

async fn probe_step(ctx: &Context, step: &[(ProviderId, u64)]) -> Result<usize, StoreError> {
    let cfg = ctx.config();
    let ids: Vec<ProviderId> = step.iter().map(|(id, _)| id.clone()).collect();
    let ids = &ids[..];
    let registry = Registry::new(cfg.registry.scan_batch);
    let mut conn = store::conn(&ctx.pool).await?;
    let states = registry
        .read_records_with_token(&mut conn, ids, &mut ReadStats::default())
        .await?;
    let mut planned = Vec::with_capacity(states.len());
    for (id, state) in ids.iter().zip(states) {
        let RecordState::Valid(r) = state else {
            continue;
        };
        let Some(probe) = r.probe(&cfg.catalog) else {
            continue;
        };
        let budget = probe.budget.map(|b| {
            let key = budget::key(
                "api",
                &b,
                id,
                &r.provider_type,
                &r.client_id,
                &r.account_key,
            );
            (b, key)
        });
        planned.push((id, r, probe, budget));
    }
    // Within each provider's API budget (shared across replicas, and with the gateway where
    // the provider counts by account): a probe whose budget has no slot free now is not sent
    // this round. One pipeline for the step.
    let asks: Vec<(&str, &crate::catalog::Budget)> = planned
        .iter()
        .filter_map(|(_, _, _, b)| b.as_ref().map(|(b, key)| (key.as_str(), b)))
        .collect();
    let mut slots = budget::try_take_all(&mut conn, &asks).await?.into_iter();
    planned.retain(|(id, _, _, b)| {
        if b.is_none() {
            return true;
        }
        let go = matches!(slots.next(), Some(budget::Slot::Go));
        if !go {
            metrics::counter!(m::HEALTH_PROBES_DEFERRED, "provider" => id.provider.to_string())
                .increment(1);
        }
        go
    });
    let targets: Vec<(ProviderId, Probe, String, Option<Budgeted>)> = planned
        .into_iter()
        .filter_map(|(id, r, probe, budget)| {
            let token = if r.probe_only() {
                r.credentials.api_key.expose().to_string()
            } else {
                if r.access_token_unreadable {
                    tracing::info!(tenant = %id.tenant, provider = %id.provider, reason = "bad_encoding", "health probe skipped: access_token is not UTF-8 text (the next refresh replaces it)");
                    return None;
                }
                r.access_token.expose().to_string()
            };
            (!token.is_empty()).then(|| (id.clone(), probe, token, budget))
        })
        .collect();
    let timeout = Duration::from_secs(cfg.health.probe_timeout_secs);
    let http = ctx.client.http().clone();
    let answers: Vec<(ProviderId, ProbeResult, Option<u64>, Option<Budgeted>)> =
        futures_util::stream::iter(targets)
            .map(|(id, probe, token, budget)| {
                let http = http.clone();
                async move {
                    let (result, status) = probe_one(&http, &probe, &token, timeout).await;
                    crate::telemetry::metrics::provider_api_call(&id.provider, "probe", status);
                    let refused = (status == Some(401) && probe.auth == ProbeAuth::Bearer)
                        .then(|| token_hash(&token));
                    let limited = budget.filter(|_| status == Some(429));
                    (id, result, refused, limited)
                }
            })
            .buffer_unordered(cfg.health.max_concurrent)
            .collect()
            .await;
    let mut results = Vec::with_capacity(answers.len());
    for (id, result, refused, limited) in answers {
        if let Some((b, key)) = limited {
            // A 429 slows that budget (every replica's probes of it), not the fleet.
            if let Err(e) = budget::penalize(&mut conn, &key, &b, None).await {
                tracing::debug!(error = %e, "the API budget could not be slowed after a 429");
            }
        }
        results.push((id, result, refused));
    }
    drop(conn);
    let mut report = Vec::with_capacity(results.len());
    let now = Utc::now();
    for (id, result, refused) in &results {
        if result.ok {
            probe_passed(id);
        }
        let Some(hash) = refused else { continue };
        let believed_valid = ctx
            .fleet
            .read()
            .providers
            .get(id)
            .is_some_and(|t| t.reauth.is_none() && t.token_expiry.is_some_and(|e| e > now));
        if believed_valid && first_refusal(id, *hash) {
            tracing::warn!(tenant = %id.tenant, provider = %id.provider, detail = %result.detail, "health probe: the provider refused an access token that should be valid; refreshing once");
            let engine = ctx.engine.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let _ = engine.refresh_now(id, Trigger::Scheduled).await;
            });
        }
    }
    for (id, result, _) in results {
        metrics::histogram!(m::PROVIDER_HEALTH_CHECK_DURATION, "provider" => id.provider.to_string())
            .record(result.latency_ms as f64 / 1000.0);
        let Some(version) = step.iter().find(|(i, _)| *i == id).map(|(_, v)| *v) else {
            continue;
        };
        report.push((id, version, result));
    }
    let n = report.len();
    // The engine decides what a probe means; a refresh or record change since the probe was
    // planned makes its answer stale (it was about the previous access token).
    ctx.engine.send(Msg::Probes(report));
    Ok(n)
}

/// Providers whose refused access token (hash) already triggered a refresh: until a probe
/// of theirs passes again, no further 401 triggers one (a new token refused too is not the
/// token's fault).
fn refused() -> &'static Mutex<HashMap<ProviderId, u64>> {
    static SEEN: OnceLock<Mutex<HashMap<ProviderId, u64>>> = OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

fn first_refusal(id: &ProviderId, hash: u64) -> bool {
    let mut seen = refused().lock().unwrap_or_else(|p| p.into_inner());
    if seen.contains_key(id) {
        return false;
    }
    seen.insert(id.clone(), hash);
    true
}

fn probe_passed(id: &ProviderId) {
    let mut seen = refused().lock().unwrap_or_else(|p| p.into_inner());
    seen.remove(id);
}

fn token_hash(token: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    token.hash(&mut h);
    h.finish()
}

async fn probe_one(
    http: &reqwest::Client,
    probe: &Probe,
    token: &str,
    timeout: Duration,
) -> (ProbeResult, Option<u16>) {
    let started = Instant::now();
    let at: DateTime<Utc> = Utc::now();
    let mut req = http
        .request(probe.method.clone(), &probe.url)
        .timeout(timeout);
    req = match &probe.auth {
        ProbeAuth::Bearer => req.bearer_auth(token),
        ProbeAuth::ApiKeyHeader(h) => req.header(h.as_str(), token),
        ProbeAuth::ApiKeyQuery(q) => req.query(&[(q.as_str(), token)]),
    };
    let answer = req.send().await;
    let latency_ms = started.elapsed().as_millis() as u64;
    let status = answer.as_ref().ok().map(|r| r.status().as_u16());
    let (ok, detail) = match answer {
        Ok(r) if r.status().as_u16() == probe.expect_status => (true, String::new()),
        Ok(r) => (
            false,
            format!("health probe answered HTTP {}", r.status().as_u16()),
        ),
        Err(e) if e.is_timeout() => (false, "health probe timed out".to_string()),
        Err(e) if e.is_connect() => (false, "health probe could not connect".to_string()),
        Err(e) => (false, format!("health probe failed: {}", e.without_url())),
    };
    (
        ProbeResult {
            ok,
            slow: false,
            latency_ms,
            at,
            refused: !ok && status == Some(401),
            detail,
        },
        status,
    )
}
