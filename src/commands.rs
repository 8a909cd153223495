//! Operator commands through the running replicas: the stream `tokenwarden:commands`
//! (SPEC 2), its request and answer format, the daemon task that answers requests, and the
//! client side the CLI uses (`tokenwarden refresh|sync ... [--wait]`).
//!
//! # Format
//! A request is one entry, added by the CLI with `XADD tokenwarden:commands MAXLEN ~ 1000`:
//! `type` (`refresh` or `sync`), `tenant`, `provider` (required for `refresh`, optional for
//! `sync`), `feature` (optional, `sync` only), `requested_by` (host and process of the CLI).
//! The answer is another entry in the same stream: `type=answer`, `request` (the request's
//! entry id), `command`, `tenant`, `provider`, `result` ([`Outcome`]: `ok`, `lock_busy`,
//! `not_found`, `reauth_required`, `failed`, `unavailable`, `expired`, `bad_request`),
//! `detail` (one line, never a secret: provider text is scrubbed before it gets here),
//! `lines` (`sync` only: a JSON array of one line per provider and feature) and `replica`.
//!
//! # Delivery: a consumer group
//! Every replica reads the stream through the consumer group `tokenwarden`
//! (`XREADGROUP ... BLOCK`, on a connection of its own), so exactly one replica takes each
//! request, whichever it is: a refresh goes through the provider's lock, reservation and
//! journal, so it does not matter which replica runs it. Entries are acknowledged as soon as
//! they are read (at most once): a replica that dies between taking a request and answering
//! leaves it unanswered, and the CLI says so (exit 6) after `--timeout`; sending it again is
//! safe. Answer entries are read (and acknowledged) too, and ignored. The group is created at
//! the stream's end when the first replica starts; requests older than [`MAX_AGE`] when a
//! replica reads them (all replicas were down) are answered `expired`, not run.
//!
//! # The sync seam
//! The data sync is not part of this module: the task takes an `Option<Arc<dyn SyncHook>>`.
//! Without one (this build) it answers every `sync` request `unavailable` ("not available in
//! this build"); the sync engine plugs in by implementing [`SyncHook`] and handing it to
//! [`run`] in `daemon::run`.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use redis::AsyncConnectionConfig;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::engine::transition::{self, Attempt};
use crate::keys::{self, ProviderId};
use crate::refresh::Trigger;
use crate::replica::REPLICAS_INDEX;
use crate::store::{self, Connection, StoreError};
use crate::text::escape_control;

/// The consumer group every replica reads the commands stream through.
pub const GROUP: &str = "tokenwarden";
/// Approximate cap on the stream's length (`XADD ... MAXLEN ~`), requests and answers
/// together: enough for many concurrent operators, small enough to read whole.
pub const MAXLEN: usize = 1000;
/// A request older than this when a replica reads it is answered `expired`, not run.
pub const MAX_AGE: Duration = Duration::from_secs(120);
/// How long one `XREADGROUP`/`XREAD` blocks before it is sent again.
const BLOCK: Duration = Duration::from_secs(2);

/// What an operator asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Refresh,
    Sync,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Refresh => "refresh",
            Kind::Sync => "sync",
        }
    }
}

/// One request entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub tenant: String,
    pub provider: Option<String>,
    pub feature: Option<String>,
}

impl Request {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let mut f = vec![
            ("type", self.kind.as_str().to_string()),
            ("tenant", self.tenant.clone()),
        ];
        if let Some(p) = &self.provider {
            f.push(("provider", p.clone()));
        }
        if let Some(feature) = &self.feature {
            f.push(("feature", feature.clone()));
        }
        f.push(("requested_by", requester()));
        f
    }

    /// The request an entry holds; `Ok(None)` for entries that are not requests (answers),
    /// `Err` for a request that cannot be served (its answer's detail).
    fn parse(fields: &HashMap<String, String>) -> Result<Option<Request>, String> {
        let kind = match fields.get("type").map(String::as_str) {
            Some("refresh") => Kind::Refresh,
            Some("sync") => Kind::Sync,
            Some("answer") => return Ok(None),
            Some(other) => return Err(format!("unknown type {:?}", escape_control(other))),
            None => return Err("no type field".into()),
        };
        let tenant = fields
            .get("tenant")
            .filter(|t| !t.is_empty())
            .ok_or("no tenant field")?
            .clone();
        let provider = fields.get("provider").filter(|p| !p.is_empty()).cloned();
        let feature = fields.get("feature").filter(|f| !f.is_empty()).cloned();
        if kind == Kind::Refresh && provider.is_none() {
            return Err("refresh needs a provider".into());
        }
        Ok(Some(Request {
            kind,
            tenant,
            provider,
            feature,
        }))
    }
}

