//! One provider record (`tenant:{t}:provider:{p}`, SPEC 1.3) and its validation.
//!
//! [`ProviderRecord::parse`] reads every value format of SPEC 1.4 and turns anything it cannot
//! serve into an [`InvalidRecord`] with a metric-safe reason label and a detail that never
//! contains a secret. Secrets are held in [`Secret`]s from here on.

use std::hash::Hasher;

use chrono::{DateTime, Utc};

use crate::catalog::{Catalog, Overrides, Probe, ResolveError, TokenEndpoint};
use crate::secret::Secret;
use crate::timestamp::{self, Timestamp};

/// The fields the light change scan reads (`HMGET`): a change in any of them means the
/// record must be read again in full.
pub const LIGHT_FIELDS: [&str; 13] = [
    "status",
    "provider_type",
    "client_id",
    "client_secret",
    "refresh_token",
    "token_expiry",
    "updated_at",
    // Credentials of the other grants: a re-authorised record changes one of them.
    "auth_type",
    "jwt_assertion",
    "personal_access_token",
    "certificate_thumbprint",
    "api_key",
    "client_secret_expires_at",
];

/// Credentials besides the client secret and refresh token (SPEC 1.3 optional fields).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// RingCentral JWT credential (the `jwt_bearer` grant's `assertion`).
    pub jwt_assertion: Secret,
    /// GoTo personal access token.
    pub personal_access_token: Secret,
    /// `auth_type=certificate`: the PEM private key that signs the client assertion.
    pub certificate_key: Secret,
    /// The certificate's SHA-1 thumbprint, 20 bytes (from the record's hex).
    pub certificate_thumbprint: Vec<u8>,
    /// `auth_type=api_key`: the key the probe carries.
    pub api_key: Secret,
}

/// When a credential a human must renew expires (`credential` label of the gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CredentialExpiry {
    pub credential: &'static str,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthType {
    OAuth,
    Certificate,
    ApiKey,
}

/// A parsed, servable record.
#[derive(Debug, Clone)]
pub struct ProviderRecord {
    pub provider_type: String,
    /// `status` as stored (for fingerprints); a valid record's is `active` in some case.
    pub status: String,
    pub auth_type: AuthType,
    pub client_id: String,
    pub client_secret: Secret,
    pub account_key: String,
    pub access_token: Secret,
    pub refresh_token: Secret,
    /// `None` when missing or empty: refresh now.
    pub token_expiry: Option<Timestamp>,
    /// Kept for its format when we write `updated_at`.
    pub updated_at: Option<Timestamp>,
    pub scopes: Vec<String>,
    pub api_base_url: String,
    pub features_enabled: Vec<String>,
    pub sync_enabled: bool,
    pub token_url: Option<String>,
    pub token_auth_method: Option<String>,
    pub grant_type: Option<String>,
    pub health_path: Option<String>,
    pub credentials: Credentials,
    /// From `client_secret_expires_at` and the `certificate_pem`'s notAfter.
    pub credential_expiry: Vec<CredentialExpiry>,
    /// Raw values of the light fields after `updated_at`, for [`Self::fingerprint_after_write`].
    light_extra: [Option<String>; 6],
    /// `access_token` is present but not UTF-8: health probes skip this record (it is still
    /// refreshed, which replaces the value).
    pub access_token_unreadable: bool,
    /// Fingerprint of [`LIGHT_FIELDS`]: what change detection compares.
    pub fingerprint: u64,
}

/// Why a record cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRecord {
    /// Label for `registry_invalid_records_total{reason}` and health `reason`.
    pub reason: &'static str,
    /// Human detail; names fields, never their secret values.
    pub detail: String,
}

impl InvalidRecord {
    pub fn new(reason: &'static str, detail: impl Into<String>) -> InvalidRecord {
        InvalidRecord {
            reason,
            detail: detail.into(),
        }
    }

    pub fn from_resolve(e: &ResolveError) -> InvalidRecord {
        InvalidRecord::new(e.reason(), e.to_string())
    }
}

impl std::fmt::Display for InvalidRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// What the registry knows of one record after reading it.
#[derive(Debug, Clone)]
pub enum RecordState {
    Valid(Box<ProviderRecord>),
    /// `status` is not `active`: tracked, never refreshed. Other fields are not checked.
    Inactive {
        provider_type: String,
        fingerprint: u64,
    },
    Invalid {
        error: InvalidRecord,
        fingerprint: u64,
    },
}

