//! tokenwarden keeps the OAuth tokens of a multi-tenant communications gateway alive.
//!
//! The gateway keeps one Redis record per tenant and provider (GoTo Connect, Microsoft
//! Teams, RingCentral, Zoom, ...). tokenwarden follows that registry, refreshes every active
//! token ahead of its expiry at the provider's token endpoint, writes the new tokens back
//! with a compare-and-set so that a rotated refresh token is never lost, records health into
//! Redis, and exports Prometheus metrics. Several replicas may run against one Redis: a
//! per-provider lock makes sure only one refreshes a given token.
//!
//! # Layout
//! - [`config`]: typed settings, layering (defaults file, operator's file, environment),
//!   validation; [`catalog`]: per provider type, how to get a token.
//! - [`keys`]: every Redis key name; [`store`]: the connection pool.
//! - [`registry`]: reading the gateway's records (`SCAN`, pipelines, parsing, change
//!   detection) and following them ([`registry::follow`]).
//! - [`fleet`]: what this replica knows of each provider, in memory.
//! - [`schedule`]: when to refresh ([`schedule::policy`]) and the deadline queue;
//!   [`engine`]: the task that owns the deadlines and starts due refreshes.
//! - [`refresh`]: one attempt (lock, token call, write-back, outcome); [`lock`]: the
//!   per-provider lock; [`retry`]: backoff and `Retry-After`.
//! - [`engine::transition`]: the one pure function that decides what every event means;
//!   [`engine`]: the one task that applies it.
//! - [`journal`]: rotated tokens on disk until Redis has them; [`refresh::replay`] replays them.
//! - [`replica`]: Redis liveness (ping), this replica's heartbeat; [`ownership`]: which live
//!   replica serves which tenant.
//! - [`health`]: the health hash and the event stream ([`health::writer`] writes them).
//! - [`telemetry`]: logs and metrics; [`http`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`signals`], [`daemon`]: signals, start, reload and the one shutdown path;
//!   [`notify`]: systemd's notify protocol and watchdog.
//! - [`sync`]: the data sync (per-tenant schedules, strategies, paged fetches, normalised
//!   records, atomic replaces, the unified directory).
//! - [`cli`], [`status`]: the command line; [`commands`]: operator requests to the running
//!   replicas (`tokenwarden:commands`) and their answers.
//! - [`timestamp`], [`secret`], [`text`]: value formats of the gateway's records, secrets that
//!   cannot be printed, outside text made safe to print; [`allocator`]: the memory allocator.

pub mod allocator;
pub mod catalog;
pub mod cli;
pub mod commands;
pub mod config;
pub mod context;
pub mod daemon;
pub mod engine;
pub mod fleet;
pub mod health;
pub mod http;
pub mod journal;
pub mod keys;
pub mod lock;
pub mod notify;
pub mod ownership;
pub mod refresh;
pub mod registry;
pub mod replica;
pub mod retry;
pub mod schedule;
pub mod secret;
pub mod signals;
pub mod status;
pub mod store;
pub mod sync;
pub mod telemetry;
pub mod text;
pub mod timestamp;
