//! The retry policy for transient token-endpoint failures, in one place (PROVIDERS.md rule 3).
//!
//! A [`RetryPolicy`] is data: exponential backoff from `base`, growing by `multiplier` per
//! attempt, capped at `max`, with part of each delay randomised (`jitter`) so that many
//! credentials failing together do not retry together. When the provider sends
//! `Retry-After` ([`parse_retry_after`]: delta seconds, an HTTP date, or Zoom's ISO 8601
//! timestamp), the delay is at least that long, up to `retry_after_max`.
//!
//! Attempt numbers count retries: attempt 1 is the first retry after the first failure.
//! With `base` 1 s, `multiplier` 2, `max` 300 s and `jitter` 0.5, attempts 1, 2, 3, ... wait
//! up to 1 s, 2 s, 4 s, ... 256 s, then 300 s, each between half and all of that.
//!
//! Which errors are retried at all (429, 5xx, timeouts, connection errors; never
//! `invalid_grant` and friends) is decided by the refresh error type, not here.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, Utc};

/// No delay is shorter than this, so a misconfigured policy cannot spin.
const MIN_DELAY: Duration = Duration::from_millis(1);

/// Beyond this many doublings every sane policy has reached its cap; keeps `powi` in range.
const MAX_EXPONENT: u32 = 4096;

/// Exponential backoff with jitter and a cap, honouring `Retry-After`.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Cap on the backoff delay (before jitter).
    pub max: Duration,
    /// Growth per attempt; values below 1 (or not finite) are treated as 1.
    pub multiplier: f64,
    /// Fraction (0..=1) of each delay that is randomised: the delay `d` becomes a uniform
    /// pick in `[d * (1 - jitter), d]`. Out-of-range values are clamped.
    pub jitter: f64,
    /// Longest `Retry-After` honoured; longer requests are cut to this.
    pub retry_after_max: Duration,
}

impl RetryPolicy {
    /// The backoff before retry number `attempt` (1 = first retry; 0 is treated as 1):
    /// `base * multiplier^(attempt - 1)`, capped at `max`, jittered within
    /// `[d * (1 - jitter), d]`, and never below 1 ms.
    pub fn backoff(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let exponent = attempt.saturating_sub(1).min(MAX_EXPONENT);
        let multiplier = if self.multiplier.is_finite() && self.multiplier >= 1.0 {
            self.multiplier
        } else {
            1.0
        };
        // `exponent` is at most MAX_EXPONENT, well inside i32.
        let factor = multiplier.powi(i32::try_from(exponent).unwrap_or(i32::MAX));
        let raw = self.base.as_secs_f64() * factor;
        let capped = if raw.is_finite() && raw < self.max.as_secs_f64() {
            Duration::try_from_secs_f64(raw).unwrap_or(self.max)
        } else {
            self.max
        };
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        // rng.f64() is in [0, 1), so the factor is in (1 - jitter, 1].
        let keep = 1.0 - jitter * rng.f64();
        let jittered = Duration::try_from_secs_f64(capped.as_secs_f64() * keep)
            .unwrap_or(capped)
            .min(capped);
        jittered.max(MIN_DELAY)
    }

    /// The delay before retry number `attempt`: the backoff, or the provider's
    /// `Retry-After` (cut to `retry_after_max`) when that is longer.
    pub fn delay(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        rng: &mut fastrand::Rng,
    ) -> Duration {
        let backoff = self.backoff(attempt, rng);
        match retry_after {
            Some(wanted) => backoff.max(wanted.min(self.retry_after_max)),
            None => backoff,
        }
    }
}

