//! Configuration: typed settings, their layering and their validation.
//!
//! Layers, later wins: the defaults compiled in from `config/tokenwarden.toml` (the commented
//! reference of every setting), the operator's file (`--config FILE` or `TOKENWARDEN_CONFIG`),
//! then environment variables `TOKENWARDEN_<SECTION>_<KEY>` and the shortcuts of SPEC 3.
//! [`Config::load`] returns a validated [`Config`] or a [`ConfigError`] whose message names the
//! setting; the CLI turns that into exit code 2. Nothing an operator writes can panic:
//! every number is checked against its range in [`RANGES`] (one table: add a line with a
//! new setting; a test fails when a numeric default has none) before it is turned into the
//! typed struct, and type errors name the setting's path. Variables
//! `TOKENWARDEN_*` that are no setting are refused ([`check_env_names`]), with the closest
//! known name; the names allowed besides the settings are in [`FIXED_ENV`].
//!
//! Which settings a SIGHUP reloads is stated next to each one in the defaults file;
//! [`Config::restart_only_changes`] names the ones that changed but need a restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::catalog::{Catalog, CatalogError};
use crate::retry::RetryPolicy;
use crate::schedule::policy::RefreshPolicy;

/// The defaults file, compiled in.
pub const DEFAULTS_TOML: &str = include_str!("../config/tokenwarden.toml");
/// Environment variable prefix.
pub const ENV_PREFIX: &str = "TOKENWARDEN_";
/// Shortcut variables of SPEC 3 and the settings they stand for.
const ENV_SHORTCUTS: &[(&str, &str, &str)] = &[
    ("TOKENWARDEN_REDIS_URL", "redis", "url"),
    // SPEC 6 fixed names; also their generic names, listed to keep them fixed.
    ("TOKENWARDEN_REDIS_CLUSTER_URLS", "redis", "cluster_urls"),
    ("TOKENWARDEN_REDIS_SENTINEL_URLS", "redis", "sentinel_urls"),
    (
        "TOKENWARDEN_REDIS_SENTINEL_MASTER",
        "redis",
        "sentinel_master",
    ),
    ("TOKENWARDEN_LISTEN", "http", "listen"),
    ("TOKENWARDEN_LOG", "log", "level"),
    ("TOKENWARDEN_LOG_FORMAT", "log", "format"),
    // SPEC 6 fixed names. The key file's is also its generic name; listed to keep it fixed.
    ("TOKENWARDEN_STATE_DIR", "journal", "state_dir"),
    ("TOKENWARDEN_JOURNAL_KEY_FILE", "journal", "key_file"),
    ("TOKENWARDEN_MODE", "refresh", "mode"),
];

/// `TOKENWARDEN_*` names allowed besides `TOKENWARDEN_<SECTION>_<KEY>` and [`ENV_SHORTCUTS`]:
/// the fixed names of SPEC 6 (some read by the command line, or by settings added later).
pub const FIXED_ENV: &[&str] = &[
    "TOKENWARDEN_CONFIG",
    "TOKENWARDEN_REDIS_URL",
    "TOKENWARDEN_REDIS_CLUSTER_URLS",
    "TOKENWARDEN_REDIS_SENTINEL_URLS",
    "TOKENWARDEN_REDIS_SENTINEL_MASTER",
    "TOKENWARDEN_STATE_DIR",
    "TOKENWARDEN_JOURNAL_KEY_FILE",
    "TOKENWARDEN_MODE",
    "TOKENWARDEN_LISTEN",
    "TOKENWARDEN_LOG",
    "TOKENWARDEN_LOG_FORMAT",
];

/// Prefixes of the variables Kubernetes injects for a Service named `tokenwarden`
/// (`TOKENWARDEN_SERVICE_HOST`, `TOKENWARDEN_PORT_9464_TCP_ADDR`, ...): allowed, ignored.
pub const KUBERNETES_ENV_PREFIXES: &[&str] = &["TOKENWARDEN_SERVICE_", "TOKENWARDEN_PORT"];

/// The allowed range of a numeric setting, inclusive.
#[derive(Debug, Clone, Copy)]
pub enum Range {
    Int(i64, i64),
    Float(f64, f64),
}

