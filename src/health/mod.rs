//! The health hash `tenant:{t}:provider:{p}:health` and the `tokenwarden:events` stream
//! (SPEC 2): what the gateway and operators read about each provider.
//!
//! Writers add commands to a pipeline so that a refresh outcome, its health entry and its
//! event go to Redis in one round trip. Only fields this replica knows are written, so one
//! replica's registry view never blanks another's refresh history. [`probe`] checks each
//! provider's API.
//!
//! Every write or delete of a health hash goes through one script ([`GUARDED`]) that leaves
//! the key alone when it holds a gateway record (a provider named `goto:health` has the key
//! `goto`'s health hash would have, SPEC 1.3) or is not a hash: tokenwarden never writes or
//! deletes a gateway record; `goto`'s health is then in metrics and logs only.

pub mod probe;
pub mod writer;

use chrono::{DateTime, Utc};
use redis::{Pipeline, Value};

use crate::fleet::Tracked;
use crate::keys::{ProviderId, EVENTS_STREAM};
use crate::store::resp::Reply;
use crate::timestamp::iso_utc;

/// Fields of one health update.
#[derive(Debug, Default)]
pub struct HealthUpdate {
    fields: Vec<(&'static str, String)>,
    /// Written only where the hash has no value yet (`HSETNX`).
    if_absent: Vec<(&'static str, String)>,
}

impl HealthUpdate {
    /// State, reason, expiry, next refresh and failure count from `t`.
    pub fn from_tracked(t: &Tracked, failing_after: u32, now: DateTime<Utc>) -> HealthUpdate {
        let mut u = HealthUpdate::default();
        u.set("state", t.state(failing_after).as_str());
        u.set("reason", t.reason());
        u.set(
            "token_expiry",
            t.token_expiry.map(iso_utc).unwrap_or_default(),
        );
        u.set(
            "next_refresh_at",
            t.next_refresh.map(iso_utc).unwrap_or_default(),
        );
        u.set("consecutive_failures", t.consecutive_failures.to_string());
        u.set("updated_at", iso_utc(now));
        u
    }

    pub fn set(&mut self, field: &'static str, value: impl Into<String>) -> &mut Self {
        self.fields.retain(|(f, _)| *f != field);
        self.fields.push((field, value.into()));
        self
    }

    /// The outcome of a refresh attempt.
    pub fn attempt(&mut self, at: DateTime<Utc>, result: &str, error: Option<&str>) -> &mut Self {
        self.set("last_refresh_result", result);
        self.set("last_error", error.unwrap_or(""));
        if error.is_none() {
            self.set("last_refresh_at", iso_utc(at));
        }
        self
    }

    pub fn fields(&self) -> &[(&'static str, String)] {
        &self.fields
    }

    /// Whether writing this update over `stored` would change anything but `updated_at`
    /// (the stamp of a change, not a change). A field [`STORED_FIELDS`] leaves out counts as
    /// a change: nothing is known about it.
    pub fn changes(&self, stored: &StoredHealth) -> bool {
        self.fields
            .iter()
            .filter(|(f, _)| *f != "updated_at")
            .any(|(f, v)| stored.field(f) != Some(Some(v.as_str())))
            || self
                .if_absent
                .iter()
                .any(|(f, _)| !matches!(stored.field(f), Some(Some(_))))
    }

    /// Sets `field` only where the health hash has none (another replica's word stands).
    pub fn set_if_absent(&mut self, field: &'static str, value: impl Into<String>) -> &mut Self {
        self.if_absent.push((field, value.into()));
        self
    }

    /// Commands [`HealthUpdate::add_to`] adds to a pipeline.
    pub fn command_count(&self) -> usize {
        usize::from(!self.fields.is_empty() || !self.if_absent.is_empty())
    }

    pub fn add_to(&self, pipe: &mut Pipeline, id: &ProviderId) {
        if self.add_with(pipe, id, Guard::Eval) {
            pipe.ignore();
        }
    }

    /// As [`HealthUpdate::add_to`], the script called as `guard` says and its answer kept;
    /// `false` when there was nothing to write (no command added).
    pub fn add_with(&self, pipe: &mut Pipeline, id: &ProviderId, guard: Guard) -> bool {
        if self.fields.is_empty() && self.if_absent.is_empty() {
            return false;
        }
        let cmd = guard
            .call(pipe)
            .arg(1)
            .arg(id.health_key())
            .arg("set")
            .arg(self.if_absent.len());
        for (f, v) in self.if_absent.iter().chain(&self.fields) {
            cmd.arg(*f).arg(v);
        }
        true
    }
}

/// The health fields read with a record the engine does not know yet, so that a restart
/// leaves a health hash that already says the same alone ([`HealthUpdate::changes`]).
pub const STORED_FIELDS: [&str; 5] = [
    "state",
    "reason",
    "token_expiry",
    "next_refresh_at",
    "consecutive_failures",
];

/// What a health hash held of [`STORED_FIELDS`] (`HMGET`), in that order. Never trusted:
/// a value that is not UTF-8 counts as absent, and each is only compared or parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredHealth([Option<Box<str>>; 5]);

impl StoredHealth {
    /// From an `HMGET` answer of [`STORED_FIELDS`]; `None` for an error (a key that is not
    /// a hash), a malformed answer or a hash with none of them.
    pub fn from_value(v: Value) -> Option<StoredHealth> {
        let Value::Array(items) = v else {
            return None;
        };
        StoredHealth::from_values(items.iter().map(|item| match item {
            Value::BulkString(b) => Some(b.as_slice()),
            _ => None,
        }))
    }

    /// As [`StoredHealth::from_value`], from a reply read in place (the bulk sockets).
    pub fn from_reply(reply: Reply<'_>) -> Option<StoredHealth> {
        let Reply::Array(items) = reply else {
            return None;
        };
        StoredHealth::from_values(items.map(|item| match item {
            Reply::Bulk(b) => Some(b),
            _ => None,
        }))
    }

    fn from_values<'a>(
        values: impl ExactSizeIterator<Item = Option<&'a [u8]>>,
    ) -> Option<StoredHealth> {
        if values.len() != STORED_FIELDS.len() {
            return None;
        }
        let mut out = StoredHealth::default();
        for (slot, value) in out.0.iter_mut().zip(values) {
            *slot = value
                .and_then(|b| std::str::from_utf8(b).ok())
                .map(Box::from);
        }
        out.0.iter().any(Option::is_some).then_some(out)
    }

    /// From field/value pairs (tests, tools).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> StoredHealth {
        let mut out = StoredHealth::default();
        for (f, v) in pairs {
            let slot = STORED_FIELDS
                .iter()
                .position(|s| *s == f)
                .and_then(|i| out.0.get_mut(i));
            if let Some(slot) = slot {
                *slot = Some(v.into());
            }
        }
        out
    }

    /// `None`: not a stored field; `Some(None)`: absent.
    fn field(&self, name: &str) -> Option<Option<&str>> {
        let i = STORED_FIELDS.iter().position(|f| *f == name)?;
        self.0.get(i).map(|v| v.as_deref())
    }

    /// The stored `next_refresh_at`, when the stored `token_expiry` is `expiry`'s: the plan a
    /// previous process made for this same token (the caller checks it against its policy).
    pub fn plan_for(&self, expiry: DateTime<Utc>) -> Option<DateTime<Utc>> {
        if self.field("token_expiry")?? != iso_utc(expiry) {
            return None;
        }
        let next = self.field("next_refresh_at")??;
        crate::timestamp::parse(next).ok().map(|t| t.at)
    }
}

/// Appends an event to `tokenwarden:events`, capped at about `maxlen` entries. Its answer
/// is kept: a caller that does not read it follows with `pipe.ignore()`.
pub fn add_event(
    pipe: &mut Pipeline,
    maxlen: usize,
    kind: &str,
    id: &ProviderId,
    result: &str,
    detail: &str,
) {
    pipe.cmd("XADD")
        .arg(EVENTS_STREAM)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen.max(1))
        .arg("*")
        .arg("type")
        .arg(kind)
        .arg("tenant")
        .arg(&*id.tenant)
        .arg("provider")
        .arg(&*id.provider)
        .arg("result")
        .arg(result)
        .arg("detail")
        .arg(detail);
}

