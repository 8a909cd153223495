//! Tests of the fake OAuth provider itself, over real HTTP: they prove it is as strict as the
//! real providers it stands in for (single-use rotating refresh tokens, checked client
//! authentication, well-formed requests), and that every fault behaves as documented.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{wait_until_async, FakeProvider};

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// A token response: status, `Retry-After` if any, JSON body.
struct Answer {
    status: u16,
    retry_after: Option<String>,
    content_type: Option<String>,
    body: Value,
}

impl Answer {
    fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
    fn str(&self, field: &str) -> String {
        self.body[field]
            .as_str()
            .unwrap_or_else(|| panic!("no string {field:?} in {}", self.body))
            .to_string()
    }
}

async fn answer(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("token request");
    let status = resp.status().as_u16();
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let retry_after = header(reqwest::header::RETRY_AFTER);
    let content_type = header(reqwest::header::CONTENT_TYPE);
    let text = resp.text().await.expect("token answer body");
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON ({e}): {text}"));
    Answer {
        status,
        retry_after,
        content_type,
        body,
    }
}

/// refresh_token grant with the credentials in the body.
async fn refresh_body(fake: &FakeProvider, id: &str, secret: &str, rt: &str) -> Answer {
    answer(http().post(fake.token_url()).form(&[
        ("grant_type", "refresh_token"),
        ("refresh_token", rt),
        ("client_id", id),
        ("client_secret", secret),
    ]))
    .await
}

/// refresh_token grant with HTTP Basic, id and secret form-encoded first (RFC 6749 2.3.1).
async fn refresh_basic(fake: &FakeProvider, id: &str, secret: &str, rt: &str) -> Answer {
    answer(
        http()
            .post(fake.token_url())
            .basic_auth(form_encode(id), Some(form_encode(secret)))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", rt)]),
    )
    .await
}

fn form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

async fn seed(fake: &FakeProvider, id: &str, rt: &str, extra: Value) {
    let mut client = json!({"client_id": id, "client_secret": "s3cret", "refresh_token": rt});
    if let (Some(client), Some(extra)) = (client.as_object_mut(), extra.as_object()) {
        client.extend(extra.clone());
    }
    fake.seed(client).await;
}

#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_is_invalid_grant() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "c1", "rt-0", json!({})).await;

    let first = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.body["token_type"], "Bearer");
    assert_eq!(first.body["expires_in"], 3600);
    let rt1 = first.str("refresh_token");
    assert_ne!(rt1, "rt-0");
    assert!(first.body.get("refresh_token_expires_in").is_none());

    // The used refresh token is dead.
    let reuse = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(reuse.status, 400);
    assert_eq!(reuse.error(), "invalid_grant");
    assert!(reuse.body["error_description"].is_string());

    // The new one works once and rotates again.
    let second = refresh_body(&fake, "c1", "s3cret", &rt1).await;
    assert_eq!(second.status, 200, "{}", second.body);
    let rt2 = second.str("refresh_token");
    assert_ne!(rt2, rt1);
    assert_ne!(second.str("access_token"), first.str("access_token"));

    // An unknown refresh token is invalid_grant but not a reuse.
    let unknown = refresh_body(&fake, "c1", "s3cret", "never-issued").await;
    assert_eq!((unknown.status, unknown.error()), (400, "invalid_grant"));

    let stats = fake.stats().await;
    assert_eq!(stats["refresh_ok"], 2);
    assert_eq!(stats["invalid_grant"], 2);
    assert_eq!(stats["reuse"], 1);
    assert_eq!(stats["calls"], 4);
    let c1 = &stats["clients"]["c1"];
    assert_eq!(c1["calls"], 4);
    assert_eq!(c1["refresh_ok"], 2);
    assert_eq!(c1["reuse"], 1);
    assert_eq!(c1["live_refresh_token"], json!(rt2));

    let summary = fake.stats_summary().await;
    assert!(summary.get("clients").is_none());
    assert_eq!(summary["refresh_ok"], 2);
}

