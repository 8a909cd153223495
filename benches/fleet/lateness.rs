//! Scheduling lateness: `FLEET_BURST` tokens due at the same instant, then as many due
//! within one second, with N other tokens tracked. The actual start of each refresh is the
//! moment its lock key is set (a `__keyevent@0__:set` notification), the planned start is
//! the `next_refresh_at` the daemon wrote into the health hash; the daemon's own lateness
//! histogram is read alongside.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::StreamExt;

use crate::ready::{spawn_daemon, time_to_ready};
use crate::records::{py_iso, seed, Group, Seeding};
use crate::report::{Lateness, Spread};
use crate::support::metrics::{bucket_quantile, buckets};
use crate::support::redis::config_set;
use crate::support::FakeProvider;
use crate::{quantile, Bench, FAKE_TTL_SECS};

/// `schedule.lead_secs` of the lateness runs (see [`lateness`]).
const LATE_LEAD_SECS: u64 = 20;
const LATENESS_HISTOGRAM: &str = "tokenwarden_schedule_lateness_seconds";

pub async fn lateness(b: &mut Bench, n: usize) -> Result<Lateness> {
    b.flush().await?;
    let fake = FakeProvider::start(FAKE_TTL_SECS);
    let main = Group { prefix: "t", n };
    let burst = b.opts.burst;
    let same = Group {
        prefix: "burst-a",
        n: burst,
    };
    let spread = Group {
        prefix: "burst-b",
        n: burst,
    };
    let far = py_iso(Utc::now() + TimeDelta::hours(20));
    let far_fn = move |_: usize| far.clone();
    seed(
        &mut b.conn,
        &Seeding {
            group: &main,
            gen: 0,
            endpoint: &fake.url(),
            expiry: &far_fn,
            health: false,
        },
    )
    .await?;
    // The policy refreshes a token of remaining life L (first seen at s) at
    // s + max(L/2, min(2L/3, L - lead)); for 2 lead < L < 3 lead that is expiry - lead,
    // whenever the daemon first sees the record. With lead = LATE_LEAD_SECS and expiries
    // 50-55 s ahead, every first sight within the next 10 s gives planned = expiry - lead:
    // the first group all at one instant, the second spread evenly over one second.
    let t0 = Utc::now();
    let secs = |s: f64| TimeDelta::milliseconds((s * 1000.0) as i64);
    let t_same = py_iso(t0 + secs(50.0));
    let same_fn = move |_: usize| t_same.clone();
    let t_spread = t0 + secs(54.0);
    let step_ms = 1000.0 / burst as f64;
    let spread_fn = move |i: usize| py_iso(t_spread + secs(i as f64 * step_ms / 1000.0));
    for (g, f) in [
        (&same, &same_fn as &dyn Fn(usize) -> String),
        (&spread, &spread_fn as &dyn Fn(usize) -> String),
    ] {
        seed(
            &mut b.conn,
            &Seeding {
                group: g,
                gen: 0,
                endpoint: &fake.url(),
                expiry: f,
                health: false,
            },
        )
        .await?;
        fake.seed_many(&g.fake_clients(0, false)).await;
    }

    // Lock keys being set: the actual start of each refresh.
    config_set(&mut b.conn, "notify-keyspace-events", "E$").await;
    let mut pubsub = b.redis.client().get_async_pubsub().await?;
    pubsub.subscribe("__keyevent@0__:set").await?;
    let mut stream = pubsub.into_on_message();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(DateTime<Utc>, String)>();
    let listener = tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let at = Utc::now();
            if let Ok(key) = msg.get_payload::<String>() {
                if key.starts_with("tenant:burst-") && tx.send((at, key)).is_err() {
                    return;
                }
            }
        }
    });

    let d = spawn_daemon(
        b,
        &format!("lateness-{n}"),
        &[
            ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0".into()),
            ("TOKENWARDEN_SCHEDULE_LEAD_SECS", LATE_LEAD_SECS.to_string()),
            ("TOKENWARDEN_HEALTH_ENABLED", "false".into()),
        ],
    )?;
    time_to_ready(&d).await;
    // Planned starts, as the daemon wrote them (health is written by its own task, shortly
    // after the records are applied: wait for it, bounded).
    let mut planned: HashMap<String, DateTime<Utc>> = HashMap::new();
    let health_deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    'groups: for g in [&same, &spread] {
        loop {
            let mut pipe = redis::pipe();
            for i in 0..burst {
                pipe.cmd("HGET")
                    .arg(g.id(i).health_key())
                    .arg("next_refresh_at");
            }
            let values: Vec<Option<String>> = pipe.query_async(&mut b.conn).await?;
            let missing = values.iter().position(Option::is_none);
            if let Some(i) = missing {
                if std::time::Instant::now() >= health_deadline {
                    return Err(anyhow!("no next_refresh_at for {}", g.id(i)));
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
            for (i, v) in values.into_iter().enumerate() {
                let v = v.unwrap_or_default();
                let at = DateTime::parse_from_rfc3339(&v)
                    .map_err(|e| anyhow!("next_refresh_at {v:?}: {e}"))?
                    .with_timezone(&Utc);
                planned.insert(g.id(i).lock_key(), at);
            }
            continue 'groups;
        }
    }
    let first_due = planned.values().min().copied().unwrap_or(t0);
    if first_due < Utc::now() {
        eprintln!("warning: the first burst fell due before the daemon was ready");
    }
    let last_due = planned.values().max().copied().unwrap_or(t0);
    let deadline = last_due + TimeDelta::seconds(60);
    let h0 = buckets(&d.metrics().await, LATENESS_HISTOGRAM);
    let mut seen: HashMap<String, DateTime<Utc>> = HashMap::new();
    let count = |seen: &HashMap<String, DateTime<Utc>>, prefix: &str| {
        seen.keys()
            .filter(|k| k.starts_with(&format!("tenant:{prefix}")))
            .count()
    };
    let mut h_same = None;
    loop {
        while let Ok((at, key)) = rx.try_recv() {
            seen.entry(key).or_insert(at);
        }
        if h_same.is_none() && count(&seen, "burst-a") >= burst {
            h_same = Some(buckets(&d.metrics().await, LATENESS_HISTOGRAM));
        }
        if h_same.is_some() && count(&seen, "burst-b") >= burst {
            break;
        }
        d.assert_running();
        if Utc::now() > deadline {
            bail!(
                "only {} of {} burst refreshes started by 60 s after the last was due; log tail:\n{}",
                seen.len(),
                2 * burst,
                d.logs_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the last refreshes finish before reading the histogram.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h_end = buckets(&d.metrics().await, LATENESS_HISTOGRAM);
    let h_same = h_same.unwrap_or_default();
    d.terminate(Duration::from_secs(30)).await;
    listener.abort();
    config_set(&mut b.conn, "notify-keyspace-events", "").await;
    drop(fake);

    let spread_of = |prefix: &str, before: &[(f64, f64)], after: &[(f64, f64)]| -> Spread {
        let mut late: Vec<f64> = Vec::new();
        let mut starts: Vec<DateTime<Utc>> = Vec::new();
        let plans: Vec<DateTime<Utc>> = planned
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("tenant:{prefix}")))
            .map(|(_, p)| *p)
            .collect();
        let planned_span_ms = match (plans.iter().min(), plans.iter().max()) {
            (Some(a), Some(z)) => (*z - *a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            _ => f64::NAN,
        };
        for (key, at) in &seen {
            if !key.starts_with(&format!("tenant:{prefix}")) {
                continue;
            }
            if let Some(p) = planned.get(key) {
                late.push((*at - *p).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                starts.push(*at);
            }
        }
        late.sort_by(f64::total_cmp);
        starts.sort();
        let drain_ms = match (starts.first(), starts.last()) {
            (Some(a), Some(z)) => (*z - *a).num_milliseconds() as f64,
            _ => f64::NAN,
        };
        Spread {
            planned_span_ms,
            p50: quantile(&late, 0.5),
            p99: quantile(&late, 0.99),
            max: late.last().copied().unwrap_or(f64::NAN),
            drain_ms,
            hist_p50: bucket_quantile(before, after, 0.5),
            hist_p99: bucket_quantile(before, after, 0.99),
        }
    };
    let l = Lateness {
        same_instant: spread_of("burst-a", &h0, &h_same),
        one_second: spread_of("burst-b", &h_same, &h_end),
    };
    eprintln!(
        "lateness: same instant (planned span {:.0} ms) p50 {:.0} p99 {:.0} max {:.0} ms; within 1 s (planned span {:.0} ms) p50 {:.0} p99 {:.0} max {:.0} ms",
        l.same_instant.planned_span_ms,
        l.same_instant.p50,
        l.same_instant.p99,
        l.same_instant.max,
        l.one_second.planned_span_ms,
        l.one_second.p50,
        l.one_second.p99,
        l.one_second.max
    );
    Ok(l)
}
