//! Data sync against a real Redis and the fake provider's four directory APIs, through the
//! `tokenwarden sync` command line (its own engine refreshes tokens) and two daemons.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{hget, seed_provider, wait_until, Daemon, FakeProvider, RedisServer};

const TENANT: &str = "acme";
const FAR: &str = "2099-01-01T00:00:00+00:00";

struct Setup {
    redis: RedisServer,
    fake: FakeProvider,
}

fn setup() -> Setup {
    Setup {
        redis: RedisServer::start(),
        fake: FakeProvider::start(3600),
    }
}

/// Seeds a client at the fake (with a live access token `at-{name}`) and its record.
async fn provider(s: &Setup, name: &str, ptype: &str, access_token: &str, extra: &[(&str, &str)]) {
    s.fake
        .seed(json!({
            "client_id": format!("c-{name}"),
            "client_secret": "s3cret",
            "refresh_token": format!("rt-{name}"),
            "access_token": format!("at-{name}"),
        }))
        .await;
    let api = format!("{}/api/{ptype}", s.fake.url());
    let mut fields: Vec<(String, String)> = [
        ("provider_type", ptype),
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_id", &format!("c-{name}")),
        ("client_secret", "s3cret"),
        ("account_key", "acct-1"),
        ("access_token", access_token),
        ("refresh_token", &format!("rt-{name}")),
        ("token_expiry", FAR),
        ("api_base_url", &api),
        ("features_enabled", r#"["users"]"#),
        ("sync_enabled", "True"),
        ("token_url", &s.fake.token_url()),
        ("token_auth_method", "body"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        fields.retain(|(f, _)| f != k);
        fields.push((k.to_string(), v.to_string()));
    }
    seed_provider(&mut s.redis.conn(), TENANT, name, &fields);
}

fn tenant_config(s: &Setup, fields: &[(&str, &str)]) {
    let mut conn = s.redis.conn();
    let key = format!("tenant:{TENANT}:config");
    let _: () = redis::cmd("DEL").arg(&key).query(&mut conn).expect("DEL");
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(fields)
        .query(&mut conn)
        .expect("HSET");
}

async fn list(s: &Setup, provider: &str, path: &str, items: Vec<Value>, page_size: Option<usize>) {
    let mut body = json!({"provider": provider, "path": path, "items": items});
    if let Some(n) = page_size {
        body["page_size"] = json!(n);
    }
    s.fake.post("/dir/seed", body).await;
}

async fn faults(s: &Setup, provider: &str, path: &str, f: Value) {
    let mut body = f;
    body["provider"] = json!(provider);
    body["path"] = json!(path);
    s.fake.post("/dir/faults", body).await;
}

async fn dir_stats(s: &Setup) -> Value {
    let url = format!("{}/dir/stats", s.fake.url());
    reqwest::get(&url)
        .await
        .expect("stats")
        .json()
        .await
        .expect("json")
}

const GOTO: &str = "/extensions";
const TEAMS: &str = "/users";
const RC: &str = "/restapi/v1.0/account/~/extension";
const ZOOM: &str = "/v2/phone/users";

fn goto_items(n: usize) -> Vec<Value> {
    let mut v: Vec<Value> = (1..=n)
        .map(|i| json!({"id": format!("g{i}"), "number": format!("10{i}"), "name": format!("Person {i}"), "type": "DIRECT_EXTENSION", "email": format!("person{i}@acme.com"), "voicemail": {"enabled": true}}))
        .collect();
    v.insert(
        2,
        json!({"id": "gq1", "number": "500", "name": "Sales queue", "type": "CALL_QUEUE"}),
    );
    v
}

fn teams_items(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| json!({"id": format!("t{i}"), "displayName": format!("Person {i} (Teams)"), "mail": format!("Person{i}@ACME.com"), "businessPhones": [format!("+1 415 555 01{i:02}"), "+1 415 555 0000"], "jobTitle": "x"}))
        .collect()
}

fn rc_items(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            // Person 6 has no email at RingCentral: matched by a number only they hold.
            let email = if i == 6 { Value::Null } else { json!(format!("person{i}@acme.com")) };
            json!({"id": 100 + i, "extensionNumber": format!("20{i}"), "name": format!("Person {i} (RC)"), "type": "User", "contact": {"email": email, "businessPhone": format!("+14155550{i:03}")}, "status": "Enabled"})
        })
        .collect()
}

