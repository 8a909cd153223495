//! Value formats of the gateway's Redis records (SPEC 1.4): timestamps, booleans and JSON
//! string arrays, as the Python gateway writes them.
//!
//! A timestamp is read in any of the forms the gateway may have written and remembers
//! which form that was ([`TimestampFormat`]), so that tokenwarden writes `token_expiry` and
//! `updated_at` back in the same form:
//!
//! | input | kind | written back as |
//! | --- | --- | --- |
//! | `2026-11-28T03:20:00`, `2026-11-28 03:20:00.5` | [`TimestampFormat::IsoNaive`] (UTC) | `2026-11-28T03:20:00`, `2026-11-28 03:20:00.500000` |
//! | `2026-11-28T03:20:00Z`, `...+00:00`, `...-05:00` | [`TimestampFormat::IsoOffset`] | `...+00:00` (never `Z`), `...-05:00` |
//! | `1764300000` | [`TimestampFormat::EpochSeconds`] | `1764300000` |
//! | `1764300000.5` | [`TimestampFormat::EpochFloat`] | `1764300000.5` |
//! | `1764300000123` (> 10^11) | [`TimestampFormat::EpochMillis`] | `1764300000123` |
//!
//! ISO output follows Python's `datetime.isoformat()`: fractional seconds only when the
//! microseconds are non-zero, then always six digits (finer precision is truncated). The
//! date/time separator (`T` or a space) is kept. Epoch floats are written like Python's
//! `str(float)` for current times: up to six decimals, trailing zeros trimmed, at least one.
//! A field that was empty is written with [`iso_utc`].
//!
//! Numbers are read exactly (no floating point), so `1764300000.123456` keeps its
//! microseconds. Date-only values, `NaN`, infinities, negative numbers, exponents and
//! anything else are rejected with a [`TimestampError`] that quotes at most the first 40
//! characters of the input.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeDelta, Timelike, Utc};

/// Numbers above this are epoch milliseconds, at or below it epoch seconds (SPEC 1.4).
const MILLIS_THRESHOLD: u64 = 100_000_000_000;

/// How much of a bad input an error message may quote.
const MAX_ECHO_CHARS: usize = 40;

/// The representation a timestamp field had when it was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampFormat {
    /// ISO 8601 without an offset (meaning UTC); `sep` is `T` or a space between date and time.
    IsoNaive { sep: char },
    /// ISO 8601 with an offset (`Z` reads as 0), written back as `+HH:MM`.
    IsoOffset { sep: char, offset_secs: i32 },
    /// Integer Unix seconds.
    EpochSeconds,
    /// Unix seconds with a fraction, as Python's `time.time()` gives them.
    EpochFloat,
    /// Unix milliseconds (any number above 10^11, with or without a fraction).
    EpochMillis,
}

/// A parsed timestamp: the instant and the form it was written in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timestamp {
    pub at: DateTime<Utc>,
    pub format: TimestampFormat,
}

/// Why a timestamp value could not be read. Messages quote at most 40 characters of input.
#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    #[error("empty timestamp")]
    Empty,
    #[error("invalid timestamp {input:?}: {reason}")]
    Invalid { input: String, reason: &'static str },
    #[error("timestamp {input:?} is out of range")]
    OutOfRange { input: String },
}

impl TimestampError {
    fn invalid(input: &str, reason: &'static str) -> Self {
        TimestampError::Invalid {
            input: echo(input),
            reason,
        }
    }

    fn out_of_range(input: &str) -> Self {
        TimestampError::OutOfRange { input: echo(input) }
    }
}

/// The part of a bad input an error may show: its first 40 characters, marked when cut.
fn echo(input: &str) -> String {
    match input.char_indices().nth(MAX_ECHO_CHARS) {
        Some((cut, _)) => format!("{}...", &input[..cut]),
        None => input.to_owned(),
    }
}

/// Parses a timestamp field in any form of SPEC 1.4 (surrounding whitespace ignored).
pub fn parse(s: &str) -> Result<Timestamp, TimestampError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(TimestampError::Empty);
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        parse_number(s)
    } else {
        parse_iso(s)
    }
}

