//! The provider catalog: per `provider_type`, how to obtain a token and how to probe it.
//!
//! Loaded from `config/providers.toml` (compiled in as the built-in catalog) or from the file
//! named by `refresh.catalog_file`. [`Catalog::resolve`] applies SPEC 1.3's order (a record
//! field, else the catalog entry of its `provider_type`, else `[defaults]`) and yields the
//! [`TokenEndpoint`] a refresh uses; [`Catalog::probe`] the health probe of a record. Grants
//! and client authentications are named here ([`Grant`], [`AuthMethod`]); what each sends is
//! in `refresh::grant` and `refresh::auth`, one small file each. The `sync` sub-table of an
//! entry belongs to the directory sync and is not read here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The built-in catalog.
pub const BUILTIN_TOML: &str = include_str!("../config/providers.toml");

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// HTTP Basic with client id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
    /// `client_assertion`: a JWT signed with the record's certificate key (RFC 7523 2.2).
    PrivateKeyJwt,
}

impl AuthMethod {
    pub fn parse(s: &str) -> Option<AuthMethod> {
        match s.trim().to_ascii_lowercase().as_str() {
            "basic" | "client_secret_basic" => Some(AuthMethod::Basic),
            "body" | "post" | "client_secret_post" => Some(AuthMethod::Body),
            "private_key_jwt" => Some(AuthMethod::PrivateKeyJwt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Basic => "basic",
            AuthMethod::Body => "body",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

/// OAuth grants tokenwarden can perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Grant {
    RefreshToken,
    ClientCredentials,
    /// Zoom Server-to-Server: `grant_type=account_credentials&account_id=...`.
    AccountCredentials,
    /// RFC 7523 `urn:ietf:params:oauth:grant-type:jwt-bearer` with the record's
    /// `jwt_assertion` (RingCentral JWT credential).
    JwtBearer,
    /// GoTo `grant_type=personal_access_token&pat=...`.
    PersonalAccessToken,
}

/// What a grant needs from the record besides the client credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    RefreshToken,
    JwtAssertion,
    PersonalAccessToken,
}

impl Grant {
    pub const ALL: [Grant; 5] = [
        Grant::RefreshToken,
        Grant::ClientCredentials,
        Grant::AccountCredentials,
        Grant::JwtBearer,
        Grant::PersonalAccessToken,
    ];

    pub fn parse(s: &str) -> Option<Grant> {
        let s = s.trim();
        if s == "urn:ietf:params:oauth:grant-type:jwt-bearer" {
            return Some(Grant::JwtBearer);
        }
        Grant::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// The catalog's name of the grant.
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::AccountCredentials => "account_credentials",
            Grant::JwtBearer => "jwt_bearer",
            Grant::PersonalAccessToken => "personal_access_token",
        }
    }

    /// The record credential the grant sends.
    pub fn needs(self) -> Needs {
        match self {
            Grant::RefreshToken => Needs::RefreshToken,
            Grant::JwtBearer => Needs::JwtAssertion,
            Grant::PersonalAccessToken => Needs::PersonalAccessToken,
            Grant::ClientCredentials | Grant::AccountCredentials => Needs::Nothing,
        }
    }

    /// Grants whose answer is a fresh token obtained without a refresh token.
    pub fn is_app_grant(self) -> bool {
        !matches!(self, Grant::RefreshToken)
    }
}

/// The `scope` setting of an entry: one template for every grant, or one per grant name.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ScopeSetting {
    All(String),
    PerGrant(BTreeMap<String, String>),
}

/// A request budget as the catalog writes it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetEntry {
    /// `record`, `client_id` or `account_key`: what the provider counts requests by.
    pub scope: String,
    pub requests: u32,
    pub per_secs: u64,
}

