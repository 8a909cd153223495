//! The token client: one interface for every grant, over one shared `reqwest::Client`.
//!
//! [`TokenClient::request`] builds the form from the grant ([`super::grant`]), adds the
//! client authentication ([`super::auth`]) and posts it through [`CapturingHttp`], which
//! records what the answer was: the status, `Retry-After` and a capped body. Answers are
//! parsed with `oauth2`'s token and error types; every answer becomes a [`TokenGrant`] or a
//! classified [`TokenError`]: the retry decision lives in [`TokenError::is_permanent`].
//!
//! Provider text never carries a secret onwards: every error is scrubbed
//! ([`TokenError::scrub`]) of every secret the request knows ([`TokenRequest::secrets`]: the
//! client secret, both tokens, a token URL's password), also in their form-urlencoded and
//! HTTP Basic (base64) spellings, before it is stored, logged or printed.
//!
//! Userinfo in a token URL (`https://id:secret@host/token`, percent-encoded as URLs are) is
//! taken as the client credentials for that endpoint: it is removed from the URL before any
//! request or log, and sent with HTTP Basic (RFC 6749 2.3.1), in place of the record's
//! `client_id`/`client_secret` and `token_auth_method` ([`split_userinfo`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use chrono::Utc;
use oauth2::basic::{BasicErrorResponse, BasicTokenType};
use oauth2::{
    AsyncHttpClient, ExtraTokenFields, HttpRequest, HttpResponse, RequestTokenError,
    StandardTokenResponse, TokenResponse,
};
use serde::{Deserialize, Serialize};

use super::auth::{self, Outgoing};
use super::grant;
use crate::catalog::{AuthMethod, TokenEndpoint};
use crate::registry::record::Credentials;
use crate::retry::parse_retry_after;
use crate::secret::Secret;

/// Provider-specific fields of a token answer that tokenwarden uses.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Extra {
    /// RingCentral: lifetime of the new refresh token, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token_expires_in: Option<u64>,
}
impl ExtraTokenFields for Extra {}

type TokenAnswer = StandardTokenResponse<Extra, BasicTokenType>;
/// What a token call needs. Credentials stay in [`Secret`]s.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// The provider name, for `provider_api_calls_total`.
    pub provider: &'a str,
    pub endpoint: &'a TokenEndpoint,
    pub client_id: &'a str,
    pub client_secret: &'a Secret,
    pub refresh_token: &'a Secret,
    /// The record's current access token: never sent, only scrubbed from provider text.
    pub access_token: &'a Secret,
    pub account_key: &'a str,
    /// The record's scopes (the catalog's `{scopes}`).
    pub scopes: &'a [String],
    /// The other grants' credentials (JWT, personal access token, certificate key).
    pub credentials: &'a Credentials,
}

impl TokenRequest<'_> {
    /// Every secret of this request, as scrubbed from provider text. (No grant in the
    /// catalog sends a client assertion; one that does adds it here.)
    pub fn secrets(&self) -> Vec<String> {
        let mut out = vec![
            self.client_secret.expose().to_string(),
            self.refresh_token.expose().to_string(),
            self.access_token.expose().to_string(),
        ];
        if let Some((_, Some((_, password)))) = split_userinfo(&self.endpoint.token_url) {
            out.push(password.expose().to_string());
        }
        let basic = |id: &str, secret: &str| {
            let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
            base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
        };
        out.push(basic(self.client_id, self.client_secret.expose()));
        out
    }
}

/// A token URL without its userinfo, and the userinfo (percent-decoded) when it had one.
/// `None` when it is not a URL.
pub fn split_userinfo(token_url: &str) -> Option<(String, Option<(String, Secret)>)> {
    let mut url = reqwest::Url::parse(token_url).ok()?;
    if url.username().is_empty() && url.password().is_none() {
        return Some((token_url.to_string(), None));
    }
    let user = percent_decode(url.username());
    let password = Secret::new(percent_decode(url.password().unwrap_or("")));
    url.set_username("").ok()?;
    url.set_password(None).ok()?;
    Some((url.to_string(), Some((user, password))))
}