/// The `result` of an answer; each has its own CLI exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (refresh: the new token is written back and confirmed).
    Ok,
    /// Another replica (or the gateway) holds the provider's lock or reservation, or the lock
    /// is stuck: try again in a few seconds.
    LockBusy,
    /// The provider is not in the registry: nothing was done.
    NotFound,
    /// The provider refused the grant for good (`invalid_grant`, ...): a human must
    /// re-authorise in the gateway.
    ReauthRequired,
    /// Anything else that went wrong (provider down, Redis error, answer held in a journal).
    Failed,
    /// The replica cannot run this command (`sync` in a build without the sync engine).
    Unavailable,
    /// The request waited longer than [`MAX_AGE`] for a replica: not run.
    Expired,
    /// The request is malformed (a name tokenwarden cannot serve, ...).
    BadRequest,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::LockBusy => "lock_busy",
            Outcome::NotFound => "not_found",
            Outcome::ReauthRequired => "reauth_required",
            Outcome::Failed => "failed",
            Outcome::Unavailable => "unavailable",
            Outcome::Expired => "expired",
            Outcome::BadRequest => "bad_request",
        }
    }

    fn parse(s: &str) -> Outcome {
        match s {
            "ok" => Outcome::Ok,
            "lock_busy" => Outcome::LockBusy,
            "not_found" => Outcome::NotFound,
            "reauth_required" => Outcome::ReauthRequired,
            "unavailable" => Outcome::Unavailable,
            "expired" => Outcome::Expired,
            "bad_request" => Outcome::BadRequest,
            _ => Outcome::Failed,
        }
    }

    /// The CLI's exit code (documented in `tokenwarden --help` and the README).
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => exit::OK,
            Outcome::LockBusy => exit::LOCK_BUSY,
            Outcome::NotFound => exit::NOT_FOUND,
            Outcome::ReauthRequired => exit::REAUTH_REQUIRED,
            Outcome::BadRequest => exit::USAGE,
            Outcome::Failed | Outcome::Unavailable | Outcome::Expired => exit::FAILURE,
        }
    }

    /// The outcome of a refresh attempt, and its one-line description.
    pub fn of_attempt(a: &Attempt) -> (Outcome, String) {
        let outcome = match a {
            Attempt::Refreshed(_) => Outcome::Ok,
            Attempt::Locked | Attempt::Reserved | Attempt::LockStuck => Outcome::LockBusy,
            Attempt::RecordGone => Outcome::NotFound,
            Attempt::Permanent {
                during_recovery: false,
                ..
            } => Outcome::ReauthRequired,
            _ => Outcome::Failed,
        };
        (outcome, describe(a))
    }
}

/// The CLI's exit codes.
pub mod exit {
    pub const OK: u8 = 0;
    /// A runtime failure (Redis unreachable, the provider down, ...).
    pub const FAILURE: u8 = 1;
    /// Bad configuration or arguments.
    pub const USAGE: u8 = 2;
    /// The provider's lock (or reservation) is held elsewhere: try again shortly.
    pub const LOCK_BUSY: u8 = 3;
    /// The provider is not in the registry; nothing was written.
    pub const NOT_FOUND: u8 = 4;
    /// The provider refused the grant for good: re-authorise in the gateway.
    pub const REAUTH_REQUIRED: u8 = 5;
    /// No running replica took the request (none alive, or no answer within `--timeout`).
    pub const NO_ANSWER: u8 = 6;
}