/// One catalog entry; every field optional so that `[defaults]` can fill it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub token_url: Option<String>,
    pub token_auth_method: Option<String>,
    pub grant_type: Option<String>,
    pub app_grant_type: Option<String>,
    /// A refresh token the provider refuses for good is followed by one attempt with the
    /// app grant, when the record holds its credential (RingCentral JWT).
    pub fallback_to_app_grant: Option<bool>,
    pub scope: Option<ScopeSetting>,
    pub default_expires_in_secs: Option<u64>,
    pub rotates_refresh_token: Option<bool>,
    pub max_refresh_interval_secs: Option<u64>,
    pub health_path: Option<String>,
    pub health_url: Option<String>,
    pub health_method: Option<String>,
    pub health_expect_status: Option<u16>,
    pub api_key_header: Option<String>,
    pub api_key_query: Option<String>,
    pub token_budget: Option<BudgetEntry>,
    pub api_budget: Option<BudgetEntry>,
    /// The provider type's sync endpoints, parsed by `sync::endpoints` (passed through here).
    #[serde(default)]
    pub sync: Option<toml::Table>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    #[serde(default)]
    defaults: Entry,
    #[serde(default)]
    providers: BTreeMap<String, Entry>,
}

/// The loaded catalog.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Catalog {
    defaults: Entry,
    providers: BTreeMap<String, Entry>,
}

/// Record fields that override the catalog (SPEC 1.3 optional fields), and what the record
/// holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides<'a> {
    pub token_url: Option<&'a str>,
    pub token_auth_method: Option<&'a str>,
    pub grant_type: Option<&'a str>,
    pub health_path: Option<&'a str>,
    pub account_key: &'a str,
    pub api_base_url: &'a str,
    pub client_id: &'a str,
    pub has_refresh_token: bool,
    pub has_jwt_assertion: bool,
    pub has_personal_access_token: bool,
    /// `auth_type=certificate`: the client authenticates with a signed assertion.
    pub certificate: bool,
}

impl Overrides<'_> {
    fn has(&self, needs: Needs) -> bool {
        match needs {
            Needs::Nothing => true,
            Needs::RefreshToken => self.has_refresh_token,
            Needs::JwtAssertion => self.has_jwt_assertion,
            Needs::PersonalAccessToken => self.has_personal_access_token,
        }
    }
}

/// What the token budget of a provider counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetScope {
    Record,
    ClientId,
    AccountKey,
}

impl BudgetScope {
    fn parse(s: &str) -> Option<BudgetScope> {
        match s.trim() {
            "record" => Some(BudgetScope::Record),
            "client_id" => Some(BudgetScope::ClientId),
            "account_key" => Some(BudgetScope::AccountKey),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::Record => "record",
            BudgetScope::ClientId => "client_id",
            BudgetScope::AccountKey => "account_key",
        }
    }
}

/// A resolved request budget: at most `requests` per `per`, counted by `scope`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub scope: BudgetScope,
    pub requests: u32,
    pub per: Duration,
}

/// Everything a token call needs besides the credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEndpoint {
    pub token_url: String,
    pub auth: AuthMethod,
    pub grant: Grant,
    /// The scope template of this grant (`{scopes}` = the record's scopes); empty: none sent.
    pub scope: String,
    pub default_expires_in: Duration,
    /// The provider may replace the refresh token (and the old one may die): reserve it and
    /// journal the answer.
    pub rotates: bool,
    /// The grant to try once when this one's refresh token is refused for good.
    pub fallback: Option<Grant>,
    pub budget: Option<Budget>,
    pub max_refresh_interval: Option<Duration>,
}

/// A resolved health probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub method: http::Method,
    pub url: String,
    pub expect_status: u16,
    /// How the probe authenticates.
    pub auth: ProbeAuth,
    pub budget: Option<Budget>,
}

/// The credential a probe carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAuth {
    /// `Authorization: Bearer <access_token>`.
    Bearer,
    /// The record's `api_key` in this header.
    ApiKeyHeader(String),
    /// The record's `api_key` in this query parameter.
    ApiKeyQuery(String),
}