/// `%XX` decoding of a URL component (invalid sequences are kept as written).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A successful token answer.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub access_token: Secret,
    /// `None`: the provider returned none (keep the old one).
    pub refresh_token: Option<Secret>,
    pub expires_in: Option<Duration>,
    pub refresh_token_expires_in: Option<Duration>,
    /// Round trip of the token call.
    pub elapsed: Duration,
    /// The HTTP status of the answer.
    pub status: u16,
}

/// Why a transient failure happened (the `result` detail and log word).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransientKind {
    RateLimited,
    ServerError,
    Timeout,
    Connect,
    BadResponse,
}

impl TransientKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransientKind::RateLimited => "rate_limited",
            TransientKind::ServerError => "server_error",
            TransientKind::Timeout => "timeout",
            TransientKind::Connect => "connect_error",
            TransientKind::BadResponse => "bad_response",
        }
    }
}

/// A failed token call, classified.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// Needs a human (RFC 6749 `invalid_grant`, `invalid_client`, ...): `code` is the health
    /// reason (`invalid_grant`, `client_secret_expired`, ...).
    #[error("{code} (HTTP {status}){}", detail_suffix(.detail))]
    Permanent {
        code: String,
        status: u16,
        detail: String,
    },
    /// Worth retrying later; `retry_after` from the provider when it said so.
    #[error("{} ({}){}", .kind.as_str(), status_text(*.status), detail_suffix(.detail))]
    Transient {
        kind: TransientKind,
        status: Option<u16>,
        retry_after: Option<Duration>,
        detail: String,
        /// The request may have reached the provider and still be processed there.
        maybe_in_flight: bool,
    },
}

fn detail_suffix(d: &str) -> String {
    if d.is_empty() {
        String::new()
    } else {
        format!(": {d}")
    }
}

fn status_text(s: Option<u16>) -> String {
    s.map_or_else(|| "no answer".to_string(), |s| format!("HTTP {s}"))
}

impl TokenError {
    /// The retry predicate: permanent errors are never retried until the record changes.
    pub fn is_permanent(&self) -> bool {
        matches!(self, TokenError::Permanent { .. })
    }

    /// Cuts the provider text to `max` characters (after [`TokenError::scrub`]).
    pub fn shorten(&mut self, max: usize) {
        let cut = |text: &mut String| {
            if let Some((at, _)) = text.char_indices().nth(max) {
                text.truncate(at);
            }
        };
        match self {
            TokenError::Permanent { code, detail, .. } => {
                cut(code);
                cut(detail);
            }
            TokenError::Transient { detail, .. } => cut(detail),
        }
    }

    /// Replaces every occurrence of the given secrets (those of 8 characters or more), and
    /// of their form-urlencoded spelling, in the provider's text with `[redacted]`.
    pub fn scrub<S: AsRef<str>>(&mut self, secrets: &[S]) {
        let mut all: Vec<String> = Vec::new();
        for s in secrets.iter().map(AsRef::as_ref).filter(|s| s.len() >= 8) {
            all.push(s.to_string());
            let encoded: String = form_urlencoded::byte_serialize(s.as_bytes()).collect();
            if encoded != s {
                all.push(encoded);
            }
        }
        // Longest first: a secret that contains another is removed whole.
        all.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let clean = |text: &mut String| {
            for s in &all {
                if text.contains(s.as_str()) {
                    *text = text.replace(s.as_str(), "[redacted]");
                }
            }
        };
        match self {
            TokenError::Permanent { code, detail, .. } => {
                clean(code);
                clean(detail);
            }
            TokenError::Transient { detail, .. } => clean(detail),
        }
    }
}

/// A number of seconds from a token answer: an integer, a float, or a string of digits
/// (Azure v1). Zero, negative or unreadable: `None`.
fn seconds_of(v: Option<&serde_json::Value>) -> Option<Duration> {
    let v = v?;
    let secs = match v {
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(u) => return (u > 0).then(|| Duration::from_secs(u)),
            None => n.as_f64()?,
        },
        serde_json::Value::String(s) => {
            let t = s.trim();
            if let Ok(u) = t.parse::<u64>() {
                return (u > 0).then(|| Duration::from_secs(u));
            }
            t.parse::<f64>().ok()?
        }
        _ => return None,
    };
    if !secs.is_finite() || secs < 1.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

