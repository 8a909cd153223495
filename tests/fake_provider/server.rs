//! `tokenwarden-fake-provider`: a strict local OAuth 2.0 provider for the integration tests,
//! the demo and the benchmarks. It is not part of the product: tokenwarden never talks to it
//! outside those.
//!
//! It is deliberately as strict as the strictest real providers, so a daemon that works
//! against it works against them:
//! - refresh tokens are single use and rotate (RingCentral, Zoom): a used one is dead, and
//!   presenting it again answers `400 invalid_grant` and counts a `reuse`;
//! - client authentication is checked per client: HTTP Basic (RFC 6749 2.3.1, id and secret
//!   form-urlencoded before base64), or `client_id`/`client_secret` in the body, or either;
//!   using both at once, the wrong one, or a wrong secret answers `401 invalid_client`;
//! - the body must be `application/x-www-form-urlencoded`, well formed, each parameter once;
//! - two requests carrying the same refresh token at the same time are counted
//!   (`concurrent_same_rt`) and only the first one to be decided wins.
//!
//! Faults are switched per client (`fail_503`, `rate_limit` + `retry_after`, `delay_ms`,
//! `revoked`, `invalid_client`) and globally (`POST /mode {"delay_ms": D}`).
//!
//! Hostile answers, per client, for tokenwarden's hostile-input tests (see "Hostile answers"
//! below): `expires_in_raw` (any JSON value, sent as `expires_in` verbatim: `1e13`, `"3600"`,
//! `-5`, ...) and `echo_secrets` (an error code: every token call is answered `400` with that
//! code and an `error_description` that echoes the request body, its `Authorization` header,
//! the client secret and the client's seeded access token).
//!
//! Run `tokenwarden-fake-provider [--listen 127.0.0.1:0] [--ttl SECS]` (it is a Cargo example:
//! `cargo run --example tokenwarden-fake-provider -- --ttl 20`): the first line on stdout is
//! the bound port alone; then it serves until killed.
//!
//! Endpoints, all answering JSON:
//! - `POST /token`: `grant_type=refresh_token|client_credentials|account_credentials`.
//! - `POST /seed`, `POST /seed-bulk {"clients": [...]}`: register or update clients.
//! - `POST /faults {"client_id": .., fault: value, ..}`: switch a client's faults.
//! - `POST /mode {"delay_ms": D}`: delay every token answer.
//! - `POST /verify {"pairs": [[refresh, access], ..]}`: how many are alive / live, and each.
//! - `GET /stats[?summary=1]`: counters, and per client unless `summary`.
//! - `GET /api/*`: 200 with a live `Authorization: Bearer` access token, else 401.
//! - `GET /api/{goto,teams,ringcentral,zoom}/...`, `POST /dir/seed`, `POST /dir/faults`,
//!   `GET /dir/stats`: the providers' directory APIs, paged in each one's style
//!   (`directory.rs`).
//!
//! One `Mutex` guards all state; it is never held across an `.await`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

mod directory;

/// Largest `/token` body accepted.
const TOKEN_BODY_LIMIT: usize = 64 * 1024;
/// Largest control body accepted (`/seed-bulk` for 100k+ clients).
const CONTROL_BODY_LIMIT: usize = 512 * 1024 * 1024;

#[derive(Parser, Debug)]
#[command(
    name = "tokenwarden-fake-provider",
    about = "Strict local OAuth 2.0 token endpoint for tokenwarden's tests, demo and benchmarks"
)]
struct Args {
    /// Address to listen on; port 0 picks a free one (printed as the first stdout line).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Access token lifetime in seconds, unless a client overrides it with `expires_in`.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

/// How a client must authenticate at the token endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthMode {
    Basic,
    Body,
    Any,
}