/// One line for a refresh outcome; never a secret.
pub fn describe(a: &Attempt) -> String {
    let label = transition::attempt_label(a);
    match a {
        Attempt::Permanent { code, detail, .. } => format!("{label} ({code}: {detail})"),
        Attempt::Transient { detail, .. } | Attempt::Redis { detail } => {
            format!("{label} ({detail})")
        }
        Attempt::Conflict { detail } => format!("{label} ({detail})"),
        Attempt::Skipped(r) => format!("{label} ({})", r.as_str()),
        Attempt::Refreshed(r) => format!(
            "{label} (expires in {} s)",
            (r.expiry - r.issued).num_seconds()
        ),
        Attempt::Unconfirmed(_) => format!(
            "{label} (the new token is held in the journal and is written back when Redis takes it)"
        ),
        Attempt::Locked | Attempt::Reserved => {
            format!("{label} (another replica is refreshing it now)")
        }
        _ => label.to_string(),
    }
}

/// An answer read from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub result: Outcome,
    /// `result` as written (an unknown one reads as [`Outcome::Failed`]).
    pub result_text: String,
    pub detail: String,
    /// `sync`: one line per provider and feature.
    pub lines: Vec<String>,
    pub replica: String,
}

// -----------------------------------------------------------------------------------------
// The sync seam

/// What a sync run reports: one line per provider and feature, and whether all succeeded.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    pub ok: bool,
    pub lines: Vec<String>,
}

/// The data sync, as the commands task calls it. Implemented by the sync engine; the task
/// answers `unavailable` when it has none.
pub trait SyncHook: Send + Sync {
    /// Runs `tenant`'s sync now (through the tenant's sync lock), limited to `provider` and
    /// `feature` when given.
    fn run<'a>(
        &'a self,
        tenant: &'a str,
        provider: Option<&'a str>,
        feature: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = SyncReport> + Send + 'a>>;
}

/// The answer detail for `sync` in a build without a [`SyncHook`].
pub const SYNC_UNAVAILABLE: &str = "sync is not available in this build";

// -----------------------------------------------------------------------------------------
// The daemon side

/// Reads requests until `stop` and answers them; each request runs in its own task, so a
/// slow refresh does not hold up the next request.
pub async fn run(ctx: Arc<Context>, sync: Option<Arc<dyn SyncHook>>, stop: CancellationToken) {
    let consumer = ctx.replica.clone();
    let mut conn: Option<Connection> = None;
    let mut grouped = false;
    while !stop.is_cancelled() {
        let c = match &mut conn {
            Some(c) => c,
            None => match blocking_conn(&ctx).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::debug!(error = %e, "commands: no connection yet");
                    pause(&stop).await;
                    continue;
                }
            },
        };
        if !grouped {
            match ensure_group(c).await {
                Ok(()) => grouped = true,
                Err(e) => {
                    tracing::debug!(error = %e, "commands: cannot create the consumer group");
                    conn = None;
                    pause(&stop).await;
                    continue;
                }
            }
        }
        let read = tokio::select! {
            _ = stop.cancelled() => break,
            r = read_group(c, &consumer) => r,
        };
        match read {
            Ok(entries) => {
                for (id, fields) in entries {
                    let ctx = Arc::clone(&ctx);
                    let sync = sync.clone();
                    tokio::spawn(async move { handle(&ctx, sync.as_deref(), &id, &fields).await });
                }
            }
            Err(e) => {
                // NOGROUP: the stream was deleted (FLUSHALL, an operator): create it again.
                grouped = false;
                if !matches!(&e, StoreError::Redis(r) if r.code() == Some("NOGROUP")) {
                    tracing::debug!(error = %e, "commands: read failed; reconnecting");
                    conn = None;
                }
                pause(&stop).await;
            }
        }
    }
    // This replica's consumer is of no further use (a restart gets a new replica id).
    if let Some(c) = &mut conn {
        let _: Result<redis::Value, _> = redis::cmd("XGROUP")
            .arg("DELCONSUMER")
            .arg(keys::COMMANDS_STREAM)
            .arg(GROUP)
            .arg(&consumer)
            .query_async(c)
            .await;
    }
}

async fn pause(stop: &CancellationToken) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
    }
}

