//! The provider catalog end to end: for each provider a fake endpoint ([`Recorder`]) that
//! checks the exact request the daemon sends (method, path, client authentication, grant
//! fields, scope, the signed assertion verified with the public key) and answers in that
//! provider's own format, errors included; a provider added purely by a catalog file; a
//! burst of tokens kept within their token budget by two daemons; health probes kept within
//! the API budget, and slowed by a 429.
//!
//! Run with `--no-capture` to see each provider's request as its fake saw it (secrets masked).

mod support;

use std::time::Duration;

use base64::Engine;
use serde_json::json;
use support::metrics::{metric, metric_sum};
use support::recorder::{Answer, Recorder, Seen};
use support::{
    health_key, hget, oauth_record, provider_key, seed_provider, wait_until, Daemon, FakeProvider,
    RedisServer,
};

const TENANT: &str = "cloudwarriors";
/// Tests about token calls leave probes out (their state would race the refresh).
const NO_PROBES: (&str, &str) = ("TOKENWARDEN_HEALTH_ENABLED", "false");
const KEY_PEM: &str = include_str!("fixtures/teams-app.key");
const PUB_PEM: &str = include_str!("fixtures/teams-app.pub");
const CERT_PEM: &str = include_str!("fixtures/teams-app.crt");
/// `openssl x509 -fingerprint -sha1` of the fixture certificate.
const THUMBPRINT: &str = "2BA5EB92155BB2CE46A23D70DE615A3786B93930";
/// Its notAfter (2126-11-07T10:14:59Z).
const CERT_NOT_AFTER: f64 = 4_949_720_099.0;

fn basic(id: &str, secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}"))
    )
}