impl AuthMode {
    fn as_str(self) -> &'static str {
        match self {
            AuthMode::Basic => "basic",
            AuthMode::Body => "body",
            AuthMode::Any => "any",
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Faults {
    /// The next N calls answer 503.
    fail_503: u64,
    /// The next N calls answer 429.
    rate_limit: u64,
    /// `Retry-After` sent with the 429s; none when `None`.
    retry_after: Option<String>,
    /// Every call waits this long before it is decided.
    delay_ms: u64,
    /// Every refresh_token grant answers invalid_grant.
    revoked: bool,
    /// Every call answers 401 invalid_client.
    invalid_client: bool,
}

#[derive(Clone, Debug, Default)]
struct ClientStats {
    calls: u64,
    /// Token requests of this client being answered now.
    in_flight: u64,
    refresh_ok: u64,
    cc_ok: u64,
    invalid_grant: u64,
    reuse: u64,
    bad_client: u64,
}

#[derive(Clone, Debug)]
struct Client {
    id: Arc<str>,
    secret: String,
    auth: AuthMode,
    expires_in: Option<u64>,
    omit_expires_in: bool,
    omit_refresh_token: bool,
    refresh_token_expires_in: Option<Value>,
    faults: Faults,
    stats: ClientStats,
    live_refresh_token: Option<String>,
    hostile: Hostile,
}

impl Client {
    fn new(id: &str, secret: &str) -> Client {
        Client {
            id: Arc::from(id),
            secret: secret.to_owned(),
            auth: AuthMode::Any,
            expires_in: None,
            omit_expires_in: false,
            omit_refresh_token: false,
            refresh_token_expires_in: None,
            faults: Faults::default(),
            stats: ClientStats::default(),
            live_refresh_token: None,
            hostile: Hostile::default(),
        }
    }
}

struct RefreshToken {
    client_id: Arc<str>,
    alive: bool,
}

#[derive(Default)]
struct Counters {
    calls: u64,
    refresh_ok: u64,
    cc_ok: u64,
    invalid_grant: u64,
    reuse: u64,
    bad_client: u64,
    invalid_request: u64,
    unsupported_grant_type: u64,
    unavailable: u64,
    rate_limited: u64,
    concurrent_same_rt: u64,
    in_flight: u64,
    max_in_flight: u64,
    api_ok: u64,
    api_401: u64,
}

struct State {
    ttl: u64,
    global_delay_ms: u64,
    clients: HashMap<Arc<str>, Client>,
    refresh: HashMap<String, RefreshToken>,
    /// Access token -> when it expires.
    access: HashMap<String, Instant>,
    /// Sweep expired access tokens when `access` reaches this size.
    access_sweep_at: usize,
    /// Refresh token -> token requests carrying it now.
    rt_in_flight: HashMap<String, u32>,
    counters: Counters,
    next_serial: u64,
}

impl State {
    fn new(ttl: u64) -> State {
        State {
            ttl,
            global_delay_ms: 0,
            clients: HashMap::new(),
            refresh: HashMap::new(),
            access: HashMap::new(),
            access_sweep_at: 1024,
            rt_in_flight: HashMap::new(),
            counters: Counters::default(),
            next_serial: 0,
        }
    }

    /// A new unique token: random bits plus a serial number.
    fn mint(&mut self, prefix: &str) -> String {
        self.next_serial += 1;
        format!("{prefix}-{:016x}{:x}", fastrand::u64(..), self.next_serial)
    }

    fn issue_access_token(&mut self, lifetime: u64) -> String {
        let token = self.mint("at");
        let now = Instant::now();
        self.access
            .insert(token.clone(), now + Duration::from_secs(lifetime));
        if self.access.len() >= self.access_sweep_at {
            self.access.retain(|_, expiry| *expiry > now);
            self.access_sweep_at = (self.access.len() * 2).max(1024);
        }
        token
    }

    fn access_live(&self, token: &str) -> bool {
        self.access
            .get(token)
            .is_some_and(|expiry| *expiry > Instant::now())
    }

    fn refresh_alive(&self, token: &str) -> bool {
        self.refresh.get(token).is_some_and(|rt| rt.alive)
    }
}

struct Shared {
    state: Mutex<State>,
    /// The directory APIs (`directory.rs`), apart from the token state.
    dir: Mutex<directory::Directory>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent enough to
        // matter for a test double: keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Marks one `/token` request in flight; undone on drop, even when the client disconnects.
struct InFlight {
    shared: Arc<Shared>,
    refresh_token: Option<String>,
    client_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.counters.in_flight = state.counters.in_flight.saturating_sub(1);
        if let Some(c) = state.clients.get_mut(self.client_id.as_str()) {
            c.stats.in_flight = c.stats.in_flight.saturating_sub(1);
        }
        if let Some(rt) = self.refresh_token.take() {
            if let Some(n) = state.rt_in_flight.get_mut(&rt) {
                *n -= 1;
                if *n == 0 {
                    state.rt_in_flight.remove(&rt);
                }
            }
        }
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Resp {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn invalid_client(description: &str, basic_used: bool) -> Resp {
    let mut resp = oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", description);
    if basic_used {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokenwarden-fake-provider\""),
        );
    }
    resp
}

fn control_error(status: StatusCode, message: &str) -> Resp {
    json_response(status, &json!({"error": message}))
}

// ---------------------------------------------------------------------------------------
// application/x-www-form-urlencoded

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes one form component: `+` is a space, `%XX` a byte; the result must be UTF-8.
fn decode_component(raw: &[u8]) -> Result<String, &'static str> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let hi = raw.get(i + 1).copied().and_then(hex_value);
                let lo = raw.get(i + 2).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi << 4 | lo);
                        i += 3;
                    }
                    _ => return Err("malformed percent-encoding"),
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "a parameter is not valid UTF-8")
}

