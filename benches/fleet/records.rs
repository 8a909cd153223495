//! The fleet's records: groups of providers shaped like the gateway's (SPEC 1.3: four provider
//! types per tenant, a JWT-sized access token, optionally a health hash per record), seeded in
//! pipelines, and the matching clients of the token endpoint.

use anyhow::Result;
use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use serde_json::json;
use tokenwarden::keys::{self, ProviderId};
use tokenwarden::schedule::policy::{Lifetime, RefreshPolicy};
use tokenwarden::timestamp;

const PROVIDER_TYPES: [&str; 4] = ["goto", "teams", "ringcentral", "zoom"];

/// A set of providers: tenant `{prefix}{i/4}`, provider type `PROVIDER_TYPES[i % 4]`.
pub struct Group<'a> {
    pub prefix: &'a str,
    pub n: usize,
}

impl Group<'_> {
    pub fn tenant(&self, i: usize) -> String {
        format!("{}{:06}", self.prefix, i / 4)
    }

    pub fn provider(i: usize) -> &'static str {
        PROVIDER_TYPES[i % 4]
    }

    pub fn id(&self, i: usize) -> ProviderId {
        ProviderId::new(self.tenant(i), Self::provider(i))
    }

    pub fn client_id(&self, i: usize) -> String {
        format!("cid-{}-{i:07}", self.prefix)
    }

    pub fn secret(&self, i: usize) -> String {
        format!("sec-{}-{i:07}-Zk4qT9vB2mXw8RfL", self.prefix)
    }

    pub fn refresh_token(&self, gen: u32, i: usize) -> String {
        format!("rt-{}-{gen}-{i:07}-4f1c9a0e2b7d4e8a", self.prefix)
    }

    pub fn access_token(&self, gen: u32, i: usize, body: &str) -> String {
        format!("eyJhbGciOiJSUzI1NiJ9.{}{gen}{i:08}.{body}", self.prefix)
    }

    /// The endpoint's clients; with `access`, the records' access tokens are live too (for
    /// health probes).
    pub fn fake_clients(&self, gen: u32, access: bool) -> Vec<serde_json::Value> {
        let body = access_token_body();
        (0..self.n)
            .map(|i| {
                let mut c = json!({
                    "client_id": self.client_id(i),
                    "client_secret": self.secret(i),
                    "refresh_token": self.refresh_token(gen, i),
                });
                if access {
                    c["access_token"] = json!(self.access_token(gen, i, &body));
                }
                c
            })
            .collect()
    }
}

/// `datetime.isoformat()` of a naive UTC datetime, as the gateway writes `token_expiry`.
pub fn py_iso(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.6f").to_string()
}

/// A JWT-sized access token body (GoTo and Microsoft tokens are 1-2 KB).
fn access_token_body() -> String {
    let mut rng = fastrand::Rng::with_seed(7);
    let alphabet: Vec<char> = ('a'..='z')
        .chain('A'..='Z')
        .chain('0'..='9')
        .chain(['-', '_'])
        .collect();
    (0..880)
        .map(|_| alphabet[rng.usize(..alphabet.len())])
        .collect()
}

pub struct Seeding<'a> {
    pub group: &'a Group<'a>,
    pub gen: u32,
    /// The token endpoint's base URL: `/token`, and `/api/...` for the records' API.
    pub endpoint: &'a str,
    pub expiry: &'a dyn Fn(usize) -> String,
    /// Also write a health hash per record, as a running daemon leaves it.
    pub health: bool,
}

