//! The command line (SPEC 3): `run`, `status`, `refresh`, `sync`, `check-config`,
//! `journal list|replay`.
//!
//! `refresh` and `sync` are requests to the running replicas through the stream
//! `tokenwarden:commands` ([`crate::commands`]), answered there; `refresh --local` runs the
//! refresh in this process instead. Exit codes ([`crate::commands::exit`]): 0 ok, 1 runtime
//! failure, 2 bad configuration or arguments, 3 lock busy, 4 not found, 5 re-authorisation
//! required, 6 no replica answered.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::commands::{self, exit, Kind, Outcome, Request, SendError};
use crate::config::Config;
use crate::engine::transition::{Attempt, Input, Policies};
use crate::health::writer::HealthOp;
use crate::journal::{self, Journal, JournalKeys};
use crate::keys::ProviderId;
use crate::refresh::{self, replay, Plan, Trigger};
use crate::telemetry::logging;
use crate::{daemon, engine, health, status, store};

/// Exit code of `refresh` for a provider that is not in the registry.
pub const EXIT_NOT_FOUND: u8 = exit::NOT_FOUND;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  runtime failure (Redis unreachable, the provider down or answering nonsense, ...)
  2  bad configuration or arguments
  3  lock busy: another replica (or the gateway) is refreshing this provider now; try again
     in a few seconds
  4  not found: the provider is not in the registry (tenant:T:providers and its record);
     nothing is written
  5  re-authorisation required: the provider refused the grant for good (invalid_grant,
     ...); a human must re-connect the account in the gateway
  6  no replica answered: no daemon is running (refresh: use --local --state-dir DIR), or
     none answered within --timeout";

const REFRESH_HELP: &str = "\
Examples:
  tokenwarden refresh --tenant acme --provider zoom --wait
      ask the running daemon to refresh now and print its answer
  tokenwarden refresh --tenant acme --provider zoom
      only send the request; prints its id (the answer is in the tokenwarden:commands stream)
  tokenwarden refresh --tenant acme --provider zoom --local --state-dir /var/lib/tokenwarden-cli
      no daemon running: refresh in this process (same lock, journal and write-back)

Exit codes:
  0  ok (with --wait: refreshed and written back; without: the request was sent)
  1  runtime failure (Redis unreachable, the provider down, the answer held in a journal)
  2  bad configuration or arguments
  3  lock busy: another replica (or the gateway) is refreshing this provider now; try again
  4  not found: the provider is not in the registry; nothing is written
  5  re-authorisation required: a human must re-connect the account in the gateway
  6  no replica answered (none running: use --local; or none within --timeout)";

const SYNC_HELP: &str = "\
Examples:
  tokenwarden sync --tenant acme --wait
  tokenwarden sync --tenant acme --provider teams --feature users --wait

The running daemon answers with one line per provider and feature. A build without the
data sync answers \"sync is not available in this build\" (exit 1).

Exit codes: 0 ok, 1 a run failed or sync is not available, 2 bad arguments, 6 no replica
answered.";

/// The default config file, used when it exists and no other is named.
pub const DEFAULT_CONFIG: &str = "config/tokenwarden.toml";