/// Reads a `Retry-After` header value, relative to `now`.
///
/// Accepts delta seconds (`120`, also fractional `1.5`), an HTTP date (IMF-fixdate
/// `Sun, 06 Nov 1994 08:49:37 GMT`, the obsolete RFC 850 `Sunday, 06-Nov-94 08:49:37 GMT`
/// and asctime `Sun Nov  6 08:49:37 1994` forms), or an ISO 8601 timestamp (Zoom's daily
/// limit, `2026-11-29T00:00:00Z`). A date in the past gives `Some(Duration::ZERO)`;
/// anything unreadable gives `None`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return parse_delta_seconds(value);
    }
    let at = parse_http_date(value, now)
        .or_else(|| crate::timestamp::parse(value).ok().map(|ts| ts.at))?;
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// `120` or `1.5` (non-negative decimal seconds). Absurdly large values saturate.
fn parse_delta_seconds(value: &str) -> Option<Duration> {
    let (int_part, frac_part) = match value.split_once('.') {
        Some((i, f)) => (i, f),
        None => (value, ""),
    };
    if int_part.is_empty()
        || frac_part.contains('.')
        || (value.contains('.') && frac_part.is_empty())
    {
        return None;
    }
    let secs = int_part.parse::<u64>().unwrap_or(u64::MAX);
    let mut nanos = 0u32;
    let mut scale = 100_000_000u32;
    for b in frac_part.bytes().take(9) {
        nanos += u32::from(b - b'0') * scale;
        scale /= 10;
    }
    Some(Duration::new(secs, nanos))
}

/// The three HTTP-date forms of RFC 9110 section 5.6.7.
fn parse_http_date(value: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    if let Ok(dt) = DateTime::parse_from_rfc2822(value) {
        return Some(dt.with_timezone(&Utc));
    }
    let tokens: Vec<&str> = value.split_whitespace().collect();
    match tokens.as_slice() {
        // Sunday, 06-Nov-94 08:49:37 GMT
        [weekday, date, time, "GMT"] if weekday.ends_with(',') => {
            let mut parts = date.split('-');
            let (day, month, year) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || year.len() != 2 {
                return None;
            }
            let year = two_digit_year(year.parse().ok()?, now);
            build(year, month, day, time)
        }
        // Sun Nov  6 08:49:37 1994
        [_weekday, month, day, time, year] if year.len() == 4 => {
            build(year.parse().ok()?, month, day, time)
        }
        _ => None,
    }
}

/// RFC 9110: a two-digit year more than 50 years in the future is in the past century.
fn two_digit_year(yy: i32, now: DateTime<Utc>) -> i32 {
    use chrono::Datelike;
    let this_year = now.year();
    let candidate = this_year - this_year.rem_euclid(100) + yy;
    if candidate > this_year + 50 {
        candidate - 100
    } else {
        candidate
    }
}

