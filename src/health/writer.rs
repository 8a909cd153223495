//! The health writer: the one task that writes health hashes and events to Redis.
//!
//! The engine hands it [`HealthOp`]s and never waits for them: a health or event write that
//! fails never turns a confirmed refresh into a failure (a wrong-typed `tokenwarden:events`
//! or health key is reported once and skipped, a Redis outage is waited out). Ops are sent in
//! pipelines of up to [`BATCH`]; while Redis cannot be reached they are kept, in order, and
//! retried with backoff; beyond [`MAX_HELD`] the oldest are dropped (health is rewritten by the
//! next decision about the same provider anyway).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use crate::store::Pool;
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::engine::transition::{Event, Health};
use crate::health;
use crate::keys::ProviderId;
use crate::store;

/// Ops per pipeline.
const BATCH: usize = 2_000;
/// Ops kept while Redis is unreachable.
const MAX_HELD: usize = 200_000;

/// One provider's health write and event.
#[derive(Debug)]
pub struct HealthOp {
    pub id: ProviderId,
    pub health: Health,
    pub event: Option<Event>,
}

/// Sends ops to the writer task; never blocks.
#[derive(Debug, Clone)]
pub struct HealthWriter(mpsc::UnboundedSender<HealthOp>);

impl HealthWriter {
    pub fn channel() -> (HealthWriter, mpsc::UnboundedReceiver<HealthOp>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (HealthWriter(tx), rx)
    }

    pub fn send(&self, op: HealthOp) {
        if matches!(op.health, Health::Keep) && op.event.is_none() {
            return;
        }
        let _ = self.0.send(op);
    }
}

/// Adds `op`'s commands to `pipe` with their answers kept (not ignored), so that a refused
/// one can be reported; returns how many.
fn add(pipe: &mut redis::Pipeline, op: &HealthOp, maxlen: usize, guard: health::Guard) -> usize {
    let mut n = 0;
    match &op.health {
        Health::Keep => {}
        Health::Write(h) => n += usize::from(h.add_with(pipe, &op.id, guard)),
        Health::Delete => {
            health::add_delete_with(pipe, &op.id, guard);
            n += 1;
        }
    }
    if let Some(e) = &op.event {
        health::add_event(pipe, maxlen, e.kind, &op.id, e.result, &e.detail);
        n += 1;
    }
    n
}

/// What a refused write means, for the one log line per provider.
fn refusal(v: &Value) -> Option<String> {
    match v {
        Value::ServerError(e) => Some(format!("refused by Redis: {}", e.code())),
        // The health script's answers (src/health/mod.rs GUARDED).
        Value::Int(-1) => Some("the health key holds a gateway record: left alone".into()),
        Value::Int(-2) => Some("the health key is not a hash: left alone".into()),
        _ => None,
    }
}

/// Runs until `stop`, then flushes what it holds for at most `flush` more.
pub async fn run(
    pool: Pool,
    mut rx: mpsc::UnboundedReceiver<HealthOp>,
    maxlen: usize,
    stop: CancellationToken,
    flush: Duration,
) {
    let mut held: VecDeque<HealthOp> = VecDeque::new();
    let mut reported: HashSet<String> = HashSet::new();
    let mut backoff = Duration::from_millis(100);
    let mut stopping_at: Option<tokio::time::Instant> = None;
    loop {
        while let Ok(op) = rx.try_recv() {
            held.push_back(op);
        }
        if stop.is_cancelled() && stopping_at.is_none() {
            stopping_at = Some(tokio::time::Instant::now() + flush);
        }
        if let Some(at) = stopping_at {
            if held.is_empty() || tokio::time::Instant::now() >= at {
                if !held.is_empty() {
                    tracing::warn!(dropped = held.len(), "health writes not sent before exit");
                }
                return;
            }
        }
        if held.is_empty() {
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => held.push_back(op),
                    None => return,
                },
                _ = stop.cancelled() => {}
            }
            continue;
        }
        while held.len() > MAX_HELD {
            held.pop_front();
        }
        let take = held.len().min(BATCH);
        let sent = async {
            let mut conn = store::conn(&pool).await?;
            // On one node the pipeline loads the health script first and calls it by its
            // SHA1: Redis then neither receives nor hashes the script's text per write. A
            // Cluster pipeline is split per node, so there every write carries the text.
            let on_one_node = matches!(conn, store::Connection::Node(_));
            let guard = if on_one_node {
                health::Guard::EvalSha
            } else {
                health::Guard::Eval
            };
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            if on_one_node {
                health::add_script_load(&mut pipe);
            }
            let mut owners: Vec<(usize, usize)> = Vec::with_capacity(take);
            for (i, op) in held.iter().take(take).enumerate() {
                let n = add(&mut pipe, op, maxlen, guard);
                owners.push((i, n));
            }
            let mut values: Vec<Value> = pipe.query_async(&mut conn).await?;
            if on_one_node && !values.is_empty() {
                values.remove(0);
            }
            Ok::<_, store::StoreError>((values, owners))
        }
        .await;
        match sent {
            Ok((values, owners)) => {
                backoff = Duration::from_millis(100);
                let mut it = values.into_iter();
                for (i, n) in owners {
                    for _ in 0..n {
                        let Some(why) = it.next().as_ref().and_then(refusal) else {
                            continue;
                        };
                        if let Some(op) = held.get(i) {
                            let key = format!("{}\n{why}", op.id.health_key());
                            if reported.len() < 10_000 && reported.insert(key) {
                                tracing::error!(
                                    tenant = %op.id.tenant,
                                    provider = %op.id.provider,
                                    "health or event write {why}; health stays in metrics and logs (reported once per provider)"
                                );
                            }
                        }
                    }
                }
                held.drain(..take);
            }
            Err(e) => {
                tracing::debug!(error = %e, held = held.len(), "health writes wait for redis");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled(), if stopping_at.is_none() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
