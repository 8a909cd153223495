//! When a tenant's sync runs: its `sync_schedule` (SPEC 1.1, a standard 5-field cron
//! expression as crontab and Python's croniter write it) in its IANA `timezone`, shifted by
//! a stable per-tenant offset.
//!
//! The matcher is our own, small and tested, because two crontab rules decide the design and
//! neither is what a 6-field scheduler does by default:
//! - **Day of month OR day of week.** When both fields are restricted (neither starts with
//!   `*`), a day matches when either does: `0 9 1 * 1` is the 1st of every month *and* every
//!   Monday. When either starts with `*`, both must match (the `*` one always does).
//! - **Daylight saving, in the tenant's zone.** Times are matched on the local wall clock. A
//!   local time that does not exist (the spring-forward gap) runs at the next valid instant
//!   (03:00 for a 02:30 job in Europe/Berlin). A local time that occurs twice (fall back)
//!   runs once, at its first occurrence, when the hour field is restricted; a job with a
//!   wildcard hour (`*/15 * * * *`) keeps running through the repeated hour, as crontab does.
//!
//! [`TenantSchedule::resolve`] falls back to the configured default for an expression or a
//! zone it cannot use, and says so ([`Resolved::bad`]: the caller reports `bad_schedule`).

use chrono::{
    DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc,
};
use chrono_tz::Tz;

/// Why an expression cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error("expected 5 fields (minute hour day-of-month month day-of-week), found {0}")]
    FieldCount(usize),
    #[error("field {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("the expression never fires")]
    Never,
}

/// A parsed 5-field cron expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    /// Bits 1..=31.
    dom: u32,
    /// Bits 1..=12.
    months: u16,
    /// Bits 0..=6, Sunday = 0.
    dow: u8,
    dom_star: bool,
    dow_star: bool,
    hour_star: bool,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

struct Spec {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
    /// First name's value (1 for months, 0 for days).
    names_from: u32,
}

fn value(s: &str, spec: &Spec) -> Result<u32, String> {
    if let Some(i) = spec.names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
        return Ok(spec.names_from + i as u32);
    }
    let v: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    // Day of week 7 is Sunday too.
    let v = if spec.name == "day-of-week" && v == 7 {
        0
    } else {
        v
    };
    if v < spec.min || v > spec.max {
        return Err(format!("{v} is outside {}-{}", spec.min, spec.max));
    }
    Ok(v)
}

/// Parses one field into a bit set; returns it and whether the field starts with `*`.
fn field(text: &str, spec: &Spec) -> Result<(u64, bool), CronError> {
    let err = |reason: String| CronError::Field {
        field: spec.name,
        reason,
    };
    let mut bits = 0u64;
    for item in text.split(',') {
        let (range, step) = match item.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| err(format!("bad step {s:?}")))?;
                if step == 0 {
                    return Err(err("step 0".into()));
                }
                (r, step)
            }
            None => (item, 1),
        };
        let (lo, hi) = if range == "*" {
            (spec.min, spec.max)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (value(a, spec).map_err(err)?, value(b, spec).map_err(err)?);
            // `5-7` in day-of-week (Fri-Sun) ends at 7 = Sunday.
            let b = if spec.name == "day-of-week" && b == 0 && a > 0 {
                7
            } else {
                b
            };
            if a > b {
                return Err(err(format!("range {range:?} runs backwards")));
            }
            (a, b)
        } else {
            let a = value(range, spec).map_err(err)?;
            // `a/n`: from a to the end, every n.
            (a, if item.contains('/') { spec.max } else { a })
        };
        let mut v = lo;
        while v <= hi {
            let bit = if spec.name == "day-of-week" { v % 7 } else { v };
            bits |= 1u64 << bit;
            v = match v.checked_add(step) {
                Some(n) => n,
                None => break,
            };
        }
    }
    if bits == 0 {
        return Err(err("empty".into()));
    }
    Ok((bits, text.starts_with('*')))
}

