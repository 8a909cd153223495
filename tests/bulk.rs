//! The bulk sockets of the full read (`store::bulk`): against a real `redis-server`, their
//! records and stored health parse exactly as the pooled reads' do, hostile records
//! included; they log in with an ACL user and a database of their own; a wrong password, a
//! frozen Redis and a Redis that dies fail the read in time, never hang it or panic; a Redis
//! still loading its dump (`-LOADING`) fails the read on both paths instead of making every
//! record invalid.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::process::send_signal;
use support::RedisServer;
use tokenwarden::config::{Config, RedisConfig};
use tokenwarden::keys::ProviderId;
use tokenwarden::registry::record::RecordState;
use tokenwarden::registry::{EngineRead, ReadStats, Registry};
use tokenwarden::store::bulk::BulkConn;
use tokenwarden::store::{self, Pool};

fn redis_config(url: String, timeout_ms: u64) -> RedisConfig {
    let defaults = Config::load_from(None, &BTreeMap::new()).expect("built-in defaults load");
    RedisConfig {
        url,
        command_timeout_ms: timeout_ms,
        ..defaults.redis
    }
}

/// What a read found, secrets included, comparable across the two paths.
fn describe(read: &EngineRead) -> String {
    let (state, health) = read;
    let secrets = match state {
        RecordState::Valid(r) => format!(
            "{}/{}/{}",
            r.client_secret.expose(),
            r.refresh_token.expose(),
            r.credentials.jwt_assertion.expose()
        ),
        _ => String::new(),
    };
    format!("{state:?} {secrets} {health:?}")
}

fn hset(conn: &mut redis::Connection, key: &str, pairs: &[(&[u8], &[u8])]) {
    let mut cmd = redis::cmd("HSET");
    cmd.arg(key);
    for (f, v) in pairs {
        cmd.arg(*f).arg(*v);
    }
    cmd.query::<()>(conn).expect("HSET");
}

fn record(client: &str) -> Vec<(&'static [u8], Vec<u8>)> {
    vec![
        (b"provider_type", b"goto".to_vec()),
        (b"status", b"active".to_vec()),
        (b"auth_type", b"oauth".to_vec()),
        (b"client_id", client.as_bytes().to_vec()),
        (b"client_secret", format!("secret-of-{client}").into_bytes()),
        (b"refresh_token", format!("rt-of-{client}").into_bytes()),
        (b"token_expiry", b"2030-01-15T10:30:00.123456".to_vec()),
        (b"api_base_url", b"http://127.0.0.1:9/api".to_vec()),
        (b"token_url", b"http://127.0.0.1:9/token".to_vec()),
    ]
}

/// Seeds `ids` in the connection's database: records good and hostile, health hashes
/// stored, hostile and absent. Returns the ids in the order read.
fn seed_mixed(conn: &mut redis::Connection) -> Vec<ProviderId> {
    let mut ids = Vec::new();
    let mut put = |tenant: &str, fields: Vec<(&'static [u8], Vec<u8>)>| {
        let id = ProviderId::new(tenant, "goto");
        let pairs: Vec<(&[u8], &[u8])> = fields.iter().map(|(f, v)| (*f, v.as_slice())).collect();
        hset(conn, &id.record_key(), &pairs);
        ids.push(id);
    };
    put("good", record("c-good"));
    let mut inactive = record("c-inactive");
    inactive[1].1 = b"inactive".to_vec();
    put("inactive", inactive);
    let mut no_client = record("c-none");
    no_client.remove(3);
    put("noclient", no_client);
    let mut bad_secret = record("c-badsecret");
    bad_secret[4].1 = vec![0xff, 0xfe, b'x'];
    put("badsecret", bad_secret);
    let mut binary_extra = record("c-extra");
    binary_extra.push((b"created_at", vec![0xc3, 0x28]));
    binary_extra.push((b"jwt_assertion", "é-jwt\r\n$5\r\n*1".as_bytes().to_vec()));
    put("extra", binary_extra);
    let mut bad_expiry = record("c-expiry");
    bad_expiry[6].1 = b"99999999999999999999".to_vec();
    put("expiry", bad_expiry);
    // A record key of the wrong type, and one that is not there at all.
    let wrong = ProviderId::new("wrongtype", "goto");
    redis::cmd("SET")
        .arg(wrong.record_key())
        .arg("not a hash")
        .query::<()>(conn)
        .expect("SET");
    ids.push(wrong);
    ids.push(ProviderId::new("absent", "goto"));
    // Health hashes: as a daemon leaves them, hostile, of the wrong type.
    let health = |t: &str| ProviderId::new(t, "goto").health_key();
    hset(
        conn,
        &health("good"),
        &[
            (b"state", b"healthy"),
            (b"token_expiry", b"2030-01-15T10:30:00.123456+00:00"),
            (b"next_refresh_at", b"2030-01-15T09:00:00.000000+00:00"),
            (b"consecutive_failures", b"0"),
        ],
    );
    hset(
        conn,
        &health("inactive"),
        &[(b"state", &[0xff][..]), (b"reason", b"x")],
    );
    redis::cmd("RPUSH")
        .arg(health("noclient"))
        .arg("a list")
        .query::<()>(conn)
        .expect("RPUSH");
    ids
}

