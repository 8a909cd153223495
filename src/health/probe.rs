//! Health probes: is each provider's API answering its current access token?
//!
//! Every `health.probe_interval_secs` (spread evenly over the interval), each active provider that is not waiting for a
//! re-authorisation and has a probe URL (the record's `health_path`, else the catalog's
//! `health_path` or `health_url`) gets one `GET` with `Authorization: Bearer <access_token>`,
//! at most `health.max_concurrent` at a time. The result goes to the fleet (`provider_up`),
//! the health hash (`last_health_check_at`, `health_latency_ms`, and `degraded` for a failed
//! or slow probe) and `provider_health_check_duration_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::fleet::{ProbeResult, Verdict};
use crate::health::HealthUpdate;
use crate::keys::ProviderId;
use crate::registry::record::RecordState;
use crate::registry::{ReadStats, Registry};
use crate::store::{self, StoreError};
use crate::telemetry::metrics as m;
use crate::timestamp::iso_utc;

/// Providers probed per step (one pipelined read, one pipelined write).
const STEP: usize = 200;

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
    drop(conn);
    let targets: Vec<(ProviderId, String, String)> = ids
        .iter()
        .zip(states)
        .filter_map(|(id, state)| {
            let RecordState::Valid(r) = state else {
                return None;
            };
            let url = cfg.catalog.health_url(&r.provider_type, &r.overrides())?;
            let token = r.access_token.expose().to_string();
            (!token.is_empty()).then(|| (id.clone(), url, token))
        })
        .collect();
    let timeout = Duration::from_secs(cfg.health.probe_timeout_secs);
    let http = ctx.client.http().clone();
    let results: Vec<(ProviderId, ProbeResult)> = futures_util::stream::iter(targets)
        .map(|(id, url, token)| {
            let http = http.clone();
            async move {
                let result = probe_one(&http, &url, &token, timeout).await;
                (id, result)
            }
        })
        .buffer_unordered(cfg.health.max_concurrent)
        .collect()
        .await;
    let slow_ms = cfg.health.slow_probe_ms;
    let failing_after = cfg.refresh.failing_after;
    let mut pipe = redis::pipe();
    {
        let mut fleet = ctx.fleet.write();
        for (id, result) in &results {
            metrics::histogram!(m::PROVIDER_HEALTH_CHECK_DURATION, "provider" => id.provider.to_string())
                .record(result.latency_ms as f64 / 1000.0);
            let probed_version = step.iter().find(|(i, _)| i == id).map(|(_, v)| *v);
            let Some(t) = fleet.providers.get_mut(id) else {
                continue;
            };
            if Some(t.version) != probed_version {
                continue;
            }
            let was = t.state(failing_after);
            t.up = Some(result.ok);
            t.probe = Some(result.clone().with_slow(slow_ms));
            let now_state = t.state(failing_after);
            if was != now_state {
                tracing::info!(tenant = %id.tenant, provider = %id.provider, from = was.as_str(), to = now_state.as_str(), detail = %result.detail, "health probe changed the provider's state");
            }
            let mut h = HealthUpdate::default();
            h.set("state", now_state.as_str());
            h.set("reason", t.reason());
            h.set("last_health_check_at", iso_utc(result.at));
            h.set("health_latency_ms", result.latency_ms.to_string());
            h.set("updated_at", iso_utc(result.at));
            h.add_to(&mut pipe, id);
        }
    }
    if !results.is_empty() {
        let mut conn = store::conn(&ctx.pool).await?;
        pipe.query_async::<()>(&mut conn).await?;
    }
    Ok(results.len())
}

async fn probe_one(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    timeout: Duration,
) -> ProbeResult {
    let started = Instant::now();
    let at: DateTime<Utc> = Utc::now();
    let answer = http
        .get(url)
        .bearer_auth(token)
        .timeout(timeout)
        .send()
        .await;
    let latency_ms = started.elapsed().as_millis() as u64;
    let (ok, detail) = match answer {
        Ok(r) if r.status().is_success() => (true, String::new()),
        Ok(r) => (
            false,
            format!("health probe answered HTTP {}", r.status().as_u16()),
        ),
        Err(e) if e.is_timeout() => (false, "health probe timed out".to_string()),
        Err(e) if e.is_connect() => (false, "health probe could not connect".to_string()),
        Err(e) => (false, format!("health probe failed: {}", e.without_url())),
    };
    ProbeResult {
        ok,
        slow: false,
        latency_ms,
        at,
        detail,
    }
}
