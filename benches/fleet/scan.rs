//! Registry scan and parse: the library's full read in process (as the daemon does it), the
//! same one step after the other, a naive scan, and the physical limit of the same Redis (raw
//! pipelined reads, `redis-benchmark`), with their round trips and the server's time.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::Value;
use tokenwarden::config::RedisConfig;
use tokenwarden::keys::{self, KeyKind, ProviderId};
use tokenwarden::registry::record::RecordState;
use tokenwarden::registry::{parse_record_value, Members, ReadStats, Registry, RECORD_FIELDS};

use crate::perf::Perf;
use crate::records::Group;
use crate::report::Row;
use crate::support::redis::{command_delta, commandstats};
use crate::{median, ms, Bench};

/// Batch of the raw pipelined read (the physical limit).
const RAW_BATCH: usize = 1000;

struct LibScan {
    total: Duration,
    discover: Duration,
    round_trips: u64,
    valid: usize,
}

/// Provider ids of a discovery, in order.
fn ids_of(discovered: &tokenwarden::registry::Discovery) -> Vec<ProviderId> {
    let mut ids = Vec::new();
    for (tenant, members) in discovered {
        if let Members::Names(names) = members {
            let tenant: std::sync::Arc<str> = std::sync::Arc::from(tenant.as_str());
            for p in names {
                ids.push(ProviderId::new(std::sync::Arc::clone(&tenant), p.as_str()));
            }
        }
    }
    ids
}

fn count_valid(states: &[RecordState]) -> usize {
    states
        .iter()
        .filter(|s| matches!(s, RecordState::Valid(_)))
        .count()
}

/// The registry read as the daemon's full read does it: [`Registry::full_read`] (SCAN on a
/// connection of its own while each slice of tenants found has its members read), and each
/// slice's records read (`read_records`, parsed) on another.
async fn library_scan(pool: &tokenwarden::store::Pool, batch: usize) -> Result<LibScan> {
    let registry = Registry::new(batch);
    let started = Instant::now();
    let mut stats = ReadStats::default();
    let mut read = registry.full_read(pool).await?;
    let mut valid = 0;
    while let Some(discovered) = read.next_slice(&mut stats).await? {
        let ids = ids_of(&discovered);
        let mut conn = tokenwarden::store::conn(pool).await?;
        let states = registry.read_records(&mut conn, &ids, &mut stats).await?;
        valid += count_valid(&states);
    }
    read.finish(&mut stats).await?;
    Ok(LibScan {
        total: started.elapsed(),
        discover: Duration::ZERO,
        round_trips: stats.round_trips,
        valid,
    })
}

/// `Registry::discover` (SCAN, then SMEMBERS), then `read_records`: one after the other.
async fn library_scan_sequential(pool: &tokenwarden::store::Pool, batch: usize) -> Result<LibScan> {
    let mut conn = tokenwarden::store::conn(pool).await?;
    let registry = Registry::new(batch);
    let mut stats = ReadStats::default();
    let started = Instant::now();
    let discovered = registry.discover(&mut conn, &mut stats).await?;
    let ids = ids_of(&discovered);
    let discover = started.elapsed();
    let states = registry.read_records(&mut conn, &ids, &mut stats).await?;
    let total = started.elapsed();
    Ok(LibScan {
        total,
        discover,
        round_trips: stats.round_trips,
        valid: count_valid(&states),
    })
}

/// `KEYS` + one `HGETALL` per record, parsed the same way.
async fn naive_scan(conn: &mut MultiplexedConnection) -> Result<(Duration, u64, usize)> {
    let started = Instant::now();
    let all: Vec<String> = redis::cmd("KEYS")
        .arg("tenant:*:provider:*")
        .query_async(conn)
        .await?;
    let mut round_trips = 1u64;
    let mut valid = 0usize;
    for key in all
        .iter()
        .filter(|k| matches!(keys::classify(k), Some(KeyKind::Record { .. })))
    {
        let v: Value = redis::cmd("HGETALL").arg(key).query_async(conn).await?;
        round_trips += 1;
        if matches!(parse_record_value(v), RecordState::Valid(_)) {
            valid += 1;
        }
    }
    Ok((started.elapsed(), round_trips, valid))
}

/// Pipelined `HGETALL` of known keys (no discovery), nothing parsed, `in_flight` pipelines
/// at once on one connection: what one connection can move.
async fn raw_pipelined(
    conn: &MultiplexedConnection,
    record_keys: &[String],
    in_flight: usize,
) -> Result<(Duration, u64, Vec<Value>)> {
    raw_pipelined_with(conn, record_keys, in_flight, None).await
}

/// As [`raw_pipelined`]; with `fields`, `HMGET` of those fields instead of `HGETALL`.
async fn raw_pipelined_with(
    conn: &MultiplexedConnection,
    record_keys: &[String],
    in_flight: usize,
    fields: Option<&[&str]>,
) -> Result<(Duration, u64, Vec<Value>)> {
    let started = Instant::now();
    let answers: Vec<redis::RedisResult<Vec<Value>>> =
        futures_util::stream::iter(record_keys.chunks(RAW_BATCH))
            .map(|chunk| {
                let mut conn = conn.clone();
                let mut pipe = redis::pipe();
                for k in chunk {
                    match fields {
                        Some(f) => pipe.cmd("HMGET").arg(k).arg(f),
                        None => pipe.cmd("HGETALL").arg(k),
                    };
                }
                async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
            })
            .buffered(in_flight.max(1))
            .collect()
            .await;
    let elapsed = started.elapsed();
    let round_trips = answers.len() as u64;
    let mut out = Vec::with_capacity(record_keys.len());
    for a in answers {
        out.extend(a?);
    }
    Ok((elapsed, round_trips, out))
}

