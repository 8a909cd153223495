//! `tokenwarden status` against a real redis-server seeded with health hashes in mixed states
//! (as the daemons write them) and two replica heartbeats: the order is by urgency, times are
//! relative, `--tenant`, `--state` and `--json` select and shape, a control character in an id
//! cannot break the table, and the journal line sums the live replicas. The table is printed.

mod support;

use chrono::{Duration, Utc};
use serde_json::Value;
use support::{health_key, seed_provider, Daemon, RedisServer};

fn at(secs: i64) -> String {
    (Utc::now() + Duration::seconds(secs)).to_rfc3339()
}

fn seed(conn: &mut redis::Connection, tenant: &str, provider: &str, health: &[(&str, String)]) {
    seed_provider(
        conn,
        tenant,
        provider,
        &[
            ("provider_type", "goto"),
            ("status", "active"),
            ("client_secret", "status-test-secret"),
        ],
    );
    let mut cmd = redis::cmd("HSET");
    cmd.arg(health_key(tenant, provider));
    for (k, v) in health {
        cmd.arg(*k).arg(v);
    }
    cmd.query::<()>(conn).expect("HSET health");
}

#[test]
fn status_lists_the_most_urgent_first_with_relative_times() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let s = |v: &str| v.to_string();
    seed(
        &mut conn,
        "acme",
        "goto",
        &[
            ("state", s("healthy")),
            ("token_expiry", at(50 * 60 + 30)),
            ("next_refresh_at", at(30 * 60 + 30)),
            ("last_refresh_at", at(-10 * 60 - 30)),
            ("last_refresh_result", s("success")),
        ],
    );
    seed(
        &mut conn,
        "acme",
        "teams",
        &[
            ("state", s("reauth_required")),
            ("reason", s("invalid_grant")),
            ("token_expiry", at(-3 * 60 - 30)),
            ("last_refresh_result", s("reauth_required")),
            ("last_error", s("invalid_grant: refresh token revoked")),
        ],
    );
    seed(
        &mut conn,
        "globex",
        "zoom",
        &[
            ("state", s("failing")),
            ("token_expiry", at(12 * 60 + 30)),
            ("next_refresh_at", at(45)),
            ("last_refresh_result", s("transient_error")),
            ("last_error", s("HTTP 503 from the token endpoint")),
            ("consecutive_failures", s("4")),
        ],
    );
    seed(
        &mut conn,
        "initech",
        "goto",
        &[
            ("state", s("degraded")),
            ("token_expiry", at(-3 * 60 - 30)),
            ("next_refresh_at", at(-5)),
            ("last_refresh_result", s("transient_error")),
            ("last_error", s("timeout")),
        ],
    );
    seed(
        &mut conn,
        "initech",
        "teams",
        &[("state", s("inactive")), ("token_expiry", at(-86_400))],
    );
    seed(
        &mut conn,
        "bad\ntenant",
        "goto",
        &[
            ("state", s("healthy")),
            ("token_expiry", at(2 * 3600 + 5 * 60 + 30)),
            ("last_error", s("\u{1b}[31mred")),
        ],
    );
    // Two live replicas' heartbeats (SPEC 2), one dead one's key gone already.
    for (id, pending) in [("r1:11:aaaaaa", "2"), ("r2:22:bbbbbb", "1")] {
        let key = format!("tokenwarden:replica:{id}");
        redis::cmd("HSET")
            .arg(&key)
            .arg("version")
            .arg("0.1.0")
            .arg("journal_pending")
            .arg(pending)
            .arg("owned_providers")
            .arg("3")
            .query::<()>(&mut conn)
            .expect("HSET heartbeat");
        redis::cmd("EXPIRE")
            .arg(&key)
            .arg(60)
            .query::<()>(&mut conn)
            .expect("EXPIRE heartbeat");
    }

    let url = redis.url();
    let env = [("TOKENWARDEN_REDIS_URL", url.as_str())];
    let out = Daemon::cli(&["status"], &env);
    assert!(out.status.success(), "status failed");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{table}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("TENANT"), "{table}");
    let order: Vec<String> = lines[1..7]
        .iter()
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            format!("{}/{}", cols[0], cols[1])
        })
        .collect();
    assert_eq!(
        order,
        [
            "acme/teams",
            "initech/goto",
            "globex/zoom",
            "acme/goto",
            "bad\\ntenant/goto",
            "initech/teams",
        ],
        "{table}"
    );
    let line = |id: &str| {
        let (t, p) = id.split_once('/').unwrap_or((id, ""));
        lines
            .iter()
            .find(|l| {
                let mut cols = l.split_whitespace();
                cols.next() == Some(t) && cols.next() == Some(p)
            })
            .unwrap_or_else(|| panic!("no line for {id}: {table}"))
            .to_string()
    };
    assert!(line("acme/teams").contains("expired 3m ago"), "{table}");
    assert!(
        line("acme/teams").contains("reauth_required (invalid_grant)"),
        "{table}"
    );
    assert!(
        line("initech/goto").contains("degraded, expired"),
        "{table}"
    );
    assert!(line("initech/goto").contains("refresh due "), "{table}");
    let zoom = line("globex/zoom");
    assert!(zoom.contains("expires in 12m"), "{table}");
    let next = zoom
        .split("next refresh in ")
        .nth(1)
        .and_then(|rest| rest.split('s').next())
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no `next refresh in Ns` for globex/zoom: {table}"));
    assert!((30..=45).contains(&next), "{table}");
    assert!(line("acme/goto").contains("expires in 50m"), "{table}");
    assert!(line("acme/goto").contains("next refresh in 30m"), "{table}");
    assert!(line("acme/goto").contains("refreshed 10m ago"), "{table}");
    assert!(
        line("bad\\ntenant/goto").contains("expires in 2h 5m"),
        "{table}"
    );
    // The escape sequence in the error is shown, not obeyed.
    assert!(
        line("bad\\ntenant/goto").contains("\\u{1b}[31mred"),
        "{table}"
    );
    assert!(!table.contains('\u{1b}'), "{table}");
    assert!(
        table.contains("6 providers: 1 degraded, 1 failing, 2 healthy, 1 inactive, 1 reauth_required, 2 expired"),
        "{table}"
    );
    assert!(
        table.ends_with("journal: 3 rotated tokens held by 2 live replicas\n"),
        "{table}"
    );
    assert!(!table.contains("status-test-secret"));

    // --state and --tenant select; the order stays.
    let out = Daemon::cli(&["status", "--state", "expired"], &env);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = text.lines().skip(1).take(2).collect();
    let ids: Vec<String> = rows
        .iter()
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join("/"))
        .collect();
    assert_eq!(ids, ["acme/teams", "initech/goto"], "{text}");
    assert!(text.contains("2 providers:"), "{text}");
    let out = Daemon::cli(&["status", "--state", "nonsense"], &env);
    assert_eq!(out.status.code(), Some(2), "a bad --state is a usage error");

    // --json: the same order, relative times in seconds.
    let out = Daemon::cli(&["status", "--tenant", "globex", "--json"], &env);
    assert!(out.status.success());
    let rows: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let rows = rows.as_array().expect("an array of rows");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["provider"], "zoom");
    assert_eq!(rows[0]["expired"], false);
    let secs = rows[0]["expires_in_secs"].as_i64().unwrap_or_default();
    assert!((12 * 60..=12 * 60 + 30).contains(&secs), "{rows:?}");
    let out = Daemon::cli(&["status", "--json"], &env);
    let rows: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    let first = &rows[0];
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["provider"], "teams");
    assert_eq!(rows[1]["expired"], true);
}