#[tokio::test]
async fn refresh_token_belongs_to_its_client() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "owner", "rt-owner", json!({})).await;
    seed(&fake, "thief", "rt-thief", json!({})).await;
    let stolen = refresh_body(&fake, "thief", "s3cret", "rt-owner").await;
    assert_eq!((stolen.status, stolen.error()), (400, "invalid_grant"));
    // Still alive for its owner.
    let own = refresh_body(&fake, "owner", "s3cret", "rt-owner").await;
    assert_eq!(own.status, 200, "{}", own.body);
}

#[tokio::test]
async fn client_authentication_mode_and_secret_are_enforced() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "basic-client", "rt-b1", json!({"auth": "basic"})).await;
    seed(&fake, "body-client", "rt-d1", json!({"auth": "body"})).await;
    seed(&fake, "any-client", "rt-a1", json!({})).await;

    // Wrong mode: 401 invalid_client, and the refresh token is not consumed.
    let wrong = refresh_body(&fake, "basic-client", "s3cret", "rt-b1").await;
    assert_eq!((wrong.status, wrong.error()), (401, "invalid_client"));
    let right = refresh_basic(&fake, "basic-client", "s3cret", "rt-b1").await;
    assert_eq!(right.status, 200, "{}", right.body);

    let wrong = refresh_basic(&fake, "body-client", "s3cret", "rt-d1").await;
    assert_eq!((wrong.status, wrong.error()), (401, "invalid_client"));
    let right = refresh_body(&fake, "body-client", "s3cret", "rt-d1").await;
    assert_eq!(right.status, 200, "{}", right.body);

    // "any" takes both.
    let by_basic = refresh_basic(&fake, "any-client", "s3cret", "rt-a1").await;
    assert_eq!(by_basic.status, 200, "{}", by_basic.body);
    let rt = by_basic.str("refresh_token");
    let by_body = refresh_body(&fake, "any-client", "s3cret", &rt).await;
    assert_eq!(by_body.status, 200, "{}", by_body.body);

    // Wrong secret, unknown client, no credentials at all.
    let rt = by_body.str("refresh_token");
    let bad_secret = refresh_body(&fake, "any-client", "nope", &rt).await;
    assert_eq!(
        (bad_secret.status, bad_secret.error()),
        (401, "invalid_client")
    );
    let bad_secret = refresh_basic(&fake, "any-client", "nope", &rt).await;
    assert_eq!(
        (bad_secret.status, bad_secret.error()),
        (401, "invalid_client")
    );
    let unknown = refresh_body(&fake, "nobody", "s3cret", &rt).await;
    assert_eq!((unknown.status, unknown.error()), (401, "invalid_client"));
    let anonymous = answer(
        http()
            .post(fake.token_url())
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &rt)]),
    )
    .await;
    assert_eq!(
        (anonymous.status, anonymous.error()),
        (401, "invalid_client")
    );

    // Both methods at once is a malformed request (RFC 6749 2.3).
    let both = answer(
        http()
            .post(fake.token_url())
            .basic_auth("any-client", Some("s3cret"))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", &rt),
                ("client_secret", "s3cret"),
            ]),
    )
    .await;
    assert_eq!((both.status, both.error()), (400, "invalid_request"));

    // None of the failures consumed the token.
    let still = refresh_body(&fake, "any-client", "s3cret", &rt).await;
    assert_eq!(still.status, 200, "{}", still.body);

    let stats = fake.stats().await;
    assert_eq!(stats["bad_client"], 6);
    assert_eq!(stats["clients"]["basic-client"]["bad_client"], 1);
    assert_eq!(stats["reuse"], 0);
}