/// A successful (2xx) answer read leniently.
fn grant_from_body(body: &[u8], elapsed: Duration) -> Result<TokenGrant, TokenError> {
    let bad = |detail: &str| TokenError::Transient {
        kind: TransientKind::BadResponse,
        status: Some(200),
        retry_after: None,
        detail: detail.to_string(),
        // The provider answered: it may have rotated the refresh token.
        maybe_in_flight: true,
    };
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| bad("token answer is not JSON"))?;
    let obj = v
        .as_object()
        .ok_or_else(|| bad("token answer is not a JSON object"))?;
    let access = obj
        .get("access_token")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad("token answer has no access_token"))?;
    Ok(TokenGrant {
        access_token: Secret::new(access),
        refresh_token: obj
            .get("refresh_token")
            .and_then(serde_json::Value::as_str)
            .filter(|r| !r.is_empty())
            .map(Secret::new),
        expires_in: seconds_of(obj.get("expires_in")),
        refresh_token_expires_in: seconds_of(obj.get("refresh_token_expires_in")),
        elapsed,
        status: 200,
    })
}

/// RFC 6749 error codes that need a human.
const PERMANENT_CODES: [&str; 4] = [
    "invalid_grant",
    "invalid_client",
    "unauthorized_client",
    "access_denied",
];

/// What the HTTP layer saw of the last answer.
#[derive(Debug, Clone, Default)]
struct Seen {
    status: Option<u16>,
    retry_after: Option<String>,
    body: Vec<u8>,
}

/// Transport failures of [`CapturingHttp`].
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("timed out")]
    Timeout,
    #[error("connection failed")]
    Connect,
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    #[error("request failed: {0}")]
    Other(String),
}

/// `oauth2`'s HTTP client: the shared `reqwest::Client`, recording status, `Retry-After`
/// and the (capped) body of the answer for classification.
pub struct CapturingHttp<'a> {
    http: &'a reqwest::Client,
    max_body: usize,
    seen: Mutex<Seen>,
}

impl<'a> CapturingHttp<'a> {
    fn new(http: &'a reqwest::Client, max_body: usize) -> Self {
        CapturingHttp {
            http,
            max_body,
            seen: Mutex::new(Seen::default()),
        }
    }

    fn seen(&self) -> Seen {
        self.seen
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    async fn execute(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let req = reqwest::Request::try_from(request)
            .map_err(|e| HttpError::Other(e.without_url().to_string()))?;
        let mut resp = self.http.execute(req).await.map_err(classify_reqwest)?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(classify_reqwest)? {
            if body.len() + chunk.len() > self.max_body {
                return Err(HttpError::TooLarge(self.max_body));
            }
            body.extend_from_slice(&chunk);
        }
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Seen {
                status: Some(status.as_u16()),
                retry_after,
                body: body.clone(),
            };
        }
        let mut out = http::Response::builder().status(status);
        if let Some(h) = out.headers_mut() {
            *h = headers;
        }
        out.body(body).map_err(|e| HttpError::Other(e.to_string()))
    }
}

fn classify_reqwest(e: reqwest::Error) -> HttpError {
    if e.is_timeout() {
        HttpError::Timeout
    } else if e.is_connect() {
        HttpError::Connect
    } else {
        HttpError::Other(e.without_url().to_string())
    }
}

impl<'c> AsyncHttpClient<'c> for CapturingHttp<'_> {
    type Error = HttpError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, HttpError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(self.execute(request))
    }
}

/// The token client shared by all refreshes.
#[derive(Clone)]
pub struct TokenClient {
    http: reqwest::Client,
    max_body: usize,
}

impl TokenClient {
    /// Builds the shared HTTP client: timeouts on every call, no redirects (a token endpoint
    /// that redirects is misconfigured), proxies from the environment, extra CAs.
    pub fn new(
        timeout: Duration,
        connect_timeout: Duration,
        ca_pem: Option<&[u8]>,
        max_body: usize,
    ) -> Result<TokenClient, String> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("tokenwarden/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("refresh.ca_file: {e}"))?;
            if certs.is_empty() {
                return Err("refresh.ca_file holds no certificate".into());
            }
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let http = b.build().map_err(|e| format!("HTTP client: {e}"))?;
        Ok(TokenClient { http, max_body })
    }