/// A connection of its own for blocking reads: the pool's connections answer within
/// `redis.command_timeout_ms`, a blocking read needs that plus [`BLOCK`].
async fn blocking_conn(ctx: &Context) -> Result<Connection, StoreError> {
    let cfg = ctx.config();
    open_blocking(
        &cfg.redis.url,
        Duration::from_millis(cfg.redis.command_timeout_ms),
    )
    .await
}

async fn open_blocking(url: &str, timeout: Duration) -> Result<Connection, StoreError> {
    let client = redis::Client::open(url)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout.saturating_add(BLOCK)));
    Ok(Connection::Node(
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await?,
    ))
}

async fn ensure_group(conn: &mut Connection) -> Result<(), StoreError> {
    let r: Result<redis::Value, redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys::COMMANDS_STREAM)
        .arg(GROUP)
        .arg("$")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

type Entry = (String, HashMap<String, String>);

/// New entries for this consumer, acknowledged at once.
async fn read_group(conn: &mut Connection, consumer: &str) -> Result<Vec<Entry>, StoreError> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(GROUP)
        .arg(consumer)
        .arg("COUNT")
        .arg(16)
        .arg("BLOCK")
        .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(2000))
        .arg("STREAMS")
        .arg(keys::COMMANDS_STREAM)
        .arg(">")
        .query_async(conn)
        .await?;
    let entries = stream_entries(&reply);
    if !entries.is_empty() {
        let mut ack = redis::cmd("XACK");
        ack.arg(keys::COMMANDS_STREAM).arg(GROUP);
        for (id, _) in &entries {
            ack.arg(id);
        }
        ack.query_async::<redis::Value>(conn).await?;
    }
    Ok(entries)
}

async fn handle(
    ctx: &Context,
    sync: Option<&dyn SyncHook>,
    id: &str,
    fields: &HashMap<String, String>,
) {
    let request = match Request::parse(fields) {
        Ok(None) => return,
        Ok(Some(r)) => r,
        Err(why) => {
            tracing::warn!(request = id, why = %why, "commands: malformed request");
            let mut answer = AnswerFields::new(id, fields);
            answer.set(Outcome::BadRequest, why);
            answer.send(ctx).await;
            return;
        }
    };
    let mut answer = AnswerFields::new(id, fields);
    if entry_age(id).is_some_and(|age| age > MAX_AGE) {
        answer.set(
            Outcome::Expired,
            format!(
                "the request waited more than {} s for a replica: not run",
                MAX_AGE.as_secs()
            ),
        );
        answer.send(ctx).await;
        return;
    }
    tracing::info!(
        request = id,
        command = request.kind.as_str(),
        tenant = %escape_control(&request.tenant),
        provider = %escape_control(request.provider.as_deref().unwrap_or("*")),
        "operator command"
    );
    match request.kind {
        Kind::Refresh => {
            let (outcome, detail) = refresh(ctx, &request).await;
            answer.set(outcome, detail);
        }
        Kind::Sync => match sync {
            None => answer.set(Outcome::Unavailable, SYNC_UNAVAILABLE.to_string()),
            Some(hook) => {
                let report = hook
                    .run(
                        &request.tenant,
                        request.provider.as_deref(),
                        request.feature.as_deref(),
                    )
                    .await;
                let outcome = if report.ok {
                    Outcome::Ok
                } else {
                    Outcome::Failed
                };
                let detail = format!("{} provider and feature runs", report.lines.len());
                answer.set(outcome, detail);
                answer.lines = Some(report.lines);
            }
        },
    }
    tracing::info!(
        request = id,
        result = answer.result.as_str(),
        detail = %answer.detail,
        "operator command answered"
    );
    answer.send(ctx).await;
}