/// `redis-benchmark -P 16 [-c 1]` HGETALL of one record: requests per second.
pub fn redis_benchmark(port: u16, key: &str, requests: usize, one_client: bool) -> Option<f64> {
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-P", "16"]);
    if one_client {
        cmd.args(["-c", "1"]);
    }
    let out = cmd
        .args(["-n", &requests.to_string(), "--csv", "HGETALL", key])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let line = text.lines().rev().find(|l| l.contains("HGETALL"))?;
    line.split(',').nth(1)?.trim_matches('"').parse().ok()
}

/// The scans of the `main` group of `n` records already seeded, into `row`.
pub async fn measure(b: &mut Bench, n: usize, main: &Group<'_>, row: &mut Row) -> Result<()> {
    let pool = tokenwarden::store::pool(&RedisConfig {
        url: b.redis.url(),
        pool_size: 2,
        command_timeout_ms: 120_000,
        ping_interval_ms: 2_000,
        recovery_grace_ms: 0,
        ..tokenwarden::config::Config::load_from(None, &Default::default())?.redis
    })?;
    let record_keys: Vec<String> = (0..n).map(|i| main.id(i).record_key()).collect();
    let (mut lib, mut lib_seq, mut lib_disc, mut raw1, mut raw4, mut raw_hmget, mut parse) =
        (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..3 {
        let (t, _, _) = raw_pipelined(&b.conn, &record_keys, 1).await?;
        raw1.push(ms(t));
        let (t, rts, values) = raw_pipelined(&b.conn, &record_keys, 4).await?;
        raw4.push(ms(t));
        let (t, _, _) = raw_pipelined_with(&b.conn, &record_keys, 4, Some(RECORD_FIELDS)).await?;
        raw_hmget.push(ms(t));
        row.raw_round_trips = rts;
        let started = Instant::now();
        let states: Vec<RecordState> = values.into_iter().map(parse_record_value).collect();
        parse.push(ms(started.elapsed()));
        let valid = states
            .iter()
            .filter(|s| matches!(s, RecordState::Valid(_)))
            .count();
        if valid != n {
            bail!("only {valid} of {n} seeded records parse as valid");
        }
        let s = library_scan(&pool, b.opts.scan_batch).await?;
        if s.valid != n {
            bail!("library scan found {} valid records of {n}", s.valid);
        }
        lib.push(ms(s.total));
        row.lib_round_trips = s.round_trips;
        let s = library_scan_sequential(&pool, b.opts.scan_batch).await?;
        if s.valid != n {
            bail!(
                "sequential library scan found {} valid records of {n}",
                s.valid
            );
        }
        lib_seq.push(ms(s.total));
        lib_disc.push(ms(s.discover));
    }
    row.lib_min_ms = lib.iter().copied().fold(f64::INFINITY, f64::min);
    row.lib_ms = median(lib);
    row.lib_discover_ms = median(lib_disc);
    row.lib_seq_ms = median(lib_seq);
    row.raw1_ms = median(raw1);
    row.raw4_ms = median(raw4);
    row.raw_hmget_ms = median(raw_hmget);
    row.raw_ms = row.raw1_ms.min(row.raw4_ms);
    row.parse_ms = median(parse);
    let (t, rts, valid) = naive_scan(&mut b.conn).await?;
    if valid != n {
        bail!("naive scan found {valid} valid records of {n}");
    }
    row.naive_ms = ms(t);
    row.naive_round_trips = rts;
    let requests = n.max(100_000);
    row.rb_ms = redis_benchmark(b.redis.port(), &record_keys[0], requests, false)
        .map(|rps| n as f64 / rps * 1000.0);
    row.rb1_ms = redis_benchmark(b.redis.port(), &record_keys[0], requests, true)
        .map(|rps| n as f64 / rps * 1000.0);
    // Where the library scan's time goes on the server.
    let before = commandstats(&mut b.conn).await;
    let s = library_scan(&pool, b.opts.scan_batch).await?;
    let after = commandstats(&mut b.conn).await;
    row.lib_server = command_delta(&before, &after)
        .into_iter()
        .filter(|(c, _, _)| c != "info")
        .map(|(c, calls, usec)| (c, calls, usec as f64 / 1000.0))
        .collect();
    row.lib_check_ms = ms(s.total);
    if b.opts.perf_dir.is_some() {
        let perf = Perf::start(&b.opts, std::process::id(), &format!("scan-library-{n}"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        for _ in 0..3 {
            library_scan(&pool, b.opts.scan_batch).await?;
        }
        perf.stop().await;
    }
    drop(pool);
    eprintln!(
        "scan: library {:.0} ms ({} round trips), raw pipelined {:.0} ms, naive {:.0} ms",
        row.lib_ms, row.lib_round_trips, row.raw_ms, row.naive_ms
    );

    Ok(())
}
