//! `tokenwarden journal list` and `tokenwarden journal replay` (SPEC 3): what they print and
//! how a replay walks the pending entries. The command line itself is in [`crate::cli`].
//!
//! `replay` takes the pending entries oldest first (so that two answers for one record, the
//! second made from the first, are applied in order), replays each with
//! [`replay_entry`](super::replay_entry()), confirms the applied ones (`written`,
//! `already_applied`) and drops the others (`superseded`, `gone`: moved to `confirmed/` too,
//! the result in the log). A Redis error stops it: what is left stays pending.

use chrono::{DateTime, Utc};

use super::{replay_entry, EntryStatus, EntrySummary, Journal, JournalError, ReplayResult};
use crate::store::{Connection, StoreError};

/// `12s`, `5m03s`, `3h07m`, `2d04h`: how long ago `then` was.
pub fn age(now: DateTime<Utc>, then: DateTime<Utc>) -> String {
    let s = now.signed_duration_since(then).num_seconds().max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{m}m{:02}s", s % 60)
    } else if s < 86400 {
        format!("{h}h{:02}m", m % 60)
    } else {
        format!("{d}d{:02}h", h % 24)
    }
}

/// One line per entry (id, age, tenant, provider, encrypted or not, status, problem) and a
/// closing count. Never a secret: summaries carry none.
pub fn list_text(rows: &[EntrySummary], now: DateTime<Utc>) -> String {
    let (mut pending, mut quarantined, mut confirmed) = (0usize, 0usize, 0usize);
    let mut cells: Vec<[String; 5]> = Vec::with_capacity(rows.len());
    for r in rows {
        match r.status {
            EntryStatus::Pending => pending += 1,
            EntryStatus::Quarantined => quarantined += 1,
            EntryStatus::Confirmed => confirmed += 1,
        }
        let age = r
            .created_at
            .map_or_else(|| "?".to_string(), |t| age(now, t));
        let crypt = match &r.key_id {
            Some(k) => format!("encrypted:{k}"),
            None if r.created_at.is_some() => "plain".to_string(),
            None => "?".to_string(),
        };
        let who = if r.tenant.is_empty() && r.provider.is_empty() {
            "?".to_string()
        } else {
            format!("{}/{}", r.tenant, r.provider)
        };
        let mut status = r.status.as_str().to_string();
        if let Some(p) = &r.problem {
            status.push_str(&format!(" ({p})"));
        }
        cells.push([r.id.clone(), age, who, crypt, status]);
    }
    let mut widths = [0usize; 5];
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for row in &cells {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            let pad = " ".repeat(w.saturating_sub(c.chars().count()));
            // The age is right-aligned, the rest left-aligned.
            if i == 1 {
                line.push_str(&pad);
                line.push_str(c);
            } else {
                line.push_str(c);
                line.push_str(&pad);
            }
            line.push_str("  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&format!(
        "{pending} pending, {quarantined} quarantined, {confirmed} confirmed\n"
    ));
    out
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub written: usize,
    pub already_applied: usize,
    pub superseded: usize,
    pub gone: usize,
    /// Entries that could not be read and were moved to quarantine by this replay.
    pub quarantined: u64,
}

impl ReplayReport {
    pub fn summary(&self) -> String {
        format!(
            "replayed {}: {} written, {} already applied, {} superseded, {} gone; {} quarantined",
            self.written + self.already_applied + self.superseded + self.gone,
            self.written,
            self.already_applied,
            self.superseded,
            self.gone,
            self.quarantined
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("replay stopped, {left} entries left pending: {source}")]
    Redis { left: usize, source: StoreError },
}

/// Replays every pending entry; `line` gets one line per entry, as it is handled.
pub async fn replay_pending(
    journal: &Journal,
    conn: &mut Connection,
    mut line: impl FnMut(String),
) -> Result<ReplayReport, ReplayError> {
    let quarantined_before = journal.stats().quarantined;
    let entries = journal.pending()?;
    let mut report = ReplayReport {
        quarantined: journal
            .stats()
            .quarantined
            .saturating_sub(quarantined_before),
        ..ReplayReport::default()
    };
    let total = entries.len();
    for (done, e) in entries.iter().enumerate() {
        let result = replay_entry(conn, e)
            .await
            .map_err(|source| ReplayError::Redis {
                left: total - done,
                source,
            })?;
        match result {
            ReplayResult::Written => report.written += 1,
            ReplayResult::AlreadyApplied => report.already_applied += 1,
            ReplayResult::Superseded => report.superseded += 1,
            ReplayResult::Gone => report.gone += 1,
        }
        if result.applied() {
            journal.confirm(&e.id)?;
        } else {
            journal.drop_entry(&e.id)?;
        }
        tracing::info!(
            entry = %e.id,
            tenant = %e.tenant,
            provider = %e.provider,
            result = result.as_str(),
            "journal entry replayed"
        );
        line(format!(
            "{} {}/{}: {}",
            e.id,
            e.tenant,
            e.provider,
            result.as_str()
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn ages_are_short() {
        let now = Utc
            .with_ymd_and_hms(2026, 11, 28, 12, 0, 0)
            .single()
            .expect("time");
        let ago = |s: i64| age(now, now - chrono::Duration::seconds(s));
        assert_eq!(ago(-5), "0s");
        assert_eq!(ago(12), "12s");
        assert_eq!(ago(303), "5m03s");
        assert_eq!(ago(3 * 3600 + 7 * 60 + 9), "3h07m");
        assert_eq!(ago(2 * 86400 + 4 * 3600), "2d04h");
    }
}