/// Parses a form body; a parameter given twice is an error (RFC 6749 3.1, 3.2).
fn parse_form(body: &[u8]) -> Result<Vec<(String, String)>, &'static str> {
    let mut params: Vec<(String, String)> = Vec::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.iter().position(|&b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, &pair[pair.len()..]),
        };
        let key = decode_component(key)?;
        if params.iter().any(|(k, _)| *k == key) {
            return Err("a parameter was given more than once");
        }
        params.push((key, decode_component(value)?));
    }
    Ok(params)
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// HTTP Basic client credentials, if the request carries them.
/// `Err` when the header claims Basic but is malformed.
fn basic_credentials(headers: &HeaderMap) -> Result<Option<(String, String)>, &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| "Authorization header is not ASCII")?;
    let Some((scheme, encoded)) = value.split_once(' ') else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "Basic credentials are not base64")?;
    let Some(colon) = decoded.iter().position(|&b| b == b':') else {
        return Err("Basic credentials have no ':'");
    };
    let id = decode_component(&decoded[..colon])?;
    let secret = decode_component(&decoded[colon + 1..])?;
    Ok(Some((id, secret)))
}

fn is_form_content_type(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

// ---------------------------------------------------------------------------------------
// POST /token

#[derive(Clone, Copy, PartialEq, Eq)]
enum Grant {
    RefreshToken,
    ClientCredentials,
    Other,
}

async fn token(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let form_ok = is_form_content_type(req.headers());
    let basic = basic_credentials(req.headers());
    let basic_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), TOKEN_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            shared.lock().counters.invalid_request += 1;
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "request body unreadable or too large",
            );
        }
    };
    let bad_request = |shared: &Shared, description: &str| {
        shared.lock().counters.invalid_request += 1;
        oauth_error(StatusCode::BAD_REQUEST, "invalid_request", description)
    };
    if !form_ok {
        return bad_request(
            &shared,
            "Content-Type must be application/x-www-form-urlencoded",
        );
    }
    let params = match parse_form(&body) {
        Ok(params) => params,
        Err(description) => return bad_request(&shared, description),
    };
    let basic = match basic {
        Ok(basic) => basic,
        Err(description) => {
            shared.lock().counters.bad_client += 1;
            return invalid_client(description, true);
        }
    };
    let basic_used = basic.is_some();
    let body_id = param(&params, "client_id");
    let body_secret = param(&params, "client_secret");
    let (client_id, secret, used_mode): (&str, &str, AuthMode) = match (&basic, body_secret) {
        (Some(_), Some(_)) => {
            return bad_request(
                &shared,
                "more than one client authentication method was used",
            );
        }
        (Some((id, secret)), None) => {
            if body_id.is_some_and(|b| b != id) {
                return bad_request(&shared, "client_id in the body differs from Basic");
            }
            (id, secret, AuthMode::Basic)
        }
        (None, Some(secret)) => match body_id {
            Some(id) => (id, secret, AuthMode::Body),
            None => return bad_request(&shared, "client_secret without client_id"),
        },
        (None, None) => {
            shared.lock().counters.bad_client += 1;
            return invalid_client("no client authentication", false);
        }
    };
    let grant = match param(&params, "grant_type") {
        Some("refresh_token") => Grant::RefreshToken,
        Some("client_credentials" | "account_credentials") => Grant::ClientCredentials,
        Some(_) => Grant::Other,
        None => return bad_request(&shared, "grant_type is missing"),
    };
    let refresh_token = if grant == Grant::RefreshToken {
        match param(&params, "refresh_token") {
            Some(rt) if !rt.is_empty() => Some(rt),
            _ => return bad_request(&shared, "refresh_token is missing"),
        }
    } else {
        None
    };

    // Phase 1: count the call, mark it in flight, learn the delay.
    let delay_ms = {
        let mut state = shared.lock();
        let state = &mut *state;
        state.counters.calls += 1;
        state.counters.in_flight += 1;
        state.counters.max_in_flight = state.counters.max_in_flight.max(state.counters.in_flight);
        if let Some(rt) = refresh_token {
            let n = state.rt_in_flight.entry(rt.to_owned()).or_insert(0);
            if *n > 0 {
                state.counters.concurrent_same_rt += 1;
            }
            *n += 1;
        }
        let client_delay = match state.clients.get_mut(client_id) {
            Some(client) => {
                client.stats.calls += 1;
                client.stats.in_flight += 1;
                client.faults.delay_ms
            }
            None => 0,
        };
        client_delay + state.global_delay_ms
    };
    let _in_flight = InFlight {
        shared: Arc::clone(&shared),
        refresh_token: refresh_token.map(str::to_owned),
        client_id: client_id.to_string(),
    };
    if delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }

    if let Some(resp) = hostile_echo(&shared, client_id, &body, basic_header.as_deref()) {
        return resp;
    }

    // Phase 2: decide, atomically: of two requests with the same refresh token the first to
    // get here wins.
    let mut state = shared.lock();
    decide(
        &mut state,
        client_id,
        secret,
        used_mode,
        basic_used,
        grant,
        refresh_token,
    )
}