#[tokio::test]
async fn form_bodies_and_basic_credentials_are_decoded() {
    let fake = FakeProvider::start(3600);
    let id = "tenant a+b/c";
    let secret = "p%ss w+rd&=é:x";
    fake.seed(json!({"client_id": id, "client_secret": secret, "refresh_token": "r+t /1=&"}))
        .await;
    // reqwest's form encoder writes spaces as '+' and escapes the rest.
    let by_body = refresh_body(&fake, id, secret, "r+t /1=&").await;
    assert_eq!(by_body.status, 200, "{}", by_body.body);
    let rt = by_body.str("refresh_token");
    let by_basic = refresh_basic(&fake, id, secret, &rt).await;
    assert_eq!(by_basic.status, 200, "{}", by_basic.body);

    // Hand-written encodings: %20 and + are both spaces.
    fake.seed(json!({"client_id": "x y", "client_secret": "a b", "refresh_token": "t t"}))
        .await;
    let raw = answer(
        http()
            .post(fake.token_url())
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=refresh_token&refresh_token=t%20t&client_id=x+y&client_secret=a%20b"),
    )
    .await;
    assert_eq!(raw.status, 200, "{}", raw.body);
}

#[tokio::test]
async fn malformed_token_requests_are_rejected() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "c1", "rt-0", json!({})).await;
    let raw = |content_type: &'static str, body: &'static str| {
        http()
            .post(fake.token_url())
            .header("content-type", content_type)
            .body(body)
    };
    let form = "application/x-www-form-urlencoded";
    let cases = [
        (
            raw("application/json", r#"{"grant_type":"refresh_token"}"#),
            "invalid_request",
        ),
        (
            raw(form, "grant_type=refresh_token&refresh_token=%zz&client_id=c1&client_secret=s3cret"),
            "invalid_request",
        ),
        (
            raw(form, "grant_type=refresh_token&refresh_token=rt-0&refresh_token=rt-0&client_id=c1&client_secret=s3cret"),
            "invalid_request",
        ),
        (
            raw(form, "refresh_token=rt-0&client_id=c1&client_secret=s3cret"),
            "invalid_request",
        ),
        (
            raw(form, "grant_type=refresh_token&client_id=c1&client_secret=s3cret"),
            "invalid_request",
        ),
        (
            raw(form, "grant_type=password&client_id=c1&client_secret=s3cret"),
            "unsupported_grant_type",
        ),
    ];
    for (req, error) in cases {
        let got = answer(req).await;
        assert_eq!((got.status, got.error()), (400, error), "{}", got.body);
    }
    // A bad Authorization header is a client authentication failure.
    let bad_basic = answer(
        http()
            .post(fake.token_url())
            .header("authorization", "Basic !!!not-base64")
            .form(&[("grant_type", "refresh_token"), ("refresh_token", "rt-0")]),
    )
    .await;
    assert_eq!(
        (bad_basic.status, bad_basic.error()),
        (401, "invalid_client")
    );
    // Wrong method and unknown path.
    let get = http()
        .get(fake.token_url())
        .send()
        .await
        .expect("GET /token");
    assert_eq!(get.status().as_u16(), 405);
    let missing = http()
        .get(format!("{}/nope", fake.url()))
        .send()
        .await
        .expect("GET /nope");
    assert_eq!(missing.status().as_u16(), 404);
    // Nothing consumed the token.
    let ok = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[tokio::test]
async fn client_credentials_and_account_credentials_grants() {
    let fake = FakeProvider::start(600);
    seed(&fake, "daemon-app", "", json!({"auth": "body"})).await;
    for grant in ["client_credentials", "account_credentials"] {
        let got = answer(http().post(fake.token_url()).form(&[
            ("grant_type", grant),
            ("client_id", "daemon-app"),
            ("client_secret", "s3cret"),
            ("scope", "https://graph.microsoft.com/.default"),
            ("account_id", "acct-1"),
        ]))
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert_eq!(got.body["expires_in"], 600);
        assert!(got.body.get("refresh_token").is_none(), "{}", got.body);
    }
    assert_eq!(fake.stats().await["cc_ok"], 2);
}

#[tokio::test]
async fn fail_503_then_recovers_without_consuming_the_token() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "c1", "rt-0", json!({"fail_503": 2})).await;
    for _ in 0..2 {
        let got = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
        assert_eq!((got.status, got.error()), (503, "temporarily_unavailable"));
    }
    let ok = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(ok.status, 200, "{}", ok.body);

    // Switched on again at runtime.
    fake.faults(json!({"client_id": "c1", "fail_503": 1})).await;
    let rt = ok.str("refresh_token");
    let got = refresh_body(&fake, "c1", "s3cret", &rt).await;
    assert_eq!(got.status, 503);
    let ok = refresh_body(&fake, "c1", "s3cret", &rt).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let stats = fake.stats().await;
    assert_eq!(stats["unavailable"], 3);
    assert_eq!(stats["reuse"], 0);
}

