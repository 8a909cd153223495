//! Redis records as the gateway writes them: key names, provider records and tenant configs
//! to seed, and plain reads of what the daemon wrote back.

use std::collections::HashMap;

use super::provider::FakeProvider;

pub fn provider_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}")
}

pub fn health_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}:health")
}

/// Writes a provider record (`HSET tenant:{t}:provider:{p}`) and registers it
/// (`SADD tenant:{t}:providers p`). Fields as `&[("k", "v")]` or `&[(String, String)]`.
pub fn seed_provider<K: AsRef<str>, V: AsRef<str>>(
    conn: &mut redis::Connection,
    tenant: &str,
    provider: &str,
    fields: &[(K, V)],
) {
    let key = provider_key(tenant, provider);
    if !fields.is_empty() {
        let mut hset = redis::cmd("HSET");
        hset.arg(&key);
        for (k, v) in fields {
            hset.arg(k.as_ref()).arg(v.as_ref());
        }
        hset.query::<()>(conn)
            .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
    }
    redis::cmd("SADD")
        .arg(format!("tenant:{tenant}:providers"))
        .arg(provider)
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("SADD tenant:{tenant}:providers: {e}"));
}

/// Writes `tenant:{t}:config` as the gateway's migration writes it for CloudWarriors.
pub fn seed_tenant_config(conn: &mut redis::Connection, tenant: &str) {
    let key = format!("tenant:{tenant}:config");
    redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            ("name", "Cloud Warriors"),
            ("primary_provider", "goto"),
            ("sync_strategy", "primary"),
            ("data_retention_days", "90"),
            ("timezone", "America/New_York"),
            ("created_at", "2025-01-15T10:30:00.123456"),
            ("updated_at", "2025-01-15T10:30:00.123456"),
        ])
        .query::<()>(conn)
        .unwrap_or_else(|e| panic!("HSET {key}: {e}"));
}

/// A GoTo-shaped OAuth record (as the gateway's migration writes it) whose token endpoint and
/// API are `fake`'s; add or override fields before seeding.
pub fn oauth_record(
    fake: &FakeProvider,
    client_id: &str,
    client_secret: &str,
    refresh_token: &str,
    token_expiry: &str,
) -> Vec<(String, String)> {
    [
        ("provider_type", "goto"),
        ("status", "active"),
        ("auth_type", "oauth"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("account_key", "4266846632996939781"),
        ("access_token", "at-initial"),
        ("refresh_token", refresh_token),
        ("token_expiry", token_expiry),
        ("scopes", r#"["voice-admin.v1.read", "identity:scim.org"]"#),
        ("api_base_url", &fake.api_url()),
        (
            "features_enabled",
            r#"["users", "extensions", "call_queues", "auto_attendants"]"#,
        ),
        ("sync_enabled", "True"),
        ("created_at", "2025-01-15T10:30:00.123456"),
        ("updated_at", "2025-01-15T10:30:00.123456"),
        ("token_url", &fake.token_url()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

pub fn hgetall(conn: &mut redis::Connection, key: &str) -> HashMap<String, String> {
    redis::cmd("HGETALL")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("HGETALL {key}: {e}"))
}

pub fn hget(conn: &mut redis::Connection, key: &str, field: &str) -> Option<String> {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query(conn)
        .unwrap_or_else(|e| panic!("HGET {key} {field}: {e}"))
}

pub fn lock_key(tenant: &str, provider: &str) -> String {
    format!("tenant:{tenant}:provider:{provider}:lock")
}

/// The Redis type of `key` (`hash`, `set`, `string`, `none`, ...).
pub fn key_type(conn: &mut redis::Connection, key: &str) -> String {
    redis::cmd("TYPE")
        .arg(key)
        .query(conn)
        .unwrap_or_else(|e| panic!("TYPE {key}: {e}"))
}
