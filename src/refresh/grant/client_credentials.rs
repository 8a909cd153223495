//! `grant_type=client_credentials` (RFC 6749 4.4): the client's own credentials only.

use super::{Form, GrantKind, TokenRequest};

pub struct ClientCredentials;

impl GrantKind for ClientCredentials {
    fn grant_type(&self) -> &'static str {
        "client_credentials"
    }

    fn add_fields(&self, _req: &TokenRequest<'_>, _form: &mut Form) {}
}