fn decide(
    state: &mut State,
    client_id: &str,
    secret: &str,
    used_mode: AuthMode,
    basic_used: bool,
    grant: Grant,
    refresh_token: Option<&str>,
) -> Resp {
    let State {
        ttl,
        clients,
        refresh,
        counters,
        ..
    } = state;
    let Some(client) = clients.get_mut(client_id) else {
        counters.bad_client += 1;
        return invalid_client("unknown client", basic_used);
    };
    let auth_problem = if client.faults.invalid_client {
        Some("client is disabled")
    } else if client.auth != AuthMode::Any && client.auth != used_mode {
        Some(match client.auth {
            AuthMode::Basic => "this client must authenticate with HTTP Basic",
            _ => "this client must authenticate with client_secret in the body",
        })
    } else if client.secret != secret {
        Some("wrong client secret")
    } else {
        None
    };
    if let Some(description) = auth_problem {
        counters.bad_client += 1;
        client.stats.bad_client += 1;
        return invalid_client(description, basic_used);
    }
    if client.faults.fail_503 > 0 {
        client.faults.fail_503 -= 1;
        counters.unavailable += 1;
        return oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "injected fault: service unavailable",
        );
    }
    if client.faults.rate_limit > 0 {
        client.faults.rate_limit -= 1;
        counters.rate_limited += 1;
        let mut resp = oauth_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "injected fault: too many requests",
        );
        if let Some(value) = client
            .faults
            .retry_after
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return resp;
    }
    let lifetime = client.expires_in.unwrap_or(*ttl);
    // Whether to rotate: mint a new refresh token (the presented one is already dead).
    let rotate = match (grant, refresh_token) {
        (Grant::ClientCredentials, _) => {
            counters.cc_ok += 1;
            client.stats.cc_ok += 1;
            false
        }
        (Grant::RefreshToken, Some(rt)) => {
            let problem = if client.faults.revoked {
                Some((false, "refresh token revoked"))
            } else {
                match refresh.get_mut(rt) {
                    None => Some((false, "unknown refresh token")),
                    Some(entry) if *entry.client_id != *client_id => {
                        Some((false, "refresh token was issued to another client"))
                    }
                    Some(entry) if !entry.alive => {
                        Some((true, "refresh token was already used (single use)"))
                    }
                    Some(entry) => {
                        if !client.omit_refresh_token {
                            entry.alive = false;
                        }
                        None
                    }
                }
            };
            if let Some((reuse, description)) = problem {
                counters.invalid_grant += 1;
                client.stats.invalid_grant += 1;
                if reuse {
                    counters.reuse += 1;
                    client.stats.reuse += 1;
                }
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", description);
            }
            counters.refresh_ok += 1;
            client.stats.refresh_ok += 1;
            !client.omit_refresh_token
        }
        _ => {
            counters.unsupported_grant_type += 1;
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "supported: refresh_token, client_credentials, account_credentials",
            );
        }
    };
    let omit_expires_in = client.omit_expires_in;
    let hostile_expires_in = client.hostile.expires_in_raw.clone();
    let refresh_token_expires_in = client.refresh_token_expires_in.clone();
    let owner = Arc::clone(&client.id);
    let access_token = state.issue_access_token(lifetime);
    let mut body = Map::new();
    body.insert("access_token".into(), Value::String(access_token));
    body.insert("token_type".into(), Value::from("Bearer"));
    if !omit_expires_in {
        body.insert("expires_in".into(), Value::from(lifetime));
    }
    hostile_expires_in_answer(&mut body, hostile_expires_in);
    if rotate {
        let rt = state.mint("rt");
        state.refresh.insert(
            rt.clone(),
            RefreshToken {
                client_id: owner.clone(),
                alive: true,
            },
        );
        if let Some(client) = state.clients.get_mut(&*owner) {
            client.live_refresh_token = Some(rt.clone());
        }
        body.insert("refresh_token".into(), Value::String(rt));
        if let Some(rt_ttl) = refresh_token_expires_in {
            body.insert("refresh_token_expires_in".into(), rt_ttl);
        }
    }
    json_response(StatusCode::OK, &Value::Object(body))
}

