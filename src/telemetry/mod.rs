//! Telemetry: logs ([`logging`]) and Prometheus metrics ([`metrics`]).

pub mod logging;
pub mod metrics;
