//! Configuration: typed settings, their layering and their validation.
//!
//! Layers, later wins: the defaults compiled in from `config/tokenwarden.toml` (the commented
//! reference of every setting), the operator's file (`--config FILE` or `TOKENWARDEN_CONFIG`),
//! then environment variables `TOKENWARDEN_<SECTION>_<KEY>` and the shortcuts of SPEC 3.
//! [`Config::load`] returns a validated [`Config`] or a [`ConfigError`] whose message names the
//! setting; the CLI turns that into exit code 2.
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
    ("TOKENWARDEN_LISTEN", "http", "listen"),
    ("TOKENWARDEN_LOG", "log", "level"),
    ("TOKENWARDEN_LOG_FORMAT", "log", "format"),
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
    pub shutdown: ShutdownConfig,
    pub health: HealthConfig,
    pub metrics: MetricsConfig,
    pub events: EventsConfig,
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
    pub pool_size: usize,
    pub command_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    pub stuck_after_secs: u64,
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

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RefreshConfig {
    pub max_concurrent: usize,
    pub http_timeout_secs: u64,
    pub connect_timeout_secs: u64,
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
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    pub stream_maxlen: usize,
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
        apply_env(&mut table, env)?;
        let mut config: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_string()))?;
        config.base_dir = base_dir;
        config.validate()?;
        config.catalog = match config.catalog_path() {
            Some(path) => Catalog::load(&path)?,
            None => Catalog::builtin()?,
        };
        Ok(config)
    }

    /// The catalog file, resolved against the config file's directory; `None` = built-in.
    pub fn catalog_path(&self) -> Option<PathBuf> {
        self.resolve(&self.refresh.catalog_file)
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
        check(
            "redis.pool_size",
            self.redis.pool_size != next.redis.pool_size,
        );
        check(
            "redis.command_timeout_ms",
            self.redis.command_timeout_ms != next.redis.command_timeout_ms,
        );
        check("http.listen", self.http.listen != next.http.listen);
        check("log.format", self.log.format != next.log.format);
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
}