#[tokio::test]
async fn rate_limit_with_and_without_retry_after() {
    let fake = FakeProvider::start(3600);
    seed(
        &fake,
        "c1",
        "rt-0",
        json!({"rate_limit": 1, "retry_after": "7"}),
    )
    .await;
    let limited = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.retry_after.as_deref(), Some("7"));
    let ok = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let rt = ok.str("refresh_token");

    // An HTTP date, as Zoom may send for daily limits.
    let date = "Wed, 21 Oct 2026 07:28:00 GMT";
    fake.faults(json!({"client_id": "c1", "rate_limit": 1, "retry_after": date}))
        .await;
    let limited = refresh_body(&fake, "c1", "s3cret", &rt).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.retry_after.as_deref(), Some(date));

    // null: no header at all (GoTo documents none).
    fake.faults(json!({"client_id": "c1", "rate_limit": 2, "retry_after": null}))
        .await;
    for _ in 0..2 {
        let limited = refresh_body(&fake, "c1", "s3cret", &rt).await;
        assert_eq!(limited.status, 429);
        assert_eq!(limited.retry_after, None);
    }
    let ok = refresh_body(&fake, "c1", "s3cret", &rt).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(fake.stats().await["rate_limited"], 4);
}

#[tokio::test]
async fn delay_per_client_and_global() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "slow", "rt-s", json!({"delay_ms": 300})).await;
    seed(&fake, "fast", "rt-f", json!({})).await;

    let started = Instant::now();
    let got = refresh_body(&fake, "slow", "s3cret", "rt-s").await;
    assert_eq!(got.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    fake.mode(json!({"delay_ms": 250})).await;
    let started = Instant::now();
    let got = refresh_body(&fake, "fast", "s3cret", "rt-f").await;
    assert_eq!(got.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));

    fake.mode(json!({"delay_ms": 0})).await;
    fake.faults(json!({"client_id": "slow", "delay_ms": 0}))
        .await;
    assert_eq!(fake.stats().await["global_delay_ms"], 0);
}

#[tokio::test]
async fn revoked_and_invalid_client_faults() {
    let fake = FakeProvider::start(3600);
    seed(&fake, "c1", "rt-0", json!({"revoked": true})).await;
    let got = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!((got.status, got.error()), (400, "invalid_grant"));
    // Revocation is not reuse.
    assert_eq!(fake.stats().await["reuse"], 0);

    fake.faults(json!({"client_id": "c1", "revoked": false, "invalid_client": true}))
        .await;
    let got = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!((got.status, got.error()), (401, "invalid_client"));

    fake.faults(json!({"client_id": "c1", "invalid_client": false}))
        .await;
    let got = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(got.status, 200, "{}", got.body);
}

