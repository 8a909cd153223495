//! The alert rules in a real Prometheus (Debian package `prometheus`) scraping a running
//! daemon: a revoked token raises `TokenwardenReauthRequired`, an expired token whose
//! endpoint is down raises `TokenwardenTokenExpired`, a frozen Redis (SIGSTOP) raises
//! `TokenwardenRedisDown`, and the healthy tokens raise nothing. The rules are
//! `deploy/prometheus/alerts.yml` with every `for:` shortened to 2 s, scraped and evaluated
//! every second. The same scrape, with data for every provider state, must export every
//! metric the dashboard and the alerts query (`scripts/deploy_checks.py metrics --require`).
//!
//! A missing `prometheus` binary fails the test (`.ci/run` installs it); it never skips.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{json, Value};
use support::process::{send_signal, TempDir};
use support::{
    free_port, health_key, hget, oauth_record, seed_provider, seed_tenant_config, wait_until,
    Daemon, FakeProvider, RedisServer,
};

const HEALTHY: [&str; 3] = ["healthy-a", "healthy-b", "healthy-rotated"];

/// A `prometheus` process, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `alerts.yml` with every `for:` set to 2 s.
fn fast_rules() -> String {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/prometheus/alerts.yml"
    ))
    .unwrap_or_else(|e| panic!("deploy/prometheus/alerts.yml: {e}"));
    let mut out = String::new();
    let mut changed = 0;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: 2s\n"));
            changed += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(
        changed >= 8,
        "only {changed} `for:` lines found in alerts.yml"
    );
    out
}

fn start_prometheus(target: &str) -> Prometheus {
    let dir = TempDir::new("tw-prometheus");
    std::fs::write(dir.path().join("rules.yml"), fast_rules())
        .unwrap_or_else(|e| panic!("rules.yml: {e}"));
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
         rule_files: [rules.yml]\n\
         scrape_configs:\n  - job_name: tokenwarden\n    static_configs:\n      - targets: [\"{target}\"]\n"
    );
    std::fs::write(dir.path().join("prometheus.yml"), config)
        .unwrap_or_else(|e| panic!("prometheus.yml: {e}"));
    let listen = format!("127.0.0.1:{}", free_port());
    let child = Command::new("prometheus")
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run prometheus ({e}): install it (Debian: apt-get install prometheus)")
        });
    Prometheus {
        child,
        url: format!("http://{listen}"),
        _dir: dir,
    }
}

