//! The fleet: what this replica knows of every tracked provider, in memory.
//!
//! Written by the registry (records found, changed, removed) and by refresh attempts
//! (outcomes); read at scrape time to render the state gauges, so a removed provider's series
//! disappear with its entry. Holds no secrets: refreshes re-read the record under the lock.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use chrono::{DateTime, Utc};

use crate::keys::{FastMap, ProviderId};

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
    /// The API refused the access token (401): a verdict about that token, which the next
    /// successful refresh replaces.
    pub refused: bool,
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
    /// Last successful refresh by any replica that this one saw through (SPEC 5's
    /// `token_last_refresh_success_timestamp_seconds`); retries do not move it.
    pub last_success: Option<DateTime<Utc>>,
    /// A token answer is held (journal or memory) whose write-back Redis has not confirmed:
    /// no new attempt until the replay settles it.
    pub pending: bool,
    /// A token call may have reached the provider without its answer reaching us: a later
    /// `invalid_grant` is `lost_in_flight`, not the gateway's fault.
    pub maybe_lost: bool,
    /// An `invalid_grant` seen while replicas may still be replaying (after a Redis outage, or
    /// with a foreign reservation seen): re-read and try once more before `reauth_required`.
    pub suspect: Option<String>,
    /// The lock key is of the wrong type: nobody can take it.
    pub lock_stuck: bool,
    /// Bumped by every local change, so a registry read that started before it is not
    /// applied over it.
    pub version: u64,
    /// `auth_type=api_key`: probed, never refreshed (no deadline).
    pub probe_only: bool,
    /// The refresh token was refused for good and the record holds the credential of the
    /// catalog's fallback grant: the next attempt (a new lock hold) uses that grant, once.
    pub fallback: bool,
    /// A slot reserved in the provider's token budget (`refresh::budget`): the attempt at
    /// this time spends it.
    pub budget_ticket: Option<DateTime<Utc>>,
    /// The catalog's `max_refresh_interval` for this record, when it sets one.
    pub max_refresh_interval: Option<std::time::Duration>,
    /// Credentials a human must renew, and when they expire.
    pub credential_expiry: Vec<crate::registry::record::CredentialExpiry>,
    /// Consecutive failed health probes (`failing` at `failing_after`).
    pub probe_failures: u32,
    /// The last eight probe results, newest in bit 0 (1 = failed): a failure among the last
    /// five is `degraded` (intermittent answers).
    pub probe_history: u8,
    /// Observe mode: when tokenwarden would have refreshed the current token (its deadline
    /// fired and no call was made). Cleared by a refresh of ours or the switch to `active`.
    pub would_refresh_at: Option<DateTime<Utc>>,
    /// [`ShortHash`] of the record's refresh token as last read or written (never the token).
    pub rt_hash: Option<ShortHash>,
    /// Short hashes of refresh tokens this record held before and that were replaced (by our
    /// rotations or by a change read), newest last, `0` for an empty slot. Inline: no
    /// allocation per provider.
    pub replaced: [ShortHash; REPLACED_HISTORY],
    /// The record went back to a replaced refresh token (a stale whole-record write).
    pub stale_write: Option<Box<StaleWrite>>,
}

/// A refresh token's SHA-1: what tokenwarden remembers of tokens, never the token.
pub type TokenHash = [u8; 20];

/// The first 8 bytes of a refresh token's SHA-1 (never 0): enough to recognise a token
/// again, small enough to keep a few per provider.
pub type ShortHash = u64;

/// The [`ShortHash`] of a full hash.
pub fn short_hash(h: &TokenHash) -> ShortHash {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b).max(1)
}

/// How many replaced refresh tokens a provider remembers.
pub const REPLACED_HISTORY: usize = 4;

/// A stale whole-record write and where its repair stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleWrite {
    /// The replaced refresh token the record holds again.
    pub stale: TokenHash,
    /// The refresh token it held before the write (the one to restore).
    pub newer: ShortHash,
    pub repair: RepairState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairState {
    /// A repair from the journal is running or due.
    Pending,
    /// This replica's journal lacks the newer tokens; another replica (the one that rotated)
    /// may still repair it: one more look before saying so.
    Retrying,
    /// The journal no longer holds the newer tokens.
    Unrepairable,
    /// Observe mode: reported, not repaired.
    Observed,
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
            last_success: None,
            pending: false,
            maybe_lost: false,
            suspect: None,
            lock_stuck: false,
            version: 0,
            probe_only: false,
            fallback: false,
            budget_ticket: None,
            max_refresh_interval: None,
            credential_expiry: Vec::new(),
            probe_failures: 0,
            probe_history: 0,
            would_refresh_at: None,
            rt_hash: None,
            replaced: [0; REPLACED_HISTORY],
            stale_write: None,
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
        } else if self.consecutive_failures >= failing_after
            || (failing_after > 0 && self.probe_failures >= failing_after)
        {
            HealthState::Failing
        } else if self.consecutive_failures > 0
            || self.pending
            || self.lock_stuck
            || self.stale_write.is_some()
            || self.suspect.is_some()
            || self.fallback
            || self.probe_history & 0x1f != 0
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
                .or_else(|| self.lock_stuck.then(|| "lock_stuck".to_string()))
                .or_else(|| self.stale_write.as_ref().map(|s| match s.repair {
                    RepairState::Pending | RepairState::Retrying => "stale_write: the record went back to a refresh token already replaced (a whole record written back); repairing from the journal".to_string(),
                    RepairState::Unrepairable => "stale_write: the record went back to a refresh token already replaced, and no journal entry holds the newer one; re-authorisation may follow".to_string(),
                    RepairState::Observed => "stale_write: the record went back to a refresh token already replaced (observe mode: not repaired); re-authorisation may follow".to_string(),
                }))
                .or_else(|| {
                    self.pending.then(|| {
                        "write_unconfirmed: a rotated token is held in the journal".to_string()
                    })
                })
                .or_else(|| {
                    self.suspect
                        .as_ref()
                        .map(|c| format!("{c} during recovery: re-reading before re-authorisation"))
                })
                .or_else(|| {
                    self.fallback.then(|| {
                        "refresh token refused: trying the fallback grant once".to_string()
                    })
                })
                .or_else(|| {
                    self.probe
                        .as_ref()
                        .filter(|p| !p.ok || p.slow)
                        .map(|p| p.detail.clone())
                })
                .or_else(|| {
                    (self.probe_history & 0x1f != 0)
                        .then(|| "intermittent health probe failures".to_string())
                })
                .or_else(|| self.note.clone())
                .or_else(|| {
                    self.would_refresh_at
                        .filter(|_| self.next_refresh.is_none())
                        .map(|at| {
                            format!(
                                "observe mode: tokenwarden would have refreshed at {}",
                                crate::timestamp::iso_utc(at)
                            )
                        })
                })
                .unwrap_or_default(),
        }
    }
}

/// The providers map: each [`Tracked`] boxed, so that growing the map moves pointers, not
/// whole states (at 100,000 providers the rehashes of an unboxed map were a tenth of a
/// start's CPU), hashed with foldhash (seeded per process) rather than SipHash.
pub type Providers = FastMap<ProviderId, Box<Tracked>>;

/// All tracked providers of this replica.
#[derive(Debug, Default)]
pub struct Fleet {
    pub providers: Providers,
    next_version: u64,
}

impl Fleet {
    /// The version of the last change: a read that starts now carries it.
    pub fn version(&self) -> u64 {
        self.next_version
    }

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
