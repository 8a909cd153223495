//! The health hash `tenant:{t}:provider:{p}:health` and the `tokenwarden:events` stream
//! (SPEC 2): what the gateway and operators read about each provider.
//!
//! Writers add commands to a pipeline so that a refresh outcome, its health entry and its
//! event go to Redis in one round trip. Only fields this replica knows are written, so one
//! replica's registry view never blanks another's refresh history. [`probe`] checks each
//! provider's API.

pub mod probe;

use chrono::{DateTime, Utc};
use redis::Pipeline;

use crate::fleet::Tracked;
use crate::keys::{ProviderId, EVENTS_STREAM};
use crate::timestamp::iso_utc;

/// Fields of one health update.
#[derive(Debug, Default)]
pub struct HealthUpdate {
    fields: Vec<(&'static str, String)>,
    /// Written only where the hash has no value yet (`HSETNX`).
    if_absent: Vec<(&'static str, String)>,
}

impl HealthUpdate {
    /// State, reason, expiry, next refresh and failure count from `t`.
    pub fn from_tracked(t: &Tracked, failing_after: u32, now: DateTime<Utc>) -> HealthUpdate {
        let mut u = HealthUpdate::default();
        u.set("state", t.state(failing_after).as_str());
        u.set("reason", t.reason());
        u.set(
            "token_expiry",
            t.token_expiry.map(iso_utc).unwrap_or_default(),
        );
        u.set(
            "next_refresh_at",
            t.next_refresh.map(iso_utc).unwrap_or_default(),
        );
        u.set("consecutive_failures", t.consecutive_failures.to_string());
        u.set("updated_at", iso_utc(now));
        u
    }

    pub fn set(&mut self, field: &'static str, value: impl Into<String>) -> &mut Self {
        self.fields.retain(|(f, _)| *f != field);
        self.fields.push((field, value.into()));
        self
    }

    /// The outcome of a refresh attempt.
    pub fn attempt(&mut self, at: DateTime<Utc>, result: &str, error: Option<&str>) -> &mut Self {
        self.set("last_refresh_result", result);
        self.set("last_error", error.unwrap_or(""));
        if error.is_none() {
            self.set("last_refresh_at", iso_utc(at));
        }
        self
    }

    pub fn fields(&self) -> &[(&'static str, String)] {
        &self.fields
    }

    /// Sets `field` only where the health hash has none (another replica's word stands).
    pub fn set_if_absent(&mut self, field: &'static str, value: impl Into<String>) -> &mut Self {
        self.if_absent.push((field, value.into()));
        self
    }

    pub fn add_to(&self, pipe: &mut Pipeline, id: &ProviderId) {
        let key = id.health_key();
        for (f, v) in &self.if_absent {
            pipe.cmd("HSETNX").arg(&key).arg(*f).arg(v).ignore();
        }
        if self.fields.is_empty() {
            return;
        }
        let cmd = pipe.cmd("HSET").arg(&key);
        for (f, v) in &self.fields {
            cmd.arg(*f).arg(v);
        }
        pipe.ignore();
    }
}

/// Appends an event to `tokenwarden:events`, capped at about `maxlen` entries.
pub fn add_event(
    pipe: &mut Pipeline,
    maxlen: usize,
    kind: &str,
    id: &ProviderId,
    result: &str,
    detail: &str,
) {
    pipe.cmd("XADD")
        .arg(EVENTS_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen.max(1))
        .arg("*")
        .arg("type")
        .arg(kind)
        .arg("tenant")
        .arg(&*id.tenant)
        .arg("provider")
        .arg(&*id.provider)
        .arg("result")
        .arg(result)
        .arg("detail")
        .arg(detail)
        .ignore();
}

/// Deletes the health hash of a provider that left the registry.
pub fn add_delete(pipe: &mut Pipeline, id: &ProviderId) {
    pipe.cmd("DEL").arg(id.health_key()).ignore();
}
