//! Redis key names (SPEC 1 and 2) and the identity of a tracked provider.
//!
//! Every key tokenwarden reads or writes is built here, so the contract has one home. So is
//! the rule of SPEC 1.3 "Names": [`tenant_id`], [`provider_name`] and [`ProviderId::checked`]
//! refuse a name tokenwarden cannot serve. A provider name may not contain `:`, so the
//! health and lock keys of one provider are never the record key of another (`goto:health`
//! would be `goto`'s health hash); discovery builds every id through them.

use std::fmt;
use std::sync::Arc;

use crate::text::escape_control;

/// A provider request budget (`refresh::budget`): `tokenwarden:budget:{kind}:{provider_type}:{scope}:{value}`,
/// `kind` = `token` or `api`, `value` the record (`tenant:provider`), the client id or the
/// account key the budget counts by.
pub fn budget_key(kind: &str, provider_type: &str, scope: &str, value: &str) -> String {
    format!("tokenwarden:budget:{kind}:{provider_type}:{scope}:{value}")
}

/// `SCAN MATCH` pattern that finds tenants (SPEC 1.2).
pub const PROVIDERS_PATTERN: &str = "tenant:*:providers";
/// The event stream (SPEC 2).
pub const EVENTS_STREAM: &str = "tokenwarden:events";
/// Operator requests for the running replicas, and their answers (SPEC 2; [`crate::commands`]).
pub const COMMANDS_STREAM: &str = "tokenwarden:commands";

/// Maps and sets keyed by provider ids or tenant names, hashed with foldhash: a full read
/// passes every record through several of them, and SipHash's resistance to chosen keys buys
/// nothing against names the gateway wrote.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// See [`FastMap`].
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// `:health`, the suffix of [`ProviderId::health_key`].
const HEALTH_SUFFIX: &str = ":health";

/// One provider of one tenant: the unit tokenwarden tracks, refreshes and reports on.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderId {
    pub tenant: Arc<str>,
    pub provider: Arc<str>,
}

/// Why a tenant id or provider name is not one tokenwarden can serve (SPEC 1.3 "Names").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadName {
    #[error("not UTF-8 text")]
    NotUtf8,
    #[error("empty")]
    Empty,
    #[error("contains ':'")]
    Colon,
    #[error("contains a control character")]
    Control,
}

impl BadName {
    /// Label for `registry_invalid_records_total{reason}`.
    pub const REASON: &'static str = "bad_name";
}

/// A tenant id as found in a key: UTF-8 and not empty (it may contain `:`).
pub fn tenant_id(raw: &[u8]) -> Result<&str, BadName> {
    let id = std::str::from_utf8(raw).map_err(|_| BadName::NotUtf8)?;
    if id.is_empty() {
        return Err(BadName::Empty);
    }
    Ok(id)
}

/// A provider name as found in a tenant's provider set: UTF-8, not empty, no `:` and no
/// control character.
pub fn provider_name(raw: &[u8]) -> Result<&str, BadName> {
    let name = std::str::from_utf8(raw).map_err(|_| BadName::NotUtf8)?;
    if name.is_empty() {
        return Err(BadName::Empty);
    }
    if name.contains(':') {
        return Err(BadName::Colon);
    }
    if name.chars().any(char::is_control) {
        return Err(BadName::Control);
    }
    Ok(name)
}

impl ProviderId {
    /// An id whose names passed [`tenant_id`] and [`provider_name`]: the only way discovery
    /// and the command line build one, so no key built from it is another record's.
    pub fn checked(tenant: &str, provider: &str) -> Result<ProviderId, BadName> {
        tenant_id(tenant.as_bytes())?;
        provider_name(provider.as_bytes())?;
        Ok(ProviderId::new(tenant, provider))
    }

    /// Builds an id without checking the names: for names already checked (or tests).
    pub fn new(tenant: impl Into<Arc<str>>, provider: impl Into<Arc<str>>) -> ProviderId {
        ProviderId {
            tenant: tenant.into(),
            provider: provider.into(),
        }
    }

    /// `tenant:{t}:provider:{p}`: the gateway's record.
    pub fn record_key(&self) -> String {
        format!("tenant:{}:provider:{}", self.tenant, self.provider)
    }

    /// `tenant:{t}:provider:{p}:health`: our health hash.
    pub fn health_key(&self) -> String {
        format!(
            "tenant:{}:provider:{}{HEALTH_SUFFIX}",
            self.tenant, self.provider
        )
    }

    /// The length of [`ProviderId::record_key`], without building it.
    pub fn record_key_len(&self) -> usize {
        "tenant::provider:".len() + self.tenant.len() + self.provider.len()
    }

    /// The length of [`ProviderId::health_key`], without building it.
    pub fn health_key_len(&self) -> usize {
        self.record_key_len() + HEALTH_SUFFIX.len()
    }

    /// `tenant:{t}:provider:{p}:lock`: the refresh lock.
    pub fn lock_key(&self) -> String {
        format!("tenant:{}:provider:{}:lock", self.tenant, self.provider)
    }

    /// `tenant:{t}:provider:{p}:inflight`: the reservation of a token call's answer.
    pub fn inflight_key(&self) -> String {
        format!("tenant:{}:provider:{}:inflight", self.tenant, self.provider)
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            escape_control(&self.tenant),
            escape_control(&self.provider)
        )
    }
}

impl fmt::Debug for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `tokenwarden:replica:{id}`: a live replica's heartbeat hash (SPEC 2).
pub fn replica_key(replica: &str) -> String {
    format!("{REPLICA_PREFIX}{replica}")
}