/// A forced refresh through the engine: the same lock, reservation, journal and health
/// writes as a scheduled one.
async fn refresh(ctx: &Context, request: &Request) -> (Outcome, String) {
    let provider = request.provider.as_deref().unwrap_or("");
    let id = match ProviderId::checked(&request.tenant, provider) {
        Ok(id) => id,
        Err(why) => {
            return (
                Outcome::BadRequest,
                format!("not a tenant id and provider name tokenwarden can serve: {why}"),
            )
        }
    };
    match not_in_registry(ctx, &id).await {
        Ok(Some(missing)) => {
            return (
                Outcome::NotFound,
                format!("not in the registry ({missing}); nothing done"),
            )
        }
        Ok(None) => {}
        Err(e) => return (Outcome::Failed, e.to_string()),
    }
    match ctx.engine.refresh_now(id, Trigger::Forced).await {
        Some(attempt) => Outcome::of_attempt(&attempt),
        None => (Outcome::Failed, "the replica is shutting down".to_string()),
    }
}

/// Milliseconds of an entry id (`1700000000000-0`) to its age now.
fn entry_age(id: &str) -> Option<Duration> {
    let ms: i64 = id.split('-').next()?.parse().ok()?;
    let age = chrono::Utc::now().timestamp_millis().checked_sub(ms)?;
    u64::try_from(age).ok().map(Duration::from_millis)
}

struct AnswerFields {
    request: String,
    command: String,
    tenant: String,
    provider: String,
    result: Outcome,
    detail: String,
    lines: Option<Vec<String>>,
}

impl AnswerFields {
    fn new(id: &str, fields: &HashMap<String, String>) -> AnswerFields {
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        AnswerFields {
            request: id.to_string(),
            command: get("type"),
            tenant: get("tenant"),
            provider: get("provider"),
            result: Outcome::Failed,
            detail: String::new(),
            lines: None,
        }
    }

    fn set(&mut self, result: Outcome, detail: String) {
        self.result = result;
        self.detail = detail;
    }

    async fn send(&self, ctx: &Context) {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(keys::COMMANDS_STREAM)
            .arg("MAXLEN")
            .arg("~")
            .arg(MAXLEN)
            .arg("*")
            .arg("type")
            .arg("answer")
            .arg("request")
            .arg(&self.request)
            .arg("command")
            .arg(&self.command)
            .arg("tenant")
            .arg(&self.tenant)
            .arg("provider")
            .arg(&self.provider)
            .arg("result")
            .arg(self.result.as_str())
            .arg("detail")
            .arg(&self.detail)
            .arg("replica")
            .arg(&ctx.replica);
        if let Some(lines) = &self.lines {
            cmd.arg("lines")
                .arg(serde_json::to_string(lines).unwrap_or_else(|_| "[]".into()));
        }
        let sent = match store::conn(&ctx.pool).await {
            Ok(mut conn) => cmd
                .query_async::<redis::Value>(&mut conn)
                .await
                .map_err(StoreError::from),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            tracing::warn!(request = %self.request, error = %e, "commands: answer not written");
        }
    }
}

/// Why `id` is not a provider of the registry, or `None` when it is: listed in its tenant's
/// provider set and with a record. Read before a forced refresh, so that one for a provider
/// that is not there writes nothing (no health hash, no event).
pub async fn not_in_registry(ctx: &Context, id: &ProviderId) -> Result<Option<String>, StoreError> {
    let mut conn = store::conn(&ctx.pool).await?;
    let set = keys::providers_set_key(&id.tenant);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    pipe.cmd("SISMEMBER").arg(&set).arg(&*id.provider);
    pipe.cmd("TYPE").arg(id.record_key());
    let answers: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let listed = matches!(answers.first(), Some(redis::Value::Int(1)));
    let record_type = match answers.get(1) {
        Some(redis::Value::SimpleString(t)) => t.as_str(),
        Some(redis::Value::Okay) => "string",
        _ => "none",
    };
    let set_text = escape_control(&set).into_owned();
    Ok(if !listed {
        Some(format!("not a member of {set_text}"))
    } else if record_type == "none" {
        Some("listed, but it has no record".to_string())
    } else {
        None
    })
}

// -----------------------------------------------------------------------------------------
// The client side (the CLI)

/// Why the CLI got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "no running tokenwarden replica: none has a live heartbeat in {REPLICAS_INDEX}; start the daemon (`tokenwarden run`), or run the refresh in this process with `--local --state-dir DIR`"
    )]
    NoReplica,
    #[error("no replica answered request {request} within {} s (it may still run: see `tokenwarden status`)", .waited.as_secs())]
    NoAnswer { request: String, waited: Duration },
}

