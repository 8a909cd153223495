//! Client authentication at the token endpoint, apart from the grant, one small file each.
//!
//! The catalog (or `auth_type=certificate`) names the method ([`crate::catalog::AuthMethod`]);
//! [`of`] gives its [`ClientAuth`], which adds what it needs to the outgoing request: an
//! `Authorization` header or form fields. Adding one: a file here, its line in [`of`], its name
//! in the catalog.

mod basic;
mod body;
mod private_key_jwt;

use crate::catalog::AuthMethod;
use crate::secret::Secret;

use super::client::TokenRequest;
use super::grant::Form;

/// A token request being built.
#[derive(Debug, Default)]
pub struct Outgoing {
    pub form: Form,
    /// The `Authorization` header value, when the method sets one.
    pub authorization: Option<Secret>,
    /// Secrets the method made (a signed assertion) that provider text must never echo.
    pub made_secrets: Vec<Secret>,
}

/// Why the client could not authenticate (a record problem: needs a human).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {detail}")]
pub struct AuthError {
    /// The health reason (`bad_certificate_key`, ...).
    pub code: &'static str,
    pub detail: String,
}

/// One client authentication method.
pub trait ClientAuth: Sync {
    fn apply(&self, req: &TokenRequest<'_>, out: &mut Outgoing) -> Result<(), AuthError>;
}

/// The implementation of a catalog method.
pub fn of(method: AuthMethod) -> &'static dyn ClientAuth {
    match method {
        AuthMethod::Basic => &basic::Basic,
        AuthMethod::Body => &body::Body,
        AuthMethod::PrivateKeyJwt => &private_key_jwt::PrivateKeyJwt,
    }
}