/// `(alertname, tenant, state)` of every pending or firing alert.
async fn alerts(http: &reqwest::Client, prom: &Prometheus) -> Vec<(String, String, String)> {
    let Ok(resp) = http.get(format!("{}/api/v1/alerts", prom.url)).send().await else {
        return Vec::new();
    };
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    body["data"]["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    let s = |v: &Value| v.as_str().unwrap_or("").to_string();
                    (
                        s(&x["labels"]["alertname"]),
                        s(&x["labels"]["tenant"]),
                        s(&x["state"]),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `name` fires (for `tenant`, when given); returns how long it took.
async fn wait_firing(
    http: &reqwest::Client,
    prom: &Prometheus,
    name: &str,
    tenant: Option<&str>,
    timeout: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let now = alerts(http, prom).await;
        if now
            .iter()
            .any(|(n, t, s)| n == name && s == "firing" && tenant.is_none_or(|want| t == want))
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "{name} ({tenant:?}) did not fire within {timeout:?}; alerts now: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn iso(at: chrono::DateTime<Utc>) -> String {
    at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
}

/// A goto provider of `tenant` at the fake, its access token live there (probes answer 200).
async fn seed(
    conn: &mut redis::Connection,
    fake: &FakeProvider,
    tenant: &str,
    expiry: chrono::DateTime<Utc>,
    options: Value,
    overrides: &[(&str, String)],
) {
    let (cid, secret, rt, at) = (
        format!("cid-{tenant}"),
        format!("secret-{tenant}-{:x}", fastrand::u64(..)),
        format!("rt-{tenant}-{:x}", fastrand::u64(..)),
        format!("at-{tenant}-{:x}", fastrand::u64(..)),
    );
    let mut client = json!({
        "client_id": cid, "client_secret": secret, "refresh_token": rt, "access_token": at,
    });
    if let (Some(c), Some(o)) = (client.as_object_mut(), options.as_object()) {
        c.extend(o.clone());
    }
    fake.seed(client).await;
    seed_tenant_config(conn, tenant);
    let mut fields = oauth_record(fake, &cid, &secret, &rt, &iso(expiry));
    for (k, v) in fields.iter_mut() {
        if k == "access_token" {
            *v = at.clone();
        }
        if let Some((_, value)) = overrides.iter().find(|(name, _)| *name == k.as_str()) {
            *v = value.clone();
        }
    }
    fields.push(("health_path".into(), "/me".into()));
    seed_provider(conn, tenant, "goto", &fields);
}

#[tokio::test]
async fn alerts_fire_in_a_real_prometheus_and_healthy_tokens_raise_nothing() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut conn = redis.conn();
    let now = Utc::now();
    // Healthy: two valid for an hour, one refreshed now (with a refresh token lifetime).
    seed(
        &mut conn,
        &fake,
        "healthy-a",
        now + chrono::Duration::hours(1),
        json!({}),
        &[],
    )
    .await;
    seed(
        &mut conn,
        &fake,
        "healthy-b",
        now + chrono::Duration::hours(1),
        json!({}),
        &[],
    )
    .await;
    seed(
        &mut conn,
        &fake,
        "healthy-rotated",
        now,
        json!({"refresh_token_expires_in": 86400}),
        &[],
    )
    .await;
    // Revoked: the provider refuses the grant.
    seed(
        &mut conn,
        &fake,
        "revoked",
        now,
        json!({"revoked": true}),
        &[],
    )
    .await;
    // Expired 10 minutes ago, its token endpoint down (nothing listens there).
    let down_url = format!("http://127.0.0.1:{}/token", free_port());
    seed(
        &mut conn,
        &fake,
        "down",
        now - chrono::Duration::minutes(10),
        json!({}),
        &[("token_url", down_url)],
    )
    .await;
    // An invalid record (unknown provider type): counted, never refreshed.
    seed(
        &mut conn,
        &fake,
        "broken",
        now,
        json!({}),
        &[("provider_type", "nonesuch".into())],
    )
    .await;

    let daemon = Daemon::start(
        &redis,
        &[
            ("TOKENWARDEN_HEALTH_PROBE_INTERVAL_SECS", "1"),
            ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
            ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
            ("TOKENWARDEN_REFRESH_RETRY_MAX_SECS", "2"),
            ("TOKENWARDEN_REDIS_COMMAND_TIMEOUT_MS", "500"),
            ("TOKENWARDEN_REDIS_PING_INTERVAL_MS", "250"),
        ],
    );
    daemon.wait_ready(Duration::from_secs(20)).await;
    wait_until("revoked: reauth_required", Duration::from_secs(15), || {
        hget(&mut conn, &health_key("revoked", "goto"), "state").as_deref()
            == Some("reauth_required")
    })
    .await;
    wait_until("healthy-rotated refreshed", Duration::from_secs(15), || {
        hget(
            &mut conn,
            &health_key("healthy-rotated", "goto"),
            "last_refresh_result",
        )
        .as_deref()
            == Some("success")
    })
    .await;

    let prom = start_prometheus(daemon.base_url().trim_start_matches("http://"));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|e| panic!("HTTP client: {e}"));
    let started = Instant::now();
    let reauth = wait_firing(
        &http,
        &prom,
        "TokenwardenReauthRequired",
        Some("revoked"),
        Duration::from_secs(60),
    )
    .await;
    let expired = wait_firing(
        &http,
        &prom,
        "TokenwardenTokenExpired",
        Some("down"),
        Duration::from_secs(60),
    )
    .await;
    // A few more evaluations: nothing about the healthy tokens, nothing fleet-wide.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before_freeze = alerts(&http, &prom).await;
    eprintln!(
        "Prometheus up {:?}: TokenwardenReauthRequired firing after {reauth:?}, \
         TokenwardenTokenExpired after {:?}; alerts: {before_freeze:?}",
        started.elapsed(),
        reauth + expired
    );
    for (name, tenant, state) in &before_freeze {
        assert!(
            !HEALTHY.contains(&tenant.as_str()),
            "{name} is {state} for healthy tenant {tenant}"
        );
        assert!(
            !tenant.is_empty(),
            "{name} ({state}) without a tenant while Redis is up: {before_freeze:?}"
        );
    }

    // `status`, most urgent first: the re-authorisation, then the expired one.
    let out = Daemon::cli(
        &["status"],
        &[("TOKENWARDEN_REDIS_URL", redis.url().as_str())],
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{table}");
    let order: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(order.first().copied(), Some("revoked"), "{table}");
    assert_eq!(order.get(1).copied(), Some("down"), "{table}");

    // The same scrape carries every metric the dashboard and the alerts query.
    let scrape = daemon.metrics().await;
    let dir = TempDir::new("tw-scrape");
    let file = dir.path().join("scrape.txt");
    std::fs::write(&file, &scrape).unwrap_or_else(|e| panic!("scrape: {e}"));
    let check = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/deploy_checks.py"
        ))
        .arg("metrics")
        .arg(&file)
        .arg("--require")
        .output()
        .unwrap_or_else(|e| panic!("python3: {e}"));
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    eprintln!("{report}");
    assert!(check.status.success(), "{report}");

    // Redis frozen: pings time out, redis_up 0, TokenwardenRedisDown.
    let redis_pid = redis
        .pid()
        .unwrap_or_else(|| panic!("redis-server has no pid"));
    assert!(send_signal(redis_pid, "STOP"), "SIGSTOP redis-server");
    let down = wait_firing(
        &http,
        &prom,
        "TokenwardenRedisDown",
        None,
        Duration::from_secs(60),
    )
    .await;
    assert!(send_signal(redis_pid, "CONT"), "SIGCONT redis-server");
    eprintln!("Redis frozen: TokenwardenRedisDown firing after {down:?}");
    let frozen = alerts(&http, &prom).await;
    for (name, tenant, state) in &frozen {
        assert!(
            !HEALTHY.contains(&tenant.as_str()),
            "{name} is {state} for healthy tenant {tenant} while Redis is frozen"
        );
    }
    daemon.assert_running();
}
