//! The fleet: what this replica knows of every tracked provider, in memory.
//!
//! Written by the registry (records found, changed, removed) and by refresh attempts
//! (outcomes); read at scrape time to render the state gauges, so a removed provider's series
//! disappear with its entry. Holds no secrets: refreshes re-read the record under the lock.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};

use crate::keys::ProviderId;

/// Health state of SPEC 2, in the order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HealthState {
    Inactive,
    InvalidRecord,
    ReauthRequired,
    Failing,
    Degraded,
    Healthy,
}

impl HealthState {
    pub const ALL: [HealthState; 6] = [
        HealthState::Inactive,
        HealthState::InvalidRecord,
        HealthState::ReauthRequired,
        HealthState::Failing,
        HealthState::Degraded,
        HealthState::Healthy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Inactive => "inactive",
            HealthState::InvalidRecord => "invalid_record",
            HealthState::ReauthRequired => "reauth_required",
            HealthState::Failing => "failing",
            HealthState::Degraded => "degraded",
            HealthState::Healthy => "healthy",
        }
    }
}

/// What the record itself says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Active,
    Inactive,
    Invalid {
        reason: &'static str,
        detail: String,
    },
}

/// The last health probe of a provider.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    pub ok: bool,
    /// Answered, but slower than `health.slow_probe_ms`.
    pub slow: bool,
    pub latency_ms: u64,
    pub at: DateTime<Utc>,
    /// Why it failed or was slow; never a secret.
    pub detail: String,
}

impl ProbeResult {
    /// Marks an answered probe slow when it took longer than `slow_ms`.
    pub fn with_slow(mut self, slow_ms: u64) -> ProbeResult {
        if self.ok && self.latency_ms > slow_ms {
            self.slow = true;
            self.detail = format!("slow health probe: {} ms", self.latency_ms);
        }
        self
    }
}

/// One tracked provider.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub provider_type: Arc<str>,
    pub verdict: Verdict,
    /// Fingerprint of the record's light fields as last read or written by us.
    pub fingerprint: u64,
    /// Set by a permanent refresh error; cleared when the record changes.
    pub reauth: Option<String>,
    pub consecutive_failures: u32,
    /// Extra word for health `reason` (for example a defaulted lifetime).
    pub note: Option<String>,
    pub token_expiry: Option<DateTime<Utc>>,
    /// When the current token was issued (by us) or first seen.
    pub issued_at: DateTime<Utc>,
    /// Last successful refresh, or first sight: the base of `max_refresh_interval`.
    pub last_refresh: DateTime<Utc>,
    pub refresh_token_expiry: Option<DateTime<Utc>>,
    pub next_refresh: Option<DateTime<Utc>>,
    pub last_result: Option<&'static str>,
    /// Last health probe result, when probes run.
    pub up: Option<bool>,
    pub probe: Option<ProbeResult>,
    /// Bumped by every local change, so a registry read that started before it is not
    /// applied over it.
    pub version: u64,
}

impl Tracked {
    pub fn new(
        provider_type: &str,
        verdict: Verdict,
        fingerprint: u64,
        now: DateTime<Utc>,
    ) -> Tracked {
        Tracked {
            provider_type: Arc::from(provider_type),
            verdict,
            fingerprint,
            reauth: None,
            consecutive_failures: 0,
            note: None,
            token_expiry: None,
            issued_at: now,
            last_refresh: now,
            refresh_token_expiry: None,
            next_refresh: None,
            last_result: None,
            up: None,
            probe: None,
            version: 0,
        }
    }

    /// SPEC 2's state: the first that applies.
    pub fn state(&self, failing_after: u32) -> HealthState {
        match self.verdict {
            Verdict::Inactive => return HealthState::Inactive,
            Verdict::Invalid { .. } => return HealthState::InvalidRecord,
            Verdict::Active => {}
        }
        if self.reauth.is_some() {
            HealthState::ReauthRequired
        } else if self.consecutive_failures >= failing_after {
            HealthState::Failing
        } else if self.consecutive_failures > 0
            || self.probe.as_ref().is_some_and(|p| !p.ok || p.slow)
        {
            HealthState::Degraded
        } else {
            HealthState::Healthy
        }
    }

    /// SPEC 2's `reason` for the current state.
    pub fn reason(&self) -> String {
        match &self.verdict {
            Verdict::Invalid { reason, detail } => format!("{reason}: {detail}"),
            Verdict::Inactive => String::new(),
            Verdict::Active => self
                .reauth
                .clone()
                .or_else(|| {
                    self.probe
                        .as_ref()
                        .filter(|p| !p.ok || p.slow)
                        .map(|p| p.detail.clone())
                })
                .or_else(|| self.note.clone())
                .unwrap_or_default(),
        }
    }
}

/// All tracked providers of this replica.
#[derive(Debug, Default)]
pub struct Fleet {
    pub providers: HashMap<ProviderId, Tracked>,
    next_version: u64,
}

impl Fleet {
    /// A fresh version number for a local change.
    pub fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub fn count_by_state(&self, failing_after: u32) -> [(HealthState, usize); 6] {
        let mut counts = HealthState::ALL.map(|s| (s, 0usize));
        for t in self.providers.values() {
            let s = t.state(failing_after);
            if let Some(c) = counts.iter_mut().find(|(st, _)| *st == s) {
                c.1 += 1;
            }
        }
        counts
    }
}

/// The fleet shared between the engine, refresh tasks and the metrics endpoint.
#[derive(Debug, Clone, Default)]
pub struct SharedFleet(Arc<RwLock<Fleet>>);

impl SharedFleet {
    pub fn read(&self) -> RwLockReadGuard<'_, Fleet> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Fleet> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_precedence() {
        let now = Utc::now();
        let mut t = Tracked::new("goto", Verdict::Active, 1, now);
        assert_eq!(t.state(3), HealthState::Healthy);
        t.consecutive_failures = 1;
        assert_eq!(t.state(3), HealthState::Degraded);
        t.consecutive_failures = 3;
        assert_eq!(t.state(3), HealthState::Failing);
        t.reauth = Some("invalid_grant".into());
        assert_eq!(t.state(3), HealthState::ReauthRequired);
        t.verdict = Verdict::Invalid {
            reason: "bad_scopes",
            detail: "x".into(),
        };
        assert_eq!(t.state(3), HealthState::InvalidRecord);
        t.verdict = Verdict::Inactive;
        assert_eq!(t.state(3), HealthState::Inactive);
    }
}