#[derive(Debug, Parser)]
#[command(
    name = "tokenwarden",
    version,
    about = "Keeps the OAuth tokens of a multi-tenant gateway alive, in Redis",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Config file (TOML); defaults to config/tokenwarden.toml when it exists.
    #[arg(long, env = "TOKENWARDEN_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the daemon.
    Run(ConfigArg),
    /// Show every tracked provider, read from Redis, most urgent first.
    ///
    /// Order: re-authorisation required, expired, failing, invalid records, then by expiry
    /// (soonest first), inactive last. Times are relative to now ("expires in 12m"). The
    /// last line sums the rotated tokens the live replicas' journals still hold.
    Status {
        /// Only this tenant's providers.
        #[arg(long)]
        tenant: Option<String>,
        /// Only providers in this state (`expired`: access token past its expiry).
        #[arg(long, value_parser = [
            "reauth_required", "expired", "failing", "invalid_record", "degraded",
            "healthy", "inactive", "unknown",
        ])]
        state: Option<String>,
        /// JSON instead of a table: an array of the same rows in the same order, with the
        /// relative times in seconds (`expires_in_secs`, ...). The journal line is table-only.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Refresh one provider now, on the running daemon (or in this process with --local).
    ///
    /// The request goes to the running daemons through the stream tokenwarden:commands; one
    /// of them refreshes the provider through the same lock, reservation and journal as a
    /// scheduled refresh, whatever its state (also while it waits for a re-authorisation, to
    /// check a new grant at once), and answers there.
    #[command(after_help = REFRESH_HELP)]
    Refresh {
        /// The tenant id (as in tenant:T:providers).
        #[arg(long)]
        tenant: String,
        /// The provider name (a member of tenant:T:providers).
        #[arg(long)]
        provider: String,
        #[command(flatten)]
        wait: WaitArgs,
        /// Refresh in this process instead of asking a running daemon (for when none runs).
        /// Needs --state-dir: the new token is journaled there until Redis confirms it.
        #[arg(long, requires = "state_dir")]
        local: bool,
        /// With --local: a writable directory for this process's journal (not a running
        /// daemon's: each process needs its own). Default: TOKENWARDEN_STATE_DIR.
        #[arg(long, env = "TOKENWARDEN_STATE_DIR")]
        state_dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run a tenant's data sync now, on the running daemon.
    ///
    /// The request goes to the running daemons through the stream tokenwarden:commands; one
    /// of them runs the sync through the tenant's sync lock and answers there.
    #[command(after_help = SYNC_HELP)]
    Sync {
        /// The tenant id.
        #[arg(long)]
        tenant: String,
        /// Only this provider (default: all the tenant's providers with sync enabled).
        #[arg(long)]
        provider: Option<String>,
        /// Only this feature (users, call_queues, extensions, ...).
        #[arg(long)]
        feature: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
        /// Run the sync in this process instead (through the same sync lock, its own engine
        /// for the token refreshes it needs): one line per provider and feature.
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration and the provider catalog.
    CheckConfig(ConfigArg),
    /// The local journal of rotated tokens not yet confirmed in Redis.
    Journal {
        #[command(subcommand)]
        command: JournalCmd,
    },
}

#[derive(Debug, Subcommand)]
enum JournalCmd {
    /// The pending and quarantined entries (never a secret).
    List {
        #[command(flatten)]
        args: JournalArgs,
        #[arg(long)]
        json: bool,
        /// Also the confirmed entries still kept.
        #[arg(long)]
        all: bool,
    },
    /// Replay every pending entry into Redis (compare-and-set: never over a newer token).
    Replay {
        #[command(flatten)]
        args: JournalArgs,
    },
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// Wait for the daemon's answer and exit with its code (see below); without it the
    /// request id is printed and the command exits 0 once the request is sent.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up (exit 6) after this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

#[derive(Debug, clap::Args)]
struct JournalArgs {
    /// State directory, holding the journal in journal/ (default: TOKENWARDEN_STATE_DIR,
    /// then journal.state_dir).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArg,
}

fn config_path(arg: &ConfigArg) -> Option<PathBuf> {
    arg.config.clone().or_else(|| {
        let p = Path::new(DEFAULT_CONFIG);
        p.is_file().then(|| p.to_path_buf())
    })
}

fn load(arg: &ConfigArg) -> Result<(Config, Option<PathBuf>), ExitCode> {
    let path = config_path(arg);
    match Config::load(path.as_deref()) {
        Ok(c) => Ok((c, path)),
        Err(e) => {
            eprintln!("tokenwarden: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    if !crate::allocator::tune() {
        eprintln!("tokenwarden: the allocator's options were not set (unexpected mimalloc option defaults)");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("tokenwarden: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

/// Parses the command line and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn run(cmd: Cmd) -> Result<(), ExitCode> {
    match cmd {
        Cmd::CheckConfig(arg) => {
            let (c, path) = load(&arg)?;
            let source = path.map_or_else(
                || "built-in defaults".to_string(),
                |p| p.display().to_string(),
            );
            let catalog = c.catalog_path().map_or_else(
                || "built-in catalog".to_string(),
                |p| p.display().to_string(),
            );
            let types: Vec<&str> = c.catalog.provider_types().collect();
            println!(
                "ok: {source}; {catalog} ({} provider types: {}); redis {}; listen {}",
                types.len(),
                types.join(", "),
                store::describe(&c.redis),
                c.http.listen
            );
            Ok(())
        }
        Cmd::Run(arg) => {
            let (c, path) = load(&arg)?;
            let log = logging::init(&c.log.level, c.log.format);
            runtime()?.block_on(daemon::run(c, path, log)).map_err(|e| {
                tracing::error!(error = %e, "tokenwarden failed");
                eprintln!("tokenwarden: {e}");
                ExitCode::from(1)
            })
        }
        Cmd::Status {
            tenant,
            state,
            json,
            config,
        } => {
            let (c, _) = load(&config)?;
            let now = chrono::Utc::now();
            let read = runtime()?.block_on(async {
                let pool = store::pool(&c.redis)?;
                let mut conn = store::conn(&pool).await?;
                let rows = status::rows(&mut conn, tenant.as_deref(), now).await?;
                let journal = status::journal(&mut conn).await?;
                Ok::<_, store::StoreError>((rows, journal))
            });
            let (mut rows, journal) = read.map_err(|e| {
                eprintln!("tokenwarden: {e}");
                ExitCode::from(1)
            })?;
            if let Some(state) = &state {
                rows.retain(|r| status::has_state(r, state));
            }
            status::sort_by_urgency(&mut rows);
            if json {
                let text = serde_json::to_string_pretty(&rows).map_err(|e| {
                    eprintln!("tokenwarden: {e}");
                    ExitCode::from(1)
                })?;
                println!("{text}");
            } else {
                print!("{}", status::table(&rows, &journal));
            }
            Ok(())
        }
        Cmd::Journal { command } => journal_command(command),
        Cmd::Refresh {
            tenant,
            provider,
            wait,
            local,
            state_dir,
            config,
        } => {
            let (mut c, _) = load(&config)?;
            let id = ProviderId::checked(&tenant, &provider).map_err(|why| {
                eprintln!(
                    "tokenwarden: {}: not a tenant id and provider name tokenwarden can serve: {why}",
                    ProviderId::new(tenant.as_str(), provider.as_str())
                );
                ExitCode::from(exit::USAGE)
            })?;
            if local {
                let dir = state_dir.ok_or_else(|| {
                    eprintln!("tokenwarden: --local needs --state-dir DIR");
                    ExitCode::from(exit::USAGE)
                })?;
                writable_dir(&dir)?;
                c.journal.state_dir = dir.display().to_string();
                return refresh_local(c, id);
            }
            let request = Request {
                kind: Kind::Refresh,
                tenant,
                provider: Some(provider),
                feature: None,
            };
            remote(&c, &request, &wait, &id.to_string())
        }
        Cmd::Sync {
            tenant,
            provider,
            feature,
            wait,
            local,
            config,
        } => {
            if local {
                return sync_local(&config, tenant, provider, feature);
            }
            let (c, _) = load(&config)?;
            let what = format!(
                "sync of {}{}{}",
                crate::text::escape_control(&tenant),
                provider
                    .as_deref()
                    .map(|p| format!("/{}", crate::text::escape_control(p)))
                    .unwrap_or_default(),
                feature
                    .as_deref()
                    .map(|f| format!(" ({})", crate::text::escape_control(f)))
                    .unwrap_or_default(),
            );
            let request = Request {
                kind: Kind::Sync,
                tenant,
                provider,
                feature,
            };
            remote(&c, &request, &wait, &what)
        }
    }
}

/// `--local` needs a directory this process can write its journal into.
fn writable_dir(dir: &Path) -> Result<(), ExitCode> {
    let probe = journal::dir_in(dir);
    let check = std::fs::create_dir_all(&probe).and_then(|()| {
        let file = probe.join(format!(".write-check-{}", std::process::id()));
        std::fs::write(&file, b"")?;
        std::fs::remove_file(&file)
    });
    check.map_err(|e| {
        eprintln!(
            "tokenwarden: --state-dir {}: not writable ({e}); --local journals the new token there",
            dir.display()
        );
        ExitCode::from(exit::USAGE)
    })
}

/// Sends `request` to the running replicas; with `--wait`, prints their answer and exits
/// with its code.
fn remote(c: &Config, request: &Request, wait: &WaitArgs, what: &str) -> Result<(), ExitCode> {
    let heartbeat_ttl = Duration::from_secs(c.replica.heartbeat_ttl_secs);
    let command_timeout = Duration::from_millis(c.redis.command_timeout_ms);
    let result = runtime()?.block_on(async {
        let pool = store::pool(&c.redis)?;
        let mut conn = store::conn(&pool).await?;
        let id = commands::send(&mut conn, request, heartbeat_ttl).await?;
        if !wait.wait {
            return Ok((id, None));
        }
        let answer = commands::wait_answer(
            &c.redis.url,
            command_timeout,
            &id,
            Duration::from_secs(wait.timeout),
        )
        .await?;
        Ok::<_, SendError>((id, Some(answer)))
    });
    match result {
        Err(e @ (SendError::NoReplica | SendError::NoAnswer { .. })) => {
            eprintln!("tokenwarden: {what}: {e}");
            Err(ExitCode::from(exit::NO_ANSWER))
        }
        Err(SendError::Store(e)) => {
            eprintln!("tokenwarden: {e}");
            Err(ExitCode::from(exit::FAILURE))
        }
        Ok((id, None)) => {
            println!("{what}: request {id} sent (add --wait to wait for the answer)");
            Ok(())
        }
        Ok((id, Some(answer))) => {
            let detail = crate::text::escape_control(&answer.detail);
            println!(
                "{what}: {}: {detail} [request {id}, replica {}]",
                answer.result_text,
                crate::text::escape_control(&answer.replica)
            );
            for line in &answer.lines {
                println!("  {}", crate::text::escape_control(line));
            }
            match answer.result.exit_code() {
                exit::OK => Ok(()),
                code => Err(ExitCode::from(code)),
            }
        }
    }
}

/// `refresh --local`: in this process, exit code by outcome.
fn refresh_local(c: Config, id: ProviderId) -> Result<(), ExitCode> {
    let _log = logging::init(&c.log.level, c.log.format);
    let outcome = runtime()?.block_on(refresh_now(c, id.clone()));
    let outcome = outcome.map_err(|e| {
        eprintln!("tokenwarden: {e}");
        ExitCode::from(exit::FAILURE)
    })?;
    let outcome = outcome.map_err(|missing| {
        eprintln!("tokenwarden: {id}: not in the registry ({missing}); nothing done");
        ExitCode::from(exit::NOT_FOUND)
    })?;
    let (result, detail) = Outcome::of_attempt(&outcome);
    println!("{id}: {detail}");
    match result.exit_code() {
        exit::OK => Ok(()),
        code => Err(ExitCode::from(code)),
    }
}

/// The journal named by the arguments and config, with its keys; `None` when there is none.
fn open_journal(args: &JournalArgs, c: &Config) -> Result<Option<Journal>, ExitCode> {
    let state_dir = args.state_dir.clone().unwrap_or_else(|| c.state_dir());
    let dir = journal::dir_in(&state_dir);
    let keys = match c.journal_key_path() {
        Some(path) => Some(JournalKeys::load(&path).map_err(|e| {
            eprintln!("tokenwarden: {e}");
            ExitCode::from(2)
        })?),
        None => None,
    };
    if !dir.is_dir() {
        println!("no journal in {}", state_dir.display());
        return Ok(None);
    }
    Journal::open(&dir, keys).map(Some).map_err(|e| {
        eprintln!("tokenwarden: {e}");
        ExitCode::from(1)
    })
}

fn journal_command(cmd: JournalCmd) -> Result<(), ExitCode> {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("tokenwarden: {e}");
        ExitCode::from(1)
    };
    match cmd {
        JournalCmd::List { args, json, all } => {
            let (c, _) = load(&args.config)?;
            let Some(journal) = open_journal(&args, &c)? else {
                return Ok(());
            };
            let mut rows = journal.list().map_err(|e| fail(&e))?;
            if !all {
                rows.retain(|r| r.status != journal::EntryStatus::Confirmed);
            }
            if json {
                let text = serde_json::to_string_pretty(&rows).map_err(|e| fail(&e))?;
                println!("{text}");
            } else {
                print!("{}", journal::command::list_text(&rows, chrono::Utc::now()));
            }
            Ok(())
        }
        JournalCmd::Replay { args } => {
            let (c, _) = load(&args.config)?;
            let _log = logging::init(&c.log.level, c.log.format);
            let Some(journal) = open_journal(&args, &c)? else {
                return Ok(());
            };
            let report = runtime()?.block_on(async {
                let pool = store::pool(&c.redis).map_err(|e| fail(&e))?;
                let mut conn = store::conn(&pool).await.map_err(|e| fail(&e))?;
                journal::command::replay_pending(&journal, &mut conn, |line| println!("{line}"))
                    .await
                    .map_err(|e| fail(&e))
            })?;
            println!("{}", report.summary());
            if report.quarantined > 0 {
                eprintln!(
                    "tokenwarden: {} unreadable entries moved to quarantine (see `tokenwarden journal list`)",
                    report.quarantined
                );
                return Err(ExitCode::from(1));
            }
            Ok(())
        }
    }
}

/// One forced refresh in this process: the same lock, reservation, journal and write-back as
/// the daemon's, its outcome decided and its health written the same way.
/// `Ok(Err(why))`: the provider is not in the registry and nothing was done.
async fn refresh_now(
    c: Config,
    id: ProviderId,
) -> Result<Result<Attempt, String>, daemon::DaemonError> {
    let journal = daemon::open_journal(&c)?;
    let maxlen = c.events.stream_maxlen;
    let (ctx, inboxes) = daemon::context(c, Some(journal))?;
    if let Some(missing) = commands::not_in_registry(&ctx, &id).await? {
        return Ok(Err(missing));
    }
    let plan = Plan {
        id: id.clone(),
        known: None,
        trigger: Trigger::Forced,
    };
    let finished = refresh::attempt(&ctx, &plan).await;
    if matches!(finished.outcome, Attempt::Unconfirmed(_)) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        replay::drain(&ctx, deadline).await;
    }
    let pol = Policies::from_config(&ctx.config());
    let mut rng = fastrand::Rng::new();
    for input in finished
        .seen
        .iter()
        .map(|state| Input::Read {
            state,
            read_version: u64::MAX,
            stored: None,
        })
        .chain(std::iter::once(Input::Attempt(&finished.outcome)))
    {
        let tr = engine::apply(&ctx, &pol, &id, input, &mut rng);
        if tr.changed {
            ctx.health.send(HealthOp {
                id: id.clone(),
                health: tr.health,
                event: tr.event,
            });
        }
    }
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    health::writer::run(
        ctx.pool.clone(),
        inboxes.health,
        maxlen,
        stop,
        std::time::Duration::from_secs(3),
    )
    .await;
    Ok(Ok(finished.outcome))
}

/// `tokenwarden sync --local`: the tenant's sync in this process.
fn sync_local(
    config: &ConfigArg,
    tenant: String,
    provider: Option<String>,
    feature: Option<String>,
) -> Result<(), ExitCode> {
    let (c, _) = load(config)?;
    let _log = logging::init(&c.log.level, c.log.format);
    if crate::keys::tenant_id(tenant.as_bytes()).is_err()
        || provider
            .as_deref()
            .is_some_and(|p| crate::keys::provider_name(p.as_bytes()).is_err())
    {
        eprintln!("tokenwarden: not a tenant id and provider name tokenwarden can serve");
        return Err(ExitCode::from(2));
    }
    if let Some(f) = feature.as_deref() {
        if crate::sync::model::Feature::parse(f).is_none() {
            eprintln!("tokenwarden: --feature must be one of users, extensions, call_queues, auto_attendants, phone_numbers");
            return Err(ExitCode::from(2));
        }
    }
    let selection = crate::sync::Selection { provider, feature };
    let report = runtime()?
        .block_on(sync_now(c, tenant.clone(), selection))
        .map_err(|e| {
            eprintln!("tokenwarden: {e}");
            ExitCode::from(1)
        })?;
    print_sync(&report)
}

/// A tenant's sync in this process: its own engine (for token refreshes the fetches need,
/// through the same lock and journal) and health writer, stopped when the run is done.
async fn sync_now(
    c: Config,
    tenant: String,
    selection: crate::sync::Selection,
) -> Result<crate::sync::Report, daemon::DaemonError> {
    let journal = daemon::open_journal(&c)?;
    let maxlen = c.events.stream_maxlen;
    let (ctx, inboxes) = daemon::context(c, Some(journal))?;
    let cancel = tokio_util::sync::CancellationToken::new();
    let engine_stop = tokio_util::sync::CancellationToken::new();
    let tracker = tokio_util::task::TaskTracker::new();
    ctx.status.set_redis_up(true);
    let engine_task = tokio::spawn(engine::run(
        std::sync::Arc::clone(&ctx),
        inboxes.engine,
        tracker.clone(),
        cancel.clone(),
        engine_stop.clone(),
    ));
    let writer_stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn(health::writer::run(
        ctx.pool.clone(),
        inboxes.health,
        maxlen,
        writer_stop.clone(),
        std::time::Duration::from_secs(3),
    ));
    let report = crate::sync::run_tenant(
        &ctx,
        &tenant,
        &selection,
        None,
        &tokio_util::sync::CancellationToken::new(),
    )
    .await;
    cancel.cancel();
    tracker.close();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
    if !ctx.replayer.is_empty() {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        replay::drain(&ctx, deadline).await;
    }
    engine_stop.cancel();
    let _ = engine_task.await;
    writer_stop.cancel();
    let _ = writer.await;
    Ok(report)
}

fn print_sync(report: &crate::sync::Report) -> Result<(), ExitCode> {
    use crate::sync::Outcome;
    let tenant = crate::text::escape_control(&report.tenant);
    match &report.outcome {
        Outcome::Busy | Outcome::AlreadyRun => {
            eprintln!("tokenwarden: {tenant}: another sync of this tenant is running (tenant:{{t}}:sync:lock held)");
            return Err(ExitCode::from(1));
        }
        Outcome::Failed(why) => {
            eprintln!("tokenwarden: {tenant}: sync failed: {why}");
            return Err(ExitCode::from(1));
        }
        Outcome::Ran => {}
    }
    if report.lines.is_empty() {
        eprintln!("tokenwarden: {tenant}: nothing selected to sync");
        return Err(ExitCode::from(1));
    }
    for l in &report.lines {
        println!("{}", crate::sync::run::line_text(&report.tenant, l));
    }
    if report.ok() {
        Ok(())
    } else {
        Err(ExitCode::from(1))
    }
}
