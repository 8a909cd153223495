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
pub const REDIS_UP: &str = "tokenwarden_redis_up";
pub const BUILD_INFO: &str = "tokenwarden_build_info";
/// Added by tokenwarden (not in SPEC 5): how late a refresh started after its deadline.
pub const SCHEDULE_LATENESS: &str = "tokenwarden_schedule_lateness_seconds";
/// Added: tokens waiting for a refresh slot right now.
pub const REFRESH_QUEUE: &str = "tokenwarden_refresh_queue";

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
}

const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const SCAN_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
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
    b.set_buckets_for_metric(Matcher::Full(REGISTRY_SCAN_DURATION.into()), SCAN_BUCKETS)
}

fn describe() {
    describe_counter!(
        TOKEN_REFRESH_TOTAL,
        "Token refresh attempts by provider name and result (success, transient_error, reauth_required, conflict, locked, redis_error, skipped)."
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
        REGISTRY_INVALID_RECORDS,
        "Provider records found malformed, by reason."
    );
    describe_histogram!(
        SCHEDULE_LATENESS,
        Unit::Seconds,
        "Actual minus planned start of a refresh (queueing for a refresh slot included)."
    );
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
}
