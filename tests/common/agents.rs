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

    /// Where the agents of availability group `ag`'s replicas share its databases' state.
    pub fn shared_state(&self, ag: &str) -> PathBuf {
        self.dir.join(format!("{ag}.shared.json"))
    }

    /// Rewrites the inventory of `vm` while its agent runs: a new file renamed over the
    /// old, so that the agent reads one or the other whole, never half of the new one.
    pub fn replace(&self, vm: &str, toml: &str) {
        let path = self.path(vm);
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
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

/// An availability group whose replicas are reference agents, one VM per replica, each on
/// instance `MSSQLSERVER`:
///
/// ```ignore
/// let ag = AgSpec { name: "ag1", group_id: Uuid::new_v4(), backup_preference: "primary",
///     resource_group: "rg-sql", replicas: &["sqlvm-a", "sqlvm-b"], databases: &["orders"] };
/// let shared = inventories.shared_state(ag.name);
/// for (vm, role) in [("sqlvm-a", "primary"), ("sqlvm-b", "secondary")] {
///     let toml = ag_replica_inventory_toml(vm, &ag, role, 50, &shared, 0);
///     AgentProcess::start(&server.url, &token, &inventories.write(vm, &toml));
/// }
/// // ... then, while the agents run (discover again for the server to see it):
/// fail_over(&inventories, &ag, "sqlvm-b");
/// ```
pub struct AgSpec<'a> {
    pub name: &'a str,
    /// `sys.availability_groups.group_id`: the same in every replica's file.
    pub group_id: uuid::Uuid,
    /// `primary`, `secondary_only`, `prefer_secondary` or `any_replica`.
    pub backup_preference: &'a str,
    /// The resource group of every replica's VM.
    pub resource_group: &'a str,
    /// The VMs hosting a replica.
    pub replicas: &'a [&'a str],
    /// The group's databases, 1 MiB each. No recovery model to choose: SQL Server lets
    /// only databases in the full model into a group (and the agent refuses others).
    pub databases: &'a [&'a str],
}

/// The inventory of `vm`, hosting `ag`'s replica in `role` (`primary`, `secondary` or
/// `resolving`), healthy, with `priority` (0 to 100; 0: never chosen for backups), and the
/// group's databases, their state kept in `shared_state` with the other replicas' agents
/// (one file per group, the same for every replica: [`Inventories::shared_state`]).
pub fn ag_replica_inventory_toml(
    vm: &str,
    ag: &AgSpec<'_>,
    role: &str,
    priority: u8,
    shared_state: &Path,
    backup_millis: u64,
) -> String {
    assert!(
        ag.replicas.contains(&vm),
        "{vm} hosts no replica of {}",
        ag.name
    );
    let rg = ag.resource_group;
    let mut s = format!(
        "sysadmin = true\n\n[vm]\nname = \"{vm}\"\nresource_group = \"{rg}\"\nsubscription_id = \"sub-1\"\n\
         region = \"westeurope\"\ndeployment_model = \"resource_manager\"\nagent_version = \"1.0.0\"\n\
         dotnet_version = \"4.8\"\nsql_iaas_extension = true\nother_backup_product = false\n\n\
         [[instances]]\nname = \"MSSQLSERVER\"\nversion = \"2019\"\n\n[faults]\nbackup_millis = {backup_millis}\n\n\
         [[availability_groups]]\nname = \"{}\"\ngroup_id = \"{}\"\nbackup_preference = \"{}\"\nreplicas = [\n",
        ag.name, ag.group_id, ag.backup_preference
    );
    for replica in ag.replicas {
        s.push_str(&format!(
            "  {{ vm_name = \"{replica}\", resource_group = \"{rg}\", instance = \"MSSQLSERVER\" }},\n"
        ));
    }
    // Escaped as a TOML basic string: a Windows path has backslashes.
    let shared = shared_state
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    s.push_str(&format!(
        "]\nlocal = {{ instance = \"MSSQLSERVER\", role = \"{role}\", synchronization_health = \"healthy\", \
         backup_priority = {priority} }}\nshared_state = \"{shared}\"\n"
    ));
    for db in ag.databases {
        s.push_str(&format!(
            "\n[[databases]]\ninstance = \"MSSQLSERVER\"\nname = \"{db}\"\nrecovery_model = \"full\"\n\
             size_bytes = 1048576\navailability_group = \"{}\"\n",
            ag.name
        ));
    }
    s
}

/// Sets `key` of the local replica in the inventory of `vm`, written by
/// [`ag_replica_inventory_toml`], while its agent runs.
fn set_local(inventories: &Inventories, vm: &str, key: &str, value: &str) {
    let text = std::fs::read_to_string(inventories.path(vm)).unwrap();
    let from = format!("{key} = \"");
    let start = text
        .find(&from)
        .unwrap_or_else(|| panic!("{vm} has no {key}"))
        + from.len();
    let end = start + text[start..].find('"').unwrap();
    inventories.replace(vm, &format!("{}{value}{}", &text[..start], &text[end..]));
}

/// Makes `vm`'s replica `primary`, `secondary` or `resolving`. The agent acts on it at its
/// next backup; the server learns it at the VM's next discovery.
pub fn set_role(inventories: &Inventories, vm: &str, role: &str) {
    set_local(inventories, vm, "role", role);
}

/// Makes `vm`'s replica `healthy`, `partially_healthy` or `not_healthy` (a secondary
/// that is not healthy backs up no log).
pub fn set_synchronization_health(inventories: &Inventories, vm: &str, health: &str) {
    set_local(inventories, vm, "synchronization_health", health);
}

/// A failover of `ag` to `new_primary`: every other replica becomes secondary. The
/// replicas that were primary are demoted before the new one is promoted, so that no
/// agent ever sees two primaries (in between, a full backup fails retryably everywhere).
pub fn fail_over(inventories: &Inventories, ag: &AgSpec<'_>, new_primary: &str) {
    assert!(
        ag.replicas.contains(&new_primary),
        "{new_primary} hosts no replica of {}",
        ag.name
    );
    for vm in ag.replicas.iter().filter(|vm| **vm != new_primary) {
        set_role(inventories, vm, "secondary");
    }
    set_role(inventories, new_primary, "primary");
}
