//! The one place that decides what every event means for a provider.
//!
//! Every event about a provider is an [`Input`]: a record read from Redis (by the registry
//! follower or under the refresh lock), a record gone from the registry, the typed outcome
//! of a refresh [`Attempt`], a health probe's result, a journal replay, a deadline passed in
//! observe mode ([`Input::WouldRefresh`]), a change of `refresh.mode` ([`Input::Mode`]), a
//! stale-write repair's outcome ([`Input::Repair`]). [`transition`] takes
//! the provider's tracked state, the input, the [`Policies`], the clock and an rng, and
//! returns a [`Transition`]: the new tracked state (its `next_refresh` is the one deadline the
//! engine keeps), the health fields to write, the event for `tokenwarden:events`, the
//! `token_refresh_total{result}` label and one log line. It is pure: no I/O, no globals, no
//! clock of its own. Only the engine applies its answers ([`crate::engine`]); the modules
//! that make calls (refresh, probes, the registry follower, the replayer) only return
//! typed outcomes.
//!
//! [`precheck`] is the same decision seen from inside an attempt: given the record just read
//! under the lock, call the token endpoint or not; [`may_call`] is the part asked before the
//! lock (never in observe mode).
//!
//! Stale whole-record writes: each provider keeps the short hashes of refresh tokens its
//! record held and that were replaced ([`Tracked::replaced`]); a read whose refresh token is
//! one of them is a stale write: reported, never sent to the provider, and repaired (a
//! [`RepairRequest`] for [`crate::refresh::repair`]) unless in observe mode.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tracing::Level;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::fleet::{
    short_hash, ProbeResult, RepairState, ShortHash, StaleWrite, TokenHash, Tracked, Verdict,
    REPLACED_HISTORY,
};
use crate::health::{HealthUpdate, StoredHealth};
use crate::refresh::reserve::token_digest;
use crate::registry::record::RecordState;
use crate::retry::RetryPolicy;
use crate::schedule::policy::{Lifetime, RefreshPolicy};
use crate::telemetry::metrics::result;
use crate::timestamp::iso_utc;

/// The settings the decisions depend on.
#[derive(Debug, Clone)]
pub struct Policies {
    pub refresh: RefreshPolicy,
    pub retry: RetryPolicy,
    pub failing_after: u32,
    /// The lock's expiry: an attempt whose call may still be in flight waits at least this.
    pub lock_ttl: Duration,
    /// How soon to look again when another replica holds the lock or a reservation.
    pub lock_busy_retry: Duration,
    /// After Redis comes back, how long replicas get to replay held answers.
    pub recovery_grace: Duration,
    /// Providers whose Redis write failed try again this soon (the engine holds every
    /// attempt while Redis is down, so this is not a busy loop).
    pub redis_retry: Duration,
    pub slow_probe_ms: u64,
    pub catalog: Catalog,
    /// `refresh.mode = "observe"`: no token call and no write to a gateway field; a deadline
    /// that fires is recorded as "would refresh" instead.
    pub observe: bool,
}

impl Policies {
    pub fn from_config(cfg: &Config) -> Policies {
        Policies {
            refresh: cfg.refresh_policy(),
            retry: cfg.retry_policy(),
            failing_after: cfg.refresh.failing_after,
            lock_ttl: Duration::from_secs(cfg.refresh.lock_ttl_secs),
            lock_busy_retry: Duration::from_secs(cfg.refresh.lock_busy_retry_secs),
            recovery_grace: Duration::from_millis(cfg.redis.recovery_grace_ms),
            redis_retry: Duration::from_secs(1),
            slow_probe_ms: cfg.health.slow_probe_ms,
            catalog: cfg.catalog.clone(),
            observe: cfg.refresh.mode == crate::config::Mode::Observe,
        }
    }
}

/// The clock, randomness and version of one decision.
pub struct Env<'a> {
    pub now: DateTime<Utc>,
    pub rng: &'a mut fastrand::Rng,
    /// The version the new state gets (the engine bumps it per applied change).
    pub version: u64,
}

/// A successful token answer, as far as the decisions need it (no secrets).
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    pub issued: DateTime<Utc>,
    pub expiry: DateTime<Utc>,
    pub refresh_token_expiry: Option<DateTime<Utc>>,
    /// The provider returned a new refresh token.
    pub rotated: bool,
    /// The record's fingerprint after the write.
    pub fingerprint: u64,
    /// Said in health `reason` (a defaulted or clamped lifetime).
    pub note: Option<String>,
    /// SHA-1 of the refresh token the record holds after the write.
    pub refresh_hash: Option<ShortHash>,
    /// SHA-1 of the refresh token this answer replaced (`None`: it did not rotate).
    pub replaced_hash: Option<ShortHash>,
}

/// Why an attempt made no call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// The record changed and is not due any more: someone else refreshed.
    NotDue,
    /// The record is not refreshable (inactive, invalid, gone from the set).
    NotRefreshable,
    /// Waiting for a re-authorisation.
    ReauthRequired,
    /// Observe mode: no token call of any kind.
    Observing,
    /// The record holds a refresh token that was already replaced (a stale whole-record
    /// write): sending it would be a reuse.
    StaleToken,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::NotDue => "already refreshed elsewhere",
            SkipReason::NotRefreshable => "record is not refreshable now",
            SkipReason::ReauthRequired => "reauth required",
            SkipReason::Observing => "observe mode: no token call",
            SkipReason::StaleToken => "the record holds a refresh token already replaced",
        }
    }
}

/// The typed outcome of one refresh attempt ([`crate::refresh::attempt`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Written back and confirmed.
    Refreshed(Refreshed),
    /// The answer is held (journal, else memory) and its write-back not confirmed: the
    /// replayer owns it now.
    Unconfirmed(Refreshed),
    /// The refresh token changed under us: someone else refreshed.
    Conflict {
        detail: String,
    },
    /// The record was deleted during the attempt.
    RecordGone,
    Skipped(SkipReason),
    /// Another replica holds the lock.
    Locked,
    /// Another live replica holds an unconfirmed answer for this refresh token.
    Reserved,
    /// The lock key has the wrong type: nobody can take it.
    LockStuck,
    /// The provider refused the grant for good (`invalid_grant`, ...).
    Permanent {
        code: String,
        detail: String,
        /// Replicas may still be replaying held answers (a recent Redis outage, or a
        /// foreign reservation was seen): not conclusive yet.
        during_recovery: bool,
        /// The refused grant has a fallback grant whose credential the record holds
        /// (RingCentral: a dead refresh token, a JWT credential).
        can_fall_back: bool,
    },
    /// The provider's token budget has no slot now: one is reserved `wait` from now, and
    /// nothing was sent. Not the provider's failure.
    Throttled {
        wait: Duration,
    },
    /// Worth retrying.
    Transient {
        kind: &'static str,
        detail: String,
        retry_after: Option<Duration>,
        /// The request may have reached the provider (timeout after sending).
        in_flight: bool,
    },
    /// Redis failed before any token call.
    Redis {
        detail: String,
    },
    /// A rotating refresh was not started: the journal cannot be written.
    JournalUnavailable,
}

/// A journal replay's outcome ([`crate::journal`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Replayed {
    /// Written now, or found already written: the answer reached Redis.
    Applied(Refreshed),
    /// The record holds newer tokens than the answer: nothing written.
    Superseded,
    /// The record is gone.
    Gone,
}

/// Why the engine asks [`crate::refresh::repair`] for a repair: the record holds the token
/// hashing to `stale`, and the one hashing to `newer` was there before. What is written is
/// the journal's to decide ([`crate::journal::chain`]): the newest tokens it holds, only over
/// a token it says was consumed; `stale` tells a record still stale from one changed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairRequest {
    pub stale: TokenHash,
    pub newer: ShortHash,
}

/// A stale-write repair's outcome ([`crate::refresh::repair`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Repaired {
    /// The newer tokens are back (written now, or found there already).
    Written(Refreshed),
    /// The record no longer holds the stale token: nothing written.
    Superseded,
    Gone,
    /// No recent confirmed journal entry holds the newer tokens.
    Unrepairable,
    /// Redis failed: nothing known to be written.
    Redis {
        detail: String,
    },
}

