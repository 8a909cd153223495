//! [`JournalKeys`]: the keys that encrypt journal entries at rest (SPEC 6,
//! `TOKENWARDEN_JOURNAL_KEY_FILE`).
//!
//! The key file holds one or more lines, each 32 random bytes in base64 (standard alphabet,
//! padded or not), for example made with `head -c 32 /dev/urandom | base64`. Blank lines and
//! lines starting with `#` are ignored. The FIRST key encrypts new entries; every key decrypts,
//! so a key can be rotated by putting the new one on top and keeping the old one below until
//! no entry written with it is left. A key's id is the first 8 hex characters of the SHA-256
//! of its 32 bytes; an entry names the id of the key that sealed it.
//!
//! Sealing is XChaCha20-Poly1305 with a random 24-byte nonce. The associated data binds the
//! ciphertext to its record and entry id (see [`associated_data`]), so an entry copied to
//! another record or id fails to open.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

/// Bytes in a key.
pub const KEY_LEN: usize = 32;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 24;

/// Why a key file cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read journal key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal key file {path}, line {line}: {message}")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("journal key file {path} holds no key")]
    Empty { path: PathBuf },
}

struct Key {
    id: String,
    cipher: XChaCha20Poly1305,
}

/// The journal's keys, loaded from the key file. `Debug` shows only the key ids.
pub struct JournalKeys {
    /// Never empty; the first one encrypts.
    keys: Vec<Key>,
}

impl fmt::Debug for JournalKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JournalKeys")
            .field("key_ids", &self.key_ids())
            .finish()
    }
}

/// Why sealed bytes would not open. Never carries key material or plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed with key {0}, which the key file does not hold")]
    UnknownKey(String),
    #[error("the nonce is not {NONCE_LEN} bytes")]
    BadNonce,
    #[error("authentication failed (wrong key, or the entry was altered or moved)")]
    Failed,
}

impl JournalKeys {
    /// Reads and parses the key file.
    pub fn load(path: &Path) -> Result<JournalKeys, KeyFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        JournalKeys::parse(&text, path)
    }

    /// Parses the key file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<JournalKeys, KeyFileError> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |message: &str| KeyFileError::Line {
                path: path.to_path_buf(),
                line: n + 1,
                message: message.to_string(),
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(line)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(line))
                .map_err(|_| bad("not base64"))?;
            let key: [u8; KEY_LEN] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| bad("a key must be 32 bytes"))?;
            keys.push(Key::new(&key));
        }
        if keys.is_empty() {
            return Err(KeyFileError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(JournalKeys { keys })
    }

    /// Keys given directly, the first encrypting (tests, tools). `None` when `keys` is empty.
    pub fn from_bytes(keys: &[[u8; KEY_LEN]]) -> Option<JournalKeys> {
        let keys: Vec<Key> = keys.iter().map(Key::new).collect();
        (!keys.is_empty()).then_some(JournalKeys { keys })
    }

    /// The ids of all keys, the encrypting one first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The id of the key that encrypts new entries.
    pub fn encrypting_key_id(&self) -> &str {
        // `keys` is never empty (both constructors refuse that).
        self.keys.first().map_or("", |k| k.id.as_str())
    }

    /// Whether the key file holds the key with this id.
    pub fn has_key(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }

    /// Seals `plaintext` with the first key: (key id, nonce, ciphertext).
    pub(crate) fn seal(
        &self,
        aad: &[u8],
        plaintext: &[u8],
    ) -> Option<(String, [u8; NONCE_LEN], Vec<u8>)> {
        let key = self.keys.first()?;
        let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
        let ciphertext = key
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .ok()?;
        Some((key.id.clone(), nonce.into(), ciphertext))
    }

    /// Opens what [`JournalKeys::seal`] sealed, with the key named `key_id`.
    pub(crate) fn open(
        &self,
        key_id: &str,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, OpenError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| OpenError::UnknownKey(key_id.to_string()))?;
        if nonce.len() != NONCE_LEN {
            return Err(OpenError::BadNonce);
        }
        key.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map_err(|_| OpenError::Failed)
    }
}