fn build(year: i32, month: &str, day: &str, time: &str) -> Option<DateTime<Utc>> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS
        .iter()
        .position(|m| m.eq_ignore_ascii_case(month))
        .and_then(|i| u32::try_from(i + 1).ok())?;
    if day.is_empty() || day.len() > 2 || !day.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(year, month, day.parse().ok()?)?;
    let time = NaiveTime::parse_from_str(time, "%H:%M:%S").ok()?;
    Some(NaiveDateTime::new(date, time).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.5,
            retry_after_max: Duration::from_secs(3600),
        }
    }

    fn no_jitter() -> RetryPolicy {
        RetryPolicy {
            jitter: 0.0,
            ..policy()
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, 3, 20, 0).unwrap()
    }

    #[test]
    fn grows_exponentially_then_caps() {
        let p = no_jitter();
        let mut rng = fastrand::Rng::with_seed(1);
        let got: Vec<u64> = (1..=12).map(|a| p.backoff(a, &mut rng).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        // Attempt 0 is the same as attempt 1.
        assert_eq!(p.backoff(0, &mut rng), Duration::from_secs(1));
    }

    #[test]
    fn fractional_multiplier_and_millisecond_base() {
        let p = RetryPolicy {
            base: Duration::from_millis(250),
            multiplier: 1.5,
            ..no_jitter()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(p.backoff(1, &mut rng), Duration::from_millis(250));
        assert_eq!(p.backoff(2, &mut rng), Duration::from_millis(375));
        assert_eq!(p.backoff(3, &mut rng).as_micros(), 562_500);
    }

    #[test]
    fn huge_attempts_do_not_overflow() {
        let mut rng = fastrand::Rng::with_seed(7);
        for p in [no_jitter(), policy()] {
            for a in [64, 1000, 4096, 4097, u32::MAX - 1, u32::MAX] {
                let d = p.backoff(a, &mut rng);
                assert!(d <= p.max && d >= p.max / 2, "{a}: {d:?}");
            }
        }
        let extreme = RetryPolicy {
            base: Duration::MAX,
            max: Duration::MAX,
            multiplier: f64::MAX,
            jitter: 1.0,
            retry_after_max: Duration::MAX,
        };
        for a in [1, 2, u32::MAX] {
            let d = extreme.delay(a, Some(Duration::MAX), &mut rng);
            assert_eq!(d, Duration::MAX);
            let _ = extreme.backoff(a, &mut rng);
        }
    }

    #[test]
    fn jitter_stays_within_bounds_and_spreads() {
        let p = policy();
        for attempt in [1, 3, 9, 10, 40] {
            let full = no_jitter().backoff(attempt, &mut fastrand::Rng::with_seed(0));
            let mut lo = Duration::MAX;
            let mut hi = Duration::ZERO;
            for seed in 0..2000 {
                let d = p.backoff(attempt, &mut fastrand::Rng::with_seed(seed));
                assert!(d <= full, "attempt {attempt} seed {seed}: {d:?} > {full:?}");
                assert!(d >= full / 2, "attempt {attempt} seed {seed}: {d:?} < half");
                lo = lo.min(d);
                hi = hi.max(d);
            }
            // The picks cover most of the allowed band.
            assert!(lo < full.mul_f64(0.55), "attempt {attempt}: lowest {lo:?}");
            assert!(hi > full.mul_f64(0.95), "attempt {attempt}: highest {hi:?}");
        }
    }

    #[test]
    fn same_seed_same_delay() {
        let p = policy();
        let a = p.backoff(5, &mut fastrand::Rng::with_seed(42));
        let b = p.backoff(5, &mut fastrand::Rng::with_seed(42));
        assert_eq!(a, b);
    }

    #[test]
    fn never_zero_and_odd_settings_are_tamed() {
        let mut rng = fastrand::Rng::with_seed(3);
        let zero = RetryPolicy {
            base: Duration::ZERO,
            max: Duration::ZERO,
            multiplier: 2.0,
            jitter: 1.0,
            retry_after_max: Duration::ZERO,
        };
        for a in 1..50 {
            assert_eq!(zero.backoff(a, &mut rng), MIN_DELAY);
        }
        let full_jitter = RetryPolicy {
            base: Duration::from_millis(10),
            jitter: 1.0,
            ..policy()
        };
        for _ in 0..1000 {
            assert!(full_jitter.backoff(1, &mut rng) >= MIN_DELAY);
        }
        for (multiplier, jitter) in [
            (f64::NAN, f64::NAN),
            (0.5, -1.0),
            (-3.0, 7.0),
            (f64::INFINITY, 0.0),
        ] {
            let p = RetryPolicy {
                multiplier,
                jitter,
                ..policy()
            };
            for a in [1, 2, 3, 100, u32::MAX] {
                let d = p.backoff(a, &mut rng);
                assert!(
                    d >= MIN_DELAY && d <= p.max,
                    "{multiplier} {jitter} {a}: {d:?}"
                );
            }
        }
        // Non-finite or sub-1 multipliers mean a constant backoff.
        let flat = RetryPolicy {
            multiplier: 0.5,
            ..no_jitter()
        };
        assert_eq!(flat.backoff(9, &mut rng), Duration::from_secs(1));
    }

    #[test]
    fn max_below_base_caps_everything() {
        let p = RetryPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(3),
            ..no_jitter()
        };
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(p.backoff(1, &mut rng), Duration::from_secs(3));
    }

    #[test]
    fn delay_honours_retry_after_up_to_its_cap() {
        let p = no_jitter();
        let mut rng = fastrand::Rng::with_seed(1);
        assert_eq!(p.delay(1, None, &mut rng), Duration::from_secs(1));
        // Retry-After longer than the backoff wins.
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(120)), &mut rng),
            Duration::from_secs(120)
        );
        // Shorter than the backoff: the backoff wins.
        assert_eq!(
            p.delay(5, Some(Duration::from_secs(2)), &mut rng),
            Duration::from_secs(16)
        );
        assert_eq!(
            p.delay(3, Some(Duration::ZERO), &mut rng),
            Duration::from_secs(4)
        );
        // Beyond retry_after_max it is cut (Zoom's "come back tomorrow").
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(86_400)), &mut rng),
            Duration::from_secs(3600)
        );
        // Backoff above the Retry-After cap still applies.
        let small_cap = RetryPolicy {
            retry_after_max: Duration::from_secs(10),
            ..no_jitter()
        };
        assert_eq!(
            small_cap.delay(9, Some(Duration::from_secs(1000)), &mut rng),
            Duration::from_secs(256)
        );
    }

    #[test]
    fn retry_after_delta_seconds() {
        let n = now();
        assert_eq!(parse_retry_after("120", n), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 ", n), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", n),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("0.25", n),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_retry_after("99999999999999999999999", n),
            Some(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn retry_after_http_dates() {
        let n = Utc.with_ymd_and_hms(1994, 11, 6, 8, 48, 37).unwrap();
        let minute = Some(Duration::from_secs(60));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", n),
            minute
        );
        assert_eq!(
            parse_retry_after("Sunday, 06-Nov-94 08:49:37 GMT", n),
            minute
        );
        assert_eq!(parse_retry_after("Sun Nov  6 08:49:37 1994", n), minute);
        assert_eq!(parse_retry_after("Sun Nov 06 08:49:37 1994", n), minute);
        // Past dates mean "now".
        let later = now();
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", later),
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse_retry_after("Sat, 28 Nov 2026 03:25:00 GMT", later),
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn rfc850_two_digit_years_follow_rfc9110() {
        let n = now(); // 2026
        let at = |v: &str| parse_http_date(v, n).map(|d| d.date_naive().to_string());
        assert_eq!(
            at("Monday, 28-Dec-26 00:00:00 GMT").as_deref(),
            Some("2026-12-28")
        );
        assert_eq!(
            at("Sunday, 28-Dec-76 00:00:00 GMT").as_deref(),
            Some("2076-12-28")
        );
        assert_eq!(
            at("Tuesday, 28-Dec-77 00:00:00 GMT").as_deref(),
            Some("1977-12-28")
        );
    }

    #[test]
    fn retry_after_iso_timestamps() {
        let n = now();
        let to_midnight = Some(Duration::from_secs(20 * 3600 + 40 * 60));
        assert_eq!(parse_retry_after("2026-11-29T00:00:00Z", n), to_midnight);
        assert_eq!(
            parse_retry_after("2026-11-29T00:00:00+00:00", n),
            to_midnight
        );
        assert_eq!(parse_retry_after("2026-11-29T00:00:00", n), to_midnight);
        assert_eq!(
            parse_retry_after("2026-11-28T19:00:00-05:00", n),
            to_midnight
        );
        assert_eq!(
            parse_retry_after("2026-11-28T03:20:00.5Z", n),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after("2026-11-27T00:00:00Z", n),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn retry_after_garbage() {
        let n = now();
        for bad in [
            "",
            "  ",
            "soon",
            "-5",
            "+5",
            "1.",
            ".5",
            "1.2.3",
            "1e3",
            "NaN",
            "inf",
            "120 seconds",
            "Sun, 06 Nov 1994",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-1994 08:49:37 GMT",
            "Sunday, 06-Foo-94 08:49:37 GMT",
            "Sun Nov  6 25:49:37 1994",
            "Sun Nov 666 08:49:37 1994",
            "2026-11-29",
            "Zoom says: tomorrow",
        ] {
            assert_eq!(parse_retry_after(bad, n), None, "{bad:?}");
        }
    }
}