fn zoom_items(n: usize) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            let email = if i == 6 { json!("someone.else@acme.com") } else { json!(format!("person{i}@acme.com")) };
            json!({"id": format!("z{i}"), "name": format!("Person {i} (Zoom)"), "email": email, "extension_number": format!("30{i}"), "phone_numbers": [{"id": format!("n{i}"), "number": format!("+1415555{i:04}")}], "site": {"id": "s1"}})
        })
        .collect()
}

fn sync_cli(s: &Setup, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["sync", "--local", "--tenant", TENANT];
    all.extend_from_slice(args);
    let out = Daemon::cli(
        &all,
        &[
            ("TOKENWARDEN_REDIS_URL", &s.redis.url()),
            ("TOKENWARDEN_LOG", "warn"),
        ],
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hgetall(s: &Setup, key: &str) -> HashMap<String, Value> {
    let raw: HashMap<String, String> = support::hgetall(&mut s.redis.conn(), key);
    raw.into_iter()
        .map(|(k, v)| {
            (
                k,
                serde_json::from_str(&v).unwrap_or_else(|e| panic!("{key} {v}: {e}")),
            )
        })
        .collect()
}

fn exists(s: &Setup, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query(&mut s.redis.conn())
        .expect("EXISTS");
    n == 1
}

fn sync_key(p: &str, f: &str) -> String {
    format!("tenant:{TENANT}:sync:{p}:{f}")
}

#[tokio::test]
async fn four_providers_page_in_their_own_styles_and_one_person_is_one_unified_user() {
    let s = setup();
    tenant_config(
        &s,
        &[
            ("primary_provider", "teams"),
            ("sync_strategy", "all"),
            ("data_retention_days", "30"),
            ("timezone", "Europe/Berlin"),
        ],
    );
    for (name, ptype) in [
        ("goto", "goto"),
        ("teams", "teams"),
        ("ringcentral", "ringcentral"),
        ("zoom", "zoom"),
    ] {
        provider(&s, name, ptype, &format!("at-{name}"), &[]).await;
    }
    list(&s, "goto", GOTO, goto_items(7), None).await;
    list(&s, "teams", TEAMS, teams_items(7), None).await;
    list(&s, "ringcentral", RC, rc_items(7), None).await;
    list(&s, "zoom", ZOOM, zoom_items(7), None).await;

    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    for p in ["goto", "teams", "ringcentral", "zoom"] {
        assert!(
            out.contains(&format!("acme/{p} users: success 7 records")),
            "{p}: {out}"
        );
        let users = hgetall(&s, &sync_key(p, "users"));
        assert_eq!(users.len(), 7, "{p}");
        for u in users.values() {
            assert_eq!(u["provider"], p);
            assert!(u["raw"].is_object());
        }
    }
    // Each style paged 3 + 3 + 1 (GoTo 3 + 3 + 2: its call queue is filtered out of users).
    let stats = dir_stats(&s).await;
    for (k, n) in [
        ("goto/extensions", 3),
        ("teams/users", 3),
        ("ringcentral/restapi/v1.0/account/~/extension", 3),
        ("zoom/v2/phone/users", 3),
    ] {
        assert_eq!(stats["requests"][k], n, "{k}: {stats}");
    }
    let goto = hgetall(&s, &sync_key("goto", "users"));
    assert!(
        !goto.contains_key("gq1"),
        "the filter keeps DIRECT_EXTENSION only"
    );
    let teams = hgetall(&s, &sync_key("teams", "users"));
    assert_eq!(teams["t3"]["email"], "person3@acme.com");
    assert_eq!(teams["t3"]["phone_numbers"][0], "+14155550103");

    let dir = hgetall(&s, &format!("tenant:{TENANT}:directory:users"));
    // Persons 1-5 and 7 at all four; person 6 twice (see below).
    assert_eq!(dir.len(), 8, "{dir:#?}");
    let p3 = dir
        .values()
        .find(|u| u["providers"]["teams"] == "t3")
        .expect("person 3");
    assert_eq!(p3["providers"]["zoom"], "z3");
    assert_eq!(p3["providers"]["goto"], "g3");
    assert_eq!(p3["providers"]["ringcentral"], "103");
    assert_eq!(
        p3["display_name"], "Person 3 (Teams)",
        "the primary provider wins"
    );
    // Person 6: RingCentral has no email and Zoom another one, but both hold
    // +14155550006 and nobody else does: merged by that number (and not with Teams/GoTo,
    // which share neither an email nor a number with them).
    let p6 = dir
        .values()
        .find(|u| u["providers"]["ringcentral"] == "106")
        .expect("person 6");
    assert_eq!(p6["providers"]["zoom"], "z6", "{p6}");
    assert!(p6["providers"].get("teams").is_none(), "{p6}");
    // The shared main line +14155550000 (all Teams users) merged nobody.
    assert!(dir
        .values()
        .all(|u| u["providers"].as_object().is_some_and(|m| m.len() <= 4)));

    // Health and events.
    let mut conn = s.redis.conn();
    for p in ["goto", "teams", "ringcentral", "zoom"] {
        let key = format!("tenant:{TENANT}:provider:{p}:health");
        assert_eq!(
            hget(&mut conn, &key, "last_sync_result").as_deref(),
            Some("success")
        );
        assert!(hget(&mut conn, &key, "last_sync_at").is_some());
    }
    let events: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg("tokenwarden:events")
        .arg("-")
        .arg("+")
        .query(&mut conn)
        .expect("XRANGE");
    let syncs = events
        .iter()
        .filter(|(_, f)| f.get("type").map(String::as_str) == Some("sync"))
        .count();
    assert_eq!(syncs, 4);

    // A second run keeps every unified id.
    let (code, _, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0);
    let again = hgetall(&s, &format!("tenant:{TENANT}:directory:users"));
    let mut a: Vec<&String> = dir.keys().collect();
    let mut b: Vec<&String> = again.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_429_midway_is_waited_out_and_a_401_is_cured_by_one_refresh() {
    let s = setup();
    tenant_config(
        &s,
        &[("primary_provider", "zoom"), ("sync_strategy", "all")],
    );
    provider(&s, "zoom", "zoom", "at-zoom", &[]).await;
    // Teams' stored access token is dead: the first call answers 401.
    provider(&s, "teams", "teams", "at-stale", &[]).await;
    list(&s, "zoom", ZOOM, zoom_items(8), None).await;
    list(&s, "teams", TEAMS, teams_items(4), None).await;
    faults(
        &s,
        "zoom",
        ZOOM,
        json!({"rate_limit_at_page": 2, "retry_after": "1"}),
    )
    .await;
    let started = Instant::now();
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After honoured"
    );
    assert!(out.contains("acme/zoom users: success 8 records"), "{out}");
    assert!(out.contains("acme/teams users: success 4 records"), "{out}");
    let stats = dir_stats(&s).await;
    assert_eq!(stats["rate_limited"], 1);
    assert_eq!(
        stats["unauthorized"], 1,
        "one 401, then the refreshed token worked"
    );
    assert_eq!(
        stats["requests"]["zoom/v2/phone/users"], 4,
        "3 pages + the retried one"
    );
    let at = hget(
        &mut s.redis.conn(),
        &format!("tenant:{TENANT}:provider:teams"),
        "access_token",
    );
    assert!(
        at.is_some_and(|t| t != "at-stale"),
        "the engine wrote the new token back"
    );
}

#[tokio::test]
async fn deleted_records_disappear_and_a_malformed_page_leaves_the_previous_data() {
    let s = setup();
    tenant_config(
        &s,
        &[
            ("primary_provider", "ringcentral"),
            ("sync_strategy", "primary"),
            ("data_retention_days", "2"),
        ],
    );
    provider(&s, "ringcentral", "ringcentral", "at-ringcentral", &[]).await;
    list(&s, "ringcentral", RC, rc_items(7), None).await;
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    let key = sync_key("ringcentral", "users");
    assert_eq!(hgetall(&s, &key).len(), 7);
    // Retention: data_retention_days = 2.
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query(&mut s.redis.conn())
        .expect("TTL");
    assert!((2 * 86_400 - 60..=2 * 86_400).contains(&ttl), "ttl {ttl}");

    let mut items = rc_items(7);
    items.remove(3); // id 104 deleted at the provider
    list(&s, "ringcentral", RC, items, None).await;
    let (code, _, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0);
    let users = hgetall(&s, &key);
    assert_eq!(users.len(), 6);
    assert!(!users.contains_key("104"));
    let dir = hgetall(&s, &format!("tenant:{TENANT}:directory:users"));
    assert_eq!(dir.len(), 6, "the directory follows");

    // A malformed second page: the run fails, nothing is replaced, no staging key is left.
    list(&s, "ringcentral", RC, rc_items(7), None).await;
    faults(&s, "ringcentral", RC, json!({"malformed_at_page": 2})).await;
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("acme/ringcentral users: malformed"), "{out}");
    let after = hgetall(&s, &key);
    assert_eq!(after.len(), 6, "the previous data stays");
    assert!(!exists(&s, &format!("{{{key}}}:staging")));
    let health = format!("tenant:{TENANT}:provider:ringcentral:health");
    assert_eq!(
        hget(&mut s.redis.conn(), &health, "last_sync_result").as_deref(),
        Some("malformed")
    );
}

#[tokio::test]
async fn primary_all_and_custom_pick_their_providers() {
    let s = setup();
    provider(
        &s,
        "teams",
        "teams",
        "at-teams",
        &[("features_enabled", r#"["users", "phone_numbers"]"#)],
    )
    .await;
    provider(&s, "zoom", "zoom", "at-zoom", &[("sync_enabled", "false")]).await;
    provider(&s, "goto", "goto", "at-goto", &[("status", "inactive")]).await;
    provider(
        &s,
        "ringcentral",
        "ringcentral",
        "at-ringcentral",
        &[
            ("sync_features", r#"["users"]"#),
            ("features_enabled", r#"["users", "call_queues"]"#),
        ],
    )
    .await;
    list(&s, "teams", TEAMS, teams_items(2), None).await;
    list(&s, "teams", "/admin/teams/telephoneNumberManagement/numberAssignments", vec![json!({"id": "n1", "telephoneNumber": "+14155550100", "assignmentTargetId": "t1", "numberType": "directRouting"})], None).await;
    list(&s, "zoom", ZOOM, zoom_items(2), None).await;
    list(&s, "ringcentral", RC, rc_items(2), None).await;
    list(
        &s,
        "ringcentral",
        "/restapi/v1.0/account/~/call-queues",
        vec![json!({"id": 9, "name": "Support", "extensionNumber": "900"})],
        None,
    )
    .await;

    tenant_config(
        &s,
        &[("primary_provider", "zoom"), ("sync_strategy", "primary")],
    );
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acme/zoom users: success 2 records"), "{out}");
    assert!(!exists(&s, &sync_key("teams", "users")));

    tenant_config(
        &s,
        &[("primary_provider", "zoom"), ("sync_strategy", "all")],
    );
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acme/goto: skipped_inactive"), "{out}");
    assert!(
        out.contains("acme/teams phone_numbers: success 1 records"),
        "{out}"
    );
    assert!(
        out.contains("acme/ringcentral call_queues: success 1 records"),
        "{out}"
    );
    assert_eq!(
        hgetall(&s, &sync_key("teams", "phone_numbers"))["n1"]["assigned_to"],
        "t1"
    );

    for k in [
        sync_key("teams", "users"),
        sync_key("zoom", "users"),
        sync_key("ringcentral", "users"),
        sync_key("ringcentral", "call_queues"),
    ] {
        let _: () = redis::cmd("DEL")
            .arg(&k)
            .query(&mut s.redis.conn())
            .expect("DEL");
    }
    tenant_config(
        &s,
        &[("primary_provider", "zoom"), ("sync_strategy", "custom")],
    );
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acme/zoom: skipped_sync_disabled"), "{out}");
    assert!(
        out.contains("acme/ringcentral users: success 2 records"),
        "{out}"
    );
    assert!(
        !exists(&s, &sync_key("ringcentral", "call_queues")),
        "custom: only sync_features"
    );
    assert!(exists(&s, &sync_key("teams", "users")));
    assert!(!exists(&s, &sync_key("zoom", "users")));

    // A reauth_required provider is skipped and said so.
    let _: () = redis::cmd("HSET")
        .arg(format!("tenant:{TENANT}:provider:teams:health"))
        .arg("state")
        .arg("reauth_required")
        .query(&mut s.redis.conn())
        .expect("HSET");
    let (code, out, _) = sync_cli(&s, &["--provider", "teams"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acme/teams: skipped_reauth_required"), "{out}");
}

#[tokio::test]
async fn a_feature_of_twenty_thousand_users_is_staged_in_chunks() {
    let s = setup();
    tenant_config(
        &s,
        &[("primary_provider", "zoom"), ("sync_strategy", "primary")],
    );
    provider(&s, "zoom", "zoom", "at-zoom", &[]).await;
    let items: Vec<Value> = (0..20_000)
        .map(|i| json!({"id": format!("z{i}"), "name": format!("User {i}"), "email": format!("u{i}@big.example"), "extension_number": format!("{}", 10_000 + i)}))
        .collect();
    list(&s, "zoom", ZOOM, items, Some(1000)).await;
    let (code, out, _) = sync_cli(&s, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("success 20000 records"), "{out}");
    let n: i64 = redis::cmd("HLEN")
        .arg(sync_key("zoom", "users"))
        .query(&mut s.redis.conn())
        .expect("HLEN");
    assert_eq!(n, 20_000);
    let n: i64 = redis::cmd("HLEN")
        .arg(format!("tenant:{TENANT}:directory:users"))
        .query(&mut s.redis.conn())
        .expect("HLEN");
    assert_eq!(n, 20_000);
}

#[tokio::test]
async fn two_daemons_never_overlap_a_slow_scheduled_run() {
    let s = setup();
    tenant_config(
        &s,
        &[
            ("primary_provider", "zoom"),
            ("sync_strategy", "primary"),
            ("sync_schedule", "* * * * *"),
            ("timezone", "Asia/Kolkata"),
        ],
    );
    provider(&s, "zoom", "zoom", "at-zoom", &[]).await;
    list(&s, "zoom", ZOOM, zoom_items(7), None).await;
    faults(&s, "zoom", ZOOM, json!({"delay_ms": 1500})).await;
    let env = [
        ("TOKENWARDEN_SYNC_ENABLED", "true"),
        ("TOKENWARDEN_SYNC_SPREAD_SECS", "0"),
        ("TOKENWARDEN_SYNC_CONFIG_REREAD_SECS", "1"),
        ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ];
    let a = Daemon::start(&s.redis, &env);
    let b = Daemon::start(&s.redis, &env);
    let health = format!("tenant:{TENANT}:provider:zoom:health");
    let mut conn = s.redis.conn();
    wait_until("a scheduled sync", Duration::from_secs(90), || {
        hget(&mut conn, &health, "last_sync_result").as_deref() == Some("success")
    })
    .await;
    // Both fired the same slot: one ran it (3 slow pages), the other found the lock held.
    let stats = dir_stats(&s).await;
    assert_eq!(stats["requests"]["zoom/v2/phone/users"], 3, "{stats}");
    assert_eq!(hgetall(&s, &sync_key("zoom", "users")).len(), 7);
    let body = a.metrics().await + &b.metrics().await;
    assert!(body.contains("tokenwarden_sync_runs_total{"), "{body}");
    assert!(body.contains("tokenwarden_sync_records{"));
    a.assert_running();
    b.assert_running();
}

#[tokio::test]
async fn a_replica_shutting_down_mid_run_abandons_it_cleanly() {
    let s = setup();
    tenant_config(
        &s,
        &[
            ("primary_provider", "zoom"),
            ("sync_strategy", "primary"),
            ("sync_schedule", "* * * * *"),
        ],
    );
    provider(&s, "zoom", "zoom", "at-zoom", &[]).await;
    list(&s, "zoom", ZOOM, zoom_items(7), None).await;
    faults(&s, "zoom", ZOOM, json!({"delay_ms": 2000})).await;
    let d = Daemon::start(
        &s.redis,
        &[
            ("TOKENWARDEN_SYNC_ENABLED", "true"),
            ("TOKENWARDEN_SYNC_SPREAD_SECS", "0"),
            ("TOKENWARDEN_SYNC_CONFIG_REREAD_SECS", "1"),
            ("TOKENWARDEN_HEALTH_ENABLED", "false"),
        ],
    );
    support::wait_until_async(
        "the scheduled run's first page request",
        Duration::from_secs(90),
        || async {
            dir_stats(&s).await["requests"]["zoom/v2/phone/users"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    )
    .await;
    let code = d.terminate(Duration::from_secs(30)).await;
    assert_eq!(code, 0, "clean exit");
    let pages = dir_stats(&s).await["requests"]["zoom/v2/phone/users"]
        .as_u64()
        .unwrap_or(0);
    assert!(pages < 3, "the run stopped between pages ({pages})");
    let key = sync_key("zoom", "users");
    assert!(!exists(&s, &key), "nothing half-written");
    assert!(!exists(&s, &format!("{{{key}}}:staging")));
    assert!(
        !exists(&s, &format!("tenant:{TENANT}:sync:lock")),
        "the lock was released"
    );
}