    /// The shared `reqwest::Client` (health probes and sync use it too).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Performs one token call: the grant's form ([`super::grant`]) with the client's
    /// authentication ([`super::auth`]), posted through [`CapturingHttp`].
    pub async fn request(&self, req: TokenRequest<'_>) -> Result<TokenGrant, TokenError> {
        let secrets = req.secrets();
        let (url, userinfo) =
            split_userinfo(&req.endpoint.token_url).ok_or_else(|| TokenError::Transient {
                kind: TransientKind::BadResponse,
                status: None,
                retry_after: None,
                detail: "token_url is not a URL".into(),
                maybe_in_flight: false,
            })?;
        // Userinfo in the URL: the client credentials, sent with HTTP Basic; the URL that is
        // requested (and could be logged by the HTTP stack) has none.
        let endpoint;
        let client_id;
        let client_secret;
        let req = match &userinfo {
            None => req,
            Some((user, password)) => {
                endpoint = TokenEndpoint {
                    token_url: url,
                    auth: AuthMethod::Basic,
                    ..req.endpoint.clone()
                };
                client_id = user.clone();
                client_secret = password.clone();
                TokenRequest {
                    endpoint: &endpoint,
                    client_id: &client_id,
                    client_secret: &client_secret,
                    ..req
                }
            }
        };
        let capture = CapturingHttp::new(&self.http, self.max_body);
        let started = Instant::now();
        let mut out = Outgoing {
            form: grant::fields(&req),
            ..Outgoing::default()
        };
        let mut secrets = secrets;
        secrets.extend(req.secrets());
        secrets.push(req.credentials.jwt_assertion.expose().to_string());
        secrets.push(req.credentials.personal_access_token.expose().to_string());
        let result = match auth::of(req.endpoint.auth).apply(&req, &mut out) {
            Ok(()) => {
                secrets.extend(out.made_secrets.iter().map(|s| s.expose().to_string()));
                self.post(&capture, &req, &out).await
            }
            Err(e) => {
                return Err(TokenError::Permanent {
                    code: e.code.to_string(),
                    status: 0,
                    detail: e.detail,
                })
            }
        };
        let elapsed = started.elapsed();
        let seen = capture.seen();
        let outcome = match result {
            // The body is read leniently (expires_in as a string of digits or a float, huge
            // values): a 200 answer carries a refresh token that must not be lost to a
            // stricter parser.
            _ if seen.status.is_some_and(|s| (200..300).contains(&s)) => {
                grant_from_body(&seen.body, elapsed).map(|mut g| {
                    g.status = seen.status.unwrap_or(200);
                    g
                })
            }
            Ok(answer) => grant_of(answer, elapsed),
            Err(e) => Err(classify(e, &seen)),
        };
        // Provider text never carries a secret onwards (an IdP may echo the refresh token).
        outcome.map_err(|mut e| {
            let refs: Vec<&str> = secrets.iter().map(String::as_str).collect();
            e.scrub(&refs);
            e.shorten(DETAIL_MAX_CHARS);
            e
        })
    }

