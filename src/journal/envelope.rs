//! The on-disk format of one journal entry: a small JSON envelope.
//!
//! ```text
//! {"format":1,"id":"<32 hex>","created_at":"<RFC 3339>","tenant":"..","provider":"..",
//!  "key_id":"<8 hex>"|null,"nonce":"<base64, 24 bytes>"|null,"payload":..}
//! ```
//! The envelope's own fields are not secret (they are what `journal list` shows). `payload`
//! holds the rest of the [`Entry`]: with a key, the base64 of the XChaCha20-Poly1305
//! ciphertext of the payload's JSON, associated data [`keys::associated_data`] of the record
//! key and id; without, the payload's JSON object inline.
//!
//! Decoding checks, in order: JSON, format version, that the id is the file's own name, the
//! key, the authentication tag, the payload. Every failure is a [`DecodeError`] whose message
//! never quotes the file's content (serde's messages can, so only their category and position
//! are kept).

use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::keys::{self, JournalKeys, OpenError};
use super::{Entry, EntryId, FORMAT_VERSION};
use crate::keys::ProviderId;
use crate::secret::Secret;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Serialize, Deserialize)]
pub(super) struct Envelope {
    pub format: u32,
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub tenant: String,
    pub provider: String,
    pub key_id: Option<String>,
    pub nonce: Option<String>,
    pub payload: serde_json::Value,
}

/// The secret part of an entry (and the record fields that go with it).
#[derive(Serialize, Deserialize)]
struct EntryPayload {
    old_refresh_token: String,
    old_access_token: String,
    access_token: String,
    refresh_token: Option<String>,
    token_expiry: String,
    updated_at: String,
    expires_at: DateTime<Utc>,
    refresh_token_expires_at: Option<DateTime<Utc>>,
}

/// Why a file is not a readable entry. The message never contains the file's content.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a journal entry ({0})")]
    Json(String),
    #[error("unsupported format version {0}")]
    Format(u32),
    #[error("entry id {found:?} does not match its file name")]
    IdMismatch { found: String },
    #[error("encrypted, but no journal key file is configured")]
    NoKeys,
    #[error("encrypted entry without a valid nonce")]
    MissingNonce,
    #[error("payload is not base64")]
    PayloadEncoding,
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("payload is malformed ({0})")]
    Payload(String),
}

/// serde_json's message can quote the offending value; keep only what and where.
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "syntax error",
        serde_json::error::Category::Data => "unexpected field or value",
        serde_json::error::Category::Eof => "truncated",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

fn record_key(tenant: &str, provider: &str) -> String {
    ProviderId::new(tenant, provider).record_key()
}

/// The file's bytes for `e`.
pub(super) fn encode(e: &Entry, keys: Option<&JournalKeys>) -> Result<Vec<u8>, serde_json::Error> {
    let payload = EntryPayload {
        old_refresh_token: e.old_refresh_token.expose().to_string(),
        old_access_token: e.old_access_token.expose().to_string(),
        access_token: e.access_token.expose().to_string(),
        refresh_token: e.refresh_token.as_ref().map(|s| s.expose().to_string()),
        token_expiry: e.token_expiry.clone(),
        updated_at: e.updated_at.clone(),
        expires_at: e.expires_at,
        refresh_token_expires_at: e.refresh_token_expires_at,
    };
    let (key_id, nonce, payload) = match keys {
        Some(keys) => {
            let plain = serde_json::to_vec(&payload)?;
            let aad = keys::associated_data(&record_key(&e.tenant, &e.provider), e.id.as_str());
            let Some((kid, nonce, ct)) = keys.seal(&aad, &plain) else {
                return Err(serde::ser::Error::custom("encryption failed"));
            };
            (
                Some(kid),
                Some(B64.encode(nonce)),
                serde_json::Value::String(B64.encode(ct)),
            )
        }
        None => (None, None, serde_json::to_value(&payload)?),
    };
    let envelope = Envelope {
        format: FORMAT_VERSION,
        id: e.id.as_str().to_string(),
        created_at: e.created_at,
        tenant: e.tenant.clone(),
        provider: e.provider.clone(),
        key_id,
        nonce,
        payload,
    };
    let mut bytes = serde_json::to_vec(&envelope)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The envelope alone (for listing), checked for format and id but not opened.
pub(super) fn envelope(bytes: &[u8], file_id: &str) -> Result<Envelope, DecodeError> {
    let env: Envelope =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(json_error(&e)))?;
    if env.format != FORMAT_VERSION {
        return Err(DecodeError::Format(env.format));
    }
    if env.id != file_id || EntryId::parse(&env.id).is_none() {
        return Err(DecodeError::IdMismatch { found: env.id });
    }
    Ok(env)
}

/// The entry in `bytes`, read from the file named after `file_id`.
pub(super) fn decode(
    bytes: &[u8],
    file_id: &str,
    keys: Option<&JournalKeys>,
) -> Result<Entry, DecodeError> {
    let env = envelope(bytes, file_id)?;
    let id = EntryId::parse(&env.id).ok_or_else(|| DecodeError::IdMismatch {
        found: env.id.clone(),
    })?;
    let payload: EntryPayload = match &env.key_id {
        Some(kid) => {
            let keys = keys.ok_or(DecodeError::NoKeys)?;
            let nonce = env
                .nonce
                .as_deref()
                .and_then(|n| B64.decode(n).ok())
                .ok_or(DecodeError::MissingNonce)?;
            let serde_json::Value::String(ct) = &env.payload else {
                return Err(DecodeError::PayloadEncoding);
            };
            let ct = B64.decode(ct).map_err(|_| DecodeError::PayloadEncoding)?;
            let aad = keys::associated_data(&record_key(&env.tenant, &env.provider), &env.id);
            let plain = keys.open(kid, &nonce, &aad, &ct)?;
            serde_json::from_slice(&plain).map_err(|e| DecodeError::Payload(json_error(&e)))?
        }
        // Written before a key was configured: still readable (the move to encryption must
        // not strand what is pending).
        None => {
            serde_json::from_value(env.payload).map_err(|e| DecodeError::Payload(json_error(&e)))?
        }
    };
    Ok(Entry {
        id,
        version: env.format,
        created_at: env.created_at,
        tenant: env.tenant,
        provider: env.provider,
        old_refresh_token: Secret::new(payload.old_refresh_token),
        old_access_token: Secret::new(payload.old_access_token),
        access_token: Secret::new(payload.access_token),
        refresh_token: payload.refresh_token.map(Secret::new),
        token_expiry: payload.token_expiry,
        updated_at: payload.updated_at,
        expires_at: payload.expires_at,
        refresh_token_expires_at: payload.refresh_token_expires_at,
    })
}