/// Every numeric setting and its range, checked before the typed struct is built, so no
/// value can overflow the arithmetic done with it later.
pub const RANGES: &[(&str, Range)] = &[
    ("redis.pool_size", Range::Int(1, 1024)),
    ("redis.command_timeout_ms", Range::Int(1, 600_000)),
    ("redis.ping_interval_ms", Range::Int(1, 60_000)),
    ("redis.recovery_grace_ms", Range::Int(0, 600_000)),
    ("redis.wait_replicas", Range::Int(0, 100)),
    ("redis.wait_timeout_ms", Range::Int(0, 60_000)),
    ("journal.confirmed_retention_secs", Range::Int(0, 604_800)),
    ("replica.heartbeat_secs", Range::Int(1, 600)),
    ("replica.heartbeat_ttl_secs", Range::Int(2, 3_600)),
    ("metrics.expiring_window_secs", Range::Int(0, 604_800)),
    ("http.stuck_after_secs", Range::Int(1, 86_400)),
    ("http.header_timeout_ms", Range::Int(1, 600_000)),
    ("http.idle_timeout_secs", Range::Int(1, 86_400)),
    ("http.max_connections", Range::Int(1, 100_000)),
    ("registry.change_scan_interval_secs", Range::Int(1, 86_400)),
    ("registry.full_rescan_interval_secs", Range::Int(1, 604_800)),
    ("registry.scan_batch", Range::Int(1, 100_000)),
    ("schedule.refresh_fraction", Range::Float(0.0, 1.0)),
    ("schedule.min_fraction", Range::Float(0.0, 1.0)),
    ("schedule.lead_secs", Range::Int(0, 31_536_000)),
    ("schedule.jitter_fraction", Range::Float(0.0, 0.5)),
    ("schedule.jitter_max_secs", Range::Int(0, 86_400)),
    (
        "schedule.max_refresh_interval_secs",
        Range::Int(1, 31_536_000),
    ),
    ("refresh.max_concurrent", Range::Int(1, 10_000)),
    ("refresh.http_timeout_secs", Range::Int(1, 3_600)),
    ("refresh.connect_timeout_secs", Range::Int(1, 3_600)),
    ("refresh.response_timeout_secs", Range::Int(1, 3_600)),
    ("refresh.reservation_ttl_secs", Range::Int(1, 86_400)),
    (
        "refresh.max_token_lifetime_secs",
        Range::Int(60, 31_536_000),
    ),
    ("refresh.lock_ttl_secs", Range::Int(1, 86_400)),
    ("refresh.retry_base_ms", Range::Int(1, 3_600_000)),
    ("refresh.retry_max_secs", Range::Int(1, 86_400)),
    ("refresh.retry_after_max_secs", Range::Int(0, 604_800)),
    ("refresh.failing_after", Range::Int(1, 1_000)),
    ("refresh.lock_busy_retry_secs", Range::Int(1, 3_600)),
    ("refresh.max_response_bytes", Range::Int(1_024, 16_777_216)),
    ("shutdown.drain_deadline_secs", Range::Int(1, 3_600)),
    ("health.probe_interval_secs", Range::Int(1, 86_400)),
    ("health.probe_timeout_secs", Range::Int(1, 600)),
    ("health.slow_probe_ms", Range::Int(1, 600_000)),
    ("health.max_concurrent", Range::Int(1, 10_000)),
    ("metrics.max_provider_series", Range::Int(0, 10_000_000)),
    ("events.stream_maxlen", Range::Int(1, 100_000_000)),
    ("sync.spread_secs", Range::Int(0, 86_400)),
    ("sync.max_concurrent_tenants", Range::Int(1, 10_000)),
    ("sync.per_provider_concurrency", Range::Int(1, 64)),
    ("sync.page_size", Range::Int(1, 10_000)),
    ("sync.max_pages", Range::Int(1, 1_000_000)),
    ("sync.max_records", Range::Int(1, 10_000_000)),
    ("sync.max_page_bytes", Range::Int(1_024, 268_435_456)),
    ("sync.max_retries", Range::Int(0, 100)),
    ("sync.retry_base_ms", Range::Int(1, 600_000)),
    ("sync.retry_after_max_secs", Range::Int(0, 86_400)),
    ("sync.http_timeout_secs", Range::Int(1, 3_600)),
    ("sync.lock_ttl_secs", Range::Int(2, 86_400)),
    ("sync.token_min_validity_secs", Range::Int(0, 86_400)),
    ("sync.chunk_size", Range::Int(1, 100_000)),
    ("sync.staging_ttl_secs", Range::Int(60, 604_800)),
    ("sync.default_retention_days", Range::Int(1, 36_500)),
    ("sync.config_reread_secs", Range::Int(1, 86_400)),
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("unknown environment variable {var}{}", suggestion.as_ref().map(|s| format!(" (did you mean {s}?)")).unwrap_or_default())]
    UnknownEnv {
        var: String,
        suggestion: Option<String>,
    },
    #[error("provider catalog: {0}")]
    Catalog(#[from] CatalogError),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub redis: RedisConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub registry: RegistryConfig,
    pub schedule: ScheduleConfig,
    pub refresh: RefreshConfig,
    pub journal: JournalConfig,
    pub replica: ReplicaConfig,
    pub shutdown: ShutdownConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub events: EventsConfig,
    pub sync: SyncConfig,
    /// Directory against which relative paths in this config are resolved.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The provider catalog named by `refresh.catalog_file` (or the built-in one).
    #[serde(skip, default)]
    pub catalog: Catalog,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    pub cluster_urls: String,
    pub sentinel_urls: String,
    pub sentinel_master: String,
    pub sentinel_username: String,
    pub sentinel_password: String,
    pub username: String,
    pub password: String,
    pub ca_file: String,
    pub client_cert_file: String,
    pub client_key_file: String,
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
    pub pool_size: usize,
    pub command_timeout_ms: u64,
    pub ping_interval_ms: u64,
    pub recovery_grace_ms: u64,
}