    /// Posts the form with the same capture, parsed with the same token and error types.
    async fn post(
        &self,
        capture: &CapturingHttp<'_>,
        req: &TokenRequest<'_>,
        out: &Outgoing,
    ) -> Result<TokenAnswer, RequestTokenError<HttpError, BasicErrorResponse>> {
        let mut builder = self
            .http
            .post(&req.endpoint.token_url)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if let Some(a) = &out.authorization {
            builder = builder.header(http::header::AUTHORIZATION, a.expose());
        }
        let request = builder
            .body(out.form.encode())
            .build()
            .map_err(|e| RequestTokenError::Other(e.without_url().to_string()))?;
        let request: HttpRequest = http_request_of(request).map_err(RequestTokenError::Other)?;
        let response = capture
            .call(request)
            .await
            .map_err(RequestTokenError::Request)?;
        let body = response.body();
        if response.status().is_success() {
            serde_json::from_slice::<TokenAnswer>(body).map_err(|e| {
                RequestTokenError::Other(format!(
                    "token answer not understood: {}",
                    e.classify_name()
                ))
            })
        } else {
            let mut de = serde_json::Deserializer::from_slice(body);
            match serde_path_to_error::deserialize::<_, BasicErrorResponse>(&mut de) {
                Ok(err) => Err(RequestTokenError::ServerResponse(err)),
                Err(e) => Err(RequestTokenError::Parse(e, body.clone())),
            }
        }
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Data => "missing or wrong fields",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

fn http_request_of(r: reqwest::Request) -> Result<HttpRequest, String> {
    let mut b = http::Request::builder()
        .method(r.method().clone())
        .uri(r.url().as_str());
    for (k, v) in r.headers() {
        b = b.header(k, v);
    }
    let body = r
        .body()
        .and_then(|b| b.as_bytes())
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    b.body(body).map_err(|e| e.to_string())
}

fn grant_of(answer: TokenAnswer, elapsed: Duration) -> Result<TokenGrant, TokenError> {
    let access = answer.access_token().secret();
    if access.is_empty() {
        return Err(TokenError::Transient {
            kind: TransientKind::BadResponse,
            status: Some(200),
            retry_after: None,
            detail: "empty access_token".into(),
            maybe_in_flight: false,
        });
    }
    Ok(TokenGrant {
        access_token: Secret::new(access.clone()),
        refresh_token: answer
            .refresh_token()
            .map(|r| r.secret().clone())
            .filter(|r| !r.is_empty())
            .map(Secret::new),
        expires_in: answer.expires_in().filter(|d| !d.is_zero()),
        refresh_token_expires_in: answer
            .extra_fields()
            .refresh_token_expires_in
            .filter(|s| *s > 0)
            .map(Duration::from_secs),
        elapsed,
        status: 200,
    })
}

/// The provider's error code turned into a health reason.
fn permanent_reason(code: &str, description: &str) -> String {
    if code == "invalid_client" && description.contains("AADSTS7000222") {
        return "client_secret_expired".into();
    }
    code.to_string()
}

/// The description of an error answer on one line. Not cut yet: a secret must be scrubbed
/// whole before the text is shortened ([`TokenError::shorten`]), or its first part would
/// survive the cut.
fn safe_description(description: Option<&str>) -> String {
    description.unwrap_or("").replace(['\n', '\r'], " ")
}

/// The longest provider text kept in an error (characters).
pub const DETAIL_MAX_CHARS: usize = 160;

fn transient(
    kind: TransientKind,
    seen: &Seen,
    detail: impl Into<String>,
    maybe_in_flight: bool,
) -> TokenError {
    TokenError::Transient {
        kind,
        status: seen.status,
        retry_after: seen
            .retry_after
            .as_deref()
            .and_then(|v| parse_retry_after(v, Utc::now())),
        detail: detail.into(),
        maybe_in_flight,
    }
}

fn classify(e: RequestTokenError<HttpError, BasicErrorResponse>, seen: &Seen) -> TokenError {
    let status = seen.status;
    let by_status = |detail: String| match status {
        Some(429) => transient(TransientKind::RateLimited, seen, detail, false),
        Some(s) if s >= 500 => transient(TransientKind::ServerError, seen, detail, false),
        _ => transient(TransientKind::BadResponse, seen, detail, false),
    };
    match e {
        RequestTokenError::ServerResponse(err) => {
            let code = err.error().as_ref();
            let description = err.error_description().map(String::as_str);
            if matches!(status, Some(429)) || status.is_some_and(|s| s >= 500) {
                return by_status(code.to_string());
            }
            if PERMANENT_CODES.contains(&code)
                || description.is_some_and(|d| d.contains("Invalid Token!"))
            {
                return TokenError::Permanent {
                    code: permanent_reason(code, description.unwrap_or("")),
                    status: status.unwrap_or(400),
                    detail: safe_description(description),
                };
            }
            by_status(format!("{code}: {}", safe_description(description)))
        }
        RequestTokenError::Request(HttpError::Timeout) => {
            transient(TransientKind::Timeout, seen, "", true)
        }
        RequestTokenError::Request(HttpError::Connect) => {
            transient(TransientKind::Connect, seen, "", false)
        }
        RequestTokenError::Request(other) => {
            transient(TransientKind::BadResponse, seen, other.to_string(), true)
        }
        RequestTokenError::Parse(_, _) => {
            // An answer that is not the expected JSON: look at what came back.
            if let Ok(err) = serde_json::from_slice::<GenericError>(&seen.body) {
                if status.is_some_and(|s| (400..500).contains(&s) && s != 429)
                    && (PERMANENT_CODES.contains(&err.error.as_str())
                        || err.reason.as_deref() == Some("Invalid Token!"))
                {
                    return TokenError::Permanent {
                        code: err.error.clone(),
                        status: status.unwrap_or(400),
                        detail: safe_description(err.error_description.as_deref()),
                    };
                }
            }
            by_status(format!(
                "answer not understood (HTTP {})",
                status.map_or_else(|| "?".into(), |s| s.to_string())
            ))
        }
        RequestTokenError::Other(msg) => by_status(msg),
    }
}

/// Loose error shape for answers `oauth2` could not parse (Zoom's `reason`).
#[derive(Debug, Deserialize)]
struct GenericError {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

#[cfg(test)]
mod userinfo_and_scrub_tests {
    use super::*;

    #[test]
    fn userinfo_leaves_the_url_and_is_decoded() {
        let (url, info) =
            split_userinfo("https://my%20id:p%40ss%2Fw0rd@idp.example/oauth/token?x=1")
                .unwrap_or_default();
        assert_eq!(url, "https://idp.example/oauth/token?x=1");
        let (user, password) = info.unwrap_or_default();
        assert_eq!(user, "my id");
        assert_eq!(password.expose(), "p@ss/w0rd");
        let plain = "https://idp.example/token";
        assert_eq!(split_userinfo(plain), Some((plain.to_string(), None)));
        assert_eq!(split_userinfo("not a url"), None);
    }

    #[test]
    fn scrub_removes_every_spelling_of_every_secret() {
        let endpoint = TokenEndpoint {
            token_url: "https://cid:url-password-123@idp.example/token".into(),
            auth: AuthMethod::Body,
            grant: crate::catalog::Grant::RefreshToken,
            scope: String::new(),
            default_expires_in: Duration::from_secs(3600),
            rotates: true,
            fallback: None,
            budget: None,
            max_refresh_interval: None,
        };
        let credentials = Credentials::default();
        let (cs, rt, at) = (
            Secret::new("client/secret+value"),
            Secret::new("refresh-token-value"),
            Secret::new("access-token-value"),
        );
        let req = TokenRequest {
            provider: "goto",
            endpoint: &endpoint,
            client_id: "cid",
            client_secret: &cs,
            refresh_token: &rt,
            access_token: &at,
            account_key: "",
            scopes: &[],
            credentials: &credentials,
        };
        let basic = base64::engine::general_purpose::STANDARD.encode("cid:client%2Fsecret%2Bvalue");
        let text = format!(
            "got refresh_token=refresh-token-value&client_secret=client%2Fsecret%2Bvalue \
             (client/secret+value) bearer access-token-value url-password-123 Basic {basic}"
        );
        let mut e = TokenError::Permanent {
            code: "invalid_grant".into(),
            status: 400,
            detail: text,
        };
        e.scrub(&req.secrets());
        let TokenError::Permanent { detail, .. } = &e else {
            panic!("kind changed");
        };
        for leaked in [
            "refresh-token-value",
            "client/secret+value",
            "client%2Fsecret%2Bvalue",
            "access-token-value",
            "url-password-123",
            basic.as_str(),
        ] {
            assert!(!detail.contains(leaked), "{leaked} in {detail}");
        }
        assert!(detail.contains("[redacted]"), "{detail}");
    }

    #[test]
    fn a_secret_across_the_cut_is_scrubbed_whole() {
        let secret = "0123456789abcdefghijklmnop";
        let mut e = TokenError::Transient {
            kind: TransientKind::BadResponse,
            status: Some(400),
            retry_after: None,
            detail: format!("{}{secret} and more", "x".repeat(DETAIL_MAX_CHARS - 10)),
            maybe_in_flight: false,
        };
        e.scrub(&[secret]);
        e.shorten(DETAIL_MAX_CHARS);
        let TokenError::Transient { detail, .. } = &e else {
            panic!("kind changed");
        };
        assert!(!detail.contains("0123456789"), "{detail}");
        assert_eq!(detail.chars().count(), DETAIL_MAX_CHARS);
    }
}
