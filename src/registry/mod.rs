//! The registry: the gateway's tenants and provider records in Redis (SPEC 1), read cheaply.
//!
//! Discovery is `SCAN MATCH tenant:*:providers` (never `KEYS`); members and records are read
//! with pipelines, one round trip per batch. Three reads serve change detection (the engine
//! in `crate::daemon` decides when to use which):
//! - [`Registry::discover`]: every tenant and its provider names;
//! - [`Registry::read_light`]: only [`record::LIGHT_FIELDS`] of known records, as fingerprints;
//! - [`Registry::read_records`]: whole records, parsed.
//!
//! On a Redis Cluster, SCAN runs on every master ([`crate::store::masters`]); the reads of
//! members and records are routed per key by the Cluster connection.
//!
//! [`Registry::full_read`] is the overlapped full read: `SCAN` on a connection of its own
//! while the tenants it finds are handed out slice by slice, with their members, for the
//! caller to read their records (the daemon's full scan and the fleet benchmark). The daemon's
//! full read sends its record batches over bulk sockets where the topology offers them
//! ([`Registry::read_records_bulk`], [`crate::store::bulk`]): the same records, parsed from
//! replies read in place.
//!
//! A key of the wrong Redis type never fails a batch: pipelines run with errors kept per
//! command, and such a key becomes an invalid record (`wrong_type`). Any other error answer
//! (`LOADING`, `BUSY`, ...) fails the batch: it says nothing about the key.
//!
//! Nothing read here is trusted to be text. SCAN keys and set members are read as bytes and
//! checked by [`keys::tenant_id`] and [`keys::provider_name`]: a bad name (SPEC 1.3 "Names")
//! is reported once ([`Reported`]: a warning and `registry_invalid_records_total{reason=
//! "bad_name"}`), left out, and never stops the rest of the read. Record values are bytes
//! too, decoded only for the fields tokenwarden uses ([`record::Field`]).

pub mod echo;
pub mod follow;
pub mod record;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, LazyLock, Mutex};

use crate::store::bulk::BulkConn;
use crate::store::resp::{KeyCommand, Reply};
use crate::store::Pool;

use futures_util::StreamExt;
use redis::Value;

use crate::health::{self, StoredHealth};
use crate::keys::{self, BadName, ProviderId};
use crate::store::{self, Connection, StoreError};
use crate::telemetry::metrics as m;
use crate::text::escape_bytes;
use record::{fingerprint, Field, InvalidRecord, ProviderRecord, RecordState, LIGHT_FIELDS};

/// Keys the server looks at per `SCAN` step (it filters them by pattern itself).
pub const SCAN_COUNT: usize = 10_000;

/// Round trips in flight at once during a registry read.
pub const PIPELINE_DEPTH: usize = 4;

/// Tenants per slice of a [`FullRead`]: their members and records are read together while
/// `SCAN` goes on.
pub const TENANT_SLICE: usize = 1_000;

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

/// Most bad names remembered as reported; past it, further ones are counted in one line.
const REPORTED_MAX: usize = 100_000;

/// The bad names already reported, so that each is reported once, not on every scan. Shared
/// by clones; keep one for the life of the follow loop.
#[derive(Debug, Clone, Default)]
pub struct Reported(Arc<Mutex<HashSet<Vec<u8>>>>);

impl Reported {
    /// True the first time `what` is seen.
    fn first(&self, what: Vec<u8>) -> bool {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() >= REPORTED_MAX {
            if !set.contains(&what) && set.insert(b"\0overflow".to_vec()) {
                tracing::warn!(
                    "more than {REPORTED_MAX} bad names in the registry: further ones are left out without a report"
                );
            }
            return false;
        }
        set.insert(what)
    }

    /// Reports a bad tenant id or provider name once: one warning, one count.
    fn bad_name(&self, tenant: &[u8], provider: Option<&[u8]>, why: BadName) {
        let mut what = tenant.to_vec();
        if let Some(p) = provider {
            what.push(0);
            what.extend_from_slice(p);
        }
        if !self.first(what) {
            return;
        }
        metrics::counter!(m::REGISTRY_INVALID_RECORDS, "reason" => BadName::REASON).increment(1);
        let tenant = escape_bytes(tenant);
        match provider {
            Some(p) => tracing::warn!(
                tenant = %tenant,
                provider = %escape_bytes(p),
                reason = BadName::REASON,
                detail = %format!("provider name {why}"),
                "invalid_record: a provider name tokenwarden cannot serve; left out, never refreshed"
            ),
            None => tracing::warn!(
                tenant = %tenant,
                reason = BadName::REASON,
                detail = %format!("tenant id {why}"),
                "invalid_record: a tenant id tokenwarden cannot serve; left out, never refreshed"
            ),
        }
    }
}