impl Cron {
    /// Parses a 5-field expression (names `jan`..`dec`, `sun`..`sat`; `7` = Sunday) or one
    /// of `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`.
    pub fn parse(expr: &str) -> Result<Cron, CronError> {
        let expr = expr.trim();
        let expanded = match expr.to_ascii_lowercase().as_str() {
            "@yearly" | "@annually" => "0 0 1 1 *".to_string(),
            "@monthly" => "0 0 1 * *".to_string(),
            "@weekly" => "0 0 * * 0".to_string(),
            "@daily" | "@midnight" => "0 0 * * *".to_string(),
            "@hourly" => "0 * * * *".to_string(),
            _ => expr.to_string(),
        };
        let parts: Vec<&str> = expanded.split_whitespace().collect();
        if parts.len() != 5 {
            return Err(CronError::FieldCount(parts.len()));
        }
        let spec = |name, min, max, names, names_from| Spec {
            name,
            min,
            max,
            names,
            names_from,
        };
        let (minutes, _) = field(parts[0], &spec("minute", 0, 59, &[], 0))?;
        let (hours, hour_star) = field(parts[1], &spec("hour", 0, 23, &[], 0))?;
        let (dom, dom_star) = field(parts[2], &spec("day-of-month", 1, 31, &[], 0))?;
        let (months, _) = field(parts[3], &spec("month", 1, 12, &MONTHS, 1))?;
        let (dow, dow_star) = field(parts[4], &spec("day-of-week", 0, 7, &DAYS, 0))?;
        // The masks fit their widths by construction (values checked against the ranges).
        let cron = Cron {
            minutes,
            hours: hours as u32,
            dom: dom as u32,
            months: months as u16,
            dow: dow as u8,
            dom_star,
            dow_star,
            hour_star,
        };
        // `0 0 31 2 *` parses but never fires.
        if cron.next_after(Utc::now(), Tz::UTC).is_none() {
            return Err(CronError::Never);
        }
        Ok(cron)
    }

    fn day_matches(&self, d: NaiveDate) -> bool {
        let dom = self.dom & (1 << d.day()) != 0;
        let dow = self.dow & (1 << d.weekday().num_days_from_sunday()) != 0;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first instant strictly after `after` at which the expression fires in `tz`
    /// (`None`: not within the next five years).
    ///
    /// Local candidates are walked in wall-clock order from an hour before `after`'s local
    /// time (so that the second pass of a repeated hour is seen); in a repeated hour the
    /// second occurrence of a time is a later instant than the first occurrence of a later
    /// time, so such a candidate is kept as `best` until a plain one is found.
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&tz).naive_local();
        let mut c = local.with_second(0)?.with_nanosecond(0)? - Duration::minutes(60);
        let limit = local + Duration::days(5 * 366);
        let mut best: Option<DateTime<Utc>> = None;
        let pick =
            |best: Option<DateTime<Utc>>, t: DateTime<Utc>| Some(best.map_or(t, |b| b.min(t)));
        while c <= limit {
            if self.months & (1 << c.month()) == 0 {
                let (y, m) = if c.month() == 12 {
                    (c.year().checked_add(1)?, 1)
                } else {
                    (c.year(), c.month() + 1)
                };
                c = NaiveDate::from_ymd_opt(y, m, 1)?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if !self.day_matches(c.date()) {
                c = c.date().succ_opt()?.and_hms_opt(0, 0, 0)?;
                continue;
            }
            if self.hours & (1 << c.hour()) == 0 {
                c = c.with_minute(0)? + Duration::hours(1);
                continue;
            }
            if self.minutes & (1 << c.minute()) == 0 {
                c += Duration::minutes(1);
                continue;
            }
            match tz.from_local_datetime(&c) {
                LocalResult::Single(t) => {
                    let t = t.with_timezone(&Utc);
                    if t > after {
                        return pick(best, t);
                    }
                }
                LocalResult::Ambiguous(first, second) => {
                    let (first, second) = (first.with_timezone(&Utc), second.with_timezone(&Utc));
                    if first > after {
                        return pick(best, first);
                    }
                    if self.hour_star && second > after {
                        best = pick(best, second);
                    }
                }
                LocalResult::None => {
                    if let Some(t) = gap_end(c, tz).filter(|t| *t > after) {
                        return pick(best, t);
                    }
                }
            }
            c += Duration::minutes(1);
        }
        best
    }
}

