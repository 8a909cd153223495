//! The test kit: shared by every `tests/*.rs` file as `mod support;` and by the fleet
//! benchmark (`#[path = "../../tests/support/mod.rs"] mod support;`).
//!
//! Each test gets real processes of its own, on ports of its own:
//! - [`RedisServer`] (`redis.rs`): a `redis-server` with its own temporary directory,
//!   stoppable with `SHUTDOWN SAVE` and restartable from its dump;
//! - [`FakeProvider`] (`provider.rs`): the `tokenwarden-fake-provider` example
//!   (`tests/fake_provider/`), a strict OAuth token endpoint, with async helpers for its
//!   control endpoints;
//! - [`Daemon`] (`daemon.rs`): the `tokenwarden` binary, its output captured for assertions
//!   and echoed to the test's stderr (shown when a test fails), or written to a file.
//!
//! Beside them: records to seed and read (`seed.rs`), Prometheus text parsing (`metrics.rs`),
//! the scan of output for seeded secrets (`secrets.rs`), and process helpers with CPU and
//! memory readers (`process.rs`).
//!
//! Nothing here skips: a missing `redis-server` or binary makes the test panic with a message
//! that says what to install or build. Waits are bounded by deadlines ([`wait_until`]), never
//! blind sleeps. Every process is killed when its handle is dropped, also when a test panics.
// Each test binary uses part of the kit: what it leaves unused is not a mistake.
#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod metrics;
pub mod process;
pub mod provider;
pub mod recorder;
pub mod redis;
pub mod secrets;
pub mod seed;

use std::future::Future;
use std::time::{Duration, Instant};

pub use self::daemon::Daemon;
pub use self::process::{free_port, unique_temp_dir};
pub use self::provider::{fake_provider_bin, FakeProvider};
pub use self::redis::RedisServer;
pub use self::secrets::{assert_no_secrets, Secrets};
pub use self::seed::{
    health_key, hget, hgetall, oauth_record, provider_key, seed_provider, seed_tenant_config,
};

// -----------------------------------------------------------------------------------------
// Waiting

/// Polls `condition` every 50 ms until it holds; panics naming `what` after `timeout`.
pub async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut condition: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// As [`wait_until`], for a condition that must itself await (an HTTP call, ...).
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the daemon's output contains `needle`.
pub async fn wait_for_log(daemon: &Daemon, needle: &str, timeout: Duration) {
    let what = format!("tokenwarden to log {needle:?}");
    wait_until(&what, timeout, || daemon.logs().contains(needle)).await;
}