/// Writes tenant configs, provider sets and records (and health hashes) in pipelines of
/// 1000 records.
pub async fn seed(conn: &mut MultiplexedConnection, s: &Seeding<'_>) -> Result<()> {
    let g = s.group;
    let body = access_token_body();
    let stamp = "2025-01-15T10:30:00.123456";
    let mut rng = fastrand::Rng::with_seed(7);
    for start in (0..g.n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(g.n) {
            let tenant = g.tenant(i);
            let ptype = Group::provider(i);
            if i % 4 == 0 {
                pipe.cmd("HSET")
                    .arg(keys::tenant_config_key(&tenant))
                    .arg(&[
                        ("name", format!("Tenant {tenant}").as_str()),
                        ("primary_provider", "goto"),
                        ("sync_strategy", "primary"),
                        ("data_retention_days", "90"),
                        ("timezone", "America/New_York"),
                        ("created_at", stamp),
                        ("updated_at", stamp),
                    ])
                    .ignore();
            }
            let (api, scopes) = match ptype {
                "goto" => (
                    "voice-admin/v1",
                    r#"["voice-admin.v1.read", "identity:scim.org"]"#,
                ),
                "teams" => (
                    "",
                    r#"["https://graph.microsoft.com/.default", "offline_access"]"#,
                ),
                "ringcentral" => ("", r#"["ReadAccounts", "ReadCallLog", "CallControl"]"#),
                _ => ("v2", r#"["phone:read:admin", "user:read:admin"]"#),
            };
            let id = g.id(i);
            // The API (health probes) and the token endpoint are the local fake's.
            let api = format!("{}/api/{ptype}/{api}", s.endpoint)
                .trim_end_matches('/')
                .to_string();
            let mut fields: Vec<(&str, String)> = vec![
                ("provider_type", ptype.into()),
                ("status", "active".into()),
                ("auth_type", "oauth".into()),
                ("client_id", g.client_id(i)),
                ("client_secret", g.secret(i)),
                (
                    "account_key",
                    format!("{}", 4_266_846_632_996_939_781u64 + i as u64),
                ),
                ("access_token", g.access_token(s.gen, i, &body)),
                ("refresh_token", g.refresh_token(s.gen, i)),
                ("token_expiry", (s.expiry)(i)),
                ("scopes", scopes.into()),
                ("api_base_url", api),
                (
                    "features_enabled",
                    r#"["users", "extensions", "call_queues", "auto_attendants"]"#.into(),
                ),
                ("sync_enabled", "True".into()),
                ("created_at", stamp.into()),
                ("updated_at", stamp.into()),
                ("token_url", format!("{}/token", s.endpoint)),
            ];
            if ptype == "goto" {
                // The catalog probes GoTo at an absolute URL; point the probe at the fake.
                fields.push(("health_path", "/admin/rest/v1/me".into()));
            }
            pipe.cmd("HSET").arg(id.record_key()).arg(&fields).ignore();
            pipe.cmd("SADD")
                .arg(keys::providers_set_key(&tenant))
                .arg(ptype)
                .ignore();
            if s.health {
                let (token_expiry, next_refresh_at) = left_by_a_daemon(&(s.expiry)(i), &mut rng);
                pipe.cmd("HSET")
                    .arg(id.health_key())
                    .arg(&[
                        ("state", "healthy"),
                        ("reason", ""),
                        ("token_expiry", token_expiry.as_str()),
                        ("next_refresh_at", next_refresh_at.as_str()),
                        ("last_refresh_result", "success"),
                        ("consecutive_failures", "0"),
                        ("updated_at", "2026-01-01T00:00:00.000000+00:00"),
                    ])
                    .ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok(())
}

/// The `token_expiry` and `next_refresh_at` a running daemon leaves in the health hash of a
/// record with this `token_expiry`: its value in RFC 3339, and the default policy's plan made
/// now (empty for an expiry that does not parse: the health is then rewritten at start).
fn left_by_a_daemon(record_expiry: &str, rng: &mut fastrand::Rng) -> (String, String) {
    let Ok(expiry) = timestamp::parse(record_expiry) else {
        return (String::new(), String::new());
    };
    let now = Utc::now();
    let plan = RefreshPolicy::default().next_refresh(
        Lifetime {
            issued: now,
            expiry: expiry.at,
        },
        now,
        None,
        now,
        rng,
    );
    (timestamp::iso_utc(expiry.at), timestamp::iso_utc(plan))
}
