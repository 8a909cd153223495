//! The results of a run and the printed report: a Markdown table with a column per fleet
//! size, then every target with `met` or `MISSED` (a missed target does not fail the run).

use chrono::Utc;
use tokenwarden::registry::TENANT_SLICE;

use crate::Options;

#[derive(Default)]
pub struct Row {
    pub n: usize,
    pub redis_keys: u64,
    pub lib_ms: f64,
    pub lib_min_ms: f64,
    /// `discover()` then `read_records()`, one after the other.
    pub lib_seq_ms: f64,
    pub lib_discover_ms: f64,
    pub lib_round_trips: u64,
    /// Commands of one more library scan, with their server time in ms; and that scan's time.
    pub lib_server: Vec<(String, u64, f64)>,
    pub lib_check_ms: f64,
    pub parse_ms: f64,
    pub naive_ms: f64,
    pub naive_round_trips: u64,
    /// The faster of `raw1_ms` (one pipeline at a time) and `raw4_ms` (four in flight).
    pub raw_ms: f64,
    pub raw1_ms: f64,
    pub raw4_ms: f64,
    /// Four in flight, `HMGET` of the fields the library reads (`RECORD_FIELDS`).
    pub raw_hmget_ms: f64,
    pub raw_round_trips: u64,
    /// The daemon's own `registry_scan_duration_seconds`: (count, mean) of full and light.
    pub daemon_full_scan: (f64, f64),
    pub daemon_light_scan: (f64, f64),
    pub rb_ms: Option<f64>,
    pub rb1_ms: Option<f64>,
    pub ready_s: f64,
    pub rss_ready_mb: f64,
    pub rss_steady_mb: f64,
    pub rss_hwm_mb: f64,
    pub rss_per_provider_b: f64,
    pub idle_cpu: f64,
    pub idle_redis_cpu: f64,
    pub idle_fake_cpu: f64,
    /// Daemon CPU seconds from start to ready (dominated by the first full read).
    pub first_scan_cpu_s: f64,
    pub probes_per_s: f64,
    pub idle_cpu_scan: f64,
    pub idle_redis_cpu_scan: f64,
    pub idle_redis_cmds: f64,
    pub ready_notify_s: f64,
    pub idle_cpu_notify: f64,
    pub idle_redis_cpu_notify: f64,
    pub rss_notify_mb: f64,
    pub scrape_on_ms: f64,
    pub scrape_on_bytes: usize,
    pub rss_after_scrape_mb: f64,
    pub scrape_off_ms: f64,
    pub scrape_off_bytes: usize,
    pub throughput: Vec<Throughput>,
    pub lateness: Option<Lateness>,
}

pub struct Throughput {
    pub concurrency: usize,
    pub ready_s: f64,
    pub steady_rps: f64,
    pub overall_rps: f64,
    pub drain_s: f64,
    pub failures: f64,
    pub max_in_flight: u64,
    pub reuse: u64,
    pub invalid_grant: u64,
    pub rotated: (usize, usize),
    pub rss_end_mb: f64,
    pub hwm_mb: f64,
    /// Redis commands per refresh after the first scan: (command, calls, server µs).
    pub per_refresh: Vec<(String, f64, f64)>,
    /// CPU in percent of one core while refreshing: daemon, redis-server, token endpoint,
    /// and processes that are not part of the benchmark.
    pub cpu: [f64; 4],
}

pub struct Spread {
    /// Latest minus earliest planned start, as the daemon planned them.
    pub planned_span_ms: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub drain_ms: f64,
    pub hist_p50: Option<f64>,
    pub hist_p99: Option<f64>,
}

pub struct Lateness {
    pub same_instant: Spread,
    pub one_second: Spread,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn fmt_bound(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "> 30 s".into(),
        Some(x) => format!("<= {:.0} ms", x * 1000.0),
        None => "-".into(),
    }
}

