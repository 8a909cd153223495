//! The daemon (`tokenwarden run`): wires the parts together and owns the one shutdown path.
//!
//! Start: metrics recorder, journal, Redis pool, token client, HTTP listener, then the tasks:
//! the registry follower, the engine, the health probes, the health writer, the replayer of
//! held answers, the Redis ping and heartbeat, the operator commands, the HTTP server.
//! Signals: SIGHUP reloads the config files (settings marked [restart] are reported, not
//! applied); SIGTERM/SIGINT cancel one
//! `CancellationToken`, so no new refresh starts, then in-flight attempts get
//! `shutdown.drain_deadline_secs` to write back and release their locks, the replayer keeps
//! trying to write back held answers until the same deadline (what is left stays in the
//! journal, logged entry by entry), the engine applies the last outcomes and the health
//! writer flushes. An attempt still running at the deadline is dropped and its lock left to
//! expire.
//!
//! Under systemd (SPEC 6) it sends `READY=1` once the first registry scan is done,
//! `RELOADING=1`/`READY=1` around a reload, `STOPPING=1` on SIGTERM, a `STATUS=` line, and
//! `WATCHDOG=1` while the engine loop's heartbeat is younger than `http.stuck_after_secs`
//! (the bound `/healthz` uses), whatever Redis does ([`systemd_notify`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::context::{replica_id, stable_replica_id, Context, EngineHandle, Settings, Status};
use crate::engine::Msg;
use crate::fleet::SharedFleet;
use crate::health::writer::{HealthOp, HealthWriter};
use crate::journal::{self, Journal, JournalKeys};
use crate::notify::{self, Notifier};
use crate::ownership::Membership;
use crate::refresh::client::TokenClient;
use crate::refresh::replay::{self, Replayer};
use crate::signals::{self, Event};
use crate::store::{self, StoreError};
use crate::telemetry::logging::LogHandle;
use crate::telemetry::metrics as m;
use crate::{commands, engine, health, http, registry, replica};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("journal: {0}")]
    Journal(String),
}

/// After the drain deadline: the health writer's last flush, then the heartbeat's and the
/// command reader's ends. The process exits at most [`FLUSH_MARGIN_SECS`] after the deadline,
/// so stop timeouts (systemd `TimeoutStopSec`, Kubernetes `terminationGracePeriodSeconds`)
/// must be at least `shutdown.drain_deadline_secs` + this (scripts/check-deploy.sh checks it).
const WRITER_FLUSH: Duration = Duration::from_secs(3);
const TASK_STOP: Duration = Duration::from_secs(1);
pub const FLUSH_MARGIN_SECS: u64 = WRITER_FLUSH.as_secs() + 2 * TASK_STOP.as_secs();

/// What [`context`] returns besides the context: the receivers of the engine and of the
/// health writer.
pub struct Inboxes {
    pub engine: mpsc::UnboundedReceiver<Msg>,
    pub health: mpsc::UnboundedReceiver<HealthOp>,
}

/// Opens the journal of `config` (`journal.state_dir`, `journal.key_file`).
pub fn open_journal(config: &Config) -> Result<Journal, DaemonError> {
    let keys = match config.journal_key_path() {
        Some(p) => Some(JournalKeys::load(&p).map_err(|e| DaemonError::Journal(e.to_string()))?),
        None => None,
    };
    let dir = journal::dir_in(&config.state_dir());
    Journal::open(&dir, keys).map_err(|e| DaemonError::Journal(format!("{}: {e}", dir.display())))
}

/// Builds the shared context, with the journal when `journal` is given.
pub fn context(
    config: Config,
    journal: Option<Journal>,
) -> Result<(Arc<Context>, Inboxes), DaemonError> {
    context_as(config, journal, replica_id())
}