/// The first valid instant after the nonexistent local time `c`: where the clock resumes.
fn gap_end(c: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    let mut n = c;
    for _ in 0..(26 * 60) {
        n += Duration::minutes(1);
        if let Some(t) = tz.from_local_datetime(&n).earliest() {
            return Some(t.with_timezone(&Utc));
        }
    }
    None
}

/// A tenant's schedule as resolved from its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantSchedule {
    pub cron: Cron,
    pub tz: Tz,
    /// Stable offset added to every fire time.
    pub offset: Duration,
}

/// What [`TenantSchedule::resolve`] found.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub schedule: TenantSchedule,
    /// Why the tenant's own expression or zone was not used (`bad_schedule`).
    pub bad: Option<String>,
}

/// FNV-1a: a hash that is the same in every build and on every replica.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The tenant's offset within `[0, spread_secs)`.
pub fn offset(tenant: &str, spread_secs: u64) -> Duration {
    if spread_secs == 0 {
        return Duration::zero();
    }
    Duration::seconds(i64::try_from(stable_hash(tenant) % spread_secs).unwrap_or(0))
}

impl TenantSchedule {
    /// The tenant's `sync_schedule` and `timezone` (either may be empty), else `default`
    /// in UTC; `default` must parse (config validation checks it).
    pub fn resolve(
        tenant: &str,
        expr: Option<&str>,
        zone: Option<&str>,
        default: &Cron,
        spread_secs: u64,
    ) -> Resolved {
        let mut bad = Vec::new();
        let tz = match zone.map(str::trim).filter(|z| !z.is_empty()) {
            None => Tz::UTC,
            Some(z) => match z.parse::<Tz>() {
                Ok(tz) => tz,
                Err(_) => {
                    bad.push(format!(
                        "timezone {:?} is not an IANA zone",
                        crate::text::escape_control(z)
                    ));
                    Tz::UTC
                }
            },
        };
        let cron = match expr.map(str::trim).filter(|e| !e.is_empty()) {
            None => default.clone(),
            Some(e) => match Cron::parse(e) {
                Ok(c) => c,
                Err(err) => {
                    bad.push(format!("sync_schedule: {err}"));
                    default.clone()
                }
            },
        };
        let bad_zone = bad.iter().any(|b| b.starts_with("timezone"));
        let cron = if bad_zone { default.clone() } else { cron };
        Resolved {
            schedule: TenantSchedule {
                cron,
                tz,
                offset: offset(tenant, spread_secs),
            },
            bad: (!bad.is_empty()).then(|| bad.join("; ")),
        }
    }

