//! One tenant's sync run: lock, plan, fetch, store, directory, report.
//!
//! Under `tenant:{t}:sync:lock` (renewed every third of its TTL; a failed renewal stops the
//! run before it writes): read the tenant config and its providers, [`strategy::plan`], then
//! per provider refresh the token first if it would expire during the run (through the
//! engine), fetch its features (at most `sync.per_provider_concurrency` at once), replace
//! each fetched feature's key ([`store::replace`]), and finally rebuild the unified
//! directory from every provider's stored users. Each provider's health gets
//! `last_sync_at`/`last_sync_result`, the stream one `sync` event per provider, the metrics
//! one sample per feature. A feature that fails leaves its previous data as it was.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::adapters;
use super::directory;
use super::endpoints::Endpoints;
use super::fetch::{self, Fetched, Job, Limits, Pacer, RefreshFn, Token};
use super::lock::SyncLock;
use super::model::Feature;
use super::store;
use super::strategy::{self, ProviderView, Selection, Strategy};
use crate::config::SyncConfig;
use crate::context::Context;
use crate::engine::transition::Attempt;
use crate::health::{self, HealthUpdate};
use crate::keys::{self, ProviderId};
use crate::refresh::Trigger;
use crate::registry::record::{ProviderRecord, RecordState};
use crate::secret::Secret;
use crate::telemetry::metrics as m;
use crate::timestamp::{self, iso_utc};

/// One line of a run's report: a provider and feature (or the whole provider) and what
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub provider: String,
    pub feature: Option<String>,
    /// `success`, a failure label (`malformed`, `unauthorized`, ...) or a skip reason.
    pub result: String,
    pub records: Option<usize>,
    pub detail: String,
}

impl Line {
    pub fn failed(&self) -> bool {
        self.result != "success" && !self.result.starts_with("skipped")
    }
}

/// How the run as a whole went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ran,
    /// Another run holds the tenant's lock.
    Busy,
    /// Another replica already ran this scheduled slot.
    AlreadyRun,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub tenant: String,
    pub outcome: Outcome,
    pub lines: Vec<Line>,
}

impl Report {
    /// Every selected provider and feature succeeded (skips are not failures).
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Ran && !self.lines.iter().any(Line::failed)
    }
}

/// Fields of a provider record the sync uses besides the parsed record.
struct ProviderInfo {
    id: ProviderId,
    view: ProviderView,
    record: Option<ProviderRecord>,
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.trim().is_empty())
}

fn limits(c: &SyncConfig) -> Limits {
    Limits {
        page_size: c.page_size,
        max_pages: c.max_pages,
        max_records: c.max_records,
        max_page_bytes: c.max_page_bytes,
        max_retries: c.max_retries,
        retry_base: Duration::from_millis(c.retry_base_ms),
        retry_after_max: Duration::from_secs(c.retry_after_max_secs),
    }
}

/// The HTTP client of sync calls.
pub fn http_client(c: &SyncConfig) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(c.http_timeout_secs))
        .connect_timeout(Duration::from_secs(c.http_timeout_secs.min(10)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("sync HTTP client: {e}"))
}

/// Refreshes `id`'s token through the engine and returns the access token now in Redis.
async fn refresh_token(
    ctx: Arc<Context>,
    id: ProviderId,
    old: Option<Secret>,
    trigger: Trigger,
) -> Result<Secret, String> {
    let outcome = ctx
        .engine
        .refresh_now(id.clone(), trigger)
        .await
        .ok_or_else(|| "the token engine is not running".to_string())?;
    let mut conn = crate::store::conn(&ctx.pool)
        .await
        .map_err(|e| e.to_string())?;
    let token: Option<String> = redis::cmd("HGET")
        .arg(id.record_key())
        .arg("access_token")
        .query_async(&mut conn)
        .await
        .map_err(|e| crate::store::StoreError::from(e).to_string())?;
    let token = token.filter(|t| !t.is_empty()).map(Secret::new);
    let changed = match (&token, &old) {
        (Some(t), Some(o)) => t.expose() != o.expose(),
        (Some(_), None) => true,
        _ => false,
    };
    match (outcome, token) {
        (Attempt::Refreshed(_), Some(t)) => Ok(t),
        (_, Some(t)) if changed => Ok(t),
        (a, _) => Err(format!(
            "refresh did not give a new token ({})",
            crate::engine::transition::attempt_label(&a)
        )),
    }
}

