//! `/metrics` scrapes: time and size with per-provider series on and off, and the daemon's
//! own registry scan histogram read from them.

use std::time::Instant;

use crate::support::metrics::{label, samples};
use crate::support::Daemon;
use crate::{median, ms};

/// Median time (ms) of three `/metrics` scrapes, the size, and the last body.
pub async fn scrape(d: &Daemon) -> (f64, usize, String) {
    let mut times = Vec::new();
    let mut body = String::new();
    for _ in 0..3 {
        let started = Instant::now();
        body = d.metrics().await;
        times.push(ms(started.elapsed()));
    }
    (median(times), body.len(), body)
}

/// (count, mean seconds) of the daemon's registry scans of one kind.
pub fn scan_stats(text: &str, kind: &str) -> (f64, f64) {
    let pick = |suffix: &str| -> f64 {
        samples(
            text,
            &format!("tokenwarden_registry_scan_duration_seconds_{suffix}"),
        )
        .iter()
        .filter(|(labels, _)| label(labels, "kind") == Some(kind))
        .map(|(_, v)| v)
        .sum::<f64>()
    };
    let count = pick("count");
    (
        count,
        if count > 0.0 {
            pick("sum") / count
        } else {
            f64::NAN
        },
    )
}