// ---------------------------------------------------------------------------------------
// Control endpoints

fn get_u64(obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a non-negative integer")),
    }
}

fn get_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_bool()
            .map(Some)
            .ok_or_else(|| format!("{key} must be a boolean")),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{key} must be a string")),
    }
}

const OPTION_KEYS: &[&str] = &[
    "auth",
    "expires_in",
    "omit_expires_in",
    "omit_refresh_token",
    "refresh_token_expires_in",
    "fail_503",
    "rate_limit",
    "retry_after",
    "delay_ms",
    "revoked",
    "invalid_client",
];
const SEED_KEYS: &[&str] = &[
    "client_id",
    "client_secret",
    "refresh_token",
    "access_token",
];

/// Applies the per-client options and faults present in `obj`; absent keys stay as they are.
fn apply_options(client: &mut Client, obj: &Map<String, Value>) -> Result<(), String> {
    if let Some(auth) = get_str(obj, "auth")? {
        client.auth = match auth {
            "basic" => AuthMode::Basic,
            "body" => AuthMode::Body,
            "any" => AuthMode::Any,
            other => return Err(format!("auth must be basic, body or any, not {other:?}")),
        };
    }
    match obj.get("expires_in") {
        None => {}
        Some(Value::Null) => client.expires_in = None,
        Some(_) => client.expires_in = get_u64(obj, "expires_in")?,
    }
    if let Some(v) = get_bool(obj, "omit_expires_in")? {
        client.omit_expires_in = v;
    }
    if let Some(v) = get_bool(obj, "omit_refresh_token")? {
        client.omit_refresh_token = v;
    }
    match obj.get("refresh_token_expires_in") {
        None => {}
        Some(Value::Null) => client.refresh_token_expires_in = None,
        Some(v @ Value::Number(_)) => client.refresh_token_expires_in = Some(v.clone()),
        Some(_) => return Err("refresh_token_expires_in must be a number".into()),
    }
    if let Some(v) = get_u64(obj, "fail_503")? {
        client.faults.fail_503 = v;
    }
    if let Some(v) = get_u64(obj, "rate_limit")? {
        client.faults.rate_limit = v;
    }
    match obj.get("retry_after") {
        None => {}
        Some(Value::Null) => client.faults.retry_after = None,
        Some(Value::String(s)) => {
            if HeaderValue::from_str(s).is_err() {
                return Err("retry_after is not a valid header value".into());
            }
            client.faults.retry_after = Some(s.clone());
        }
        Some(Value::Number(n)) => client.faults.retry_after = Some(n.to_string()),
        Some(_) => return Err("retry_after must be a string, a number or null".into()),
    }
    if let Some(v) = get_u64(obj, "delay_ms")? {
        client.faults.delay_ms = v;
    }
    if let Some(v) = get_bool(obj, "revoked")? {
        client.faults.revoked = v;
    }
    if let Some(v) = get_bool(obj, "invalid_client")? {
        client.faults.invalid_client = v;
    }
    Ok(())
}

/// Applies the options of every kind in `obj`.
fn apply_all_options(client: &mut Client, obj: &Map<String, Value>) -> Result<(), String> {
    apply_options(client, obj)?;
    apply_hostile(client, obj)
}

fn check_keys(obj: &Map<String, Value>, allowed: &[&[&str]]) -> Result<(), String> {
    for key in obj.keys() {
        if !allowed.iter().any(|set| set.contains(&key.as_str())) {
            return Err(format!("unknown field {key:?}"));
        }
    }
    Ok(())
}

/// Registers or updates one client from a `/seed` object.
fn seed_one(state: &mut State, value: &Value) -> Result<(), String> {
    let obj = value.as_object().ok_or("a client must be a JSON object")?;
    check_keys(obj, &[SEED_KEYS, OPTION_KEYS, HOSTILE_KEYS])?;
    let id = get_str(obj, "client_id")?.ok_or("client_id is required")?;
    let secret = get_str(obj, "client_secret")?.ok_or("client_secret is required")?;
    let refresh_token = get_str(obj, "refresh_token")?;
    let access_token = get_str(obj, "access_token")?;
    let mut client = match state.clients.get(id) {
        Some(existing) => existing.clone(),
        None => Client::new(id, secret),
    };
    client.secret = secret.to_owned();
    apply_all_options(&mut client, obj)?;
    if let Some(rt) = refresh_token.filter(|rt| !rt.is_empty()) {
        state.refresh.insert(
            rt.to_owned(),
            RefreshToken {
                client_id: Arc::clone(&client.id),
                alive: true,
            },
        );
        client.live_refresh_token = Some(rt.to_owned());
    }
    if let Some(at) = access_token.filter(|at| !at.is_empty()) {
        client.hostile.seeded_access_token = Some(at.to_owned());
        let lifetime = client.expires_in.unwrap_or(state.ttl);
        state.access.insert(
            at.to_owned(),
            Instant::now() + Duration::from_secs(lifetime),
        );
    }
    state.clients.insert(Arc::clone(&client.id), client);
    Ok(())
}