/// Live replicas: heartbeats in the index younger than `ttl`.
pub async fn live_replicas(conn: &mut Connection, ttl: Duration) -> Result<u64, StoreError> {
    let now = chrono::Utc::now().timestamp_millis();
    let since = now.saturating_sub(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
    let n: u64 = redis::cmd("ZCOUNT")
        .arg(REPLICAS_INDEX)
        .arg(since)
        .arg("+inf")
        .query_async(conn)
        .await?;
    Ok(n)
}

/// Adds `request` to the stream (after checking a replica is alive to take it); returns
/// its entry id.
pub async fn send(
    conn: &mut Connection,
    request: &Request,
    heartbeat_ttl: Duration,
) -> Result<String, SendError> {
    if live_replicas(conn, heartbeat_ttl).await? == 0 {
        return Err(SendError::NoReplica);
    }
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys::COMMANDS_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(MAXLEN)
        .arg("*");
    for (k, v) in request.fields() {
        cmd.arg(k).arg(v);
    }
    let id: String = cmd.query_async(conn).await.map_err(StoreError::from)?;
    Ok(id)
}

/// Waits up to `timeout` for the answer to `request` (read with `XREAD BLOCK` from the
/// request onward, on a connection of its own).
pub async fn wait_answer(
    url: &str,
    command_timeout: Duration,
    request: &str,
    timeout: Duration,
) -> Result<Answer, SendError> {
    let mut conn = open_blocking(url, command_timeout).await?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut after = request.to_string();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(SendError::NoAnswer {
                request: request.to_string(),
                waited: timeout,
            });
        }
        let block = left.min(BLOCK).max(Duration::from_millis(1));
        let reply: redis::Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(100)
            .arg("BLOCK")
            .arg(u64::try_from(block.as_millis()).unwrap_or(2000))
            .arg("STREAMS")
            .arg(keys::COMMANDS_STREAM)
            .arg(&after)
            .query_async(&mut conn)
            .await
            .map_err(StoreError::from)?;
        for (id, fields) in stream_entries(&reply) {
            after = id;
            let is_ours = fields.get("type").map(String::as_str) == Some("answer")
                && fields.get("request").map(String::as_str) == Some(request);
            if is_ours {
                let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
                let result_text = get("result");
                return Ok(Answer {
                    result: Outcome::parse(&result_text),
                    result_text,
                    detail: get("detail"),
                    lines: fields
                        .get("lines")
                        .and_then(|l| serde_json::from_str(l).ok())
                        .unwrap_or_default(),
                    replica: get("replica"),
                });
            }
        }
    }
}

/// The CLI's host and process, for the request's `requested_by`.
fn requester() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{host}:{}", std::process::id())
}

