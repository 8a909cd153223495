//! Redis as operators run it: a 3-master Cluster served by two replicas, Sentinel failover,
//! TLS with a throwaway CA, a least-privilege ACL user, and the configuration rule that
//! Cluster and Sentinel exclude each other.
//! Every server is a real `redis-server` started by the test.

mod support;

use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use serde_json::{json, Value};
use support::metrics::metric;
use support::redis::{SentinelServer, TlsFiles, SENTINEL_MASTER};
use support::{
    free_port, hgetall, oauth_record, provider_key, seed_provider, unique_temp_dir,
    wait_until_async, Daemon, FakeProvider, RedisServer, Secrets,
};

const TENANT: &str = "topo";

const FAST_ENV: [(&str, &str); 4] = [
    ("TOKENWARDEN_HEALTH_ENABLED", "false"),
    ("TOKENWARDEN_REGISTRY_CHANGE_SCAN_INTERVAL_SECS", "1"),
    ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0"),
    ("TOKENWARDEN_REFRESH_RETRY_BASE_MS", "200"),
];

/// The ACL rules of docs/redis-topologies.md ("Least privilege").
pub const ACL_RULES: &[&str] = &[
    "on",
    ">tw-test-password",
    "resetkeys",
    "~tenant:*",
    "~tokenwarden:*",
    "resetchannels",
    "-@all",
    "+@read",
    "+@write",
    "+@scripting",
    "+@connection",
    "+wait",
    // The token budget script reads the server clock.
    "+time",
    "-@dangerous",
    "+client|tracking",
];

fn count(v: &Value, name: &str) -> u64 {
    v[name].as_u64().unwrap_or(0)
}

