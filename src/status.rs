//! `tokenwarden status` (SPEC 3): every tracked provider with its state, expiry, next refresh
//! and last error, read from Redis (the health hashes the daemons keep), most urgent first,
//! with relative times, as a table or JSON; and the rotated tokens the live replicas' journals
//! still hold (their heartbeat hashes, SPEC 2).
//!
//! Urgency: re-authorisation required, then expired tokens, then failing, then invalid
//! records, then everything else by expiry (soonest first), inactive records last.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use redis::Value;
use serde::Serialize;

use crate::keys::ProviderId;
use crate::registry::{Members, ReadStats, Registry};
use crate::store::{Connection, StoreError};

/// `SCAN MATCH` pattern of the replicas' heartbeat hashes (SPEC 2).
pub const REPLICA_PATTERN: &str = "tokenwarden:replica:*";

/// The pseudo-state `--state expired` selects: an access token past its expiry.
pub const EXPIRED: &str = "expired";

/// One row of the status table.
#[derive(Debug, Serialize)]
pub struct Row {
    pub tenant: String,
    pub provider: String,
    pub status: String,
    pub state: String,
    pub reason: String,
    pub token_expiry: String,
    pub next_refresh_at: String,
    pub last_refresh_at: String,
    pub last_refresh_result: String,
    pub last_error: String,
    pub consecutive_failures: String,
    /// Seconds until the access token expires (negative: expired), when known.
    pub expires_in_secs: Option<i64>,
    /// Seconds until the next planned refresh (negative: due), when known.
    pub next_refresh_in_secs: Option<i64>,
    /// Seconds since the last successful refresh, when known.
    pub last_refresh_ago_secs: Option<i64>,
    /// Whether the access token has expired.
    pub expired: bool,
}

/// The journal of rotated tokens summed over the live replicas' heartbeats.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct JournalSummary {
    pub pending: u64,
    pub replicas: usize,
}

const HEALTH_FIELDS: [&str; 8] = [
    "state",
    "reason",
    "token_expiry",
    "next_refresh_at",
    "last_refresh_at",
    "last_refresh_result",
    "last_error",
    "consecutive_failures",
];

/// Reads the rows, optionally for one tenant, as of `now`; unsorted.
pub async fn rows(
    conn: &mut Connection,
    tenant: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<Row>, StoreError> {
    let registry = Registry::new(500);
    let mut stats = ReadStats::default();
    let discovered = match tenant {
        Some(t) => {
            registry
                .read_members(conn, &[t.to_string()], &mut stats)
                .await?
        }
        None => registry.discover(conn, &mut stats).await?,
    };
    let mut ids = Vec::new();
    for (t, m) in discovered {
        if let Members::Names(names) = m {
            for p in names {
                ids.push(ProviderId::new(t.as_str(), p.as_str()));
            }
        }
    }
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for id in chunk {
            pipe.cmd("HMGET")
                .arg(id.health_key())
                .arg(&HEALTH_FIELDS[..]);
            pipe.cmd("HGET").arg(id.record_key()).arg("status");
        }
        let values: Vec<Value> = pipe.query_async(conn).await?;
        let mut it = values.into_iter();
        for id in chunk {
            let health = strings(it.next());
            let status = strings(it.next()).into_iter().next().unwrap_or_default();
            let f = |i: usize| health.get(i).cloned().unwrap_or_default();
            let secs_from_now = |s: &str| parse_time(s).map(|at| (at - now).num_seconds());
            let expires_in_secs = secs_from_now(&f(2));
            let state = if f(0).is_empty() {
                "unknown".to_string()
            } else {
                f(0)
            };
            let active = !matches!(state.as_str(), "inactive" | "invalid_record");
            rows.push(Row {
                tenant: id.tenant.to_string(),
                provider: id.provider.to_string(),
                status,
                reason: f(1),
                token_expiry: f(2),
                next_refresh_at: f(3),
                last_refresh_at: f(4),
                last_refresh_result: f(5),
                last_error: f(6),
                consecutive_failures: f(7),
                expires_in_secs,
                next_refresh_in_secs: secs_from_now(&f(3)),
                last_refresh_ago_secs: secs_from_now(&f(4)).map(|s| s.saturating_neg()),
                expired: active && expires_in_secs.is_some_and(|s| s <= 0),
                state,
            });
        }
    }
    Ok(rows)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    crate::timestamp::parse(s).ok().map(|t| t.at)
}

