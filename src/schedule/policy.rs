//! When to refresh a token: the pure deadline arithmetic behind the scheduler.
//!
//! For an access token of lifetime `L = expiry - issued` the refresh is due at
//!
//! ```text
//! issued + max(L * min_fraction, min(L * refresh_fraction, L - lead))  ± jitter
//! ```
//!
//! i.e. at two thirds of the lifetime, but at least `lead` (5 min) before expiry, and never
//! before half the lifetime (a very short-lived token is refreshed at half its life rather
//! than at once). The jitter is uniform in `[-j, +j]` with `j = min(L * jitter_fraction,
//! jitter_max)`, so that tokens issued together do not all refresh together; the jittered
//! time is then kept within `[issued + L * min_fraction, expiry)`.
//!
//! Two caps follow, neither jittered:
//! - `last_refresh + max_refresh_interval`: refresh tokens that die when idle (RingCentral,
//!   Microsoft) are exercised at least this often even under long-lived access tokens
//!   (PROVIDERS.md rule 5);
//! - `refresh_token_expiry - lead` when the provider says when the refresh token itself
//!   dies, or half its remaining life when that is shorter than `lead`.
//!
//! An expired token (or one with no positive lifetime) is due now, and no answer is ever
//! earlier than `now`: a deadline already passed means "refresh at once".
//!
//! The arithmetic is in whole milliseconds.

use chrono::{DateTime, TimeDelta, Utc};

/// The refresh schedule settings (`[schedule]` in the config).
#[derive(Debug, Clone)]
pub struct RefreshPolicy {
    /// Fraction of the lifetime after which to refresh (default 2/3).
    pub refresh_fraction: f64,
    /// Never refresh before this fraction of the lifetime has passed (default 1/2).
    pub min_fraction: f64,
    /// Refresh at least this long before expiry (default 5 min), unless that is before
    /// `min_fraction` of the lifetime.
    pub lead: TimeDelta,
    /// Jitter half-width as a fraction of the lifetime (default 0.05) ...
    pub jitter_fraction: f64,
    /// ... capped at this (default 60 s).
    pub jitter_max: TimeDelta,
    /// Refresh at least this often, whatever the access token's lifetime (default 24 h).
    pub max_refresh_interval: TimeDelta,
}

/// The validity of one access token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    /// When we obtained the token, or when we first saw a token we did not obtain.
    pub issued: DateTime<Utc>,
    /// When the token expires.
    pub expiry: DateTime<Utc>,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            refresh_fraction: 2.0 / 3.0,
            min_fraction: 0.5,
            lead: TimeDelta::seconds(5 * 60),
            jitter_fraction: 0.05,
            jitter_max: TimeDelta::seconds(60),
            max_refresh_interval: TimeDelta::seconds(24 * 3600),
        }
    }
}

impl RefreshPolicy {
    /// For a token of lifetime L = expiry - issued: at issued + max(L*min_fraction,
    /// min(L*refresh_fraction, L - lead)), plus a uniform jitter in [-j, +j] with
    /// j = min(L*jitter_fraction, jitter_max), then clamped into [issued + L*min_fraction,
    /// expiry); never later than last_refresh + max_refresh_interval (last_refresh = last
    /// successful refresh or first sight); never later than refresh_token_expiry - lead when
    /// given (half of the refresh token's remaining life if shorter than lead). If
    /// expiry <= now or L <= 0: now. Never earlier than now.
    pub fn next_refresh(
        &self,
        lifetime: Lifetime,
        last_refresh: DateTime<Utc>,
        refresh_token_expiry: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        rng: &mut fastrand::Rng,
    ) -> DateTime<Utc> {
        self.plan(lifetime, last_refresh, refresh_token_expiry, now, Some(rng))
    }

