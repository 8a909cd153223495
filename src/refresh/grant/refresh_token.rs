//! `grant_type=refresh_token` (RFC 6749 6): the record's refresh token.

use super::{Form, GrantKind, TokenRequest};

pub struct RefreshToken;

impl GrantKind for RefreshToken {
    fn grant_type(&self) -> &'static str {
        "refresh_token"
    }

    fn add_fields(&self, req: &TokenRequest<'_>, form: &mut Form) {
        form.push("refresh_token", req.refresh_token.expose());
    }
}
