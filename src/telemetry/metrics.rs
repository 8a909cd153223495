//! Every metric tokenwarden exports (SPEC 5): names, help texts, buckets, and the scrape-time
//! rendering of the state gauges.
//!
//! Counters and histograms go through the `metrics` facade into
//! `metrics-exporter-prometheus`; histograms have explicit buckets and no `tenant` label.
//! State gauges (expiry, next refresh, reauth, up, providers by state) are rendered at scrape
//! time from the fleet, so a provider that left the registry has no series.

use std::fmt::Write as _;

use metrics::{describe_counter, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::fleet::{Fleet, HealthState};

pub const TOKEN_EXPIRY: &str = "tokenwarden_token_expiry_timestamp_seconds";
pub const TOKEN_NEXT_REFRESH: &str = "tokenwarden_token_next_refresh_timestamp_seconds";
pub const REFRESH_TOKEN_EXPIRY: &str = "tokenwarden_refresh_token_expiry_timestamp_seconds";
pub const TOKEN_REFRESH_TOTAL: &str = "tokenwarden_token_refresh_total";
pub const TOKEN_REFRESH_DURATION: &str = "tokenwarden_token_refresh_duration_seconds";
pub const PROVIDER_REAUTH_REQUIRED: &str = "tokenwarden_provider_reauth_required";
pub const PROVIDER_UP: &str = "tokenwarden_provider_up";
pub const PROVIDER_HEALTH_CHECK_DURATION: &str =
    "tokenwarden_provider_health_check_duration_seconds";
pub const REGISTRY_PROVIDERS: &str = "tokenwarden_registry_providers";
pub const REGISTRY_SCAN_DURATION: &str = "tokenwarden_registry_scan_duration_seconds";
pub const REGISTRY_INVALID_RECORDS: &str = "tokenwarden_registry_invalid_records_total";
/// Change events for a record that were this replica's own write-backs, so not re-read.
pub const REGISTRY_ECHOES_SKIPPED: &str = "tokenwarden_registry_echoes_skipped_total";
pub const REDIS_UP: &str = "tokenwarden_redis_up";
/// Write-backs whose `WAIT` saw fewer replicas than `redis.wait_replicas`.
pub const REDIS_WAIT_SHORTFALL: &str = "tokenwarden_redis_wait_shortfall_total";
/// Master changes (Sentinel failovers) followed.
pub const REDIS_MASTER_CHANGES: &str = "tokenwarden_redis_master_changes_total";
/// Kept journal entries re-applied after a master change, by result.
pub const JOURNAL_REAPPLIED: &str = "tokenwarden_journal_reapplied_total";
pub const BUILD_INFO: &str = "tokenwarden_build_info";
pub const JOURNAL_PENDING: &str = "tokenwarden_journal_pending";
pub const TOKEN_LAST_SUCCESS: &str = "tokenwarden_token_last_refresh_success_timestamp_seconds";
pub const REGISTRY_EXPIRING: &str = "tokenwarden_registry_expiring_providers";
pub const OWNED_PROVIDERS: &str = "tokenwarden_owned_providers";
pub const REPLICAS: &str = "tokenwarden_replicas";
pub const PROVIDER_API_CALLS: &str = "tokenwarden_provider_api_calls_total";

/// Added by tokenwarden (not in SPEC 5): how late a refresh started after its deadline.
pub const SCHEDULE_LATENESS: &str = "tokenwarden_schedule_lateness_seconds";
/// Added: tokens waiting for a refresh slot right now.
pub const CREDENTIAL_EXPIRY: &str = "tokenwarden_credential_expiry_timestamp_seconds";
pub const REFRESH_QUEUE: &str = "tokenwarden_refresh_queue";
/// Added: health probes not sent because the provider's API budget had no slot free (the
/// next round asks again), by provider name.
pub const HEALTH_PROBES_DEFERRED: &str = "tokenwarden_health_probes_deferred_total";
/// Records found back on a refresh token already replaced (a stale whole-record write).
pub const STALE_WRITES_TOTAL: &str = "tokenwarden_stale_writes_total";
/// Added: consecutive failed refreshes of one provider (0 after a success), rendered at
/// scrape time: `token_refresh_total` carries no `tenant`, so per-tenant failure alerts
/// read this.
pub const PROVIDER_FAILURES: &str = "tokenwarden_provider_consecutive_failures";

/// Sync runs of one feature, by `feature` and `result` (and `tenant`, `provider`).
pub const SYNC_RUNS_TOTAL: &str = "tokenwarden_sync_runs_total";
/// When a feature last synced successfully.
pub const SYNC_LAST_SUCCESS: &str = "tokenwarden_sync_last_success_timestamp_seconds";
/// Records in a feature's last successful sync.
pub const SYNC_RECORDS: &str = "tokenwarden_sync_records";
/// One feature's sync run (fetch and store), by `feature`.
pub const SYNC_DURATION: &str = "tokenwarden_sync_duration_seconds";

/// `result` label values of [`TOKEN_REFRESH_TOTAL`].
pub mod result {
    pub const SUCCESS: &str = "success";
    pub const TRANSIENT_ERROR: &str = "transient_error";
    pub const REAUTH_REQUIRED: &str = "reauth_required";
    pub const CONFLICT: &str = "conflict";
    /// Another replica held the lock.
    pub const LOCKED: &str = "locked";
    /// Redis failed during the attempt.
    pub const REDIS_ERROR: &str = "redis_error";
    /// Skipped under the lock: someone else had already refreshed.
    pub const SKIPPED: &str = "skipped";
    /// Answered, but Redis did not confirm the write-back: the answer is held (journal).
    pub const UNCONFIRMED: &str = "unconfirmed";
    /// A rotating refresh not started because the journal cannot be written.
    pub const JOURNAL_UNAVAILABLE: &str = "journal_unavailable";
    /// The lock key has the wrong Redis type: no attempt can take it.
    pub const LOCK_STUCK: &str = "lock_stuck";
    /// The refresh token was refused; one attempt with the fallback grant follows.
    pub const FALLBACK: &str = "fallback";
    /// The provider's token budget had no slot: nothing sent, a later slot reserved.
    pub const THROTTLED: &str = "throttled";
}

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SCAN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

const SYNC_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0,
];

