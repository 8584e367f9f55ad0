//! The real `backvault serve` binary, started on a free port, and agents enrolled on it
//! over HTTP as real agents enroll.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

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

pub struct Server {
    child: Child,
    pub base: String,
    pub pid: u32,
}

impl Server {
    /// Starts `backvault serve` on `database_url` and waits for its "listening" log line.
    pub fn start(bin: &Path, database_url: &str, extra_args: &[String]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(extra_args)
            .env("DATABASE_URL", database_url)
            .env("BACKVAULT_JWT_SECRET", JWT_SECRET)
            .env_remove("BACKVAULT_DEV")
            .env_remove("BACKVAULT_LISTEN")
            .env_remove("BACKVAULT_JWT_ISSUER")
            .env_remove("BACKVAULT_JWT_AUDIENCE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if !sent
                    && let Ok(log) = serde_json::from_str::<serde_json::Value>(&line)
                    && log["message"] == "listening"
                    && let Some(addr) = log["addr"].as_str()
                {
                    let _ = tx.send(addr.to_owned());
                    sent = true;
                }
            }
            // Keep draining so the server never blocks on a full pipe.
        });
        let mut server = Self {
            child,
            base: String::new(),
            pid,
        };
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => server.base = format!("http://{addr}"),
            Err(_) => bail!("the server did not log \"listening\" within 60 s (exited or stuck)"),
        }
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

/// One HTTP client for every agent: a connection per concurrent request, kept.
pub fn http_client(max_idle: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(max_idle)
        .timeout(Duration::from_secs(120))
        .no_proxy()
        .tcp_nodelay(true)
        .build()?)
}

pub fn admin_token() -> String {
    Auth::new(AuthConfig {
        secret: JWT_SECRET.as_bytes().to_vec(),
        previous_secrets: Vec::new(),
        issuer: None,
        audience: None,
    })
    .mint(
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
            .bearer_auth(admin_token())
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

/// A gauge or counter from `/metrics` (summed over its label sets).
pub async fn metric(
    client: &reqwest::Client,
    server: &Server,
    name: &str,
) -> anyhow::Result<Option<f64>> {
    let text = client
        .get(server.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let metric = line.split(['{', ' ']).next().unwrap_or("");
        if (metric == name || metric.ends_with(&format!("_{name}")))
            && let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    Ok(found)
}
