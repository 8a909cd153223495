//! The registry: the gateway's tenants and provider records in Redis (SPEC 1), read cheaply.
//!
//! Discovery is `SCAN MATCH tenant:*:providers` (never `KEYS`); members and records are read
//! with pipelines, one round trip per batch. Three reads serve change detection (the engine
//! in `crate::daemon` decides when to use which):
//! - [`Registry::discover`]: every tenant and its provider names;
//! - [`Registry::read_light`]: only [`record::LIGHT_FIELDS`] of known records, as fingerprints;
//! - [`Registry::read_records`]: whole records, parsed.
//!
//! A key of the wrong Redis type never fails a batch: pipelines run with errors kept per
//! command, and such a key becomes an invalid record (`wrong_type`).

pub mod follow;
pub mod record;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use redis::Value;

use crate::keys::{self, ProviderId};
use crate::store::{Connection, StoreError};
use record::{fingerprint, InvalidRecord, ProviderRecord, RecordState, LIGHT_FIELDS};

/// Keys the server looks at per `SCAN` step (it filters them by pattern itself).
pub const SCAN_COUNT: usize = 10_000;

/// Round trips in flight at once during a registry read.
pub const PIPELINE_DEPTH: usize = 4;

/// What a tenant's provider set held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Members {
    Names(BTreeSet<String>),
    /// `tenant:{t}:providers` is not a set.
    WrongType,
}

/// Tenants and their provider names, as discovered.
pub type Discovery = BTreeMap<String, Members>;

/// Counts of what a read cost, for the benchmarks and the scan metric.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadStats {
    pub round_trips: u64,
    pub keys: u64,
}

pub struct Registry {
    batch: usize,
}

impl Registry {
    pub fn new(batch: usize) -> Registry {
        Registry {
            batch: batch.max(1),
        }
    }

    /// Commands per pipelined round trip.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Every tenant (SCAN) and its provider names (pipelined SMEMBERS).
    pub async fn discover(
        &self,
        conn: &mut Connection,
        stats: &mut ReadStats,
    ) -> Result<Discovery, StoreError> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.scan_tenants(conn, stats, &tx).await?;
        drop(tx);
        let mut tenants = BTreeSet::new();
        while let Some(page) = rx.recv().await {
            tenants.extend(page);
        }
        let tenants: Vec<String> = tenants.into_iter().collect();
        self.read_members(conn, &tenants, stats).await
    }

    /// `SCAN MATCH tenant:*:providers`, sending the tenant ids of each page as it arrives (a
    /// tenant may come twice: SCAN guarantees every key at least once).
    pub async fn scan_tenants(
        &self,
        conn: &mut Connection,
        stats: &mut ReadStats,
        pages: &tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    ) -> Result<(), StoreError> {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(keys::PROVIDERS_PATTERN)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(conn)
                .await?;
            stats.round_trips += 1;
            let page: Vec<String> = keys
                .iter()
                .filter_map(|k| keys::tenant_of_providers_key(k).map(str::to_string))
                .collect();
            if !page.is_empty() && pages.send(page).is_err() {
                return Ok(());
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Pipelined SMEMBERS of the given tenants' provider sets. A tenant whose set has gone is
    /// returned with no names.
    pub async fn read_members(
        &self,
        conn: &mut Connection,
        tenants: &[String],
        stats: &mut ReadStats,
    ) -> Result<Discovery, StoreError> {
        let members = self
            .pipelined(
                conn,
                tenants,
                stats,
                |pipe, t| {
                    pipe.cmd("SMEMBERS").arg(keys::providers_set_key(t));
                },
                members_of,
            )
            .await?;
        Ok(tenants.iter().cloned().zip(members).collect())
    }

    /// Pipelined `HMGET` of [`RECORD_FIELDS`] of the given records, parsed. The access token
    /// is left out: see [`Registry::read_records_with_token`].
    pub async fn read_records(
        &self,
        conn: &mut Connection,
        ids: &[ProviderId],
        stats: &mut ReadStats,
    ) -> Result<Vec<RecordState>, StoreError> {
        self.read_fields(conn, ids, stats, RECORD_FIELDS).await
    }

    /// As [`Registry::read_records`], with the access token (for health probes).
    pub async fn read_records_with_token(
        &self,
        conn: &mut Connection,
        ids: &[ProviderId],
        stats: &mut ReadStats,
    ) -> Result<Vec<RecordState>, StoreError> {
        self.read_fields(conn, ids, stats, &RECORD_FIELDS_AND_TOKEN)
            .await
    }

    async fn read_fields(
        &self,
        conn: &mut Connection,
        ids: &[ProviderId],
        stats: &mut ReadStats,
        fields: &'static [&'static str],
    ) -> Result<Vec<RecordState>, StoreError> {
        self.pipelined(
            conn,
            ids,
            stats,
            |pipe, id| {
                pipe.cmd("HMGET").arg(id.record_key()).arg(fields);
            },
            move |v| parse_fields_value(v, fields),
        )
        .await
    }

    /// One record, parsed (used under the refresh lock).
    pub async fn read_record(
        conn: &mut Connection,
        id: &ProviderId,
    ) -> Result<RecordState, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("HGETALL").arg(id.record_key());
        let mut values: Vec<Value> = pipe.query_async(conn).await?;
        Ok(parse_record_value(values.pop().unwrap_or(Value::Nil)))
    }

    /// Pipelined HMGET of [`LIGHT_FIELDS`]: a fingerprint per record, comparable with
    /// [`RecordState::fingerprint`].
    pub async fn read_light(
        &self,
        conn: &mut Connection,
        ids: &[ProviderId],
        stats: &mut ReadStats,
    ) -> Result<Vec<u64>, StoreError> {
        self.pipelined(
            conn,
            ids,
            stats,
            |pipe, id| {
                pipe.cmd("HMGET")
                    .arg(id.record_key())
                    .arg(&LIGHT_FIELDS[..]);
            },
            light_fingerprint,
        )
        .await
    }

    /// One command per item, `batch` items per round trip, up to [`PIPELINE_DEPTH`] round
    /// trips in flight on the multiplexed connection; each answer is parsed as its batch
    /// arrives, so raw answers never pile up. Errors of single commands (a key of the wrong
    /// type) reach `parse` as values; only a connection error fails the whole read.
    async fn pipelined<T, O: Send + 'static>(
        &self,
        conn: &mut Connection,
        items: &[T],
        stats: &mut ReadStats,
        command: impl Fn(&mut redis::Pipeline, &T),
        parse: impl Fn(Value) -> O + Copy + Send + 'static,
    ) -> Result<Vec<O>, StoreError> {
        let pipes: Vec<redis::Pipeline> = items
            .chunks(self.batch)
            .map(|chunk| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for item in chunk {
                    command(&mut pipe, item);
                }
                pipe
            })
            .collect();
        let base: MultiplexedConnection = conn.clone();
        let batches = pipes.into_iter().map(move |pipe| {
            let mut c = base.clone();
            async move {
                let values: Vec<Value> = pipe.query_async(&mut c).await?;
                Ok::<_, redis::RedisError>(values.into_iter().map(parse).collect::<Vec<O>>())
            }
        });
        let mut answers = futures_util::stream::iter(batches).buffered(PIPELINE_DEPTH);
        let mut out = Vec::with_capacity(items.len());
        while let Some(parsed) = answers.next().await {
            out.extend(parsed?);
            stats.round_trips += 1;
        }
        stats.keys += items.len() as u64;
        Ok(out)
    }
}