/// One event about one provider.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A record read from Redis; `read_version` is the fleet version taken before the read
    /// (`u64::MAX`: read under the lock, always newest). `stored` is what the provider's
    /// health hash held, read with a record the engine did not know yet: a plan it holds for
    /// the same token is kept, and a health write that would change nothing is left out.
    Read {
        state: &'a RecordState,
        read_version: u64,
        stored: Option<&'a StoredHealth>,
    },
    /// The record as a call (refresh, replay, repair) read it under the provider's lock:
    /// applied as a read that is always newest, but only to a provider still tracked. One
    /// forgotten while the call ran (it left the registry, or another replica serves it now)
    /// stays forgotten: the read under the lock is no reason to track it again.
    Seen(&'a RecordState),
    /// The provider left the registry.
    Gone,
    /// The provider is served by another replica now ([`crate::ownership`]).
    Released,
    Attempt(&'a Attempt),
    Probe {
        result: &'a ProbeResult,
        probed_version: u64,
    },
    Replay(&'a Replayed),
    /// Observe mode: the provider's deadline fired at `planned`; no call is made.
    WouldRefresh {
        planned: DateTime<Utc>,
    },
    /// `refresh.mode` changed (to the one in [`Policies::observe`]).
    Mode,
    Repair(&'a Repaired),
}

/// What to do with the health hash.
#[derive(Debug, Default)]
pub enum Health {
    #[default]
    Keep,
    Write(HealthUpdate),
    Delete,
}

/// An entry for `tokenwarden:events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: &'static str,
    pub result: &'static str,
    pub detail: String,
}

/// One log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    pub level: Level,
    pub message: &'static str,
    pub detail: String,
}

/// What [`transition`] decided.
#[derive(Debug, Default)]
pub struct Transition {
    /// The new state (`None`: forget the provider).
    pub tracked: Option<Tracked>,
    /// Whether anything changed (a stale read or an unchanged record change nothing).
    pub changed: bool,
    pub health: Health,
    pub event: Option<Event>,
    /// `token_refresh_total{result}`.
    pub result: Option<&'static str>,
    /// `registry_invalid_records_total{reason}`.
    pub invalid: Option<&'static str>,
    pub log: Option<Log>,
    /// A stale whole-record write was found (`stale_writes_total`).
    pub stale_write: bool,
    /// Start a repair of the stale write ([`crate::refresh::repair`]).
    pub repair: Option<RepairRequest>,
}

impl Transition {
    fn unchanged(prev: Option<&Tracked>) -> Transition {
        Transition {
            tracked: prev.cloned(),
            ..Transition::default()
        }
    }
}

fn log(level: Level, message: &'static str, detail: impl Into<String>) -> Option<Log> {
    Some(Log {
        level,
        message,
        detail: detail.into(),
    })
}

fn event(kind: &'static str, result: &'static str, detail: impl Into<String>) -> Option<Event> {
    Some(Event {
        kind,
        result,
        detail: detail.into(),
    })
}

/// `at + d`, saturating at the far future instead of overflowing.
pub fn add(at: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(d)
        .ok()
        .and_then(|d| at.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The decision.
pub fn transition(
    prev: Option<&Tracked>,
    input: Input<'_>,
    pol: &Policies,
    env: &mut Env<'_>,
) -> Transition {
    let mut tr = decide(prev, input, pol, env);
    // Whatever the input: nothing is scheduled for a provider that is not active, waits for
    // a human, has an answer held, or has no token to refresh.
    if let Some(t) = tr.tracked.as_mut() {
        if t.verdict != Verdict::Active || t.reauth.is_some() || t.pending || t.probe_only {
            t.next_refresh = None;
        }
    }
    tr
}

fn decide(
    prev: Option<&Tracked>,
    input: Input<'_>,
    pol: &Policies,
    env: &mut Env<'_>,
) -> Transition {
    match input {
        Input::Read {
            state,
            read_version,
            stored,
        } => on_read(prev, state, read_version, stored, pol, env),
        Input::Seen(state) => match prev {
            None => Transition::default(),
            Some(_) => on_read(prev, state, u64::MAX, None, pol, env),
        },
        Input::Gone => match prev {
            None => Transition::default(),
            Some(_) => Transition {
                tracked: None,
                changed: true,
                health: Health::Delete,
                event: event("removed", "removed", ""),
                log: log(Level::INFO, "provider left the registry: forgotten", ""),
                ..Transition::default()
            },
        },
        Input::Released => match prev {
            None => Transition::default(),
            Some(_) => Transition {
                tracked: None,
                changed: true,
                log: log(
                    Level::DEBUG,
                    "provider served by another replica now: forgotten here",
                    "",
                ),
                ..Transition::default()
            },
        },
        Input::Attempt(a) => match prev {
            // Forgotten while the attempt ran (removed from the registry): nothing to keep.
            None => Transition {
                result: Some(attempt_label(a)),
                ..Transition::default()
            },
            Some(p) => on_attempt(p, a, pol, env),
        },
        Input::Probe {
            result,
            probed_version,
        } => match prev {
            Some(p) if p.version == probed_version => on_probe(p, result, pol, env),
            _ => Transition::unchanged(prev),
        },
        Input::Replay(r) => match prev {
            None => Transition::default(),
            Some(p) => on_replay(p, r, pol, env),
        },
        Input::WouldRefresh { planned } => match prev {
            Some(p) => on_would_refresh(p, planned, pol, env),
            None => Transition::default(),
        },
        Input::Mode => match prev {
            Some(p) => on_mode(p, pol, env),
            None => Transition::default(),
        },
        Input::Repair(r) => match prev {
            Some(p) => on_repair(p, r, pol, env),
            None => Transition::default(),
        },
    }
}

/// Whether a token call may be made at all: never in observe mode. Asked before the lock is
/// taken (and again by [`precheck`]), so that observe mode writes nothing for an attempt.
pub fn may_call(pol: &Policies) -> Result<(), SkipReason> {
    if pol.observe {
        Err(SkipReason::Observing)
    } else {
        Ok(())
    }
}

/// The `token_refresh_total{result}` label of an attempt.
pub fn attempt_label(a: &Attempt) -> &'static str {
    match a {
        Attempt::Refreshed(_) => result::SUCCESS,
        Attempt::Unconfirmed(_) => result::UNCONFIRMED,
        Attempt::Conflict { .. } | Attempt::RecordGone => result::CONFLICT,
        Attempt::Skipped(_) => result::SKIPPED,
        Attempt::Locked | Attempt::Reserved => result::LOCKED,
        Attempt::LockStuck => result::LOCK_STUCK,
        Attempt::Permanent {
            during_recovery,
            can_fall_back,
            ..
        } => {
            if *during_recovery {
                result::TRANSIENT_ERROR
            } else if *can_fall_back {
                result::FALLBACK
            } else {
                result::REAUTH_REQUIRED
            }
        }
        Attempt::Throttled { .. } => result::THROTTLED,
        Attempt::Transient { .. } => result::TRANSIENT_ERROR,
        Attempt::Redis { .. } => result::REDIS_ERROR,
        Attempt::JournalUnavailable => result::JOURNAL_UNAVAILABLE,
    }
}

/// The state a record read gives, before versions are compared.
fn tracked_of_read(
    prev: Option<&Tracked>,
    state: &RecordState,
    stored: Option<&StoredHealth>,
    pol: &Policies,
    env: &mut Env<'_>,
) -> (Tracked, Option<(&'static str, String)>) {
    let now = env.now;
    let fp = state.fingerprint();
    match state {
        RecordState::Inactive { provider_type, .. } => (
            Tracked::new(provider_type, Verdict::Inactive, fp, now),
            None,
        ),
        RecordState::Invalid { error, .. } => (
            invalid_tracked(error.reason, &error.detail, fp, now),
            Some((error.reason, error.detail.clone())),
        ),
        RecordState::Valid(r) if r.probe_only() => match r.servable(&pol.catalog) {
            Err(e) => (
                invalid_tracked(e.reason, &e.detail, fp, now),
                Some((e.reason, e.detail)),
            ),
            Ok(()) => {
                // Nothing to refresh: tracked, probed, never scheduled.
                let mut t = Tracked::new(&r.provider_type, Verdict::Active, fp, now);
                t.probe_only = true;
                t.credential_expiry = r.credential_expiry.clone();
                if let Some(p) = prev {
                    t.up = p.up;
                    t.probe = p.probe.clone();
                    t.probe_failures = p.probe_failures;
                    t.probe_history = p.probe_history;
                }
                (t, None)
            }
        },
        RecordState::Valid(r) => match r.endpoint(&pol.catalog) {
            Err(e) => (
                invalid_tracked(e.reason, &e.detail, fp, now),
                Some((e.reason, e.detail)),
            ),
            Ok(endpoint) => {
                let mut t = Tracked::new(&r.provider_type, Verdict::Active, fp, now);
                t.max_refresh_interval = endpoint.max_refresh_interval;
                t.credential_expiry = r.credential_expiry.clone();
                if let Some(p) = prev {
                    t.last_refresh = p.last_refresh;
                    t.last_success = p.last_success;
                    t.refresh_token_expiry = p.refresh_token_expiry;
                    t.up = p.up;
                    t.probe = p.probe.clone();
                    t.probe_failures = p.probe_failures;
                    t.probe_history = p.probe_history;
                    t.would_refresh_at = p.would_refresh_at;
                    t.replaced = p.replaced;
                }
                let full = token_digest(r.refresh_token.expose());
                let h = short_hash(&full);
                t.rt_hash = Some(h);
                if let Some(old) = prev.and_then(|p| p.rt_hash).filter(|old| *old != h) {
                    if t.replaced.contains(&h) {
                        // Back to a token already replaced: the one it held is the newest
                        // known (or, when already stale, the one the first stale write hid).
                        let newer = prev
                            .and_then(|p| p.stale_write.as_ref())
                            .map_or(old, |s| s.newer);
                        t.stale_write = Some(Box::new(StaleWrite {
                            stale: full,
                            newer,
                            repair: if pol.observe {
                                RepairState::Observed
                            } else {
                                RepairState::Pending
                            },
                        }));
                    } else {
                        remember_replaced(&mut t.replaced, old);
                    }
                }
                t.token_expiry = r.token_expiry.map(|e| e.at);
                let next = match t.token_expiry {
                    None => now,
                    Some(expiry) => {
                        let sched = schedule_of(pol, &t);
                        let life = Lifetime {
                            issued: now,
                            expiry,
                        };
                        // A restart keeps the previous process's plan for the same token
                        // when the policy could have made it now: no new jitter, no rewrite.
                        let kept = stored
                            .filter(|_| prev.is_none())
                            .and_then(|s| s.plan_for(expiry))
                            .filter(|at| {
                                *at >= now
                                    && *at
                                        <= sched.latest_refresh(
                                            life,
                                            t.last_refresh,
                                            t.refresh_token_expiry,
                                            now,
                                        )
                            });
                        match kept {
                            Some(at) => at,
                            None => sched.next_refresh(
                                life,
                                t.last_refresh,
                                t.refresh_token_expiry,
                                now,
                                env.rng,
                            ),
                        }
                    }
                };
                t.next_refresh = Some(next);
                (t, None)
            }
        },
    }
}

/// Adds `h` to a replaced-token history (once, newest last, the oldest dropped).
fn remember_replaced(history: &mut [ShortHash; REPLACED_HISTORY], h: ShortHash) {
    let mut kept: Vec<ShortHash> = history
        .iter()
        .copied()
        .filter(|x| *x != 0 && *x != h)
        .collect();
    kept.push(h);
    let kept = &kept[kept.len().saturating_sub(REPLACED_HISTORY)..];
    *history = [0; REPLACED_HISTORY];
    history[REPLACED_HISTORY - kept.len()..].copy_from_slice(kept);
}

fn invalid_tracked(reason: &'static str, detail: &str, fp: u64, now: DateTime<Utc>) -> Tracked {
    Tracked::new(
        "",
        Verdict::Invalid {
            reason,
            detail: detail.to_string(),
        },
        fp,
        now,
    )
}

fn on_read(
    prev: Option<&Tracked>,
    state: &RecordState,
    read_version: u64,
    stored: Option<&StoredHealth>,
    pol: &Policies,
    env: &mut Env<'_>,
) -> Transition {
    let fp = state.fingerprint();
    if let Some(p) = prev {
        if (read_version != u64::MAX && p.version > read_version) || p.fingerprint == fp {
            return Transition::unchanged(prev);
        }
    }
    // A provider leaving a stale write gets its health written in full (the read clears it).
    let was_active = prev.is_some_and(|t| {
        t.verdict == Verdict::Active && t.reauth.is_none() && t.stale_write.is_none()
    });
    let (mut t, invalid) = tracked_of_read(prev, state, stored, pol, env);
    t.version = if read_version == u64::MAX {
        env.version
    } else {
        read_version
    };
    let now = env.now;
    let mut out = Transition {
        changed: true,
        ..Transition::default()
    };
    if let Some(s) = t.stale_write.clone() {
        // Never refresh with a token already used; the repair (or the next change) decides.
        t.next_refresh = None;
        out.stale_write = true;
        let detail = match s.repair {
            RepairState::Pending => {
                out.repair = Some(RepairRequest {
                    stale: s.stale,
                    newer: s.newer,
                });
                "the record went back to a refresh token already replaced (a whole record written back): repairing from the journal"
            }
            _ => "the record went back to a refresh token already replaced (a whole record written back); observe mode: not repaired, re-authorisation may follow",
        };
        out.event = event("stale_write", "stale_write", detail);
        out.log = log(Level::WARN, "stale whole-record write detected", detail);
        out.health = Health::Write(HealthUpdate::from_tracked(&t, pol.failing_after, now));
        out.tracked = Some(t);
        return out;
    }
    match (&t.verdict, invalid) {
        (Verdict::Inactive, _) => {
            out.log = log(Level::INFO, "provider inactive: tracked, not refreshed", "");
            out.health = Health::Write(HealthUpdate::from_tracked(&t, pol.failing_after, now));
        }
        (Verdict::Invalid { .. }, Some((reason, detail))) => {
            out.invalid = Some(reason);
            out.event = event(
                "invalid_record",
                "invalid_record",
                format!("{reason}: {detail}"),
            );
            out.log = log(
                Level::WARN,
                "invalid provider record: not refreshed until it changes",
                format!("{reason}: {detail}"),
            );
            out.health = Health::Write(HealthUpdate::from_tracked(&t, pol.failing_after, now));
        }
        _ => {
            if prev.is_none() || was_active {
                // Another replica may know more about this provider's health: write only
                // what a read tells, and the state only where none is set.
                let mut h = HealthUpdate::default();
                h.set_if_absent("state", t.state(pol.failing_after).as_str());
                h.set(
                    "token_expiry",
                    t.token_expiry.map(iso_utc).unwrap_or_default(),
                );
                h.set(
                    "next_refresh_at",
                    t.next_refresh.map(iso_utc).unwrap_or_default(),
                );
                h.set("updated_at", iso_utc(now));
                out.health = Health::Write(h);
            } else {
                out.health = Health::Write(HealthUpdate::from_tracked(&t, pol.failing_after, now));
            }
        }
    }
    // First sight: a health hash that already says all this (a restart) is left alone.
    if let (None, Some(s), Health::Write(h)) = (prev, stored, &out.health) {
        if !h.changes(s) {
            out.health = Health::Keep;
        }
    }
    out.tracked = Some(t);
    out
}

/// Decides inside an attempt, holding the lock, from the record just read: call or not.
/// `Ok(())`: call. The record read is applied by the engine as a [`Input::Read`] anyway.
pub fn precheck(
    known: Option<&Tracked>,
    state: &RecordState,
    forced: bool,
    pol: &Policies,
    env: &mut Env<'_>,
) -> Result<(), SkipReason> {
    may_call(pol)?;
    let RecordState::Valid(r) = state else {
        return Err(SkipReason::NotRefreshable);
    };
    if r.endpoint(&pol.catalog).is_err() {
        return Err(SkipReason::NotRefreshable);
    }
    let h = short_hash(&token_digest(r.refresh_token.expose()));
    if known.is_some_and(|t| t.replaced.contains(&h)) {
        // Forced or not: the provider would see a reuse.
        return Err(SkipReason::StaleToken);
    }
    let changed = known.is_none_or(|t| t.fingerprint != r.fingerprint);
    if forced {
        return Ok(());
    }
    if changed {
        // Someone (another replica, the gateway) changed the record since this was planned.
        let (t, _) = tracked_of_read(known, state, None, pol, env);
        let due = t
            .next_refresh
            .is_none_or(|n| n <= env.now + TimeDelta::seconds(1));
        if !due {
            return Err(SkipReason::NotDue);
        }
        return Ok(());
    }
    if known.is_some_and(|t| t.reauth.is_some()) {
        return Err(SkipReason::ReauthRequired);
    }
    Ok(())
}

/// The refresh schedule of one provider: the catalog's `max_refresh_interval` for it, when
/// it sets one, over the configured default.
fn schedule_of<'p>(pol: &'p Policies, t: &Tracked) -> std::borrow::Cow<'p, RefreshPolicy> {
    match t
        .max_refresh_interval
        .and_then(|d| TimeDelta::from_std(d).ok())
    {
        Some(d) if d > TimeDelta::zero() => {
            let mut p = pol.refresh.clone();
            p.max_refresh_interval = d;
            std::borrow::Cow::Owned(p)
        }
        _ => std::borrow::Cow::Borrowed(&pol.refresh),
    }
}

/// The schedule after a success.
fn succeeded(mut t: Tracked, r: &Refreshed, pol: &Policies, env: &mut Env<'_>) -> Tracked {
    t.verdict = Verdict::Active;
    t.fingerprint = r.fingerprint;
    t.reauth = None;
    t.suspect = None;
    t.maybe_lost = false;
    t.pending = false;
    t.lock_stuck = false;
    t.consecutive_failures = 0;
    // A probe's verdict was about the access token just replaced; a refusal of that token
    // (401) is no intermittent failure of the API either.
    if t.probe.as_ref().is_some_and(|p| p.refused) {
        t.probe_history &= !1;
        t.probe_failures = 0;
    }
    t.probe = None;
    t.stale_write = None;
    t.would_refresh_at = None;
    if let Some(old) = r.replaced_hash.filter(|old| Some(*old) != r.refresh_hash) {
        remember_replaced(&mut t.replaced, old);
    }
    if r.refresh_hash.is_some() {
        t.rt_hash = r.refresh_hash;
    }
    t.note = r.note.clone();
    t.token_expiry = Some(r.expiry);
    t.issued_at = r.issued;
    t.last_refresh = r.issued;
    t.last_success = Some(r.issued);
    if r.refresh_token_expiry.is_some() {
        t.refresh_token_expiry = r.refresh_token_expiry;
    }
    t.fallback = false;
    t.next_refresh = Some(schedule_of(pol, &t).next_refresh(
        Lifetime {
            issued: r.issued,
            expiry: r.expiry,
        },
        r.issued,
        t.refresh_token_expiry,
        env.now,
        env.rng,
    ));
    t.last_result = Some(result::SUCCESS);
    t
}

fn full_health(
    t: &Tracked,
    pol: &Policies,
    now: DateTime<Utc>,
    res: &str,
    err: Option<&str>,
) -> Health {
    let mut h = HealthUpdate::from_tracked(t, pol.failing_after, now);
    h.attempt(now, res, err);
    Health::Write(h)
}

fn on_attempt(prev: &Tracked, a: &Attempt, pol: &Policies, env: &mut Env<'_>) -> Transition {
    let now = env.now;
    let mut t = prev.clone();
    t.version = env.version;
    let label = attempt_label(a);
    let mut out = Transition {
        changed: true,
        result: Some(label),
        ..Transition::default()
    };
    // A reserved budget slot is spent by this attempt, whatever it did.
    t.budget_ticket = None;
    match a {
        Attempt::Refreshed(r) => {
            t = succeeded(t, r, pol, env);
            out.health = full_health(&t, pol, now, result::SUCCESS, None);
            out.event = event(
                "refresh",
                result::SUCCESS,
                r.note.clone().unwrap_or_default(),
            );
            out.log = log(
                Level::INFO,
                "token refreshed",
                format!(
                    "rotated={} expires_in_secs={} next_refresh={}",
                    r.rotated,
                    (r.expiry - r.issued).num_seconds(),
                    t.next_refresh.map(iso_utc).unwrap_or_default()
                ),
            );
        }
        Attempt::Unconfirmed(_) => {
            t.pending = true;
            t.next_refresh = None;
            t.last_result = Some(result::UNCONFIRMED);
            let err = "token answer held: the write-back to Redis is not confirmed yet";
            out.health = full_health(&t, pol, now, result::UNCONFIRMED, Some(err));
            out.log = log(
                Level::WARN,
                "token answer held in the journal until Redis confirms the write-back",
                "",
            );
        }
        Attempt::Conflict { detail } => {
            // The engine applied the record read under the lock before this: its schedule
            // stands.
            t.last_result = Some(result::CONFLICT);
            if t.next_refresh.is_none() && t.verdict == Verdict::Active && t.reauth.is_none() {
                t.next_refresh = Some(now);
            }
            out.health = full_health(&t, pol, now, result::CONFLICT, Some(detail));
            out.event = event("conflict", result::CONFLICT, detail.clone());
            out.log = log(
                Level::WARN,
                "refresh token changed under us: another writer refreshed; this call's tokens were discarded",
                detail.clone(),
            );
        }
        Attempt::RecordGone => {
            t.next_refresh = None;
            t.last_result = Some(result::CONFLICT);
            out.event = event(
                "conflict",
                result::CONFLICT,
                "record deleted during the refresh",
            );
            out.log = log(
                Level::WARN,
                "record deleted during the refresh; new tokens discarded",
                "",
            );
        }
        Attempt::Skipped(reason) => {
            t.last_result = Some(result::SKIPPED);
            if *reason == SkipReason::ReauthRequired {
                t.next_refresh = None;
            }
            if *reason == SkipReason::StaleToken {
                t.next_refresh = None;
                if let Some(s) = t
                    .stale_write
                    .as_ref()
                    .filter(|s| matches!(s.repair, RepairState::Pending | RepairState::Retrying))
                {
                    if !pol.observe {
                        out.repair = Some(RepairRequest {
                            stale: s.stale,
                            newer: s.newer,
                        });
                    }
                }
            }
            out.log = log(Level::DEBUG, "attempt skipped", reason.as_str());
        }
        Attempt::Locked | Attempt::Reserved => {
            t.next_refresh = Some(add(now, pol.lock_busy_retry));
            t.last_result = Some(result::LOCKED);
            out.log = log(
                Level::DEBUG,
                if matches!(a, Attempt::Locked) {
                    "lock held by another replica; looking again later"
                } else {
                    "another replica holds an unconfirmed answer for this token; looking again later"
                },
                "",
            );
        }
        Attempt::LockStuck => {
            t.lock_stuck = true;
            t.next_refresh = Some(add(now, pol.lock_busy_retry));
            t.last_result = Some(result::LOCK_STUCK);
            let err = "lock_stuck: the lock key is not a string";
            if !prev.lock_stuck {
                out.log = log(
                    Level::ERROR,
                    "lock key is not a string: no refresh until it is removed",
                    "",
                );
                out.event = event("failure", result::LOCK_STUCK, err);
            }
            out.health = full_health(&t, pol, now, result::LOCK_STUCK, Some(err));
        }
        Attempt::Permanent {
            code,
            detail,
            during_recovery,
            can_fall_back,
        } => {
            let err = if detail.is_empty() {
                code.clone()
            } else {
                format!("{code}: {detail}")
            };
            if *can_fall_back && !*during_recovery && !prev.fallback {
                // One attempt with the fallback grant, in a new lock hold, before a human is
                // asked.
                t.fallback = true;
                t.suspect = None;
                t.next_refresh = Some(now);
                t.last_result = Some(result::FALLBACK);
                out.health = full_health(&t, pol, now, result::FALLBACK, Some(&err));
                out.event = event("failure", result::FALLBACK, err.clone());
                out.log = log(
                    Level::WARN,
                    "refresh token refused: trying the fallback grant once before re-authorisation",
                    err,
                );
            } else if *during_recovery && prev.suspect.is_none() {
                t.suspect = Some(code.clone());
                t.next_refresh = Some(add(now, pol.recovery_grace.max(pol.lock_busy_retry)));
                t.last_result = Some(result::TRANSIENT_ERROR);
                out.health = full_health(&t, pol, now, result::TRANSIENT_ERROR, Some(&err));
                out.log = log(
                    Level::WARN,
                    "provider refused the refresh token while replicas may still be replaying held answers: re-reading the record before deciding",
                    err,
                );
            } else {
                let reason = if prev.maybe_lost && code == "invalid_grant" {
                    "lost_in_flight".to_string()
                } else {
                    code.clone()
                };
                t.reauth = Some(reason.clone());
                t.suspect = None;
                t.fallback = false;
                t.next_refresh = None;
                t.last_result = Some(result::REAUTH_REQUIRED);
                out.health = full_health(&t, pol, now, result::REAUTH_REQUIRED, Some(&err));
                out.event = event(
                    "reauth_required",
                    result::REAUTH_REQUIRED,
                    format!("{reason}: {err}"),
                );
                out.log = log(
                    Level::ERROR,
                    "re-authorisation required: no further attempts until the record changes",
                    format!("reason={reason} {err}"),
                );
            }
        }
        Attempt::Transient {
            kind: _,
            detail,
            retry_after,
            in_flight,
        } => {
            t.consecutive_failures = t.consecutive_failures.saturating_add(1);
            let mut delay = pol
                .retry
                .delay(t.consecutive_failures, *retry_after, env.rng);
            if *in_flight {
                // The provider may have used the token: the lock is left to expire.
                t.maybe_lost = true;
                delay = delay.max(pol.lock_ttl);
            }
            t.next_refresh = Some(add(now, delay));
            t.last_result = Some(result::TRANSIENT_ERROR);
            out.health = full_health(&t, pol, now, result::TRANSIENT_ERROR, Some(detail));
            out.event = event("failure", result::TRANSIENT_ERROR, detail.clone());
            out.log = log(
                Level::WARN,
                "token call failed; will retry",
                format!(
                    "{detail} consecutive_failures={} retry_at={}",
                    t.consecutive_failures,
                    t.next_refresh.map(iso_utc).unwrap_or_default()
                ),
            );
        }
        Attempt::Throttled { wait } => {
            // Nothing was sent: the provider did not fail. The reserved slot is kept.
            let at = add(now, *wait);
            t.next_refresh = Some(at);
            t.budget_ticket = Some(at);
            t.last_result = Some(result::THROTTLED);
            out.log = log(
                Level::DEBUG,
                "token budget has no slot now: waiting for the one reserved",
                format!("wait_ms={}", wait.as_millis()),
            );
        }
        Attempt::Redis { detail } => {
            t.next_refresh = Some(add(now, pol.redis_retry));
            t.last_result = Some(result::REDIS_ERROR);
            out.log = log(
                Level::WARN,
                "refresh postponed: redis error",
                detail.clone(),
            );
        }
        Attempt::JournalUnavailable => {
            t.next_refresh = Some(add(now, pol.redis_retry));
            t.last_result = Some(result::JOURNAL_UNAVAILABLE);
            out.log = log(
                Level::DEBUG,
                "rotating refresh postponed: the journal cannot be written",
                "",
            );
        }
    }
    // Nothing is scheduled for a provider that waits for a human, for a held answer, that
    // is not active, or that has nothing to refresh.
    if t.reauth.is_some() || t.pending || t.verdict != Verdict::Active || t.probe_only {
        t.next_refresh = None;
    }
    out.tracked = Some(t);
    out
}

fn on_probe(prev: &Tracked, r: &ProbeResult, pol: &Policies, env: &mut Env<'_>) -> Transition {
    let mut t = prev.clone();
    t.version = env.version;
    let was = t.state(pol.failing_after);
    t.up = Some(r.ok);
    t.probe_failures = if r.ok {
        0
    } else {
        t.probe_failures.saturating_add(1)
    };
    t.probe_history = (t.probe_history << 1) | u8::from(!r.ok);
    t.probe = Some(r.clone().with_slow(pol.slow_probe_ms));
    let now_state = t.state(pol.failing_after);
    let mut h = HealthUpdate::default();
    h.set("state", now_state.as_str());
    h.set("reason", t.reason());
    h.set("last_health_check_at", iso_utc(r.at));
    h.set("health_latency_ms", r.latency_ms.to_string());
    h.set("updated_at", iso_utc(r.at));
    let log_line = (was != now_state).then(|| Log {
        level: Level::INFO,
        message: "health probe changed the provider's state",
        detail: format!(
            "from={} to={} {}",
            was.as_str(),
            now_state.as_str(),
            r.detail
        ),
    });
    Transition {
        tracked: Some(t),
        changed: true,
        health: Health::Write(h),
        log: log_line,
        ..Transition::default()
    }
}

fn on_replay(prev: &Tracked, r: &Replayed, pol: &Policies, env: &mut Env<'_>) -> Transition {
    let now = env.now;
    let mut t = prev.clone();
    t.version = env.version;
    t.pending = false;
    let mut out = Transition {
        changed: true,
        ..Transition::default()
    };
    match r {
        Replayed::Applied(done) => {
            t = succeeded(t, done, pol, env);
            out.result = Some(result::SUCCESS);
            out.health = full_health(&t, pol, now, result::SUCCESS, None);
            out.event = event(
                "refresh",
                result::SUCCESS,
                "held answer written back from the journal",
            );
            out.log = log(Level::INFO, "held token answer written back", "");
        }
        Replayed::Superseded => {
            if t.next_refresh.is_none() && t.verdict == Verdict::Active && t.reauth.is_none() {
                t.next_refresh = Some(now);
            }
            let detail = "the record holds newer tokens than the held answer: nothing overwritten";
            out.health = full_health(&t, pol, now, result::CONFLICT, Some(detail));
            out.event = event("conflict", result::CONFLICT, detail);
            out.log = log(Level::WARN, "held token answer superseded", detail);
        }
        Replayed::Gone => {
            t.next_refresh = None;
            out.log = log(
                Level::INFO,
                "held token answer dropped: the record is gone",
                "",
            );
        }
    }
    if t.probe_only {
        t.next_refresh = None;
    }
    out.tracked = Some(t);
    out
}

/// Whether the schedule may run for `t` (active, not waiting for a human, an answer or a
/// repair).
fn schedulable(t: &Tracked) -> bool {
    t.verdict == Verdict::Active && t.reauth.is_none() && !t.pending && t.stale_write.is_none()
}

fn on_would_refresh(
    prev: &Tracked,
    planned: DateTime<Utc>,
    pol: &Policies,
    env: &mut Env<'_>,
) -> Transition {
    let now = env.now;
    let due = prev
        .next_refresh
        .is_some_and(|n| n <= now + TimeDelta::seconds(1));
    if !pol.observe || !schedulable(prev) || !due {
        return Transition::unchanged(Some(prev));
    }
    let mut t = prev.clone();
    t.version = env.version;
    t.would_refresh_at = Some(planned);
    // Nothing more to do until the record changes (the gateway refreshes) or the mode does.
    t.next_refresh = None;
    let mut h = HealthUpdate::from_tracked(&t, pol.failing_after, now);
    h.set("would_refresh_at", iso_utc(planned));
    let detail = format!(
        "observe mode: tokenwarden would have refreshed at {} (token expires at {}); no call made",
        iso_utc(planned),
        t.token_expiry.map(iso_utc).unwrap_or_default()
    );
    Transition {
        tracked: Some(t),
        changed: true,
        health: Health::Write(h),
        event: event("would_refresh", "observe", detail.clone()),
        log: log(
            Level::INFO,
            "observe mode: would refresh now; no call made",
            detail,
        ),
        ..Transition::default()
    }
}

fn on_mode(prev: &Tracked, pol: &Policies, env: &mut Env<'_>) -> Transition {
    let now = env.now;
    if pol.observe {
        return Transition::unchanged(Some(prev));
    }
    let mut t = prev.clone();
    t.version = env.version;
    let mut out = Transition::default();
    if let Some(s) = t
        .stale_write
        .as_mut()
        .filter(|s| s.repair == RepairState::Observed)
    {
        s.repair = RepairState::Pending;
        out.repair = Some(RepairRequest {
            stale: s.stale,
            newer: s.newer,
        });
        out.log = log(
            Level::WARN,
            "active mode: repairing the stale write seen in observe mode",
            "",
        );
    }
    let was = t.would_refresh_at.take();
    if was.is_some() && t.next_refresh.is_none() && schedulable(&t) {
        t.next_refresh = Some(now);
        out.log = log(
            Level::INFO,
            "active mode: the refresh let pass in observe mode is due now",
            was.map(iso_utc).unwrap_or_default(),
        );
    }
    if was.is_none() && out.repair.is_none() {
        return Transition::unchanged(Some(prev));
    }
    let mut h = HealthUpdate::from_tracked(&t, pol.failing_after, now);
    h.set("would_refresh_at", "");
    out.health = Health::Write(h);
    out.changed = true;
    out.tracked = Some(t);
    out
}

fn on_repair(prev: &Tracked, r: &Repaired, pol: &Policies, env: &mut Env<'_>) -> Transition {
    let now = env.now;
    let mut t = prev.clone();
    t.version = env.version;
    let mut out = Transition {
        changed: true,
        ..Transition::default()
    };
    match r {
        Repaired::Written(done) => {
            let fingerprint = t.fingerprint;
            t = succeeded(t, done, pol, env);
            if done.fingerprint == 0 {
                t.fingerprint = fingerprint;
            }
            let detail =
                "stale whole-record write repaired: the newer tokens are back from the journal";
            out.event = event("stale_write", "repaired", detail);
            out.log = log(Level::WARN, "stale whole-record write repaired", detail);
        }
        Repaired::Superseded => {
            t.stale_write = None;
            if t.next_refresh.is_none() && schedulable(&t) {
                t.next_refresh = Some(now);
            }
            out.log = log(
                Level::INFO,
                "stale write not repaired: the record changed meanwhile",
                "",
            );
        }
        Repaired::Gone => {
            t.stale_write = None;
            t.next_refresh = None;
        }
        Repaired::Unrepairable
            if t.stale_write
                .as_ref()
                .is_some_and(|s| s.repair == RepairState::Pending) =>
        {
            // Another replica's journal may hold the newer tokens: look again shortly (the
            // attempt then finds the stale token, skips and asks for the repair again).
            if let Some(s) = t.stale_write.as_mut() {
                s.repair = RepairState::Retrying;
            }
            t.next_refresh = Some(add(now, pol.lock_busy_retry));
            out.log = log(
                Level::INFO,
                "stale write: this replica's journal lacks the newer tokens; looking again",
                "",
            );
        }
        Repaired::Unrepairable => {
            if let Some(s) = t.stale_write.as_mut() {
                s.repair = RepairState::Unrepairable;
            }
            t.next_refresh = None;
            let detail = "stale whole-record write: no journal entry holds the newer tokens (another writer rotated them, or the entry is older than journal.confirmed_retention_secs); re-authorisation may follow";
            out.event = event("stale_write", "unrepairable", detail);
            out.log = log(
                Level::ERROR,
                "stale whole-record write not repairable",
                detail,
            );
        }
        Repaired::Redis { detail } => {
            // The stale write stands: the next attempt skips (the token is used) and asks
            // for the repair again.
            t.next_refresh = Some(add(now, pol.redis_retry));
            out.log = log(
                Level::WARN,
                "stale write repair postponed: redis error",
                detail.clone(),
            );
        }
    }
    if t.verdict != Verdict::Active || t.reauth.is_some() || t.pending {
        t.next_refresh = None;
    }
    out.health = Health::Write(HealthUpdate::from_tracked(&t, pol.failing_after, now));
    out.tracked = Some(t);
    out
}

#[cfg(test)]
mod tests {
    //! The decision as a table: every input against every state, on a fixed clock.
    use super::*;
    use crate::fleet::HealthState;
    use crate::registry::record::ProviderRecord;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    fn pol() -> Policies {
        let cfg = Config::load_from(None, &Default::default()).expect("defaults load");
        Policies::from_config(&cfg)
    }

    fn record(rt: &str, expiry: &str) -> RecordState {
        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        ProviderRecord::parse(&[
            f("provider_type", "goto"),
            f("status", "active"),
            f("auth_type", "oauth"),
            f("client_id", "cid"),
            f("client_secret", "secret"),
            f("refresh_token", rt),
            f("token_expiry", expiry),
        ])
    }

    fn inactive() -> RecordState {
        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        ProviderRecord::parse(&[f("provider_type", "goto"), f("status", "inactive")])
    }

    fn invalid() -> RecordState {
        record("rt", "not a time")
    }

    /// Every state a provider can be in, by name.
    fn states(p: &Policies) -> Vec<(&'static str, Option<Tracked>)> {
        let n = now();
        let base = |mut rng: fastrand::Rng| {
            let state = record("rt0", "2026-12-01T11:00:00+00:00");
            let t = transition(
                None,
                Input::Read {
                    state: &state,
                    read_version: 10,
                    stored: None,
                },
                p,
                &mut Env {
                    now: n,
                    rng: &mut rng,
                    version: 10,
                },
            );
            t.tracked.expect("valid record tracked")
        };
        let healthy = base(fastrand::Rng::with_seed(1));
        let with = |f: &dyn Fn(&mut Tracked)| {
            let mut t = healthy.clone();
            f(&mut t);
            Some(t)
        };
        let mut inactive_t = Tracked::new("goto", Verdict::Inactive, 11, n);
        inactive_t.version = 10;
        let mut invalid_t = invalid_tracked("bad_timestamp", "x", 12, n);
        invalid_t.version = 10;
        vec![
            ("untracked", None),
            ("inactive", Some(inactive_t)),
            ("invalid", Some(invalid_t)),
            ("healthy", Some(healthy.clone())),
            ("degraded", with(&|t| t.consecutive_failures = 1)),
            ("failing", with(&|t| t.consecutive_failures = 3)),
            (
                "reauth",
                with(&|t| {
                    t.reauth = Some("invalid_grant".into());
                    t.next_refresh = None;
                }),
            ),
            (
                "pending",
                with(&|t| {
                    t.pending = true;
                    t.next_refresh = None;
                }),
            ),
            (
                "suspect",
                with(&|t| t.suspect = Some("invalid_grant".into())),
            ),
            ("maybe_lost", with(&|t| t.maybe_lost = true)),
            ("lock_stuck", with(&|t| t.lock_stuck = true)),
            (
                "falling_back",
                with(&|t| {
                    t.fallback = true;
                    t.next_refresh = Some(n);
                }),
            ),
            (
                "ticket",
                with(&|t| t.budget_ticket = Some(n + TimeDelta::milliseconds(400))),
            ),
            (
                "probe_only",
                with(&|t| {
                    t.probe_only = true;
                    t.next_refresh = None;
                }),
            ),
            (
                "stale_write",
                with(&|t| {
                    t.replaced = [0, 0, short("rt-older"), short("rt0")];
                    t.rt_hash = Some(short("rt-older"));
                    t.stale_write = Some(Box::new(StaleWrite {
                        stale: token_digest("rt-older"),
                        newer: short("rt0"),
                        repair: RepairState::Pending,
                    }));
                    t.next_refresh = None;
                }),
            ),
            (
                "would_refreshed",
                with(&|t| {
                    t.would_refresh_at = Some(n);
                    t.next_refresh = None;
                }),
            ),
        ]
    }

    fn short(rt: &str) -> ShortHash {
        short_hash(&token_digest(rt))
    }

    fn refreshed() -> Refreshed {
        Refreshed {
            issued: now(),
            expiry: now() + TimeDelta::seconds(3600),
            refresh_token_expiry: None,
            rotated: true,
            fingerprint: 99,
            note: None,
            refresh_hash: Some(short("rt-new")),
            replaced_hash: Some(short("rt0")),
        }
    }

    fn attempts() -> Vec<(&'static str, Attempt)> {
        vec![
            ("refreshed", Attempt::Refreshed(refreshed())),
            ("unconfirmed", Attempt::Unconfirmed(refreshed())),
            (
                "conflict",
                Attempt::Conflict {
                    detail: "changed".into(),
                },
            ),
            ("record_gone", Attempt::RecordGone),
            ("skipped_not_due", Attempt::Skipped(SkipReason::NotDue)),
            (
                "skipped_reauth",
                Attempt::Skipped(SkipReason::ReauthRequired),
            ),
            ("locked", Attempt::Locked),
            ("reserved", Attempt::Reserved),
            ("lock_stuck", Attempt::LockStuck),
            (
                "permanent",
                Attempt::Permanent {
                    code: "invalid_grant".into(),
                    detail: "revoked".into(),
                    during_recovery: false,
                    can_fall_back: false,
                },
            ),
            (
                "permanent_recovering",
                Attempt::Permanent {
                    code: "invalid_grant".into(),
                    detail: "revoked".into(),
                    during_recovery: true,
                    can_fall_back: false,
                },
            ),
            (
                "permanent_with_fallback",
                Attempt::Permanent {
                    code: "invalid_grant".into(),
                    detail: "OAU-211 Token revoked".into(),
                    during_recovery: false,
                    can_fall_back: true,
                },
            ),
            (
                "throttled",
                Attempt::Throttled {
                    wait: Duration::from_millis(400),
                },
            ),
            (
                "transient",
                Attempt::Transient {
                    kind: "server_error",
                    detail: "HTTP 503".into(),
                    retry_after: Some(Duration::from_secs(30)),
                    in_flight: false,
                },
            ),
            (
                "transient_in_flight",
                Attempt::Transient {
                    kind: "timeout",
                    detail: "timeout".into(),
                    retry_after: None,
                    in_flight: true,
                },
            ),
            (
                "redis",
                Attempt::Redis {
                    detail: "down".into(),
                },
            ),
            ("journal_unavailable", Attempt::JournalUnavailable),
            ("skipped_observing", Attempt::Skipped(SkipReason::Observing)),
            ("skipped_stale", Attempt::Skipped(SkipReason::StaleToken)),
        ]
    }

    /// What one cell must satisfy, whatever the state.
    fn invariants(name: &str, tr: &Transition, failing_after: u32) {
        if let Some(t) = &tr.tracked {
            if t.next_refresh.is_some() {
                assert!(
                    t.reauth.is_none(),
                    "{name}: scheduled while reauth required"
                );
                assert!(!t.pending, "{name}: scheduled while an answer is held");
                assert_eq!(
                    t.verdict,
                    Verdict::Active,
                    "{name}: scheduled while not active"
                );
                assert!(
                    t.next_refresh >= Some(now()),
                    "{name}: deadline in the past"
                );
                assert!(
                    !t.probe_only,
                    "{name}: a probe-only record is never refreshed"
                );
            }
            let state = t.state(failing_after);
            if let Health::Write(h) = &tr.health {
                if let Some((_, v)) = h.fields().iter().find(|(f, _)| *f == "state") {
                    assert_eq!(
                        v,
                        state.as_str(),
                        "{name}: health state differs from the state"
                    );
                }
            }
        }
        if let Some(e) = &tr.event {
            assert!(
                !e.detail.contains("secret"),
                "{name}: a secret in the event"
            );
        }
    }

    fn run(prev: Option<&Tracked>, input: Input<'_>, p: &Policies) -> Transition {
        let mut rng = fastrand::Rng::with_seed(42);
        transition(
            prev,
            input,
            p,
            &mut Env {
                now: now(),
                rng: &mut rng,
                version: 100,
            },
        )
    }

    #[test]
    fn every_attempt_against_every_state() {
        let p = pol();
        let fa = p.failing_after;
        let mut cells = 0;
        for (sname, prev) in states(&p) {
            for (aname, a) in attempts() {
                let name = format!("{sname} x {aname}");
                let tr = run(prev.as_ref(), Input::Attempt(&a), &p);
                cells += 1;
                invariants(&name, &tr, fa);
                assert_eq!(tr.result, Some(attempt_label(&a)), "{name}: metric label");
                let Some(prev) = &prev else {
                    assert!(
                        tr.tracked.is_none() && !tr.changed,
                        "{name}: untracked stays so"
                    );
                    continue;
                };
                let t = tr
                    .tracked
                    .as_ref()
                    .expect("a tracked provider stays tracked");
                assert_eq!(t.version, 100, "{name}: version");
                if !matches!(a, Attempt::Throttled { .. }) {
                    assert!(t.budget_ticket.is_none(), "{name}: the slot is spent");
                }
                match &a {
                    Attempt::Throttled { wait } => {
                        assert_eq!(
                            t.consecutive_failures, prev.consecutive_failures,
                            "{name}: not the provider's failure"
                        );
                        assert_eq!(t.reauth, prev.reauth, "{name}");
                        if prev.verdict == Verdict::Active
                            && prev.reauth.is_none()
                            && !prev.pending
                            && !prev.probe_only
                        {
                            assert_eq!(t.next_refresh, Some(add(now(), *wait)), "{name}");
                            assert_eq!(t.budget_ticket, t.next_refresh, "{name}: slot kept");
                        }
                        assert!(tr.event.is_none(), "{name}: no event for a wait");
                    }
                    Attempt::Refreshed(r) => {
                        assert_eq!(t.state(fa), HealthState::Healthy, "{name}");
                        assert!(!t.fallback, "{name}: fallback settled");
                        assert_eq!(t.token_expiry, Some(r.expiry), "{name}");
                        assert_eq!(t.last_success, Some(r.issued), "{name}");
                        assert_eq!(t.fingerprint, 99, "{name}");
                        if prev.probe_only {
                            assert!(t.next_refresh.is_none(), "{name}");
                            continue;
                        }
                        let next = t.next_refresh.expect("scheduled after success");
                        assert!(next > now() + TimeDelta::seconds(1800), "{name}: {next}");
                        assert!(next < r.expiry, "{name}");
                        assert_eq!(tr.event.as_ref().map(|e| e.kind), Some("refresh"));
                    }
                    Attempt::Unconfirmed(_) => {
                        assert!(t.pending && t.next_refresh.is_none(), "{name}");
                        assert_eq!(
                            t.last_success, prev.last_success,
                            "{name}: not yet a success"
                        );
                    }
                    Attempt::Permanent {
                        during_recovery,
                        can_fall_back,
                        ..
                    } => {
                        if *can_fall_back && !prev.fallback {
                            assert!(t.fallback, "{name}: falls back");
                            assert!(t.reauth.is_none() || prev.reauth.is_some(), "{name}");
                            if prev.verdict == Verdict::Active
                                && prev.reauth.is_none()
                                && !prev.pending
                                && !prev.probe_only
                            {
                                assert_eq!(t.next_refresh, Some(now()), "{name}: at once");
                                assert!(
                                    matches!(
                                        t.state(fa),
                                        HealthState::Degraded | HealthState::Failing
                                    ),
                                    "{name}"
                                );
                            }
                            assert_eq!(tr.result, Some(result::FALLBACK), "{name}");
                        } else if *during_recovery && prev.suspect.is_none() {
                            assert_eq!(t.reauth, prev.reauth, "{name}: decided during recovery");
                            assert_eq!(t.suspect.as_deref(), Some("invalid_grant"));
                            assert!(
                                t.next_refresh.is_some()
                                    || prev.probe_only
                                    || prev.verdict != Verdict::Active
                                    || prev.reauth.is_some()
                                    || prev.pending,
                                "{name}: re-read scheduled"
                            );
                        } else {
                            let want = if prev.maybe_lost {
                                "lost_in_flight"
                            } else {
                                "invalid_grant"
                            };
                            assert_eq!(t.reauth.as_deref(), Some(want), "{name}");
                            assert!(!t.fallback, "{name}: the fallback was the one try");
                            if prev.verdict == Verdict::Active {
                                assert_eq!(t.state(fa), HealthState::ReauthRequired, "{name}");
                            }
                            assert!(t.next_refresh.is_none(), "{name}");
                            assert_eq!(tr.event.as_ref().map(|e| e.kind), Some("reauth_required"));
                        }
                    }
                    Attempt::Transient {
                        in_flight,
                        retry_after,
                        ..
                    } => {
                        assert_eq!(
                            t.consecutive_failures,
                            prev.consecutive_failures + 1,
                            "{name}"
                        );
                        assert_eq!(t.maybe_lost, prev.maybe_lost || *in_flight, "{name}");
                        if let (Some(next), true) = (
                            t.next_refresh,
                            prev.reauth.is_none() && prev.verdict == Verdict::Active,
                        ) {
                            let wait = (next - now()).to_std().unwrap_or_default();
                            if *in_flight {
                                assert!(
                                    wait >= p.lock_ttl,
                                    "{name}: retried before the lock expired"
                                );
                            }
                            if let Some(ra) = retry_after {
                                assert!(wait >= *ra, "{name}: Retry-After not honoured");
                            }
                        }
                    }
                    Attempt::Locked | Attempt::Reserved => {
                        if prev.verdict == Verdict::Active
                            && prev.reauth.is_none()
                            && !prev.pending
                            && !prev.probe_only
                        {
                            assert_eq!(
                                t.next_refresh,
                                Some(add(now(), p.lock_busy_retry)),
                                "{name}"
                            );
                        }
                        assert_eq!(t.consecutive_failures, prev.consecutive_failures, "{name}");
                    }
                    Attempt::LockStuck => {
                        assert!(t.lock_stuck, "{name}");
                        if prev.verdict == Verdict::Active && prev.reauth.is_none() {
                            assert!(
                                matches!(t.state(fa), HealthState::Degraded | HealthState::Failing),
                                "{name}"
                            );
                            assert!(
                                t.reason().contains("lock_stuck") || t.consecutive_failures >= fa,
                                "{name}"
                            );
                        }
                        assert_eq!(
                            tr.event.is_some(),
                            !prev.lock_stuck,
                            "{name}: reported once"
                        );
                    }
                    Attempt::Redis { .. } | Attempt::JournalUnavailable => {
                        assert_eq!(
                            t.consecutive_failures, prev.consecutive_failures,
                            "{name}: not the provider's failure"
                        );
                        assert!(tr.event.is_none(), "{name}");
                    }
                    Attempt::Conflict { .. } => {
                        assert_eq!(
                            tr.event.as_ref().map(|e| e.kind),
                            Some("conflict"),
                            "{name}"
                        );
                        assert!(t.reauth == prev.reauth, "{name}");
                    }
                    Attempt::RecordGone => assert!(t.next_refresh.is_none(), "{name}"),
                    Attempt::Skipped(r) => {
                        if matches!(r, SkipReason::ReauthRequired | SkipReason::StaleToken) {
                            assert!(t.next_refresh.is_none(), "{name}");
                        }
                        let pending_repair = prev
                            .stale_write
                            .as_ref()
                            .is_some_and(|s| s.repair == RepairState::Pending);
                        assert_eq!(
                            tr.repair.is_some(),
                            *r == SkipReason::StaleToken && pending_repair,
                            "{name}: a skipped stale token asks for the repair again"
                        );
                    }
                }
                if let Attempt::Refreshed(_) = &a {
                    assert!(
                        t.stale_write.is_none() && t.would_refresh_at.is_none(),
                        "{name}"
                    );
                    assert_eq!(t.rt_hash, Some(short("rt-new")), "{name}");
                    assert!(t.replaced.contains(&short("rt0")), "{name}");
                }
            }
        }
        assert_eq!(cells, states(&pol()).len() * attempts().len());
    }

    #[test]
    fn every_read_gone_probe_and_replay_against_every_state() {
        let p = pol();
        let fa = p.failing_after;
        let valid = record("rt1", "2026-12-01T10:30:00+00:00");
        let expired = record("rt1", "2026-12-01T09:00:00+00:00");
        let no_expiry = record("rt1", "");
        let inact = inactive();
        let inval = invalid();
        let ok_probe = probe_result(true, false);
        let bad_probe = probe_result(false, true);
        let applied = Replayed::Applied(refreshed());
        let repaired = Repaired::Written(refreshed());
        let repair_redis = Repaired::Redis {
            detail: "down".into(),
        };
        for (sname, prev) in states(&p) {
            let pv = prev.as_ref().map_or(0, |t| t.version);
            let inputs: Vec<(&str, Input<'_>)> = vec![
                (
                    "read_valid",
                    Input::Read {
                        state: &valid,
                        read_version: pv + 1,
                        stored: None,
                    },
                ),
                (
                    "read_expired",
                    Input::Read {
                        state: &expired,
                        read_version: pv + 1,
                        stored: None,
                    },
                ),
                (
                    "read_no_expiry",
                    Input::Read {
                        state: &no_expiry,
                        read_version: pv + 1,
                        stored: None,
                    },
                ),
                (
                    "read_inactive",
                    Input::Read {
                        state: &inact,
                        read_version: pv + 1,
                        stored: None,
                    },
                ),
                (
                    "read_invalid",
                    Input::Read {
                        state: &inval,
                        read_version: pv + 1,
                        stored: None,
                    },
                ),
                (
                    "read_stale",
                    Input::Read {
                        state: &valid,
                        read_version: pv.saturating_sub(1),
                        stored: None,
                    },
                ),
                ("seen_valid", Input::Seen(&valid)),
                ("gone", Input::Gone),
                ("released", Input::Released),
                (
                    "probe_ok",
                    Input::Probe {
                        result: &ok_probe,
                        probed_version: pv,
                    },
                ),
                (
                    "probe_bad",
                    Input::Probe {
                        result: &bad_probe,
                        probed_version: pv,
                    },
                ),
                (
                    "probe_stale",
                    Input::Probe {
                        result: &bad_probe,
                        probed_version: pv + 7,
                    },
                ),
                ("replay_applied", Input::Replay(&applied)),
                ("replay_superseded", Input::Replay(&Replayed::Superseded)),
                ("replay_gone", Input::Replay(&Replayed::Gone)),
                ("would_refresh", Input::WouldRefresh { planned: now() }),
                ("mode", Input::Mode),
                ("repair_written", Input::Repair(&repaired)),
                ("repair_superseded", Input::Repair(&Repaired::Superseded)),
                ("repair_gone", Input::Repair(&Repaired::Gone)),
                (
                    "repair_unrepairable",
                    Input::Repair(&Repaired::Unrepairable),
                ),
                ("repair_redis", Input::Repair(&repair_redis)),
            ];
            for (iname, input) in inputs {
                let name = format!("{sname} x {iname}");
                let tr = run(prev.as_ref(), input, &p);
                invariants(&name, &tr, fa);
                match iname {
                    "read_valid" => {
                        let t = tr.tracked.as_ref().expect("tracked");
                        assert_eq!(t.verdict, Verdict::Active, "{name}");
                        assert!(
                            t.reauth.is_none() && !t.pending,
                            "{name}: a changed record clears the verdict"
                        );
                        let next = t.next_refresh.expect("scheduled");
                        assert!(
                            next >= now() && next < now() + TimeDelta::seconds(1800),
                            "{name}"
                        );
                    }
                    "read_expired" | "read_no_expiry" => {
                        let t = tr.tracked.as_ref().expect("tracked");
                        assert_eq!(t.next_refresh, Some(now()), "{name}: due at once");
                    }
                    "read_inactive" => {
                        let t = tr.tracked.as_ref().expect("tracked");
                        assert_eq!(t.state(fa), HealthState::Inactive, "{name}");
                        assert!(t.next_refresh.is_none(), "{name}");
                    }
                    "read_invalid" => {
                        let t = tr.tracked.as_ref().expect("tracked");
                        assert_eq!(t.state(fa), HealthState::InvalidRecord, "{name}");
                        if sname != "invalid"
                            || prev
                                .as_ref()
                                .is_some_and(|p| p.fingerprint != inval.fingerprint())
                        {
                            assert_eq!(tr.invalid, Some("bad_token_expiry"), "{name}");
                            assert_eq!(tr.event.as_ref().map(|e| e.kind), Some("invalid_record"));
                        }
                    }
                    "read_stale" => {
                        if prev.is_some() {
                            assert!(!tr.changed, "{name}: an older read is not applied");
                        }
                    }
                    "seen_valid" => match prev {
                        None => assert!(
                            !tr.changed && tr.tracked.is_none(),
                            "{name}: a provider forgotten during its call stays forgotten"
                        ),
                        Some(_) => {
                            let t = tr.tracked.as_ref().expect("tracked");
                            assert_eq!(t.verdict, Verdict::Active, "{name}");
                            assert!(t.next_refresh.is_some(), "{name}: scheduled");
                        }
                    },
                    "gone" => {
                        assert!(tr.tracked.is_none(), "{name}");
                        assert_eq!(
                            matches!(tr.health, Health::Delete),
                            prev.is_some(),
                            "{name}"
                        );
                    }
                    "probe_ok" | "probe_bad" => {
                        if let Some(t) = &tr.tracked {
                            assert_eq!(t.up, Some(iname == "probe_ok"), "{name}");
                            if iname == "probe_bad"
                                && t.verdict == Verdict::Active
                                && t.reauth.is_none()
                                && t.consecutive_failures < fa
                            {
                                assert_eq!(t.state(fa), HealthState::Degraded, "{name}");
                            }
                        }
                    }
                    "probe_stale" => assert!(!tr.changed, "{name}: a probe of an older version"),
                    "released" => {
                        assert!(tr.tracked.is_none(), "{name}");
                        assert!(
                            matches!(tr.health, Health::Keep),
                            "{name}: the new owner's health stays"
                        );
                        assert!(tr.event.is_none(), "{name}");
                    }
                    "replay_applied" => {
                        if let Some(t) = &tr.tracked {
                            assert!(!t.pending && t.reauth.is_none(), "{name}");
                            assert_eq!(tr.result, Some(result::SUCCESS), "{name}");
                            assert_eq!(t.last_success, Some(now()), "{name}");
                        }
                    }
                    "replay_superseded" | "replay_gone" => {
                        if let Some(t) = &tr.tracked {
                            assert!(!t.pending, "{name}: settled");
                        }
                    }
                    "would_refresh" => {
                        assert!(!tr.changed, "{name}: only observe mode records it");
                    }
                    "mode" => {
                        let observed = prev.as_ref().and_then(|t| t.would_refresh_at).is_some();
                        assert_eq!(tr.changed, observed, "{name}");
                        if observed {
                            let t = tr.tracked.as_ref().expect("tracked");
                            assert!(t.would_refresh_at.is_none(), "{name}");
                            assert_eq!(t.next_refresh, Some(now()), "{name}: due at once");
                            let Health::Write(h) = &tr.health else {
                                panic!("{name}: health written");
                            };
                            assert!(h
                                .fields()
                                .iter()
                                .any(|(f, v)| *f == "would_refresh_at" && v.is_empty()));
                        }
                    }
                    "repair_written" => {
                        if let Some(t) = &tr.tracked {
                            assert!(t.stale_write.is_none(), "{name}");
                            assert_eq!(t.token_expiry, Some(refreshed().expiry), "{name}");
                            assert_eq!(
                                tr.event.as_ref().map(|e| (e.kind, e.result)),
                                Some(("stale_write", "repaired")),
                                "{name}"
                            );
                            assert_eq!(tr.result, None, "{name}: a repair is no refresh");
                        }
                    }
                    "repair_superseded" | "repair_gone" => {
                        if let Some(t) = &tr.tracked {
                            assert!(t.stale_write.is_none(), "{name}");
                        }
                    }
                    "repair_unrepairable" => {
                        if let Some(t) = &tr.tracked {
                            let first = prev.as_ref().is_some_and(|p| {
                                p.stale_write
                                    .as_ref()
                                    .is_some_and(|s| s.repair == RepairState::Pending)
                            });
                            if first && !t.probe_only {
                                assert_eq!(
                                    t.next_refresh,
                                    Some(add(now(), p.lock_busy_retry)),
                                    "{name}: one more look"
                                );
                            } else if !first {
                                assert!(t.next_refresh.is_none(), "{name}");
                            }
                            if !first && prev.as_ref().is_some_and(|p| p.stale_write.is_some()) {
                                assert!(
                                    t.reason().contains("re-authorisation may follow"),
                                    "{name}: {}",
                                    t.reason()
                                );
                                assert_eq!(t.state(fa), HealthState::Degraded, "{name}");
                            }
                        }
                    }
                    "repair_redis" => {
                        if let Some(t) = &tr.tracked {
                            if t.verdict == Verdict::Active
                                && t.reauth.is_none()
                                && !t.pending
                                && !t.probe_only
                            {
                                assert_eq!(
                                    t.next_refresh,
                                    Some(add(now(), p.redis_retry)),
                                    "{name}: tried again"
                                );
                            }
                        }
                    }
                    _ => unreachable!(),
                }
            }
        }
    }

    #[test]
    fn an_invalid_grant_during_recovery_is_decided_on_the_second_look() {
        let p = pol();
        let (_, healthy) = states(&p).swap_remove(3);
        let a = Attempt::Permanent {
            code: "invalid_grant".into(),
            detail: String::new(),
            during_recovery: true,
            can_fall_back: false,
        };
        let first = run(healthy.as_ref(), Input::Attempt(&a), &p);
        let t = first.tracked.expect("tracked");
        assert!(t.reauth.is_none());
        assert!(t.next_refresh >= Some(add(now(), p.recovery_grace)));
        let second = run(Some(&t), Input::Attempt(&a), &p);
        assert_eq!(
            second.tracked.and_then(|t| t.reauth).as_deref(),
            Some("invalid_grant")
        );
    }

    fn api_key_record(provider_type: &str) -> RecordState {
        let f = |k: &str, v: &str| (k.to_string(), v.to_string());
        ProviderRecord::parse(&[
            f("provider_type", provider_type),
            f("status", "active"),
            f("auth_type", "api_key"),
            f("api_key", "k-123456789"),
        ])
    }

    #[test]
    fn an_api_key_record_is_probed_and_never_scheduled() {
        let p = pol();
        for (sname, prev) in states(&p) {
            let state = api_key_record("goto");
            let pv = prev.as_ref().map_or(0, |t| t.version);
            let tr = run(
                prev.as_ref(),
                Input::Read {
                    state: &state,
                    read_version: pv + 1,
                    stored: None,
                },
                &p,
            );
            let t = tr.tracked.as_ref().expect("tracked");
            assert!(t.probe_only, "{sname}");
            assert_eq!(t.verdict, Verdict::Active, "{sname}");
            assert!(t.next_refresh.is_none(), "{sname}: nothing to refresh");
            assert!(tr.invalid.is_none(), "{sname}: not an invalid record");
            assert_eq!(t.state(p.failing_after), HealthState::Healthy, "{sname}");
            // Whatever an attempt (an operator's forced one) says, no deadline follows.
            for (aname, a) in attempts() {
                let after = run(Some(t), Input::Attempt(&a), &p);
                assert!(
                    after
                        .tracked
                        .as_ref()
                        .is_some_and(|t| t.next_refresh.is_none()),
                    "{sname} x {aname}"
                );
            }
        }
        let unknown = api_key_record("myspace");
        let tr = run(
            None,
            Input::Read {
                state: &unknown,
                read_version: 1,
                stored: None,
            },
            &p,
        );
        assert_eq!(tr.invalid, Some("unknown_provider_type"));
    }

    /// What a first read writes of `state`, and its plan, with `stored` as the health hash.
    fn first_read(
        p: &Policies,
        state: &RecordState,
        stored: Option<&StoredHealth>,
        seed: u64,
    ) -> (Health, Option<DateTime<Utc>>) {
        let tr = transition(
            None,
            Input::Read {
                state,
                read_version: 1,
                stored,
            },
            p,
            &mut Env {
                now: now(),
                rng: &mut fastrand::Rng::with_seed(seed),
                version: 1,
            },
        );
        let next = tr.tracked.as_ref().and_then(|t| t.next_refresh);
        (tr.health, next)
    }

    #[test]
    fn a_restart_keeps_the_plan_and_health_it_finds_for_the_same_token() {
        let p = pol();
        let expiry = "2026-12-01T11:00:00+00:00";
        let state = record("rt0", expiry);
        // What the previous process wrote: its plan for this token, 50 s from now.
        let (Health::Write(first), Some(planned)) = first_read(&p, &state, None, 7) else {
            panic!("a first read without a stored health hash writes one and plans");
        };
        assert!(first.fields().iter().any(|(f, _)| *f == "next_refresh_at"));
        let earlier = now() + TimeDelta::seconds(50);
        let left = |next: &str, exp: &str| {
            StoredHealth::from_pairs([
                ("state", "healthy"),
                ("reason", ""),
                ("token_expiry", exp),
                ("next_refresh_at", next),
                ("consecutive_failures", "0"),
            ])
        };
        let same_token = iso_utc(DateTime::parse_from_rfc3339(expiry).unwrap().to_utc());
        let stored = left(&iso_utc(earlier), &same_token);
        for seed in 0..20 {
            let (health, next) = first_read(&p, &state, Some(&stored), seed);
            assert_eq!(next, Some(earlier), "{seed}: the stored plan is kept");
            assert!(matches!(health, Health::Keep), "{seed}: nothing to write");
        }
        // The fresh plans differ from seed to seed (the jitter); none is `earlier`.
        assert_ne!(first_read(&p, &state, None, 1).1, Some(earlier));
        assert_ne!(planned, earlier);

        // A plan the policy could not make now is not kept: later than its latest, or past.
        for bad in [
            now() + TimeDelta::minutes(50),
            now() - TimeDelta::seconds(1),
        ] {
            let stored = left(&iso_utc(bad), &same_token);
            let (health, next) = first_read(&p, &state, Some(&stored), 3);
            assert_ne!(next, Some(bad), "{bad}");
            assert!(
                matches!(health, Health::Write(_)),
                "{bad}: the new plan is written"
            );
        }
        // A plan for another token (the gateway refreshed while no process ran): re-planned.
        let other = left(&iso_utc(earlier), "2026-12-01T10:30:00.000000+00:00");
        let (health, next) = first_read(&p, &state, Some(&other), 3);
        assert_ne!(next, Some(earlier));
        assert!(matches!(health, Health::Write(_)));
        // No state yet: written (the state only where none is set), the plan kept.
        let no_state = StoredHealth::from_pairs([
            ("token_expiry", same_token.as_str()),
            ("next_refresh_at", iso_utc(earlier).as_str()),
        ]);
        let (health, next) = first_read(&p, &state, Some(&no_state), 3);
        assert_eq!(next, Some(earlier));
        assert!(matches!(health, Health::Write(_)));
        // Garbage in the hash is never trusted, never fatal.
        let garbage = left("next tuesday", &same_token);
        let (health, next) = first_read(&p, &state, Some(&garbage), 3);
        assert!(next.is_some_and(|n| n > now()));
        assert!(matches!(health, Health::Write(_)));
    }

    #[test]
    fn a_restart_leaves_an_inactive_or_invalid_providers_health_alone_when_it_says_the_same() {
        let p = pol();
        for state in [inactive(), invalid()] {
            let Health::Write(h) = first_read(&p, &state, None, 1).0 else {
                panic!("a first read writes health");
            };
            let pairs: Vec<(&str, &str)> =
                h.fields().iter().map(|(f, v)| (*f, v.as_str())).collect();
            let same = StoredHealth::from_pairs(pairs.iter().copied());
            assert!(matches!(
                first_read(&p, &state, Some(&same), 1).0,
                Health::Keep
            ));
            let other = StoredHealth::from_pairs(pairs.iter().map(|(f, v)| {
                if *f == "state" {
                    (*f, "healthy")
                } else {
                    (*f, *v)
                }
            }));
            assert!(matches!(
                first_read(&p, &state, Some(&other), 1).0,
                Health::Write(_)
            ));
        }
    }

    #[test]
    fn a_refused_refresh_token_falls_back_once_then_asks_a_human() {
        let p = pol();
        let (_, healthy) = states(&p).swap_remove(3);
        let refused = Attempt::Permanent {
            code: "invalid_grant".into(),
            detail: "Token revoked".into(),
            during_recovery: false,
            can_fall_back: true,
        };
        let first = run(healthy.as_ref(), Input::Attempt(&refused), &p);
        let t = first.tracked.expect("tracked");
        assert!(t.fallback && t.reauth.is_none());
        assert_eq!(t.next_refresh, Some(now()));
        // The fallback attempt itself refused: now a human.
        let again = Attempt::Permanent {
            code: "invalid_grant".into(),
            detail: "jwt revoked".into(),
            during_recovery: false,
            can_fall_back: false,
        };
        let second = run(Some(&t), Input::Attempt(&again), &p);
        let t2 = second.tracked.expect("tracked");
        assert_eq!(t2.reauth.as_deref(), Some("invalid_grant"));
        assert!(!t2.fallback && t2.next_refresh.is_none());
        // A success of the fallback settles it.
        let ok = run(
            Some(&t),
            Input::Attempt(&Attempt::Refreshed(refreshed())),
            &p,
        );
        assert!(ok
            .tracked
            .is_some_and(|t| !t.fallback && t.reauth.is_none()));
        // An attempt already on the fallback never loops.
        let loop_ = run(Some(&t), Input::Attempt(&refused), &p);
        assert!(loop_.tracked.is_some_and(|t| t.reauth.is_some()));
    }

    /// A probe answer 10 ms long: healthy, refused (401) or failed (503).
    fn probe_result(ok: bool, refused: bool) -> ProbeResult {
        let detail = match (ok, refused) {
            (true, _) => "",
            (false, true) => "HTTP 401",
            (false, false) => "HTTP 503",
        };
        ProbeResult {
            ok,
            slow: false,
            latency_ms: 10,
            at: now(),
            refused,
            detail: detail.into(),
        }
    }

    #[test]
    fn a_refused_token_cured_by_a_refresh_is_no_intermittent_failure() {
        let p = pol();
        let fa = p.failing_after;
        let (_, healthy) = states(&p).swap_remove(3);
        let probe = |refused: bool| probe_result(false, refused);
        let done = refreshed();
        for (refused, want) in [(true, HealthState::Healthy), (false, HealthState::Degraded)] {
            let t = healthy.clone().expect("healthy");
            let r = probe(refused);
            let v = t.version;
            let after_probe = run(
                Some(&t),
                Input::Probe {
                    result: &r,
                    probed_version: v,
                },
                &p,
            )
            .tracked
            .expect("tracked");
            assert_eq!(after_probe.state(fa), HealthState::Degraded);
            let after_refresh = run(
                Some(&after_probe),
                Input::Attempt(&Attempt::Refreshed(done.clone())),
                &p,
            )
            .tracked
            .expect("tracked");
            assert_eq!(
                after_refresh.state(fa),
                want,
                "a {} probe, then a successful refresh",
                r.detail
            );
        }
    }

    #[test]
    fn probes_intermittent_is_degraded_and_n_failures_failing() {
        let p = pol();
        let fa = p.failing_after;
        let (_, healthy) = states(&p).swap_remove(3);
        let mut t = healthy.expect("healthy");
        let probe = |ok: bool| probe_result(ok, false);
        for i in 1..=fa {
            let r = probe(false);
            let v = t.version;
            t = run(
                Some(&t),
                Input::Probe {
                    result: &r,
                    probed_version: v,
                },
                &p,
            )
            .tracked
            .expect("tracked");
            let want = if i >= fa {
                HealthState::Failing
            } else {
                HealthState::Degraded
            };
            assert_eq!(t.state(fa), want, "after {i} failed probes");
        }
        let r = probe(true);
        let v = t.version;
        t = run(
            Some(&t),
            Input::Probe {
                result: &r,
                probed_version: v,
            },
            &p,
        )
        .tracked
        .expect("tracked");
        assert_eq!(
            t.state(fa),
            HealthState::Degraded,
            "intermittent: recent failures"
        );
        assert_eq!(t.reason(), "intermittent health probe failures");
        for _ in 0..5 {
            let v = t.version;
            t = run(
                Some(&t),
                Input::Probe {
                    result: &r,
                    probed_version: v,
                },
                &p,
            )
            .tracked
            .expect("tracked");
        }
        assert_eq!(
            t.state(fa),
            HealthState::Healthy,
            "five good probes in a row"
        );
    }

    #[test]
    fn a_catalog_max_refresh_interval_caps_the_schedule() {
        let p = pol();
        let (_, healthy) = states(&p).swap_remove(3);
        let mut t = healthy.expect("healthy");
        t.max_refresh_interval = Some(Duration::from_secs(600));
        let mut r = refreshed();
        r.expiry = now() + TimeDelta::hours(12);
        let tr = run(Some(&t), Input::Attempt(&Attempt::Refreshed(r)), &p);
        let next = tr.tracked.and_then(|t| t.next_refresh).expect("scheduled");
        assert!(next <= now() + TimeDelta::seconds(600), "{next}");
    }

    fn observe_pol() -> Policies {
        let mut p = pol();
        p.observe = true;
        p
    }

    fn health_field<'a>(tr: &'a Transition, field: &str) -> Option<&'a str> {
        match &tr.health {
            Health::Write(h) => h
                .fields()
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    #[test]
    fn observe_mode_records_what_it_would_do_and_calls_nothing() {
        let obs = observe_pol();
        let expired = record("rt0", "2026-12-01T09:00:00+00:00");
        let read = run(
            None,
            Input::Read {
                state: &expired,
                read_version: 1,
                stored: None,
            },
            &obs,
        );
        let t = read.tracked.expect("tracked");
        assert_eq!(
            t.next_refresh,
            Some(now()),
            "the schedule runs as in active"
        );
        assert_eq!(may_call(&obs), Err(SkipReason::Observing));
        let mut rng = fastrand::Rng::with_seed(1);
        let mut env = Env {
            now: now(),
            rng: &mut rng,
            version: 2,
        };
        for forced in [false, true] {
            assert_eq!(
                precheck(Some(&t), &expired, forced, &obs, &mut env),
                Err(SkipReason::Observing),
                "no call, forced or not"
            );
        }
        let fired = run(Some(&t), Input::WouldRefresh { planned: now() }, &obs);
        assert!(
            fired.changed && fired.result.is_none(),
            "no refresh counted"
        );
        let w = fired.tracked.clone().expect("tracked");
        assert_eq!(w.would_refresh_at, Some(now()));
        assert_eq!(w.next_refresh, None, "waits for the gateway or the mode");
        assert_eq!(
            health_field(&fired, "would_refresh_at"),
            Some("2026-12-01T10:00:00+00:00")
        );
        assert_eq!(health_field(&fired, "state"), Some("healthy"));
        assert!(
            w.reason().contains("would have refreshed at"),
            "{}",
            w.reason()
        );
        assert_eq!(fired.event.as_ref().map(|e| e.kind), Some("would_refresh"));
        // Fired again (no change): nothing new.
        assert!(!run(Some(&w), Input::WouldRefresh { planned: now() }, &obs).changed);
        // The gateway refreshes: the new record is scheduled again, the last verdict kept.
        let fresh = record("rt1", "2026-12-01T11:00:00+00:00");
        let after = run(
            Some(&w),
            Input::Read {
                state: &fresh,
                read_version: u64::MAX,
                stored: None,
            },
            &obs,
        );
        let a = after.tracked.expect("tracked");
        assert!(a.next_refresh.is_some_and(|n| n > now()));
        assert_eq!(a.would_refresh_at, Some(now()));
        assert!(
            !after.stale_write,
            "a gateway's own rotation is no stale write"
        );
        // Switching to active: what was let pass is due at once.
        let active = pol();
        let switched = run(Some(&w), Input::Mode, &active);
        let s = switched.tracked.expect("tracked");
        assert_eq!(s.next_refresh, Some(now()));
        assert_eq!(s.would_refresh_at, None);
        assert_eq!(
            precheck(Some(&s), &expired, false, &active, &mut env),
            Ok(())
        );
        // A mode change to observe changes nothing by itself.
        assert!(!run(Some(&s), Input::Mode, &obs).changed);
    }

    /// Tracks `rt0`, then refreshes it to `rt-new` (what an attempt of ours reports).
    fn rotated_once(p: &Policies) -> Tracked {
        let first = record("rt0", "2026-12-01T10:30:00+00:00");
        let t = run(
            None,
            Input::Read {
                state: &first,
                read_version: 1,
                stored: None,
            },
            p,
        )
        .tracked
        .expect("tracked");
        let done = Attempt::Refreshed(refreshed());
        run(Some(&t), Input::Attempt(&done), p)
            .tracked
            .expect("tracked")
    }

    #[test]
    fn a_stale_whole_record_write_is_reported_and_repaired() {
        let p = pol();
        let t = rotated_once(&p);
        assert_eq!(t.replaced, [0, 0, 0, short("rt0")]);
        // The gateway writes back the whole record it read before: rt0 again.
        let stale = record("rt0", "2026-12-01T10:30:00+00:00");
        let tr = run(
            Some(&t),
            Input::Read {
                state: &stale,
                read_version: 200,
                stored: None,
            },
            &p,
        );
        assert!(tr.stale_write, "counted");
        assert_eq!(
            tr.repair,
            Some(RepairRequest {
                stale: token_digest("rt0"),
                newer: short("rt-new"),
            })
        );
        assert_eq!(tr.event.as_ref().map(|e| e.kind), Some("stale_write"));
        let s = tr.tracked.clone().expect("tracked");
        assert_eq!(s.next_refresh, None, "never refreshed with a used token");
        assert_eq!(s.state(p.failing_after), HealthState::Degraded);
        assert!(health_field(&tr, "reason").is_some_and(|r| r.starts_with("stale_write")));
        // An attempt that finds it anyway makes no call, forced or not.
        let mut rng = fastrand::Rng::with_seed(1);
        let mut env = Env {
            now: now(),
            rng: &mut rng,
            version: 201,
        };
        for forced in [false, true] {
            assert_eq!(
                precheck(Some(&s), &stale, forced, &p, &mut env),
                Err(SkipReason::StaleToken)
            );
        }
        // The repair wrote rt-new back: the read it made, then its outcome.
        let repaired_rec = record("rt-new", "2026-12-01T11:00:00+00:00");
        let back = run(
            Some(&s),
            Input::Read {
                state: &repaired_rec,
                read_version: u64::MAX,
                stored: None,
            },
            &p,
        );
        assert!(!back.stale_write, "the repair is not another stale write");
        let b = back.tracked.expect("tracked");
        assert!(b.stale_write.is_none());
        let done = run(Some(&b), Input::Repair(&Repaired::Written(refreshed())), &p);
        let d = done.tracked.expect("tracked");
        assert_eq!(d.state(p.failing_after), HealthState::Healthy);
        assert!(d.next_refresh.is_some());
        assert_eq!(done.event.as_ref().map(|e| e.result), Some("repaired"));
        // The same stale write again is found again.
        let again = run(
            Some(&d),
            Input::Read {
                state: &stale,
                read_version: u64::MAX,
                stored: None,
            },
            &p,
        );
        assert!(again.stale_write && again.repair.is_some());
    }

    #[test]
    fn an_unrepairable_stale_write_says_reauthorisation_may_follow() {
        let p = pol();
        // The gateway rotated by itself (rt0 -> rt1), then wrote back a record with rt0.
        let r0 = record("rt0", "2026-12-01T10:30:00+00:00");
        let r1 = record("rt1", "2026-12-01T11:30:00+00:00");
        let mut t = None;
        for (state, v) in [(&r0, 1), (&r1, 2)] {
            t = run(
                t.as_ref(),
                Input::Read {
                    state,
                    read_version: v,
                    stored: None,
                },
                &p,
            )
            .tracked;
        }
        let tr = run(
            t.as_ref(),
            Input::Read {
                state: &r0,
                read_version: 3,
                stored: None,
            },
            &p,
        );
        assert_eq!(
            tr.repair.map(|r| r.newer),
            Some(short("rt1")),
            "the token to restore is the one the record held before"
        );
        let s = tr.tracked.expect("tracked");
        let first = run(Some(&s), Input::Repair(&Repaired::Unrepairable), &p);
        assert!(first.event.is_none(), "another replica may still repair it");
        let f = first.tracked.expect("tracked");
        assert_eq!(
            f.next_refresh,
            Some(add(now(), p.lock_busy_retry)),
            "looks again"
        );
        let skipped = run(
            Some(&f),
            Input::Attempt(&Attempt::Skipped(SkipReason::StaleToken)),
            &p,
        );
        assert!(skipped.repair.is_some(), "the second look is a repair");
        let sk = skipped.tracked.expect("tracked");
        let u = run(Some(&sk), Input::Repair(&Repaired::Unrepairable), &p);
        let ut = u.tracked.expect("tracked");
        assert!(ut.reason().contains("re-authorisation may follow"));
        assert_eq!(ut.next_refresh, None);
        assert_eq!(u.event.as_ref().map(|e| e.result), Some("unrepairable"));
        // The gateway writes a newer token: back to normal.
        let r2 = record("rt2", "2026-12-01T11:30:00+00:00");
        let n = run(
            Some(&ut),
            Input::Read {
                state: &r2,
                read_version: u64::MAX,
                stored: None,
            },
            &p,
        )
        .tracked
        .expect("tracked");
        assert!(n.stale_write.is_none() && n.next_refresh.is_some());
    }

    #[test]
    fn observe_mode_reports_a_stale_write_and_repairs_it_once_active() {
        let obs = observe_pol();
        let t = rotated_once(&pol());
        let stale = record("rt0", "2026-12-01T10:30:00+00:00");
        let tr = run(
            Some(&t),
            Input::Read {
                state: &stale,
                read_version: 200,
                stored: None,
            },
            &obs,
        );
        assert!(tr.stale_write);
        assert_eq!(tr.repair, None, "observe mode writes no gateway field");
        let s = tr.tracked.expect("tracked");
        assert!(s.reason().contains("observe mode"));
        let m = run(Some(&s), Input::Mode, &pol());
        assert_eq!(m.repair.map(|r| r.stale), Some(token_digest("rt0")));
    }

    #[test]
    fn the_replaced_history_is_bounded() {
        let p = pol();
        let mut t: Option<Tracked> = None;
        for i in 0..10 {
            let r = record(&format!("rt{i}"), "2026-12-01T10:30:00+00:00");
            t = run(
                t.as_ref(),
                Input::Read {
                    state: &r,
                    read_version: i + 1,
                    stored: None,
                },
                &p,
            )
            .tracked;
        }
        let t = t.expect("tracked");
        assert_eq!(
            t.replaced,
            [short("rt5"), short("rt6"), short("rt7"), short("rt8")],
            "the last four, newest last; not the current one"
        );
    }

    #[test]
    fn far_future_additions_saturate() {
        assert_eq!(add(now(), Duration::MAX), DateTime::<Utc>::MAX_UTC);
        assert_eq!(
            add(now(), Duration::from_secs(60)),
            now() + TimeDelta::seconds(60)
        );
    }
}