fn faults_json(client: &Client) -> Value {
    json!({
        "client_id": &*client.id,
        "auth": client.auth.as_str(),
        "expires_in": client.expires_in,
        "omit_expires_in": client.omit_expires_in,
        "omit_refresh_token": client.omit_refresh_token,
        "refresh_token_expires_in": client.refresh_token_expires_in,
        "fail_503": client.faults.fail_503,
        "rate_limit": client.faults.rate_limit,
        "retry_after": client.faults.retry_after,
        "delay_ms": client.faults.delay_ms,
        "revoked": client.faults.revoked,
        "invalid_client": client.faults.invalid_client,
    })
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Resp> {
    let body = Limited::new(req.into_body(), CONTROL_BODY_LIMIT)
        .collect()
        .await
        .map_err(|_| control_error(StatusCode::BAD_REQUEST, "body unreadable or too large"))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| control_error(StatusCode::BAD_REQUEST, &format!("invalid JSON: {e}")))
}

async fn seed(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let value = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    match seed_one(&mut shared.lock(), &value) {
        Ok(()) => json_response(StatusCode::OK, &json!({"ok": true})),
        Err(e) => control_error(StatusCode::BAD_REQUEST, &e),
    }
}

async fn seed_bulk(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let value = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Some(clients) = value.get("clients").and_then(Value::as_array) else {
        return control_error(StatusCode::BAD_REQUEST, "expected {\"clients\": [...]}");
    };
    let mut state = shared.lock();
    for (i, client) in clients.iter().enumerate() {
        if let Err(e) = seed_one(&mut state, client) {
            return control_error(StatusCode::BAD_REQUEST, &format!("clients[{i}]: {e}"));
        }
    }
    json_response(
        StatusCode::OK,
        &json!({"ok": true, "seeded": clients.len()}),
    )
}

async fn faults(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let value = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Some(obj) = value.as_object() else {
        return control_error(StatusCode::BAD_REQUEST, "expected a JSON object");
    };
    if let Err(e) = check_keys(obj, &[&["client_id"], OPTION_KEYS, HOSTILE_KEYS]) {
        return control_error(StatusCode::BAD_REQUEST, &e);
    }
    let id = match get_str(obj, "client_id") {
        Ok(Some(id)) => id,
        Ok(None) => return control_error(StatusCode::BAD_REQUEST, "client_id is required"),
        Err(e) => return control_error(StatusCode::BAD_REQUEST, &e),
    };
    let mut state = shared.lock();
    let Some(client) = state.clients.get_mut(id) else {
        return control_error(StatusCode::NOT_FOUND, "unknown client");
    };
    // Validate everything before changing anything.
    let mut updated = client.clone();
    if let Err(e) = apply_all_options(&mut updated, obj) {
        return control_error(StatusCode::BAD_REQUEST, &e);
    }
    *client = updated;
    json_response(StatusCode::OK, &faults_json(client))
}

async fn mode(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let value = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Some(obj) = value.as_object() else {
        return control_error(StatusCode::BAD_REQUEST, "expected a JSON object");
    };
    if let Err(e) = check_keys(obj, &[&["delay_ms", "delay"]]) {
        return control_error(StatusCode::BAD_REQUEST, &e);
    }
    let delay_ms = match (obj.get("delay_ms"), obj.get("delay")) {
        (Some(v), _) => v.as_u64(),
        // `delay` in seconds, as the Python reference takes it.
        (None, Some(v)) => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| (s * 1000.0).round() as u64),
        (None, None) => None,
    };
    let Some(delay_ms) = delay_ms else {
        return control_error(
            StatusCode::BAD_REQUEST,
            "expected {\"delay_ms\": non-negative integer}",
        );
    };
    shared.lock().global_delay_ms = delay_ms;
    json_response(StatusCode::OK, &json!({"delay_ms": delay_ms}))
}