/// A client at the fake whose tokens live `ttl` seconds, and the fields of a record of it
/// expiring now: the client id and the fields.
async fn rotating_record(
    fake: &FakeProvider,
    name: &str,
    ttl: u64,
    secrets: &mut Secrets,
) -> (String, Vec<(String, String)>) {
    let (id, secret, rt) = secrets.creds(name);
    fake.seed(
        json!({"client_id": id, "client_secret": secret, "refresh_token": rt, "expires_in": ttl}),
    )
    .await;
    let expiry =
        (Utc::now() + chrono::TimeDelta::seconds(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let fields = oauth_record(fake, &id, &secret, &rt, &expiry);
    (id, fields)
}

/// Seeds a provider record whose token lives `ttl` seconds at the fake, expiring now.
async fn seed_rotating(
    fake: &FakeProvider,
    conn: &mut redis::Connection,
    name: &str,
    ttl: u64,
    secrets: &mut Secrets,
) -> (String, String) {
    let (id, fields) = rotating_record(fake, name, ttl, secrets).await;
    seed_provider(conn, TENANT, name, &fields);
    (id, provider_key(TENANT, name))
}

/// Waits until the fake saw `n` good refreshes of `client`.
async fn refreshes(fake: &FakeProvider, client: &str, n: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let s = fake.client_stats(client).await;
        if count(&s, "refresh_ok") >= n {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} refreshes within {within:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `refresh_token` field of the record at `key` (empty when there is none).
fn refresh_token_of(redis: &RedisServer, key: &str) -> String {
    hgetall(&mut redis.conn(), key)
        .get("refresh_token")
        .cloned()
        .unwrap_or_default()
}

/// No refresh token used twice, and the record (read by `read`) ends with the live one.
async fn no_token_lost(fake: &FakeProvider, client: &str, mut read: impl FnMut() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let live = fake.client_stats(client).await["live_refresh_token"].clone();
        if live.as_str() == Some(read().as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the record does not hold the fake's live refresh token"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = fake.stats().await;
    let c = &stats["clients"][client];
    assert_eq!(
        count(c, "reuse"),
        0,
        "a refresh token was used twice: {stats}"
    );
    assert_eq!(count(c, "invalid_grant"), 0, "{stats}");
    assert_eq!(count(&stats, "concurrent_same_rt"), 0, "{stats}");
}

#[test]
fn cluster_and_sentinel_settings_together_exit_2() {
    let out = Daemon::cli(
        &["check-config"],
        &[
            (
                "TOKENWARDEN_REDIS_CLUSTER_URLS",
                "redis://127.0.0.1:7000,redis://127.0.0.1:7001",
            ),
            ("TOKENWARDEN_REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379"),
            ("TOKENWARDEN_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exclude each other"), "{err}");
    let ok = Daemon::cli(
        &["check-config"],
        &[
            ("TOKENWARDEN_REDIS_SENTINEL_URLS", "redis://127.0.0.1:26379"),
            ("TOKENWARDEN_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ],
    );
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout)
        .contains("sentinel redis://127.0.0.1:26379 master mymaster"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_least_privilege_acl_user_is_enough() {
    let redis = RedisServer::start();
    let mut admin = redis.conn();
    let mut setuser = redis::cmd("ACL");
    setuser.arg("SETUSER").arg("tw");
    for r in ACL_RULES {
        setuser.arg(*r);
    }
    setuser
        .query::<()>(&mut admin)
        .unwrap_or_else(|e| panic!("ACL SETUSER: {e}"));
    let fake = FakeProvider::start(3600);
    let mut secrets = Secrets::default();
    let (client, key) = seed_rotating(&fake, &mut admin, "goto", 1, &mut secrets).await;
    let url = format!("redis://tw:tw-test-password@127.0.0.1:{}/0", redis.port());
    let mut env = FAST_ENV.to_vec();
    env.push(("TOKENWARDEN_REDIS_URL", &url));
    let daemon = Daemon::start(&redis, &env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    refreshes(&fake, &client, 3, Duration::from_secs(15)).await;
    no_token_lost(&fake, &client, || refresh_token_of(&redis, &key)).await;
    let logs = daemon.logs();
    assert!(
        !logs.contains("NOPERM") || logs.contains("taken as off"),
        "a command the ACL rules do not allow: {logs}"
    );
    let denied: Vec<String> = redis::cmd("ACL")
        .arg("LOG")
        .query::<Vec<Value2>>(&mut admin)
        .map(|l| l.into_iter().map(|v| format!("{v:?}")).collect())
        .unwrap_or_default();
    // CONFIG GET (keyspace notifications, taken as off) is the one refusal expected.
    for entry in &denied {
        assert!(
            entry.contains("config"),
            "refused by the ACL rules: {entry}"
        );
    }
    secrets.assert_not_logged(&daemon);
}

type Value2 = redis::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_throwaway_ca_and_a_client_certificate() {
    let tls = TlsFiles::generate();
    let tls_port = free_port();
    let args = tls.server_args(tls_port, true);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let redis = RedisServer::start_with_args(&args);
    let fake = FakeProvider::start(3600);
    let mut secrets = Secrets::default();
    let (client, key) = seed_rotating(&fake, &mut redis.conn(), "goto", 1, &mut secrets).await;
    let url = format!("rediss://127.0.0.1:{tls_port}/0");
    let (ca, cert, keyf) = (
        tls.path("ca.crt"),
        tls.path("client.crt"),
        tls.path("client.key"),
    );
    let mut env = FAST_ENV.to_vec();
    env.extend([
        ("TOKENWARDEN_REDIS_URL", url.as_str()),
        ("TOKENWARDEN_REDIS_CA_FILE", ca.as_str()),
        ("TOKENWARDEN_REDIS_CLIENT_CERT_FILE", cert.as_str()),
        ("TOKENWARDEN_REDIS_CLIENT_KEY_FILE", keyf.as_str()),
    ]);
    let daemon = Daemon::start(&redis, &env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    refreshes(&fake, &client, 3, Duration::from_secs(15)).await;
    no_token_lost(&fake, &client, || refresh_token_of(&redis, &key)).await;
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query(&mut redis.conn())
        .unwrap_or_default();
    assert!(!info.is_empty());
    // Without the CA the server's certificate is refused: the daemon never becomes ready.
    let mut env = FAST_ENV.to_vec();
    env.push(("TOKENWARDEN_REDIS_URL", url.as_str()));
    let untrusting = Daemon::start(&redis, &env);
    let (status, _) = untrusting.get("/readyz").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status2, _) = untrusting.get("/readyz").await;
    assert!(
        status != 200 && status2 != 200,
        "ready without trusting the CA"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_while_refreshing_loses_no_token() {
    let master = RedisServer::start_with_args(&["--repl-diskless-sync-delay", "0"]);
    let replica_of = master.port().to_string();
    let replica = RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &replica_of]);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.conn())
            .unwrap_or_default();
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not sync: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sentinel = SentinelServer::start(master.port());
    let fake = FakeProvider::start(3600);
    let mut secrets = Secrets::default();
    let (client, key) = seed_rotating(&fake, &mut master.conn(), "goto", 1, &mut secrets).await;
    let surl = sentinel.url();
    let mut env = FAST_ENV.to_vec();
    env.extend([
        ("TOKENWARDEN_REDIS_SENTINEL_URLS", surl.as_str()),
        ("TOKENWARDEN_REDIS_SENTINEL_MASTER", SENTINEL_MASTER),
        ("TOKENWARDEN_REDIS_RECOVERY_GRACE_MS", "500"),
    ]);
    let monitor = support::redis::Monitor::start(&master).await;
    let daemon = Daemon::start(&master, &env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    let before = count(
        &refreshes(&fake, &client, 2, Duration::from_secs(15)).await,
        "refresh_ok",
    );
    write_back_round_trip_is_one(&monitor, 2).await;
    drop(monitor);
    let failover_at = Instant::now();
    sentinel.failover();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sentinel.master_port() != Some(replica.port()) {
        assert!(
            Instant::now() < deadline,
            "the sentinel did not promote the replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = failover_at.elapsed();
    support::wait_for_log(
        &daemon,
        "sentinel names a new master",
        Duration::from_secs(20),
    )
    .await;
    let followed = failover_at.elapsed();
    let after = count(
        &refreshes(&fake, &client, before + 3, Duration::from_secs(20)).await,
        "refresh_ok",
    );
    let resumed = failover_at.elapsed();
    no_token_lost(&fake, &client, || refresh_token_of(&replica, &key)).await;
    let stats = fake.client_stats(&client).await;
    eprintln!(
        "failover figures: {before} refreshes before; replica promoted after {} ms; daemon on the new master after {} ms; {} more refreshes by {} ms; reuse {}, invalid_grant {}",
        promoted.as_millis(),
        followed.as_millis(),
        after - before,
        resumed.as_millis(),
        count(&stats, "reuse"),
        count(&stats, "invalid_grant"),
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("kept journal entries replayed"),
        "no failover replay in the logs"
    );
    secrets.assert_not_logged(&daemon);
}

/// `redis.wait_replicas` asks for a replica this Redis does not have: each write-back's
/// `WAIT` comes back short after `redis.wait_timeout_ms`. The shortfall is counted
/// (`redis_wait_shortfall_total`) and logged, never an error: the rotated tokens are
/// written, the next refreshes follow, and no refresh token is lost or used twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_short_of_replicas_is_counted_and_loses_no_token() {
    let redis = RedisServer::start();
    let fake = FakeProvider::start(3600);
    let mut secrets = Secrets::default();
    // Tokens of 3 s: a refresh about every 2 s.
    let (client, key) = seed_rotating(&fake, &mut redis.conn(), "goto", 3, &mut secrets).await;
    let mut env = FAST_ENV.to_vec();
    env.extend([
        ("TOKENWARDEN_REDIS_WAIT_REPLICAS", "1"),
        ("TOKENWARDEN_REDIS_WAIT_TIMEOUT_MS", "150"),
    ]);
    let daemon = Daemon::start(&redis, &env);
    daemon.wait_ready(Duration::from_secs(10)).await;
    let stats = refreshes(&fake, &client, 3, Duration::from_secs(20)).await;
    let refreshed = count(&stats, "refresh_ok");
    // Each of those write-backs waited for the replica that is not there.
    let shortfalls =
        |body: &str| metric(body, "tokenwarden_redis_wait_shortfall_total", &[]).unwrap_or(0.0);
    wait_until_async(
        "a counted WAIT shortfall for each write-back",
        Duration::from_secs(5),
        || {
            let daemon = &daemon;
            async move { shortfalls(&daemon.metrics().await) >= refreshed as f64 }
        },
    )
    .await;
    let short = shortfalls(&daemon.metrics().await);
    support::wait_for_log(
        &daemon,
        "write-back confirmed by fewer replicas than redis.wait_replicas",
        Duration::from_secs(5),
    )
    .await;
    no_token_lost(&fake, &client, || refresh_token_of(&redis, &key)).await;
    println!("{refreshed} refreshes, {short} WAIT shortfalls counted, no token lost");
    daemon.assert_running();
    secrets.assert_not_logged(&daemon);
}

/// Under Sentinel the write-back, the reservation's and the lock's releases and the `WAIT`
/// reach the master together: after each compare-and-set (at least `writes` of them), the
/// next commands from the same connection are those three, in that order (before, `WAIT`
/// came alone after the write-back, and the releases in a round trip of their own).
async fn write_back_round_trip_is_one(monitor: &support::redis::Monitor, writes: usize) {
    fn client(line: &str) -> Option<&str> {
        let (_, rest) = line.split_once(" [")?;
        let (who, _) = rest.split_once("] ")?;
        Some(who)
    }
    let mut lines = Vec::new();
    support::wait_until("the write-backs' WAITs", Duration::from_secs(5), || {
        lines = monitor.lines();
        lines.iter().filter(|l| l.contains("] \"WAIT\"")).count() >= writes
    })
    .await;
    let mut seen = 0;
    for (i, line) in lines.iter().enumerate() {
        if !line.contains("'refresh_token', ARGV[3]") || line.contains(" lua]") {
            continue;
        }
        let who = client(line);
        let next: Vec<&String> = lines[i + 1..]
            .iter()
            .filter(|l| client(l) == who)
            .take(3)
            .collect();
        if next.len() < 3 {
            continue;
        }
        seen += 1;
        assert!(
            next[0].contains("\"EVAL\"") && next[0].contains(":inflight\""),
            "after the write-back, the reservation's release: {next:#?}"
        );
        assert!(
            next[1].contains("\"EVAL\"") && next[1].contains(":lock\""),
            "then the lock's release: {next:#?}"
        );
        assert!(next[2].contains("] \"WAIT\""), "then WAIT: {next:#?}");
    }
    assert!(
        seen >= writes,
        "{seen} write-backs seen with what followed them"
    );
}

/// Three masters made one Cluster (16384 slots split by `redis-cli --cluster create`).
struct Cluster {
    nodes: Vec<RedisServer>,
}

impl Cluster {
    fn start() -> Cluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with_args(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = std::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run redis-cli --cluster create: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            loop {
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut n.conn())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the cluster did not come up: {info}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Cluster { nodes }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port()))
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn conn(&self) -> redis::cluster_async::ClusterConnection {
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url()).collect();
        redis::cluster::ClusterClient::new(urls)
            .unwrap_or_else(|e| panic!("cluster client: {e}"))
            .get_async_connection()
            .await
            .unwrap_or_else(|e| panic!("cluster connection: {e}"))
    }

    /// The node holding `key` (the one that answers for it without `MOVED`).
    fn owner(&self, key: &str) -> u16 {
        for n in &self.nodes {
            let r: redis::RedisResult<String> = redis::cmd("TYPE").arg(key).query(&mut n.conn());
            if r.is_ok_and(|t| t != "none") {
                return n.port();
            }
        }
        panic!("no node holds {key}")
    }
}

/// Writes a provider record through the Cluster as the gateway does.
async fn cluster_seed(
    conn: &mut redis::cluster_async::ClusterConnection,
    fake: &FakeProvider,
    tenant: &str,
    name: &str,
    ttl: u64,
    secrets: &mut Secrets,
) -> (String, String) {
    let (id, fields) = rotating_record(fake, name, ttl, secrets).await;
    let key = provider_key(tenant, name);
    let mut hset = redis::cmd("HSET");
    hset.arg(&key);
    for (k, v) in &fields {
        hset.arg(k).arg(v);
    }
    hset.query_async::<()>(conn)
        .await
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
    redis::cmd("SADD")
        .arg(format!("tenant:{tenant}:providers"))
        .arg(name)
        .query_async::<()>(conn)
        .await
        .unwrap_or_else(|e| panic!("SADD: {e}"));
    (id, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_master_cluster_served_by_two_replicas_loses_no_token() {
    let cluster = Cluster::start();
    let fake = FakeProvider::start(3600);
    let mut secrets = Secrets::default();
    let mut conn = cluster.conn().await;
    // Twelve records of six tenants, two-second tokens: every master holds some (asserted
    // below), and the two replicas share the tenants.
    let mut providers: Vec<(String, String, String)> = Vec::new();
    for i in 0..12 {
        let (tenant, name) = (format!("topo{}", i % 6), format!("p{i}"));
        let (client, key) = cluster_seed(&mut conn, &fake, &tenant, &name, 2, &mut secrets).await;
        providers.push((tenant, client, key));
    }
    let owners: std::collections::BTreeSet<u16> =
        providers.iter().map(|(_, _, k)| cluster.owner(k)).collect();
    assert_eq!(owners.len(), 3, "records on every master: {owners:?}");
    // Replica ids fixed (kept in each state directory, as a StatefulSet pod keeps its own), so
    // that both replicas own tenants: with random ids all six tenants fall to one replica in
    // one run of 32.
    let ids = ["cluster-replica-a", "cluster-replica-b"];
    let live: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
    for id in ids {
        let owned = (0..6)
            .filter(|i| tokenwarden::ownership::owner(&format!("topo{i}"), &live) == Some(id))
            .count();
        assert!(owned > 0, "{id} owns none of the six tenants");
    }
    let state: Vec<std::path::PathBuf> = ids
        .iter()
        .map(|id| {
            let dir = unique_temp_dir("state");
            std::fs::create_dir_all(&dir).expect("state dir");
            std::fs::write(dir.join("replica-id"), format!("{id}\n")).expect("replica-id");
            dir
        })
        .collect();
    let urls = cluster.urls();
    let with_state = |dir: &std::path::Path| {
        let mut env: Vec<(&str, String)> =
            FAST_ENV.iter().map(|(k, v)| (*k, v.to_string())).collect();
        env.push(("TOKENWARDEN_REDIS_CLUSTER_URLS", urls.clone()));
        env.push(("TOKENWARDEN_STATE_DIR", dir.display().to_string()));
        env
    };
    let (env_a, env_b) = (with_state(&state[0]), with_state(&state[1]));
    let env_a: Vec<(&str, &str)> = env_a.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let env_b: Vec<(&str, &str)> = env_b.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = Daemon::start(&cluster.nodes[0], &env_a);
    let b = Daemon::start(&cluster.nodes[1], &env_b);
    a.wait_ready(Duration::from_secs(20)).await;
    b.wait_ready(Duration::from_secs(20)).await;
    for (d, id) in [(&a, ids[0]), (&b, ids[1])] {
        assert!(
            d.logs().contains(&format!("replica={id} ")),
            "the daemon runs as {id}, kept in its state directory"
        );
    }
    for (_, client, _) in &providers {
        refreshes(&fake, client, 2, Duration::from_secs(30)).await;
    }
    // One added while running: served.
    let (added, _) = cluster_seed(&mut conn, &fake, "topo0", "added", 2, &mut secrets).await;
    refreshes(&fake, &added, 2, Duration::from_secs(30)).await;
    // One removed while running: both replicas forget it, and no call follows.
    let (gone_tenant, gone_client, gone_key) = providers.remove(0);
    redis::cmd("SREM")
        .arg(format!("tenant:{gone_tenant}:providers"))
        .arg("p0")
        .query_async::<()>(&mut conn)
        .await
        .expect("SREM");
    redis::cmd("DEL")
        .arg(&gone_key)
        .query_async::<()>(&mut conn)
        .await
        .expect("DEL");
    for d in [&a, &b] {
        wait_until_async(
            "both replicas to forget the removed provider",
            Duration::from_secs(20),
            || async {
                metric(
                    &d.metrics().await,
                    "tokenwarden_token_expiry_timestamp_seconds",
                    &[("tenant", gone_tenant.as_str()), ("provider", "p0")],
                )
                .is_none()
            },
        )
        .await;
    }
    let calls_when_gone = count(&fake.client_stats(&gone_client).await, "calls");
    // Everyone else goes on: three more refreshes each (about six seconds of two-second
    // tokens, during which the removed one is not called).
    for (_, client, _) in &providers {
        let n = count(&fake.client_stats(client).await, "refresh_ok");
        refreshes(&fake, client, n + 3, Duration::from_secs(30)).await;
    }
    assert_eq!(
        count(&fake.client_stats(&gone_client).await, "calls"),
        calls_when_gone,
        "the removed provider was called after both replicas forgot it"
    );
    // Each record holds its live refresh token (read together, as tokens keep rotating).
    let mut total = 0;
    let read = cluster.conn().await;
    for (_, client, key) in &providers {
        wait_until_async(
            "the record to hold the live refresh token",
            Duration::from_secs(20),
            || {
                let mut read = read.clone();
                let (fake, key, client) = (&fake, key.clone(), client.clone());
                async move {
                    let rt: Option<String> = redis::cmd("HGET")
                        .arg(&key)
                        .arg("refresh_token")
                        .query_async(&mut read)
                        .await
                        .unwrap_or(None);
                    let live = fake.client_stats(&client).await["live_refresh_token"].clone();
                    rt.is_some() && live.as_str() == rt.as_deref()
                }
            },
        )
        .await;
        total += count(&fake.client_stats(client).await, "refresh_ok");
    }
    let stats = fake.stats().await;
    assert_eq!(
        count(&stats, "reuse"),
        0,
        "a refresh token was used twice: {stats}"
    );
    assert_eq!(count(&stats, "invalid_grant"), 0, "{stats}");
    assert_eq!(count(&stats, "concurrent_same_rt"), 0, "{stats}");
    let served_by = |d: &Daemon| d.logs().matches("token refreshed").count();
    eprintln!(
        "cluster figures: 3 masters, {} records, {total} refreshes, replica a {} and b {}, reuse 0",
        providers.len() + 1,
        served_by(&a),
        served_by(&b),
    );
    assert!(
        served_by(&a) > 0 && served_by(&b) > 0,
        "both replicas serve a share of the fleet"
    );
    secrets.assert_not_logged(&a);
    secrets.assert_not_logged(&b);
}
