//! Start to `/readyz` 200: the benchmark's daemons, spawned with their output in a log file
//! of the run's temporary directory, and the time each takes to become ready.

use std::time::Duration;

use anyhow::{anyhow, Result};

use crate::support::Daemon;
use crate::Bench;

/// A daemon not ready by then is a broken setup.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// `/readyz` is polled this often: the resolution of the start-to-ready figure.
const READY_POLL: Duration = Duration::from_millis(10);

/// `tokenwarden run` on the benchmark's Redis with `extra` environment, then
/// `FLEET_DAEMON_ENV` (`K=V,K=V`, for experiments); its output goes to `{name}.log`.
pub fn spawn_daemon(b: &Bench, name: &str, extra: &[(&str, String)]) -> Result<Daemon> {
    let mut env: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    if let Ok(more) = std::env::var("FLEET_DAEMON_ENV") {
        for kv in more.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| anyhow!("FLEET_DAEMON_ENV: {kv:?} is not K=V"))?;
            env.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let log = b.dir.path().join(format!("{name}.log"));
    Ok(Daemon::start_logging_to(&b.redis, &env, &log))
}

/// Seconds from spawn to the first `/readyz` 200.
pub async fn time_to_ready(d: &Daemon) -> f64 {
    d.ready_after(READY_TIMEOUT, READY_POLL).await.as_secs_f64()
}