impl RedisConfig {
    /// The replicas a write-back waits for (`WAIT`), and for how long; `None`: no WAIT.
    pub fn wait(&self) -> Option<(u32, Duration)> {
        if self.wait_timeout_ms == 0 {
            return None;
        }
        let n = match (self.wait_replicas, crate::store::Topology::of(self)) {
            (0, crate::store::Topology::Sentinel) => 1,
            (0, _) => return None,
            (n, _) => n,
        };
        Some((n, Duration::from_millis(self.wait_timeout_ms)))
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub stuck_after_secs: u64,
    pub header_timeout_ms: u64,
    pub idle_timeout_secs: u64,
    pub max_connections: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Notifications {
    Auto,
    Off,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    pub change_scan_interval_secs: u64,
    pub full_rescan_interval_secs: u64,
    pub scan_batch: usize,
    pub keyspace_notifications: Notifications,
    pub client_tracking: Notifications,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub refresh_fraction: f64,
    pub min_fraction: f64,
    pub lead_secs: u64,
    pub jitter_fraction: f64,
    pub jitter_max_secs: u64,
    pub max_refresh_interval_secs: u64,
}

/// `refresh.mode` (SPEC 6 `TOKENWARDEN_MODE`).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refresh tokens (the default).
    Active,
    /// Read, schedule, probe and report, but make no token call and write no gateway field.
    Observe,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefreshConfig {
    pub mode: Mode,
    pub max_concurrent: usize,
    pub http_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub response_timeout_secs: u64,
    pub reservation_ttl_secs: u64,
    pub max_token_lifetime_secs: u64,
    pub lock_ttl_secs: u64,
    pub retry_base_ms: u64,
    pub retry_max_secs: u64,
    pub retry_after_max_secs: u64,
    pub failing_after: u32,
    pub lock_busy_retry_secs: u64,
    pub max_response_bytes: usize,
    pub catalog_file: String,
    pub ca_file: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaConfig {
    pub heartbeat_secs: u64,
    pub heartbeat_ttl_secs: u64,
    pub share_fleet: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    pub drain_deadline_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub enabled: bool,
    pub probe_interval_secs: u64,
    pub probe_timeout_secs: u64,
    pub slow_probe_ms: u64,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub per_provider_series: bool,
    pub max_provider_series: usize,
    pub expiring_window_secs: u32,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    pub stream_maxlen: usize,
}

/// `[sync]`: the data sync (see `sync`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    pub enabled: bool,
    pub default_schedule: String,
    pub spread_secs: u64,
    pub max_concurrent_tenants: usize,
    pub per_provider_concurrency: usize,
    pub page_size: u32,
    pub max_pages: u32,
    pub max_records: usize,
    pub max_page_bytes: usize,
    pub max_retries: u32,
    pub retry_base_ms: u64,
    pub retry_after_max_secs: u64,
    pub http_timeout_secs: u64,
    pub lock_ttl_secs: u64,
    pub token_min_validity_secs: u64,
    pub chunk_size: usize,
    pub staging_ttl_secs: u64,
    pub default_retention_days: u64,
    pub config_reread_secs: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JournalConfig {
    pub state_dir: String,
    pub key_file: String,
    pub confirmed_retention_secs: u64,
}

impl Config {
    /// Loads defaults, then `file` (if any), then the process environment; validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: BTreeMap<String, String> = std::env::vars()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        Self::load_from(file, &env)
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let defaults_path = PathBuf::from("<built-in defaults>");
        let mut table = parse_table(DEFAULTS_TOML, &defaults_path)?;
        let mut base_dir = PathBuf::from(".");
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let overlay = parse_table(&text, path)?;
            merge(&mut table, overlay, path)?;
            base_dir = path
                .parent()
                .map(Path::to_path_buf)
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or_else(|| PathBuf::from("."));
        }
        check_env_names(&table, env)?;
        apply_env(&mut table, env)?;
        check_ranges(&table)?;
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
                ConfigError::Invalid(format!("{}: {}", e.path(), e.inner().message()))
            })?;
        config.base_dir = base_dir;
        // The Redis TLS files, resolved like the catalog, so that the store reads them as given.
        for i in 0..3 {
            let value = match i {
                0 => &config.redis.ca_file,
                1 => &config.redis.client_cert_file,
                _ => &config.redis.client_key_file,
            };
            let resolved = config
                .resolve(value)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            match i {
                0 => config.redis.ca_file = resolved,
                1 => config.redis.client_cert_file = resolved,
                _ => config.redis.client_key_file = resolved,
            }
        }
        config.validate()?;
        config.catalog = match config.catalog_path() {
            Some(path) => Catalog::load(&path)?,
            None => Catalog::builtin()?,
        };
        // The catalog's sync tables are parsed by the sync module: refuse a bad one here.
        crate::sync::endpoints::Endpoints::from_catalog(&config.catalog)
            .map_err(|e| ConfigError::Invalid(format!("provider catalog: {e}")))?;
        Ok(config)
    }

    /// The catalog file, resolved against the config file's directory; `None` = built-in.
    pub fn catalog_path(&self) -> Option<PathBuf> {
        self.resolve(&self.refresh.catalog_file)
    }

    /// The state directory (`journal.state_dir`), resolved like the catalog; the journal is
    /// [`crate::journal::dir_in`] of it.
    pub fn state_dir(&self) -> PathBuf {
        self.resolve(&self.journal.state_dir)
            .unwrap_or_else(|| PathBuf::from(&self.journal.state_dir))
    }

    /// The journal key file; `None` = entries are not encrypted.
    pub fn journal_key_path(&self) -> Option<PathBuf> {
        self.resolve(&self.journal.key_file)
    }

    /// How long confirmed journal entries are kept.
    pub fn journal_retention(&self) -> Duration {
        Duration::from_secs(self.journal.confirmed_retention_secs)
    }

    /// The extra CA file, resolved like the catalog.
    pub fn ca_path(&self) -> Option<PathBuf> {
        self.resolve(&self.refresh.ca_file)
    }

    fn resolve(&self, value: &str) -> Option<PathBuf> {
        if value.trim().is_empty() {
            return None;
        }
        let p = PathBuf::from(value);
        Some(if p.is_absolute() {
            p
        } else {
            self.base_dir.join(p)
        })
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.redis.url.starts_with("redis://")
            || self.redis.url.starts_with("rediss://")
            || self.redis.url.starts_with("unix://"))
        {
            return bad("redis.url must start with redis://, rediss:// or unix://".into());
        }
        if let Err(e) = redis::Client::open(self.redis.url.as_str()) {
            return bad(format!(
                "redis.url {} is not a valid Redis URL: {e}",
                crate::store::redact_url(&self.redis.url)
            ));
        }
        let rc = &self.redis;
        let cluster = crate::store::url_list(&rc.cluster_urls);
        let sentinels = crate::store::url_list(&rc.sentinel_urls);
        if !cluster.is_empty() && (!sentinels.is_empty() || !rc.sentinel_master.is_empty()) {
            return bad(
                "redis.cluster_urls and the Sentinel settings (redis.sentinel_urls, redis.sentinel_master) exclude each other: set one topology"
                    .into(),
            );
        }
        if sentinels.is_empty() != rc.sentinel_master.trim().is_empty() {
            return bad("redis.sentinel_urls and redis.sentinel_master go together".into());
        }
        for (name, list) in [
            ("redis.cluster_urls", &cluster),
            ("redis.sentinel_urls", &sentinels),
        ] {
            for u in list.iter() {
                if !(u.starts_with("redis://") || u.starts_with("rediss://")) {
                    return bad(format!(
                        "{name}: {} must start with redis:// or rediss://",
                        crate::store::redact_url(u)
                    ));
                }
                if let Err(e) = redis::Client::open(u.as_str()) {
                    return bad(format!(
                        "{name}: {} is not a valid Redis URL: {e}",
                        crate::store::redact_url(u)
                    ));
                }
            }
        }
        if rc.client_cert_file.is_empty() != rc.client_key_file.is_empty() {
            return bad("redis.client_cert_file and redis.client_key_file go together".into());
        }
        for (name, path) in [
            ("redis.ca_file", &rc.ca_file),
            ("redis.client_cert_file", &rc.client_cert_file),
            ("redis.client_key_file", &rc.client_key_file),
        ] {
            if !path.is_empty() && !Path::new(path).is_file() {
                return bad(format!("{name} {path:?} is not a readable file"));
            }
        }
        if self.redis.pool_size == 0 {
            return bad("redis.pool_size must be at least 1".into());
        }
        if self.redis.command_timeout_ms == 0 {
            return bad("redis.command_timeout_ms must be at least 1".into());
        }
        if self.http.listen.parse::<SocketAddr>().is_err() {
            return bad(format!(
                "http.listen {:?} is not an address:port",
                self.http.listen
            ));
        }
        if self.http.stuck_after_secs == 0 {
            return bad("http.stuck_after_secs must be at least 1".into());
        }
        if let Err(e) = crate::sync::schedule::Cron::parse(&self.sync.default_schedule) {
            return bad(format!("sync.default_schedule: {e}"));
        }
        if self.sync.lock_ttl_secs < self.sync.http_timeout_secs.saturating_mul(2) {
            return bad("sync.lock_ttl_secs must be at least twice sync.http_timeout_secs".into());
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return bad(format!(
                "log.level {:?} is not a valid filter",
                self.log.level
            ));
        }
        if self.registry.change_scan_interval_secs == 0 {
            return bad("registry.change_scan_interval_secs must be at least 1".into());
        }
        if self.registry.full_rescan_interval_secs < self.registry.change_scan_interval_secs {
            return bad(
                "registry.full_rescan_interval_secs must be at least change_scan_interval_secs"
                    .into(),
            );
        }
        if self.registry.scan_batch == 0 || self.registry.scan_batch > 100_000 {
            return bad("registry.scan_batch must be between 1 and 100000".into());
        }
        if let Err(m) = self.refresh_policy().validate() {
            return bad(format!("schedule: {m}"));
        }
        let r = &self.refresh;
        if r.max_concurrent == 0 {
            return bad("refresh.max_concurrent must be at least 1".into());
        }
        if r.http_timeout_secs == 0 || r.connect_timeout_secs == 0 {
            return bad(
                "refresh.http_timeout_secs and connect_timeout_secs must be at least 1".into(),
            );
        }
        if r.lock_ttl_secs < 2 * r.http_timeout_secs {
            return bad(format!(
                "refresh.lock_ttl_secs ({}) must be at least twice refresh.http_timeout_secs ({})",
                r.lock_ttl_secs, r.http_timeout_secs
            ));
        }
        if r.response_timeout_secs < r.http_timeout_secs {
            return bad(format!(
                "refresh.response_timeout_secs ({}) must be at least refresh.http_timeout_secs ({})",
                r.response_timeout_secs, r.http_timeout_secs
            ));
        }
        if r.reservation_ttl_secs < r.lock_ttl_secs {
            return bad(
                "refresh.reservation_ttl_secs must be at least refresh.lock_ttl_secs".into(),
            );
        }
        if r.max_token_lifetime_secs < 60 || r.max_token_lifetime_secs > 31_536_000 {
            return bad("refresh.max_token_lifetime_secs must be between 60 and 31536000".into());
        }
        if self.redis.ping_interval_ms == 0 || self.redis.ping_interval_ms > 60_000 {
            return bad("redis.ping_interval_ms must be between 1 and 60000".into());
        }
        if self.redis.recovery_grace_ms > 600_000 {
            return bad("redis.recovery_grace_ms must be at most 600000".into());
        }
        if self.replica.heartbeat_secs == 0
            || self.replica.heartbeat_ttl_secs < 2 * self.replica.heartbeat_secs
            || self.replica.heartbeat_ttl_secs > 3600
        {
            return bad("replica.heartbeat_secs must be at least 1 and replica.heartbeat_ttl_secs between twice that and 3600".into());
        }
        if r.retry_base_ms == 0 || r.retry_max_secs == 0 {
            return bad("refresh.retry_base_ms and retry_max_secs must be at least 1".into());
        }
        if r.failing_after == 0 {
            return bad("refresh.failing_after must be at least 1".into());
        }
        if r.lock_busy_retry_secs == 0 {
            return bad("refresh.lock_busy_retry_secs must be at least 1".into());
        }
        if r.max_response_bytes < 1024 {
            return bad("refresh.max_response_bytes must be at least 1024".into());
        }
        if let Some(ca) = self.ca_path() {
            if !ca.is_file() {
                return bad(format!("refresh.ca_file {} does not exist", ca.display()));
            }
            let pem = std::fs::read(&ca).map_err(|e| {
                ConfigError::Invalid(format!("refresh.ca_file {}: {e}", ca.display()))
            })?;
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => {}
                Ok(_) => {
                    return bad(format!(
                        "refresh.ca_file {} holds no PEM certificate",
                        ca.display()
                    ))
                }
                Err(e) => {
                    return bad(format!(
                        "refresh.ca_file {} is not PEM certificates: {e}",
                        ca.display()
                    ))
                }
            }
        }
        let h = &self.health;
        if h.probe_interval_secs == 0 || h.probe_timeout_secs == 0 || h.max_concurrent == 0 {
            return bad(
                "health.probe_interval_secs, probe_timeout_secs and max_concurrent must be at least 1"
                    .into(),
            );
        }
        if self.shutdown.drain_deadline_secs == 0 {
            return bad("shutdown.drain_deadline_secs must be at least 1".into());
        }
        if self.journal.state_dir.trim().is_empty() {
            return bad("journal.state_dir must not be empty".into());
        }
        if let Some(key) = self.journal_key_path() {
            if !key.is_file() {
                return bad(format!("journal.key_file {} does not exist", key.display()));
            }
        }
        Ok(())
    }

    pub fn refresh_policy(&self) -> RefreshPolicy {
        let s = &self.schedule;
        RefreshPolicy {
            refresh_fraction: s.refresh_fraction,
            min_fraction: s.min_fraction,
            lead: secs(s.lead_secs),
            jitter_fraction: s.jitter_fraction,
            jitter_max: secs(s.jitter_max_secs),
            max_refresh_interval: secs(s.max_refresh_interval_secs),
        }
    }

    pub fn retry_policy(&self) -> RetryPolicy {
        let r = &self.refresh;
        RetryPolicy {
            base: Duration::from_millis(r.retry_base_ms),
            max: Duration::from_secs(r.retry_max_secs),
            multiplier: 2.0,
            jitter: 0.5,
            retry_after_max: Duration::from_secs(r.retry_after_max_secs),
        }
    }

    pub fn listen_addr(&self) -> SocketAddr {
        // validated in `validate`
        self.http
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 9464)))
    }

    /// Settings that changed between `self` (running) and `next` but are read only at start.
    pub fn restart_only_changes(&self, next: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |name: &'static str, changed: bool| {
            if changed {
                out.push(name);
            }
        };
        check("redis.url", self.redis.url != next.redis.url);
        for (name, a, b) in [
            (
                "redis.cluster_urls",
                &self.redis.cluster_urls,
                &next.redis.cluster_urls,
            ),
            (
                "redis.sentinel_urls",
                &self.redis.sentinel_urls,
                &next.redis.sentinel_urls,
            ),
            (
                "redis.sentinel_master",
                &self.redis.sentinel_master,
                &next.redis.sentinel_master,
            ),
            (
                "redis.sentinel_username",
                &self.redis.sentinel_username,
                &next.redis.sentinel_username,
            ),
            (
                "redis.sentinel_password",
                &self.redis.sentinel_password,
                &next.redis.sentinel_password,
            ),
            ("redis.username", &self.redis.username, &next.redis.username),
            ("redis.password", &self.redis.password, &next.redis.password),
            ("redis.ca_file", &self.redis.ca_file, &next.redis.ca_file),
            (
                "redis.client_cert_file",
                &self.redis.client_cert_file,
                &next.redis.client_cert_file,
            ),
            (
                "redis.client_key_file",
                &self.redis.client_key_file,
                &next.redis.client_key_file,
            ),
        ] {
            check(name, a != b);
        }
        check(
            "redis.pool_size",
            self.redis.pool_size != next.redis.pool_size,
        );
        check(
            "redis.command_timeout_ms",
            self.redis.command_timeout_ms != next.redis.command_timeout_ms,
        );
        check("http.listen", self.http.listen != next.http.listen);
        check(
            "http.max_connections",
            self.http.max_connections != next.http.max_connections,
        );
        check("log.format", self.log.format != next.log.format);
        for (name, changed) in [
            ("sync.enabled", self.sync.enabled != next.sync.enabled),
            (
                "sync.default_schedule",
                self.sync.default_schedule != next.sync.default_schedule,
            ),
            (
                "sync.spread_secs",
                self.sync.spread_secs != next.sync.spread_secs,
            ),
            (
                "sync.max_concurrent_tenants",
                self.sync.max_concurrent_tenants != next.sync.max_concurrent_tenants,
            ),
            (
                "sync.config_reread_secs",
                self.sync.config_reread_secs != next.sync.config_reread_secs,
            ),
        ] {
            check(name, changed);
        }
        check(
            "registry.client_tracking",
            self.registry.client_tracking != next.registry.client_tracking,
        );
        check(
            "registry.keyspace_notifications",
            self.registry.keyspace_notifications != next.registry.keyspace_notifications,
        );
        check(
            "refresh.max_concurrent",
            self.refresh.max_concurrent != next.refresh.max_concurrent,
        );
        check(
            "refresh.http_timeout_secs",
            self.refresh.http_timeout_secs != next.refresh.http_timeout_secs,
        );
        check(
            "refresh.connect_timeout_secs",
            self.refresh.connect_timeout_secs != next.refresh.connect_timeout_secs,
        );
        check(
            "refresh.ca_file",
            self.refresh.ca_file != next.refresh.ca_file,
        );
        check(
            "journal.state_dir",
            self.journal.state_dir != next.journal.state_dir,
        );
        check(
            "journal.key_file",
            self.journal.key_file != next.journal.key_file,
        );
        out
    }
}

