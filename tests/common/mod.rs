//! Helpers for tests that run the real binaries: a database of their own, the server
//! started as an operator would, agents as separate processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_backvault");

/// A database of its own for one test, dropped at the end.
pub struct TestDb {
    admin_url: String,
    name: String,
    pub url: String,
}

impl TestDb {
    pub fn new() -> Self {
        let admin_url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let (server, _) = admin_url
            .rsplit_once('/')
            .expect("DATABASE_URL ends in /<database>");
        let name = format!("backvault_e2e_{}", uuid_suffix());
        Self {
            url: format!("{server}/{name}"),
            admin_url,
            name,
        }
    }

    /// The database's name, e.g. to find its sessions in `pg_stat_activity`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL of the same server for another database (`DATABASE_URL`): a session there
    /// outlives anything done to this database's sessions.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs outside the test's runtime; a small one of its own does the cleanup.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Runtime::new().unwrap().block_on(async {
                use sqlx::Connection;
                if let Ok(mut c) = sqlx::PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "drop database if exists \"{name}\" with (force)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            })
        })
        .join();
    }
}

fn uuid_suffix() -> String {
    format!(
        "{:x}{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub token: Option<String>,
}

impl Server {
    /// Starts `backvault serve` on a free port and waits until it listens.
    pub fn start(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(db, "127.0.0.1:0", args, env, None)
    }

    /// Starts `backvault serve` listening on `listen` (e.g. the address of a server this
    /// one replaces, which agents were started with), and keeps its log lines.
    pub fn start_logged(
        db: &TestDb,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> (Self, ServerLog) {
        let log = ServerLog::default();
        let server = Self::launch(db, listen, args, env, Some(log.clone()));
        (server, log)
    }

    fn launch(
        db: &TestDb,
        listen: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: Option<ServerLog>,
    ) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", listen, "--log-format", "json"])
            .args(args)
            .env("DATABASE_URL", &db.url)
            // Only the keys a test gives: `--dev` refuses to start with one configured.
            .env_remove("BACKVAULT_JWT_SECRET")
            .env_remove("BACKVAULT_JWT_PREVIOUS_SECRETS")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // `--dev` prints its admin token on stderr, away from the logs on stdout; the rest
        // of stderr is passed through.
        let (token_tx, token_rx) = std::sync::mpsc::channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                match line.strip_prefix("export BACKVAULT_TOKEN=") {
                    Some(token) => {
                        let _ = token_tx.send(token.to_owned());
                    }
                    None => eprintln!("{line}"),
                }
            }
        });
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("server exited before listening")
                .unwrap();
            if let Some(log) = &log {
                log.push(&line);
            }
            assert!(
                !line.contains("BACKVAULT_TOKEN"),
                "the dev token stays out of the log stream: {line}"
            );
            if let Ok(log) = serde_json::from_str::<Value>(&line)
                && log["message"] == "listening"
            {
                break log["addr"].as_str().unwrap().to_owned();
            }
        };
        // Printed before the server listens; the reading thread may just lag behind.
        let token = args
            .contains(&"--dev")
            .then(|| token_rx.recv_timeout(Duration::from_secs(10)).ok())
            .flatten();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || match log {
            Some(log) => lines.map_while(Result::ok).for_each(|l| log.push(&l)),
            None => lines.for_each(drop),
        });
        Self {
            child,
            base: format!("http://{addr}"),
            token,
        }
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("server did not stop within 10s of SIGTERM");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The log lines of a server started with [`Server::start_logged`], as it wrote them.
#[derive(Clone, Default)]
pub struct ServerLog(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ServerLog {
    fn push(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_owned());
    }

    /// The lines logged at `level` (`ERROR`, `WARN`, ...).
    pub fn at_level(&self, level: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["level"] == level))
            .cloned()
            .collect()
    }

    /// The lines that contain `needle`, e.g. a request's `x-request-id`.
    pub fn containing(&self, needle: &str) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

/// A loopback address no one listens on now, for a server that must keep its address
/// across restarts (agents are given the server's URL once, at start).
pub fn free_local_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

