//! The `backvault` binary: the server and its operator commands.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use backvault_api::AppState;
use backvault_service::{Auth, AuthConfig, Role, Service};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rand::RngCore;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(
    name = "backvault",
    version,
    about = "Backup control plane for SQL Server databases on VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (creates the database if missing and applies migrations).
    Serve(ServeArgs),
    /// Apply the embedded database migrations and exit.
    Migrate(DbArgs),
    /// Print the OpenAPI document.
    Openapi,
    /// Mint an API token with the configured key.
    Token(TokenArgs),
}

#[derive(Args)]
struct DbArgs {
    /// Postgres connection string.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/backvault"
    )]
    database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "BACKVAULT_DB_MAX_CONNECTIONS", default_value_t = 16)]
    db_max_connections: u32,
    /// How long a request waits for a database connection before it answers 503 with
    /// Retry-After. Short, so that clients learn of a database outage at once.
    #[arg(long, env = "BACKVAULT_DB_ACQUIRE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    db_acquire_timeout: Duration,
}

#[derive(Args)]
struct KeyArgs {
    /// HS256 key for API tokens (at least 32 bytes).
    #[arg(long, env = "BACKVAULT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Required `iss` of tokens, and the issuer of minted ones.
    #[arg(long, env = "BACKVAULT_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Required `aud` of tokens, and the audience of minted ones.
    #[arg(long, env = "BACKVAULT_JWT_AUDIENCE")]
    jwt_audience: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Text,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    db: DbArgs,
    #[command(flatten)]
    key: KeyArgs,
    /// Address to listen on (port 0 picks a free port; the log says which).
    #[arg(long, env = "BACKVAULT_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Development mode: a random JWT key and an admin token printed at start.
    #[arg(long, env = "BACKVAULT_DEV")]
    dev: bool,
    /// Log format: `json` for log pipelines (the default), `text` for eyes (the default
    /// with --dev).
    #[arg(long, env = "BACKVAULT_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "BACKVAULT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    #[command(flatten)]
    jobs: JobArgs,
}

#[derive(Args)]
struct JobArgs {
    /// Seconds a claim or heartbeat keeps a job for its agent.
    #[arg(long, env = "BACKVAULT_LEASE_SECONDS", default_value_t = 60)]
    lease_seconds: i64,
    /// Backup jobs one VM may run at once.
    #[arg(
        long,
        env = "BACKVAULT_MAX_RUNNING_BACKUPS_PER_VM",
        default_value_t = 20
    )]
    max_running_backups_per_vm: u32,
    /// Restore jobs one VM may run at once.
    #[arg(
        long,
        env = "BACKVAULT_MAX_RUNNING_RESTORES_PER_VM",
        default_value_t = 15
    )]
    max_running_restores_per_vm: u32,
    /// Days finished jobs stay in the history.
    #[arg(long, env = "BACKVAULT_JOB_RETENTION_DAYS", default_value_t = 90)]
    job_retention_days: i64,
    /// Days an agent token lives.
    #[arg(long, env = "BACKVAULT_AGENT_TOKEN_DAYS", default_value_t = 90)]
    agent_token_days: i64,
    /// How often expired leases are looked for.
    #[arg(long, env = "BACKVAULT_RESCUE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    rescue_interval: Duration,
    /// How often a waiting long-poll re-checks without a notification.
    #[arg(long, env = "BACKVAULT_LONG_POLL_RECHECK", default_value = "10s", value_parser = humantime::parse_duration)]
    long_poll_recheck: Duration,
    /// How often registered VMs are discovered again.
    #[arg(long, env = "BACKVAULT_DISCOVERY_PERIOD", default_value = "8h", value_parser = humantime::parse_duration)]
    discovery_period: Duration,
    /// Registration needs the VM's agent heard from within this window.
    #[arg(long, env = "BACKVAULT_AGENT_HEARD_WITHIN", default_value = "30m", value_parser = humantime::parse_duration)]
    agent_heard_within: Duration,
    /// How often the scheduler looks for due backup slots.
    #[arg(long, env = "BACKVAULT_SCHEDULER_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    scheduler_interval: Duration,
}