fn secs(s: u64) -> chrono::Duration {
    chrono::Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

fn parse_table(text: &str, path: &Path) -> Result<toml::Table, ConfigError> {
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.message().to_string(),
        })
}

/// Overlays `overlay` onto `base`, section by section; unknown sections or keys are errors.
fn merge(base: &mut toml::Table, overlay: toml::Table, path: &Path) -> Result<(), ConfigError> {
    for (section, value) in overlay {
        let Some(toml::Value::Table(target)) = base.get_mut(&section) else {
            return Err(ConfigError::Invalid(format!(
                "{}: unknown section [{section}]",
                path.display()
            )));
        };
        let toml::Value::Table(values) = value else {
            return Err(ConfigError::Invalid(format!(
                "{}: {section} must be a table",
                path.display()
            )));
        };
        for (key, v) in values {
            if !target.contains_key(&key) {
                return Err(ConfigError::Invalid(format!(
                    "{}: unknown setting {section}.{key}",
                    path.display()
                )));
            }
            target.insert(key, v);
        }
    }
    Ok(())
}

/// Every numeric value of `table` within its range of [`RANGES`].
fn check_ranges(table: &toml::Table) -> Result<(), ConfigError> {
    for (name, range) in RANGES {
        let Some((section, key)) = name.split_once('.') else {
            continue;
        };
        let Some(value) = table
            .get(section)
            .and_then(|s| s.as_table())
            .and_then(|s| s.get(key))
        else {
            continue;
        };
        let out_of_range = |lo: &dyn std::fmt::Display,
                            hi: &dyn std::fmt::Display,
                            got: &dyn std::fmt::Display| {
            ConfigError::Invalid(format!("{name} must be between {lo} and {hi}, got {got}"))
        };
        match (*range, value) {
            (Range::Int(lo, hi), toml::Value::Integer(v)) => {
                if !(lo..=hi).contains(v) {
                    return Err(out_of_range(&lo, &hi, v));
                }
            }
            (Range::Float(lo, hi), toml::Value::Float(v)) => {
                if !(v.is_finite() && (lo..=hi).contains(v)) {
                    return Err(out_of_range(&lo, &hi, v));
                }
            }
            (Range::Float(lo, hi), toml::Value::Integer(v)) => {
                // An integer where a fraction is expected: in range, serde takes it as a float.
                let f = *v as f64;
                if !(lo..=hi).contains(&f) {
                    return Err(out_of_range(&lo, &hi, v));
                }
            }
            (Range::Int(..), other) => {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be an integer, got a {}",
                    other.type_str()
                )))
            }
            (Range::Float(..), other) => {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be a number, got a {}",
                    other.type_str()
                )))
            }
        }
    }
    Ok(())
}

