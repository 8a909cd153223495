//! The secret scan: every secret value a test seeded, or that the fake issued, collected, and
//! output (the daemon's logs, a CLI's output, `/metrics`) checked to hold none of them.

use std::collections::{HashMap, HashSet};

use super::daemon::Daemon;
use super::provider::FakeProvider;
use super::seed::{hgetall, key_type};

/// Every secret value a test has seen: none may appear in the daemon's output.
#[derive(Default)]
pub struct Secrets(pub HashSet<String>);

impl Secrets {
    pub fn add(&mut self, value: &str) {
        // Short values (empty fields, "0") are not secrets worth searching for.
        if value.len() >= 8 {
            self.0.insert(value.to_string());
        }
    }

    /// Client id, secret and refresh token for a new client, remembered (the id is not a
    /// secret).
    pub fn creds(&mut self, name: &str) -> (String, String, String) {
        let id = unique(&format!("cid-{name}"));
        let secret = unique(&format!("cs-{name}"));
        let rt = unique(&format!("rt-seed-{name}"));
        self.add(&secret);
        self.add(&rt);
        (id, secret, rt)
    }

    /// The secret fields of a record: client secret, access and refresh token.
    pub fn add_record(&mut self, record: &HashMap<String, String>) {
        for field in ["client_secret", "access_token", "refresh_token"] {
            if let Some(v) = record.get(field) {
                self.add(v);
            }
        }
    }

    /// The records' current tokens and the fake's live refresh tokens.
    pub async fn collect(
        &mut self,
        conn: &mut redis::Connection,
        keys: &[String],
        fake: &FakeProvider,
    ) {
        for key in keys {
            if key_type(conn, key) == "hash" {
                self.add_record(&hgetall(conn, key));
            }
        }
        let stats = fake.stats().await;
        if let Some(clients) = stats["clients"].as_object() {
            for client in clients.values() {
                if let Some(rt) = client["live_refresh_token"].as_str() {
                    self.add(rt);
                }
            }
        }
    }

    /// Panics if `text` (named `what` in the message) holds any of the secrets; the message
    /// shows only the start of the secret.
    pub fn assert_absent(&self, what: &str, text: &str) {
        assert!(!self.0.is_empty(), "no secrets were collected");
        for secret in &self.0 {
            let shown: String = secret.chars().take(12).collect();
            assert!(
                !text.contains(secret.as_str()),
                "{what} contains a secret value ({shown}...)"
            );
        }
    }

    /// Checks the daemon's output so far, which must not be empty (an empty output would
    /// prove nothing).
    pub fn assert_not_logged(&self, daemon: &Daemon) {
        let logs = daemon.logs();
        assert!(
            !logs.trim().is_empty(),
            "the daemon wrote no output at all: the secret check would prove nothing"
        );
        self.assert_absent("the daemon's output", &logs);
    }
}

/// Panics if `text` (named `what` in the message) contains any of `secrets`.
pub fn assert_no_secrets(what: &str, text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{what} contains a secret or token (starting {:?})",
            s.chars().take(10).collect::<String>()
        );
    }
}

/// A value unique to this run, recognisable in a failure message by its prefix.
fn unique(prefix: &str) -> String {
    format!("{prefix}-{:016x}", fastrand::u64(..))
}
