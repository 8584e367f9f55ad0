//! The real `backvault serve` binary, started on a free port (the one launcher of every
//! benchmark), and agents enrolled on it over HTTP as real agents enroll.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backvault_domain::agent::protocol::{EnrollRequest, EnrollResponse};
use backvault_domain::agent::{DeploymentModel, VmFacts};
use backvault_service::{Auth, AuthConfig, Role};
use uuid::Uuid;

/// The key the benchmark's server signs tokens with.
pub const JWT_SECRET: &str = "backvault-bench-secret-0123456789abcdef";

/// `--server-bin`, else `target/release/backvault` of this workspace.
pub fn server_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => crate::workspace_root().join("target/release/backvault"),
    };
    if !path.is_file() {
        bail!(
            "no server binary at {}; run `cargo build --release -p backvault` or pass --server-bin",
            path.display()
        );
    }
    Ok(path)
}

/// How to start the server, beyond `serve --listen 127.0.0.1:0 --log-format json` on the
/// benchmark's database.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// `--dev`: the server signs with a random key and prints an admin token, and takes
    /// the clock from `POST /v1/scheduler/run`. Otherwise it signs with [`JWT_SECRET`]
    /// and the admin token is minted here.
    pub dev: bool,
    /// More arguments of `serve`.
    pub args: Vec<String>,
    /// More environment variables.
    pub env: Vec<(&'static str, String)>,
}

/// The real server, killed when dropped.
pub struct Server {
    child: Child,
    pub base: String,
    pub pid: u32,
    /// A token of the admin role for every subscription.
    pub admin: String,
}

/// What the server's output tells while it starts.
enum Started {
    Listening(String),
    AdminToken(String),
}

impl Server {
    /// Starts `backvault serve` on `database_url` and waits for its "listening" log line
    /// (and, with `--dev`, its admin token). The server applies backvault's migrations
    /// itself.
    pub fn start(bin: &Path, database_url: &str, launch: &Launch) -> anyhow::Result<Self> {
        let mut command = Command::new(bin);
        command.arg("serve");
        if launch.dev {
            command.arg("--dev");
        }
        command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(&launch.args)
            .env("DATABASE_URL", database_url)
            .env_remove("BACKVAULT_DEV")
            .env_remove("BACKVAULT_LISTEN")
            .env_remove("BACKVAULT_JWT_PREVIOUS_SECRETS")
            .env_remove("BACKVAULT_JWT_ISSUER")
            .env_remove("BACKVAULT_JWT_AUDIENCE");
        if launch.dev {
            // --dev refuses a configured key.
            command.env_remove("BACKVAULT_JWT_SECRET");
        } else {
            command.env("BACKVAULT_JWT_SECRET", JWT_SECRET);
        }
        let mut child = command
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("server stdout")?;
        let stderr = child.stderr.take().context("server stderr")?;
        // From here on, dropping `server` kills the child.
        let mut server = Self {
            child,
            base: String::new(),
            pid,
            admin: String::new(),
        };
        let (tx, rx) = std::sync::mpsc::channel();
        // Both pipes are read to their end so the server never blocks on a full one. The
        // --dev admin token comes on stderr (kept out of the logs); the rest of stderr is
        // passed on.
        let token_tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                match line.strip_prefix("export BACKVAULT_TOKEN=") {
                    Some(token) => {
                        let _ = token_tx.send(Started::AdminToken(token.trim().to_owned()));
                    }
                    None => eprintln!("{line}"),
                }
            }
        });
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent
                    && let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                    && log["message"] == "listening"
                    && let Some(addr) = log["addr"].as_str()
                {
                    let _ = tx.send(Started::Listening(addr.to_owned()));
                    sent = true;
                }
            }
        });
        let mut addr = None;
        let mut admin = (!launch.dev).then(admin_token);
        let deadline = Instant::now() + Duration::from_secs(60);
        while addr.is_none() || admin.is_none() {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Started::Listening(a)) => addr = Some(a),
                Ok(Started::AdminToken(t)) => admin = admin.or(Some(t)),
                Err(_) => bail!(
                    "the server did not log \"listening\"{} within 60 s (exited or stuck)",
                    if launch.dev {
                        " and print its admin token"
                    } else {
                        ""
                    }
                ),
            }
        }
        server.base = format!("http://{}", addr.unwrap_or_default());
        server.admin = admin.unwrap_or_default();
        Ok(server)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP client for every agent: a connection per concurrent request, at most