/// The `TOKENWARDEN_*` names that mean something: one per setting of `table`, the shortcuts
/// and [`FIXED_ENV`].
pub fn known_env_names(table: &toml::Table) -> std::collections::BTreeSet<String> {
    let mut names: std::collections::BTreeSet<String> = FIXED_ENV
        .iter()
        .chain(ENV_SHORTCUTS.iter().map(|(v, _, _)| v))
        .map(|s| s.to_string())
        .collect();
    for (section, value) in table {
        if let toml::Value::Table(keys) = value {
            for key in keys.keys() {
                names.insert(format!("{ENV_PREFIX}{section}_{key}").to_uppercase());
            }
        }
    }
    names
}

/// Refuses a `TOKENWARDEN_*` variable that is no setting (a typo is otherwise silently
/// ignored), naming the closest known one; Kubernetes' Service variables are let through.
pub fn check_env_names(
    table: &toml::Table,
    env: &BTreeMap<String, String>,
) -> Result<(), ConfigError> {
    let known = known_env_names(table);
    for var in env.keys() {
        if !var.starts_with(ENV_PREFIX)
            || known.contains(var)
            || KUBERNETES_ENV_PREFIXES.iter().any(|p| var.starts_with(p))
        {
            continue;
        }
        let suggestion = known
            .iter()
            .map(|k| (strsim::damerau_levenshtein(var, k), k))
            .min()
            .filter(|(d, k)| *d <= (k.len() / 3).max(2))
            .map(|(_, k)| k.clone());
        return Err(ConfigError::UnknownEnv {
            var: var.clone(),
            suggestion,
        });
    }
    Ok(())
}