/// Installs the global recorder (once per process) and returns the handle to render it.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = builder()
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "histogram buckets rejected; using defaults");
                    PrometheusBuilder::new()
                })
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    let mut b = PrometheusBuilder::new();
    for name in [
        TOKEN_REFRESH_DURATION,
        PROVIDER_HEALTH_CHECK_DURATION,
        SCHEDULE_LATENESS,
    ] {
        b = b.set_buckets_for_metric(Matcher::Full(name.into()), DURATION_BUCKETS)?;
    }
    b = b.set_buckets_for_metric(Matcher::Full(SYNC_DURATION.into()), SYNC_BUCKETS)?;
    b.set_buckets_for_metric(Matcher::Full(REGISTRY_SCAN_DURATION.into()), SCAN_BUCKETS)
}

fn describe() {
    describe_counter!(
        TOKEN_REFRESH_TOTAL,
        "Token refresh attempts by provider name and result (success, transient_error, reauth_required, conflict, locked, redis_error, skipped, lock_stuck)."
    );
    describe_histogram!(
        TOKEN_REFRESH_DURATION,
        Unit::Seconds,
        "Token endpoint round trip, by provider name."
    );
    describe_histogram!(
        REGISTRY_SCAN_DURATION,
        Unit::Seconds,
        "Registry scans (kind=full|light|targeted)."
    );
    describe_counter!(
        STALE_WRITES_TOTAL,
        "Records found back on a refresh token already replaced (a stale whole-record write), by provider name."
    );
    describe_counter!(
        REGISTRY_ECHOES_SKIPPED,
        "Change events for a record caused by this replica's own write-back, not re-read."
    );
    describe_counter!(
        REGISTRY_INVALID_RECORDS,
        "Provider records found malformed, by reason."
    );
    describe_counter!(
        PROVIDER_API_CALLS,
        "Calls to providers by provider name, call (token, probe, sync) and HTTP status (or error)."
    );
    describe_counter!(
        HEALTH_PROBES_DEFERRED,
        "Health probes not sent because the provider's API budget (catalog api_budget) had no slot free, by provider name."
    );
    describe_counter!(
        REDIS_WAIT_SHORTFALL,
        "Write-backs whose WAIT was confirmed by fewer replicas than redis.wait_replicas in redis.wait_timeout_ms."
    );
    describe_counter!(
        REDIS_MASTER_CHANGES,
        "Master changes (Sentinel failovers) followed."
    );
    describe_counter!(
        JOURNAL_REAPPLIED,
        "Kept journal entries replayed after a master change, by result (written: the write had been lost)."
    );
    describe_counter!(
        SYNC_RUNS_TOTAL,
        "Sync runs of one feature of one provider, by feature and result (success, malformed, unauthorized, rate_limited, too_large, lock_lost, token_unavailable, ...)."
    );
    metrics::describe_gauge!(
        SYNC_LAST_SUCCESS,
        Unit::Seconds,
        "When a feature of a provider last synced successfully (Unix time)."
    );
    metrics::describe_gauge!(
        SYNC_RECORDS,
        "Records stored by a feature's last successful sync."
    );
    describe_histogram!(
        SYNC_DURATION,
        Unit::Seconds,
        "One feature's sync run (all pages, and the replace), by feature."
    );
    describe_histogram!(
        SCHEDULE_LATENESS,
        Unit::Seconds,
        "Actual minus planned start of a refresh (queueing for a refresh slot included)."
    );
}