    /// The latest deadline [`RefreshPolicy::next_refresh`] can answer for the same inputs (its
    /// jitter at `+j`). A plan made earlier for the same token (by a previous process, read
    /// from the health hash) that lies between `now` and this is one the policy could have
    /// made now, and can be kept.
    pub fn latest_refresh(
        &self,
        lifetime: Lifetime,
        last_refresh: DateTime<Utc>,
        refresh_token_expiry: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> DateTime<Utc> {
        self.plan(lifetime, last_refresh, refresh_token_expiry, now, None)
    }

    /// [`RefreshPolicy::next_refresh`] with the jitter drawn from `rng`, or at its maximum.
    fn plan(
        &self,
        lifetime: Lifetime,
        last_refresh: DateTime<Utc>,
        refresh_token_expiry: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
        rng: Option<&mut fastrand::Rng>,
    ) -> DateTime<Utc> {
        let Lifetime { issued, expiry } = lifetime;
        if expiry <= now {
            return now;
        }
        let life_ms = (expiry - issued).num_milliseconds();
        if life_ms <= 0 {
            return now;
        }
        // Offsets from `issued`, all within [0, life_ms].
        let part = |fraction: f64| -> i64 {
            let f = if fraction.is_nan() {
                0.0
            } else {
                fraction.clamp(0.0, 1.0)
            };
            // In [0, life_ms]; `as` saturates.
            (life_ms as f64 * f).round() as i64
        };
        let last_ms = life_ms - 1; // expiry itself is excluded
        let min_off = part(self.min_fraction).min(last_ms);
        let lead_ms = self.lead.num_milliseconds().max(0);
        let target = part(self.refresh_fraction)
            .min(life_ms - lead_ms)
            .max(min_off);
        let j = part(self.jitter_fraction).min(self.jitter_max.num_milliseconds().max(0));
        let jitter = match rng {
            _ if j <= 0 => 0,
            Some(rng) => rng.i64(-j..=j),
            None => j,
        };
        let offset = target.saturating_add(jitter).max(min_off).min(last_ms);

        let mut at = TimeDelta::try_milliseconds(offset)
            .and_then(|d| issued.checked_add_signed(d))
            .unwrap_or(now);
        if let Some(cap) = last_refresh.checked_add_signed(self.max_refresh_interval) {
            at = at.min(cap);
        }
        if let Some(rt_expiry) = refresh_token_expiry {
            at = at.min(self.refresh_token_cap(rt_expiry, now));
        }
        at.max(now)
    }

    /// Latest refresh that keeps the refresh token alive: `lead` before it dies, or half
    /// its remaining life when that is shorter than `lead`.
    fn refresh_token_cap(&self, rt_expiry: DateTime<Utc>, now: DateTime<Utc>) -> DateTime<Utc> {
        let remaining = rt_expiry - now;
        if remaining <= TimeDelta::zero() {
            return now;
        }
        let lead = self.lead.max(TimeDelta::zero());
        if remaining > lead {
            rt_expiry - lead
        } else {
            now + remaining / 2
        }
    }

    /// Checks the settings: fractions in (0, 1), `min_fraction <= refresh_fraction`,
    /// `jitter_fraction` in [0, 0.5), durations not negative, `max_refresh_interval` positive.
    pub fn validate(&self) -> Result<(), String> {
        let open_unit = |name: &str, v: f64| {
            if v > 0.0 && v < 1.0 {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be between 0 and 1 (exclusive), got {v}"
                ))
            }
        };
        open_unit("refresh_fraction", self.refresh_fraction)?;
        open_unit("min_fraction", self.min_fraction)?;
        if self.min_fraction > self.refresh_fraction {
            return Err(format!(
                "min_fraction ({}) must not exceed refresh_fraction ({})",
                self.min_fraction, self.refresh_fraction
            ));
        }
        if !(self.jitter_fraction >= 0.0 && self.jitter_fraction < 0.5) {
            return Err(format!(
                "jitter_fraction must be at least 0 and below 0.5, got {}",
                self.jitter_fraction
            ));
        }
        for (name, d) in [("lead", self.lead), ("jitter_max", self.jitter_max)] {
            if d < TimeDelta::zero() {
                return Err(format!("{name} must not be negative, got {d}"));
            }
        }
        if self.max_refresh_interval <= TimeDelta::zero() {
            return Err(format!(
                "max_refresh_interval must be positive, got {}",
                self.max_refresh_interval
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 3, 20, 0).unwrap()
    }

    fn secs(s: i64) -> TimeDelta {
        TimeDelta::seconds(s)
    }

    fn mins(m: i64) -> TimeDelta {
        TimeDelta::minutes(m)
    }

    fn no_jitter() -> RefreshPolicy {
        RefreshPolicy {
            jitter_fraction: 0.0,
            ..RefreshPolicy::default()
        }
    }

    /// A token issued at `t()` (first refresh/sight then too), asked about at `t()`.
    fn fresh(p: &RefreshPolicy, life: TimeDelta, seed: u64) -> DateTime<Utc> {
        let lifetime = Lifetime {
            issued: t(),
            expiry: t() + life,
        };
        p.next_refresh(
            lifetime,
            t(),
            None,
            t(),
            &mut fastrand::Rng::with_seed(seed),
        )
    }

    #[test]
    fn defaults_are_valid() {
        let p = RefreshPolicy::default();
        assert_eq!(p.validate(), Ok(()));
        assert!((p.refresh_fraction - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(p.min_fraction, 0.5);
        assert_eq!(p.lead, mins(5));
        assert_eq!(p.jitter_fraction, 0.05);
        assert_eq!(p.jitter_max, secs(60));
        assert_eq!(p.max_refresh_interval, TimeDelta::hours(24));
    }

    #[test]
    fn one_hour_token_refreshes_at_two_thirds() {
        assert_eq!(fresh(&no_jitter(), mins(60), 1), t() + mins(40));
        let p = RefreshPolicy::default();
        for seed in 0..500 {
            let at = fresh(&p, mins(60), seed);
            assert!(at >= t() + mins(39) && at <= t() + mins(41), "{seed}: {at}");
            assert!(at < t() + mins(55));
        }
    }

    #[test]
    fn latest_refresh_bounds_every_jittered_plan() {
        let p = RefreshPolicy::default();
        let life = Lifetime {
            issued: t(),
            expiry: t() + mins(60),
        };
        // 40 min + j (60 s); with the caps of a short max_refresh_interval it follows them.
        assert_eq!(p.latest_refresh(life, t(), None, t()), t() + mins(41));
        let mut at_latest = 0;
        for seed in 0..2_000 {
            let at = fresh(&p, mins(60), seed);
            assert!(at <= p.latest_refresh(life, t(), None, t()), "{seed}: {at}");
            at_latest += usize::from(at == t() + mins(41));
        }
        assert!(at_latest <= 2, "{at_latest}");
        let capped = RefreshPolicy {
            max_refresh_interval: mins(10),
            ..RefreshPolicy::default()
        };
        assert_eq!(capped.latest_refresh(life, t(), None, t()), t() + mins(10));
        // Expired: now, as next_refresh says.
        let gone = Lifetime {
            issued: t() - mins(60),
            expiry: t() - mins(1),
        };
        assert_eq!(p.latest_refresh(gone, t(), None, t()), t());
    }

    #[test]
    fn ten_minute_token_refreshes_at_half() {
        // min(400 s, 600 s - 300 s) = 300 s = half the life.
        assert_eq!(fresh(&no_jitter(), mins(10), 1), t() + mins(5));
        // Jitter j = 30 s, but never before half: [5 min, 5 min 30 s].
        let p = RefreshPolicy::default();
        let mut at_floor = 0;
        for seed in 0..500 {
            let at = fresh(&p, mins(10), seed);
            assert!(at >= t() + mins(5) && at <= t() + secs(330), "{seed}: {at}");
            at_floor += usize::from(at == t() + mins(5));
        }
        // Half of the picks fall below the floor and are raised to it.
        assert!((200..300).contains(&at_floor), "{at_floor}");
    }

    #[test]
    fn lead_wins_between_two_thirds_and_half() {
        // 12 min: 2/3 = 8 min, L - lead = 7 min, half = 6 min -> 7 min.
        assert_eq!(fresh(&no_jitter(), mins(12), 1), t() + mins(7));
        // 15 min: 2/3 = 10 min = L - lead.
        assert_eq!(fresh(&no_jitter(), mins(15), 1), t() + mins(10));
    }

    #[test]
    fn six_second_token_refreshes_at_half() {
        assert_eq!(fresh(&no_jitter(), secs(6), 1), t() + secs(3));
        let p = RefreshPolicy::default();
        for seed in 0..200 {
            let at = fresh(&p, secs(6), seed);
            assert!(
                at >= t() + secs(3) && at <= t() + TimeDelta::milliseconds(3300),
                "{at}"
            );
        }
    }

    #[test]
    fn expired_or_empty_lifetime_is_due_now() {
        let p = RefreshPolicy::default();
        let mut rng = fastrand::Rng::with_seed(1);
        let now = t() + mins(61);
        let expired = Lifetime {
            issued: t(),
            expiry: t() + mins(60),
        };
        assert_eq!(p.next_refresh(expired, t(), None, now, &mut rng), now);
        // Expiring exactly now.
        let now = t() + mins(60);
        assert_eq!(p.next_refresh(expired, t(), None, now, &mut rng), now);
        // Expiry before issue (a clock gone backwards): now.
        let backwards = Lifetime {
            issued: t() + mins(10),
            expiry: t() + mins(5),
        };
        assert_eq!(p.next_refresh(backwards, t(), None, t(), &mut rng), t());
        let zero = Lifetime {
            issued: t() + mins(5),
            expiry: t() + mins(5),
        };
        assert_eq!(p.next_refresh(zero, t(), None, t(), &mut rng), t());
    }

    #[test]
    fn passed_deadline_is_now_not_the_past() {
        // Issued an hour ago with 20 min left: the 40 min mark has passed.
        let p = no_jitter();
        let lifetime = Lifetime {
            issued: t() - mins(40) - secs(1),
            expiry: t() + mins(20) - secs(1),
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(
            p.next_refresh(lifetime, lifetime.issued, None, t(), &mut rng),
            t()
        );
        // Issued 30 min ago: still 10 min to go.
        let lifetime = Lifetime {
            issued: t() - mins(30),
            expiry: t() + mins(30),
        };
        assert_eq!(
            p.next_refresh(lifetime, lifetime.issued, None, t(), &mut rng),
            t() + mins(10)
        );
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let p = RefreshPolicy::default();
        let mut lo = t() + TimeDelta::days(1);
        let mut hi = t();
        let mut sum_ms = 0i64;
        let n = 2000;
        for seed in 0..n {
            let at = fresh(&p, mins(60), seed);
            assert!(at >= t() + mins(39) && at <= t() + mins(41));
            lo = lo.min(at);
            hi = hi.max(at);
            sum_ms += (at - t()).num_milliseconds();
        }
        assert!(lo < t() + mins(39) + secs(5), "lowest {lo}");
        assert!(hi > t() + mins(41) - secs(5), "highest {hi}");
        let mean = sum_ms / n as i64;
        assert!((mean - 40 * 60_000).abs() < 5_000, "mean {mean} ms");
        // Different seeds, different answers; same seed, same answer.
        assert_ne!(fresh(&p, mins(60), 1), fresh(&p, mins(60), 2));
        assert_eq!(fresh(&p, mins(60), 7), fresh(&p, mins(60), 7));
    }

    #[test]
    fn jitter_never_reaches_expiry() {
        let p = RefreshPolicy {
            refresh_fraction: 0.999,
            min_fraction: 0.5,
            lead: TimeDelta::zero(),
            jitter_fraction: 0.4,
            jitter_max: TimeDelta::hours(1),
            max_refresh_interval: TimeDelta::days(365),
        };
        for seed in 0..500 {
            let at = fresh(&p, secs(1), seed);
            assert!(
                at >= t() + TimeDelta::milliseconds(500) && at < t() + secs(1),
                "{at}"
            );
        }
        // A 1 ms token: due at issue, before expiry.
        assert_eq!(fresh(&p, TimeDelta::milliseconds(1), 3), t());
    }

    #[test]
    fn max_refresh_interval_caps_long_lived_tokens() {
        let p = RefreshPolicy::default();
        let lifetime = Lifetime {
            issued: t(),
            expiry: t() + TimeDelta::days(30),
        };
        let mut rng = fastrand::Rng::with_seed(5);
        assert_eq!(
            p.next_refresh(lifetime, t(), None, t(), &mut rng),
            t() + TimeDelta::hours(24)
        );
        // Last refreshed 23 h ago (e.g. before a restart): due in an hour.
        let last = t() - TimeDelta::hours(23);
        assert_eq!(
            p.next_refresh(lifetime, last, None, t(), &mut rng),
            t() + TimeDelta::hours(1)
        );
        // Last refreshed two days ago: due now.
        let last = t() - TimeDelta::days(2);
        assert_eq!(p.next_refresh(lifetime, last, None, t(), &mut rng), t());
        // Without the cap it would be at 20 days, ± 60 s.
        let uncapped = RefreshPolicy {
            max_refresh_interval: TimeDelta::days(365),
            ..p
        };
        let at = uncapped.next_refresh(lifetime, t(), None, t(), &mut rng);
        assert!((at - (t() + TimeDelta::days(20))).abs() <= secs(60), "{at}");
    }

    #[test]
    fn refresh_token_expiry_caps() {
        let p = no_jitter();
        let mut rng = fastrand::Rng::with_seed(1);
        let hour = Lifetime {
            issued: t(),
            expiry: t() + mins(60),
        };
        // Refresh token dies in 30 min: refresh 5 min before that.
        let rt = Some(t() + mins(30));
        assert_eq!(p.next_refresh(hour, t(), rt, t(), &mut rng), t() + mins(25));
        // Dies after the access token's refresh point: no effect.
        let rt = Some(t() + TimeDelta::days(7));
        assert_eq!(p.next_refresh(hour, t(), rt, t(), &mut rng), t() + mins(40));
        // Only 4 min left (shorter than lead): half of it.
        let rt = Some(t() + mins(4));
        assert_eq!(p.next_refresh(hour, t(), rt, t(), &mut rng), t() + mins(2));
        // Already dead: now (the refresh will tell whether re-authorisation is needed).
        let rt = Some(t() - mins(1));
        assert_eq!(p.next_refresh(hour, t(), rt, t(), &mut rng), t());
        // RingCentral-like: 7-day idle refresh token under a 30-day access token and a long
        // max interval: lead before the refresh token dies.
        let long = RefreshPolicy {
            max_refresh_interval: TimeDelta::days(365),
            ..RefreshPolicy::default()
        };
        let month = Lifetime {
            issued: t(),
            expiry: t() + TimeDelta::days(30),
        };
        let rt = Some(t() + TimeDelta::days(7));
        assert_eq!(
            long.next_refresh(month, t(), rt, t(), &mut rng),
            t() + TimeDelta::days(7) - mins(5)
        );
    }

    #[test]
    fn first_sight_of_a_foreign_token() {
        // A token we did not issue, first seen now with 50 min left: its lifetime counts
        // from first sight, so refresh at 2/3 of the 50 min.
        let p = no_jitter();
        let lifetime = Lifetime {
            issued: t(),
            expiry: t() + mins(50),
        };
        let at = p.next_refresh(lifetime, t(), None, t(), &mut fastrand::Rng::with_seed(1));
        assert_eq!(at, t() + secs(2000));
    }

    #[test]
    fn hostile_settings_do_not_panic() {
        let p = RefreshPolicy {
            refresh_fraction: f64::NAN,
            min_fraction: 7.0,
            lead: TimeDelta::MIN,
            jitter_fraction: f64::INFINITY,
            jitter_max: TimeDelta::MAX,
            max_refresh_interval: TimeDelta::MAX,
        };
        assert!(p.validate().is_err());
        for life in [
            TimeDelta::milliseconds(1),
            secs(6),
            TimeDelta::days(100_000),
        ] {
            for seed in 0..20 {
                let at = fresh(&p, life, seed);
                assert!(at >= t() && at < t() + life, "{at}");
            }
        }
        let rt = Some(DateTime::<Utc>::MAX_UTC);
        let lifetime = Lifetime {
            issued: DateTime::<Utc>::MIN_UTC,
            expiry: DateTime::<Utc>::MAX_UTC,
        };
        let now = t();
        let at = p.next_refresh(
            lifetime,
            DateTime::<Utc>::MAX_UTC,
            rt,
            now,
            &mut fastrand::Rng::with_seed(1),
        );
        assert!(at >= now);
    }

    #[test]
    fn validate_rejects_bad_settings() {
        let d = RefreshPolicy::default;
        let bad = [
            RefreshPolicy {
                refresh_fraction: 0.0,
                ..d()
            },
            RefreshPolicy {
                refresh_fraction: 1.0,
                ..d()
            },
            RefreshPolicy {
                refresh_fraction: f64::NAN,
                ..d()
            },
            RefreshPolicy {
                min_fraction: 0.0,
                ..d()
            },
            RefreshPolicy {
                min_fraction: 1.5,
                ..d()
            },
            RefreshPolicy {
                min_fraction: 0.7,
                ..d()
            },
            RefreshPolicy {
                jitter_fraction: -0.1,
                ..d()
            },
            RefreshPolicy {
                jitter_fraction: 0.5,
                ..d()
            },
            RefreshPolicy {
                jitter_fraction: f64::NAN,
                ..d()
            },
            RefreshPolicy {
                lead: secs(-1),
                ..d()
            },
            RefreshPolicy {
                jitter_max: secs(-1),
                ..d()
            },
            RefreshPolicy {
                max_refresh_interval: TimeDelta::zero(),
                ..d()
            },
            RefreshPolicy {
                max_refresh_interval: secs(-5),
                ..d()
            },
        ];
        for p in bad {
            assert!(p.validate().is_err(), "{p:?}");
        }
        let edge = RefreshPolicy {
            min_fraction: 0.6,
            refresh_fraction: 0.6,
            jitter_fraction: 0.0,
            lead: TimeDelta::zero(),
            jitter_max: TimeDelta::zero(),
            max_refresh_interval: secs(1),
        };
        assert_eq!(edge.validate(), Ok(()));
        let msg = RefreshPolicy {
            min_fraction: 0.7,
            ..d()
        }
        .validate()
        .unwrap_err();
        assert!(msg.contains("min_fraction"), "{msg}");
    }
}
