//! Fetching one feature of one provider: every page in the endpoint's pagination style,
//! each item filtered and normalised, with caps against runaway pagination.
//!
//! - Styles ([`Pagination`]): GoTo `pageSize`/`pageMarker` → `nextPageMarker`; Graph `$top`
//!   → `@odata.nextLink` followed verbatim; RingCentral `page`/`perPage` →
//!   `navigation.nextPage.uri`; Zoom `page_size` → `next_page_token`. A next link must stay
//!   on the API's origin (the bearer token goes with it) and never repeat.
//! - 429 and 5xx, timeouts and connection errors are retried up to `sync.max_retries`
//!   times, after `Retry-After` (seconds or a date, capped) or an exponential backoff with
//!   jitter. Each provider's requests keep the catalog's `min_interval_ms` apart.
//! - A 401 asks the token engine for a refresh ([`Token::refresh`]) and retries, once per
//!   provider and run; the refresh goes through the engine (its lock, journal and slots),
//!   never around it.
//! - Caps: page size (the smaller of `sync.page_size` and the endpoint's), pages, records,
//!   bytes per page. Unknown fields are ignored; an answer that is not JSON or lacks the
//!   items array fails the feature (nothing is written for it).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reqwest::Url;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::adapters::Adapter;
use super::endpoints::{Endpoint, Pagination};
use super::model::{Feature, Record};
use crate::secret::Secret;
use crate::telemetry::metrics as m;

/// Why a feature's fetch failed; [`FetchError::label`] is the `result` label.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unauthorized (401) after one refresh")]
    Unauthorized,
    #[error("no usable access token: {0}")]
    TokenUnavailable(String),
    #[error("rate limited: retries exhausted")]
    RateLimited,
    #[error("HTTP {0}")]
    Status(u16),
    #[error("transport: {0}")]
    Transport(String),
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("more than {0} pages")]
    TooManyPages(u32),
    #[error("more than {0} records")]
    TooManyRecords(usize),
    #[error("next page link leaves the API origin or repeats")]
    BadNextLink,
    #[error("bad endpoint URL: {0}")]
    BadUrl(String),
    #[error("stopped: {0}")]
    Stopped(&'static str),
}

impl FetchError {
    pub fn label(&self) -> &'static str {
        match self {
            FetchError::Unauthorized => "unauthorized",
            FetchError::TokenUnavailable(_) => "token_unavailable",
            FetchError::RateLimited => "rate_limited",
            FetchError::Status(_) => "http_error",
            FetchError::Transport(_) => "transport_error",
            FetchError::Malformed(_) => "malformed",
            FetchError::TooManyPages(_) | FetchError::TooManyRecords(_) => "too_large",
            FetchError::BadNextLink => "bad_next_link",
            FetchError::BadUrl(_) => "bad_url",
            FetchError::Stopped(_) => "stopped",
        }
    }
}

/// Caps and retry settings (from `[sync]`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub page_size: u32,
    pub max_pages: u32,
    pub max_records: usize,
    pub max_page_bytes: usize,
    pub max_retries: u32,
    pub retry_base: Duration,
    pub retry_after_max: Duration,
}

/// How the provider's token is refreshed (the engine, in the daemon and the CLI alike).
pub type RefreshFn =
    Arc<dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Secret, String>> + Send + Sync>;

/// The provider's access token for one run, shared by its features: a 401 refreshes it
/// once, and the features that saw the old token use the new one.
pub struct Token {
    state: Mutex<(Secret, u64, bool)>,
    refresh: RefreshFn,
}

impl Token {
    pub fn new(token: Secret, refresh: RefreshFn) -> Token {
        Token {
            state: Mutex::new((token, 0, false)),
            refresh,
        }
    }

    async fn current(&self) -> (Secret, u64) {
        let s = self.state.lock().await;
        (s.0.clone(), s.1)
    }

    /// After a 401 with token generation `seen`: a newer token if some feature already got
    /// one, else one refresh (the first time in this run), else [`FetchError::Unauthorized`].
    async fn refresh(&self, seen: u64) -> Result<(), FetchError> {
        let mut s = self.state.lock().await;
        if s.1 != seen {
            return Ok(());
        }
        if s.2 {
            return Err(FetchError::Unauthorized);
        }
        s.2 = true;
        let fresh = (self.refresh)()
            .await
            .map_err(FetchError::TokenUnavailable)?;
        s.0 = fresh;
        s.1 += 1;
        Ok(())
    }
}

