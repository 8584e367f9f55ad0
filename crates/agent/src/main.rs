//! `backvault-agent`: the reference agent. It plays a SQL Server VM described by an
//! inventory file, so that backvault can be exercised end to end without real VMs.

mod agent;
mod backoff;
mod client;
mod config;
mod reports;
mod running;
mod sim;
mod store;
mod worker;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use tokio::sync::watch;

use crate::agent::{Agent, Settings, Shutdown};
use crate::client::{Client, TokenFile};
use crate::config::InventorySource;
use crate::store::Store;
use crate::worker::BackupClock;

#[derive(Parser)]
#[command(
    name = "backvault-agent",
    version,
    about = "Reference backvault agent: simulates a SQL Server VM described by an inventory file"
)]
struct Cli {
    /// The simulated VM: TOML, or JSON when the name ends in .json. Re-read before every job.
    #[arg(long, env = "BACKVAULT_INVENTORY")]
    inventory: PathBuf,
    /// backvault's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "BACKVAULT_SERVER", value_parser = parse_server)]
    server: String,
    /// Token that lets this VM enroll. Not needed once the token file holds a working
    /// agent token.
    #[arg(long, env = "BACKVAULT_ENROLLMENT_TOKEN", hide_env_values = true)]
    enrollment_token: Option<String>,
    /// Where the agent token is kept across restarts (readable by its owner only). A
    /// restarted agent refreshes the saved token instead of enrolling again; without the
    /// file it needs an enrollment token with a use left at every start.
    #[arg(long, env = "BACKVAULT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Jobs run at once (the server hands out at most 50 per claim).
    #[arg(long, env = "BACKVAULT_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=50))]
    concurrency: u32,
    /// Seconds between agent heartbeats.
    #[arg(long, env = "BACKVAULT_HEARTBEAT_SECONDS", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_seconds: u64,
    /// Longest wait of one claim long-poll.
    #[arg(long, env = "BACKVAULT_CLAIM_WAIT_SECONDS", default_value_t = 25,
          value_parser = clap::value_parser!(u32).range(0..=60))]
    claim_wait_seconds: u32,
    /// Where the simulated databases (their LSNs, recovery forks and backup history) are
    /// kept across restarts (JSON); without it, a restarted agent has databases that were
    /// never backed up.
    #[arg(long, env = "BACKVAULT_STATE_FILE")]
    state_file: Option<PathBuf>,
    /// Format of the logs on stderr; their level comes from BACKVAULT_LOG (default info).
    #[arg(long, env = "BACKVAULT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Seconds running jobs get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "BACKVAULT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// The time scheduled backups are stamped with: the clock, or the instant the
    /// scheduler enqueued them (to rehearse a schedule on a `--dev` server that ticks at
    /// chosen instants, so weeks of recovery points take seconds).
    #[arg(long, env = "BACKVAULT_BACKUP_TIME", value_enum, default_value_t = BackupClock::Clock)]
    backup_time: BackupClock,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_server(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("expected an http:// or https:// URL".to_owned());
    }
    Ok(url.to_owned())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "agent failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let inventory = InventorySource::open(cli.inventory)?;
    let store = Store::open(cli.state_file)?;
    let facts = inventory.last_good().facts().clone();
    if cli.enrollment_token.is_none() && cli.token_file.is_none() {
        anyhow::bail!("give --enrollment-token, or a --token-file that holds an agent token");
    }
    let token_file = cli.token_file.map(TokenFile::new);
    let client = Client::new(&cli.server, cli.enrollment_token, token_file, facts)?;
    let settings = Settings {
        concurrency: cli.concurrency,
        heartbeat: Duration::from_secs(cli.heartbeat_seconds),
        claim_wait_seconds: cli.claim_wait_seconds,
        shutdown_grace: Duration::from_secs(cli.shutdown_grace_seconds),
        backup_clock: cli.backup_time,
    };
    let agent = Arc::new(Agent::new(client, inventory, store, settings));
    let (trigger, shutdown) = Shutdown::new();
    tokio::spawn(watch_signals(trigger));
    agent.run(shutdown).await
}

/// The first signal winds down gracefully; a second one exits at once.
async fn watch_signals(trigger: watch::Sender<bool>) {
    signal().await;
    tracing::info!("signal received: no more claims; finishing running jobs");
    trigger.send_replace(true);
    signal().await;
    tracing::warn!("second signal: exiting now");
    std::process::exit(130);
}

async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