/// Urgency rank: lower is more urgent.
fn rank(r: &Row) -> u8 {
    match r.state.as_str() {
        "reauth_required" => 0,
        _ if r.expired => 1,
        "failing" => 2,
        "invalid_record" => 3,
        "inactive" => 5,
        _ => 4,
    }
}

/// Most urgent first (see the module docs); ties by expiry, then tenant and provider.
pub fn sort_by_urgency(rows: &mut [Row]) {
    rows.sort_by(|a, b| {
        rank(a)
            .cmp(&rank(b))
            .then_with(|| match (a.expires_in_secs, b.expires_in_secs) {
                (Some(x), Some(y)) => x.cmp(&y),
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (None, None) => Ordering::Equal,
            })
            .then_with(|| a.tenant.cmp(&b.tenant))
            .then_with(|| a.provider.cmp(&b.provider))
    });
}

/// Whether `r` is in `state` (a health state, or [`EXPIRED`]).
pub fn has_state(r: &Row, state: &str) -> bool {
    if state == EXPIRED {
        r.expired
    } else {
        r.state == state
    }
}

/// Sums `journal_pending` over the live replicas' heartbeat hashes.
pub async fn journal(conn: &mut Connection) -> Result<JournalSummary, StoreError> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(REPLICA_PATTERN)
            .arg("COUNT")
            .arg(500)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    let mut summary = JournalSummary::default();
    if keys.is_empty() {
        return Ok(summary);
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in &keys {
        pipe.cmd("HGET").arg(k).arg("journal_pending");
    }
    let values: Vec<Value> = pipe.query_async(conn).await?;
    for v in values {
        match v {
            // A key of another type, or one that expired between SCAN and HGET: not live.
            Value::Nil | Value::ServerError(_) => {}
            v => {
                summary.replicas += 1;
                let n = strings(Some(v))
                    .first()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                summary.pending = summary.pending.saturating_add(n);
            }
        }
    }
    Ok(summary)
}

fn strings(v: Option<Value>) -> Vec<String> {
    let one = |v: Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::SimpleString(s) => s,
        Value::Int(n) => n.to_string(),
        _ => String::new(),
    };
    match v {
        Some(Value::Array(items)) => items.into_iter().map(one).collect(),
        Some(v) => vec![one(v)],
        None => Vec::new(),
    }
}

/// `40s`, `12m`, `3h 5m`, `2d 3h`: a duration in seconds, to the unit that matters
/// (rounded down).
pub fn human_duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (d, h, m) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60);
    match (d, h) {
        (0, 0) if m == 0 => format!("{s}s"),
        (0, 0) => format!("{m}m"),
        (0, _) if m == 0 => format!("{h}h"),
        (0, _) => format!("{h}h {m}m"),
        (_, 0) => format!("{d}d"),
        _ => format!("{d}d {h}h"),
    }
}

/// `expires in 12m` / `expired 3m ago`.
pub fn expiry_text(r: &Row) -> String {
    match r.expires_in_secs {
        None if r.token_expiry.is_empty() => "-".into(),
        None => escape_control(&r.token_expiry),
        Some(s) if s > 0 => format!("expires in {}", human_duration(s)),
        Some(s) => format!("expired {} ago", human_duration(s)),
    }
}

/// `next refresh in 40s` / `refresh due 5s ago`.
pub fn next_refresh_text(r: &Row) -> String {
    match r.next_refresh_in_secs {
        None if r.next_refresh_at.is_empty() => "-".into(),
        None => escape_control(&r.next_refresh_at),
        Some(s) if s > 0 => format!("next refresh in {}", human_duration(s)),
        Some(s) => format!("refresh due {} ago", human_duration(s)),
    }
}

/// `refreshed 5m ago`.
pub fn last_refresh_text(r: &Row) -> String {
    match r.last_refresh_ago_secs {
        Some(s) if s >= 0 => format!("refreshed {} ago", human_duration(s)),
        Some(s) => format!("refreshed in {}", human_duration(s)),
        None => "-".into(),
    }
}