async fn read_provider(
    conn: &mut crate::store::Connection,
    tenant: &str,
    name: &str,
) -> Result<ProviderInfo, crate::store::StoreError> {
    let id = ProviderId::new(tenant, name);
    let fields = store::read_hash(conn, &id.record_key()).await?;
    let state: Option<String> = redis::cmd("HGET")
        .arg(id.health_key())
        .arg("state")
        .query_async(conn)
        .await
        .unwrap_or(None);
    let sync_features =
        field(&fields, "sync_features").and_then(|v| timestamp::parse_string_array(v).ok());
    let parsed = ProviderRecord::parse(&fields);
    let mut view = ProviderView {
        name: name.to_string(),
        sync_features,
        reauth_required: state.as_deref() == Some("reauth_required"),
        ..ProviderView::default()
    };
    let record = match parsed {
        RecordState::Valid(r) => {
            view.provider_type = r.provider_type.clone();
            view.active = true;
            view.features_enabled = r.features_enabled.clone();
            view.sync_enabled = r.sync_enabled;
            Some(*r)
        }
        RecordState::Inactive { provider_type, .. } => {
            view.provider_type = provider_type;
            None
        }
        RecordState::Invalid { .. } => {
            view.active = true;
            view.invalid = true;
            None
        }
    };
    Ok(ProviderInfo { id, view, record })
}

fn labels(cfg_series: bool, id: &ProviderId, feature: &str) -> Vec<(&'static str, String)> {
    let mut l = vec![("feature", feature.to_string())];
    if cfg_series {
        l.push(("tenant", id.tenant.to_string()));
        l.push(("provider", id.provider.to_string()));
    }
    l
}

fn observe(series: bool, id: &ProviderId, line: &Line, took: Duration) {
    let Some(feature) = line.feature.as_deref() else {
        return;
    };
    let mut l = labels(series, id, feature);
    l.push(("result", line.result.clone()));
    metrics::counter!(m::SYNC_RUNS_TOTAL, &l).increment(1);
    metrics::histogram!(m::SYNC_DURATION, "feature" => feature.to_string())
        .record(took.as_secs_f64());
    if line.result == "success" {
        let l = labels(series, id, feature);
        metrics::gauge!(m::SYNC_LAST_SUCCESS, &l).set(Utc::now().timestamp() as f64);
        metrics::gauge!(m::SYNC_RECORDS, &l).set(line.records.unwrap_or(0) as f64);
    }
}

/// Runs the tenant's sync now. `slot`: the scheduled instant (Unix seconds) for a scheduled
/// run, so that replicas firing the same slot run it once; `None` for the command line.
pub async fn run_tenant(
    ctx: &Arc<Context>,
    tenant: &str,
    selection: &Selection,
    slot: Option<i64>,
    stop: &CancellationToken,
) -> Report {
    let mut report = Report {
        tenant: tenant.to_string(),
        outcome: Outcome::Ran,
        lines: Vec::new(),
    };
    let cfg = ctx.config();
    let sc = &cfg.sync;
    let fail = |mut r: Report, why: String| {
        r.outcome = Outcome::Failed(why);
        r
    };
    let endpoints = match Endpoints::from_catalog(&cfg.catalog) {
        Ok(e) => e,
        Err(e) => return fail(report, e.to_string()),
    };
    let http = match http_client(sc) {
        Ok(h) => h,
        Err(e) => return fail(report, e),
    };
    let mut conn = match crate::store::conn(&ctx.pool).await {
        Ok(c) => c,
        Err(e) => return fail(report, e.to_string()),
    };
    let ttl = Duration::from_secs(sc.lock_ttl_secs);
    let lock =
        match SyncLock::acquire(&mut conn, keys::sync_lock_key(tenant), &ctx.replica, ttl).await {
            Ok(Some(l)) => Arc::new(l),
            Ok(None) => {
                report.outcome = Outcome::Busy;
                return report;
            }
            Err(e) => return fail(report, e.to_string()),
        };
    if let Some(slot) = slot {
        let last: Option<i64> = redis::cmd("GET")
            .arg(keys::sync_slot_key(tenant))
            .query_async(&mut conn)
            .await
            .unwrap_or(None);
        if last.is_some_and(|l| l >= slot) {
            let _ = lock.release(&mut conn).await;
            report.outcome = Outcome::AlreadyRun;
            return report;
        }
    }
    // Renew the lock while the run lasts; a failed renewal stops the run.
    let run_stop = stop.child_token();
    let done = CancellationToken::new();
    let renewer = {
        let (lock, done, run_stop, mut conn) = (
            Arc::clone(&lock),
            done.clone(),
            run_stop.clone(),
            conn.clone(),
        );
        tokio::spawn(async move {
            let every = (lock.ttl() / 3).max(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                if !lock.renew(&mut conn).await {
                    tracing::warn!("sync lock lost: the run stops before writing");
                    run_stop.cancel();
                    return;
                }
            }
        })
    };
    let result = run_locked(
        ctx,
        &mut conn,
        &lock,
        tenant,
        selection,
        slot,
        &endpoints,
        &http,
        &run_stop,
        &mut report,
    )
    .await;
    done.cancel();
    let _ = renewer.await;
    if let Err(why) = result {
        report.outcome = Outcome::Failed(why);
    } else if let Some(slot) = slot {
        let _: Result<(), _> = redis::cmd("SET")
            .arg(keys::sync_slot_key(tenant))
            .arg(slot)
            .arg("EX")
            .arg(86_400 * 7)
            .query_async(&mut conn)
            .await;
    }
    if !lock.lost().is_cancelled() {
        let _ = lock.release(&mut conn).await;
    }
    report
}

