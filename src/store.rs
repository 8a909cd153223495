//! The Redis connection pool and the error every Redis call returns.
//!
//! One `deadpool-redis` pool of multiplexed connections, each with a connect and a response
//! timeout, so that no Redis call can hang the daemon during an outage.

use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;

use crate::config::RedisConfig;

pub use deadpool_redis::Connection;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis unavailable: {0}")]
    Pool(String),
}

impl From<deadpool_redis::PoolError> for StoreError {
    fn from(e: deadpool_redis::PoolError) -> Self {
        match e {
            deadpool_redis::PoolError::Backend(e) => StoreError::Redis(e),
            other => StoreError::Pool(other.to_string()),
        }
    }
}

/// Builds the pool; no connection is made until the first use.
pub fn pool(cfg: &RedisConfig) -> Result<Pool, StoreError> {
    let timeout = Duration::from_millis(cfg.command_timeout_ms);
    let conn_cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let manager = Manager::new_with_config(cfg.url.as_str(), conn_cfg)?;
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .recycle_timeout(Some(timeout))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| StoreError::Pool(e.to_string()))
}

/// A connection from the pool.
pub async fn conn(pool: &Pool) -> Result<Connection, StoreError> {
    Ok(pool.get().await?)
}

/// `url` without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://[redacted]@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            super::redact_url("redis://:pw@host:6379/0"),
            "redis://[redacted]@host:6379/0"
        );
        assert_eq!(super::redact_url("redis://host/0"), "redis://host/0");
    }
}