fn record(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = [
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_secret", "s3cret-value-1"),
        ("token_expiry", ""),
        ("scopes", "[]"),
        ("sync_enabled", "False"),
        ("updated_at", "2025-01-15T10:30:00.123456"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, val) in pairs {
        v.retain(|(f, _)| f != k);
        v.push((k.to_string(), val.to_string()));
    }
    v
}

/// The built-in catalog with the RingCentral token budget set to `requests` per `per_secs`
/// by client id, written to a file for `TOKENWARDEN_REFRESH_CATALOG_FILE`.
fn catalog_with_budget(requests: u32, per_secs: u64) -> tempfile_path::Path {
    let text = include_str!("../config/providers.toml").replace(
        "token_budget = { scope = \"record\", requests = 5, per_secs = 60 }",
        &format!("token_budget = {{ scope = \"client_id\", requests = {requests}, per_secs = {per_secs} }}"),
    );
    tempfile_path::write("providers.toml", &text)
}

mod tempfile_path {
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    impl Path {
        pub fn as_str(&self) -> &str {
            self.0.to_str().unwrap_or_default()
        }
    }
    pub fn write(name: &str, text: &str) -> Path {
        let dir = std::env::temp_dir().join(format!(
            "tokenwarden-catalog-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir: {e}"));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write catalog: {e}"));
        Path(path)
    }
}

async fn wait_field(redis: &RedisServer, key: &str, field: &str, want: &str) {
    let mut conn = redis.conn();
    let what = format!("{key} {field} = {want}");
    wait_until(&what, Duration::from_secs(20), || {
        hget(&mut conn, key, field).as_deref() == Some(want)
    })
    .await;
}

fn ms_token(n: usize) -> Answer {
    Answer::json(
        200,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599,
               "access_token": format!("eyJ0eXAi.ms-at-{n}")}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_certificate_credentials_send_a_signed_assertion() {
    let fake = Recorder::start(|_, n| ms_token(n)).await;
    let redis = RedisServer::start();
    let token_url_template = fake.url("/{account_key}/oauth2/v2.0/token");
    seed_provider(
        &mut redis.conn(),
        TENANT,
        "teams",
        &record(&[
            ("provider_type", "teams"),
            ("auth_type", "certificate"),
            ("client_id", "11111111-2222-3333-4444-555555555555"),
            ("client_secret", ""),
            ("account_key", "contoso-tenant-id"),
            ("token_url", &token_url_template),
            ("certificate_key", KEY_PEM),
            ("certificate_thumbprint", THUMBPRINT),
            ("certificate_pem", CERT_PEM),
        ]),
    );
    let daemon = Daemon::start(&redis, &[NO_PROBES]);
    wait_field(
        &redis,
        &provider_key(TENANT, "teams"),
        "access_token",
        "eyJ0eXAi.ms-at-0",
    )
    .await;
    fake.print("teams (certificate)");
    let seen = fake.requests();
    let s = &seen[0];
    let token_url = fake.url("/contoso-tenant-id/oauth2/v2.0/token");
    assert_eq!(s.method, "POST");
    assert_eq!(s.path, "/contoso-tenant-id/oauth2/v2.0/token");
    assert_eq!(s.header("authorization"), None, "no secret: an assertion");
    assert_eq!(s.field("grant_type"), Some("client_credentials"));
    assert_eq!(
        s.field("scope"),
        Some("https://graph.microsoft.com/.default")
    );
    assert_eq!(
        s.field("client_id"),
        Some("11111111-2222-3333-4444-555555555555")
    );
    assert_eq!(
        s.field("client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(s.field("client_secret"), None);
    let jwt = s.field("client_assertion").expect("client_assertion");
    let header = jsonwebtoken::decode_header(jwt).expect("JWT header");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let want_x5t = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(hex_bytes(THUMBPRINT));
    assert_eq!(header.x5t.as_deref(), Some(want_x5t.as_str()));
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[token_url.as_str()]);
    v.set_issuer(&["11111111-2222-3333-4444-555555555555"]);
    v.sub = Some("11111111-2222-3333-4444-555555555555".into());
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(PUB_PEM.as_bytes()).expect("public key");
    let claims = jsonwebtoken::decode::<serde_json::Value>(jwt, &key, &v)
        .expect("signature and claims verify with the certificate's public key")
        .claims;
    let exp = claims["exp"].as_i64().expect("exp");
    let iat = claims["iat"].as_i64().expect("iat");
    assert!(exp > iat && exp - iat <= 600, "short exp: {}", exp - iat);
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() >= 16), "jti");
    // The certificate's own expiry is a gauge, weeks of warning before a human must renew it.
    let body = daemon.metrics().await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_credential_expiry_timestamp_seconds",
            &[("provider", "teams"), ("credential", "certificate")]
        ),
        Some(CERT_NOT_AFTER)
    );
    assert_eq!(
        metric(
            &body,
            "tokenwarden_provider_api_calls_total",
            &[("provider", "teams"), ("call", "token"), ("status", "200")]
        ),
        Some(1.0)
    );
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teams_expired_client_secret_is_said_distinctly() {
    let fake = Recorder::start(|_, _| {
        Answer::json(
            401,
            json!({"error": "invalid_client",
                   "error_description": "AADSTS7000222: The provided client secret keys for app '1111' are expired. Trace ID: 0f0e",
                   "error_codes": [7000222], "timestamp": "2026-12-01 10:00:00Z"}),
        )
    })
    .await;
    let redis = RedisServer::start();
    seed_provider(
        &mut redis.conn(),
        TENANT,
        "teams",
        &record(&[
            ("provider_type", "teams"),
            ("client_id", "app-1111"),
            ("account_key", "contoso"),
            ("token_url", &fake.url("/{account_key}/oauth2/v2.0/token")),
            ("client_secret_expires_at", "2026-11-30T00:00:00"),
        ]),
    );
    let daemon = Daemon::start(&redis, &[NO_PROBES]);
    let health = health_key(TENANT, "teams");
    wait_field(&redis, &health, "state", "reauth_required").await;
    fake.print("teams (client secret, expired)");
    let s = &fake.requests()[0];
    assert_eq!(s.field("client_id"), Some("app-1111"));
    assert_eq!(s.field("client_secret"), Some("s3cret-value-1"));
    assert_eq!(s.field("grant_type"), Some("client_credentials"));
    let reason = hget(&mut redis.conn(), &health, "reason").unwrap_or_default();
    assert!(reason.starts_with("client_secret_expired"), "{reason}");
    let body = daemon.metrics().await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_credential_expiry_timestamp_seconds",
            &[("provider", "teams"), ("credential", "client_secret")]
        ),
        Some(1_795_996_800.0)
    );
    assert!(!daemon.logs().contains("s3cret-value-1"));
}