async fn verify(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let value = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let Some(pairs) = value.get("pairs").and_then(Value::as_array) else {
        return control_error(
            StatusCode::BAD_REQUEST,
            "expected {\"pairs\": [[refresh, access], ...]}",
        );
    };
    let state = shared.lock();
    let (mut refresh_alive, mut access_live) = (0u64, 0u64);
    let mut results = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let rt = pair.get(0).and_then(Value::as_str).unwrap_or("");
        let at = pair.get(1).and_then(Value::as_str).unwrap_or("");
        let (alive, live) = (state.refresh_alive(rt), state.access_live(at));
        refresh_alive += u64::from(alive);
        access_live += u64::from(live);
        results.push(json!({"refresh_alive": alive, "access_live": live}));
    }
    json_response(
        StatusCode::OK,
        &json!({"refresh_alive": refresh_alive, "access_live": access_live, "n": pairs.len(), "results": results}),
    )
}

fn stats(shared: &Shared, query: Option<&str>) -> Resp {
    let summary = query
        .and_then(|q| parse_form(q.as_bytes()).ok())
        .and_then(|params| param(&params, "summary").map(|v| v == "1" || v == "true"))
        .unwrap_or(false);
    let state = shared.lock();
    let c = &state.counters;
    let mut body = json!({
        "refresh_ok": c.refresh_ok,
        "cc_ok": c.cc_ok,
        "invalid_grant": c.invalid_grant,
        "reuse": c.reuse,
        "bad_client": c.bad_client,
        "concurrent_same_rt": c.concurrent_same_rt,
        "calls": c.calls,
        "max_in_flight": c.max_in_flight,
        "in_flight": c.in_flight,
        "invalid_request": c.invalid_request,
        "unsupported_grant_type": c.unsupported_grant_type,
        "unavailable": c.unavailable,
        "rate_limited": c.rate_limited,
        "api_ok": c.api_ok,
        "api_401": c.api_401,
        "global_delay_ms": state.global_delay_ms,
    });
    if !summary {
        let clients: Map<String, Value> = state
            .clients
            .values()
            .map(|client| {
                let s = &client.stats;
                (
                    client.id.to_string(),
                    json!({
                        "calls": s.calls,
                        "in_flight": s.in_flight,
                        "refresh_ok": s.refresh_ok,
                        "cc_ok": s.cc_ok,
                        "invalid_grant": s.invalid_grant,
                        "reuse": s.reuse,
                        "bad_client": s.bad_client,
                        "live_refresh_token": client
                            .live_refresh_token
                            .as_deref()
                            .filter(|rt| state.refresh_alive(rt)),
                    }),
                )
            })
            .collect();
        body["clients"] = Value::Object(clients);
    }
    json_response(StatusCode::OK, &body)
}

fn api(shared: &Shared, headers: &HeaderMap) -> Resp {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let mut state = shared.lock();
    if bearer.is_some_and(|token| state.access_live(token)) {
        state.counters.api_ok += 1;
        drop(state);
        return json_response(StatusCode::OK, &json!({"ok": true, "items": []}));
    }
    state.counters.api_401 += 1;
    drop(state);
    let mut resp = json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    );
    resp
}

// ---------------------------------------------------------------------------------------
// Hostile answers: what a careless or hostile identity provider sends (tokenwarden's
// hostile-input tests). Kept apart from the strict provider above.

/// Per-client hostile answer modes.
#[derive(Clone, Debug, Default)]
struct Hostile {
    /// Sent as `expires_in` in successful answers instead of the lifetime, verbatim.
    expires_in_raw: Option<Value>,
    /// Answer every token call `400` with this error code, echoing the request's secrets in
    /// `error_description`.
    echo_secrets: Option<String>,
    /// The access token seeded for this client (echoed by `echo_secrets`).
    seeded_access_token: Option<String>,
}

const HOSTILE_KEYS: &[&str] = &["expires_in_raw", "echo_secrets"];

fn apply_hostile(client: &mut Client, obj: &Map<String, Value>) -> Result<(), String> {
    match obj.get("expires_in_raw") {
        None => {}
        Some(Value::Null) => client.hostile.expires_in_raw = None,
        Some(v) => client.hostile.expires_in_raw = Some(v.clone()),
    }
    match obj.get("echo_secrets") {
        None => {}
        Some(Value::Null) => client.hostile.echo_secrets = None,
        Some(Value::String(code)) => client.hostile.echo_secrets = Some(code.clone()),
        Some(_) => return Err("echo_secrets must be an error code (a string) or null".into()),
    }
    Ok(())
}

/// `expires_in` as the hostile client wants it sent.
fn hostile_expires_in_answer(body: &mut Map<String, Value>, raw: Option<Value>) {
    if let Some(raw) = raw {
        body.insert("expires_in".into(), raw);
    }
}

