//! The provider catalog: per `provider_type`, how to obtain a token.
//!
//! Loaded from `config/providers.toml` (compiled in as the built-in catalog) or from the file
//! named by `refresh.catalog_file`. [`Catalog::resolve`] applies SPEC 1.3's order (a record
//! field, else the catalog entry of its `provider_type`, else `[defaults]`) and yields the
//! [`TokenEndpoint`] a refresh uses.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// HTTP Basic with client id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Body,
}

impl AuthMethod {
    pub fn parse(s: &str) -> Option<AuthMethod> {
        match s.trim().to_ascii_lowercase().as_str() {
            "basic" => Some(AuthMethod::Basic),
            "body" | "post" | "client_secret_post" => Some(AuthMethod::Body),
            _ => None,
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
}

impl Grant {
    pub fn parse(s: &str) -> Option<Grant> {
        match s.trim() {
            "refresh_token" => Some(Grant::RefreshToken),
            "client_credentials" => Some(Grant::ClientCredentials),
            "account_credentials" => Some(Grant::AccountCredentials),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grant::RefreshToken => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::AccountCredentials => "account_credentials",
        }
    }

    /// Grants whose answer is a fresh token without a refresh token to rotate.
    pub fn is_app_grant(self) -> bool {
        !matches!(self, Grant::RefreshToken)
    }
}

/// One catalog entry; every field optional so that `[defaults]` can fill it.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub token_url: Option<String>,
    pub token_auth_method: Option<String>,
    pub grant_type: Option<String>,
    pub app_grant_type: Option<String>,
    pub scope: Option<String>,
    pub default_expires_in_secs: Option<u64>,
    pub health_path: Option<String>,
    pub health_url: Option<String>,
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

/// Record fields that override the catalog (SPEC 1.3 optional fields).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides<'a> {
    pub token_url: Option<&'a str>,
    pub token_auth_method: Option<&'a str>,
    pub grant_type: Option<&'a str>,
    pub health_path: Option<&'a str>,
    pub account_key: &'a str,
    pub api_base_url: &'a str,
    pub has_refresh_token: bool,
}

/// Everything a token call needs besides the credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEndpoint {
    pub token_url: String,
    pub auth: AuthMethod,
    pub grant: Grant,
    pub scope: Option<String>,
    pub default_expires_in: Duration,
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
    #[error("no refresh_token and no app grant for this provider")]
    NoGrant,
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
        }
    }
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

    pub fn parse(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        let invalid = |message: String| CatalogError::Invalid {
            path: origin.to_string(),
            message,
        };
        let file: CatalogFile = toml::from_str(text).map_err(|e| invalid(e.message().into()))?;
        let catalog = Catalog {
            defaults: file.defaults,
            providers: file.providers,
        };
        // Every entry must resolve on its own (with a placeholder record).
        for name in catalog.providers.keys() {
            for has_rt in [true, false] {
                let o = Overrides {
                    account_key: "x",
                    api_base_url: "https://example.invalid",
                    has_refresh_token: has_rt,
                    ..Overrides::default()
                };
                match catalog.resolve(name, &o) {
                    Ok(_) | Err(ResolveError::NoGrant) => {}
                    Err(e) => return Err(invalid(format!("[providers.{name}]: {e}"))),
                }
            }
        }
        Ok(catalog)
    }

    pub fn get(&self, provider_type: &str) -> Option<&Entry> {
        self.providers.get(provider_type)
    }

    pub fn provider_types(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// Resolves the token endpoint for a record of `provider_type` with its overrides.
    pub fn resolve(
        &self,
        provider_type: &str,
        o: &Overrides<'_>,
    ) -> Result<TokenEndpoint, ResolveError> {
        let entry = self
            .providers
            .get(provider_type)
            .ok_or(ResolveError::UnknownProviderType)?;
        let pick = |record: Option<&str>, f: fn(&Entry) -> Option<&String>| -> Option<String> {
            record
                .filter(|s| !s.trim().is_empty())
                .map(str::to_string)
                .or_else(|| f(entry).filter(|s| !s.trim().is_empty()).cloned())
                .or_else(|| f(&self.defaults).filter(|s| !s.trim().is_empty()).cloned())
        };
        let template =
            pick(o.token_url, |e| e.token_url.as_ref()).ok_or(ResolveError::NoTokenUrl)?;
        let token_url = expand(&template, o);
        if !(token_url.starts_with("https://") || token_url.starts_with("http://")) {
            return Err(ResolveError::BadTokenUrl);
        }
        let auth = match pick(o.token_auth_method, |e| e.token_auth_method.as_ref()) {
            Some(s) => AuthMethod::parse(&s).ok_or(ResolveError::BadAuthMethod)?,
            None => AuthMethod::Basic,
        };
        let grant = if let Some(g) = o.grant_type.filter(|s| !s.trim().is_empty()) {
            Grant::parse(g).ok_or(ResolveError::BadGrant)?
        } else if o.has_refresh_token {
            match pick(None, |e| e.grant_type.as_ref()) {
                Some(g) => Grant::parse(&g).ok_or(ResolveError::BadGrant)?,
                None => Grant::RefreshToken,
            }
        } else {
            match pick(None, |e| e.app_grant_type.as_ref()) {
                Some(g) => Grant::parse(&g).ok_or(ResolveError::BadGrant)?,
                None => return Err(ResolveError::NoGrant),
            }
        };
        if grant == Grant::RefreshToken && !o.has_refresh_token {
            return Err(ResolveError::NoGrant);
        }
        let scope = pick(None, |e| e.scope.as_ref());
        let default_expires_in = entry
            .default_expires_in_secs
            .or(self.defaults.default_expires_in_secs)
            .unwrap_or(3600);
        Ok(TokenEndpoint {
            token_url,
            auth,
            grant,
            scope,
            default_expires_in: Duration::from_secs(default_expires_in.max(1)),
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
}

/// Expands `{account_key}` and `{api_base_url}` in a catalog template.
fn expand(template: &str, o: &Overrides<'_>) -> String {
    template
        .replace("{account_key}", o.account_key)
        .replace("{tenant}", o.account_key)
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
        let teams = c.resolve("teams", &rec(false)).expect("teams app grant");
        assert_eq!(teams.grant, Grant::ClientCredentials);
        assert_eq!(teams.auth, AuthMethod::Body);
        assert_eq!(
            teams.token_url,
            "https://login.microsoftonline.com/acct-1/oauth2/v2.0/token"
        );
        assert_eq!(
            teams.scope.as_deref(),
            Some("https://graph.microsoft.com/.default")
        );
        assert_eq!(c.resolve("goto", &rec(false)), Err(ResolveError::NoGrant));
        assert_eq!(
            c.resolve("myspace", &rec(true)),
            Err(ResolveError::UnknownProviderType)
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
    }

    #[test]
    fn bad_catalog_is_rejected_with_its_entry() {
        let e = Catalog::parse("[providers.x]\ntoken_url = \"ftp://nope\"\n", "test.toml")
            .expect_err("bad url");
        assert!(e.to_string().contains("providers.x"), "{e}");
        let e =
            Catalog::parse("[providers.x]\ntoken_urll = \"x\"\n", "test.toml").expect_err("typo");
        assert!(e.to_string().contains("token_urll"), "{e}");
    }
}