/// Why a record cannot be served with this catalog (becomes `invalid_record`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("unknown provider_type")]
    UnknownProviderType,
    #[error("no token_url for this provider")]
    NoTokenUrl,
    #[error("token_url is not an http(s) URL")]
    BadTokenUrl,
    #[error("unsupported token_auth_method")]
    BadAuthMethod,
    #[error("unsupported grant_type")]
    BadGrant,
    #[error("no refresh_token, and no app grant (or its credential) for this provider")]
    NoGrant,
    #[error("the grant {0} needs a record field that is empty")]
    MissingCredential(&'static str),
}

impl ResolveError {
    /// Label for `registry_invalid_records_total{reason}` and the health `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            ResolveError::UnknownProviderType => "unknown_provider_type",
            ResolveError::NoTokenUrl | ResolveError::BadTokenUrl => "bad_token_url",
            ResolveError::BadAuthMethod => "bad_token_auth_method",
            ResolveError::BadGrant => "unsupported_grant_type",
            ResolveError::NoGrant => "missing_refresh_token",
            ResolveError::MissingCredential(_) => "missing_credential",
        }
    }
}

fn non_blank(s: Option<&String>) -> Option<&String> {
    s.filter(|s| !s.trim().is_empty())
}

impl Catalog {
    pub fn builtin() -> Result<Catalog, CatalogError> {
        Self::parse(BUILTIN_TOML, "<built-in catalog>")
    }

    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a catalog; errors name the entry and the field.
    pub fn parse(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let invalid = |message: String| CatalogError::Invalid {
            path: origin.to_string(),
            message,
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.message().into()))?;
        let file: CatalogFile = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e: serde_path_to_error::Error<toml::de::Error>| {
                invalid(format!("{}: {}", e.path(), e.inner().message()))
            })?;
        let catalog = Catalog {
            defaults: file.defaults,
            providers: file.providers,
        };
        for (name, entry) in &catalog.providers {
            catalog
                .validate(entry)
                .map_err(|(field, why)| invalid(format!("providers.{name}.{field}: {why}")))?;
            // Every entry must resolve on its own (with a placeholder record).
            for has_rt in [true, false] {
                let o = Overrides {
                    account_key: "x",
                    client_id: "x",
                    api_base_url: "https://example.invalid",
                    has_refresh_token: has_rt,
                    has_jwt_assertion: true,
                    has_personal_access_token: true,
                    ..Overrides::default()
                };
                match catalog.resolve(name, &o) {
                    Ok(_) | Err(ResolveError::NoGrant) => {}
                    // An entry without a token URL: every record brings its own.
                    Err(ResolveError::NoTokenUrl)
                        if non_blank(entry.token_url.as_ref()).is_none() => {}
                    Err(e) => {
                        let field = match e {
                            ResolveError::NoTokenUrl | ResolveError::BadTokenUrl => "token_url",
                            ResolveError::BadAuthMethod => "token_auth_method",
                            _ => "grant_type",
                        };
                        return Err(invalid(format!("providers.{name}.{field}: {e}")));
                    }
                }
            }
        }
        Ok(catalog)
    }

    /// Field checks resolution alone would not make: the field name and why.
    fn validate(&self, entry: &Entry) -> Result<(), (&'static str, String)> {
        let pick = |f: fn(&Entry) -> Option<&String>| {
            non_blank(f(entry)).or_else(|| non_blank(f(&self.defaults)))
        };
        for (field, value) in [
            ("grant_type", pick(|e| e.grant_type.as_ref())),
            ("app_grant_type", pick(|e| e.app_grant_type.as_ref())),
        ] {
            if let Some(g) = value {
                if Grant::parse(g).is_none() {
                    return Err((field, format!("unknown grant {g:?}")));
                }
            }
        }
        if let Some(a) = pick(|e| e.token_auth_method.as_ref()) {
            if AuthMethod::parse(a).is_none() {
                return Err(("token_auth_method", format!("unknown method {a:?}")));
            }
        }
        if let Some(ScopeSetting::PerGrant(m)) = &entry.scope {
            if let Some(k) = m.keys().find(|k| Grant::parse(k).is_none()) {
                return Err(("scope", format!("{k:?} is not a grant name")));
            }
        }
        if entry.default_expires_in_secs == Some(0) {
            return Err(("default_expires_in_secs", "must be positive".into()));
        }
        if entry.max_refresh_interval_secs == Some(0) {
            return Err(("max_refresh_interval_secs", "must be positive".into()));
        }
        if let Some(m) = pick(|e| e.health_method.as_ref()) {
            if m.parse::<http::Method>().is_err() {
                return Err(("health_method", format!("{m:?} is not an HTTP method")));
            }
        }
        if let Some(s) = entry.health_expect_status {
            if !(100..=599).contains(&s) {
                return Err(("health_expect_status", "not an HTTP status".into()));
            }
        }
        if let Some(u) = non_blank(entry.health_url.as_ref()) {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(("health_url", "not an http(s) URL".into()));
            }
        }
        for (field, b) in [
            ("token_budget", &entry.token_budget),
            ("api_budget", &entry.api_budget),
        ] {
            if let Some(b) = b {
                if BudgetScope::parse(&b.scope).is_none() {
                    return Err((
                        field,
                        format!(
                            "scope {:?} is not record, client_id or account_key",
                            b.scope
                        ),
                    ));
                }
                if b.requests == 0 || b.per_secs == 0 {
                    return Err((field, "requests and per_secs must be positive".into()));
                }
                if b.per_secs > 86_400 * 31 {
                    return Err((field, "per_secs above 31 days".into()));
                }
            }
        }
        Ok(())
    }

    pub fn get(&self, provider_type: &str) -> Option<&Entry> {
        self.providers.get(provider_type)
    }

    pub fn provider_types(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    fn budget_of(b: Option<&BudgetEntry>) -> Option<Budget> {
        let b = b?;
        Some(Budget {
            scope: BudgetScope::parse(&b.scope)?,
            requests: b.requests.max(1),
            per: Duration::from_secs(b.per_secs.max(1)),
        })
    }

    /// Resolves the token endpoint for a record of `provider_type` with its overrides.
    pub fn resolve(
        &self,
        provider_type: &str,
        o: &Overrides<'_>,
    ) -> Result<TokenEndpoint, ResolveError> {
        self.resolve_with(provider_type, o, false)
    }

    /// As [`Catalog::resolve`], for the one attempt with the fallback grant after the
    /// refresh token was refused.
    pub fn resolve_fallback(
        &self,
        provider_type: &str,
        o: &Overrides<'_>,
    ) -> Result<TokenEndpoint, ResolveError> {
        self.resolve_with(provider_type, o, true)
    }

    fn resolve_with<'a>(
        &'a self,
        provider_type: &str,
        o: &Overrides<'a>,
        fallback: bool,
    ) -> Result<TokenEndpoint, ResolveError> {
        let entry = self
            .providers
            .get(provider_type)
            .ok_or(ResolveError::UnknownProviderType)?;
        // Borrowed: a registry read resolves every record, so nothing is copied but what
        // the endpoint keeps.
        let pick = |record: Option<&'a str>, f: fn(&Entry) -> Option<&String>| -> Option<&'a str> {
            record
                .filter(|s| !s.trim().is_empty())
                .or_else(|| non_blank(f(entry)).map(String::as_str))
                .or_else(|| non_blank(f(&self.defaults)).map(String::as_str))
        };
        let template =
            pick(o.token_url, |e| e.token_url.as_ref()).ok_or(ResolveError::NoTokenUrl)?;
        let token_url = expand(template, o);
        if !(token_url.starts_with("https://") || token_url.starts_with("http://")) {
            return Err(ResolveError::BadTokenUrl);
        }
        let auth = if o.certificate {
            AuthMethod::PrivateKeyJwt
        } else {
            match pick(o.token_auth_method, |e| e.token_auth_method.as_ref()) {
                Some(s) => AuthMethod::parse(s).ok_or(ResolveError::BadAuthMethod)?,
                None => AuthMethod::Basic,
            }
        };
        let app_grant = pick(None, |e| e.app_grant_type.as_ref())
            .map(|g| Grant::parse(g).ok_or(ResolveError::BadGrant))
            .transpose()?;
        let fallback_grant = app_grant
            .filter(|_| {
                entry
                    .fallback_to_app_grant
                    .or(self.defaults.fallback_to_app_grant)
                    .unwrap_or(false)
            })
            .filter(|g| g.needs() != Needs::RefreshToken && o.has(g.needs()));
        let grant = if fallback {
            fallback_grant.ok_or(ResolveError::NoGrant)?
        } else if let Some(g) = o.grant_type.filter(|s| !s.trim().is_empty()) {
            Grant::parse(g).ok_or(ResolveError::BadGrant)?
        } else if o.has_refresh_token {
            match pick(None, |e| e.grant_type.as_ref()) {
                Some(g) => Grant::parse(g).ok_or(ResolveError::BadGrant)?,
                None => Grant::RefreshToken,
            }
        } else {
            match app_grant {
                Some(g) if o.has(g.needs()) => g,
                _ => return Err(ResolveError::NoGrant),
            }
        };
        if !o.has(grant.needs()) {
            return Err(match grant.needs() {
                Needs::RefreshToken => ResolveError::NoGrant,
                Needs::JwtAssertion => ResolveError::MissingCredential("jwt_assertion"),
                _ => ResolveError::MissingCredential("personal_access_token"),
            });
        }
        let scope_of = |e: &'a Entry| match &e.scope {
            Some(ScopeSetting::All(s)) if grant.is_app_grant() => Some(s.as_str()),
            Some(ScopeSetting::PerGrant(m)) => m
                .iter()
                .find(|(k, _)| Grant::parse(k) == Some(grant))
                .map(|(_, v)| v.as_str()),
            _ => None,
        };
        let scope = scope_of(entry)
            .filter(|s| !s.trim().is_empty())
            .or_else(|| scope_of(&self.defaults).filter(|s| !s.trim().is_empty()))
            .unwrap_or(if grant.is_app_grant() { "{scopes}" } else { "" });
        let scope = if scope.trim() == "none" {
            String::new()
        } else {
            scope.to_string()
        };
        let default_expires_in = entry
            .default_expires_in_secs
            .or(self.defaults.default_expires_in_secs)
            .unwrap_or(3600);
        let rotates = entry
            .rotates_refresh_token
            .or(self.defaults.rotates_refresh_token)
            .unwrap_or(true);
        Ok(TokenEndpoint {
            token_url,
            auth,
            grant,
            scope,
            default_expires_in: Duration::from_secs(default_expires_in.max(1)),
            rotates,
            fallback: if fallback { None } else { fallback_grant },
            budget: Self::budget_of(
                entry
                    .token_budget
                    .as_ref()
                    .or(self.defaults.token_budget.as_ref()),
            ),
            max_refresh_interval: entry
                .max_refresh_interval_secs
                .or(self.defaults.max_refresh_interval_secs)
                .map(|s| Duration::from_secs(s.max(1))),
        })
    }

    /// The health probe URL for a record, if the catalog or the record gives one.
    pub fn health_url(&self, provider_type: &str, o: &Overrides<'_>) -> Option<String> {
        let entry = self.providers.get(provider_type)?;
        let path = o
            .health_path
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string)
            .or_else(|| entry.health_path.clone().filter(|s| !s.is_empty()));
        if let Some(path) = path {
            if path.starts_with("http://") || path.starts_with("https://") {
                return Some(expand(&path, o));
            }
            return Some(join_url(o.api_base_url, &path));
        }
        entry.health_url.as_ref().map(|u| expand(u, o))
    }

    /// The health probe of a record: URL, method, expected status, credential, budget.
    pub fn probe(&self, provider_type: &str, o: &Overrides<'_>) -> Option<Probe> {
        let entry = self.providers.get(provider_type)?;
        let url = self.health_url(provider_type, o)?;
        let method = non_blank(entry.health_method.as_ref())
            .or_else(|| non_blank(self.defaults.health_method.as_ref()))
            .and_then(|m| m.to_ascii_uppercase().parse::<http::Method>().ok())
            .unwrap_or(http::Method::GET);
        let expect_status = entry
            .health_expect_status
            .or(self.defaults.health_expect_status)
            .unwrap_or(200);
        let header = non_blank(entry.api_key_header.as_ref())
            .or_else(|| non_blank(self.defaults.api_key_header.as_ref()));
        let query = non_blank(entry.api_key_query.as_ref())
            .or_else(|| non_blank(self.defaults.api_key_query.as_ref()));
        let auth = match (header, query) {
            (Some(h), _) => ProbeAuth::ApiKeyHeader(h.clone()),
            (None, Some(q)) => ProbeAuth::ApiKeyQuery(q.clone()),
            (None, None) => ProbeAuth::Bearer,
        };
        Some(Probe {
            method,
            url,
            expect_status,
            auth,
            budget: Self::budget_of(
                entry
                    .api_budget
                    .as_ref()
                    .or(self.defaults.api_budget.as_ref()),
            ),
        })
    }
}