impl Key {
    fn new(bytes: &[u8; KEY_LEN]) -> Key {
        Key {
            id: key_id(bytes),
            cipher: XChaCha20Poly1305::new(bytes.into()),
        }
    }
}

/// First 8 hex characters of the SHA-256 of the key.
pub fn key_id(key: &[u8; KEY_LEN]) -> String {
    let digest = Sha256::digest(key);
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The associated data of an entry: the UTF-8 bytes of its record key
/// (`tenant:{t}:provider:{p}`), a NUL byte, then its entry id.
pub fn associated_data(record_key: &str, entry_id: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(record_key.len() + 1 + entry_id.len());
    aad.extend_from_slice(record_key.as_bytes());
    aad.push(0);
    aad.extend_from_slice(entry_id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(key: &[u8; KEY_LEN]) -> String {
        base64::engine::general_purpose::STANDARD.encode(key)
    }

    #[test]
    fn key_file_lines_comments_and_ids() {
        let a = [1u8; KEY_LEN];
        let b = [2u8; KEY_LEN];
        let text = format!("# rotated 2026-11\n{}\n\n  {}  \n", b64(&a), b64(&b));
        let keys = JournalKeys::parse(&text, Path::new("k")).expect("valid");
        assert_eq!(
            keys.key_ids(),
            vec![key_id(&a).as_str(), key_id(&b).as_str()]
        );
        assert_eq!(keys.encrypting_key_id(), key_id(&a));
        assert_eq!(key_id(&a).len(), 8);
        // Sha256 of 32 bytes of 0x01, first four bytes.
        assert_eq!(key_id(&a), "72cd6e84");
        let debug = format!("{keys:?}");
        assert!(!debug.contains(&b64(&a)), "{debug}");
        assert!(debug.contains(&key_id(&a)), "{debug}");
    }

    #[test]
    fn bad_key_files_name_the_line_not_the_key() {
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 16]);
        let e = JournalKeys::parse(&format!("\n{short}\n"), Path::new("k")).expect_err("short");
        assert!(e.to_string().contains("line 2"), "{e}");
        assert!(!e.to_string().contains(&short), "{e}");
        let e = JournalKeys::parse("not base64 at all!\n", Path::new("k")).expect_err("junk");
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = JournalKeys::parse("# only a comment\n", Path::new("k")).expect_err("empty");
        assert!(e.to_string().contains("no key"), "{e}");
    }

    #[test]
    fn seal_open_with_rotation_and_binding() {
        let old = JournalKeys::from_bytes(&[[3u8; KEY_LEN]]).expect("one key");
        let rotated = JournalKeys::from_bytes(&[[4u8; KEY_LEN], [3u8; KEY_LEN]]).expect("two");
        let aad = associated_data("tenant:t:provider:goto", "00ff");
        let (kid, nonce, ct) = old.seal(&aad, b"secret payload").expect("sealed");
        assert_eq!(kid, old.encrypting_key_id());
        // The rotated file still opens entries of the old key.
        let pt = rotated
            .open(&kid, &nonce, &aad, &ct)
            .expect("older key opens");
        assert_eq!(pt, b"secret payload");
        // Another record, another id, another key: refused.
        let other = associated_data("tenant:t:provider:teams", "00ff");
        assert_eq!(
            rotated.open(&kid, &nonce, &other, &ct),
            Err(OpenError::Failed)
        );
        let new_only = JournalKeys::from_bytes(&[[4u8; KEY_LEN]]).expect("one key");
        assert!(matches!(
            new_only.open(&kid, &nonce, &aad, &ct),
            Err(OpenError::UnknownKey(_))
        ));
        assert_eq!(
            rotated.open(&kid, &nonce[..12], &aad, &ct),
            Err(OpenError::BadNonce)
        );
    }
}