/// Epoch seconds or milliseconds: `digits` or `digits.digits`.
fn parse_number(s: &str) -> Result<Timestamp, TimestampError> {
    let (int_part, frac_part) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    if int_part.is_empty() {
        return Err(TimestampError::invalid(
            s,
            "no digits before the decimal point",
        ));
    }
    if let Some(f) = frac_part {
        if f.is_empty() || f.contains('.') {
            return Err(TimestampError::invalid(s, "malformed decimal number"));
        }
    }
    let int: u64 = int_part
        .parse()
        .map_err(|_| TimestampError::out_of_range(s))?;
    // Fraction as nanoseconds of the unit, truncated to 9 digits.
    let frac_nanos = frac_part.map(frac_to_nanos).unwrap_or(0);
    let is_millis = int > MILLIS_THRESHOLD || (int == MILLIS_THRESHOLD && frac_nanos > 0);

    let (secs, nanos, format) = if is_millis {
        let secs = int / 1000;
        // (int % 1000) ms plus a fraction of a millisecond, in nanoseconds.
        let nanos = (int % 1000) * 1_000_000 + frac_nanos / 1000;
        (secs, nanos, TimestampFormat::EpochMillis)
    } else if frac_part.is_some() {
        (int, frac_nanos, TimestampFormat::EpochFloat)
    } else {
        (int, 0, TimestampFormat::EpochSeconds)
    };
    let secs = i64::try_from(secs).map_err(|_| TimestampError::out_of_range(s))?;
    let nanos = u32::try_from(nanos).map_err(|_| TimestampError::out_of_range(s))?;
    let at =
        DateTime::from_timestamp(secs, nanos).ok_or_else(|| TimestampError::out_of_range(s))?;
    Ok(Timestamp { at, format })
}

/// Decimal fraction digits (ASCII digits only) to nanoseconds, truncating past 9 digits.
fn frac_to_nanos(digits: &str) -> u64 {
    let mut nanos = 0u64;
    let mut scale = 100_000_000u64;
    for b in digits.bytes().take(9) {
        nanos += u64::from(b - b'0') * scale;
        scale /= 10;
    }
    nanos
}

/// A fixed-width run of ASCII digits as a number.
fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `YYYY-MM-DD{T|t| }HH:MM:SS[.f{1,9}][Z|z|±HH:MM|±HHMM]`.
fn parse_iso(s: &str) -> Result<Timestamp, TimestampError> {
    let bytes = s.as_bytes();
    // Everything up to the offset is ASCII, so byte indices below are char boundaries.
    if bytes.len() < 19 || !s.is_char_boundary(19) {
        return Err(TimestampError::invalid(
            s,
            "expected YYYY-MM-DDTHH:MM:SS (date and time)",
        ));
    }
    let bad_shape = || TimestampError::invalid(s, "expected YYYY-MM-DDTHH:MM:SS (date and time)");
    if bytes[4] != b'-' || bytes[7] != b'-' || bytes[13] != b':' || bytes[16] != b':' {
        return Err(bad_shape());
    }
    let sep = char::from(bytes[10]);
    if !matches!(sep, 'T' | 't' | ' ') {
        return Err(TimestampError::invalid(
            s,
            "date and time must be separated by 'T' or a space",
        ));
    }
    let year = digits(&s[0..4]).ok_or_else(bad_shape)?;
    let month = digits(&s[5..7]).ok_or_else(bad_shape)?;
    let day = digits(&s[8..10]).ok_or_else(bad_shape)?;
    let hour = digits(&s[11..13]).ok_or_else(bad_shape)?;
    let minute = digits(&s[14..16]).ok_or_else(bad_shape)?;
    let second = digits(&s[17..19]).ok_or_else(bad_shape)?;

    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(after_dot) = rest.strip_prefix('.') {
        let n = after_dot.bytes().take_while(|b| b.is_ascii_digit()).count();
        if !(1..=9).contains(&n) {
            return Err(TimestampError::invalid(
                s,
                "fractional seconds must have 1 to 9 digits",
            ));
        }
        // At most 9 digits: below 10^9, fits in u32.
        nanos = u32::try_from(frac_to_nanos(&after_dot[..n])).unwrap_or(0);
        rest = &after_dot[n..];
    }

    let offset_secs = parse_offset(rest)
        .ok_or_else(|| TimestampError::invalid(s, "offset must be Z, +HH:MM or -HH:MM"))?;

    let date = i32::try_from(year)
        .ok()
        .and_then(|y| NaiveDate::from_ymd_opt(y, month, day))
        .ok_or_else(|| TimestampError::invalid(s, "no such date"))?;
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nanos)
        .ok_or_else(|| TimestampError::invalid(s, "no such time of day"))?;
    let local = NaiveDateTime::new(date, time);

    match offset_secs {
        None => Ok(Timestamp {
            at: local.and_utc(),
            format: TimestampFormat::IsoNaive { sep },
        }),
        Some(offset_secs) => {
            let utc = local
                .checked_sub_signed(TimeDelta::seconds(i64::from(offset_secs)))
                .ok_or_else(|| TimestampError::out_of_range(s))?;
            Ok(Timestamp {
                at: utc.and_utc(),
                format: TimestampFormat::IsoOffset { sep, offset_secs },
            })
        }
    }
}

