//! Provider request budgets, held in Redis so that every replica spends the same one.
//!
//! A budget (`token_budget` / `api_budget` in the catalog) allows `requests` calls per
//! `per_secs`, counted by record, client id or account key. It is a GCRA kept in one Redis
//! hash per budget ([`crate::keys::budget_key`]), changed only by [`SCRIPT`] on Redis's own
//! clock:
//! - `tat`: the theoretical arrival time (ms) of the next free slot. Calls are spaced at
//!   least `per / requests` apart (plus a 10% margin, at least 50 ms, for the time between the slot and the request's
//!   arrival, which varies by tens of milliseconds), so
//!   no window of `per` ever holds more than `requests` calls;
//! - `penalty_until`: after a 429, no call is sent before it (the provider's `Retry-After`,
//!   else one `per`).
//!
//! [`try_take_all`] takes slots only where one is free now (health probes skip, they do not wait).
//! [`take`] asks for a slot: `Go` now, or `Wait(d)` with a slot reserved `d` from now. The
//! caller comes back then holding the slot (a ticket) and is let through without a new
//! reservation unless a penalty began meanwhile. Reserving in the order callers ask keeps
//! tokens of one budget that fall due together in deadline order, spread one slot apart.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::catalog::{Budget, BudgetScope};
use crate::keys::{self, ProviderId};
use crate::store::Connection;

/// `KEYS[1]` the budget; `ARGV`: mode (`take` | `try` | `penalize`), interval ms, ticket ms (Unix
/// time of a held slot, 0 = none), penalty ms, key expiry ms. Returns the wait in ms (0 = go).
pub const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[2])
local keep = tonumber(ARGV[5])
local tat = tonumber(redis.call('HGET', KEYS[1], 'tat') or '0') or 0
local penalty = tonumber(redis.call('HGET', KEYS[1], 'penalty_until') or '0') or 0
if ARGV[1] == 'penalize' then
  local p = now + tonumber(ARGV[4])
  if p > penalty then penalty = p end
  if tat < penalty then tat = penalty end
  redis.call('HSET', KEYS[1], 'tat', tat, 'penalty_until', penalty)
  redis.call('PEXPIRE', KEYS[1], (tat - now) + keep)
  return 0
end
if ARGV[1] == 'try' then
  local slot = math.max(tat, now, penalty)
  if slot > now then return slot - now end
  redis.call('HSET', KEYS[1], 'tat', now + interval)
  redis.call('PEXPIRE', KEYS[1], interval + keep)
  return 0
end
if penalty > now then
  local slot = math.max(tat, penalty)
  redis.call('HSET', KEYS[1], 'tat', slot + interval)
  redis.call('PEXPIRE', KEYS[1], (slot + interval - now) + keep)
  return slot - now
end
local ticket = tonumber(ARGV[3])
if ticket > 0 and ticket >= now - 60000 and ticket <= now + 5000 then
  if ticket <= now + 20 then return 0 end
  return ticket - now
end
local slot = math.max(tat, now)
redis.call('HSET', KEYS[1], 'tat', slot + interval)
redis.call('PEXPIRE', KEYS[1], (slot + interval - now) + keep)
return slot - now
";

/// What a budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Go,
    /// A slot is reserved this far ahead: come back then with it.
    Wait(Duration),
}

/// The Redis key of a budget for one record.
pub fn key(
    kind: &str,
    budget: &Budget,
    id: &ProviderId,
    provider_type: &str,
    client_id: &str,
    account_key: &str,
) -> String {
    let value = match budget.scope {
        BudgetScope::Record => format!("{}:{}", id.tenant, id.provider),
        BudgetScope::ClientId => client_id.to_string(),
        BudgetScope::AccountKey => account_key.to_string(),
    };
    keys::budget_key(kind, provider_type, budget.scope.as_str(), &value)
}

/// Spacing between calls of a budget, with the jitter margin.
pub fn interval(budget: &Budget) -> Duration {
    let base = budget.per / budget.requests.max(1);
    base + (base / 10).max(Duration::from_millis(50))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Asks for a slot, presenting the one held (`ticket`) if any.
pub async fn take(
    conn: &mut Connection,
    key: &str,
    budget: &Budget,
    ticket: Option<DateTime<Utc>>,
) -> Result<Slot, redis::RedisError> {
    let ticket_ms = ticket.map_or(0, |t| t.timestamp_millis().max(0));
    let wait: i64 = redis::Script::new(SCRIPT)
        .key(key)
        .arg("take")
        .arg(ms(interval(budget)))
        .arg(ticket_ms)
        .arg(0)
        .arg(ms(budget.per))
        .invoke_async(conn)
        .await?;
    Ok(slot_of(wait))
}

/// The script's answer: the wait in ms, 0 = go.
fn slot_of(wait: i64) -> Slot {
    match u64::try_from(wait) {
        Ok(0) | Err(_) => Slot::Go,
        Ok(w) => Slot::Wait(Duration::from_millis(w)),
    }
}

/// For each `(key, budget)`, a slot now or nothing: `Go` (the slot taken), or `Wait(d)`
/// with nothing reserved, for calls that are skipped rather than delayed (health probes: the
/// next round asks again). One pipeline for all of them, in order.
pub async fn try_take_all(
    conn: &mut Connection,
    asks: &[(&str, &Budget)],
) -> Result<Vec<Slot>, redis::RedisError> {
    if asks.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (key, budget) in asks {
        pipe.cmd("EVAL")
            .arg(SCRIPT)
            .arg(1)
            .arg(*key)
            .arg("try")
            .arg(ms(interval(budget)))
            .arg(0)
            .arg(0)
            .arg(ms(budget.per));
    }
    let waits: Vec<i64> = pipe.query_async(conn).await?;
    Ok(waits.into_iter().map(slot_of).collect())
}

/// A 429: no call of this budget before `retry_after` (else one period) has passed.
pub async fn penalize(
    conn: &mut Connection,
    key: &str,
    budget: &Budget,
    retry_after: Option<Duration>,
) -> Result<(), redis::RedisError> {
    let penalty = retry_after
        .unwrap_or(budget.per)
        .min(Duration::from_secs(86_400));
    let _: i64 = redis::Script::new(SCRIPT)
        .key(key)
        .arg("penalize")
        .arg(ms(interval(budget)))
        .arg(0)
        .arg(ms(penalty))
        .arg(ms(budget.per))
        .invoke_async(conn)
        .await?;
    Ok(())
}
