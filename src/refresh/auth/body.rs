//! `client_secret_post`: `client_id` and `client_secret` in the form body.

use super::{AuthError, ClientAuth, Outgoing, TokenRequest};

pub struct Body;

impl ClientAuth for Body {
    fn apply(&self, req: &TokenRequest<'_>, out: &mut Outgoing) -> Result<(), AuthError> {
        out.form.push("client_id", req.client_id);
        out.form.push("client_secret", req.client_secret.expose());
        Ok(())
    }
}