/// The offset suffix: `Some(None)` when absent, `Some(Some(secs))` when valid, `None` when bad.
fn parse_offset(rest: &str) -> Option<Option<i32>> {
    match rest {
        "" => return Some(None),
        "Z" | "z" => return Some(Some(0)),
        _ => {}
    }
    let sign = match rest.as_bytes().first() {
        Some(b'+') => 1,
        Some(b'-') => -1,
        _ => return None,
    };
    let body = &rest[1..];
    if !body.is_ascii() {
        return None;
    }
    let (hh, mm) = match body.len() {
        5 if body.as_bytes()[2] == b':' => (&body[0..2], &body[3..5]),
        4 => (&body[0..2], &body[2..4]),
        _ => return None,
    };
    let hours = digits(hh)?;
    let minutes = digits(mm)?;
    if hours > 23 || minutes > 59 {
        return None;
    }
    let secs = i32::try_from(hours * 3600 + minutes * 60).ok()?;
    Some(Some(sign * secs))
}

/// Writes `at` in the given representation, the way the Python gateway would.
///
/// For [`TimestampFormat::IsoOffset`] the local time is shifted to the offset; an offset of
/// a day or more (which cannot come from [`parse`]) is written as `+00:00`.
pub fn format(at: DateTime<Utc>, format: TimestampFormat) -> String {
    match format {
        TimestampFormat::IsoNaive { sep } => iso_naive(at.naive_utc(), sep),
        TimestampFormat::IsoOffset { sep, offset_secs } => {
            let offset = if offset_secs.unsigned_abs() < 86_400 {
                offset_secs
            } else {
                0
            };
            match at
                .naive_utc()
                .checked_add_signed(TimeDelta::seconds(i64::from(offset)))
            {
                Some(local) => {
                    let mut out = String::with_capacity(40);
                    push_iso_naive(&mut out, local, sep);
                    push_iso_offset(&mut out, offset);
                    out
                }
                None => {
                    let mut out = String::with_capacity(40);
                    push_iso_naive(&mut out, at.naive_utc(), sep);
                    push_iso_offset(&mut out, 0);
                    out
                }
            }
        }
        TimestampFormat::EpochSeconds => at.timestamp().to_string(),
        TimestampFormat::EpochFloat => epoch_float(at),
        TimestampFormat::EpochMillis => at.timestamp_millis().to_string(),
    }
}

/// ISO 8601 in UTC with a `+00:00` offset: the form for fields that were empty and for
/// tokenwarden's own health hash.
pub fn iso_utc(at: DateTime<Utc>) -> String {
    format(
        at,
        TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: 0,
        },
    )
}

