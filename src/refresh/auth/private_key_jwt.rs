//! `private_key_jwt` (RFC 7523 2.2, Microsoft certificate credentials): `client_id`,
//! `client_assertion_type` and a `client_assertion` JWT signed RS256 with the record's
//! `certificate_key`; header `x5t` = base64url of the certificate's SHA-1 thumbprint, claims
//! `aud` = the token URL, `iss` = `sub` = the client id, `iat`/`nbf` now, `exp` two minutes on,
//! a random `jti`.

use base64::Engine;
use serde::Serialize;

use super::{AuthError, ClientAuth, Outgoing, TokenRequest};
use crate::secret::Secret;

pub struct PrivateKeyJwt;

/// How long an assertion is valid.
const LIFETIME_SECS: i64 = 120;

pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    iat: i64,
    nbf: i64,
    exp: i64,
}

impl ClientAuth for PrivateKeyJwt {
    fn apply(&self, req: &TokenRequest<'_>, out: &mut Outgoing) -> Result<(), AuthError> {
        let bad = |detail: &str| AuthError {
            code: "bad_certificate_key",
            detail: detail.to_string(),
        };
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(
            req.credentials.certificate_key.expose().as_bytes(),
        )
        .map_err(|_| bad("certificate_key is not a PEM RSA private key"))?;
        if req.credentials.certificate_thumbprint.is_empty() {
            return Err(bad("certificate_thumbprint is missing"));
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.x5t = Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(&req.credentials.certificate_thumbprint),
        );
        let now = chrono::Utc::now().timestamp();
        let mut rng = fastrand::Rng::new();
        let claims = Claims {
            aud: &req.endpoint.token_url,
            iss: req.client_id,
            sub: req.client_id,
            jti: format!("{:032x}", rng.u128(..)),
            iat: now,
            nbf: now,
            exp: now.saturating_add(LIFETIME_SECS),
        };
        let jwt = jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|_| bad("the client assertion could not be signed"))?;
        out.form.push("client_id", req.client_id);
        out.form.push("client_assertion_type", ASSERTION_TYPE);
        out.form.push("client_assertion", jwt.clone());
        out.made_secrets.push(Secret::new(jwt));
        Ok(())
    }
}
