//! `backvault-agent` processes, each playing one VM from an inventory file in a directory
//! of the test's own.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::BIN;

/// The reference agent's binary, built beside the server by `cargo test --workspace`.
pub fn agent_bin() -> PathBuf {
    let path = Path::new(BIN).with_file_name("backvault-agent");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (or `cargo build -p backvault-agent` first)",
        path.display()
    );
    path
}

/// A directory of a test's own for its agents' inventories (`<vm>.toml`) and the state
/// and token files the agents keep beside them; removed when dropped.
pub struct Inventories {
    dir: PathBuf,
}

impl Inventories {
    /// `tag` names the test in the directory's name; the directory is the caller's alone
    /// (the tests of one binary run side by side in one process).
    pub fn new(tag: &str) -> Self {
        static CREATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CREATED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("backvault-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir }
    }

    /// The inventory file of `vm`.
    pub fn path(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}.toml"))
    }

    /// Writes (or rewrites: the agent reads it at every job) the inventory of `vm`.
    pub fn write(&self, vm: &str, toml: &str) -> PathBuf {
        let path = self.path(vm);
        std::fs::write(&path, toml).unwrap();
        path
    }
}

impl Drop for Inventories {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `backvault-agent` process playing one VM.
pub struct AgentProcess {
    pub child: Child,
    args: Vec<String>,
}

impl AgentProcess {
    pub fn start(server: &str, enrollment_token: &str, inventory: &Path) -> Self {
        Self::start_with(server, enrollment_token, inventory, &[])
    }

    /// Started with `extra` arguments too.
    pub fn start_with(
        server: &str,
        enrollment_token: &str,
        inventory: &Path,
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
        let child = Self::spawn(&args, enrollment_token);
        Self { child, args }
    }

    fn spawn(args: &[String], enrollment_token: &str) -> Child {
        Command::new(agent_bin())
            .args(args)
            .env("BACKVAULT_ENROLLMENT_TOKEN", enrollment_token)
            .env("BACKVAULT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap()
    }

    /// SIGKILL: no goodbye, the lease just stops being renewed.
    pub fn kill_hard(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self, enrollment_token: &str) {
        self.child = Self::spawn(&self.args, enrollment_token);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