/// The reference agent's binary, built beside the server by `cargo test --workspace`.
pub fn agent_bin() -> std::path::PathBuf {
    let path = std::path::Path::new(BIN).with_file_name("backvault-agent");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p backvault-agent` first)",
        path.display()
    );
    path
}

/// A `backvault-agent` process playing one VM.
pub struct AgentProcess {
    pub child: Child,
    args: Vec<String>,
}

impl AgentProcess {
    pub fn start(server: &str, enrollment_token: &str, inventory: &std::path::Path) -> Self {
        Self::start_with(server, enrollment_token, inventory, &[])
    }

    /// Started with `extra` arguments too.
    pub fn start_with(
        server: &str,
        enrollment_token: &str,
        inventory: &std::path::Path,
        extra: &[&str],
    ) -> Self {
        let mut args = vec![
            "--server".to_owned(),
            server.to_owned(),
            "--inventory".to_owned(),
            inventory.display().to_string(),
            "--heartbeat-seconds".to_owned(),
            "1".to_owned(),
            "--claim-wait-seconds".to_owned(),
            "5".to_owned(),
            "--state-file".to_owned(),
            inventory.with_extension("state.json").display().to_string(),
            // A restarted agent refreshes its saved token: enrollment tokens are single-use.
            "--token-file".to_owned(),
            inventory.with_extension("token").display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let child = Command::new(agent_bin())
            .args(&args)
            .env("BACKVAULT_ENROLLMENT_TOKEN", enrollment_token)
            .env("BACKVAULT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self { child, args }
    }

    /// SIGKILL: no goodbye, the lease just stops being renewed.
    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self, enrollment_token: &str) {
        self.child = Command::new(agent_bin())
            .args(&self.args)
            .env("BACKVAULT_ENROLLMENT_TOKEN", enrollment_token)
            .env("BACKVAULT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small HTTP client for one server and token.
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
}

impl Api {
    pub fn new(base: &str, token: &str) -> Self {
        Self {
            http: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let res = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        )
    }

    /// An enrollment token for as many agents as a test starts (up to 100).
    pub async fn enrollment_token(&self, subscription: &str) -> String {
        self.enrollment_token_for(subscription, 100).await
    }

    /// An enrollment token that enrolls `uses` VMs.
    pub async fn enrollment_token_for(&self, subscription: &str, uses: u32) -> String {
        let (status, body) = self
            .post(
                "/v1/enrollment-tokens",
                serde_json::json!({"subscription_id": subscription, "max_uses": uses}),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// Waits (server-side long-polls) until the job has finished; returns it.
    pub async fn finished_job(&self, id: &str) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, job) = self.get(&format!("/v1/jobs/{id}?wait=10s")).await;
            assert_eq!(status, 200, "{job}");
            let state = job["status"].as_str().unwrap();
            if !matches!(state, "queued" | "in_progress") {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} did not finish: {job}"
            );
        }
    }

    /// Waits until `check` holds for the job.
    pub async fn job_until(&self, id: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (_, job) = self.get(&format!("/v1/jobs/{id}?wait=2s")).await;
            if check(&job) {
                return job;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "job {id} never got there: {job}"
            );
        }
    }
}

/// A TOML inventory for the reference agent.
pub fn inventory_toml(
    vm: &str,
    dotnet: &str,
    sysadmin: bool,
    databases: &[&str],
    backup_millis: u64,
) -> String {
    let mut s = format!(
        "sysadmin = {sysadmin}\n\n[vm]\nname = \"{vm}\"\nresource_group = \"rg-sql\"\nsubscription_id = \"sub-1\"\n\
         region = \"westeurope\"\ndeployment_model = \"resource_manager\"\nagent_version = \"1.0.0\"\n\
         dotnet_version = \"{dotnet}\"\nsql_iaas_extension = true\nother_backup_product = false\n\n\
         [[instances]]\nname = \"MSSQLSERVER\"\nversion = \"2019\"\n\n[faults]\nbackup_millis = {backup_millis}\n"
    );
    for db in databases {
        s.push_str(&format!(
            "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"{db}\"\nrecovery_model = \"full\"\nsize_bytes = 1048576\n"
        ));
    }
    s
}

/// A token minted by `backvault token`, as an operator would, with the key in `env`.
pub fn mint_token(role: &str, subscription: &str, ttl: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new(BIN)
        .args([
            "token",
            "--role",
            role,
            "--subscription",
            subscription,
            "--ttl",
            ttl,
        ])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}
