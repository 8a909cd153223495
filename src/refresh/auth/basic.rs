//! `client_secret_basic`: HTTP Basic with the client id and secret, each form-urlencoded
//! first (RFC 6749 2.3.1).

use base64::Engine;

use super::{AuthError, ClientAuth, Outgoing, TokenRequest};
use crate::secret::Secret;

pub struct Basic;

impl ClientAuth for Basic {
    fn apply(&self, req: &TokenRequest<'_>, out: &mut Outgoing) -> Result<(), AuthError> {
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let pair = format!("{}:{}", enc(req.client_id), enc(req.client_secret.expose()));
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        );
        out.authorization = Some(Secret::new(value));
        Ok(())
    }
}
