//! The `backvault` binary: the server and its operator commands.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use backvault_api::AppState;
use backvault_domain::tokens::{describe_seconds, lifetime_range};
use backvault_service::tokens::{
    CreateEnrollmentToken, check_enrollment_request, mint_enrollment_token,
};
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
    /// Mint an API token with the configured key (enrollment tokens are recorded in the
    /// database).
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
    /// Connections in the pool. The group commits of claims and completions run up to
    /// (pool − 8) / 2 transactions each (2 to 8); the rest serve requests and background work.
    #[arg(long, env = "BACKVAULT_DB_MAX_CONNECTIONS", default_value_t = 24)]
    db_max_connections: u32,
    /// How long a request waits for a database connection before it answers 503 with
    /// Retry-After. Short, so that clients learn of a database outage at once.
    #[arg(long, env = "BACKVAULT_DB_ACQUIRE_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    db_acquire_timeout: Duration,
}

#[derive(Args)]
struct KeyArgs {
    /// HS256 key for API tokens (at least 32 bytes); it signs every new token.
    #[arg(long, env = "BACKVAULT_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Earlier keys, comma-separated: they only verify the tokens they signed, during a
    /// key rotation.
    #[arg(
        long,
        env = "BACKVAULT_JWT_PREVIOUS_SECRETS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    jwt_previous_secrets: Vec<String>,
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
    /// Development mode: a random JWT key and an admin token printed (on stderr) at start.
    /// Refuses to start with a configured key.
    #[arg(long, env = "BACKVAULT_DEV")]
    dev: bool,
    /// Log format: `json` for log pipelines (the default), `text` for eyes (the default
    /// with --dev).
    #[arg(long, env = "BACKVAULT_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, env = "BACKVAULT_SHUTDOWN_GRACE_SECONDS", default_value_t = 30)]
    shutdown_grace_seconds: u64,
    /// Origins browsers may call the API from (CORS), comma-separated, e.g.
    /// `https://console.example.com`; `*` for any. None by default.
    #[arg(long, env = "BACKVAULT_CORS_ALLOWED_ORIGINS", value_delimiter = ',',
          value_parser = backvault_api::parse_cors_origin)]
    cors_allowed_origins: Vec<String>,
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
    /// Days audit events are kept before they are purged: at least 365.
    #[arg(long, env = "BACKVAULT_AUDIT_RETENTION_DAYS",
          default_value_t = backvault_domain::audit::DEFAULT_RETENTION_DAYS,
          value_parser = backvault_domain::audit::parse_retention_days)]
    audit_retention_days: u32,
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
            audit_retention_days: self.audit_retention_days,
        }
    }
}

#[derive(Args)]
struct TokenArgs {
    #[command(flatten)]
    key: KeyArgs,
    /// Where enrollment tokens are recorded (other tokens need no database).
    #[command(flatten)]
    db: DbArgs,
    /// admin, operator, reader, approver, auditor or enrollment (agents get their tokens by
    /// enrolling).
    #[arg(long)]
    role: Role,
    /// A subscription the token reaches; repeat for several, `*` for all. An enrollment
    /// token names exactly one.
    #[arg(long = "subscription", required = true)]
    subscriptions: Vec<String>,
    /// Lifetime, e.g. 15m, 1h, 30d: at most 30d, and at most 24h for an enrollment token.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The token's subject (who it is for).
    #[arg(long, default_value = "backvault-cli")]
    subject: String,
    /// Binds an enrollment token to the one VM of this name (with --resource-group), which
    /// it may re-enroll even when the VM already has an agent.
    #[arg(long, requires = "resource_group")]
    vm_name: Option<String>,
    /// The resource group of the VM an enrollment token is bound to.
    #[arg(long, requires = "vm_name")]
    resource_group: Option<String>,
    /// Enrollments an enrollment token allows, 1 to 100 (default 1).
    #[arg(long)]
    max_uses: Option<i32>,
}

impl TokenArgs {
    /// The token's lifetime, within its role's cap: the caps of the API and of token
    /// verification (`domain::tokens`).
    fn lifetime(&self) -> anyhow::Result<chrono::Duration> {
        let Some(range) = lifetime_range(self.role) else {
            bail!(
                "agent tokens are not minted here: an agent gets its token by enrolling with an enrollment token"
            );
        };
        match i64::try_from(self.ttl.as_secs()) {
            Ok(seconds) if range.contains(&seconds) => Ok(chrono::Duration::seconds(seconds)),
            _ => bail!(
                "--ttl: {} tokens live {} to {}",
                self.role.as_str(),
                describe_seconds(*range.start()),
                describe_seconds(*range.end())
            ),
        }
    }

    async fn mint(self) -> anyhow::Result<()> {
        let ttl = self.lifetime()?;
        let auth = self.key.auth()?;
        if self.role != Role::Enrollment {
            if self.vm_name.is_some() || self.max_uses.is_some() {
                bail!("--vm-name, --resource-group and --max-uses are for enrollment tokens");
            }
            let minted = auth.mint_with_id(
                &self.subject,
                self.role,
                self.subscriptions,
                uuid::Uuid::now_v7(),
                None,
                ttl,
            );
            println!("{}", minted.token);
            describe_minted(minted.jti, minted.expires_at);
            return Ok(());
        }
        let [subscription] = <[String; 1]>::try_from(self.subscriptions).map_err(|_| {
            anyhow::anyhow!("an enrollment token is for exactly one --subscription")
        })?;
        let req = CreateEnrollmentToken {
            subscription_id: subscription,
            ttl_seconds: ttl.num_seconds(),
            vm_name: self.vm_name,
            resource_group: self.resource_group,
            max_uses: self.max_uses.unwrap_or(1),
        };
        if let Err(e) = check_enrollment_request(&req) {
            let broken: Vec<String> = e
                .violations
                .iter()
                .map(|v| format!("{} ({})", v.message, v.code))
                .collect();
            bail!("{}", broken.join("; "));
        }
        let pool = self.db.connect().await?;
        let minted = mint_enrollment_token(&pool, &auth, &self.subject, req)
            .await
            .context("recording the enrollment token (has `backvault migrate` run?)")?;
        pool.close().await;
        println!("{}", minted.token);
        describe_minted(Some(minted.id), minted.expires_at);
        Ok(())
    }
}