/// `max_idle` of them kept.
pub fn http_client(max_idle: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(max_idle)
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .tcp_nodelay(true)
        .build()?)
}

/// Token signing and checking with [`JWT_SECRET`].
pub fn auth() -> Auth {
    Auth::new(AuthConfig {
        secret: JWT_SECRET.as_bytes().to_vec(),
        previous_secrets: Vec::new(),
        issuer: None,
        audience: None,
    })
}

/// An admin token for every subscription, signed with [`JWT_SECRET`].
fn admin_token() -> String {
    auth().mint(
        "backvault-bench",
        Role::Admin,
        vec!["*".into()],
        None,
        chrono::Duration::hours(4),
    )
}

#[derive(Debug, Clone)]
pub struct Agent {
    pub vm_id: Uuid,
    pub token: String,
}

/// Mints enrollment tokens as admin (`POST /v1/enrollment-tokens`, one per 100 agents, the
/// most one token enrolls) and enrolls `n` agents with them (`POST /v1/agent/enroll`),
/// `concurrency` at a time.
pub async fn enroll_agents(
    client: &reqwest::Client,
    server: &Server,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Agent>> {
    let mut tokens = Vec::new();
    for _ in 0..n.div_ceil(100) {
        let res = client
            .post(server.url("/v1/enrollment-tokens"))
            .bearer_auth(&server.admin)
            .json(&serde_json::json!({"subscription_id": "sub-1", "ttl_seconds": 7200, "max_uses": 100}))
            .send()
            .await?;
        let status = res.status();
        let body: serde_json::Value = res.json().await?;
        if !status.is_success() {
            bail!("POST /v1/enrollment-tokens: {status} {body}");
        }
        tokens.push(Arc::new(
            body["token"]
                .as_str()
                .context("enrollment token in the response")?
                .to_owned(),
        ));
    }
    let url = Arc::new(server.url("/v1/agent/enroll"));
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        let client = client.clone();
        let enrollment = tokens[i / 100].clone();
        let url = url.clone();
        let gate = gate.clone();
        set.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let req = EnrollRequest {
                facts: VmFacts {
                    name: format!("bench-vm-{i:05}"),
                    resource_group: "rg-bench".into(),
                    subscription_id: "sub-1".into(),
                    region: "westeurope".into(),
                    deployment_model: DeploymentModel::ResourceManager,
                    agent_version: "1.0.0".into(),
                    dotnet_version: "4.8".into(),
                    sql_iaas_extension: true,
                    other_backup_product: false,
                },
            };
            let res = client
                .post(url.as_str())
                .bearer_auth(enrollment.as_str())
                .json(&req)
                .send()
                .await?;
            let status = res.status();
            if !status.is_success() {
                bail!("POST /v1/agent/enroll: {status} {}", res.text().await?);
            }
            let enrolled: EnrollResponse = res.json().await?;
            Ok::<_, anyhow::Error>((
                i,
                Agent {
                    vm_id: enrolled.vm_id,
                    token: enrolled.agent_token,
                },
            ))
        });
    }
    let mut agents: Vec<Option<Agent>> = vec![None; n];
    while let Some(r) = set.join_next().await {
        let (i, agent) = r??;
        agents[i] = Some(agent);
    }
    Ok(agents.into_iter().flatten().collect())
}