async fn pooled_reads(pool: &Pool, ids: &[ProviderId], with_health: bool) -> Vec<String> {
    let registry = Registry::new(1000);
    let mut conn = store::conn(pool).await.expect("pooled connection");
    let mut stats = ReadStats::default();
    let reads: Vec<EngineRead> = if with_health {
        registry
            .read_records_and_health(&mut conn, ids, &mut stats)
            .await
            .expect("pooled read")
    } else {
        registry
            .read_records(&mut conn, ids, &mut stats)
            .await
            .expect("pooled read")
            .into_iter()
            .map(|s| (s, None))
            .collect()
    };
    reads.iter().map(describe).collect()
}

async fn bulk_reads(
    conn: &BulkConn<EngineRead>,
    ids: &[ProviderId],
    with_health: bool,
) -> Vec<String> {
    let mut stats = ReadStats::default();
    let reads = Registry::new(1000)
        .read_records_bulk(conn, ids, with_health, &mut stats)
        .await
        .expect("bulk read");
    assert_eq!(stats.round_trips, 1, "one round trip per batch");
    assert_eq!(stats.keys, ids.len() as u64);
    reads.iter().map(describe).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_reads_parse_every_record_as_the_pooled_reads_do() {
    let redis = RedisServer::start();
    let mut admin = redis.conn();
    redis::cmd("SELECT")
        .arg(3)
        .query::<()>(&mut admin)
        .expect("SELECT");
    let ids = seed_mixed(&mut admin);
    // Many records in one batch: its replies arrive in many reads of the socket.
    let mut many = Vec::new();
    for i in 0..3000 {
        let id = ProviderId::new(format!("many{i:05}"), "goto");
        let mut fields = record(&format!("c-{i}"));
        fields.push((b"access_token", vec![b'a'; 1500]));
        let pairs: Vec<(&[u8], &[u8])> = fields.iter().map(|(f, v)| (*f, v.as_slice())).collect();
        hset(&mut admin, &id.record_key(), &pairs);
        many.push(id);
    }
    // Only an ACL user may read, in database 3.
    redis::cmd("ACL")
        .arg(&["SETUSER", "tw", "on", ">bulk-pass-9", "~*", "&*", "+@all"])
        .query::<()>(&mut admin)
        .expect("ACL SETUSER tw");
    let _ = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query::<()>(&mut admin);
    let url = format!("redis://tw:bulk-pass-9@127.0.0.1:{}/3", redis.port());
    let pool = store::pool(&redis_config(url, 5_000)).expect("pool");
    let bulk = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket logs in")
        .expect("offered on one node over TCP");

    for with_health in [true, false] {
        let pooled = pooled_reads(&pool, &ids, with_health).await;
        let bulked = bulk_reads(&bulk, &ids, with_health).await;
        assert_eq!(bulked, pooled, "with_health {with_health}");
    }
    let pooled = pooled_reads(&pool, &ids, true).await;
    // What the hostile ones became, so that the comparison is not of two empty reads.
    assert!(pooled[0].starts_with("Valid("), "{}", pooled[0]);
    assert!(pooled[0].contains("secret-of-c-good/rt-of-c-good"));
    assert!(pooled[0].contains("Some(StoredHealth"), "{}", pooled[0]);
    assert!(pooled[1].starts_with("Inactive"), "{}", pooled[1]);
    assert!(pooled[1].contains("Some(StoredHealth"), "{}", pooled[1]);
    assert!(pooled[2].contains("missing_field") && pooled[2].ends_with("None"));
    assert!(pooled[3].contains("bad_encoding"), "{}", pooled[3]);
    assert!(pooled[4].contains("é-jwt\r\n$5\r\n*1"), "{}", pooled[4]);
    assert!(pooled[6].contains("wrong_type"), "{}", pooled[6]);

    // Several batches in flight on the one socket, each answered with its own records.
    let (a, b) = many.split_at(1700);
    let (ra, rb) = tokio::join!(bulk_reads(&bulk, a, false), bulk_reads(&bulk, b, true));
    let expected_a = pooled_reads(&pool, a, false).await;
    let expected_b = pooled_reads(&pool, b, true).await;
    assert_eq!(ra.len(), 1700);
    assert!(ra == expected_a, "first batch differs");
    assert!(rb == expected_b, "second batch differs");
    assert!(ra.iter().all(|r| r.starts_with("Valid(")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_socket_fails_in_time_and_says_why() {
    let mut redis = RedisServer::start();
    let mut admin = redis.conn();
    let ids = seed_mixed(&mut admin);

    // A wrong password: refused, and the error names the command, not the password.
    redis::cmd("CONFIG")
        .arg(&["SET", "requirepass", "right-pass-1"])
        .query::<()>(&mut admin)
        .expect("CONFIG SET requirepass");
    let wrong = format!("redis://:wrong-pass-2@127.0.0.1:{}/0", redis.port());
    let pool = store::pool(&redis_config(wrong, 2_000)).expect("pool");
    let err = match BulkConn::<EngineRead>::open(&pool).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a wrong password opened a bulk socket"),
    };
    assert!(err.contains("AUTH"), "{err}");
    assert!(!err.contains("wrong-pass-2"), "the password leaked: {err}");

    // A socket on a live Redis, then abandoned and frozen cases below.
    let url = format!("redis://:right-pass-1@127.0.0.1:{}/0", redis.port());
    let pool = store::pool(&redis_config(url, 400)).expect("pool");
    let bulk = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket")
        .expect("offered");
    assert_eq!(bulk_reads(&bulk, &ids, true).await.len(), ids.len());

    // Given up by its caller before the answer: that socket is not used again.
    let abandoned = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket")
        .expect("offered");
    let mut stats = ReadStats::default();
    let registry = Registry::new(1000);
    // Frozen meanwhile, so that the answer cannot come before the read is dropped.
    let pid = redis.pid().expect("redis pid");
    assert!(send_signal(pid, "STOP"), "SIGSTOP redis-server");
    {
        let mut read =
            std::pin::pin!(registry.read_records_bulk(&abandoned, &ids, true, &mut stats));
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(read.as_mut(), cx))
        })
        .await;
        assert!(
            first.is_pending(),
            "the answer cannot be there at the first poll"
        );
        // `read` is dropped here, its batch sent and not answered.
    }
    assert!(send_signal(pid, "CONT"), "SIGCONT redis-server");
    let after = registry
        .read_records_bulk(&abandoned, &ids, false, &mut stats)
        .await
        .expect_err("a socket whose read was given up is not used again")
        .to_string();
    assert!(after.contains("failed before"), "{after}");
    drop(abandoned);

    // Frozen during a read: it fails within the command timeout, and the socket is not used
    // again.
    assert!(send_signal(pid, "STOP"), "SIGSTOP redis-server");
    let started = Instant::now();
    let mut stats = ReadStats::default();
    let frozen = Registry::new(1000)
        .read_records_bulk(&bulk, &ids, true, &mut stats)
        .await;
    let took = started.elapsed();
    assert!(send_signal(pid, "CONT"), "SIGCONT redis-server");
    let err = frozen
        .expect_err("a frozen Redis fails the read")
        .to_string();
    assert!(err.contains("timed out"), "{err}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    let again = Registry::new(1000)
        .read_records_bulk(&bulk, &ids, false, &mut stats)
        .await;
    assert!(again.is_err(), "a socket that timed out is not used again");

    // Dies mid-read: an error, not a hang.
    let bulk = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket")
        .expect("offered");
    assert!(send_signal(pid, "STOP"), "SIGSTOP redis-server");
    let read = tokio::spawn(async move {
        let mut stats = ReadStats::default();
        Registry::new(1000)
            .read_records_bulk(&bulk, &ids, true, &mut stats)
            .await
            .map(|r| r.len())
    });
    let started = Instant::now();
    redis.kill();
    let died = read.await.expect("read task");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = died.expect_err("a dead Redis fails the read").to_string();
    assert!(
        err.contains("closed") || err.contains("read") || err.contains("write"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loading_redis_fails_the_read_instead_of_making_records_invalid() {
    let mut redis = RedisServer::start();
    let mut admin = redis.conn();
    let ids = seed_mixed(&mut admin);
    // Enough keys that loading them at 2 ms each takes about 6 s.
    let mut filler = redis::pipe();
    for i in 0..3000 {
        filler
            .cmd("SET")
            .arg(format!("filler:{i}"))
            .arg("x")
            .ignore();
    }
    filler.query::<()>(&mut admin).expect("filler keys");
    drop(admin);
    let pool = store::pool(&redis_config(redis.url(), 2_000)).expect("pool");
    let loaded = pooled_reads(&pool, &ids, true).await;

    redis.restart_loading(2_000);
    let started = Instant::now();
    let registry = Registry::new(1000);
    let mut stats = ReadStats::default();
    let mut conn = store::conn(&pool).await.expect("pooled connection");
    for with_health in [false, true] {
        let err = if with_health {
            registry
                .read_records_and_health(&mut conn, &ids, &mut stats)
                .await
                .map(|_| ())
        } else {
            registry
                .read_records(&mut conn, &ids, &mut stats)
                .await
                .map(|_| ())
        };
        let err = err
            .expect_err("a pooled read of a loading Redis failed")
            .to_string();
        assert!(err.to_lowercase().contains("loading"), "{err}");
    }
    let tenants: Vec<String> = ids.iter().map(|id| id.tenant.to_string()).collect();
    let err = registry
        .read_members(&mut conn, &tenants, &mut stats)
        .await
        .expect_err("members of a loading Redis are not read as none")
        .to_string();
    assert!(err.to_lowercase().contains("loading"), "{err}");
    // The read under a provider's lock (refresh, replay, repair) fails too, instead of
    // taking the error for a record of the wrong type.
    let err = Registry::read_record(&mut conn, &ids[0])
        .await
        .expect_err("a record read under the lock of a loading Redis failed")
        .to_string();
    assert!(err.to_lowercase().contains("loading"), "{err}");
    // The bulk socket logs in (AUTH and SELECT are served while loading), then its read fails.
    let bulk = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket")
        .expect("offered");
    let err = Registry::new(1000)
        .read_records_bulk(&bulk, &ids, true, &mut stats)
        .await
        .expect_err("a bulk read of a loading Redis failed")
        .to_string();
    assert!(err.to_lowercase().contains("loading"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the reads were answered while Redis was still loading ({:?})",
        started.elapsed()
    );

    // Once loaded, both paths read what was there before, to the byte.
    redis.wait_loaded(Duration::from_secs(30));
    assert_eq!(pooled_reads(&pool, &ids, true).await, loaded);
    let bulk = BulkConn::<EngineRead>::open(&pool)
        .await
        .expect("bulk socket")
        .expect("offered");
    assert_eq!(bulk_reads(&bulk, &ids, true).await, loaded);
}