/// Expands `{account_key}` (`{tenant}`), `{client_id}` and `{api_base_url}` in a template.
fn expand(template: &str, o: &Overrides<'_>) -> String {
    if !template.contains('{') {
        // The usual token URL: nothing to put in.
        return template.to_string();
    }
    template
        .replace("{account_key}", o.account_key)
        .replace("{tenant}", o.account_key)
        .replace("{client_id}", o.client_id)
        .replace("{api_base_url}", o.api_base_url.trim_end_matches('/'))
}

/// Joins a base URL and a path with exactly one `/`.
pub fn join_url(base: &str, path: &str) -> String {
    format!(
        "{}/{}",
        base.trim_end_matches('/'),
        path.trim_start_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(has_rt: bool) -> Overrides<'static> {
        Overrides {
            account_key: "acct-1",
            client_id: "cid",
            api_base_url: "https://api.example.com/v1/",
            has_refresh_token: has_rt,
            ..Overrides::default()
        }
    }

    #[test]
    fn builtin_catalog_resolves_every_provider() {
        let c = Catalog::builtin().expect("built-in catalog parses");
        let goto = c.resolve("goto", &rec(true)).expect("goto");
        assert_eq!(goto.auth, AuthMethod::Basic);
        assert_eq!(goto.grant, Grant::RefreshToken);
        assert_eq!(goto.scope, "");
        let teams = c.resolve("teams", &rec(false)).expect("teams app grant");
        assert_eq!(teams.grant, Grant::ClientCredentials);
        assert_eq!(teams.auth, AuthMethod::Body);
        assert_eq!(
            teams.token_url,
            "https://login.microsoftonline.com/acct-1/oauth2/v2.0/token"
        );
        assert_eq!(teams.scope, "https://graph.microsoft.com/.default");
        let cert = Overrides {
            certificate: true,
            ..rec(false)
        };
        assert_eq!(
            c.resolve("teams", &cert).expect("certificate").auth,
            AuthMethod::PrivateKeyJwt
        );
        assert_eq!(c.resolve("goto", &rec(false)), Err(ResolveError::NoGrant));
        let pat = Overrides {
            has_personal_access_token: true,
            ..rec(false)
        };
        assert_eq!(
            c.resolve("goto", &pat).expect("pat").grant,
            Grant::PersonalAccessToken
        );
        let jwt = Overrides {
            has_jwt_assertion: true,
            ..rec(false)
        };
        let rc = c.resolve("ringcentral", &jwt).expect("ringcentral jwt");
        assert_eq!(rc.grant, Grant::JwtBearer);
        let rc_rt = Overrides {
            has_refresh_token: true,
            ..jwt
        };
        let rc = c.resolve("ringcentral", &rc_rt).expect("ringcentral rt");
        assert_eq!(rc.grant, Grant::RefreshToken);
        assert_eq!(rc.fallback, Some(Grant::JwtBearer));
        assert_eq!(rc.budget.map(|b| b.scope), Some(BudgetScope::Record));
        assert_eq!(
            c.resolve_fallback("ringcentral", &rc_rt).map(|e| e.grant),
            Ok(Grant::JwtBearer)
        );
        assert_eq!(
            c.resolve("ringcentral", &rec(true)).expect("rt").fallback,
            None,
            "no fallback without the credential"
        );
        let zoom = c.resolve("zoom", &rec(false)).expect("zoom");
        assert_eq!(zoom.grant, Grant::AccountCredentials);
        assert_eq!(
            c.resolve("myspace", &rec(true)),
            Err(ResolveError::UnknownProviderType)
        );
        assert_eq!(
            c.resolve("generic_oauth2", &rec(true)),
            Err(ResolveError::NoTokenUrl),
            "a generic record brings its token_url"
        );
    }

    #[test]
    fn record_fields_override_the_catalog() {
        let c = Catalog::builtin().expect("catalog");
        let o = Overrides {
            token_url: Some("http://127.0.0.1:9/token"),
            token_auth_method: Some("body"),
            grant_type: Some("client_credentials"),
            ..rec(true)
        };
        let e = c.resolve("goto", &o).expect("resolves");
        assert_eq!(e.token_url, "http://127.0.0.1:9/token");
        assert_eq!(e.auth, AuthMethod::Body);
        assert_eq!(e.grant, Grant::ClientCredentials);
        let bad = Overrides {
            token_auth_method: Some("telepathy"),
            ..rec(true)
        };
        assert_eq!(c.resolve("goto", &bad), Err(ResolveError::BadAuthMethod));
        let g = Overrides {
            token_url: Some("https://idp.example/{client_id}/token"),
            ..rec(true)
        };
        assert_eq!(
            c.resolve("generic_oauth2", &g).expect("generic").token_url,
            "https://idp.example/cid/token"
        );
    }

    #[test]
    fn health_url_joins_with_one_slash() {
        let c = Catalog::builtin().expect("catalog");
        assert_eq!(
            c.health_url("teams", &rec(true)).as_deref(),
            Some("https://api.example.com/v1/v1.0/organization")
        );
        let o = Overrides {
            health_path: Some("me"),
            ..rec(true)
        };
        assert_eq!(
            c.health_url("goto", &o).as_deref(),
            Some("https://api.example.com/v1/me")
        );
        assert_eq!(
            c.health_url("goto", &rec(true)).as_deref(),
            Some("https://api.getgo.com/admin/rest/v1/me")
        );
        let p = c.probe("zoom", &rec(false)).expect("zoom probe");
        assert_eq!(p.method, http::Method::GET);
        assert_eq!(p.expect_status, 200);
        assert_eq!(p.auth, ProbeAuth::Bearer);
    }

    #[test]
    fn bad_catalog_is_rejected_naming_entry_and_field() {
        let cases = [
            ("[providers.x]\ntoken_url = \"ftp://nope\"\n", "providers.x.token_url"),
            ("[providers.x]\ntoken_urll = \"x\"\n", "token_urll"),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\ngrant_type = \"telepathy\"\n",
                "providers.x.grant_type",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.token_budget]\nscope = \"galaxy\"\nrequests = 5\nper_secs = 60\n",
                "providers.x.token_budget",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.token_budget]\nscope = \"record\"\nrequests = 5\n",
                "providers.x.token_budget",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\nhealth_method = \"G E T\"\n",
                "providers.x.health_method",
            ),
            (
                "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.scope]\nwishful = \"a\"\n",
                "providers.x.scope",
            ),
        ];
        for (text, want) in cases {
            let e = Catalog::parse(text, "test.toml").expect_err(want);
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn a_sync_sub_table_is_left_to_its_owner() {
        let text = "[providers.x]\ntoken_url = \"https://a/t\"\n[providers.x.sync.users]\npath = \"/users\"\nanything = 1\n";
        let c = Catalog::parse(text, "test.toml").expect("sync keys are not ours to refuse");
        assert!(c.get("x").is_some_and(|e| e.sync.is_some()));
    }
}