impl RecordState {
    pub fn fingerprint(&self) -> u64 {
        match self {
            RecordState::Valid(r) => r.fingerprint,
            RecordState::Inactive { fingerprint, .. }
            | RecordState::Invalid { fingerprint, .. } => *fingerprint,
        }
    }
}

/// Fingerprint of the light fields, in [`LIGHT_FIELDS`] order (missing = empty). Values are
/// hashed as bytes, so a value that is not UTF-8 has a stable fingerprint too.
pub fn fingerprint<'a, V: AsRef<[u8]> + ?Sized + 'a>(
    values: impl IntoIterator<Item = Option<&'a V>>,
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in values {
        h.write(v.map_or(&[][..], AsRef::as_ref));
        h.write_u8(0xff);
    }
    h.finish()
}

/// One field of a record as Redis gave it. Values are decoded only for the fields
/// tokenwarden uses, so a value that is not UTF-8 in a field it does not use (`created_at`,
/// an extra field) changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    Missing,
    Text(&'a str),
    /// Present, not UTF-8.
    NotUtf8(&'a [u8]),
}

impl<'a> Field<'a> {
    pub fn of_bytes(raw: Option<&'a [u8]>) -> Field<'a> {
        match raw {
            None => Field::Missing,
            Some(b) => match std::str::from_utf8(b) {
                Ok(s) => Field::Text(s),
                Err(_) => Field::NotUtf8(b),
            },
        }
    }

    fn bytes(self) -> Option<&'a [u8]> {
        match self {
            Field::Missing => None,
            Field::Text(s) => Some(s.as_bytes()),
            Field::NotUtf8(b) => Some(b),
        }
    }
}

fn non_empty(v: Option<&str>) -> Option<&str> {
    v.map(str::trim).filter(|s| !s.is_empty())
}

impl ProviderRecord {
    /// Parses the fields of an `HGETALL` answer. An empty answer is a missing record.
    pub fn parse(fields: &[(String, String)]) -> RecordState {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .map_or(Field::Missing, |(_, v)| Field::Text(v.as_str()))
        };
        Self::parse_with(!fields.is_empty(), get)
    }

    /// Parses a record whose fields `field` looks up by name; `present` is false when the
    /// record has no field at all. A used field that is not UTF-8 makes the record invalid
    /// (`bad_encoding`, naming the field), except `access_token` (see
    /// [`ProviderRecord::access_token_unreadable`]).
    pub fn parse_with<'a>(present: bool, field: impl Fn(&str) -> Field<'a>) -> RecordState {
        let fp = fingerprint(LIGHT_FIELDS.iter().map(|f| field(f).bytes()));
        let not_utf8 = |names: &[&'static str]| {
            names
                .iter()
                .copied()
                .find(|name| matches!(field(name), Field::NotUtf8(_)))
        };
        let get = |name: &str| match field(name) {
            Field::Text(s) => Some(s),
            Field::Missing | Field::NotUtf8(_) => None,
        };
        if !present {
            return RecordState::Invalid {
                error: InvalidRecord::new(
                    "missing_record",
                    "listed in tenant:{t}:providers but the record hash is missing or empty",
                ),
                fingerprint: fp,
            };
        }
        let invalid = |reason: &'static str, detail: String| RecordState::Invalid {
            error: InvalidRecord::new(reason, detail),
            fingerprint: fp,
        };
        // These two first: an inactive record is not validated further.
        if let Some(name) = not_utf8(&["provider_type", "status"]) {
            return invalid("bad_encoding", format!("{name} is not UTF-8 text"));
        }
        let provider_type = match non_empty(get("provider_type")) {
            Some(t) => t.to_string(),
            None => return invalid("missing_field", "provider_type is missing".into()),
        };
        match non_empty(get("status"))
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("active") => {}
            Some("inactive") | Some("disabled") => {
                return RecordState::Inactive {
                    provider_type,
                    fingerprint: fp,
                }
            }
            Some(_) => {
                return invalid("bad_status", "status is neither active nor inactive".into())
            }
            None => return invalid("missing_field", "status is missing".into()),
        }
        if let Some(name) = not_utf8(super::RECORD_FIELDS) {
            return invalid("bad_encoding", format!("{name} is not UTF-8 text"));
        }
        let auth_type = match non_empty(get("auth_type"))
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("oauth") | Some("oauth2") => AuthType::OAuth,
            Some("certificate") => AuthType::Certificate,
            Some("api_key") => AuthType::ApiKey,
            Some(_) => {
                return invalid(
                    "bad_auth_type",
                    "auth_type is not oauth, certificate or api_key".into(),
                )
            }
        };
        let client_id = match non_empty(get("client_id")) {
            Some(c) => c.to_string(),
            None if auth_type == AuthType::ApiKey => String::new(),
            None => return invalid("missing_field", "client_id is missing".into()),
        };
        let token_expiry = match non_empty(get("token_expiry")) {
            None => None,
            Some(v) => match timestamp::parse(v) {
                Ok(t) => Some(t),
                Err(e) => return invalid("bad_token_expiry", format!("token_expiry: {e}")),
            },
        };
        let updated_at = non_empty(get("updated_at")).and_then(|v| timestamp::parse(v).ok());
        let scopes = match non_empty(get("scopes")) {
            None => Vec::new(),
            Some(v) => match timestamp::parse_string_array(v) {
                Ok(s) => s,
                Err(_) => {
                    return invalid("bad_scopes", "scopes is not a JSON array of strings".into())
                }
            },
        };
        let features_enabled = match non_empty(get("features_enabled")) {
            None => Vec::new(),
            Some(v) => match timestamp::parse_string_array(v) {
                Ok(s) => s,
                Err(_) => {
                    return invalid(
                        "bad_features_enabled",
                        "features_enabled is not a JSON array of strings".into(),
                    )
                }
            },
        };
        let sync_enabled = match non_empty(get("sync_enabled")) {
            None => false,
            Some(v) => match timestamp::parse_bool(v) {
                Some(b) => b,
                None => return invalid("bad_boolean", "sync_enabled is not a boolean".into()),
            },
        };
        let owned = |name: &str| non_empty(get(name)).map(str::to_string);
        let secret = |name: &str| Secret::new(non_empty(get(name)).unwrap_or(""));
        let mut credentials = Credentials {
            jwt_assertion: secret("jwt_assertion"),
            personal_access_token: secret("personal_access_token"),
            certificate_key: secret("certificate_key"),
            certificate_thumbprint: Vec::new(),
            api_key: secret("api_key"),
        };
        match auth_type {
            AuthType::Certificate => {
                if credentials.certificate_key.is_empty() {
                    return invalid(
                        "missing_field",
                        "auth_type certificate needs certificate_key".into(),
                    );
                }
                if jsonwebtoken::EncodingKey::from_rsa_pem(
                    credentials.certificate_key.expose().as_bytes(),
                )
                .is_err()
                {
                    return invalid(
                        "bad_certificate_key",
                        "certificate_key is not a PEM RSA private key".into(),
                    );
                }
                match non_empty(get("certificate_thumbprint")).map(hex_bytes) {
                    Some(Some(t)) if t.len() == 20 => credentials.certificate_thumbprint = t,
                    Some(_) => {
                        return invalid(
                            "bad_certificate_thumbprint",
                            "certificate_thumbprint is not 40 hex digits (a SHA-1 thumbprint)"
                                .into(),
                        )
                    }
                    None => {
                        return invalid(
                            "missing_field",
                            "auth_type certificate needs certificate_thumbprint".into(),
                        )
                    }
                }
            }
            AuthType::ApiKey if credentials.api_key.is_empty() => {
                return invalid("missing_field", "auth_type api_key needs api_key".into())
            }
            _ => {}
        }
        // Informational: an unreadable value gives no gauge, and never stops refreshes.
        let mut credential_expiry = Vec::new();
        if let Some(at) =
            non_empty(get("client_secret_expires_at")).and_then(|v| timestamp::parse(v).ok())
        {
            credential_expiry.push(CredentialExpiry {
                credential: "client_secret",
                at: at.at,
            });
        }
        if let Some(at) = non_empty(get("certificate_pem")).and_then(certificate_not_after) {
            credential_expiry.push(CredentialExpiry {
                credential: "certificate",
                at,
            });
        }
        RecordState::Valid(Box::new(ProviderRecord {
            provider_type,
            status: get("status").unwrap_or("").to_string(),
            auth_type,
            client_id,
            client_secret: Secret::new(get("client_secret").unwrap_or("")),
            account_key: get("account_key").unwrap_or("").trim().to_string(),
            access_token: Secret::new(get("access_token").unwrap_or("")),
            refresh_token: Secret::new(get("refresh_token").unwrap_or("")),
            token_expiry,
            updated_at,
            scopes,
            api_base_url: get("api_base_url").unwrap_or("").trim().to_string(),
            features_enabled,
            sync_enabled,
            token_url: owned("token_url"),
            token_auth_method: owned("token_auth_method"),
            grant_type: owned("grant_type"),
            health_path: owned("health_path"),
            credentials,
            credential_expiry,
            light_extra: [
                "auth_type",
                "jwt_assertion",
                "personal_access_token",
                "certificate_thumbprint",
                "api_key",
                "client_secret_expires_at",
            ]
            .map(|f| get(f).map(str::to_string)),
            access_token_unreadable: matches!(field("access_token"), Field::NotUtf8(_)),
            fingerprint: fp,
        }))
    }

    pub fn overrides(&self) -> Overrides<'_> {
        Overrides {
            token_url: self.token_url.as_deref(),
            token_auth_method: self.token_auth_method.as_deref(),
            grant_type: self.grant_type.as_deref(),
            health_path: self.health_path.as_deref(),
            account_key: &self.account_key,
            api_base_url: &self.api_base_url,
            client_id: &self.client_id,
            has_refresh_token: !self.refresh_token.is_empty(),
            has_jwt_assertion: !self.credentials.jwt_assertion.is_empty(),
            has_personal_access_token: !self.credentials.personal_access_token.is_empty(),
            certificate: self.auth_type == AuthType::Certificate,
        }
    }

    /// `auth_type=api_key`: nothing to refresh, the record is only probed.
    pub fn probe_only(&self) -> bool {
        self.auth_type == AuthType::ApiKey
    }

    /// The token endpoint for this record, or why it cannot be refreshed. A probe-only
    /// record (`api_key`) has none; it is still checked against the catalog.
    pub fn endpoint(&self, catalog: &Catalog) -> Result<TokenEndpoint, InvalidRecord> {
        if self.probe_only() {
            return match catalog.get(&self.provider_type) {
                None => Err(InvalidRecord::from_resolve(
                    &ResolveError::UnknownProviderType,
                )),
                Some(_) => Err(InvalidRecord::new(
                    "probe_only",
                    "auth_type api_key has no token to refresh",
                )),
            };
        }
        catalog
            .resolve(&self.provider_type, &self.overrides())
            .map_err(|e| InvalidRecord::from_resolve(&e))
    }

    /// The endpoint of the one attempt with the fallback grant (a refused refresh token).
    pub fn fallback_endpoint(&self, catalog: &Catalog) -> Result<TokenEndpoint, InvalidRecord> {
        catalog
            .resolve_fallback(&self.provider_type, &self.overrides())
            .map_err(|e| InvalidRecord::from_resolve(&e))
    }

    /// Can this record be served at all: a token endpoint, or a probe-only catalog entry.
    pub fn servable(&self, catalog: &Catalog) -> Result<(), InvalidRecord> {
        match self.endpoint(catalog) {
            Ok(_) => Ok(()),
            Err(e) if e.reason == "probe_only" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The health probe of this record, if the catalog or the record gives one.
    pub fn probe(&self, catalog: &Catalog) -> Option<Probe> {
        catalog.probe(&self.provider_type, &self.overrides())
    }

    /// Fingerprint of this record once `written` light fields replaced the old ones.
    pub fn fingerprint_after_write(
        &self,
        refresh_token: &str,
        token_expiry: &str,
        updated_at: &str,
    ) -> u64 {
        let status = "active";
        let [auth_type, jwt, pat, thumb, key, secret_exp] = &self.light_extra;
        fingerprint([
            Some(status),
            Some(self.provider_type.as_str()),
            Some(self.client_id.as_str()),
            Some(self.client_secret.expose()),
            Some(refresh_token),
            Some(token_expiry),
            Some(updated_at),
            auth_type.as_deref(),
            jwt.as_deref(),
            pat.as_deref(),
            thumb.as_deref(),
            key.as_deref(),
            secret_exp.as_deref(),
        ])
    }
}

/// Bytes of a hex string (`:` and spaces allowed between pairs, as some tools print them).
fn hex_bytes(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !matches!(b, b':' | b' ')).collect();
    if digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks(2)
        .map(|pair| {
            let text = std::str::from_utf8(pair).ok()?;
            u8::from_str_radix(text, 16).ok()
        })
        .collect()
}

