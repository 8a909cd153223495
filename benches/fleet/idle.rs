//! Idle cost, every token far in the future: CPU of the daemon, redis-server and the token
//! endpoint over `FLEET_IDLE_SECS`, in three configurations (the default one, with health
//! probes and client tracking; probes off with the change scan alone; probes off with keyspace
//! notifications). The default run also gives start to ready, memory and the scrape with
//! per-provider series; the notifications run the scrape without them.

use std::time::{Duration, Instant};

use anyhow::Result;

use crate::memory::per_provider_bytes;
use crate::perf::Perf;
use crate::ready::{spawn_daemon, time_to_ready};
use crate::report::Row;
use crate::scrape::{scan_stats, scrape};
use crate::support::process::cpu_ticks;
use crate::support::redis::{config_set, total_commands};
use crate::support::FakeProvider;
use crate::{stat, Bench};

const STOP_GRACE: Duration = Duration::from_secs(30);

/// CPU use in percent of one core over `secs`, for each pid; and Redis commands per second.
pub async fn cpu_over(b: &mut Bench, pids: &[u32], secs: u64) -> (Vec<f64>, f64) {
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let cmds_before = total_commands(&mut b.conn).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    let cmds_after = total_commands(&mut b.conn).await;
    let wall = started.elapsed().as_secs_f64();
    let pct = before
        .iter()
        .zip(&after)
        .map(|(b0, a)| a.saturating_sub(*b0) as f64 / b.clk_tck as f64 / wall * 100.0)
        .collect();
    (
        pct,
        cmds_after.saturating_sub(cmds_before + 1) as f64 / wall,
    )
}

/// The default configuration: start to ready (and the CPU of that first full read), memory,
/// idle CPU with health probes against `fake`, the scrape with per-provider series.
pub async fn default_config(
    b: &mut Bench,
    n: usize,
    fake: &FakeProvider,
    baseline_mb: f64,
    row: &mut Row,
) -> Result<()> {
    let d1 = spawn_daemon(b, &format!("idle-{n}"), &[])?;
    let perf = Perf::start(&b.opts, d1.pid(), &format!("first-scan-daemon-{n}"));
    row.ready_s = time_to_ready(&d1).await;
    // CPU of start-up and the first full read: what each periodic full rescan costs again.
    row.first_scan_cpu_s = cpu_ticks(d1.pid()) as f64 / b.clk_tck as f64;
    perf.stop().await;
    row.rss_ready_mb = d1.rss_mb();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let perf = Perf::start(&b.opts, d1.pid(), &format!("idle-daemon-{n}"));
    let probes_before = stat(&fake.stats_summary().await, "api_ok");
    let pids = [d1.pid(), b.redis_pid, fake.pid()];
    let (cpu, _) = cpu_over(b, &pids, b.opts.idle_secs).await;
    let probes = stat(&fake.stats_summary().await, "api_ok").saturating_sub(probes_before);
    perf.stop().await;
    d1.assert_running();
    row.idle_cpu = cpu[0];
    row.idle_redis_cpu = cpu[1];
    row.idle_fake_cpu = cpu[2];
    row.probes_per_s = probes as f64 / b.opts.idle_secs as f64;
    row.rss_steady_mb = d1.rss_mb();
    row.rss_per_provider_b = per_provider_bytes(row.rss_steady_mb, baseline_mb, n);
    let (t, size, text) = scrape(&d1).await;
    (row.scrape_on_ms, row.scrape_on_bytes) = (t, size);
    row.daemon_full_scan = scan_stats(&text, "full");

    row.rss_after_scrape_mb = d1.rss_mb();
    row.rss_hwm_mb = d1.hwm_mb();
    d1.terminate(STOP_GRACE).await;
    eprintln!(
        "daemon: ready in {:.2} s, RSS {:.1} MB, idle CPU {:.2} % (redis {:.2} %), /metrics {:.0} ms {} bytes",
        row.ready_s, row.rss_steady_mb, row.idle_cpu, row.idle_redis_cpu, row.scrape_on_ms, row.scrape_on_bytes
    );
    Ok(())
}

/// Health probes off, no change events: the change scan alone, with the Redis commands it
/// costs and the daemon's light scan histogram.
pub async fn change_scan_alone(b: &mut Bench, n: usize, row: &mut Row) -> Result<()> {
    let d2 = spawn_daemon(
        b,
        &format!("no-probes-{n}"),
        &[
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
            ("TOKENWARDEN_REGISTRY_CLIENT_TRACKING", "off".into()),
        ],
    )?;
    time_to_ready(&d2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = [d2.pid(), b.redis_pid];
    let (cpu, cmds) = cpu_over(b, &pids, b.opts.idle_secs).await;
    row.daemon_light_scan = scan_stats(&d2.metrics().await, "light");
    d2.assert_running();
    row.idle_cpu_scan = cpu[0];
    row.idle_redis_cpu_scan = cpu[1];
    row.idle_redis_cmds = cmds;
    d2.terminate(STOP_GRACE).await;
    eprintln!(
        "change scan alone: idle CPU {:.2} % (redis {:.2} %, {:.0} commands/s)",
        row.idle_cpu_scan, row.idle_redis_cpu_scan, row.idle_redis_cmds
    );
    Ok(())
}

/// Keyspace notifications on, probes off, per-provider series off (also the scrape without
/// per-provider series).
pub async fn notifications(b: &mut Bench, n: usize, row: &mut Row) -> Result<()> {
    config_set(&mut b.conn, "notify-keyspace-events", "KEA").await;
    let d3 = spawn_daemon(
        b,
        &format!("notify-{n}"),
        &[
            ("TOKENWARDEN_METRICS_PER_PROVIDER_SERIES", "false".into()),
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
        ],
    )?;
    row.ready_notify_s = time_to_ready(&d3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids = [d3.pid(), b.redis_pid];
    let (cpu, _) = cpu_over(b, &pids, b.opts.idle_secs).await;
    d3.assert_running();
    row.idle_cpu_notify = cpu[0];
    row.idle_redis_cpu_notify = cpu[1];
    row.rss_notify_mb = d3.rss_mb();
    let (t, size, _) = scrape(&d3).await;
    (row.scrape_off_ms, row.scrape_off_bytes) = (t, size);
    d3.terminate(STOP_GRACE).await;
    config_set(&mut b.conn, "notify-keyspace-events", "").await;
    eprintln!(
        "notifications: idle CPU {:.2} % (redis {:.2} %); series off: /metrics {:.1} ms {} bytes",
        row.idle_cpu_notify, row.idle_redis_cpu_notify, row.scrape_off_ms, row.scrape_off_bytes
    );
    Ok(())
}