/// Prefix of the heartbeat keys (`SCAN MATCH tokenwarden:replica:*`).
pub const REPLICA_PREFIX: &str = "tokenwarden:replica:";

/// `tenant:{t}:providers`: the set of a tenant's provider names.
pub fn providers_set_key(tenant: &str) -> String {
    format!("tenant:{tenant}:providers")
}

/// `tenant:{t}:config`.
pub fn tenant_config_key(tenant: &str) -> String {
    format!("tenant:{tenant}:config")
}

/// `tenant:{t}:sync:{p}:{feature}`: one provider's synced records of one feature (SPEC 2).
/// `feature` is one of the catalog's feature names (never a value read from Redis).
pub fn sync_key(tenant: &str, provider: &str, feature: &str) -> String {
    format!("tenant:{tenant}:sync:{provider}:{feature}")
}

/// `{K}:staging`: where a replacement of `K` is assembled; `K` is its hash tag, so both
/// share a Redis Cluster slot and a `RENAME` between them is allowed.
pub fn staging_key(key: &str) -> String {
    format!("{{{key}}}:staging")
}

/// `tenant:{t}:directory:users`: the unified cross-provider directory (SPEC 2).
pub fn directory_key(tenant: &str) -> String {
    format!("tenant:{tenant}:directory:users")
}

/// `tenant:{t}:sync:lock`: the replica running this tenant's sync now (SPEC 2).
pub fn sync_lock_key(tenant: &str) -> String {
    format!("tenant:{tenant}:sync:lock")
}

/// `tenant:{t}:sync:last_slot`: the scheduled slot (Unix seconds) of the tenant's last
/// scheduled sync, so that replicas which all fire the same slot run it once (our addition).
pub fn sync_slot_key(tenant: &str) -> String {
    format!("tenant:{tenant}:sync:last_slot")
}

/// The tenant id of a `tenant:{t}:providers` key; ids may contain `:`.
pub fn tenant_of_providers_key(key: &str) -> Option<&str> {
    let id = key.strip_prefix("tenant:")?.strip_suffix(":providers")?;
    (!id.is_empty()).then_some(id)
}

/// The raw tenant part of a `tenant:{t}:providers` key as SCAN returns it (any bytes, maybe
/// empty); check it with [`tenant_id`].
pub fn tenant_part_of_providers_key(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(b"tenant:")?.strip_suffix(b":providers")
}

/// What a key under `tenant:` is, as far as the registry cares.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    ProvidersSet { tenant: &'a str },
    Record { tenant: &'a str, provider: &'a str },
}

/// Classifies a key seen in a keyspace notification.
pub fn classify(key: &str) -> Option<KeyKind<'_>> {
    if let Some(tenant) = tenant_of_providers_key(key) {
        return Some(KeyKind::ProvidersSet { tenant });
    }
    let rest = key.strip_prefix("tenant:")?;
    let at = rest.rfind(":provider:")?;
    let (tenant, provider) = (&rest[..at], &rest[at + ":provider:".len()..]);
    if tenant.is_empty() || provider.is_empty() || provider.contains(':') {
        return None;
    }
    Some(KeyKind::Record { tenant, provider })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_spec() {
        let id = ProviderId::new("cloudwarriors", "goto");
        assert_eq!(id.record_key(), "tenant:cloudwarriors:provider:goto");
        assert_eq!(id.health_key(), "tenant:cloudwarriors:provider:goto:health");
        assert_eq!(id.record_key_len(), id.record_key().len());
        assert_eq!(id.health_key_len(), id.health_key().len());
        assert_eq!(id.lock_key(), "tenant:cloudwarriors:provider:goto:lock");
        assert_eq!(providers_set_key("a:b"), "tenant:a:b:providers");
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(provider_name(b"goto"), Ok("goto"));
        assert_eq!(provider_name(b"goto:health"), Err(BadName::Colon));
        assert_eq!(provider_name(b"goto:lock"), Err(BadName::Colon));
        assert_eq!(provider_name(b""), Err(BadName::Empty));
        assert_eq!(provider_name(b"go\nto"), Err(BadName::Control));
        assert_eq!(provider_name(b"\xffgoto"), Err(BadName::NotUtf8));
        assert_eq!(tenant_id(b"a:b"), Ok("a:b"));
        assert_eq!(tenant_id(b"\xffbin"), Err(BadName::NotUtf8));
        assert_eq!(tenant_id(b""), Err(BadName::Empty));
        assert!(ProviderId::checked("acme", "goto:health").is_err());
        assert_eq!(
            tenant_part_of_providers_key(b"tenant:\xffbin:providers"),
            Some(&b"\xffbin"[..])
        );
        assert_eq!(ProviderId::new("a\nb", "goto").to_string(), "a\\nb/goto");
    }

    #[test]
    fn tenant_ids_may_contain_colons() {
        assert_eq!(tenant_of_providers_key("tenant:a:b:providers"), Some("a:b"));
        assert_eq!(tenant_of_providers_key("tenant::providers"), None);
        assert_eq!(tenant_of_providers_key("tenant:x:config"), None);
        assert_eq!(
            classify("tenant:a:b:provider:goto"),
            Some(KeyKind::Record {
                tenant: "a:b",
                provider: "goto"
            })
        );
        assert_eq!(
            classify("tenant:a:b:providers"),
            Some(KeyKind::ProvidersSet { tenant: "a:b" })
        );
        assert_eq!(classify("tenant:a:provider:goto:health"), None);
        assert_eq!(classify("tenant:a:provider:goto:lock"), None);
        assert_eq!(classify("tenant:a:config"), None);
    }
}
