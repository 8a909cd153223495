//! The daemon (`tokenwarden run`): wires the parts together and owns the one shutdown path.
//!
//! Start: metrics recorder, Redis pool, token client, HTTP listener, then three tasks: the
//! registry follower, the engine, the HTTP server. Signals: SIGHUP reloads the config files
//! (settings marked [restart] are reported, not applied); SIGTERM/SIGINT cancel one
//! `CancellationToken`, so no new refresh starts, then in-flight attempts get
//! `shutdown.drain_deadline_secs` to write back and release their locks. An attempt still
//! running at the deadline is dropped and its lock left to expire.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::context::{replica_id, Command, Context, EngineHandle, Settings, Status};
use crate::fleet::SharedFleet;
use crate::refresh::client::TokenClient;
use crate::signals::{self, Event};
use crate::store::{self, StoreError};
use crate::telemetry::logging::LogHandle;
use crate::telemetry::metrics as m;
use crate::{engine, health, http, registry};

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
}

/// Builds the shared context; the receiver feeds the engine.
pub fn context(
    config: Config,
) -> Result<(Arc<Context>, mpsc::UnboundedReceiver<Command>), DaemonError> {
    let pool = store::pool(&config.redis)?;
    let ca = match config.ca_path() {
        Some(p) => Some(
            std::fs::read(&p)
                .map_err(|e| DaemonError::Setup(format!("refresh.ca_file {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let client = TokenClient::new(
        Duration::from_secs(config.refresh.http_timeout_secs),
        Duration::from_secs(config.refresh.connect_timeout_secs),
        ca.as_deref(),
        config.refresh.max_response_bytes,
    )
    .map_err(DaemonError::Setup)?;
    let (engine, rx) = EngineHandle::channel();
    let ctx = Context {
        settings: Settings::new(config),
        pool,
        client,
        fleet: SharedFleet::default(),
        replica: replica_id(),
        status: Status::default(),
        engine,
    };
    ctx.status.beat();
    Ok((Arc::new(ctx), rx))
}

/// Runs until SIGTERM/SIGINT, then drains.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    log: LogHandle,
) -> Result<(), DaemonError> {
    let prometheus = m::install();
    let addr = config.listen_addr();
    let redis_url = store::redact_url(&config.redis.url);
    let drain = Duration::from_secs(config.shutdown.drain_deadline_secs);
    let (ctx, commands) = context(config)?;
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

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        Arc::clone(&ctx),
        prometheus.clone(),
        cancel.clone(),
    ));
    let follow_task = tokio::spawn(registry::follow::run(Arc::clone(&ctx), cancel.clone()));
    let probe_task = tokio::spawn(health::probe::run(Arc::clone(&ctx), cancel.clone()));
    let engine_task = tokio::spawn(engine::run(
        Arc::clone(&ctx),
        commands,
        tracker.clone(),
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
        reload(&ctx, config_path.as_deref(), &log);
    }

    let drain = ctx
        .config()
        .shutdown
        .drain_deadline_secs
        .min(drain.as_secs());
    tracing::info!(
        drain_deadline_secs = drain,
        in_flight = tracker.len(),
        "shutting down: no new refreshes; draining in-flight ones"
    );
    cancel.cancel();
    tracker.close();
    let drained = tokio::time::timeout(Duration::from_secs(drain), tracker.wait()).await;
    match drained {
        Ok(()) => tracing::info!("drained: every in-flight refresh finished"),
        Err(_) => tracing::warn!(
            abandoned = tracker.len(),
            "drain deadline passed: abandoned refreshes leave their locks to expire"
        ),
    }
    for t in [http_task, follow_task, engine_task, probe_task, upkeep] {
        t.abort();
    }
    tracing::info!("tokenwarden stopped");
    Ok(())
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