/// The notAfter of a PEM X.509 certificate.
pub fn certificate_not_after(pem: &str) -> Option<DateTime<Utc>> {
    use x509_cert::der::DecodePem;
    let cert = x509_cert::Certificate::from_pem(pem.trim().as_bytes()).ok()?;
    let not_after = cert.tbs_certificate.validity.not_after.to_unix_duration();
    let secs = i64::try_from(not_after.as_secs()).ok()?;
    DateTime::from_timestamp(secs, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn seed_like() -> Vec<(&'static str, &'static str)> {
        vec![
            ("provider_type", "goto"),
            ("status", "active"),
            ("auth_type", "oauth"),
            ("client_id", "cid"),
            ("client_secret", "s3cret"),
            ("account_key", "4266846632996939781"),
            ("access_token", "at"),
            ("refresh_token", "rt"),
            ("token_expiry", "2026-11-28T04:20:00"),
            ("scopes", "[\"voice-admin.v1.read\", \"identity:scim.org\"]"),
            ("api_base_url", "https://api.jive.com/voice-admin/v1"),
            ("features_enabled", "[\"users\", \"extensions\"]"),
            ("sync_enabled", "True"),
        ]
    }

    fn with(change: (&'static str, &'static str)) -> Vec<(String, String)> {
        let mut f = seed_like();
        f.retain(|(k, _)| *k != change.0);
        if !change.1.is_empty() || change.0 == "token_expiry" {
            f.push(change);
        }
        fields(&f)
    }

    #[test]
    fn parses_a_seed_record() {
        let RecordState::Valid(r) = ProviderRecord::parse(&fields(&seed_like())) else {
            panic!("valid");
        };
        assert_eq!(r.provider_type, "goto");
        assert_eq!(r.scopes, vec!["voice-admin.v1.read", "identity:scim.org"]);
        assert!(r.sync_enabled);
        assert!(r.token_expiry.is_some());
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn every_malformed_kind_has_a_reason() {
        let cases: &[((&str, &str), &str)] = &[
            (("client_id", ""), "missing_field"),
            (("provider_type", ""), "missing_field"),
            (("status", "maybe"), "bad_status"),
            (("token_expiry", "next tuesday"), "bad_token_expiry"),
            (("scopes", "voice-admin.v1.read"), "bad_scopes"),
            (("features_enabled", "{\"a\":1}"), "bad_features_enabled"),
            (("sync_enabled", "perhaps"), "bad_boolean"),
            (("auth_type", "kerberos"), "bad_auth_type"),
        ];
        for (change, reason) in cases {
            match ProviderRecord::parse(&with(*change)) {
                RecordState::Invalid { error, .. } => {
                    assert_eq!(error.reason, *reason, "{change:?}");
                    assert!(!error.detail.contains("s3cret"));
                }
                other => panic!("{change:?} gave {other:?}"),
            }
        }
        assert!(matches!(
            ProviderRecord::parse(&[]),
            RecordState::Invalid { error, .. } if error.reason == "missing_record"
        ));
    }

    #[test]
    fn empty_expiry_means_refresh_now_and_inactive_is_not_validated() {
        let RecordState::Valid(r) = ProviderRecord::parse(&with(("token_expiry", ""))) else {
            panic!("valid");
        };
        assert!(r.token_expiry.is_none());
        let mut f = fields(&[("provider_type", "goto"), ("status", "inactive")]);
        f.push(("scopes".into(), "not json".into()));
        assert!(matches!(
            ProviderRecord::parse(&f),
            RecordState::Inactive { .. }
        ));
    }

    #[test]
    fn unknown_provider_type_is_caught_by_the_catalog() {
        let catalog = Catalog::builtin().expect("catalog");
        let RecordState::Valid(r) = ProviderRecord::parse(&with(("provider_type", "myspace")))
        else {
            panic!("parses");
        };
        assert_eq!(
            r.endpoint(&catalog).expect_err("unknown").reason,
            "unknown_provider_type"
        );
    }

    #[test]
    fn fingerprint_after_write_matches_a_reread() {
        let RecordState::Valid(r) = ProviderRecord::parse(&fields(&seed_like())) else {
            panic!("valid");
        };
        let mut after = seed_like();
        after.retain(|(k, _)| !matches!(*k, "refresh_token" | "token_expiry" | "updated_at"));
        after.extend([
            ("refresh_token", "rt2"),
            ("token_expiry", "2026-11-28T05:20:00"),
            ("updated_at", "2026-11-28T04:00:00"),
        ]);
        let reread = ProviderRecord::parse(&fields(&after));
        assert_eq!(
            r.fingerprint_after_write("rt2", "2026-11-28T05:20:00", "2026-11-28T04:00:00"),
            reread.fingerprint()
        );
    }
}