/// Tells the operator, on stderr so that stdout stays the bare token, how to revoke it.
fn describe_minted(jti: Option<uuid::Uuid>, expires_at: chrono::DateTime<chrono::Utc>) {
    if let Some(jti) = jti {
        eprintln!(
            "token id (jti) {jti}, expires {}; revoke it with POST /v1/tokens/revoke",
            expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
    }
}

const MIN_SECRET_BYTES: usize = 32;

impl KeyArgs {
    /// The configured key set. Compose passes unset optional settings as empty strings,
    /// which count as unset.
    fn auth(&self) -> anyhow::Result<Auth> {
        let secret = match self.jwt_secret.as_deref().filter(|s| !s.is_empty()) {
            Some(s) => key_bytes("BACKVAULT_JWT_SECRET", s)?,
            None => bail!(
                "no JWT key: set BACKVAULT_JWT_SECRET (32+ random bytes) or run `backvault serve --dev`"
            ),
        };
        let previous = self
            .previous_secrets()
            .map(|s| key_bytes("BACKVAULT_JWT_PREVIOUS_SECRETS", s))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // Tokens find their key by id: two keys with one id would leave one unreachable.
        let mut seen: Vec<(String, &[u8])> = Vec::new();
        for key in std::iter::once(&secret).chain(&previous) {
            let kid = backvault_service::keys::key_id(key);
            if seen
                .iter()
                .any(|(id, other)| *id == kid && *other != key.as_slice())
            {
                bail!("two configured JWT keys share the key id {kid}; replace one of them");
            }
            seen.push((kid, key));
        }
        Ok(self.auth_with(secret, previous))
    }

    /// A random key nobody else holds, for `serve --dev`; a configured key is refused, so
    /// that a development server never signs with (or accepts tokens of) a real one.
    fn dev_auth(&self) -> anyhow::Result<Auth> {
        if self.jwt_secret.as_deref().is_some_and(|s| !s.is_empty())
            || self.previous_secrets().next().is_some()
        {
            bail!(
                "--dev signs with a random key and refuses to start with BACKVAULT_JWT_SECRET or BACKVAULT_JWT_PREVIOUS_SECRETS set: unset them, or run without --dev"
            );
        }
        let mut key = vec![0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Ok(self.auth_with(key, Vec::new()))
    }

    fn previous_secrets(&self) -> impl Iterator<Item = &str> {
        self.jwt_previous_secrets
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
    }

    fn auth_with(&self, secret: Vec<u8>, previous_secrets: Vec<Vec<u8>>) -> Auth {
        Auth::new(AuthConfig {
            secret,
            previous_secrets,
            issuer: self.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: self.jwt_audience.clone().filter(|s| !s.is_empty()),
        })
    }
}

fn key_bytes(setting: &str, key: &str) -> anyhow::Result<Vec<u8>> {
    if key.len() < MIN_SECRET_BYTES {
        bail!("{setting}: a key is shorter than {MIN_SECRET_BYTES} bytes; use a longer random key");
    }
    Ok(key.as_bytes().to_vec())
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
    let auth = if args.dev {
        args.key.dev_auth()?
    } else {
        args.key.auth()?
    };
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
        // On stderr, not in the log stream: logs are shipped and kept, a token must not be.
        eprintln!(
            "backvault --dev: admin token for all subscriptions, valid 24h (the key is random; restart invalidates it):"
        );
        eprintln!("export BACKVAULT_TOKEN={token}");
    }
    let config = backvault_service::Config {
        allow_clock_override: args.dev,
        ..args.jobs.config()
    };
    let service = Service::new(pool.clone(), auth, config);
    if !args.dev {
        // A --dev rehearsal on this database may have moved schedules into the future.
        service
            .forget_rehearsals()
            .await
            .context("cannot clear rehearsed schedule slots")?;
    }
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let background = tokio::spawn(service.clone().run_background(
        args.jobs.rescue_interval,
        Duration::from_secs(3600),
        background_stopped,
    ));
    let app = backvault_api::router_with(
        AppState {
            service: service.clone(),
        },
        &backvault_api::HttpOptions {
            cors_allowed_origins: args.cors_allowed_origins.clone(),
        },
    );
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let grace = Duration::from_secs(args.shutdown_grace_seconds);
    let stopping = service.clone();
    // A make-service built once: `serve(listener, router)` would clone the router's whole
    // route table and layer stack for every connection (~50 KB each under many agents).
    // It hands each request its connection's peer address, which the audit log records.
    let server = axum::serve(
        backvault_api::transport::ProblemListener(listener),
        app.into_make_service_with_connect_info::<backvault_api::transport::PeerAddr>(),
    )
    .with_graceful_shutdown(async move {
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
        Command::Token(args) => args.mint().await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}