    /// The first run strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let base = self.cron.next_after(after - self.offset, self.tz)?;
        Some(base + self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|d| d.with_timezone(&Utc))
            .unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn runs(expr: &str, tz: Tz, from: &str, n: usize) -> Vec<String> {
        let cron = Cron::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}"));
        let mut at = utc(from);
        let mut out = Vec::new();
        for _ in 0..n {
            at = cron
                .next_after(at, tz)
                .unwrap_or_else(|| panic!("{expr}: no next"));
            out.push(at.with_timezone(&tz).to_rfc3339());
        }
        out
    }

    #[test]
    fn day_of_month_or_day_of_week_when_both_are_restricted() {
        // 2026-06-01 is a Monday; the 1st of July a Wednesday.
        let got = runs("0 9 1 * 1", Tz::UTC, "2026-05-31T12:00:00Z", 6);
        assert_eq!(
            got,
            [
                "2026-06-01T09:00:00+00:00", // the 1st, also a Monday
                "2026-06-08T09:00:00+00:00",
                "2026-06-15T09:00:00+00:00",
                "2026-06-22T09:00:00+00:00",
                "2026-06-29T09:00:00+00:00",
                "2026-07-01T09:00:00+00:00", // the 1st, a Wednesday
            ]
        );
        // A `*` day-of-week: only the 1st. A `*` day-of-month: only Mondays.
        assert_eq!(
            runs("0 9 1 * *", Tz::UTC, "2026-06-02T00:00:00Z", 1),
            ["2026-07-01T09:00:00+00:00"]
        );
        assert_eq!(
            runs("0 9 * * mon", Tz::UTC, "2026-06-02T00:00:00Z", 1),
            ["2026-06-08T09:00:00+00:00"]
        );
        // `*/2` starts with `*`: AND semantics, as crontab.
        assert_eq!(
            runs("0 9 */2 * 1", Tz::UTC, "2026-06-02T00:00:00Z", 1),
            ["2026-06-15T09:00:00+00:00"]
        );
    }

    #[test]
    fn a_local_time_that_does_not_exist_runs_at_the_next_valid_instant() {
        let berlin: Tz = "Europe/Berlin".parse().expect("zone");
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST.
        assert_eq!(
            runs("30 2 * * *", berlin, "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
        );
        // Every 15 minutes: the gap collapses to one run at 03:00.
        assert_eq!(
            runs("*/15 * * * *", berlin, "2026-03-29T00:40:00Z", 3),
            [
                "2026-03-29T01:45:00+01:00",
                "2026-03-29T03:00:00+02:00",
                "2026-03-29T03:15:00+02:00"
            ]
        );
    }

    #[test]
    fn a_repeated_local_time_runs_once() {
        let ny: Tz = "America/New_York".parse().expect("zone");
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        assert_eq!(
            runs("30 1 * * *", ny, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
        );
        // A wildcard hour keeps its rhythm through the repeated hour.
        assert_eq!(
            runs("0,30 * * * *", ny, "2026-11-01T05:10:00Z", 4),
            [
                "2026-11-01T01:30:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T01:30:00-05:00",
                "2026-11-01T02:00:00-05:00"
            ]
        );
    }

    #[test]
    fn parses_crontab_forms_and_refuses_bad_ones() {
        for ok in [
            "*/15 * * * *",
            "0 9-17/2 * * mon-fri",
            "5 4 * jan,jul sun",
            "0 0 * * 7",
            "@daily",
            "0 12 29 2 *",
        ] {
            assert!(Cron::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "*/0 * * * *",
            "0 0 31 2 *",
            "x * * * *",
            "* * * * * *",
            "5-1 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Cron::parse("0 0 30 2 *"), Err(CronError::Never));
    }

    #[test]
    fn offsets_are_stable_and_within_the_spread() {
        assert_eq!(offset("acme", 300), offset("acme", 300));
        assert!(offset("acme", 300) < Duration::seconds(300));
        assert_eq!(offset("acme", 0), Duration::zero());
        let distinct: std::collections::HashSet<_> =
            (0..1000).map(|i| offset(&format!("t{i}"), 900)).collect();
        assert!(distinct.len() > 500, "offsets spread: {}", distinct.len());
        let default = Cron::parse("*/15 * * * *").expect("default");
        let r = TenantSchedule::resolve(
            "acme",
            Some("0 9 * * *"),
            Some("Mars/Olympus"),
            &default,
            60,
        );
        assert!(r.bad.as_deref().is_some_and(|b| b.contains("timezone")));
        assert_eq!(r.schedule.cron, default);
        let r = TenantSchedule::resolve("acme", Some("bogus"), Some("Europe/Berlin"), &default, 60);
        assert!(r.bad.is_some());
        assert_eq!(r.schedule.tz, chrono_tz::Europe::Berlin);
        let r = TenantSchedule::resolve("acme", None, None, &default, 60);
        assert!(r.bad.is_none());
        let at = r
            .schedule
            .next_after(utc("2026-01-01T00:00:00Z"))
            .expect("next");
        let expect = if r.schedule.offset.is_zero() {
            utc("2026-01-01T00:15:00Z")
        } else {
            utc("2026-01-01T00:00:00Z") + r.schedule.offset
        };
        assert_eq!(at, expect);
    }
}
