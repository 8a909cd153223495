//! GoTo personal access token: `grant_type=personal_access_token&pat=<token>`.

use super::{Form, GrantKind, TokenRequest};

pub struct PersonalAccessToken;

impl GrantKind for PersonalAccessToken {
    fn grant_type(&self) -> &'static str {
        "personal_access_token"
    }

    fn add_fields(&self, req: &TokenRequest<'_>, form: &mut Form) {
        form.push("pat", req.credentials.personal_access_token.expose());
    }
}
