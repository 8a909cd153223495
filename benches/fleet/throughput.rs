//! Refresh throughput: N expired tokens refreshed end to end (lock, token call,
//! compare-and-set write-back), counted by the daemon's own
//! `token_refresh_total{result="success"}`, with the CPU of every process while it goes on,
//! the Redis commands per refresh and a check that a sample of records rotated.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::perf::Perf;
use crate::ready::spawn_daemon;
use crate::records::{seed, Group, Seeding};
use crate::report::Throughput;
use crate::support::metrics::{label, samples};
use crate::support::process::{cpu_ticks, machine_busy_ticks};
use crate::support::redis::{command_delta, commandstats, CommandStats};
use crate::support::FakeProvider;
use crate::{stat, Bench, FAKE_TTL_SECS};

/// An expiry long past: due at once.
const EXPIRED: &str = "2025-01-15T11:30:00.123456";
/// A refresh run with no progress for this long is broken.
const STALL: Duration = Duration::from_secs(30);

/// `token_refresh_total` summed by `result`.
fn refresh_results(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for (labels, v) in samples(text, "tokenwarden_token_refresh_total") {
        let r = label(labels, "result").unwrap_or("?").to_string();
        *out.entry(r).or_insert(0.0) += v;
    }
    out
}

/// N expired tokens, refreshed at `concurrency`; counted by the daemon's success counter.
pub async fn throughput(
    b: &mut Bench,
    n: usize,
    concurrency: usize,
    gen: u32,
) -> Result<Throughput> {
    throughput_with_delay(b, n, concurrency, gen, 0).await
}