/// For a client with `echo_secrets`: the 400 answer echoing everything secret it was sent.
fn hostile_echo(
    shared: &Shared,
    client_id: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> Option<Resp> {
    let mut state = shared.lock();
    let client = state.clients.get_mut(client_id)?;
    let code = client.hostile.echo_secrets.clone()?;
    client.stats.invalid_grant += 1;
    let description = format!(
        "request {} with Authorization {:?} rejected; client secret {} ; access token {}; raw {}",
        String::from_utf8_lossy(body),
        authorization.unwrap_or(""),
        client.secret,
        client.hostile.seeded_access_token.as_deref().unwrap_or(""),
        decode_component(body).unwrap_or_default(),
    );
    Some(oauth_error(StatusCode::BAD_REQUEST, &code, &description))
}

// ---------------------------------------------------------------------------------------
// Directory APIs (see directory.rs)

/// `(provider, path)` of a directory API request `/api/{provider}{path}`.
fn dir_route(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/api/")?;
    let (provider, tail) = rest.split_once('/')?;
    matches!(provider, "goto" | "teams" | "ringcentral" | "zoom")
        .then(|| (provider, &path[5 + provider.len()..]))
        .filter(|_| !tail.is_empty())
}

async fn dir_control(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let seed = req.uri().path() == "/dir/seed";
    let body = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let mut dir = shared.dir.lock().unwrap_or_else(|p| p.into_inner());
    let done = if seed {
        dir.seed(&body)
    } else {
        dir.faults(&body)
    };
    match done {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => control_error(StatusCode::BAD_REQUEST, &e),
    }
}

async fn dir_api(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let Some((provider, tail)) = dir_route(&path) else {
        return control_error(StatusCode::NOT_FOUND, "not found");
    };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_string());
    let live = bearer.is_some_and(|t| shared.lock().access_live(&t));
    if !live {
        shared
            .dir
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count_unauthorized();
        return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
    }
    let delay = shared
        .dir
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .delay_ms(provider, tail);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let page = shared.dir.lock().unwrap_or_else(|p| p.into_inner()).page(
        provider,
        tail,
        req.uri().query(),
        req.headers(),
    );
    // No list seeded there (a health probe's path): the plain API answer.
    page.unwrap_or_else(|| api(&shared, req.headers()))
}

// ---------------------------------------------------------------------------------------
// Routing and serving

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    let post = req.method() == Method::POST;
    let resp = match path {
        "/token" if post => token(shared, req).await,
        "/seed" if post => seed(shared, req).await,
        "/seed-bulk" if post => seed_bulk(shared, req).await,
        "/faults" if post => faults(shared, req).await,
        "/mode" if post => mode(shared, req).await,
        "/verify" if post => verify(shared, req).await,
        "/stats" if req.method() == Method::GET => stats(&shared, req.uri().query()),
        "/dir/seed" | "/dir/faults" if post => dir_control(shared, req).await,
        "/dir/stats" => {
            let stats = shared.dir.lock().unwrap_or_else(|p| p.into_inner()).stats();
            json_response(StatusCode::OK, &stats)
        }
        p if dir_route(p).is_some() => dir_api(shared, req).await,
        p if p.starts_with("/api/") => api(&shared, req.headers()),
        "/token" | "/seed" | "/seed-bulk" | "/faults" | "/mode" | "/verify" | "/stats" => {
            control_error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
        _ => control_error(StatusCode::NOT_FOUND, "not found"),
    };
    Ok(resp)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let port = listener.local_addr()?.port();
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{port}")?;
        stdout.flush()?;
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(State::new(args.ttl)),
        dir: Mutex::new(directory::Directory::default()),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait a little, keep serving.
                eprintln!("tokenwarden-fake-provider: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Small request/response pairs on keep-alive connections: do not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(Arc::clone(&shared), req));
            // A client that goes away mid-request is not an error worth reporting.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_form_components() {
        assert_eq!(decode_component(b"a+b%20c%2B%25").as_deref(), Ok("a b c+%"));
        assert_eq!(decode_component(b"%C3%A9").as_deref(), Ok("é"));
        assert!(decode_component(b"%zz").is_err());
        assert!(decode_component(b"%2").is_err());
        assert!(decode_component(b"%FF").is_err());
    }

    #[test]
    fn parses_forms_strictly() {
        let params = parse_form(b"grant_type=refresh_token&refresh_token=a%2Bb&empty=&flag")
            .unwrap_or_default();
        assert_eq!(param(&params, "refresh_token"), Some("a+b"));
        assert_eq!(param(&params, "empty"), Some(""));
        assert_eq!(param(&params, "flag"), Some(""));
        assert!(parse_form(b"a=1&a=2").is_err());
    }
}
