//! Zoom Server-to-Server: `grant_type=account_credentials&account_id=<account_key>`.

use super::{Form, GrantKind, TokenRequest};

pub struct AccountCredentials;

impl GrantKind for AccountCredentials {
    fn grant_type(&self) -> &'static str {
        "account_credentials"
    }

    fn add_fields(&self, req: &TokenRequest<'_>, form: &mut Form) {
        form.push("account_id", req.account_key);
    }
}