/// As [`throughput`], with every token answer delayed by `delay_ms` at the endpoint.
pub async fn throughput_with_delay(
    b: &mut Bench,
    n: usize,
    concurrency: usize,
    gen: u32,
    delay_ms: u64,
) -> Result<Throughput> {
    b.flush().await?;
    let fake = FakeProvider::start(FAKE_TTL_SECS);
    if delay_ms > 0 {
        fake.mode(json!({ "delay_ms": delay_ms })).await;
    }
    let main = Group { prefix: "t", n };
    let expired = |_: usize| EXPIRED.to_string();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen,
            endpoint: &fake.url(),
            expiry: &expired,
            health: false,
        },
    )
    .await?;
    fake.seed_many(&main.fake_clients(gen, false)).await;
    let d = spawn_daemon(
        b,
        &format!("refresh-{n}-{concurrency}-{delay_ms}"),
        &[
            (
                "TOKENWARDEN_REFRESH_MAX_CONCURRENT",
                concurrency.to_string(),
            ),
            ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0".into()),
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
            ("TOKENWARDEN_METRICS_PER_PROVIDER_SERIES", "false".into()),
        ],
    )?;
    let mut ready: Option<f64> = None;
    // Redis commands and refreshes done when the first scan was over.
    let mut at_ready: Option<(CommandStats, u64)> = None;
    let mut series: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    let mut last_progress = Instant::now();
    let mut results = HashMap::new();
    let perf = Perf::start(
        &b.opts,
        d.pid(),
        &format!("refresh-daemon-{n}-{concurrency}"),
    );
    let pids = [d.pid(), b.redis_pid, fake.pid(), std::process::id()];
    // Daemon, redis-server, endpoint, this process, the whole machine.
    let ticks = |pids: &[u32; 4]| -> [u64; 5] {
        [
            cpu_ticks(pids[0]),
            cpu_ticks(pids[1]),
            cpu_ticks(pids[2]),
            cpu_ticks(pids[3]),
            machine_busy_ticks(),
        ]
    };
    let mut window_start: Option<(Instant, [u64; 5])> = None;
    let done_at: f64;
    loop {
        d.assert_running();
        let now = d.started_at().elapsed().as_secs_f64();
        if ready.is_none() && d.get("/readyz").await.0 == 200 {
            ready = Some(now);
            at_ready = Some((
                commandstats(&mut b.conn).await,
                stat(&fake.stats_summary().await, "refresh_ok"),
            ));
        }
        // Progress is read from the endpoint's counter (O(1)); the daemon's /metrics walks
        // the whole fleet under its lock, so it is only read once the endpoint is done.
        let fake_ok = stat(&fake.stats_summary().await, "refresh_ok") as f64;
        if fake_ok > series.last().map_or(0.0, |s| s.1) {
            last_progress = Instant::now();
            if window_start.is_none() {
                window_start = Some((Instant::now(), ticks(&pids)));
            }
        }
        series.push((d.started_at().elapsed().as_secs_f64(), fake_ok));
        if fake_ok >= n as f64 {
            let text = d.metrics().await;
            results = refresh_results(&text);
            let ok = results.get("success").copied().unwrap_or(0.0);
            if ok >= n as f64 {
                done_at = d.started_at().elapsed().as_secs_f64();
                break;
            }
        }
        if last_progress.elapsed() > STALL {
            bail!(
                "refreshes stalled at {:?} (endpoint {:?}) of {n} for {STALL:?}; log tail:\n{}",
                results,
                series.last(),
                d.logs_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cpu = match window_start {
        Some((since, before)) => {
            let after = ticks(&pids);
            let wall = since.elapsed().as_secs_f64().max(1e-3);
            let pct = |i: usize| {
                after[i].saturating_sub(before[i]) as f64 / b.clk_tck as f64 / wall * 100.0
            };
            let ours = pct(0) + pct(1) + pct(2) + pct(3);
            [pct(0), pct(1), pct(2), (pct(4) - ours).max(0.0)]
        }
        None => [f64::NAN; 4],
    };
    perf.stop().await;
    // Time at which the endpoint's count first reached `k`, interpolated between samples.
    let at = |k: f64| -> f64 {
        for w in series.windows(2) {
            let ((t0, c0), (t1, c1)) = (w[0], w[1]);
            if c1 >= k && c1 > c0 {
                return t0 + (t1 - t0) * ((k - c0).max(0.0) / (c1 - c0));
            }
        }
        series.last().map_or(0.0, |s| s.0)
    };
    let nf = n as f64;
    let (t10, t90) = (at(0.1 * nf), at(0.9 * nf));
    let first = at(1.0);
    // Done: every write-back counted by the daemon.
    let done = done_at.max(at(nf));
    let steady_rps = 0.8 * nf / (t90 - t10).max(1e-6);
    let overall_rps = (nf - 1.0) / (done - first).max(1e-6);
    let failures: f64 = results
        .iter()
        .filter(|(r, _)| r.as_str() != "success")
        .map(|(_, v)| v)
        .sum::<f64>()
        + 0.0;
    let stats = fake.stats_summary().await;
    // Redis commands per refresh after the first scan (change scans shown apart).
    let mut per_refresh = Vec::new();
    if let Some((before, ok_before)) = &at_ready {
        let after = commandstats(&mut b.conn).await;
        let refreshed = stat(&stats, "refresh_ok").saturating_sub(*ok_before).max(1) as f64;
        for (name, calls, usec) in command_delta(before, &after) {
            if name == "info" {
                continue;
            }
            per_refresh.push((name, calls as f64 / refreshed, usec as f64 / refreshed));
        }
    }
    // A sample of records must hold rotated refresh tokens.
    let mut pipe = redis::pipe();
    let sample: Vec<usize> = (0..n).step_by((n / 200).max(1)).collect();
    for &i in &sample {
        pipe.cmd("HGET")
            .arg(main.id(i).record_key())
            .arg("refresh_token");
    }
    let tokens: Vec<Option<String>> = pipe.query_async(&mut b.conn).await?;
    let rotated = sample
        .iter()
        .zip(&tokens)
        .filter(|(i, t)| {
            t.as_deref()
                .is_some_and(|t| t != main.refresh_token(gen, **i))
        })
        .count();
    let t = Throughput {
        concurrency,
        ready_s: ready.unwrap_or(f64::NAN),
        steady_rps,
        overall_rps,
        drain_s: done - first,
        failures,
        max_in_flight: stat(&stats, "max_in_flight"),
        reuse: stat(&stats, "reuse"),
        invalid_grant: stat(&stats, "invalid_grant"),
        rotated: (rotated, sample.len()),
        rss_end_mb: d.rss_mb(),
        hwm_mb: d.hwm_mb(),
        cpu,
        per_refresh,
    };
    d.terminate(Duration::from_secs(30)).await;
    drop(fake);
    eprintln!(
        "refresh c={concurrency}: steady {:.0}/s, overall {:.0}/s, {:.2} s for {n}; endpoint max in flight {}, failures {}, reuse {}, rotated {}/{}; CPU daemon {:.0} % redis {:.0} % endpoint {:.0} % foreign {:.0} %",
        t.steady_rps, t.overall_rps, t.drain_s, t.max_in_flight, t.failures, t.reuse, t.rotated.0, t.rotated.1,
        t.cpu[0], t.cpu[1], t.cpu[2], t.cpu[3]
    );
    Ok(t)
}