#[derive(Clone)]
pub struct Registry {
    batch: usize,
    reported: Reported,
}

impl Registry {
    pub fn new(batch: usize) -> Registry {
        Registry {
            batch: batch.max(1),
            reported: Reported::default(),
        }
    }

    /// Reports bad names into `reported` (shared across reads), not a set of its own.
    pub fn reporting_to(mut self, reported: &Reported) -> Registry {
        self.reported = reported.clone();
        self
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
    /// tenant may come twice: SCAN guarantees every key at least once). On a Cluster, SCAN
    /// runs on every master, one after the other (each node scans only its own keys).
    pub async fn scan_tenants(
        &self,
        conn: &mut Connection,
        stats: &mut ReadStats,
        pages: &tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    ) -> Result<(), StoreError> {
        for (_, mut node) in store::masters(conn).await? {
            if !self.scan_node(&mut node, stats, pages).await? {
                break;
            }
        }
        Ok(())
    }

    /// SCAN on one node; `false` when the receiver has gone.
    async fn scan_node(
        &self,
        conn: &mut Connection,
        stats: &mut ReadStats,
        pages: &tokio::sync::mpsc::UnboundedSender<Vec<String>>,
    ) -> Result<bool, StoreError> {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
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
                .filter_map(|k| {
                    let raw = keys::tenant_part_of_providers_key(k)?;
                    match keys::tenant_id(raw) {
                        Ok(t) => Some(t.to_string()),
                        Err(why) => {
                            self.reported.bad_name(raw, None, why);
                            None
                        }
                    }
                })
                .collect();
            if !page.is_empty() && pages.send(page).is_err() {
                return Ok(false);
            }
            if next == 0 {
                return Ok(true);
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
                1,
                |pipe, t| {
                    pipe.cmd("SMEMBERS").arg(keys::providers_set_key(t));
                },
                |answers| members_of(next_answer(answers)),
            )
            .await?;
        Ok(tenants
            .iter()
            .zip(members)
            .map(|(t, (members, bad))| {
                for (name, why) in bad {
                    self.reported.bad_name(t.as_bytes(), Some(&name), why);
                }
                (t.clone(), members)
            })
            .collect())
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

    /// As [`Registry::read_records`], each with [`health::STORED_FIELDS`] of its health hash
    /// (`None`: no such hash, or not one): for records the engine does not know yet, so that
    /// a restart neither re-plans nor rewrites what the previous process left.
    pub async fn read_records_and_health(
        &self,
        conn: &mut Connection,
        ids: &[ProviderId],
        stats: &mut ReadStats,
    ) -> Result<Vec<EngineRead>, StoreError> {
        self.pipelined(
            conn,
            ids,
            stats,
            2,
            |pipe, id| {
                pipe.cmd("HMGET").arg(id.record_key()).arg(RECORD_FIELDS);
                pipe.cmd("HMGET")
                    .arg(id.health_key())
                    .arg(&health::STORED_FIELDS[..]);
            },
            |answers| {
                let record = parse_fields_value(next_answer(answers), RECORD_FIELDS);
                (record, StoredHealth::from_value(next_answer(answers)))
            },
        )
        .await
    }

    /// As [`Registry::read_records`] (`with_health`: [`Registry::read_records_and_health`])
    /// on a bulk socket, in one round trip: the replies are parsed in place.
    pub async fn read_records_bulk(
        &self,
        conn: &BulkConn<EngineRead>,
        ids: &[ProviderId],
        with_health: bool,
        stats: &mut ReadStats,
    ) -> Result<Vec<EngineRead>, StoreError> {
        static RECORD: LazyLock<KeyCommand> =
            LazyLock::new(|| KeyCommand::new("HMGET", RECORD_FIELDS));
        static HEALTH: LazyLock<KeyCommand> =
            LazyLock::new(|| KeyCommand::new("HMGET", &health::STORED_FIELDS));
        // What the commands take, at most: one allocation.
        let per_key = |id: &ProviderId| {
            RECORD.encoded_len(id.record_key_len())
                + if with_health {
                    HEALTH.encoded_len(id.health_key_len())
                } else {
                    0
                }
        };
        let mut commands = Vec::with_capacity(ids.iter().map(per_key).sum());
        for id in ids {
            RECORD.push(&mut commands, id.record_key().as_bytes());
            if with_health {
                HEALTH.push(&mut commands, id.health_key().as_bytes());
            }
        }
        let out = if with_health {
            conn.query(&commands, ids.len(), 2, |frames| {
                let record = parse_fields_reply(frames.next_reply(), RECORD_FIELDS);
                (record, StoredHealth::from_reply(frames.next_reply()))
            })
            .await?
        } else {
            conn.query(&commands, ids.len(), 1, |frames| {
                (parse_fields_reply(frames.next_reply(), RECORD_FIELDS), None)
            })
            .await?
        };
        stats.round_trips += 1;
        stats.keys += ids.len() as u64;
        Ok(out)
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
            1,
            |pipe, id| {
                pipe.cmd("HMGET").arg(id.record_key()).arg(fields);
            },
            move |answers| parse_fields_value(next_answer(answers), fields),
        )
        .await
    }

    /// One record, parsed (used under the refresh lock). An error answer other than
    /// `WRONGTYPE` (`LOADING`, `BUSY`, ...) fails the read.
    pub async fn read_record(
        conn: &mut Connection,
        id: &ProviderId,
    ) -> Result<RecordState, StoreError> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("HGETALL").arg(id.record_key());
        let mut values: Vec<Value> = pipe.query_async(conn).await?;
        // `WRONGTYPE` is the record's own fault (an invalid record); `LOADING` and the like
        // are Redis's, and the attempt ends as a Redis error.
        fail_on_server_error(&values)?;
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
            1,
            |pipe, id| {
                pipe.cmd("HMGET")
                    .arg(id.record_key())
                    .arg(&LIGHT_FIELDS[..]);
            },
            |answers| light_fingerprint(next_answer(answers)),
        )
        .await
    }

    /// The `per_item` commands `command` adds for each item, about `batch` commands per
    /// round trip, up to [`PIPELINE_DEPTH`] round trips in
    /// flight on the multiplexed connection; each batch is parsed as it arrives, `parse`
    /// taking an item's answers from the batch's, so raw answers never pile up. Errors of
    /// single commands (a key of the wrong type) reach `parse` as values; only a connection
    /// error fails the whole read.
    async fn pipelined<T, O: Send + 'static>(
        &self,
        conn: &mut Connection,
        items: &[T],
        stats: &mut ReadStats,
        per_item: usize,
        command: impl Fn(&mut redis::Pipeline, &T),
        parse: impl Fn(&mut std::vec::IntoIter<Value>) -> O + Copy + Send + 'static,
    ) -> Result<Vec<O>, StoreError> {
        let pipes: Vec<(redis::Pipeline, usize)> = items
            .chunks((self.batch / per_item).max(1))
            .map(|chunk| {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                for item in chunk {
                    command(&mut pipe, item);
                }
                (pipe, chunk.len())
            })
            .collect();
        let base: Connection = conn.clone();
        let batches = pipes.into_iter().map(move |(pipe, n)| {
            let mut c = base.clone();
            async move {
                let values: Vec<Value> = pipe.query_async(&mut c).await?;
                fail_on_server_error(&values)?;
                let mut answers = values.into_iter();
                Ok::<_, redis::RedisError>((0..n).map(|_| parse(&mut answers)).collect::<Vec<O>>())
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

/// An error answer other than [`store::KEY_ERROR`] in a batch (`LOADING` from a Redis still
/// loading its dump, `BUSY`, `MASTERDOWN`, `NOPERM`, ...) says nothing about the key: the
/// whole read fails and is tried again, rather than the record being taken as invalid (or a
/// tenant as gone) and that written to its health.
fn fail_on_server_error(values: &[Value]) -> Result<(), redis::RedisError> {
    match values.iter().find_map(|v| match v {
        Value::ServerError(e) if e.code() != store::KEY_ERROR => Some(e),
        _ => None,
    }) {
        Some(e) => Err(e.clone().into()),
        None => Ok(()),
    }
}

impl Registry {
    /// Starts the overlapped full read: `SCAN MATCH tenant:*:providers` runs in a task of its
    /// own on a connection of its own from `pool`, while [`FullRead::next_slice`] hands out
    /// the tenants found, [`TENANT_SLICE`] at a time, with their members. The whole read
    /// takes about as long as the longer of SCAN and the reads, not their sum.
    pub async fn full_read(&self, pool: &Pool) -> Result<FullRead, StoreError> {
        let (tx, pages) = tokio::sync::mpsc::unbounded_channel::<Vec<String>>();
        let mut scan_conn = store::conn(pool).await?;
        let scanner_registry = Registry::new(self.batch);
        let scanner = tokio::spawn(async move {
            let mut stats = ReadStats::default();
            scanner_registry
                .scan_tenants(&mut scan_conn, &mut stats, &tx)
                .await
                .map(|()| stats)
        });
        Ok(FullRead {
            registry: Registry::new(self.batch),
            pool: pool.clone(),
            pages,
            scanner: Some(scanner),
            seen: HashSet::new(),
            pending: Vec::new(),
            done: false,
        })
    }
}

/// An overlapped full read under way (see [`Registry::full_read`]):
///
/// ```ignore
/// let mut read = registry.full_read(&pool).await?;
/// while let Some(discovered) = read.next_slice(&mut stats).await? {
///     // read the records of `discovered`, e.g. with `Registry::read_records`
/// }
/// read.finish(&mut stats).await?;
/// ```
pub struct FullRead {
    registry: Registry,
    pool: Pool,
    pages: tokio::sync::mpsc::UnboundedReceiver<Vec<String>>,
    scanner: Option<tokio::task::JoinHandle<Result<ReadStats, StoreError>>>,
    /// Tenants handed out or pending: SCAN may return a key more than once.
    seen: HashSet<String>,
    pending: Vec<String>,
    done: bool,
}

impl FullRead {
    /// The next slice of tenants not handed out before, each with its provider names (one
    /// pipelined `SMEMBERS` read on a pool connection, counted in `stats`); `None` once SCAN
    /// has finished and every tenant it found was handed out. A SCAN error shows here or in
    /// [`FullRead::finish`].
    pub async fn next_slice(
        &mut self,
        stats: &mut ReadStats,
    ) -> Result<Option<Discovery>, StoreError> {
        while !self.done && self.pending.len() < TENANT_SLICE {
            match self.pages.recv().await {
                Some(page) => {
                    for t in page {
                        if self.seen.insert(t.clone()) {
                            self.pending.push(t);
                        }
                    }
                }
                None => self.done = true,
            }
        }
        if self.pending.is_empty() {
            return Ok(None);
        }
        let take = self.pending.len().min(TENANT_SLICE);
        let slice: Vec<String> = self.pending.drain(..take).collect();
        let mut conn = store::conn(&self.pool).await?;
        let discovered = self.registry.read_members(&mut conn, &slice, stats).await?;
        Ok(Some(discovered))
    }

    /// Waits for SCAN to end and adds its round trips to `stats`; its error if it failed.
    pub async fn finish(mut self, stats: &mut ReadStats) -> Result<(), StoreError> {
        let Some(scanner) = self.scanner.take() else {
            return Ok(());
        };
        // Tenants not handed out are dropped: the caller stopped early.
        self.pages.close();
        match scanner.await {
            Ok(Ok(s)) => {
                stats.round_trips += s.round_trips;
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(StoreError::Pool(format!("registry scan task failed: {e}"))),
        }
    }
}

/// The bytes of a string answer; `None` for anything else (nil, an error, an array).
/// The next answer of a pipelined batch (`Nil` past its end, which Redis never sends).
fn next_answer(answers: &mut std::vec::IntoIter<Value>) -> Value {
    answers.next().unwrap_or(Value::Nil)
}

fn bulk_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

/// A SMEMBERS answer: the good names, and the bad ones with why.
fn members_of(v: Value) -> (Members, Vec<(Vec<u8>, BadName)>) {
    let items = match v {
        Value::Array(items) => items,
        Value::Set(items) => items,
        Value::Nil => Vec::new(),
        _ => return (Members::WrongType, Vec::new()),
    };
    let mut names = BTreeSet::new();
    let mut bad = Vec::new();
    for raw in items.into_iter().filter_map(bulk_bytes) {
        match keys::provider_name(&raw) {
            Ok(name) => {
                names.insert(name.to_string());
            }
            Err(why) => bad.push((raw, why)),
        }
    }
    (Members::Names(names), bad)
}

/// A record read for the engine, with its health hash's [`health::STORED_FIELDS`] where they
/// were read (a record the engine does not know yet).
pub type EngineRead = (RecordState, Option<StoredHealth>);

/// Every record field tokenwarden reads, `access_token` last.
pub const RECORD_FIELDS_AND_TOKEN: [&str; 25] = [
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
    "jwt_assertion",
    "personal_access_token",
    "certificate_key",
    "certificate_thumbprint",
    "api_key",
    "client_secret_expires_at",
    "certificate_pem",
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
        _ => return wrong("wrong_type", "the record key is not a hash"),
    };
    let values: Vec<Option<Vec<u8>>> = items.into_iter().map(bulk_bytes).collect();
    parse_field_values(values.iter().map(|v| v.as_deref()), fields)
}

/// As [`parse_fields_value`], from a reply read in place (the bulk sockets).
pub fn parse_fields_reply(reply: Reply<'_>, fields: &[&str]) -> RecordState {
    match reply {
        Reply::Array(items) => parse_field_values(items.map(Reply::bytes), fields),
        _ => wrong("wrong_type", "the record key is not a hash"),
    }
}

/// The record of the `HMGET` values of `fields`, in their order.
fn parse_field_values<'a>(
    values: impl Iterator<Item = Option<&'a [u8]>>,
    fields: &[&str],
) -> RecordState {
    // Each value checked for UTF-8 once, however often the parser asks for it.
    let parsed: Vec<Field<'_>> = values.map(Field::of_bytes).collect();
    let present = parsed.iter().any(|f| !matches!(f, Field::Missing));
    // The parser looks fields up by name, dozens of times per record: by a match on the
    // name where `fields` is the usual list (or a prefix of it), not by searching the list.
    let usual = fields.len() <= RECORD_FIELDS_AND_TOKEN.len()
        && fields
            .iter()
            .zip(RECORD_FIELDS_AND_TOKEN.iter())
            .all(|(a, b)| a == b);
    ProviderRecord::parse_with(present, |name| {
        let at = if usual {
            usual_field_index(name)
        } else {
            fields.iter().position(|f| *f == name)
        };
        at.and_then(|i| parsed.get(i).copied())
            .unwrap_or(Field::Missing)
    })
}

/// The position of `name` in [`RECORD_FIELDS_AND_TOKEN`] (a test keeps the two in step).
fn usual_field_index(name: &str) -> Option<usize> {
    Some(match name {
        "provider_type" => 0,
        "status" => 1,
        "auth_type" => 2,
        "client_id" => 3,
        "client_secret" => 4,
        "account_key" => 5,
        "refresh_token" => 6,
        "token_expiry" => 7,
        "scopes" => 8,
        "api_base_url" => 9,
        "features_enabled" => 10,
        "sync_enabled" => 11,
        "updated_at" => 12,
        "token_url" => 13,
        "token_auth_method" => 14,
        "grant_type" => 15,
        "health_path" => 16,
        "jwt_assertion" => 17,
        "personal_access_token" => 18,
        "certificate_key" => 19,
        "certificate_thumbprint" => 20,
        "api_key" => 21,
        "client_secret_expires_at" => 22,
        "certificate_pem" => 23,
        "access_token" => 24,
        _ => return None,
    })
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
        Value::ServerError(e) if e.code() == store::KEY_ERROR => {
            return wrong("wrong_type", "the record key is not a hash")
        }
        _ => return wrong("wrong_type", "the record key is not a hash"),
    };
    // Only the fields tokenwarden uses are looked at: a field name or value that is not UTF-8
    // elsewhere in the hash (`created_at`, an extra field) changes nothing.
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        if let (Some(k), Some(v)) = (bulk_bytes(k), bulk_bytes(v)) {
            fields.push((k, v));
        }
    }
    ProviderRecord::parse_with(!fields.is_empty(), |name| {
        Field::of_bytes(
            fields
                .iter()
                .find(|(k, _)| k.as_slice() == name.as_bytes())
                .map(|(_, v)| v.as_slice()),
        )
    })
}

fn light_fingerprint(v: Value) -> u64 {
    let Value::Array(items) = v else {
        return wrong_type_fingerprint();
    };
    let values: Vec<Option<Vec<u8>>> = items.into_iter().map(bulk_bytes).collect();
    fingerprint(values.iter().map(|v| v.as_deref()))
}

fn wrong_type_fingerprint() -> u64 {
    fingerprint([Some("wrong_type")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_field_index_follows_the_field_list() {
        for (i, name) in RECORD_FIELDS_AND_TOKEN.iter().enumerate() {
            assert_eq!(usual_field_index(name), Some(i), "{name}");
        }
        assert_eq!(usual_field_index("created_at"), None);
    }

    #[test]
    fn a_read_of_other_fields_finds_them_by_name() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        // Not the usual order: looked up by searching the list.
        let fields = ["status", "provider_type", "client_id", "client_secret"];
        let v = Value::Array(vec![bulk("inactive"), bulk("zoom"), bulk("cid"), bulk("s")]);
        match parse_fields_value(v, &fields) {
            RecordState::Inactive { provider_type, .. } => assert_eq!(provider_type, "zoom"),
            other => panic!("expected an inactive zoom record, got {other:?}"),
        }
    }
}