/// Counts one call to a provider (`call` = `token`, `probe`, `sync`) by HTTP status, or
/// `error` when no answer came.
pub fn provider_api_call(provider: &str, call: &'static str, status: Option<u16>) {
    let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
    metrics::counter!(
        PROVIDER_API_CALLS,
        "provider" => provider.to_string(),
        "call" => call,
        "status" => status
    )
    .increment(1);
}

/// One gauge's header.
fn header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Scrape-time inputs that are not in the fleet.
pub struct ScrapeState {
    pub redis_up: bool,
    pub per_provider_series: bool,
    pub max_provider_series: usize,
    pub failing_after: u32,
    pub queue_len: usize,
    /// Rotated tokens held in the local journal, not yet confirmed in Redis.
    pub journal_pending: usize,
    /// Live replicas seen in the heartbeats (this one included).
    pub replicas: usize,
    /// `registry_expiring_providers` counts active tokens expiring within this.
    pub expiring_window_secs: i64,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// Renders the state gauges of `fleet` (appended to the recorder's output by the caller).
pub fn render_state(out: &mut String, fleet: &Fleet, s: &ScrapeState) {
    header(
        out,
        BUILD_INFO,
        "Always 1; the version label says which build runs.",
    );
    let _ = writeln!(
        out,
        "{BUILD_INFO}{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    header(out, REDIS_UP, "1 while Redis answers this replica.");
    let _ = writeln!(out, "{REDIS_UP} {}", u8::from(s.redis_up));
    header(
        out,
        REFRESH_QUEUE,
        "Tokens due and waiting for a refresh slot.",
    );
    let _ = writeln!(out, "{REFRESH_QUEUE} {}", s.queue_len);
    header(
        out,
        REGISTRY_PROVIDERS,
        "Tracked providers by health state, as this replica last read the registry.",
    );
    for (state, n) in fleet.count_by_state(s.failing_after) {
        let _ = writeln!(
            out,
            "{REGISTRY_PROVIDERS}{{state=\"{}\"}} {n}",
            state.as_str()
        );
    }
    header(
        out,
        JOURNAL_PENDING,
        "Rotated tokens held in the local journal, not yet confirmed in Redis.",
    );
    let _ = writeln!(out, "{JOURNAL_PENDING} {}", s.journal_pending);
    header(
        out,
        OWNED_PROVIDERS,
        "Providers this replica is responsible for.",
    );
    let _ = writeln!(out, "{OWNED_PROVIDERS} {}", fleet.providers.len());
    header(
        out,
        REPLICAS,
        "Live replicas this replica sees, itself included.",
    );
    let _ = writeln!(out, "{REPLICAS} {}", s.replicas.max(1));
    let horizon = s.now + chrono::TimeDelta::seconds(s.expiring_window_secs);
    let expiring = fleet
        .providers
        .values()
        .filter(|t| t.verdict == crate::fleet::Verdict::Active)
        .filter(|t| t.token_expiry.is_some_and(|e| e <= horizon))
        .count();
    header(
        out,
        REGISTRY_EXPIRING,
        "Active providers whose access token expires within the configured alert window (or has expired).",
    );
    let _ = writeln!(out, "{REGISTRY_EXPIRING} {expiring}");
    if !s.per_provider_series {
        return;
    }
    let cap = if s.max_provider_series == 0 {
        usize::MAX
    } else {
        s.max_provider_series
    };
    let mut expiry = String::new();
    let mut next = String::new();
    let mut rt_expiry = String::new();
    let mut reauth = String::new();
    let mut up = String::new();
    let mut last_ok = String::new();
    let mut credential = String::new();
    let mut failures = String::new();
    for (id, t) in fleet.providers.iter().take(cap) {
        let labels = format!(
            "tenant=\"{}\",provider=\"{}\"",
            escape(&id.tenant),
            escape(&id.provider)
        );
        let state = t.state(s.failing_after);
        if matches!(state, HealthState::Inactive | HealthState::InvalidRecord) {
            continue;
        }
        if let Some(e) = t.token_expiry {
            let _ = writeln!(expiry, "{TOKEN_EXPIRY}{{{labels}}} {}", e.timestamp());
        }
        if let Some(n) = t.next_refresh {
            let _ = writeln!(next, "{TOKEN_NEXT_REFRESH}{{{labels}}} {}", n.timestamp());
        }
        if let Some(r) = t.refresh_token_expiry {
            let _ = writeln!(
                rt_expiry,
                "{REFRESH_TOKEN_EXPIRY}{{{labels}}} {}",
                r.timestamp()
            );
        }
        let _ = writeln!(
            reauth,
            "{PROVIDER_REAUTH_REQUIRED}{{{labels}}} {}",
            u8::from(state == HealthState::ReauthRequired)
        );
        if let Some(u) = t.up {
            let _ = writeln!(up, "{PROVIDER_UP}{{{labels}}} {}", u8::from(u));
        }
        for c in &t.credential_expiry {
            let _ = writeln!(
                credential,
                "{CREDENTIAL_EXPIRY}{{{labels},credential=\"{}\"}} {}",
                c.credential,
                c.at.timestamp()
            );
        }
        let _ = writeln!(
            failures,
            "{PROVIDER_FAILURES}{{{labels}}} {}",
            t.consecutive_failures
        );
        if let Some(l) = t.last_success {
            let _ = writeln!(
                last_ok,
                "{TOKEN_LAST_SUCCESS}{{{labels}}} {}",
                l.timestamp()
            );
        }
    }
    header(
        out,
        TOKEN_EXPIRY,
        "When the current access token expires (Unix time).",
    );
    out.push_str(&expiry);
    header(
        out,
        TOKEN_NEXT_REFRESH,
        "When the next refresh is scheduled (Unix time).",
    );
    out.push_str(&next);
    header(
        out,
        REFRESH_TOKEN_EXPIRY,
        "When the refresh token itself dies, where the provider says (Unix time).",
    );
    out.push_str(&rt_expiry);
    header(
        out,
        PROVIDER_REAUTH_REQUIRED,
        "1 while a human must re-authorise the provider.",
    );
    out.push_str(&reauth);
    header(
        out,
        PROVIDER_UP,
        "1 when the last health check of the provider succeeded.",
    );
    out.push_str(&up);
    header(
        out,
        TOKEN_LAST_SUCCESS,
        "When this provider's token was last refreshed successfully (Unix time); retries do not move it.",
    );
    out.push_str(&last_ok);
    header(
        out,
        CREDENTIAL_EXPIRY,
        "When a credential a human must renew expires (credential=client_secret|certificate; Unix time).",
    );
    out.push_str(&credential);
    header(
        out,
        PROVIDER_FAILURES,
        "Consecutive failed refreshes of the provider (0 after a success).",
    );
    out.push_str(&failures);
}