pub fn print_report(machine: &str, opts: &Options, baseline_mb: f64, rows: &[Row]) {
    let mut lines: Vec<(String, Vec<String>)> = Vec::new();
    let mut add = |label: &str, f: &dyn Fn(&Row) -> String| {
        lines.push((label.to_string(), rows.iter().map(f).collect()));
    };
    add(
        "Redis keys (records, provider sets, tenant configs, health hashes)",
        &|r| r.redis_keys.to_string(),
    );
    let label = format!(
        "**Registry scan + parse, library**, as the daemon's full read (SCAN on its own connection, overlapped with pipelined SMEMBERS + record reads per {TENANT_SLICE} tenants; batch {}), median of 3",
        opts.scan_batch
    );
    add(&label, &|r| format!("{:.0} ms", r.lib_ms));
    add(
        "  sequential instead: `discover()` then `read_records()`; of which discovery",
        &|r| format!("{:.0} ms; {:.0} ms", r.lib_seq_ms, r.lib_discover_ms),
    );
    add(
        "  parse alone (`parse_record_value` of the raw HGETALL answers)",
        &|r| format!("{:.0} ms", r.parse_ms),
    );
    add("  Redis round trips", &|r| r.lib_round_trips.to_string());
    add(
        "  server time of one more scan (INFO commandstats): command calls / ms, of the scan's total",
        &|r| {
            let parts: Vec<String> = r
                .lib_server
                .iter()
                .map(|(c, calls, ms)| format!("{c} {calls} / {ms:.0} ms"))
                .collect();
            format!("{}; of {:.0} ms", parts.join(", "), r.lib_check_ms)
        },
    );
    add("Naive scan (KEYS + one HGETALL per record, parsed)", &|r| {
        format!("{:.0} ms, {} round trips", r.naive_ms, r.naive_round_trips)
    });
    add(
        "Physical limit: raw pipelined HGETALL of every record, batch 1000, not parsed (1 / 4 pipelines in flight)",
        &|r| {
            format!(
                "{:.0} / {:.0} ms, {} round trips",
                r.raw1_ms, r.raw4_ms, r.raw_round_trips
            )
        },
    );
    add(
        "  the same data as the library reads: HMGET of `registry::RECORD_FIELDS` (no access_token), 4 in flight",
        &|r| format!("{:.0} ms", r.raw_hmget_ms),
    );
    add(
        "redis-benchmark -P 16 HGETALL, N requests (50 clients / 1 client)",
        &|r| match (r.rb_ms, r.rb1_ms) {
            (Some(a), Some(c)) => format!("{a:.0} ms / {c:.0} ms"),
            _ => "not available".into(),
        },
    );
    add(
        "Ratio library / raw read of the same fields (HMGET); library / raw HGETALL",
        &|r| {
            format!(
                "{:.2}x; {:.2}x",
                r.lib_ms / r.raw_hmget_ms,
                r.lib_ms / r.raw_ms
            )
        },
    );
    add("Ratio naive / library", &|r| {
        format!("{:.1}x", r.naive_ms / r.lib_ms)
    });
    add("**Start to /readyz 200**", &|r| {
        format!("{:.2} s", r.ready_s)
    });
    add(
        "  daemon's own registry scans, from its histogram: full (first) / light change scan (mean of n, change-scan-only daemon)",
        &|r| {
            let light = if r.daemon_light_scan.0 > 0.0 {
                format!(
                    "{:.0} ms (n = {:.0})",
                    r.daemon_light_scan.1 * 1000.0,
                    r.daemon_light_scan.0
                )
            } else {
                "-".into()
            };
            format!("{:.0} ms / {light}", r.daemon_full_scan.1 * 1000.0)
        },
    );
    add(
        "**Resident memory** after ready + idle window (at ready; peak)",
        &|r| {
            format!(
                "{:.1} MB ({:.1}; peak {:.1})",
                r.rss_steady_mb, r.rss_ready_mb, r.rss_hwm_mb
            )
        },
    );
    add(
        "  per tracked provider (over the empty-registry daemon)",
        &|r| format!("{:.0} B", r.rss_per_provider_b),
    );
    add("  after a /metrics scrape with per-provider series", &|r| {
        format!("{:.1} MB", r.rss_after_scrape_mb)
    });
    add(
        "**Idle CPU**, default configuration (health probes on, change events by client tracking): daemon / redis-server / endpoint",
        &|r| {
            format!(
                "{:.2} % / {:.2} % / {:.2} %",
                r.idle_cpu, r.idle_redis_cpu, r.idle_fake_cpu
            )
        },
    );
    add("  health probes per second in that window", &|r| {
        format!("{:.0}", r.probes_per_s)
    });
    add(
        "  plus each full rescan (every 300 s): daemon CPU of start + first full read; that averaged over 300 s",
        &|r| {
            format!(
                "{:.2} s; {:.2} %",
                r.first_scan_cpu_s,
                r.first_scan_cpu_s / 300.0 * 100.0
            )
        },
    );
    add(
        "Idle CPU, probes off, change scan alone (client_tracking off, no notifications): daemon / redis-server; Redis commands/s",
        &|r| {
            format!(
                "{:.2} % / {:.2} %; {:.0}",
                r.idle_cpu_scan, r.idle_redis_cpu_scan, r.idle_redis_cmds
            )
        },
    );
    add(
        "Idle CPU, probes off, keyspace notifications: daemon / redis-server",
        &|r| {
            format!(
                "{:.2} % / {:.2} %",
                r.idle_cpu_notify, r.idle_redis_cpu_notify
            )
        },
    );
    for (k, c) in [(0usize, 64usize), (1, 256)] {
        let label = format!(
            "**Refresh throughput**, max_concurrent {c}{}: steady (10-90 %) / first to last",
            if c == 64 { " (default)" } else { "" }
        );
        add(&label, &|r| match r.throughput.get(k) {
            Some(t) => format!("{:.0}/s / {:.0}/s", t.steady_rps, t.overall_rps),
            None => "-".into(),
        });
        add(
            "  CPU while refreshing, % of one core: daemon / redis-server / token endpoint (foreign)",
            &|r| match r.throughput.get(k) {
                Some(t) => format!(
                    "{:.0} / {:.0} / {:.0} ({:.0})",
                    t.cpu[0], t.cpu[1], t.cpu[2], t.cpu[3]
                ),
                None => "-".into(),
            },
        );
        add(
            "  token calls in flight at the endpoint (max); failures; reuse",
            &|r| match r.throughput.get(k) {
                Some(t) => format!(
                    "{}; {:.0}; {}",
                    t.max_in_flight,
                    t.failures,
                    t.reuse + t.invalid_grant
                ),
                None => "-".into(),
            },
        );
    }
    add(
        "  Redis commands per refresh at 64 after the first scan (server µs per refresh); registry reads (SCAN, SMEMBERS, HMGET) apart",
        &|r| match r.throughput.first() {
            Some(t) => {
                let scan = ["scan", "smembers", "hmget"];
                let own: Vec<String> = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| !scan.contains(&c.as_str()))
                    .filter(|(_, calls, _)| *calls >= 0.05)
                    .map(|(c, calls, _)| format!("{c} {calls:.1}"))
                    .collect();
                let usec: f64 = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| !scan.contains(&c.as_str()))
                    .map(|(_, _, u)| u)
                    .sum();
                let scans: Vec<String> = t
                    .per_refresh
                    .iter()
                    .filter(|(c, _, _)| scan.contains(&c.as_str()))
                    .filter(|(_, calls, _)| *calls >= 0.05)
                    .map(|(c, calls, _)| format!("{c} {calls:.1}"))
                    .collect();
                let scans = if scans.is_empty() {
                    "none".to_string()
                } else {
                    scans.join(", ")
                };
                format!("{} ({usec:.0} µs); registry reads {scans}", own.join(", "))
            }
            None => "-".into(),
        },
    );
    add(
        "  start to /readyz 200 with N tokens due (64 / 256)",
        &|r| {
            r.throughput
                .iter()
                .map(|t| format!("{:.2} s", t.ready_s))
                .collect::<Vec<_>>()
                .join(" / ")
        },
    );
    add(
        "  daemon RSS after refreshing all N at 64 (peak)",
        &|r| match r.throughput.first() {
            Some(t) => format!("{:.1} MB ({:.1})", t.rss_end_mb, t.hwm_mb),
            None => "-".into(),
        },
    );
    add(
        "**Lateness**, 1,000 due within one second: p50 / p99 / max",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} / {:.0} / {:.0} ms",
                l.one_second.p50, l.one_second.p99, l.one_second.max
            ),
            None => "-".into(),
        },
    );
    add(
        "  planned starts span; daemon histogram p50 / p99 bucket",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} ms; {} / {}",
                l.one_second.planned_span_ms,
                fmt_bound(l.one_second.hist_p50),
                fmt_bound(l.one_second.hist_p99)
            ),
            None => "-".into(),
        },
    );
    add(
        "Lateness, 1,000 due at the same instant: p50 / p99 / max",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} / {:.0} / {:.0} ms",
                l.same_instant.p50, l.same_instant.p99, l.same_instant.max
            ),
            None => "-".into(),
        },
    );
    add(
        "  planned starts span; first to last actual start; histogram p50 / p99 bucket",
        &|r| match &r.lateness {
            Some(l) => format!(
                "{:.0} ms; {:.0} ms; {} / {}",
                l.same_instant.planned_span_ms,
                l.same_instant.drain_ms,
                fmt_bound(l.same_instant.hist_p50),
                fmt_bound(l.same_instant.hist_p99)
            ),
            None => "-".into(),
        },
    );
    add("**/metrics scrape**, per-provider series on", &|r| {
        format!(
            "{:.0} ms, {:.2} MB",
            r.scrape_on_ms,
            r.scrape_on_bytes as f64 / 1024.0 / 1024.0
        )
    });
    add("/metrics scrape, per-provider series off", &|r| {
        format!(
            "{:.1} ms, {:.1} KB",
            r.scrape_off_ms,
            r.scrape_off_bytes as f64 / 1024.0
        )
    });

    println!("\n## tokenwarden fleet benchmark\n");
    println!(
        "- command: `FLEET_SIZES={} cargo bench --bench fleet`",
        opts.sizes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!("- machine: {machine}");
    println!(
        "- load average at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("- date: {}", Utc::now().format("%Y-%m-%d %H:%M UTC"));
    println!(
        "- empty-registry daemon RSS: {baseline_mb:.1} MB; idle window {} s\n",
        opts.idle_secs
    );
    let header: Vec<String> = rows.iter().map(|r| format!("N = {}", r.n)).collect();
    println!("| | {} |", header.join(" | "));
    println!("|---|{}", "---:|".repeat(rows.len()));
    for (label, values) in &lines {
        println!("| {label} | {} |", values.join(" | "));
    }

    println!("\n### Targets\n");
    let largest = rows.iter().max_by_key(|r| r.n);
    let at_100k = rows.iter().find(|r| r.n == 100_000);
    let target = |name: &str, result: Option<(bool, String)>| match result {
        Some((ok, detail)) => println!("- {}: {name} ({detail})", verdict(ok)),
        None => println!("- not measured: {name} (N = 100000 not in FLEET_SIZES)"),
    };
    target(
        "scan and parse 100k providers in under 2 s",
        at_100k.map(|r| (r.lib_ms < 2000.0, format!("{:.0} ms", r.lib_ms))),
    );
    target(
        "scan within 2x of the raw pipelined read of the same fields at 100k",
        at_100k.map(|r| {
            let ratio = r.lib_ms / r.raw_hmget_ms;
            (
                ratio <= 2.0,
                format!(
                    "{ratio:.2}x of {:.0} ms; {:.2}x of a raw HGETALL read",
                    r.raw_hmget_ms,
                    r.lib_ms / r.raw_ms
                ),
            )
        }),
    );
    target(
        "under 200 MB resident at 100k",
        at_100k.map(|r| {
            let after_refresh = r.throughput.first().map_or(0.0, |t| t.rss_end_mb);
            let peak = r
                .throughput
                .iter()
                .map(|t| t.hwm_mb)
                .fold(r.rss_hwm_mb, f64::max);
            (
                r.rss_steady_mb.max(after_refresh) < 200.0,
                format!(
                    "idle {:.1} MB, after refreshing all {:.1} MB, peak {:.1} MB",
                    r.rss_steady_mb, after_refresh, peak
                ),
            )
        }),
    );
    for r in rows {
        target(
            &format!(
                "idle CPU under 1 % at N = {} (default configuration: idle window plus full rescans averaged over 300 s)",
                r.n
            ),
            Some({
                let avg = r.idle_cpu + r.first_scan_cpu_s / 300.0 * 100.0;
                (
                    avg < 1.0,
                    format!(
                        "{avg:.2} % = {:.2} % + {:.2} %",
                        r.idle_cpu,
                        r.first_scan_cpu_s / 300.0 * 100.0
                    ),
                )
            }),
        );
        target(
            &format!(
                "idle CPU under 1 % at N = {} (probes off: change scan alone)",
                r.n
            ),
            Some((r.idle_cpu_scan < 1.0, format!("{:.2} %", r.idle_cpu_scan))),
        );
    }
    if let Some(r) = largest {
        target(
            &format!(
                "at least 2,000 refreshes/s at max_concurrent 64 (N = {})",
                r.n
            ),
            r.throughput
                .first()
                .map(|t| (t.steady_rps >= 2000.0, format!("{:.0}/s", t.steady_rps))),
        );
    }
    for r in rows {
        if let Some(l) = &r.lateness {
            target(
                &format!(
                    "p99 lateness under 250 ms, 1,000 due within one second (N = {})",
                    r.n
                ),
                Some((
                    l.one_second.p99 < 250.0,
                    format!("{:.0} ms", l.one_second.p99),
                )),
            );
            target(
                &format!(
                    "p99 lateness under 250 ms, 1,000 due at the same instant (N = {})",
                    r.n
                ),
                Some((
                    l.same_instant.p99 < 250.0,
                    format!("{:.0} ms", l.same_instant.p99),
                )),
            );
        }
    }
    for r in rows {
        for t in &r.throughput {
            if t.reuse + t.invalid_grant > 0 || t.failures > 0.0 {
                println!(
                    "- WARNING: N = {} max_concurrent {}: {} failures, {} refresh-token reuses, {} invalid_grant",
                    r.n, t.concurrency, t.failures, t.reuse, t.invalid_grant
                );
            }
            if t.rotated.0 != t.rotated.1 {
                println!(
                    "- WARNING: N = {} max_concurrent {}: only {} of {} sampled records rotated",
                    r.n, t.concurrency, t.rotated.0, t.rotated.1
                );
            }
        }
    }
}