fn rc_token(n: usize) -> Answer {
    Answer::json(
        200,
        json!({"access_token": format!("U0pDMDFQMDFQQVMwMHxBQUJ-rc-at-{n}"), "token_type": "bearer",
               "expires_in": 3600, "refresh_token": format!("U0pDMDFQMDFQQVMwMnxBQUJ-rc-rt-{n}"),
               "refresh_token_expires_in": 604799, "scope": "ReadAccounts", "owner_id": "62264425001"}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ringcentral_jwt_logs_in_then_a_dead_refresh_token_falls_back_once() {
    // Record a: JWT only. Record b: a dead refresh token and a JWT credential.
    let fake = Recorder::start(|s: &Seen, n| {
        if s.field("grant_type") == Some("refresh_token") {
            Answer::json(
                400,
                json!({"error": "invalid_grant", "errors": [{"errorCode": "OAU-211",
                       "message": "Token is revoked"}], "error_description": "Token is revoked"}),
            )
        } else {
            rc_token(n)
        }
    })
    .await;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let url = fake.url("/restapi/oauth/token");
    for (p, rt) in [("rc-jwt", ""), ("rc-dead", "dead-refresh-token-1")] {
        seed_provider(
            &mut conn,
            TENANT,
            p,
            &record(&[
                ("provider_type", "ringcentral"),
                ("client_id", "rc-client"),
                ("client_secret", "rc-secret-123"),
                ("token_url", &url),
                ("refresh_token", rt),
                (
                    "jwt_assertion",
                    &format!("eyJhbGciOiJSUzI1NiJ9.jwt-credential-{p}"),
                ),
            ]),
        );
    }
    let catalog = catalog_with_budget(50, 1);
    let daemon = Daemon::start(
        &redis,
        &[
            ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
            NO_PROBES,
        ],
    );
    for p in ["rc-jwt", "rc-dead"] {
        let key = provider_key(TENANT, p);
        wait_until(
            &format!("{p}: the JWT grant's refresh token kept"),
            Duration::from_secs(20),
            || hget(&mut conn, &key, "refresh_token").is_some_and(|rt| rt.contains("-rc-rt-")),
        )
        .await;
        wait_field(&redis, &health_key(TENANT, p), "state", "healthy").await;
    }
    fake.print("ringcentral (jwt bearer, fallback)");
    let seen = fake.requests();
    for s in &seen {
        assert_eq!(s.method, "POST");
        assert_eq!(s.path, "/restapi/oauth/token");
        assert_eq!(
            s.header("authorization"),
            Some(basic("rc-client", "rc-secret-123").as_str())
        );
        assert_eq!(s.field("scope"), None);
        assert_eq!(s.field("client_secret"), None);
    }
    let jwt: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.field("grant_type") == Some("urn:ietf:params:oauth:grant-type:jwt-bearer"))
        .collect();
    let refreshes: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.field("grant_type") == Some("refresh_token"))
        .collect();
    assert_eq!(jwt.len(), 2, "one login each");
    assert_eq!(refreshes.len(), 1, "the dead refresh token was tried once");
    assert_eq!(
        refreshes[0].field("refresh_token"),
        Some("dead-refresh-token-1")
    );
    let assertions: Vec<&str> = jwt.iter().filter_map(|s| s.field("assertion")).collect();
    assert!(assertions.contains(&"eyJhbGciOiJSUzI1NiJ9.jwt-credential-rc-dead"));
    // The refresh token's own lifetime reaches health and the gauge, and bounds the schedule.
    let body = daemon.metrics().await;
    let rt_expiry = metric(
        &body,
        "tokenwarden_refresh_token_expiry_timestamp_seconds",
        &[("provider", "rc-dead")],
    )
    .expect("refresh token expiry gauge");
    let now = chrono::Utc::now().timestamp() as f64;
    assert!((rt_expiry - now - 604_799.0).abs() < 60.0, "{rt_expiry}");
    let next = metric(
        &body,
        "tokenwarden_token_next_refresh_timestamp_seconds",
        &[("provider", "rc-dead")],
    )
    .expect("next refresh");
    assert!(next < rt_expiry && next < now + 3600.0, "{next}");
    // The next refresh uses the refresh token the JWT grant returned (rotation from then on).
    redis::cmd("HSET")
        .arg(provider_key(TENANT, "rc-jwt"))
        .arg("token_expiry")
        .arg("")
        .query::<()>(&mut conn)
        .expect("HSET");
    let n = seen.len();
    wait_until("a refresh of rc-jwt", Duration::from_secs(20), || {
        fake.requests().len() > n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goto_personal_access_token_and_zoom_account_credentials() {
    let fake = Recorder::start(|s: &Seen, n| match s.path.as_str() {
        "/oauth/token" if s.field("grant_type") == Some("refresh_token") => Answer::json(
            400,
            json!({"reason": "Invalid Token!", "error": "invalid_grant"}),
        ),
        "/oauth/token" => Answer::json(
            200,
            json!({"access_token": format!("zoom-at-{n}"), "token_type": "bearer",
                   "expires_in": 3599, "scope": "phone:read:admin", "api_url": "https://api.zoom.us"}),
        ),
        _ => Answer::json(
            200,
            json!({"access_token": format!("goto-at-{n}"), "token_type": "bearer",
                   "expires_in": 3600, "scope": "voice-admin.v1.read", "principal": "admin@example.com"}),
        ),
    })
    .await;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    seed_provider(
        &mut conn,
        TENANT,
        "goto",
        &record(&[
            ("provider_type", "goto"),
            ("client_id", "goto-client"),
            ("token_url", &fake.url("/goto/oauth/token")),
            ("personal_access_token", "goto-pat-0123456789"),
        ]),
    );
    seed_provider(
        &mut conn,
        TENANT,
        "zoom",
        &record(&[
            ("provider_type", "zoom"),
            ("client_id", "zoom-client"),
            ("account_key", "zoom-account-42"),
            ("token_url", &fake.url("/oauth/token")),
        ]),
    );
    seed_provider(
        &mut conn,
        TENANT,
        "zoom-user",
        &record(&[
            ("provider_type", "zoom"),
            ("client_id", "zoom-client"),
            ("refresh_token", "zoom-old-refresh-token"),
            ("token_url", &fake.url("/oauth/token")),
        ]),
    );
    let daemon = Daemon::start(&redis, &[NO_PROBES]);
    wait_field(&redis, &health_key(TENANT, "goto"), "state", "healthy").await;
    wait_field(&redis, &health_key(TENANT, "zoom"), "state", "healthy").await;
    wait_field(
        &redis,
        &health_key(TENANT, "zoom-user"),
        "state",
        "reauth_required",
    )
    .await;
    fake.print("goto (personal access token), zoom (account credentials, refresh)");
    let goto = &fake.to("/goto/oauth/token")[0];
    assert_eq!(goto.method, "POST");
    assert_eq!(
        goto.header("authorization"),
        Some(basic("goto-client", "s3cret-value-1").as_str())
    );
    assert_eq!(goto.field("grant_type"), Some("personal_access_token"));
    assert_eq!(goto.field("pat"), Some("goto-pat-0123456789"));
    assert_eq!(goto.field("scope"), None);
    let zoom = fake.to("/oauth/token");
    let s2s = zoom
        .iter()
        .find(|s| s.field("grant_type") == Some("account_credentials"))
        .expect("account_credentials");
    assert_eq!(s2s.field("account_id"), Some("zoom-account-42"));
    assert_eq!(s2s.field("scope"), None);
    assert_eq!(
        s2s.header("authorization"),
        Some(basic("zoom-client", "s3cret-value-1").as_str())
    );
    let user = zoom
        .iter()
        .find(|s| s.field("grant_type") == Some("refresh_token"))
        .expect("refresh_token");
    assert_eq!(user.field("refresh_token"), Some("zoom-old-refresh-token"));
    let reason = hget(&mut conn, &health_key(TENANT, "zoom-user"), "reason").unwrap_or_default();
    assert!(reason.starts_with("invalid_grant"), "{reason}");
    assert_eq!(
        hget(&mut conn, &provider_key(TENANT, "goto"), "refresh_token"),
        None,
        "no refresh token written for a grant that returned none"
    );
    let body = daemon.metrics().await;
    assert_eq!(
        metric(
            &body,
            "tokenwarden_provider_api_calls_total",
            &[
                ("provider", "zoom-user"),
                ("call", "token"),
                ("status", "400")
            ]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_added_by_configuration_alone_is_refreshed() {
    let fake = Recorder::start(|_, n| {
        Answer::json(
            200,
            json!({"access_token": format!("acme-at-{n}"), "token_type": "Bearer", "expires_in": "1800"}),
        )
    })
    .await;
    let catalog = tempfile_path::write(
        "providers.toml",
        &format!(
            "[providers.acme]\ntoken_url = \"{}\"\ntoken_auth_method = \"body\"\napp_grant_type = \"client_credentials\"\ndefault_expires_in_secs = 900\nhealth_path = \"/v1/ping\"\n[providers.acme.scope]\nclient_credentials = \"acme.read {{scopes}}\"\n[providers.acme.sync.users]\npath = \"/v1/users\"\nitems = \"users\"\npagination = \"none\"\n",
            fake.url("/{account_key}/token")
        ),
    );
    let out = Daemon::cli(
        &["check-config"],
        &[("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let redis = RedisServer::start();
    seed_provider(
        &mut redis.conn(),
        TENANT,
        "acme",
        &record(&[
            ("provider_type", "acme"),
            ("client_id", "acme-client"),
            ("account_key", "org-7"),
            ("scopes", r#"["calls.read", "users.read"]"#),
        ]),
    );
    let _daemon = Daemon::start(
        &redis,
        &[
            ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
            NO_PROBES,
        ],
    );
    wait_field(
        &redis,
        &provider_key(TENANT, "acme"),
        "access_token",
        "acme-at-0",
    )
    .await;
    fake.print("acme (added by a catalog file)");
    let s = &fake.requests()[0];
    assert_eq!(s.path, "/org-7/token");
    assert_eq!(s.field("grant_type"), Some("client_credentials"));
    assert_eq!(s.field("client_id"), Some("acme-client"));
    assert_eq!(s.field("client_secret"), Some("s3cret-value-1"));
    assert_eq!(s.field("scope"), Some("acme.read calls.read users.read"));
    // A bad entry is refused, naming the entry and the field.
    let bad = tempfile_path::write(
        "providers.toml",
        "[providers.acme]\ntoken_url = \"https://idp.example/token\"\nhealth_expect_status = 999\n",
    );
    let out = Daemon::cli(
        &["check-config"],
        &[("TOKENWARDEN_REFRESH_CATALOG_FILE", bad.as_str())],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("providers.acme.health_expect_status"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_provider_is_probed_never_refreshed() {
    let fake = Recorder::start(|s: &Seen, _| {
        if s.header("x-api-key") == Some("key-abcdef-123456") {
            Answer::json(200, json!({"ok": true}))
        } else {
            Answer::json(401, json!({"error": "no key"}))
        }
    })
    .await;
    let catalog = tempfile_path::write(
        "providers.toml",
        "[providers.keyed]\nhealth_path = \"/v1/status\"\napi_key_header = \"X-Api-Key\"\nhealth_expect_status = 200\n",
    );
    let redis = RedisServer::start();
    seed_provider(
        &mut redis.conn(),
        TENANT,
        "keyed",
        &record(&[
            ("provider_type", "keyed"),
            ("auth_type", "api_key"),
            ("api_key", "key-abcdef-123456"),
            ("api_base_url", &fake.url("")),
        ]),
    );
    let daemon = Daemon::start(
        &redis,
        &[
            ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
            ("TOKENWARDEN_HEALTH_PROBE_INTERVAL_SECS", "1"),
        ],
    );
    let mut conn = redis.conn();
    wait_until("two probes", Duration::from_secs(20), || {
        fake.to("/v1/status").len() >= 2
    })
    .await;
    wait_field(&redis, &health_key(TENANT, "keyed"), "state", "healthy").await;
    fake.print("api_key probe");
    assert!(fake
        .requests()
        .iter()
        .all(|s| s.path == "/v1/status" && s.method == "GET"));
    assert_eq!(
        hget(&mut conn, &provider_key(TENANT, "keyed"), "access_token"),
        None
    );
    let body = daemon.metrics().await;
    assert_eq!(
        metric(&body, "tokenwarden_provider_up", &[("provider", "keyed")]),
        Some(1.0)
    );
    assert!(metric(
        &body,
        "tokenwarden_token_next_refresh_timestamp_seconds",
        &[("provider", "keyed")]
    )
    .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_401_to_a_valid_token_refreshes_once() {
    // The API refuses every token: one refresh, then no more until a probe passes again.
    let fake = Recorder::start(|s: &Seen, n| {
        if s.path == "/oauth/token" {
            Answer::json(
                200,
                json!({"access_token": format!("fresh-at-{n}"), "expires_in": 3600}),
            )
        } else {
            Answer::json(401, json!({"error": "unauthorized"}))
        }
    })
    .await;
    let redis = RedisServer::start();
    let expiry = (chrono::Utc::now() + chrono::Duration::hours(1))
        .naive_utc()
        .format("%Y-%m-%dT%H:%M:%S")
        .to_string();
    seed_provider(
        &mut redis.conn(),
        TENANT,
        "goto",
        &record(&[
            ("provider_type", "goto"),
            ("client_id", "goto-client"),
            ("refresh_token", "goto-rt-0123456789"),
            ("access_token", "at-we-believe-valid"),
            ("token_expiry", &expiry),
            ("token_url", &fake.url("/oauth/token")),
            ("api_base_url", &fake.url("")),
            ("health_path", "/admin/rest/v1/me"),
        ]),
    );
    let _daemon = Daemon::start(&redis, &[("TOKENWARDEN_HEALTH_PROBE_INTERVAL_SECS", "1")]);
    wait_until("a refresh after the 401", Duration::from_secs(20), || {
        !fake.to("/oauth/token").is_empty()
    })
    .await;
    wait_until("probes of the new token", Duration::from_secs(20), || {
        fake.to("/admin/rest/v1/me")
            .iter()
            .filter(|s| s.header("authorization") == Some("Bearer fresh-at-1"))
            .count()
            >= 2
            || fake.to("/admin/rest/v1/me").len() >= 6
    })
    .await;
    fake.print("probe 401 then one refresh");
    let tokens = fake.to("/oauth/token");
    assert_eq!(
        tokens.len(),
        1,
        "one refresh; the new token refused too is not the token's fault"
    );
    assert_eq!(tokens[0].field("refresh_token"), Some("goto-rt-0123456789"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_ringcentral_tokens_due_together_stay_within_their_budget() {
    let fake = Recorder::start(|_, n| rc_token(n)).await;
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let url = fake.url("/restapi/oauth/token");
    for i in 0..50 {
        seed_provider(
            &mut conn,
            TENANT,
            &format!("rc-{i:02}"),
            &record(&[
                ("provider_type", "ringcentral"),
                ("client_id", "rc-shared-app"),
                ("client_secret", "rc-secret-123"),
                ("refresh_token", &format!("rc-rt-start-{i:02}")),
                ("token_url", &url),
            ]),
        );
    }
    let catalog = catalog_with_budget(5, 2);
    let env = [
        ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
        NO_PROBES,
    ];
    let a = Daemon::start(&redis, &env);
    let b = Daemon::start(&redis, &env);
    wait_until("50 refreshes", Duration::from_secs(60), || {
        fake.requests().len() >= 50
    })
    .await;
    let times: Vec<std::time::Instant> = fake.requests().iter().map(|s| s.at).collect();
    assert_eq!(times.len(), 50, "each token refreshed once");
    let mut worst = 0;
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(2))
            .count();
        worst = worst.max(in_window);
    }
    let span = times[49].duration_since(times[0]);
    println!("50 token calls over {span:?}; at most {worst} in any 2 s window");
    assert!(worst <= 5, "{worst} calls within 2 s");
    assert!(span >= Duration::from_millis(19_000), "spread: {span:?}");
    for d in [&a, &b] {
        let body = d.metrics().await;
        let throttled = support::metrics::metric_sum(
            &body,
            "tokenwarden_token_refresh_total",
            &[("result", "throttled")],
        );
        let failures = support::metrics::metric_sum(
            &body,
            "tokenwarden_token_refresh_total",
            &[("result", "transient_error")],
        );
        assert_eq!(failures, 0.0, "waiting for the budget is not a failure");
        assert!(throttled >= 0.0);
    }
}

/// Health probes stay within the provider's API budget across replicas (two daemons probing
/// the same five records of one client id, a budget of 2 per minute: calls spaced 30 s apart,
/// so one probe in the window watched), and a 429 to a probe stops that budget's probes for
/// its period while other providers go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_stay_within_the_api_budget_and_a_429_slows_only_that_budget() {
    let fake = Recorder::start(|s: &Seen, _| match s.path.as_str() {
        "/v1/status" if s.header("x-api-key") == Some("key-abcdef-123456") => {
            Answer::json(200, json!({"ok": true}))
        }
        "/v1/limited" => Answer::json(429, json!({"error": "slow down"})),
        _ => Answer::json(401, json!({"error": "no key"})),
    })
    .await;
    let catalog = tempfile_path::write(
        "providers.toml",
        "[providers.keyed]\nhealth_path = \"/v1/status\"\napi_key_header = \"X-Api-Key\"\n\
         api_budget = { scope = \"client_id\", requests = 2, per_secs = 60 }\n\
         [providers.limited]\nhealth_path = \"/v1/limited\"\napi_key_header = \"X-Api-Key\"\n\
         api_budget = { scope = \"client_id\", requests = 100, per_secs = 60 }\n",
    );
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    for i in 0..5 {
        seed_provider(
            &mut conn,
            &format!("{TENANT}{i}"),
            "keyed",
            &record(&[
                ("provider_type", "keyed"),
                ("auth_type", "api_key"),
                ("client_id", "shared-app"),
                ("api_key", "key-abcdef-123456"),
                ("api_base_url", &fake.url("")),
            ]),
        );
    }
    seed_provider(
        &mut conn,
        TENANT,
        "limited",
        &record(&[
            ("provider_type", "limited"),
            ("auth_type", "api_key"),
            ("client_id", "other-app"),
            ("api_key", "key-abcdef-123456"),
            ("api_base_url", &fake.url("")),
        ]),
    );
    let env = [
        ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
        ("TOKENWARDEN_HEALTH_PROBE_INTERVAL_SECS", "1"),
        ("TOKENWARDEN_REPLICA_SHARE_FLEET", "false"),
    ];
    let a = Daemon::start(&redis, &env);
    let b = Daemon::start(&redis, &env);
    a.wait_ready(Duration::from_secs(20)).await;
    b.wait_ready(Duration::from_secs(20)).await;
    // Rounds pass (both replicas defer probes of both budgets), then count what was sent.
    let deferred = |body: &str, provider: &str| {
        metric_sum(
            body,
            "tokenwarden_health_probes_deferred_total",
            &[("provider", provider)],
        )
    };
    for d in [&a, &b] {
        support::wait_until_async(
            "several probe rounds deferred by the budgets",
            Duration::from_secs(25),
            || async {
                let body = d.metrics().await;
                deferred(&body, "keyed") >= 10.0 && deferred(&body, "limited") >= 3.0
            },
        )
        .await;
    }
    fake.print("probes within the API budget");
    assert_eq!(
        fake.to("/v1/status").len(),
        1,
        "five records, two replicas, one slot per 30 s: one probe"
    );
    assert_eq!(
        fake.to("/v1/limited").len(),
        1,
        "after the 429 no probe of that budget until its period is over"
    );
}

/// A 429 slows its budget, not the fleet: two records sharing an account budget and one with
/// its own; the first budget's 429 (`Retry-After: 3`) holds back both of its records for three
/// seconds while the third keeps refreshing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_429_slows_its_budget_not_the_fleet() {
    let text = include_str!("../config/providers.toml").replace(
        "token_budget = { scope = \"client_id\", requests = 10, per_secs = 1 }\napi_budget = { scope = \"account_key\", requests = 10, per_secs = 1 }",
        "token_budget = { scope = \"account_key\", requests = 50, per_secs = 1 }",
    );
    assert!(
        text.contains("scope = \"account_key\", requests = 50"),
        "the GoTo budget line moved"
    );
    let catalog = tempfile_path::write("providers.toml", &text);
    let fake = FakeProvider::start(1);
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let soon = (chrono::Utc::now() + chrono::TimeDelta::seconds(1)).to_rfc3339();
    let mut clients = Vec::new();
    for (name, account) in [
        ("a1", "acct-shared"),
        ("a2", "acct-shared"),
        ("b", "acct-other"),
    ] {
        let (id, secret, rt) = (
            format!("cid-{name}"),
            format!("cs-{name}-secret"),
            format!("rt-{name}-seed"),
        );
        fake.seed(
            json!({"client_id": id, "client_secret": secret, "refresh_token": rt, "expires_in": 1}),
        )
        .await;
        let mut fields = oauth_record(&fake, &id, &secret, &rt, &soon);
        fields.retain(|(k, _)| k != "account_key");
        fields.push(("account_key".into(), account.into()));
        seed_provider(&mut conn, TENANT, name, &fields);
        clients.push(id);
    }
    let daemon = Daemon::start(
        &redis,
        &[
            ("TOKENWARDEN_REFRESH_CATALOG_FILE", catalog.as_str()),
            NO_PROBES,
            ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0"),
        ],
    );
    daemon.wait_ready(Duration::from_secs(20)).await;
    let stat = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    for c in &clients {
        support::wait_until_async(
            "every record refreshed",
            Duration::from_secs(20),
            || async { stat(&fake.client_stats(c).await, "refresh_ok") >= 1 },
        )
        .await;
    }
    fake.faults(json!({"client_id": clients[0], "rate_limit": 1, "retry_after": "3"}))
        .await;
    support::wait_until_async("the 429", Duration::from_secs(20), || async {
        stat(&fake.stats().await, "rate_limited") >= 1
    })
    .await;
    let limited_at = std::time::Instant::now();
    let shared_calls = |s: &serde_json::Value| {
        stat(&s["clients"][&clients[0]], "calls") + stat(&s["clients"][&clients[1]], "calls")
    };
    let before = fake.stats().await;
    let (shared_before, other_before) = (
        shared_calls(&before),
        stat(&before["clients"][&clients[2]], "refresh_ok"),
    );
    support::wait_until_async(
        "the shared budget's next call",
        Duration::from_secs(20),
        || async { shared_calls(&fake.stats().await) > shared_before },
    )
    .await;
    let held = limited_at.elapsed();
    let after = fake.stats().await;
    let other = stat(&after["clients"][&clients[2]], "refresh_ok") - other_before;
    eprintln!("429 figures: the shared budget held {held:?}; the other budget refreshed {other} times meanwhile");
    assert!(
        held >= Duration::from_millis(2500),
        "the shared budget called again {held:?} after its 429 (Retry-After: 3)"
    );
    assert!(
        other >= 2,
        "the other budget was held too: {other} refreshes in {held:?}"
    );
    assert_eq!(stat(&after, "reuse"), 0, "{after}");
}