/// Applies `TOKENWARDEN_<SECTION>_<KEY>` and the shortcuts, typed after the default value.
fn apply_env(table: &mut toml::Table, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    let mut targets: Vec<(String, String, String)> = Vec::new();
    for (section, value) in table.iter() {
        if let toml::Value::Table(keys) = value {
            for key in keys.keys() {
                let var = format!("{ENV_PREFIX}{}_{}", section, key).to_uppercase();
                targets.push((var, section.clone(), key.clone()));
            }
        }
    }
    for (var, section, key) in ENV_SHORTCUTS {
        targets.push((var.to_string(), section.to_string(), key.to_string()));
    }
    for (var, section, key) in targets {
        let Some(raw) = env.get(&var) else { continue };
        let Some(toml::Value::Table(keys)) = table.get_mut(&section) else {
            continue;
        };
        let Some(current) = keys.get(&key) else {
            continue;
        };
        let value = typed_like(current, raw).map_err(|message| ConfigError::Env {
            var: var.clone(),
            message,
        })?;
        keys.insert(key, value);
    }
    Ok(())
}

fn typed_like(current: &toml::Value, raw: &str) -> Result<toml::Value, String> {
    let raw = raw.trim();
    Ok(match current {
        toml::Value::Integer(_) => toml::Value::Integer(
            raw.parse()
                .map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        toml::Value::Float(_) => toml::Value::Float(
            raw.parse()
                .map_err(|_| format!("expected a number, got {raw:?}"))?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            crate::timestamp::parse_bool(raw)
                .ok_or_else(|| format!("expected true or false, got {raw:?}"))?,
        ),
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = Config::load_from(None, &env(&[])).expect("defaults are valid");
        assert_eq!(c.redis.url, "redis://127.0.0.1:6379/0");
        assert_eq!(c.http.listen, "0.0.0.0:9464");
        assert_eq!(c.refresh.lock_ttl_secs, 30);
        assert!(c.catalog.get("goto").is_some());
    }

    #[test]
    fn env_overrides_and_shortcuts() {
        let c = Config::load_from(
            None,
            &env(&[
                ("TOKENWARDEN_REDIS_URL", "redis://10.0.0.1:6380/2"),
                ("TOKENWARDEN_LISTEN", "127.0.0.1:1234"),
                ("TOKENWARDEN_LOG", "debug"),
                ("TOKENWARDEN_REFRESH_HTTP_TIMEOUT_SECS", "3"),
                ("TOKENWARDEN_METRICS_PER_PROVIDER_SERIES", "no"),
                ("TOKENWARDEN_SCHEDULE_JITTER_FRACTION", "0.1"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.redis.url, "redis://10.0.0.1:6380/2");
        assert_eq!(c.http.listen, "127.0.0.1:1234");
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.refresh.http_timeout_secs, 3);
        assert!(!c.metrics.per_provider_series);
        assert!((c.schedule.jitter_fraction - 0.1).abs() < 1e-9);
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load_from(None, &env(&[("TOKENWARDEN_REFRESH_LOCK_TTL_SECS", "5")]))
            .expect_err("lock ttl below twice the timeout");
        assert!(e.to_string().contains("lock_ttl_secs"), "{e}");
        let e = Config::load_from(None, &env(&[("TOKENWARDEN_REFRESH_MAX_CONCURRENT", "x")]))
            .expect_err("not a number");
        assert!(
            e.to_string().contains("TOKENWARDEN_REFRESH_MAX_CONCURRENT"),
            "{e}"
        );
        let e = Config::load_from(None, &env(&[("TOKENWARDEN_LISTEN", "nowhere")]))
            .expect_err("bad listen");
        assert!(e.to_string().contains("http.listen"), "{e}");
    }

    #[test]
    fn file_overlay_rejects_unknown_keys_and_resolves_paths() {
        let dir = std::env::temp_dir().join(format!("tw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("tw.toml");
        std::fs::write(&file, "[refresh]\nmax_concurrent = 7\n").expect("write");
        let c = Config::load_from(Some(&file), &env(&[])).expect("valid");
        assert_eq!(c.refresh.max_concurrent, 7);
        assert_eq!(c.base_dir, dir);

        std::fs::write(&file, "[refresh]\nmax_concurency = 7\n").expect("write");
        let e = Config::load_from(Some(&file), &env(&[])).expect_err("typo");
        assert!(e.to_string().contains("refresh.max_concurency"), "{e}");

        std::fs::write(&file, "[refresh]\ncatalog_file = \"missing.toml\"\n").expect("write");
        let e = Config::load_from(Some(&file), &env(&[])).expect_err("missing catalog");
        assert!(e.to_string().contains("missing.toml"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mode_from_the_file_or_tokenwarden_mode() {
        let c = Config::load_from(None, &env(&[])).expect("valid");
        assert_eq!(c.refresh.mode, Mode::Active);
        let c = Config::load_from(None, &env(&[("TOKENWARDEN_MODE", "observe")])).expect("valid");
        assert_eq!(c.refresh.mode, Mode::Observe);
        let e = Config::load_from(None, &env(&[("TOKENWARDEN_MODE", "watch")]))
            .expect_err("not a mode");
        assert!(e.to_string().contains("mode"), "{e}");
        // Reloadable: not a restart-only setting.
        let a = Config::load_from(None, &env(&[])).expect("valid");
        let b = Config::load_from(None, &env(&[("TOKENWARDEN_MODE", "observe")])).expect("valid");
        assert!(a.restart_only_changes(&b).is_empty());
    }

    #[test]
    fn restart_only_changes_are_named() {
        let a = Config::load_from(None, &env(&[])).expect("valid");
        let b = Config::load_from(
            None,
            &env(&[
                ("TOKENWARDEN_LISTEN", "127.0.0.1:1"),
                ("TOKENWARDEN_LOG", "debug"),
            ]),
        )
        .expect("valid");
        assert_eq!(a.restart_only_changes(&b), vec!["http.listen"]);
    }

    #[test]
    fn journal_settings_and_their_fixed_env_names() {
        let c = Config::load_from(None, &env(&[])).expect("valid");
        assert_eq!(c.state_dir(), PathBuf::from("/var/lib/tokenwarden"));
        assert_eq!(c.journal_key_path(), None);
        assert_eq!(c.journal_retention(), Duration::from_secs(600));

        let dir = std::env::temp_dir().join(format!("tw-config-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = dir.join("journal.key");
        std::fs::write(&key, "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").expect("write");
        let c = Config::load_from(
            None,
            &env(&[
                ("TOKENWARDEN_STATE_DIR", "/srv/tw"),
                ("TOKENWARDEN_JOURNAL_KEY_FILE", &key.display().to_string()),
                ("TOKENWARDEN_JOURNAL_CONFIRMED_RETENTION_SECS", "60"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.state_dir(), PathBuf::from("/srv/tw"));
        assert_eq!(c.journal_key_path(), Some(key.clone()));
        assert_eq!(c.journal_retention(), Duration::from_secs(60));

        let missing = dir.join("missing.key");
        let e = Config::load_from(
            None,
            &env(&[(
                "TOKENWARDEN_JOURNAL_KEY_FILE",
                &missing.display().to_string(),
            )]),
        )
        .expect_err("missing key file");
        assert!(e.to_string().contains("journal.key_file"), "{e}");
        let e = Config::load_from(None, &env(&[("TOKENWARDEN_STATE_DIR", " ")]))
            .expect_err("empty state dir");
        assert!(e.to_string().contains("journal.state_dir"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
