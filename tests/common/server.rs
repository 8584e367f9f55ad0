//! The `backvault` binary as an operator runs it: a database of its own per test, `serve`
//! started and awaited until it listens, the commands that refuse to start, `migrate` and
//! `token`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::Api;

pub const BIN: &str = env!("CARGO_BIN_EXE_backvault");

/// The key variables a test's server gets only when the test gives them: `--dev` refuses
/// to start with one configured, and the developer's shell may have them set.
const KEY_VARIABLES: [&str; 2] = ["BACKVAULT_JWT_SECRET", "BACKVAULT_JWT_PREVIOUS_SECRETS"];

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

/// `backvault serve` on a database of a test's own, started by [`Server::start`] and
/// ready: it has logged that it listens.
pub struct Server {
    pub child: Child,
    pub base: String,
    /// The admin token a `--dev` server prints.
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

    /// A client with the admin token of this `--dev` server.
    pub fn dev_api(&self) -> Api {
        Api::new(
            &self.base,
            self.token
                .as_deref()
                .expect("a --dev server prints a token"),
        )
    }

    /// The `host:port` the server listens on.
    pub fn addr(&self) -> &str {
        self.base.trim_start_matches("http://")
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
            .env_remove(KEY_VARIABLES[0])
            .env_remove(KEY_VARIABLES[1])
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

    /// Sends SIGTERM, as an orchestrator stopping the server does, and returns at once.
    pub fn signal_terminate(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Sends SIGTERM and waits (up to 10 s) for the server to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_terminate();
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

/// Runs `backvault serve` with `args` and `env` (and no key variables but those given)
/// when it is expected not to start: returns its output once it has exited.
pub fn serve_refused(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env_remove(KEY_VARIABLES[0])
        .env_remove(KEY_VARIABLES[1])
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// Runs `backvault migrate` on the test's database; it must succeed.
pub fn migrate(db: &TestDb) {
    let out = Command::new(BIN)
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A token minted by `backvault token`, as an operator would, with the key in `env`.
pub fn mint_token(role: &str, subscription: &str, ttl: &str, env: &[(&str, &str)]) -> String {
    mint_token_for("backvault-cli", role, subscription, ttl, env)
}

/// As [`mint_token`], for the person `subject` (approvals tell people apart).
pub fn mint_token_for(
    subject: &str,
    role: &str,
    subscription: &str,
    ttl: &str,
    env: &[(&str, &str)],
) -> String {
    let out = Command::new(BIN)
        .args([
            "token",
            "--subject",
            subject,
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

    /// Waits (up to 10 s) until a line containing every one of `needles` is logged, and
    /// returns it.
    pub async fn awaited(&self, needles: &[&str]) -> String {
        super::wait_for(
            Duration::from_secs(10),
            &format!("a server log line with {needles:?}"),
            || async move {
                self.0
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)))
                    .cloned()
                    .ok_or_else(|| "not logged yet".to_owned())
            },
        )
        .await
    }
}

/// A loopback address no one listens on now, for a server that must keep its address
/// across restarts (agents are given the server's URL once, at start).
pub fn free_local_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}