impl JobArgs {
    fn config(&self) -> backvault_service::Config {
        backvault_service::Config {
            lease: chrono::Duration::seconds(self.lease_seconds),
            max_running_backups_per_vm: self.max_running_backups_per_vm,
            max_running_restores_per_vm: self.max_running_restores_per_vm,
            job_retention: chrono::Duration::days(self.job_retention_days),
            agent_token_ttl: chrono::Duration::days(self.agent_token_days),
            long_poll_recheck: self.long_poll_recheck,
            discovery_period: chrono::Duration::from_std(self.discovery_period)
                .unwrap_or(chrono::Duration::hours(8)),
            agent_heard_within: chrono::Duration::from_std(self.agent_heard_within)
                .unwrap_or(chrono::Duration::minutes(30)),
            scheduler_interval: self.scheduler_interval,
            allow_clock_override: false,
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// admin, operator, reader or agent.
    #[arg(long)]
    role: Role,
    /// A subscription the token reaches; repeat for several, `*` for all.
    #[arg(long = "subscription", required = true)]
    subscriptions: Vec<String>,
    /// The VM an agent token is bound to.
    #[arg(long)]
    vm: Option<uuid::Uuid>,
    /// Lifetime, e.g. 15m, 1h, 30d.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The token's subject (who it is for).
    #[arg(long, default_value = "backvault-cli")]
    subject: String,
}

const MIN_SECRET_BYTES: usize = 32;

impl KeyArgs {
    fn auth(&self, dev: bool) -> anyhow::Result<Auth> {
        let secret = match (&self.jwt_secret, dev) {
            (_, true) => {
                let mut key = vec![0u8; 32];
                rand::rng().fill_bytes(&mut key);
                key
            }
            (Some(s), false) if s.len() >= MIN_SECRET_BYTES => s.clone().into_bytes(),
            (Some(_), false) => bail!(
                "BACKVAULT_JWT_SECRET is shorter than {MIN_SECRET_BYTES} bytes; use a longer random key"
            ),
            (None, false) => bail!(
                "no JWT key: set BACKVAULT_JWT_SECRET (32+ random bytes) or run `backvault serve --dev`"
            ),
        };
        Ok(Auth::new(AuthConfig {
            secret,
            // Compose passes unset optional settings as empty strings.
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
        }))
    }
}

impl DbArgs {
    /// Connects, creating the database first when it does not exist.
    async fn connect(&self) -> anyhow::Result<sqlx::PgPool> {
        let options = PgConnectOptions::from_str(&self.database_url)
            .context("DATABASE_URL is not a valid Postgres URL")?
            // Long transactions stall the job queue; no statement or idle transaction
            // may hold locks for long.
            .options([
                ("statement_timeout", "30s"),
                ("idle_in_transaction_session_timeout", "60s"),
            ]);
        create_database_if_missing(&options).await?;
        PgPoolOptions::new()
            .max_connections(self.db_max_connections)
            .acquire_timeout(self.db_acquire_timeout)
            .connect_with(options)
            .await
            .context("cannot connect to Postgres (DATABASE_URL)")
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> anyhow::Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else {
        return Ok(());
    };
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")?;
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        let create = format!("create database \"{}\"", name.replace('"', "\"\""));
        match sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&mut admin)
            .await
        {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another replica created it between the check and the create.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e).context("cannot create the database"),
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
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
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.log_format.unwrap_or(if args.dev {
        LogFormat::Text
    } else {
        LogFormat::Json
    }));
    let auth = args.key.auth(args.dev)?;
    let pool = args.db.connect().await?;
    backvault_store::MIGRATOR
        .run(&pool)
        .await
        .context("applying migrations")?;
    if args.dev {
        let token = auth.mint(
            "dev-admin",
            Role::Admin,
            vec!["*".into()],
            None,
            chrono::Duration::hours(24),
        );
        println!(
            "backvault --dev: admin token for all subscriptions, valid 24h (the key is random; restart invalidates it):"
        );
        println!("export BACKVAULT_TOKEN={token}");
    }
    let config = backvault_service::Config {
        allow_clock_override: args.dev,
        ..args.jobs.config()
    };
    let service = Service::new(pool.clone(), auth, config);
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(service.clone().run_background(
        args.jobs.rescue_interval,
        Duration::from_secs(3600),
        background_stopped,
    ));
    let app = backvault_api::router(AppState {
        service: service.clone(),
    });
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let stopping = service.clone();
    // A make-service built once: `serve(listener, router)` would clone the router's whole
    // route table and layer stack for every connection (~50 KB each under many agents).
    let server =
        axum::serve(listener, app.into_make_service()).with_graceful_shutdown(async move {
            shutdown_signal().await;
            stopping.begin_shutdown();
        });
    tokio::select! {
        result = server => result?,
        () = async { shutdown_signal().await; tokio::time::sleep(grace).await } => {
            tracing::warn!("grace period over; dropping unfinished requests");
        }
    }
    let _ = stop_background.send(true);
    let _ = background.await;
    pool.close().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Migrate(db) => {
            async {
                let pool = db.connect().await?;
                backvault_store::MIGRATOR
                    .run(&pool)
                    .await
                    .context("applying migrations")?;
                println!("migrations applied");
                Ok(())
            }
            .await
        }
        Command::Openapi => serde_json::to_string_pretty(&backvault_api::openapi())
            .map(|s| println!("{s}"))
            .map_err(Into::into),
        Command::Token(args) => args.key.auth(false).map(|auth| {
            let ttl = chrono::Duration::from_std(args.ttl).unwrap_or(chrono::Duration::hours(1));
            println!(
                "{}",
                auth.mint(&args.subject, args.role, args.subscriptions, args.vm, ttl)
            );
        }),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