/// `datetime.isoformat()` of a naive datetime. Written digit by digit: health writes format
/// several timestamps per provider, a hundred thousand of them at start.
fn iso_naive(t: NaiveDateTime, sep: char) -> String {
    let mut out = String::with_capacity(40);
    push_iso_naive(&mut out, t, sep);
    out
}

fn push_iso_naive(out: &mut String, t: NaiveDateTime, sep: char) {
    let year = t.year();
    if (0..=9999).contains(&year) {
        push_digits(out, year.unsigned_abs(), 4);
    } else {
        out.push_str(&year.to_string());
    }
    out.push('-');
    push_digits(out, t.month(), 2);
    out.push('-');
    push_digits(out, t.day(), 2);
    out.push(sep);
    push_digits(out, t.hour(), 2);
    out.push(':');
    push_digits(out, t.minute(), 2);
    out.push(':');
    push_digits(out, t.second(), 2);
    // A leap second (nanos >= 10^9) is written as the last microsecond of its minute.
    let micros = (t.nanosecond() / 1000).min(999_999);
    if micros != 0 {
        out.push('.');
        push_digits(out, micros, 6);
    }
}

/// `value` in decimal, zero-padded to `width` digits (wider values are written in full).
fn push_digits(out: &mut String, value: u32, width: usize) {
    let mut buf = [b'0'; 10];
    let mut v = value;
    let mut len = 0;
    while v > 0 || len == 0 {
        buf[buf.len() - 1 - len] = b'0' + (v % 10) as u8;
        v /= 10;
        len += 1;
    }
    for _ in len..width {
        out.push('0');
    }
    for &b in &buf[buf.len() - len..] {
        out.push(char::from(b));
    }
}

/// Python's offset form: `+HH:MM`, with `:SS` only when there are seconds.
fn push_iso_offset(out: &mut String, offset_secs: i32) {
    out.push(if offset_secs < 0 { '-' } else { '+' });
    let abs = offset_secs.unsigned_abs();
    let (h, m, s) = (abs / 3600, abs % 3600 / 60, abs % 60);
    push_digits(out, h, 2);
    out.push(':');
    push_digits(out, m, 2);
    if s != 0 {
        out.push(':');
        push_digits(out, s, 2);
    }
}

/// Epoch seconds with up to six decimals, trailing zeros trimmed, at least one decimal.
fn epoch_float(at: DateTime<Utc>) -> String {
    let total_micros =
        i128::from(at.timestamp()) * 1_000_000 + i128::from(at.timestamp_subsec_micros());
    let sign = if total_micros < 0 { "-" } else { "" };
    let abs = total_micros.unsigned_abs();
    let (secs, micros) = (abs / 1_000_000, abs % 1_000_000);
    let frac = format!("{micros:06}");
    let frac = frac.trim_end_matches('0');
    let frac = if frac.is_empty() { "0" } else { frac };
    format!("{sign}{secs}.{frac}")
}

