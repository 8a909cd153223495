//! The Redis connection pool and the error every Redis call returns.
//!
//! One `deadpool-redis` pool of multiplexed connections, each with a connect and a response
//! timeout, so that no Redis call can hang the daemon during an outage.

use std::time::Duration;

use deadpool_redis::{Manager, Pool, Runtime};
use redis::AsyncConnectionConfig;

use crate::config::RedisConfig;

/// A Redis connection: multiplexed, so clones share one socket and may be used at once.
pub type Connection = redis::aio::MultiplexedConnection;

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

/// A connection from the pool. The pool object goes back at once: the connection is
/// multiplexed, so a clone serves this caller while others use the same socket. (Holding the
/// pool object for a whole refresh capped concurrent refreshes at `redis.pool_size`: with
/// a 100 ms token endpoint the benchmark saw 16 calls in flight and 153 refreshes/s although
/// `refresh.max_concurrent` was 64.)
pub async fn conn(pool: &Pool) -> Result<Connection, StoreError> {
    let pooled = pool.get().await?;
    Ok(redis::aio::MultiplexedConnection::clone(&pooled))
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
