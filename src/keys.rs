//! Redis key names (SPEC 1 and 2) and the identity of a tracked provider.
//!
//! Every key tokenwarden reads or writes is built here, so the contract has one home.

use std::fmt;
use std::sync::Arc;

/// `SCAN MATCH` pattern that finds tenants (SPEC 1.2).
pub const PROVIDERS_PATTERN: &str = "tenant:*:providers";
/// The event stream (SPEC 2).
pub const EVENTS_STREAM: &str = "tokenwarden:events";

/// One provider of one tenant: the unit tokenwarden tracks, refreshes and reports on.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProviderId {
    pub tenant: Arc<str>,
    pub provider: Arc<str>,
}

impl ProviderId {
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
        format!("tenant:{}:provider:{}:health", self.tenant, self.provider)
    }

    /// `tenant:{t}:provider:{p}:lock`: the refresh lock.
    pub fn lock_key(&self) -> String {
        format!("tenant:{}:provider:{}:lock", self.tenant, self.provider)
    }
}

impl fmt::Display for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tenant, self.provider)
    }
}

impl fmt::Debug for ProviderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `tenant:{t}:providers`: the set of a tenant's provider names.
pub fn providers_set_key(tenant: &str) -> String {
    format!("tenant:{tenant}:providers")
}

/// `tenant:{t}:config`.
pub fn tenant_config_key(tenant: &str) -> String {
    format!("tenant:{tenant}:config")
}

/// The tenant id of a `tenant:{t}:providers` key; ids may contain `:`.
pub fn tenant_of_providers_key(key: &str) -> Option<&str> {
    let id = key.strip_prefix("tenant:")?.strip_suffix(":providers")?;
    (!id.is_empty()).then_some(id)
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
        assert_eq!(id.lock_key(), "tenant:cloudwarriors:provider:goto:lock");
        assert_eq!(providers_set_key("a:b"), "tenant:a:b:providers");
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