fn bulk_string(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn members_of(v: Value) -> Members {
    let items = match v {
        Value::Array(items) => items,
        Value::Set(items) => items,
        Value::Nil => Vec::new(),
        _ => return Members::WrongType,
    };
    Members::Names(
        items
            .into_iter()
            .filter_map(bulk_string)
            .filter(|n| !n.is_empty() && !n.contains(':'))
            .collect(),
    )
}

/// Every record field tokenwarden reads, `access_token` last.
const RECORD_FIELDS_AND_TOKEN: [&str; 18] = [
    "provider_type",
    "status",
    "auth_type",
    "client_id",
    "client_secret",
    "account_key",
    "refresh_token",
    "token_expiry",
    "scopes",
    "api_base_url",
    "features_enabled",
    "sync_enabled",
    "updated_at",
    "token_url",
    "token_auth_method",
    "grant_type",
    "health_path",
    "access_token",
];

/// The record fields a registry read takes: every field tokenwarden uses but
/// `access_token`, which is large (JWT-sized) and needed only by health probes; a refresh
/// reads the whole record under its lock.
pub const RECORD_FIELDS: &[&str] = match RECORD_FIELDS_AND_TOKEN.split_last() {
    Some((_, fields)) => fields,
    None => &[],
};

/// Turns an `HMGET` answer for `fields` into a parsed record (all missing: no record).
pub fn parse_fields_value(v: Value, fields: &[&str]) -> RecordState {
    let items = match v {
        Value::Array(items) => items,
        Value::ServerError(e) if e.code() == "WRONGTYPE" => {
            return wrong("wrong_type", "the record key is not a hash")
        }
        _ => return wrong("wrong_type", "the record key is not a hash"),
    };
    let mut pairs = Vec::with_capacity(fields.len());
    for (name, value) in fields.iter().zip(items) {
        match value {
            Value::Nil => {}
            other => match bulk_string(other) {
                Some(s) => pairs.push((name.to_string(), s)),
                None => return wrong("bad_encoding", "a field or value is not UTF-8 text"),
            },
        }
    }
    ProviderRecord::parse(&pairs)
}

/// An invalid record that has no fields to fingerprint.
fn wrong(reason: &'static str, detail: &str) -> RecordState {
    RecordState::Invalid {
        error: InvalidRecord::new(reason, detail),
        fingerprint: if reason == "wrong_type" {
            wrong_type_fingerprint()
        } else {
            fingerprint([Some(reason)])
        },
    }
}

/// Turns an HGETALL answer (RESP2 flat array or RESP3 map) into a parsed record.
pub fn parse_record_value(v: Value) -> RecordState {
    let pairs: Vec<(Value, Value)> = match v {
        Value::Array(items) => {
            if items.len() % 2 != 0 {
                return wrong("bad_encoding", "odd HGETALL answer");
            }
            let mut it = items.into_iter();
            let mut pairs = Vec::new();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            pairs
        }
        Value::Map(pairs) => pairs,
        Value::Nil => Vec::new(),
        Value::ServerError(e) if e.code() == "WRONGTYPE" => {
            return wrong("wrong_type", "the record key is not a hash")
        }
        _ => return wrong("wrong_type", "the record key is not a hash"),
    };
    let mut fields = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        match (bulk_string(k), bulk_string(v)) {
            (Some(k), Some(v)) => fields.push((k, v)),
            _ => return wrong("bad_encoding", "a field or value is not UTF-8 text"),
        }
    }
    ProviderRecord::parse(&fields)
}

fn light_fingerprint(v: Value) -> u64 {
    let Value::Array(items) = v else {
        return wrong_type_fingerprint();
    };
    let values: Vec<Option<String>> = items.into_iter().map(bulk_string).collect();
    fingerprint(values.iter().map(|v| v.as_deref()))
}

fn wrong_type_fingerprint() -> u64 {
    fingerprint([Some("wrong_type")])
}