/// As [`context`], with this replica's id given (the daemon keeps its id in the state
/// directory: [`stable_replica_id`]).
pub fn context_as(
    config: Config,
    journal: Option<Journal>,
    replica: String,
) -> Result<(Arc<Context>, Inboxes), DaemonError> {
    let pool = store::pool(&config.redis)?;
    let ca = match config.ca_path() {
        Some(p) => Some(
            std::fs::read(&p)
                .map_err(|e| DaemonError::Setup(format!("refresh.ca_file {}: {e}", p.display())))?,
        ),
        None => None,
    };
    // The request timeout is the longest wait for an answer once a request was sent; the
    // refresh path warns at http_timeout_secs and keeps waiting (see `refresh`).
    let client = TokenClient::new(
        Duration::from_secs(config.refresh.response_timeout_secs),
        Duration::from_secs(config.refresh.connect_timeout_secs),
        ca.as_deref(),
        config.refresh.max_response_bytes,
    )
    .map_err(DaemonError::Setup)?;
    let (engine, engine_rx) = EngineHandle::channel();
    let (health, health_rx) = HealthWriter::channel();
    let membership = Membership::new(&replica, config.replica.share_fleet);
    let ctx = Context {
        settings: Settings::new(config),
        pool,
        client,
        fleet: SharedFleet::default(),
        replica,
        status: Status::default(),
        engine,
        health,
        journal,
        replayer: Replayer::default(),
        membership,
        echoes: Default::default(),
    };
    ctx.status.beat();
    Ok((
        Arc::new(ctx),
        Inboxes {
            engine: engine_rx,
            health: health_rx,
        },
    ))
}

/// Runs until SIGTERM/SIGINT, then drains.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> Result<(), DaemonError> {
    let prometheus = m::install();
    let addr = config.listen_addr();
    let redis_url = store::describe(&config.redis);
    let drain = Duration::from_secs(config.shutdown.drain_deadline_secs);
    let journal = open_journal(&config)?;
    journal::log_key_status(&journal);
    let maxlen = config.events.stream_maxlen;
    let replica = stable_replica_id(&config.state_dir());
    let (ctx, inboxes) = context_as(config, Some(journal), replica)?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: addr.to_string(),
            source,
        })?;
    let mut signals = signals::listen().map_err(|e| DaemonError::Setup(format!("signals: {e}")))?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        replica = %ctx.replica,
        redis = %redis_url,
        listen = %addr,
        "tokenwarden starting"
    );
    replay::load_journal(&ctx);

    // One token stops starting work; the others end the tasks that finish it, in order.
    let cancel = CancellationToken::new();
    let replay_stop = CancellationToken::new();
    let engine_stop = CancellationToken::new();
    let writer_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        Arc::clone(&ctx),
        prometheus.clone(),
        cancel.clone(),
    ));
    let follow_task = tokio::spawn(registry::follow::run(Arc::clone(&ctx), cancel.clone()));
    let probe_task = tokio::spawn(health::probe::run(Arc::clone(&ctx), cancel.clone()));
    let replica_task = tokio::spawn(replica::run(Arc::clone(&ctx), writer_stop.clone()));
    let replay_task = tokio::spawn(replay::run(Arc::clone(&ctx), replay_stop.clone()));
    let failover_task = tokio::spawn(crate::refresh::failover::run(
        Arc::clone(&ctx),
        cancel.clone(),
    ));
    // Until the end: the journal drain at shutdown writes to the master too.
    let sentinel_task = tokio::spawn(crate::store::follow_sentinels(
        ctx.pool.clone(),
        writer_stop.clone(),
    ));
    let writer_task = tokio::spawn(health::writer::run(
        ctx.pool.clone(),
        inboxes.health,
        maxlen,
        writer_stop.clone(),
        Duration::from_secs(2),
    ));
    let engine_task = tokio::spawn(engine::run(
        Arc::clone(&ctx),
        inboxes.engine,
        tracker.clone(),
        cancel.clone(),
        engine_stop.clone(),
    ));
    // `tokenwarden sync` requests reach the data sync through this hook.
    let sync_hook: Option<Arc<dyn commands::SyncHook>> =
        Some(Arc::new(crate::sync::run::CommandHook(Arc::clone(&ctx))));
    let commands_task = tokio::spawn(commands::run(Arc::clone(&ctx), sync_hook, cancel.clone()));
    let sync_task = tokio::spawn(crate::sync::run(Arc::clone(&ctx), cancel.clone()));
    let notifier = Notifier::from_env();
    let notify_task = tokio::spawn(systemd_notify(
        Arc::clone(&ctx),
        notifier.clone(),
        cancel.clone(),
    ));
    let upkeep_cancel = cancel.clone();
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = upkeep_cancel.cancelled() => return,
                _ = every.tick() => prometheus.run_upkeep(),
            }
        }
    });

    while let Some(Event::Reload) = signals.recv().await {
        notifier.reloading();
        reload(&ctx, config_path.as_deref(), &log);
        // Also after a refused reload: the running configuration is in force.
        notifier.ready();
    }
    notifier.stopping();

    let drain = ctx
        .config()
        .shutdown
        .drain_deadline_secs
        .min(drain.as_secs());
    tracing::info!(
        drain_deadline_secs = drain,
        in_flight = tracker.len(),
        held = ctx.replayer.len(),
        "shutting down: no new refreshes; draining in-flight ones"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(drain);
    cancel.cancel();
    tracker.close();
    let drained = tokio::time::timeout_at(deadline, tracker.wait()).await;
    match drained {
        Ok(()) => tracing::info!("drained: every in-flight refresh finished"),
        Err(_) => tracing::warn!(
            abandoned = tracker.len(),
            "drain deadline passed: abandoned refreshes leave their locks to expire"
        ),
    }
    // Sync runs stop between pages or finish; the task bounds its own wait by the drain.
    let _ = tokio::time::timeout_at(deadline, sync_task).await;
    replay_stop.cancel();
    let _ = replay_task.await;
    replay::drain(&ctx, deadline).await;
    engine_stop.cancel();
    let _ = engine_task.await;
    writer_stop.cancel();
    let _ = tokio::time::timeout(WRITER_FLUSH, writer_task).await;
    let _ = tokio::time::timeout(TASK_STOP, replica_task).await;
    let _ = tokio::time::timeout(TASK_STOP, commands_task).await;
    for t in [
        http_task,
        follow_task,
        probe_task,
        upkeep,
        notify_task,
        failover_task,
        sentinel_task,
    ] {
        t.abort();
    }
    tracing::info!("tokenwarden stopped");
    Ok(())
}

