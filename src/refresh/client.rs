//! The token client: one interface for every grant, over one shared `reqwest::Client`.
//!
//! Grants the `oauth2` crate models (`refresh_token`, `client_credentials`) go through it,
//! with [`CapturingHttp`] as its async HTTP client so that the caller sees what
//! `request_async` alone hides: the status, `Retry-After` and a capped body. Grants `oauth2`
//! cannot express (`account_credentials`) are posted with plain `reqwest` through the same
//! [`CapturingHttp`], and parsed with the same token and error types. Every answer becomes a
//! [`TokenGrant`] or a classified [`TokenError`]: the retry decision lives in
//! [`TokenError::is_permanent`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::Utc;
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AsyncHttpClient, AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet,
    ExtraTokenFields, HttpRequest, HttpResponse, RefreshToken, RequestTokenError, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenResponse, TokenUrl,
};
use serde::{Deserialize, Serialize};

use crate::catalog::{AuthMethod, Grant, TokenEndpoint};
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
type OAuthClient = oauth2::Client<
    BasicErrorResponse,
    TokenAnswer,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// What a token call needs. Credentials stay in [`Secret`]s.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    pub endpoint: &'a TokenEndpoint,
    pub client_id: &'a str,
    pub client_secret: &'a Secret,
    pub refresh_token: &'a Secret,
    pub account_key: &'a str,
    /// The record's scopes, sent with app grants when the catalog names none.
    pub scopes: &'a [String],
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

    /// Performs one token call for `req.endpoint.grant`.
    pub async fn request(&self, req: TokenRequest<'_>) -> Result<TokenGrant, TokenError> {
        let capture = CapturingHttp::new(&self.http, self.max_body);
        let started = Instant::now();
        let result = match req.endpoint.grant {
            Grant::RefreshToken | Grant::ClientCredentials => {
                self.oauth2_grant(&capture, &req).await
            }
            Grant::AccountCredentials => self.form_grant(&capture, &req).await,
        };
        let elapsed = started.elapsed();
        let seen = capture.seen();
        match result {
            Ok(answer) => grant_of(answer, elapsed),
            Err(e) => Err(classify(e, &seen)),
        }
    }

    async fn oauth2_grant(
        &self,
        capture: &CapturingHttp<'_>,
        req: &TokenRequest<'_>,
    ) -> Result<TokenAnswer, RequestTokenError<HttpError, BasicErrorResponse>> {
        let token_url = TokenUrl::new(req.endpoint.token_url.clone())
            .map_err(|_| RequestTokenError::Other("token_url is not a URL".into()))?;
        let client: OAuthClient = oauth2::Client::new(ClientId::new(req.client_id.to_string()))
            .set_client_secret(ClientSecret::new(req.client_secret.expose().to_string()))
            .set_auth_type(match req.endpoint.auth {
                AuthMethod::Basic => AuthType::BasicAuth,
                AuthMethod::Body => AuthType::RequestBody,
            })
            .set_token_uri(token_url);
        match req.endpoint.grant {
            Grant::RefreshToken => {
                let rt = RefreshToken::new(req.refresh_token.expose().to_string());
                client
                    .exchange_refresh_token(&rt)
                    .request_async(capture)
                    .await
            }
            _ => {
                let mut r = client.exchange_client_credentials();
                for s in app_scopes(req) {
                    r = r.add_scope(Scope::new(s));
                }
                r.request_async(capture).await
            }
        }
    }

    /// Grants `oauth2` cannot express, posted as a form with the same capture.
    async fn form_grant(
        &self,
        capture: &CapturingHttp<'_>,
        req: &TokenRequest<'_>,
    ) -> Result<TokenAnswer, RequestTokenError<HttpError, BasicErrorResponse>> {
        let mut form: Vec<(&str, String)> =
            vec![("grant_type", req.endpoint.grant.as_str().into())];
        if req.endpoint.grant == Grant::AccountCredentials {
            form.push(("account_id", req.account_key.to_string()));
        }
        let scopes = app_scopes(req);
        if !scopes.is_empty() {
            form.push(("scope", scopes.join(" ")));
        }
        let mut builder = self
            .http
            .post(&req.endpoint.token_url)
            .header(http::header::ACCEPT, "application/json");
        match req.endpoint.auth {
            AuthMethod::Basic => {
                // RFC 6749 2.3.1: both parts form-urlencoded before Basic encoding.
                let enc =
                    |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
                builder =
                    builder.basic_auth(enc(req.client_id), Some(enc(req.client_secret.expose())));
            }
            AuthMethod::Body => {
                form.push(("client_id", req.client_id.to_string()));
                form.push(("client_secret", req.client_secret.expose().to_string()));
            }
        }
        let body = serde_urlencoded_form(&form);
        let request = builder
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
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
            match serde_json::from_slice::<BasicErrorResponse>(body) {
                Ok(err) => Err(RequestTokenError::ServerResponse(err)),
                Err(_) => Err(RequestTokenError::Other(format!(
                    "HTTP {}",
                    response.status().as_u16()
                ))),
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

fn app_scopes(req: &TokenRequest<'_>) -> Vec<String> {
    match &req.endpoint.scope {
        Some(s) => s.split_whitespace().map(str::to_string).collect(),
        None => req.scopes.to_vec(),
    }
}

fn serde_urlencoded_form(pairs: &[(&str, String)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
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
    })
}

/// The provider's error code turned into a health reason.
fn permanent_reason(code: &str, description: &str) -> String {
    if code == "invalid_client" && description.contains("AADSTS7000222") {
        return "client_secret_expired".into();
    }
    code.to_string()
}

/// A short, secret-free detail from an error answer: the code's description, cut.
fn safe_description(description: Option<&str>) -> String {
    let d = description.unwrap_or("");
    let cut: String = d.chars().take(160).collect();
    cut.replace(['\n', '\r'], " ")
}

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