/// A boolean field: `true/false`, `1/0`, `yes/no` in any case, surrounding whitespace ignored.
pub fn parse_bool(s: &str) -> Option<bool> {
    let s = s.trim();
    const TRUE: [&str; 3] = ["true", "1", "yes"];
    const FALSE: [&str; 3] = ["false", "0", "no"];
    if TRUE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| s.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

/// A JSON array of strings as Python's `json.dumps` writes it (`["a", "b"]`, non-ASCII as
/// `\uXXXX` escapes). Anything else (including an empty value) is an error: a bad record.
pub fn parse_string_array(s: &str) -> Result<Vec<String>, serde_json::Error> {
    serde_json::from_str(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    fn t0() -> DateTime<Utc> {
        utc(2026, 11, 28, 3, 20, 0)
    }

    #[test]
    fn digit_by_digit_formatting_matches_chrono() {
        let mut rng = fastrand::Rng::with_seed(11);
        for _ in 0..20_000 {
            let secs = rng.i64(-62_135_596_800..253_402_300_799);
            let micros = if rng.bool() { 0 } else { rng.u32(0..1_000_000) };
            let at = DateTime::from_timestamp(secs, micros * 1000).unwrap();
            let expected = if micros == 0 {
                at.format("%Y-%m-%dT%H:%M:%S+00:00").to_string()
            } else {
                at.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string()
            };
            assert_eq!(iso_utc(at), expected);
            let offset = rng.i32(-86_399..86_400);
            let shown = format(
                at,
                TimestampFormat::IsoOffset {
                    sep: ' ',
                    offset_secs: offset,
                },
            );
            let (h, m, s) = (
                offset.unsigned_abs() / 3600,
                offset.unsigned_abs() % 3600 / 60,
                offset.unsigned_abs() % 60,
            );
            let sign = if offset < 0 { '-' } else { '+' };
            let tail = if s == 0 {
                format!("{sign}{h:02}:{m:02}")
            } else {
                format!("{sign}{h:02}:{m:02}:{s:02}")
            };
            assert!(shown.ends_with(&tail), "{shown} for offset {offset}");
        }
    }

    const T: TimestampFormat = TimestampFormat::IsoNaive { sep: 'T' };
    const UTC_OFF: TimestampFormat = TimestampFormat::IsoOffset {
        sep: 'T',
        offset_secs: 0,
    };

    /// Parses, checks kind and instant, and that formatting gives back `expected_out`.
    fn check(input: &str, at: DateTime<Utc>, kind: TimestampFormat, expected_out: &str) {
        let ts = parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(ts.at, at, "instant of {input:?}");
        assert_eq!(ts.format, kind, "kind of {input:?}");
        assert_eq!(
            format(ts.at, ts.format),
            expected_out,
            "output of {input:?}"
        );
    }

    #[test]
    fn iso_naive_round_trips_exactly() {
        check("2026-11-28T03:20:00", t0(), T, "2026-11-28T03:20:00");
        let micro = t0() + TimeDelta::microseconds(123_456);
        check(
            "2026-11-28T03:20:00.123456",
            micro,
            T,
            "2026-11-28T03:20:00.123456",
        );
        check(
            "2026-11-28 03:20:00.123456",
            micro,
            TimestampFormat::IsoNaive { sep: ' ' },
            "2026-11-28 03:20:00.123456",
        );
    }

    #[test]
    fn iso_fractions_are_padded_and_truncated_to_micros() {
        let half = t0() + TimeDelta::milliseconds(500);
        check(
            "2026-11-28T03:20:00.5",
            half,
            T,
            "2026-11-28T03:20:00.500000",
        );
        let nanos = t0() + TimeDelta::nanoseconds(123_456_789);
        check(
            "2026-11-28T03:20:00.123456789",
            nanos,
            T,
            "2026-11-28T03:20:00.123456",
        );
        // Sub-microsecond only: Python would write no fraction at all.
        let tiny = t0() + TimeDelta::nanoseconds(999);
        check(
            "2026-11-28T03:20:00.000000999",
            tiny,
            T,
            "2026-11-28T03:20:00",
        );
        // Explicit zero fraction is dropped, as isoformat() does.
        check("2026-11-28T03:20:00.000", t0(), T, "2026-11-28T03:20:00");
    }

    #[test]
    fn iso_offsets_round_trip_and_z_becomes_plus_zero() {
        check(
            "2026-11-28T03:20:00+00:00",
            t0(),
            UTC_OFF,
            "2026-11-28T03:20:00+00:00",
        );
        check(
            "2026-11-28T03:20:00Z",
            t0(),
            UTC_OFF,
            "2026-11-28T03:20:00+00:00",
        );
        check(
            "2026-11-28t03:20:00z",
            t0(),
            TimestampFormat::IsoOffset {
                sep: 't',
                offset_secs: 0,
            },
            "2026-11-28t03:20:00+00:00",
        );
        check(
            "2026-11-28T03:20:00.123456Z",
            t0() + TimeDelta::microseconds(123_456),
            UTC_OFF,
            "2026-11-28T03:20:00.123456+00:00",
        );
        let est = TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: -5 * 3600,
        };
        check(
            "2026-11-27T22:20:00-05:00",
            t0(),
            est,
            "2026-11-27T22:20:00-05:00",
        );
        let ist = TimestampFormat::IsoOffset {
            sep: ' ',
            offset_secs: 5 * 3600 + 1800,
        };
        check(
            "2026-11-28 08:50:00+0530",
            t0(),
            ist,
            "2026-11-28 08:50:00+05:30",
        );
        // -00:00 is a zero offset.
        check(
            "2026-11-28T03:20:00-00:00",
            t0(),
            UTC_OFF,
            "2026-11-28T03:20:00+00:00",
        );
    }

    #[test]
    fn offset_shifts_local_time_across_days() {
        let at = utc(2026, 12, 31, 23, 30, 0);
        let east = TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: 3600,
        };
        assert_eq!(format(at, east), "2027-01-01T00:30:00+01:00");
        assert_eq!(parse("2027-01-01T00:30:00+01:00").unwrap().at, at);
    }

    #[test]
    fn odd_offsets_are_written_like_python() {
        let with_secs = TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: -(3600 + 30),
        };
        assert_eq!(format(t0(), with_secs), "2026-11-28T02:19:30-01:00:30");
        let absurd = TimestampFormat::IsoOffset {
            sep: 'T',
            offset_secs: 90_000,
        };
        assert_eq!(format(t0(), absurd), "2026-11-28T03:20:00+00:00");
    }

    #[test]
    fn epoch_seconds_and_millis() {
        let at = utc(2025, 11, 28, 3, 20, 0);
        assert_eq!(at.timestamp(), 1_764_300_000);
        check(
            "1764300000",
            at,
            TimestampFormat::EpochSeconds,
            "1764300000",
        );
        check(
            " 1764300000\n",
            at,
            TimestampFormat::EpochSeconds,
            "1764300000",
        );
        let ms = at + TimeDelta::milliseconds(123);
        check(
            "1764300000123",
            ms,
            TimestampFormat::EpochMillis,
            "1764300000123",
        );
        // A fractional millisecond value keeps the millis kind; the fraction is dropped.
        let frac_ms = at + TimeDelta::microseconds(123_456);
        check(
            "1764300000123.456",
            frac_ms,
            TimestampFormat::EpochMillis,
            "1764300000123",
        );
        // Seconds round down when written as integers.
        assert_eq!(
            format(
                at + TimeDelta::milliseconds(999),
                TimestampFormat::EpochSeconds
            ),
            "1764300000"
        );
        assert_eq!(
            format(
                at + TimeDelta::microseconds(999),
                TimestampFormat::EpochMillis
            ),
            "1764300000000"
        );
    }

    #[test]
    fn millis_threshold_is_exclusive() {
        let at = parse("100000000000").unwrap();
        assert_eq!(at.format, TimestampFormat::EpochSeconds);
        assert_eq!(at.at.timestamp(), 100_000_000_000);
        let at = parse("100000000000.5").unwrap();
        assert_eq!(at.format, TimestampFormat::EpochMillis);
        assert_eq!(at.at.timestamp_micros(), 100_000_000_000 * 1000 + 500);
        let at = parse("100000000001").unwrap();
        assert_eq!(at.format, TimestampFormat::EpochMillis);
        assert_eq!(at.at.timestamp_millis(), 100_000_000_001);
    }

    #[test]
    fn epoch_float_like_python_str() {
        let at = utc(2025, 11, 28, 3, 20, 0);
        check(
            "1764300000.5",
            at + TimeDelta::milliseconds(500),
            TimestampFormat::EpochFloat,
            "1764300000.5",
        );
        check(
            "1764300000.0",
            at,
            TimestampFormat::EpochFloat,
            "1764300000.0",
        );
        check(
            "1764300000.000",
            at,
            TimestampFormat::EpochFloat,
            "1764300000.0",
        );
        check(
            "1764300000.123456",
            at + TimeDelta::microseconds(123_456),
            TimestampFormat::EpochFloat,
            "1764300000.123456",
        );
        check(
            "1764300000.0000012",
            at + TimeDelta::nanoseconds(1_200),
            TimestampFormat::EpochFloat,
            "1764300000.000001",
        );
        check(
            "1764300000.120",
            at + TimeDelta::milliseconds(120),
            TimestampFormat::EpochFloat,
            "1764300000.12",
        );
        assert_eq!(
            format(DateTime::UNIX_EPOCH, TimestampFormat::EpochFloat),
            "0.0"
        );
        let before = DateTime::UNIX_EPOCH - TimeDelta::milliseconds(1500);
        assert_eq!(format(before, TimestampFormat::EpochFloat), "-1.5");
    }

    #[test]
    fn iso_utc_is_plus_zero() {
        assert_eq!(iso_utc(t0()), "2026-11-28T03:20:00+00:00");
        assert_eq!(
            iso_utc(t0() + TimeDelta::microseconds(7)),
            "2026-11-28T03:20:00.000007+00:00"
        );
    }

    #[test]
    fn rejects_bad_values() {
        let bad = [
            "",
            "   ",
            "2026-11-28",
            "2026-11-28T03:20",
            "2026-11-28T03:20:00.",
            "2026-11-28T03:20:00.1234567890",
            "2026-11-28T03:20:00+5",
            "2026-11-28T03:20:00+24:00",
            "2026-11-28T03:20:00+05:60",
            "2026-11-28T03:20:00 UTC",
            "2026-11-28X03:20:00",
            "2026-11-28  03:20:00",
            "2026-02-30T03:20:00",
            "2026-13-01T03:20:00",
            "2026-11-28T24:00:00",
            "2026-11-28T03:60:00",
            "2026-11-28T03:20:60",
            "2026-1-28T03:20:00",
            "+2026-11-28T03:20:00",
            "２０２６-11-28T03:20:00",
            "2026-11-28T03:20:00é",
            "2026-11-28T03:20:00+1é1",
            "2026-11-28T03:20:00+é:11",
            "NaN",
            "nan",
            "inf",
            "-inf",
            "Infinity",
            "-1764300000",
            "+1764300000",
            "1.7643e9",
            "1764300000.",
            ".5",
            "1.2.3",
            "1764300000 5",
            "0x10",
            "yesterday",
            "99999999999999999999999",
            "9999999999999999999",
        ];
        for b in bad {
            assert!(
                parse(b).is_err(),
                "{b:?} should be rejected, got {:?}",
                parse(b)
            );
        }
    }

    #[test]
    fn errors_echo_at_most_40_chars() {
        let secret = format!("2026-{}SECRET-TAIL", "x".repeat(60));
        let msg = parse(&secret).unwrap_err().to_string();
        assert!(!msg.contains("SECRET"), "{msg}");
        assert!(msg.contains(&secret[..40]), "{msg}");
        assert!(!msg.contains(&secret[..41]), "{msg}");
        // Multi-byte input is cut on a char boundary.
        let wide = "é".repeat(100);
        let msg = parse(&wide).unwrap_err().to_string();
        assert_eq!(msg.matches('é').count(), 40, "{msg}");
        let huge = "9".repeat(100);
        let msg = parse(&huge).unwrap_err().to_string();
        assert_eq!(msg.matches('9').count(), 40, "{msg}");
        assert!(matches!(parse(""), Err(TimestampError::Empty)));
    }

    #[test]
    fn far_dates() {
        check(
            "0001-01-01T00:00:00",
            utc(1, 1, 1, 0, 0, 0),
            T,
            "0001-01-01T00:00:00",
        );
        check(
            "9999-12-31T23:59:59",
            utc(9999, 12, 31, 23, 59, 59),
            T,
            "9999-12-31T23:59:59",
        );
        check(
            "0",
            DateTime::UNIX_EPOCH,
            TimestampFormat::EpochSeconds,
            "0",
        );
        // Far-future milliseconds are fine; past chrono's range is an error.
        assert_eq!(
            parse("8210298412799").unwrap().at,
            utc(2230, 3, 5, 14, 26, 52) + TimeDelta::milliseconds(799)
        );
        assert!(matches!(
            parse("18446744073709551615"),
            Err(TimestampError::OutOfRange { .. })
        ));
    }

    /// A deterministic spread of instants from 1975 to 5000 with assorted sub-seconds.
    fn instants() -> Vec<DateTime<Utc>> {
        let mut rng = fastrand::Rng::with_seed(0x7157);
        let lo = utc(1975, 1, 1, 0, 0, 0).timestamp();
        let hi = utc(5000, 1, 1, 0, 0, 0).timestamp();
        (0..5000)
            .map(|i| {
                let secs = rng.i64(lo..hi);
                let nanos = match i % 4 {
                    0 => 0,
                    1 => rng.u32(0..1000) * 1_000_000,
                    2 => rng.u32(0..1_000_000) * 1000,
                    _ => rng.u32(0..1_000_000_000),
                };
                DateTime::from_timestamp(secs, nanos).unwrap()
            })
            .collect()
    }

    fn trunc_micros(at: DateTime<Utc>) -> DateTime<Utc> {
        DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap()
    }

    #[test]
    fn property_parse_format_round_trip() {
        let formats = [
            TimestampFormat::IsoNaive { sep: 'T' },
            TimestampFormat::IsoNaive { sep: ' ' },
            TimestampFormat::IsoOffset {
                sep: 'T',
                offset_secs: 0,
            },
            TimestampFormat::IsoOffset {
                sep: ' ',
                offset_secs: -5 * 3600,
            },
            TimestampFormat::IsoOffset {
                sep: 'T',
                offset_secs: 5 * 3600 + 45 * 60,
            },
            TimestampFormat::IsoOffset {
                sep: 'T',
                offset_secs: -(23 * 3600 + 59 * 60),
            },
            TimestampFormat::EpochSeconds,
            TimestampFormat::EpochFloat,
            TimestampFormat::EpochMillis,
        ];
        for at in instants() {
            for kind in formats {
                let text = format(at, kind);
                let back = parse(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
                assert_eq!(back.format, kind, "{text:?}");
                let expected = match kind {
                    TimestampFormat::EpochSeconds => {
                        DateTime::from_timestamp(at.timestamp(), 0).unwrap()
                    }
                    TimestampFormat::EpochMillis => {
                        DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap()
                    }
                    _ => trunc_micros(at),
                };
                assert_eq!(back.at, expected, "{text:?}");
                // Writing it again gives the very same text.
                assert_eq!(format(back.at, back.format), text);
            }
        }
    }

    #[test]
    fn bools() {
        for t in [
            "true", "True", "TRUE", "1", "yes", "Yes", " YES ", "\ttrue\n",
        ] {
            assert_eq!(parse_bool(t), Some(true), "{t:?}");
        }
        for f in ["false", "False", "FALSE", "0", "no", "No", " NO "] {
            assert_eq!(parse_bool(f), Some(false), "{f:?}");
        }
        for x in [
            "", "y", "n", "2", "on", "off", "truee", "t", "none", "null", "01",
        ] {
            assert_eq!(parse_bool(x), None, "{x:?}");
        }
    }

    #[test]
    fn string_arrays_as_json_dumps_writes_them() {
        assert_eq!(
            parse_string_array(r#"["read", "write"]"#).unwrap(),
            vec!["read".to_owned(), "write".to_owned()]
        );
        assert_eq!(parse_string_array("[]").unwrap(), Vec::<String>::new());
        assert_eq!(
            parse_string_array(r#"["caf\u00e9", "a \"q\""]"#).unwrap(),
            vec!["café".to_owned(), "a \"q\"".to_owned()]
        );
        assert_eq!(
            parse_string_array(" [\"a\"] ").unwrap(),
            vec!["a".to_owned()]
        );
        for bad in [
            "",
            "read write",
            "[1, 2]",
            r#"["a", null]"#,
            r#"{"a": 1}"#,
            "['a']",
            "[\"a\"",
        ] {
            assert!(parse_string_array(bad).is_err(), "{bad:?}");
        }
    }
}