/// Control characters (a newline in a tenant id, an escape sequence in an error) written as
/// `\n`, `\t`, `\r` or `\u{..}`, so a cell cannot break the table or the terminal.
pub fn escape_control(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A fixed-width table for terminals, rows in the order given.
pub fn table(rows: &[Row], journal: &JournalSummary) -> String {
    let headers = [
        "TENANT",
        "PROVIDER",
        "STATE",
        "EXPIRY",
        "NEXT REFRESH",
        "LAST REFRESH",
        "LAST RESULT",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 8]> = rows
        .iter()
        .map(|r| {
            let mut state = if r.reason.is_empty() {
                r.state.clone()
            } else {
                format!("{} ({})", r.state, r.reason)
            };
            if r.expired && r.state != "reauth_required" {
                state = format!("{state}, expired");
            }
            let error: String = r.last_error.chars().take(60).collect();
            [
                escape_control(&r.tenant),
                escape_control(&r.provider),
                escape_control(&state),
                expiry_text(r),
                next_refresh_text(r),
                last_refresh_text(r),
                escape_control(&r.last_refresh_result),
                escape_control(&error),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cols: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            l.push_str(c);
            if i + 1 < cols.len() {
                l.push_str(&" ".repeat(widths[i].saturating_sub(c.chars().count()) + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &cells {
        line(row.iter().map(String::as_str).collect());
    }
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *by_state.entry(r.state.as_str()).or_default() += 1;
    }
    let expired = rows.iter().filter(|r| r.expired).count();
    let mut summary: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    if expired > 0 {
        summary.push(format!("{expired} expired"));
    }
    out.push_str(&format!(
        "{} providers: {}\n",
        rows.len(),
        summary.join(", ")
    ));
    out.push_str(&format!(
        "journal: {} rotated token{} held by {} live replica{}\n",
        journal.pending,
        if journal.pending == 1 { "" } else { "s" },
        journal.replicas,
        if journal.replicas == 1 { "" } else { "s" },
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(state: &str, expires_in: Option<i64>) -> Row {
        Row {
            tenant: "t".into(),
            provider: format!("{state}-{expires_in:?}"),
            status: "active".into(),
            state: state.into(),
            reason: String::new(),
            token_expiry: String::new(),
            next_refresh_at: String::new(),
            last_refresh_at: String::new(),
            last_refresh_result: String::new(),
            last_error: String::new(),
            consecutive_failures: String::new(),
            expires_in_secs: expires_in,
            next_refresh_in_secs: None,
            last_refresh_ago_secs: None,
            expired: expires_in.is_some_and(|s| s <= 0) && state != "inactive",
        }
    }

    #[test]
    fn most_urgent_first() {
        let mut rows = vec![
            row("healthy", Some(3000)),
            row("inactive", Some(-50)),
            row("healthy", Some(600)),
            row("failing", Some(1200)),
            row("degraded", Some(-30)),
            row("reauth_required", Some(-100)),
            row("healthy", None),
            row("invalid_record", None),
        ];
        sort_by_urgency(&mut rows);
        let order: Vec<&str> = rows.iter().map(|r| r.provider.as_str()).collect();
        assert_eq!(
            order,
            [
                "reauth_required-Some(-100)",
                "degraded-Some(-30)",
                "failing-Some(1200)",
                "invalid_record-None",
                "healthy-Some(600)",
                "healthy-Some(3000)",
                "healthy-None",
                "inactive-Some(-50)",
            ]
        );
    }

    #[test]
    fn relative_times() {
        assert_eq!(human_duration(40), "40s");
        assert_eq!(human_duration(720), "12m");
        assert_eq!(human_duration(-185), "3m");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(3 * 3600 + 5 * 60 + 9), "3h 5m");
        assert_eq!(human_duration(7200), "2h");
        assert_eq!(human_duration(2 * 86_400 + 3 * 3600 + 1), "2d 3h");
        assert!(!human_duration(i64::MIN).is_empty());
        let mut r = row("healthy", Some(720));
        assert_eq!(expiry_text(&r), "expires in 12m");
        r.expires_in_secs = Some(-180);
        assert_eq!(expiry_text(&r), "expired 3m ago");
        r.next_refresh_in_secs = Some(40);
        assert_eq!(next_refresh_text(&r), "next refresh in 40s");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\nb\tc\u{1b}[31m"), "a\\nb\\tc\\u{1b}[31m");
        assert_eq!(escape_control("plain: ok"), "plain: ok");
    }
}