/// Keeps one provider's requests `min_interval` apart (its API budget).
pub struct Pacer {
    next: Mutex<tokio::time::Instant>,
    min_interval: Duration,
}

impl Pacer {
    pub fn new(min_interval: Duration) -> Pacer {
        Pacer {
            next: Mutex::new(tokio::time::Instant::now()),
            min_interval,
        }
    }

    async fn wait(&self) {
        if self.min_interval.is_zero() {
            return;
        }
        let at = {
            let mut next = self.next.lock().await;
            let now = tokio::time::Instant::now();
            let at = (*next).max(now);
            *next = at + self.min_interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Everything one feature's fetch needs.
pub struct Job<'a> {
    pub http: &'a reqwest::Client,
    pub provider: &'a str,
    pub feature: Feature,
    pub endpoint: &'a Endpoint,
    pub api_base_url: &'a str,
    pub account_key: &'a str,
    pub adapter: Adapter,
    pub token: &'a Token,
    pub pacer: &'a Pacer,
    pub limits: &'a Limits,
    /// Shutdown or a lost lock: stop between requests.
    pub stop: &'a CancellationToken,
}

/// What a successful fetch found.
#[derive(Debug, Default)]
pub struct Fetched {
    pub records: Vec<Record>,
    pub pages: u32,
    /// Items dropped: not objects, no id, or not for this feature.
    pub skipped: usize,
}

fn first_url(job: &Job<'_>) -> Result<Url, FetchError> {
    let base = job.api_base_url.trim().trim_end_matches('/');
    let mut url = Url::parse(&format!("{base}{}", job.endpoint.path))
        .map_err(|e| FetchError::BadUrl(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(FetchError::BadUrl("not http(s)".into()));
    }
    let size = job
        .limits
        .page_size
        .min(job.endpoint.max_page_size.unwrap_or(u32::MAX))
        .max(1)
        .to_string();
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in &job.endpoint.query {
            q.append_pair(k, &v.replace("{account_key}", job.account_key));
        }
        match job.endpoint.pagination {
            Pagination::Goto => {
                q.append_pair("pageSize", &size);
            }
            Pagination::Graph => {
                q.append_pair("$top", &size);
            }
            Pagination::Ringcentral => {
                q.append_pair("page", "1");
                q.append_pair("perPage", &size);
            }
            Pagination::Zoom => {
                q.append_pair("page_size", &size);
            }
            Pagination::None => {}
        }
    }
    Ok(url)
}

fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// The next page's URL, from the answer.
fn next_url(job: &Job<'_>, first: &Url, body: &Value) -> Result<Option<Url>, FetchError> {
    let non_empty = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let with = |k: &str, v: &str| {
        let mut u = first.clone();
        u.query_pairs_mut().append_pair(k, v);
        u
    };
    let link = |s: String| {
        let u = Url::parse(&s)
            .or_else(|_| first.join(&s))
            .map_err(|_| FetchError::BadNextLink)?;
        if same_origin(&u, first) {
            Ok(Some(u))
        } else {
            Err(FetchError::BadNextLink)
        }
    };
    match job.endpoint.pagination {
        Pagination::Goto => {
            Ok(non_empty(body.get("nextPageMarker")).map(|m| with("pageMarker", &m)))
        }
        Pagination::Zoom => {
            Ok(non_empty(body.get("next_page_token")).map(|t| with("next_page_token", &t)))
        }
        Pagination::Graph => non_empty(body.get("@odata.nextLink")).map_or(Ok(None), link),
        Pagination::Ringcentral => non_empty(
            body.get("navigation")
                .and_then(|n| n.get("nextPage"))
                .and_then(|n| n.get("uri")),
        )
        .map_or(Ok(None), link),
        Pagination::None => Ok(None),
    }
}

fn matches_filter(job: &Job<'_>, item: &Value) -> bool {
    job.endpoint
        .filter
        .iter()
        .all(|(k, want)| super::adapters::text(item, k).is_some_and(|v| v == *want))
}

/// Every page of the feature.
pub async fn fetch(job: &Job<'_>) -> Result<Fetched, FetchError> {
    let first = first_url(job)?;
    let mut url = first.clone();
    let mut seen: HashSet<String> = HashSet::new();
    let mut out = Fetched::default();
    loop {
        if job.stop.is_cancelled() {
            return Err(FetchError::Stopped("shutdown or lock lost"));
        }
        if out.pages >= job.limits.max_pages {
            return Err(FetchError::TooManyPages(job.limits.max_pages));
        }
        if !seen.insert(url.as_str().to_string()) {
            return Err(FetchError::BadNextLink);
        }
        let body = get_page(job, &url).await?;
        out.pages += 1;
        let items = body
            .get(&job.endpoint.items)
            .and_then(Value::as_array)
            .ok_or_else(|| FetchError::Malformed(format!("no {:?} array", job.endpoint.items)))?;
        for item in items {
            if !item.is_object() {
                out.skipped += 1;
                continue;
            }
            if !matches_filter(job, item) {
                continue;
            }
            match (job.adapter)(job.feature, job.provider, item) {
                Some(r) => out.records.push(r),
                None => out.skipped += 1,
            }
            if out.records.len() > job.limits.max_records {
                return Err(FetchError::TooManyRecords(job.limits.max_records));
            }
        }
        match next_url(job, &first, &body)? {
            Some(next) => url = next,
            None => return Ok(out),
        }
    }
}

fn count(provider: &str, status: &str) {
    metrics::counter!(m::PROVIDER_API_CALLS, "provider" => provider.to_string(), "call" => "sync", "status" => status.to_string())
        .increment(1);
}

/// One page, with retries; the answer as JSON.
async fn get_page(job: &Job<'_>, url: &Url) -> Result<Value, FetchError> {
    let mut attempt: u32 = 0;
    loop {
        job.pacer.wait().await;
        let (token, generation) = job.token.current().await;
        let sent = tokio::select! {
            _ = job.stop.cancelled() => return Err(FetchError::Stopped("shutdown or lock lost")),
            r = job.http.get(url.clone()).bearer_auth(token.expose()).header("Accept", "application/json").send() => r,
        };
        let wait = match sent {
            Ok(resp) => {
                let status = resp.status();
                count(job.provider, status.as_str());
                if status.is_success() {
                    let bytes = read_capped(resp, job.limits.max_page_bytes).await?;
                    return serde_json::from_slice(&bytes).map_err(|e| {
                        FetchError::Malformed(format!(
                            "not JSON: line {} column {}",
                            e.line(),
                            e.column()
                        ))
                    });
                }
                if status.as_u16() == 401 {
                    job.token.refresh(generation).await?;
                    continue;
                }
                if status.as_u16() != 429 && !status.is_server_error() {
                    return Err(FetchError::Status(status.as_u16()));
                }
                if attempt >= job.limits.max_retries {
                    return Err(if status.as_u16() == 429 {
                        FetchError::RateLimited
                    } else {
                        FetchError::Status(status.as_u16())
                    });
                }
                resp.headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| crate::retry::parse_retry_after(v, Utc::now()))
                    .map(|d| d.min(job.limits.retry_after_max))
            }
            Err(e) => {
                count(job.provider, "error");
                if attempt >= job.limits.max_retries {
                    return Err(FetchError::Transport(transport_detail(&e)));
                }
                None
            }
        };
        let delay = wait.unwrap_or_else(|| backoff(job.limits, attempt));
        attempt += 1;
        tokio::select! {
            _ = job.stop.cancelled() => return Err(FetchError::Stopped("shutdown or lock lost")),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

fn backoff(limits: &Limits, attempt: u32) -> Duration {
    let exp = limits
        .retry_base
        .saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let capped = exp.min(limits.retry_after_max.max(limits.retry_base));
    // Full jitter in [capped/2, capped].
    let half = capped / 2;
    half + half.mul_f64(fastrand::f64())
}

/// A transport error without the URL (it may carry the account key).
fn transport_detail(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connection failed".into()
    } else {
        "request failed".into()
    }
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, FetchError> {
    let mut out = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if out.len().saturating_add(c.len()) > cap {
                    return Err(FetchError::Malformed(format!(
                        "page larger than {cap} bytes"
                    )));
                }
                out.extend_from_slice(&c);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err(FetchError::Transport(transport_detail(&e))),
        }
    }
}