#[tokio::test]
async fn control_endpoints_reject_bad_input() {
    let fake = FakeProvider::start(3600);
    let post = |path: &str, body: &'static str| {
        http()
            .post(format!("{}{path}", fake.url()))
            .header("content-type", "application/json")
            .body(body)
    };
    let cases = [
        ("/seed", "not json", 400),
        ("/seed", r#"{"client_id": "a"}"#, 400),
        (
            "/seed",
            r#"{"client_id": "a", "client_secret": "b", "fail503": 1}"#,
            400,
        ),
        (
            "/seed",
            r#"{"client_id": "a", "client_secret": "b", "auth": "mtls"}"#,
            400,
        ),
        ("/faults", r#"{"client_id": "nobody", "fail_503": 1}"#, 404),
        ("/seed-bulk", r#"{"clients": [{"client_id": "a"}]}"#, 400),
        ("/mode", r#"{"delay_ms": -1}"#, 400),
    ];
    for (path, body, status) in cases {
        let resp = post(path, body).send().await.expect("control request");
        assert_eq!(resp.status().as_u16(), status, "{path} {body}");
    }
    // A failed /faults changes nothing.
    fake.seed(json!({"client_id": "a", "client_secret": "b"}))
        .await;
    let resp = post(
        "/faults",
        r#"{"client_id": "a", "fail_503": 3, "revoked": "yes"}"#,
    )
    .send()
    .await
    .expect("faults");
    assert_eq!(resp.status().as_u16(), 400);
    let now = fake.faults(json!({"client_id": "a"})).await;
    assert_eq!(now["fail_503"], 0);
    assert_eq!(now["revoked"], false);
}

#[tokio::test]
async fn response_options_expires_in_and_refresh_token_expiry() {
    let fake = FakeProvider::start(3600);
    seed(
        &fake,
        "rc",
        "rt-0",
        json!({"expires_in": 1800, "refresh_token_expires_in": 604799}),
    )
    .await;
    let got = refresh_basic(&fake, "rc", "s3cret", "rt-0").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert_eq!(got.body["expires_in"], 1800);
    assert_eq!(got.body["refresh_token_expires_in"], 604799);

    seed(&fake, "quiet", "rt-q", json!({"omit_expires_in": true})).await;
    let got = refresh_body(&fake, "quiet", "s3cret", "rt-q").await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.get("expires_in").is_none(), "{}", got.body);
    assert!(got.body["refresh_token"].is_string());
}

#[tokio::test]
async fn omit_refresh_token_keeps_the_old_one_alive() {
    let fake = FakeProvider::start(3600);
    seed(
        &fake,
        "goto",
        "rt-goto",
        json!({"omit_refresh_token": true}),
    )
    .await;
    let mut access_tokens = Vec::new();
    for _ in 0..3 {
        let got = refresh_basic(&fake, "goto", "s3cret", "rt-goto").await;
        assert_eq!(got.status, 200, "{}", got.body);
        assert!(got.body.get("refresh_token").is_none(), "{}", got.body);
        access_tokens.push(got.str("access_token"));
    }
    access_tokens.dedup();
    assert_eq!(access_tokens.len(), 3);
    let stats = fake.stats().await;
    assert_eq!(stats["refresh_ok"], 3);
    assert_eq!(stats["reuse"], 0);
    assert_eq!(stats["clients"]["goto"]["live_refresh_token"], "rt-goto");

    // Switching rotation back on kills the presented token as usual.
    fake.faults(json!({"client_id": "goto", "omit_refresh_token": false}))
        .await;
    let got = refresh_basic(&fake, "goto", "s3cret", "rt-goto").await;
    assert_eq!(got.status, 200, "{}", got.body);
    let dead = refresh_basic(&fake, "goto", "s3cret", "rt-goto").await;
    assert_eq!((dead.status, dead.error()), (400, "invalid_grant"));
}

#[tokio::test]
async fn api_requires_a_live_bearer_token() {
    let fake = FakeProvider::start(3600);
    seed(
        &fake,
        "c1",
        "rt-0",
        json!({"access_token": "at-seeded", "expires_in": 2}),
    )
    .await;
    let api = |token: Option<&str>| {
        let mut req = http().get(format!("{}/v1/me", fake.api_url()));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        async move { req.send().await.expect("api request").status().as_u16() }
    };
    assert_eq!(api(Some("at-seeded")).await, 200);
    assert_eq!(api(None).await, 401);
    assert_eq!(api(Some("made-up")).await, 401);

    // Minted tokens work too, and expire after the client's expires_in (2 s).
    let got = refresh_body(&fake, "c1", "s3cret", "rt-0").await;
    assert_eq!(got.status, 200, "{}", got.body);
    let at = got.str("access_token");
    assert_eq!(api(Some(&at)).await, 200);
    wait_until_async(
        "the access token to expire",
        Duration::from_secs(10),
        || {
            let at = at.clone();
            let api = &api;
            async move { api(Some(&at)).await == 401 }
        },
    )
    .await;
    let stats = fake.stats().await;
    assert!(stats["api_ok"].as_u64() >= Some(2));
    assert!(stats["api_401"].as_u64() >= Some(3));
}

#[tokio::test]
async fn concurrent_use_of_one_refresh_token_is_counted_and_only_the_first_wins() {
    let fake = FakeProvider::start(3600);
    // The delay keeps both requests in flight at the same time.
    seed(&fake, "c1", "rt-0", json!({"delay_ms": 800})).await;
    let (a, b) = tokio::join!(
        refresh_body(&fake, "c1", "s3cret", "rt-0"),
        refresh_basic(&fake, "c1", "s3cret", "rt-0"),
    );
    let mut statuses = [a.status, b.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 400], "{} / {}", a.body, b.body);
    let loser = if a.status == 400 { &a } else { &b };
    assert_eq!(loser.error(), "invalid_grant");

    let stats = fake.stats().await;
    assert_eq!(stats["concurrent_same_rt"], 1);
    assert_eq!(stats["refresh_ok"], 1);
    assert_eq!(stats["reuse"], 1);
    assert!(stats["max_in_flight"].as_u64() >= Some(2));
    assert_eq!(stats["in_flight"], 0);

    // Different tokens in flight together are not "concurrent same".
    fake.faults(json!({"client_id": "c1", "delay_ms": 200}))
        .await;
    seed(&fake, "c2", "rt-c2", json!({"delay_ms": 200})).await;
    let winner = if a.status == 200 { &a } else { &b };
    let rt = winner.str("refresh_token");
    let (x, y) = tokio::join!(
        refresh_body(&fake, "c1", "s3cret", &rt),
        refresh_body(&fake, "c2", "s3cret", "rt-c2"),
    );
    assert_eq!((x.status, y.status), (200, 200));
    assert_eq!(fake.stats().await["concurrent_same_rt"], 1);
}

#[tokio::test]
async fn seed_bulk_and_verify_for_benchmarks() {
    let fake = FakeProvider::start(3600);
    let clients: Vec<Value> = (0..500)
        .map(|i| {
            json!({
                "client_id": format!("bulk-{i}"),
                "client_secret": "s3cret",
                "refresh_token": format!("rt-bulk-{i}"),
                "access_token": format!("at-bulk-{i}"),
            })
        })
        .collect();
    let seeded = fake.seed_bulk(clients).await;
    assert_eq!(seeded["seeded"], 500);

    // Many rotations in parallel over keep-alive connections: no reuse, no loss.
    let client = http();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let client = client.clone();
            let url = fake.token_url();
            tokio::spawn(async move {
                let id = format!("bulk-{i}");
                let mut rt = format!("rt-bulk-{i}");
                for _ in 0..20 {
                    let got = answer(client.post(&url).form(&[
                        ("grant_type", "refresh_token"),
                        ("refresh_token", rt.as_str()),
                        ("client_id", id.as_str()),
                        ("client_secret", "s3cret"),
                    ]))
                    .await;
                    assert_eq!(got.status, 200, "{}", got.body);
                    rt = got.str("refresh_token");
                }
                (rt, format!("at-bulk-{i}"))
            })
        })
        .collect();
    let mut pairs = Vec::new();
    for task in tasks {
        let (rt, at) = task.await.expect("rotation task");
        pairs.push(json!([rt, at]));
    }
    let verify = fake.post("/verify", json!({ "pairs": pairs })).await;
    assert_eq!(verify["refresh_alive"], 50);
    assert_eq!(verify["access_live"], 50);
    let summary = fake.stats_summary().await;
    assert_eq!(summary["refresh_ok"], 1000);
    assert_eq!(summary["reuse"], 0);
    assert_eq!(summary["concurrent_same_rt"], 0);
}
