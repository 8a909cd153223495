//! `tokenwarden status`: every tracked provider with its state, expiry, next refresh and last
//! error, read from Redis (the health hashes the daemons keep), as a table or JSON.

use std::collections::BTreeMap;

use redis::Value;
use serde::Serialize;

use crate::keys::ProviderId;
use crate::registry::{Members, ReadStats, Registry};
use crate::store::{Connection, StoreError};

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

/// Reads the rows, optionally for one tenant.
pub async fn rows(conn: &mut Connection, tenant: Option<&str>) -> Result<Vec<Row>, StoreError> {
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
            rows.push(Row {
                tenant: id.tenant.to_string(),
                provider: id.provider.to_string(),
                status,
                state: if f(0).is_empty() {
                    "unknown".into()
                } else {
                    f(0)
                },
                reason: f(1),
                token_expiry: f(2),
                next_refresh_at: f(3),
                last_refresh_at: f(4),
                last_refresh_result: f(5),
                last_error: f(6),
                consecutive_failures: f(7),
            });
        }
    }
    Ok(rows)
}

fn strings(v: Option<Value>) -> Vec<String> {
    let one = |v: Value| match v {
        Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
        Value::SimpleString(s) => s,
        _ => String::new(),
    };
    match v {
        Some(Value::Array(items)) => items.into_iter().map(one).collect(),
        Some(v) => vec![one(v)],
        None => Vec::new(),
    }
}

/// A fixed-width table for terminals.
pub fn table(rows: &[Row]) -> String {
    let headers = [
        "TENANT",
        "PROVIDER",
        "STATE",
        "TOKEN EXPIRY",
        "NEXT REFRESH",
        "LAST RESULT",
        "LAST ERROR",
    ];
    let cells: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let state = if r.reason.is_empty() {
                r.state.clone()
            } else {
                format!("{} ({})", r.state, r.reason)
            };
            [
                r.tenant.clone(),
                r.provider.clone(),
                state,
                r.token_expiry.clone(),
                r.next_refresh_at.clone(),
                r.last_refresh_result.clone(),
                r.last_error.chars().take(60).collect(),
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
    let summary: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    out.push_str(&format!(
        "{} providers: {}\n",
        rows.len(),
        summary.join(", ")
    ));
    out
}