// -----------------------------------------------------------------------------------------
// Stream replies

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        redis::Value::VerbatimString { text, .. } => Some(text.clone()),
        redis::Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn items(v: &redis::Value) -> Vec<&redis::Value> {
    match v {
        redis::Value::Array(a) | redis::Value::Set(a) => a.iter().collect(),
        redis::Value::Map(m) => m.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREAD`/`XREADGROUP` reply for one stream (RESP2 arrays or a RESP3
/// map); nil (a timeout) gives none. Anything malformed is left out.
fn stream_entries(reply: &redis::Value) -> Vec<Entry> {
    let per_stream: Vec<&redis::Value> = match reply {
        // RESP3: {stream: entries}
        redis::Value::Map(m) => m.iter().map(|(_, v)| v).collect(),
        // RESP2: [[stream, entries], ...]
        redis::Value::Array(streams) => streams
            .iter()
            .filter_map(|s| items(s).get(1).copied())
            .collect(),
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for entries in per_stream {
        for entry in items(entries) {
            let parts = items(entry);
            let (Some(id), Some(body)) = (parts.first().and_then(|v| text(v)), parts.get(1)) else {
                continue;
            };
            let flat = items(body);
            let fields = flat
                .chunks(2)
                .filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?)))
                .collect();
            out.push((id, fields));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn parses_requests_and_ignores_answers() {
        let r = Request::parse(&fields(&[
            ("type", "refresh"),
            ("tenant", "a"),
            ("provider", "zoom"),
        ]));
        assert_eq!(
            r,
            Ok(Some(Request {
                kind: Kind::Refresh,
                tenant: "a".into(),
                provider: Some("zoom".into()),
                feature: None
            }))
        );
        assert_eq!(Request::parse(&fields(&[("type", "answer")])), Ok(None));
        assert!(Request::parse(&fields(&[("type", "refresh"), ("tenant", "a")])).is_err());
        assert!(Request::parse(&fields(&[("type", "drop"), ("tenant", "a")])).is_err());
        let s = Request::parse(&fields(&[
            ("type", "sync"),
            ("tenant", "a"),
            ("feature", "users"),
        ]));
        assert!(matches!(
            s,
            Ok(Some(Request {
                kind: Kind::Sync,
                provider: None,
                ..
            }))
        ));
    }

    #[test]
    fn exit_codes_are_distinct_where_documented() {
        let codes = [
            Outcome::Ok.exit_code(),
            Outcome::Failed.exit_code(),
            Outcome::BadRequest.exit_code(),
            Outcome::LockBusy.exit_code(),
            Outcome::NotFound.exit_code(),
            Outcome::ReauthRequired.exit_code(),
            exit::NO_ANSWER,
        ];
        assert_eq!(codes, [0, 1, 2, 3, 4, 5, 6]);
        for o in [
            Outcome::Ok,
            Outcome::LockBusy,
            Outcome::NotFound,
            Outcome::ReauthRequired,
            Outcome::Failed,
            Outcome::Unavailable,
            Outcome::Expired,
            Outcome::BadRequest,
        ] {
            assert_eq!(Outcome::parse(o.as_str()), o);
        }
    }

    #[test]
    fn attempts_map_to_outcomes() {
        assert_eq!(Outcome::of_attempt(&Attempt::Locked).0, Outcome::LockBusy);
        assert_eq!(
            Outcome::of_attempt(&Attempt::LockStuck).0,
            Outcome::LockBusy
        );
        assert_eq!(
            Outcome::of_attempt(&Attempt::RecordGone).0,
            Outcome::NotFound
        );
        let permanent = |during_recovery| Attempt::Permanent {
            code: "invalid_grant".into(),
            detail: "revoked".into(),
            during_recovery,
            can_fall_back: false,
        };
        assert_eq!(
            Outcome::of_attempt(&permanent(false)).0,
            Outcome::ReauthRequired
        );
        assert_eq!(Outcome::of_attempt(&permanent(true)).0, Outcome::Failed);
    }

    #[test]
    fn reads_stream_replies_in_both_protocols() {
        use redis::Value as V;
        let b = |s: &str| V::BulkString(s.as_bytes().to_vec());
        let entry = V::Array(vec![
            b("1-0"),
            V::Array(vec![b("type"), b("answer"), b("request"), b("0-1")]),
        ]);
        let resp2 = V::Array(vec![V::Array(vec![
            b("tokenwarden:commands"),
            V::Array(vec![entry.clone()]),
        ])]);
        let resp3 = V::Map(vec![(b("tokenwarden:commands"), V::Array(vec![entry]))]);
        for reply in [resp2, resp3] {
            let e = stream_entries(&reply);
            assert_eq!(e.len(), 1);
            assert_eq!(e[0].0, "1-0");
            assert_eq!(e[0].1.get("request").map(String::as_str), Some("0-1"));
        }
        assert!(stream_entries(&V::Nil).is_empty());
        assert!(stream_entries(&V::Array(vec![V::Int(3)])).is_empty());
    }

    #[test]
    fn entry_ages() {
        let now = chrono::Utc::now().timestamp_millis();
        assert!(entry_age(&format!("{}-0", now - 200_000)).is_some_and(|a| a > MAX_AGE));
        assert!(entry_age(&format!("{now}-3")).is_some_and(|a| a < MAX_AGE));
        assert_eq!(entry_age("garbage"), None);
    }
}
