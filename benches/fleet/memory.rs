//! Resident memory: the empty-registry baseline, and the daemon's memory per tracked provider
//! over it (the figures themselves are read with the kit's `/proc` readers).

use std::time::Duration;

use anyhow::Result;

use crate::ready::{spawn_daemon, time_to_ready};
use crate::Bench;

/// RSS in MiB of a daemon with nothing to track, 2 s after it is ready.
pub async fn baseline(b: &mut Bench) -> Result<f64> {
    b.flush().await?;
    let d0 = spawn_daemon(b, "empty", &[])?;
    time_to_ready(&d0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_mb = d0.rss_mb();
    d0.terminate(Duration::from_secs(30)).await;
    eprintln!("empty registry: RSS {baseline_mb:.1} MB");
    Ok(baseline_mb)
}

/// Bytes per tracked provider of `rss_mb` over `baseline_mb`.
pub fn per_provider_bytes(rss_mb: f64, baseline_mb: f64, n: usize) -> f64 {
    (rss_mb - baseline_mb) * 1024.0 * 1024.0 / n as f64
}