/// Deletes the health hash of a provider that left the registry.
pub fn add_delete(pipe: &mut Pipeline, id: &ProviderId) {
    add_delete_with(pipe, id, Guard::Eval);
    pipe.ignore();
}

/// As [`add_delete`], the script called as `guard` says and its answer kept.
pub fn add_delete_with(pipe: &mut Pipeline, id: &ProviderId, guard: Guard) {
    guard
        .call(pipe)
        .arg(1)
        .arg(id.health_key())
        .arg("del")
        .arg(0);
}

/// How a pipeline calls [`GUARDED`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// `EVAL` with the script's text: always works, and Redis hashes the text at every call.
    Eval,
    /// `EVALSHA`: for a pipeline on one node that starts with [`add_script_load`], so the
    /// script is there whatever happened to the server's script cache.
    EvalSha,
}

impl Guard {
    fn call(self, pipe: &mut Pipeline) -> &mut Pipeline {
        match self {
            Guard::Eval => pipe.cmd("EVAL").arg(GUARDED),
            Guard::EvalSha => pipe.cmd("EVALSHA").arg(guarded_sha()),
        }
    }
}

/// The SHA1 of [`GUARDED`], as `SCRIPT LOAD` answers it.
pub fn guarded_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| sha1_smol::Sha1::from(GUARDED).digest().to_string())
}

/// `SCRIPT LOAD` of [`GUARDED`]: one command, whose answer is the script's SHA1.
pub fn add_script_load(pipe: &mut Pipeline) {
    pipe.cmd("SCRIPT").arg("LOAD").arg(GUARDED);
}

/// The one way a health hash is written or deleted. KEYS[1] the health key; ARGV[1] `set` or
/// `del`; ARGV[2] how many field/value pairs follow that are set only where absent; then
/// those pairs, then the pairs to set. Returns 1 done, 0 nothing to delete, -1 the key holds
/// a gateway record, -2 the key is not a hash (both left alone).
pub const GUARDED: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t == 'none' then
  if ARGV[1] == 'del' then return 0 end
elseif t ~= 'hash' then
  return -2
else
  local g = redis.call('HMGET', KEYS[1], 'provider_type', 'client_id', 'client_secret', 'refresh_token', 'auth_type')
  for _, v in ipairs(g) do
    if v then return -1 end
  end
end
if ARGV[1] == 'del' then return redis.call('DEL', KEYS[1]) end
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  i = i + 2
end
if i <= #ARGV then redis.call('HSET', KEYS[1], unpack(ARGV, i)) end
return 1
"#;
