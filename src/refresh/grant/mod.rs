//! Grants: what each OAuth grant puts in the token request's form, one small file each.
//!
//! The catalog names the grant of a record ([`crate::catalog::Grant`]); [`of`] gives its
//! [`GrantKind`]. [`fields`] builds the grant's part of the form: `grant_type`, the grant's
//! own fields and the `scope` the catalog sets for it. Client authentication is separate
//! ([`super::auth`]). Adding a grant: a file here, its line in [`of`], its name in the catalog.

mod account_credentials;
mod client_credentials;
mod jwt_bearer;
mod personal_access_token;
mod refresh_token;

use crate::catalog::Grant;

use super::client::TokenRequest;

/// Form fields of a token request, in order.
#[derive(Debug, Default)]
pub struct Form(pub Vec<(&'static str, String)>);

impl Form {
    pub fn push(&mut self, name: &'static str, value: impl Into<String>) {
        self.0.push((name, value.into()));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `application/x-www-form-urlencoded`.
    pub fn encode(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.0 {
            s.append_pair(k, v);
        }
        s.finish()
    }
}

/// One grant.
pub trait GrantKind: Sync {
    /// The `grant_type` value sent.
    fn grant_type(&self) -> &'static str;
    /// Adds the grant's own fields (the credential it exchanges).
    fn add_fields(&self, req: &TokenRequest<'_>, form: &mut Form);
}

/// The implementation of a catalog grant.
pub fn of(grant: Grant) -> &'static dyn GrantKind {
    match grant {
        Grant::RefreshToken => &refresh_token::RefreshToken,
        Grant::ClientCredentials => &client_credentials::ClientCredentials,
        Grant::AccountCredentials => &account_credentials::AccountCredentials,
        Grant::JwtBearer => &jwt_bearer::JwtBearer,
        Grant::PersonalAccessToken => &personal_access_token::PersonalAccessToken,
    }
}

/// The grant's part of the form: `grant_type`, its fields, then `scope` when one is set.
pub fn fields(req: &TokenRequest<'_>) -> Form {
    let kind = of(req.endpoint.grant);
    let mut form = Form::default();
    form.push("grant_type", kind.grant_type());
    kind.add_fields(req, &mut form);
    let scope = scope(&req.endpoint.scope, req.scopes);
    if !scope.is_empty() {
        form.push("scope", scope);
    }
    form
}

/// The catalog's scope template with `{scopes}` replaced by the record's scopes.
pub fn scope(template: &str, record_scopes: &[String]) -> String {
    template
        .replace("{scopes}", &record_scopes.join(" "))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_templates() {
        let rec = vec!["a".to_string(), "b".to_string()];
        assert_eq!(scope("{scopes}", &rec), "a b");
        assert_eq!(scope("offline_access {scopes}", &rec), "offline_access a b");
        assert_eq!(scope("{scopes}", &[]), "");
        assert_eq!(scope("", &rec), "");
        assert_eq!(
            scope("https://graph.microsoft.com/.default", &rec),
            "https://graph.microsoft.com/.default"
        );
    }
}