#[allow(clippy::too_many_arguments)]
async fn run_locked(
    ctx: &Arc<Context>,
    conn: &mut crate::store::Connection,
    lock: &SyncLock,
    tenant: &str,
    selection: &Selection,
    slot: Option<i64>,
    endpoints: &Endpoints,
    http: &reqwest::Client,
    stop: &CancellationToken,
    report: &mut Report,
) -> Result<(), String> {
    let cfg = ctx.config();
    let sc = &cfg.sync;
    let series = cfg.metrics.per_provider_series;
    // The daemon's scheduled runs refresh as the schedule would (respecting
    // reauth_required); the command line is an operator's request, like `refresh`: its
    // in-process engine has no registry view, so it forces.
    let trigger = if slot.is_some() {
        Trigger::Scheduled
    } else {
        Trigger::Forced
    };
    let tcfg = store::read_hash(conn, &keys::tenant_config_key(tenant))
        .await
        .map_err(|e| e.to_string())?;
    let (strategy, replaced) = Strategy::parse(field(&tcfg, "sync_strategy"));
    if replaced {
        tracing::warn!(tenant = %crate::text::escape_control(tenant), "sync_strategy is not primary, all or custom: syncing the primary provider only");
    }
    let primary = field(&tcfg, "primary_provider")
        .map(str::trim)
        .map(str::to_string);
    let retention_days = field(&tcfg, "data_retention_days")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|d| (1..=36_500).contains(d))
        .unwrap_or(sc.default_retention_days);
    let retention = Duration::from_secs(retention_days.saturating_mul(86_400));
    let names: Vec<Vec<u8>> = redis::cmd("SMEMBERS")
        .arg(keys::providers_set_key(tenant))
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut names: Vec<String> = names
        .iter()
        .filter_map(|n| keys::provider_name(n).ok().map(str::to_string))
        .collect();
    names.sort();
    let mut infos = Vec::with_capacity(names.len());
    for n in &names {
        infos.push(
            read_provider(conn, tenant, n)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let views: Vec<ProviderView> = infos.iter().map(|i| i.view.clone()).collect();
    let plan = strategy::plan(strategy, primary.as_deref(), &views, selection, |t, f| {
        endpoints
            .provider(t)
            .is_some_and(|p| p.features.contains_key(&f))
            && adapters::adapter(t).is_some()
    });
    let now = Utc::now();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let maxlen = cfg.events.stream_maxlen;
    for (p, feature, reason) in &plan.skipped {
        if feature.is_some() && *reason == strategy::SkipReason::NotInCatalog {
            report.lines.push(Line {
                provider: p.clone(),
                feature: feature.clone(),
                result: reason.as_str().into(),
                records: None,
                detail: "no sync endpoint in the catalog".into(),
            });
            continue;
        }
        report.lines.push(Line {
            provider: p.clone(),
            feature: None,
            result: reason.as_str().into(),
            records: None,
            detail: String::new(),
        });
        if matches!(
            reason,
            strategy::SkipReason::Inactive | strategy::SkipReason::ReauthRequired
        ) {
            let id = ProviderId::new(tenant, p.as_str());
            let mut h = HealthUpdate::default();
            h.set("last_sync_result", reason.as_str());
            h.add_to(&mut pipe, &id);
            health::add_event(
                &mut pipe,
                maxlen,
                "sync",
                &id,
                reason.as_str(),
                "provider skipped",
            );
            pipe.ignore();
        }
    }
    let limits = limits(sc);
    let min_validity = chrono::Duration::seconds(
        i64::try_from(sc.token_min_validity_secs).unwrap_or(i64::MAX / 4),
    );
    let mut users_written = false;
    for planned in &plan.run {
        let Some(info) = infos.iter().find(|i| i.view.name == planned.name) else {
            continue;
        };
        let Some(record) = info.record.as_ref() else {
            continue;
        };
        let id = info.id.clone();
        let (Some(ps), Some(adapter)) = (
            endpoints.provider(&record.provider_type),
            adapters::adapter(&record.provider_type),
        ) else {
            continue;
        };
        let refresh: RefreshFn = {
            let (ctx, id) = (Arc::clone(ctx), id.clone());
            let old = Some(record.access_token.clone());
            Arc::new(move || {
                Box::pin(refresh_token(
                    Arc::clone(&ctx),
                    id.clone(),
                    old.clone(),
                    trigger,
                ))
            })
        };
        // Refresh first when the token would expire during the run.
        let mut token = record.access_token.clone();
        let mut pre_error = None;
        let expiring = record
            .token_expiry
            .as_ref()
            .is_none_or(|t| t.at < now + min_validity);
        if expiring || token.is_empty() {
            match refresh().await {
                Ok(t) => token = t,
                Err(e) => pre_error = Some(e),
            }
        }
        let mut provider_result = "success".to_string();
        let mut provider_detail = String::new();
        if let Some(e) = pre_error {
            for f in &planned.features {
                let line = Line {
                    provider: planned.name.clone(),
                    feature: Some(f.as_str().into()),
                    result: "token_unavailable".into(),
                    records: None,
                    detail: e.clone(),
                };
                observe(series, &id, &line, Duration::ZERO);
                report.lines.push(line);
            }
            provider_result = "token_unavailable".into();
            provider_detail = e;
        } else {
            let token = Token::new(token, refresh);
            let pacer = Pacer::new(Duration::from_millis(ps.min_interval_ms));
            let slots = Semaphore::new(sc.per_provider_concurrency.max(1));
            let fetches = planned.features.iter().filter_map(|f| {
                let endpoint = ps.features.get(f)?;
                let job = Job {
                    http,
                    provider: &planned.name,
                    feature: *f,
                    endpoint,
                    api_base_url: &record.api_base_url,
                    account_key: &record.account_key,
                    adapter,
                    token: &token,
                    pacer: &pacer,
                    limits: &limits,
                    stop,
                };
                let slots = &slots;
                Some(async move {
                    let _permit = slots.acquire().await;
                    let started = Instant::now();
                    let r = fetch::fetch(&job).await;
                    (*f, r, started.elapsed())
                })
            });
            let results: Vec<(Feature, Result<Fetched, fetch::FetchError>, Duration)> =
                futures_util::future::join_all(fetches).await;
            for (f, r, took) in results {
                let key = keys::sync_key(tenant, &planned.name, f.as_str());
                let started = Instant::now();
                let line = match r {
                    Ok(fetched) => {
                        let entries: Vec<(String, String)> = fetched
                            .records
                            .iter()
                            .filter_map(|r| {
                                serde_json::to_string(r)
                                    .ok()
                                    .map(|j| (r.id().to_string(), j))
                            })
                            .collect();
                        let staging_ttl = Duration::from_secs(sc.staging_ttl_secs);
                        match store::replace(
                            conn,
                            lock,
                            &key,
                            &entries,
                            sc.chunk_size,
                            retention,
                            staging_ttl,
                        )
                        .await
                        {
                            Ok(()) => {
                                users_written |= f == Feature::Users;
                                Line {
                                    provider: planned.name.clone(),
                                    feature: Some(f.as_str().into()),
                                    result: "success".into(),
                                    records: Some(entries.len()),
                                    detail: format!("{} pages", fetched.pages),
                                }
                            }
                            Err(e) => Line {
                                provider: planned.name.clone(),
                                feature: Some(f.as_str().into()),
                                result: e.label().into(),
                                records: None,
                                detail: e.to_string(),
                            },
                        }
                    }
                    Err(e) => Line {
                        provider: planned.name.clone(),
                        feature: Some(f.as_str().into()),
                        result: e.label().into(),
                        records: None,
                        detail: e.to_string(),
                    },
                };
                if line.failed() && provider_result == "success" {
                    provider_result = line.result.clone();
                    provider_detail = format!("{}: {}", f.as_str(), line.detail);
                }
                observe(series, &id, &line, took + started.elapsed());
                report.lines.push(line);
            }
        }
        let mut h = HealthUpdate::default();
        h.set("last_sync_at", iso_utc(Utc::now()));
        h.set("last_sync_result", provider_result.as_str());
        h.add_to(&mut pipe, &id);
        let detail = if provider_detail.is_empty() {
            planned
                .features
                .iter()
                .map(|f| f.as_str())
                .collect::<Vec<_>>()
                .join(",")
        } else {
            provider_detail
        };
        health::add_event(&mut pipe, maxlen, "sync", &id, &provider_result, &detail);
        pipe.ignore();
        tracing::info!(tenant = %crate::text::escape_control(tenant), provider = %crate::text::escape_control(&planned.name), result = %provider_result, "sync run");
    }
    if users_written && !stop.is_cancelled() {
        if let Err(e) = write_directory(
            conn,
            lock,
            tenant,
            primary.as_deref(),
            &names,
            retention,
            sc,
        )
        .await
        {
            report.lines.push(Line {
                provider: "directory".into(),
                feature: Some("users".into()),
                result: "redis_error".into(),
                records: None,
                detail: e,
            });
        }
    }
    let _: Result<(), _> = pipe.query_async(conn).await;
    Ok(())
}

async fn write_directory(
    conn: &mut crate::store::Connection,
    lock: &SyncLock,
    tenant: &str,
    primary: Option<&str>,
    providers: &[String],
    retention: Duration,
    sc: &SyncConfig,
) -> Result<(), String> {
    let users = store::read_users(conn, tenant, providers)
        .await
        .map_err(|e| e.to_string())?;
    let previous = store::read_directory(conn, tenant)
        .await
        .map_err(|e| e.to_string())?;
    let unified = directory::build(primary, &users, &previous, &iso_utc(Utc::now()));
    let entries: BTreeMap<String, String> = unified
        .iter()
        .filter_map(|u| serde_json::to_string(u).ok().map(|j| (u.id.clone(), j)))
        .collect();
    let entries: Vec<(String, String)> = entries.into_iter().collect();
    store::replace(
        conn,
        lock,
        &keys::directory_key(tenant),
        &entries,
        sc.chunk_size,
        retention,
        Duration::from_secs(sc.staging_ttl_secs),
    )
    .await
    .map_err(|e| e.to_string())
}

/// One result line as the command line prints it (`tenant/provider feature: result ...`).
pub fn line_text(tenant: &str, l: &Line) -> String {
    let tenant = crate::text::escape_control(tenant);
    let provider = crate::text::escape_control(&l.provider);
    let what = match &l.feature {
        Some(f) => format!("{tenant}/{provider} {f}"),
        None => format!("{tenant}/{provider}"),
    };
    let records = l
        .records
        .map(|n| format!(" {n} records"))
        .unwrap_or_default();
    let detail = if l.detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", crate::text::escape_control(&l.detail))
    };
    format!("{what}: {}{records}{detail}", l.result)
}

/// The data sync as `tokenwarden sync` reaches it through `tokenwarden:commands`.
pub struct CommandHook(pub Arc<Context>);

impl crate::commands::SyncHook for CommandHook {
    fn run<'a>(
        &'a self,
        tenant: &'a str,
        provider: Option<&'a str>,
        feature: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = crate::commands::SyncReport> + Send + 'a>>
    {
        Box::pin(async move {
            let selection = Selection {
                provider: provider.map(str::to_string),
                feature: feature.map(str::to_string),
            };
            let report =
                run_tenant(&self.0, tenant, &selection, None, &CancellationToken::new()).await;
            let mut lines: Vec<String> =
                report.lines.iter().map(|l| line_text(tenant, l)).collect();
            match &report.outcome {
                Outcome::Busy | Outcome::AlreadyRun => {
                    lines.push("another sync of this tenant is running".into())
                }
                Outcome::Failed(why) => lines.push(format!("sync failed: {why}")),
                Outcome::Ran => {}
            }
            crate::commands::SyncReport {
                ok: report.ok() && !report.lines.is_empty(),
                lines,
            }
        })
    }
}