/// systemd's side of the daemon: `READY=1` after the first registry scan, then `WATCHDOG=1`
/// every `WATCHDOG_USEC`/2 while the engine loop has turned within `http.stuck_after_secs`
/// (a stuck loop stops the pings and systemd restarts the service; Redis being down does
/// not), and the `STATUS=` line whenever it changes. Does nothing outside systemd.
async fn systemd_notify(ctx: Arc<Context>, notifier: Notifier, cancel: CancellationToken) {
    if !notifier.enabled() {
        return;
    }
    let watchdog = notifier.watchdog_interval();
    let mut every = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(5)));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = false;
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ctx.status.first_scan_done(), if !ready => {
                ready = true;
                last_status = status_line(&ctx);
                notifier.status(&last_status);
                notifier.ready();
                tracing::info!("first registry scan done: notified systemd (READY=1)");
            }
            _ = every.tick() => {
                let bound_ms = i64::try_from(ctx.config().http.stuck_after_secs)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000);
                let since = ctx.status.since_heartbeat_ms();
                if watchdog.is_some() {
                    if since < bound_ms {
                        notifier.watchdog();
                    } else {
                        tracing::error!(
                            since_heartbeat_ms = since,
                            "engine loop stuck: withholding the systemd watchdog ping"
                        );
                    }
                }
                if ready {
                    let line = status_line(&ctx);
                    if line != last_status {
                        notifier.status(&line);
                        last_status = line;
                    }
                }
            }
        }
    }
}

fn status_line(ctx: &Context) -> String {
    let providers = ctx.fleet.read().providers.len();
    notify::status_line(
        providers,
        ctx.status.redis_up(),
        ctx.status
            .journal_pending
            .load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn reload(ctx: &Context, path: Option<&std::path::Path>, log: &LogHandle) {
    let current = ctx.config();
    match Config::load(path) {
        Err(e) => tracing::error!(error = %e, "reload refused: keeping the running configuration"),
        Ok(next) => {
            let restart = current.restart_only_changes(&next);
            if !restart.is_empty() {
                tracing::warn!(settings = ?restart, "these settings changed but take effect only after a restart");
            }
            if let Err(e) = log.set_level(&next.log.level) {
                tracing::warn!(error = %e, "log level not changed");
            }
            ctx.settings.replace(next);
            tracing::info!("configuration reloaded");
        }
    }
}
