//! RFC 7523 JWT bearer grant: `assertion` = the record's `jwt_assertion` (RingCentral's JWT
//! credential, issued by the provider and sent as is). Its answer carries a refresh token,
//! which is kept and rotated from then on.

use super::{Form, GrantKind, TokenRequest};

pub struct JwtBearer;

impl GrantKind for JwtBearer {
    fn grant_type(&self) -> &'static str {
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    }

    fn add_fields(&self, req: &TokenRequest<'_>, form: &mut Form) {
        form.push("assertion", req.credentials.jwt_assertion.expose());
    }
}
