//! The inventory file: the VM, SQL Server and faults this agent pretends to have.
//!
//! TOML, or JSON when the file name ends in `.json`. It is re-read before every job, so a
//! test can add a database, turn on a fault or fail an availability group over while the
//! agent runs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail, ensure};
use backvault_domain::agent::{
    AvailabilityGroup, LocalReplica, MAX_BACKUP_PRIORITY, RecoveryModel, RecoveryPointType,
    SqlDatabase, SqlInstance, SqlInventory, VmFacts,
};
use serde::Deserialize;

use crate::sim::Activity;
use crate::store::{DbKey, SharedDb};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryFile {
    pub vm: VmSection,
    /// Whether the backup service account is a SQL sysadmin. May also be written inside
    /// `[vm]`, which is where it lands in TOML when it is written after that table.
    #[serde(default)]
    sysadmin: Option<bool>,
    #[serde(default)]
    pub instances: Vec<Instance>,
    #[serde(default)]
    pub availability_groups: Vec<AgEntry>,
    #[serde(default)]
    pub databases: Vec<DatabaseEntry>,
    #[serde(default)]
    pub faults: Faults,
}

/// `[[databases]]`: what discovery reports, and how the simulated database behaves.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct DatabaseEntry {
    pub sql: SqlDatabase,
    pub sim: Simulation,
}

/// A database's behaviour beyond what discovery reports. All off by default.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Simulation {
    /// Transactions are always open: a data backup's `first_lsn` (the oldest active
    /// transaction) lies below its `checkpoint_lsn`, and the log moves between backups.
    pub busy: bool,
    /// Minimally logged operations (bulk imports, index rebuilds) run: in the bulk-logged
    /// model, log backups then hold bulk-logged changes.
    pub bulk_operations: bool,
    /// Report LSNs in SQL Server's textual form (`0000002a:00000010:0001`).
    pub textual_lsns: bool,
    /// Backups another tool takes, each once (by `id`), before the next job on this
    /// database: they move the database like backvault's but are never reported.
    pub external_backups: Vec<ExternalBackup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalBackup {
    pub id: String,
    /// `full`, `copy_only_full`, `differential` or `log`.
    #[serde(rename = "type")]
    pub kind: RecoveryPointType,
}

/// The keys of [`Simulation`]; the rest of a `[[databases]]` table is discovery's.
const SIMULATION_KEYS: [&str; 4] = [
    "busy",
    "bulk_operations",
    "textual_lsns",
    "external_backups",
];

// Not `#[serde(flatten)]`: it would make misspelt fields pass unnoticed, and the fields of
// `SqlDatabase` belong to the domain crate.
impl TryFrom<serde_json::Map<String, serde_json::Value>> for DatabaseEntry {
    type Error = serde_json::Error;

    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        use serde::de::Error;
        let mut sim = serde_json::Map::new();
        for key in SIMULATION_KEYS {
            if let Some(value) = map.remove(key) {
                sim.insert(key.to_owned(), value);
            }
        }
        let sim: Simulation = serde_json::from_value(serde_json::Value::Object(sim))?;
        let given: Vec<String> = map.keys().cloned().collect();
        let sql: SqlDatabase = serde_json::from_value(serde_json::Value::Object(map))?;
        let known = serde_json::to_value(&sql)?;
        if let Some(unknown) = given.iter().find(|key| known.get(key.as_str()).is_none()) {
            return Err(Error::custom(format!(
                "unknown field `{unknown}` of database {}",
                sql.name
            )));
        }
        Ok(Self { sql, sim })
    }
}

impl DatabaseEntry {
    pub fn activity(&self) -> Activity {
        Activity {
            busy: self.sim.busy,
            bulk_operations: self.sim.bulk_operations,
        }
    }
}

/// `[[availability_groups]]`: a group this VM hosts a replica of, as SQL Server shows it
/// here (every replica, and this VM's own replica's role and health), and where the
/// agents of its replicas keep its databases.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct AgEntry {
    pub group: AvailabilityGroup,
    /// The state file the agents of every replica share for the group's databases (their
    /// LSNs and backup history): an availability database has one log, so its LSNs and
    /// its backups are the group's, not a replica's. Relative to the inventory file's
    /// directory. Without it, each agent keeps its own, as for any other database.
    pub shared_state: Option<PathBuf>,
}

impl TryFrom<serde_json::Map<String, serde_json::Value>> for AgEntry {
    type Error = serde_json::Error;

    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        use serde::de::Error;
        let shared_state = map
            .remove("shared_state")
            .map(serde_json::from_value)
            .transpose()?;
        let given = serde_json::Value::Object(map);
        let group: AvailabilityGroup = serde_json::from_value(given.clone())?;
        if let Some(unknown) = unknown_field(&given, &serde_json::to_value(&group)?) {
            return Err(Error::custom(format!(
                "unknown field `{unknown}` of availability group {}",
                group.name
            )));
        }
        Ok(Self {
            group,
            shared_state,
        })
    }
}

/// The first field `given` has and `parsed` (what it parsed to, serialized again) lacks:
/// a misspelling the domain's types, which let newer agents add fields, do not refuse. A
/// field at the default that serialization leaves out (`false`, null) is not one.
fn unknown_field(given: &serde_json::Value, parsed: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match (given, parsed) {
        (Value::Object(given), Value::Object(parsed)) => {
            given.iter().find_map(|(key, value)| match parsed.get(key) {
                Some(parsed) => unknown_field(value, parsed).map(|inner| {
                    let dot = if inner.starts_with('[') { "" } else { "." };
                    format!("{key}{dot}{inner}")
                }),
                None if matches!(value, Value::Null | Value::Bool(false)) => None,
                None => Some(key.clone()),
            })
        }
        (Value::Array(given), Value::Array(parsed)) => given
            .iter()
            .zip(parsed)
            .enumerate()
            .find_map(|(i, (g, p))| unknown_field(g, p).map(|inner| format!("[{i}].{inner}"))),
        _ => None,
    }
}

/// `[vm]`: the VM's facts, and perhaps `sysadmin`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "serde_json::Map<String, serde_json::Value>")]
pub struct VmSection {
    pub facts: VmFacts,
    sysadmin: Option<bool>,
}

// Not `#[serde(flatten)]`: it would make `VmFacts` ignore misspelt fields instead of
// rejecting them.
impl TryFrom<serde_json::Map<String, serde_json::Value>> for VmSection {
    type Error = serde_json::Error;

    fn try_from(mut map: serde_json::Map<String, serde_json::Value>) -> Result<Self, Self::Error> {
        let sysadmin = map
            .remove("sysadmin")
            .map(serde_json::from_value)
            .transpose()?;
        let facts = serde_json::from_value(serde_json::Value::Object(map))?;
        Ok(Self { facts, sysadmin })
    }
}

/// `[[instances]]`: a SQL Server instance.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Instance {
    pub name: String,
    /// e.g. `2019`, `2012`, `2008 R2`.
    pub version: String,
    /// The server collation is case-sensitive (e.g. `Latin1_General_CS_AS`): `Sales` and
    /// `sales` are two databases, and a job must spell a name exactly. SQL Server's default
    /// collation ignores case.
    #[serde(default)]
    pub case_sensitive: bool,
}

impl Instance {
    /// Whether two names resolve to one database on this instance.
    pub fn same_database(&self, a: &str, b: &str) -> bool {
        fold(a, self.case_sensitive) == fold(b, self.case_sensitive)
    }
}

/// A database name as an instance with this collation compares it.
fn fold(name: &str, case_sensitive: bool) -> Cow<'_, str> {
    if case_sensitive {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(name.to_lowercase())
    }
}

/// Misbehaviour to simulate.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Faults {
    /// Probability that a job fails with a retryable `UserErrorOpeningSQLConnection`.
    pub failure_rate: f64,
    /// Simulated duration of every job.
    pub backup_millis: u64,
    /// Exit abruptly right after claiming a job, as if the VM lost power.
    pub crash_after_claim: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            failure_rate: 0.0,
            backup_millis: 200,
            crash_after_claim: false,
        }
    }
}

impl InventoryFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading inventory {}", path.display()))?;
        let is_json = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("json"));
        let file = if is_json {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        };
        let mut file = file.with_context(|| format!("inventory {}", path.display()))?;
        // The agents of a group's replicas run from different directories, or with
        // different working directories: what the file means is where it lies.
        let dir = path.parent().unwrap_or(Path::new(""));
        for ag in &mut file.availability_groups {
            if let Some(shared) = &mut ag.shared_state
                && shared.is_relative()
            {
                *shared = dir.join(&*shared);
            }
        }
        Ok(file)
    }

    pub fn from_toml(text: &str) -> anyhow::Result<Self> {
        let file: Self = toml::from_str(text)?;
        file.validated()
    }

    pub fn from_json(text: &str) -> anyhow::Result<Self> {
        let file: Self = serde_json::from_str(text)?;
        file.validated()
    }

    pub fn facts(&self) -> &VmFacts {
        &self.vm.facts
    }

    /// Defaults to true: an agent that cannot discover anything is the unusual case.
    pub fn sysadmin(&self) -> bool {
        self.sysadmin.or(self.vm.sysadmin).unwrap_or(true)
    }

    /// What a discovery job reports.
    pub fn sql_inventory(&self) -> SqlInventory {
        SqlInventory {
            instances: self
                .instances
                .iter()
                .map(|i| SqlInstance {
                    name: i.name.clone(),
                    version: i.version.clone(),
                })
                .collect(),
            availability_groups: self
                .availability_groups
                .iter()
                .map(|ag| ag.group.clone())
                .collect(),
            databases: self.databases.iter().map(|d| d.sql.clone()).collect(),
        }
    }

    /// Instance names ignore case whatever the collation: they name Windows services.
    pub fn instance(&self, name: &str) -> Option<&Instance> {
        self.instances
            .iter()
            .find(|i| i.name.eq_ignore_ascii_case(name))
    }

    /// The database a job names, resolved as SQL Server would under the instance's
    /// collation.
    pub fn database(&self, instance: &str, name: &str) -> Option<&DatabaseEntry> {
        let instance = self.instance(instance)?;
        self.databases.iter().find(|d| {
            d.sql.instance.eq_ignore_ascii_case(&instance.name)
                && instance.same_database(&d.sql.name, name)
        })
    }

    /// Where the simulated database a job names is kept: one key however jobs spell the
    /// name, whether or not the file lists it (a restore may create it; a backup may have
    /// been taken before it was dropped).
    pub fn db_key(&self, instance: &str, name: &str) -> DbKey {
        let case_sensitive = self.instance(instance).is_some_and(|i| i.case_sensitive);
        DbKey::new(instance, &fold(name, case_sensitive))
    }

    /// The availability group a database is in, by the name its entry gives.
    pub fn group_of(&self, db: &SqlDatabase) -> Option<&AgEntry> {
        let name = db.availability_group.as_deref()?;
        self.availability_groups
            .iter()
            .find(|ag| ag.group.name.eq_ignore_ascii_case(name))
    }

    /// This VM's replica of `ag`: the `local` it is given, or else (as an agent that
    /// predates `local` reports it) its entry in `replicas`. Every group of a loaded file
    /// has one.
    pub fn local_replica(&self, ag: &AgEntry) -> Option<LocalReplica> {
        let vm = self.facts();
        ag.group.local_replica(&vm.name, &vm.resource_group)
    }

    /// Every database of the file whose group keeps its state in a shared file, and that
    /// file.
    pub fn shared_databases(&self) -> Vec<SharedDb> {
        self.databases
            .iter()
            .filter_map(|entry| {
                let file = self.group_of(&entry.sql)?.shared_state.clone()?;
                Some(SharedDb {
                    key: self.db_key(&entry.sql.instance, &entry.sql.name),
                    file,
                })
            })
            .collect()
    }

    /// Catches mistakes in hand-written files here rather than as odd server behaviour.
    fn validated(self) -> anyhow::Result<Self> {
        if let (Some(top), Some(in_vm)) = (self.sysadmin, self.vm.sysadmin) {
            ensure!(top == in_vm, "`sysadmin` is set twice, to different values");
        }
        ensure!(
            (0.0..=1.0).contains(&self.faults.failure_rate),
            "faults.failure_rate must be between 0 and 1"
        );
        for (i, instance) in self.instances.iter().enumerate() {
            if self.instances[..i]
                .iter()
                .any(|other| other.name.eq_ignore_ascii_case(&instance.name))
            {
                bail!("instance {} is listed twice", instance.name);
            }
        }
        for (i, ag) in self.availability_groups.iter().enumerate() {
            let name = &ag.group.name;
            ensure!(
                self.availability_groups[..i]
                    .iter()
                    .all(|other| !other.group.name.eq_ignore_ascii_case(name)),
                "availability group {name} is listed twice"
            );
            if let Some(shared) = &ag.shared_state {
                ensure!(
                    self.availability_groups[..i]
                        .iter()
                        .all(|other| other.shared_state.as_ref() != Some(shared)),
                    "availability groups share shared_state {}: each group needs a file of its own",
                    shared.display()
                );
            }
            let Some(local) = self.local_replica(ag) else {
                bail!(
                    "availability group {name} has no `local` replica (and none of its \
                     `replicas` is this VM with a `primary` flag)"
                );
            };
            ensure!(
                self.instance(&local.instance).is_some(),
                "availability group {name} has its local replica on instance {}, which is not \
                 in `instances`",
                local.instance
            );
            ensure!(
                local.backup_priority <= MAX_BACKUP_PRIORITY,
                "availability group {name}: backup_priority is 0 to {MAX_BACKUP_PRIORITY}"
            );
            let vm = self.facts();
            ensure!(
                ag.group.replicas.iter().any(|r| {
                    r.vm_name.eq_ignore_ascii_case(&vm.name)
                        && r.resource_group.eq_ignore_ascii_case(&vm.resource_group)
                        && r.instance.eq_ignore_ascii_case(&local.instance)
                }),
                "availability group {name}: `replicas` lists every replica, this VM's ({}/{}, \
                 instance {}) too",
                vm.resource_group,
                vm.name,
                local.instance
            );
        }
        for (i, entry) in self.databases.iter().enumerate() {
            let db = &entry.sql;
            let Some(instance) = self.instance(&db.instance) else {
                bail!(
                    "database {} is on instance {}, which is not in `instances`",
                    db.name,
                    db.instance
                );
            };
            ensure!(
                db.size_bytes >= 0,
                "database {} has a negative size",
                db.name
            );
            if let Some(name) = &db.availability_group {
                let Some(ag) = self.group_of(db) else {
                    bail!(
                        "database {} is in availability group {name}, which is not in `availability_groups`",
                        db.name
                    );
                };
                let local = self.local_replica(ag).map(|l| l.instance);
                ensure!(
                    local.is_some_and(|l| l.eq_ignore_ascii_case(&db.instance)),
                    "database {} is in availability group {name}, whose replica on this VM is \
                     not on instance {}",
                    db.name,
                    db.instance
                );
                // SQL Server adds only user databases in the full recovery model to a group,
                // and refuses to change the model of one in it (Msg 1468).
                ensure!(
                    !db.system && db.recovery_model == RecoveryModel::Full,
                    "database {} is in availability group {name}: an availability database \
                     is a user database in the full recovery model",
                    db.name
                );
            }
            if self.databases[..i].iter().any(|other| {
                other.sql.instance.eq_ignore_ascii_case(&db.instance)
                    && instance.same_database(&other.sql.name, &db.name)
            }) {
                bail!("database {}/{} is listed twice", db.instance, db.name);
            }
            for (j, external) in entry.sim.external_backups.iter().enumerate() {
                ensure!(
                    !external.id.is_empty(),
                    "database {} has an external backup without an id",
                    db.name
                );
                ensure!(
                    entry.sim.external_backups[..j]
                        .iter()
                        .all(|other| other.id != external.id),
                    "database {} lists external backup {} twice",
                    db.name,
                    external.id
                );
            }
        }
        Ok(self)
    }
}

/// Whether log backups are possible: only the simple recovery model truncates the log.
#[cfg(test)]
pub fn supports_log_backup(db: &SqlDatabase) -> bool {
    db.recovery_model != RecoveryModel::Simple
}

/// The inventory file, re-read on demand, remembering the last version that parsed.
pub struct InventorySource {
    path: PathBuf,
    last_good: Mutex<Arc<InventoryFile>>,
}

impl InventorySource {
    /// Fails if the file is unreadable now: better to refuse to start than to run empty.
    pub fn open(path: PathBuf) -> anyhow::Result<Self> {
        let file = InventoryFile::load(&path)?;
        Ok(Self {
            path,
            last_good: Mutex::new(Arc::new(file)),
        })
    }

    /// Reads the file again.
    pub fn reload(&self) -> anyhow::Result<Arc<InventoryFile>> {
        let file = Arc::new(InventoryFile::load(&self.path)?);
        *self.last_good.lock().expect("inventory lock") = Arc::clone(&file);
        Ok(file)
    }

    /// The file as it is now, or as it last parsed if someone is halfway through editing it.
    pub fn current(&self) -> Arc<InventoryFile> {
        self.reload().unwrap_or_else(|e| {
            tracing::warn!(
                error = format!("{e:#}"),
                "inventory unreadable, using the last good one"
            );
            self.last_good()
        })
    }

    pub fn last_good(&self) -> Arc<InventoryFile> {
        Arc::clone(&self.last_good.lock().expect("inventory lock"))
    }
}

#[cfg(test)]
mod tests {
    use backvault_domain::agent::{
        BackupPreference, DeploymentModel, ReplicaRole, SynchronizationHealth,
    };

    use super::*;

    const TOML: &str = r#"
sysadmin = false

[vm]
name = "sqlvm-01"
resource_group = "rg-sql"
subscription_id = "sub-1"
region = "westeurope"
deployment_model = "resource_manager"
agent_version = "2.1.0"
dotnet_version = "4.8"
sql_iaas_extension = true
other_backup_product = false

[[instances]]
name = "MSSQLSERVER"
version = "2019"

[[availability_groups]]
name = "ag1"
backup_preference = "secondary"
replicas = [
  { vm_name = "sqlvm-01", resource_group = "rg-sql", instance = "MSSQLSERVER", primary = true },
]

[[databases]]
instance = "MSSQLSERVER"
name = "sales"
recovery_model = "full"
size_bytes = 1073741824
availability_group = "ag1"

[[databases]]
instance = "mssqlserver"
name = "scratch"
recovery_model = "simple"
size_bytes = 1024
system = true

[faults]
failure_rate = 0.25
crash_after_claim = true
"#;

    #[test]
    fn parses_toml() {
        let file = InventoryFile::from_toml(TOML).unwrap();
        assert_eq!(file.facts().name, "sqlvm-01");
        assert_eq!(
            file.facts().deployment_model,
            DeploymentModel::ResourceManager
        );
        assert!(!file.sysadmin());
        assert_eq!(file.instances.len(), 1);
        assert_eq!(
            file.availability_groups[0].group.backup_preference,
            BackupPreference::PreferSecondary,
            "as agents before availability groups became items wrote it"
        );
        assert_eq!(file.databases.len(), 2);
        assert_eq!(
            file.databases[0].sql.availability_group.as_deref(),
            Some("ag1")
        );
        assert!(file.databases[1].sql.system && !file.databases[1].sql.read_only);
        assert_eq!(
            file.databases[1].sim,
            Simulation::default(),
            "knobs are off by default"
        );
        assert_eq!(file.faults.failure_rate, 0.25);
        assert_eq!(file.faults.backup_millis, 200, "unset faults keep defaults");
        assert!(file.faults.crash_after_claim);
        assert_eq!(
            file.database("MSSQLSERVER", "SALES")
                .map(|d| d.sql.size_bytes),
            Some(1 << 30)
        );
        assert!(!supports_log_backup(
            &file.database("MSSQLSERVER", "scratch").unwrap().sql
        ));
        let inventory = file.sql_inventory();
        assert_eq!(
            inventory.databases,
            file.databases
                .iter()
                .map(|d| d.sql.clone())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn parses_json() {
        let json = r#"{
            "vm": {
                "name": "sqlvm-02", "resource_group": "rg", "subscription_id": "sub-2",
                "region": "northeurope", "deployment_model": "classic", "agent_version": "2.0",
                "dotnet_version": "4.7.2", "sql_iaas_extension": false,
                "other_backup_product": true
            },
            "instances": [{"name": "SQL2012", "version": "2012"}],
            "databases": [
                {"instance": "SQL2012", "name": "a+b", "recovery_model": "bulk_logged",
                 "size_bytes": 5, "read_only": true}
            ],
            "faults": {"backup_millis": 0}
        }"#;
        let file = InventoryFile::from_json(json).unwrap();
        assert_eq!(file.facts().deployment_model, DeploymentModel::Classic);
        assert!(file.facts().other_backup_product);
        assert!(file.sysadmin(), "sysadmin defaults to true");
        assert!(file.availability_groups.is_empty());
        assert_eq!(
            file.databases[0].sql.recovery_model,
            RecoveryModel::BulkLogged
        );
        assert_eq!(file.faults.backup_millis, 0);
        assert_eq!(file.faults.failure_rate, 0.0);
    }

    #[test]
    fn sysadmin_may_sit_inside_vm() {
        let toml = TOML.replace("sysadmin = false\n", "").replace(
            "other_backup_product = false",
            "other_backup_product = false\nsysadmin = false",
        );
        assert!(!InventoryFile::from_toml(&toml).unwrap().sysadmin());
    }

    #[test]
    fn rejects_mistakes() {
        let cases = [
            (
                TOML.replace("failure_rate = 0.25", "failure_rate = 2.0"),
                "failure_rate",
            ),
            (
                TOML.replace("instance = \"mssqlserver\"", "instance = \"OTHER\""),
                "not in `instances`",
            ),
            (
                TOML.replace("name = \"scratch\"", "name = \"Sales\""),
                "listed twice",
            ),
            (
                TOML.replace("crash_after_claim", "crash_after_clam"),
                "unknown field",
            ),
            (
                TOML.replace(
                    "version = \"2019\"",
                    "version = \"2019\"\ncase_sensitve = true",
                ),
                "unknown field",
            ),
            (TOML.replace("region = \"westeurope\"\n", ""), "region"),
            (
                TOML.replace("dotnet_version", "dotnet_verison"),
                "dotnet_verison",
            ),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", InventoryFile::from_toml(&text).unwrap_err());
            assert!(err.contains(expected), "{err:?} should mention {expected}");
        }
    }

    #[test]
    fn case_sensitive_instances_tell_names_apart_by_case() {
        let toml = TOML
            .replace(
                "version = \"2019\"",
                "version = \"2019\"\ncase_sensitive = true",
            )
            .replace("name = \"scratch\"", "name = \"Sales\"");
        let file = InventoryFile::from_toml(&toml).unwrap();
        let exact = |name: &str| file.database("mssqlserver", name).map(|d| d.sql.size_bytes);
        assert_eq!(exact("sales"), Some(1 << 30));
        assert_eq!(exact("Sales"), Some(1024));
        assert_eq!(exact("SALES"), None, "names resolve exactly");
        assert_ne!(
            file.db_key("MSSQLSERVER", "sales"),
            file.db_key("MSSQLSERVER", "Sales")
        );

        let twice = toml.replace("name = \"Sales\"", "name = \"sales\"");
        let err = format!("{:#}", InventoryFile::from_toml(&twice).unwrap_err());
        assert!(err.contains("listed twice"), "{err}");

        let file = InventoryFile::from_toml(TOML).unwrap();
        assert!(!file.instances[0].case_sensitive, "SQL Server's default");
        assert_eq!(
            file.db_key("MSSQLSERVER", "SALES"),
            file.db_key("mssqlserver", "sales")
        );
    }

    #[test]
    fn the_sample_inventory_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample-inventory.toml");
        let file = InventoryFile::load(&path).unwrap();
        assert!(file.sysadmin());
        assert_eq!(file.instances.len(), 2);
        assert!(file.databases.len() >= 6);
        assert!(file.databases.iter().any(|d| !supports_log_backup(&d.sql)));
        assert!(file.databases.iter().any(|d| d.sql.name.contains('+')));
        assert!(file.databases.iter().any(|d| d.sim.busy));
        assert!(file.databases.iter().any(|d| d.sim.bulk_operations
            && d.sql.recovery_model == RecoveryModel::BulkLogged));
    }

    /// The sample with its commented-out availability group in it.
    fn sample_with_its_group() -> String {
        let sample = include_str!("../sample-inventory.toml");
        let block: String = sample
            .lines()
            .skip_while(|line| *line != "# [[availability_groups]]")
            .take_while(|line| line.starts_with('#'))
            .map(|line| {
                line.strip_prefix("# ")
                    .unwrap_or(line.trim_start_matches('#'))
            })
            .map(|line| format!("{line}\n"))
            .collect();
        assert!(block.contains("availability_group = "), "{block:?}");
        format!("{sample}\n{block}")
    }

    #[test]
    fn the_sample_availability_group_parses_and_is_reported_as_written() {
        let dir = std::env::temp_dir().join(format!("backvault-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("sqlvm-01.toml");
        std::fs::write(&path, sample_with_its_group()).unwrap();
        let file = InventoryFile::load(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        let ag = &file.availability_groups[0];
        assert_eq!(
            ag.shared_state,
            Some(dir.join("ag-orders.state.json")),
            "beside the inventory"
        );
        let reported = &file.sql_inventory().availability_groups[0];
        assert_eq!(reported, &ag.group);
        assert_eq!(
            reported.group_id,
            Some("2f4e8a3c-55c1-4c6e-9a57-0d3b7e1f9a64".parse().unwrap())
        );
        assert_eq!(
            reported.backup_preference,
            BackupPreference::PreferSecondary
        );
        assert_eq!(reported.replicas.len(), 2);
        assert!(reported.replicas.iter().all(|r| !r.primary));
        assert_eq!(
            reported.local,
            Some(LocalReplica {
                instance: "MSSQLSERVER".into(),
                role: ReplicaRole::Primary,
                synchronization_health: SynchronizationHealth::Healthy,
                backup_priority: 50,
            })
        );
        let orders = file.database("MSSQLSERVER", "ORDERS").unwrap();
        assert_eq!(
            file.group_of(&orders.sql).map(|g| &g.group.name),
            Some(&ag.group.name)
        );
        assert_eq!(
            file.shared_databases(),
            [SharedDb {
                key: file.db_key("MSSQLSERVER", "orders"),
                file: dir.join("ag-orders.state.json"),
            }],
            "only the group's databases"
        );
    }

    #[test]
    fn an_agent_that_predates_local_replicas_reads_its_role_from_the_primary_flag() {
        let file = InventoryFile::from_toml(TOML).unwrap();
        let ag = &file.availability_groups[0];
        assert_eq!(ag.group.local, None, "reported as written");
        let local = file.local_replica(ag).unwrap();
        assert_eq!(
            (local.instance.as_str(), local.role),
            ("MSSQLSERVER", ReplicaRole::Primary)
        );
        assert_eq!(ag.shared_state, None);
        assert_eq!(file.shared_databases(), []);
    }

    #[test]
    fn availability_groups_are_checked() {
        let with_local = sample_with_its_group();
        InventoryFile::from_toml(&with_local).unwrap();
        let cases = [
            (
                with_local.replace(
                    "local = { instance = \"MSSQLSERVER\"",
                    "local = { instance = \"SQL2019\"",
                ),
                "instance SQL2019, which is not in `instances`",
            ),
            (
                with_local.replace(
                    "local = { instance = \"MSSQLSERVER\"",
                    "local = { instance = \"SQL2012\"",
                ),
                "this VM's (rg-sql/sqlvm-01, instance SQL2012) too",
            ),
            (
                with_local.replace(
                    "instance = \"MSSQLSERVER\"\nname = \"orders\"",
                    "instance = \"SQL2012\"\nname = \"orders\"",
                ),
                "whose replica on this VM is not on instance SQL2012",
            ),
            (
                with_local.replace(
                    "name = \"orders\"\nrecovery_model = \"full\"",
                    "name = \"orders\"\nrecovery_model = \"simple\"",
                ),
                "full recovery model",
            ),
            (
                with_local.replace("backup_priority = 50", "backup_priority = 101"),
                "backup_priority is 0 to 100",
            ),
            (
                with_local.replace("role = \"primary\"", "role = \"passive\""),
                "passive",
            ),
            (
                with_local.replace("role = \"primary\"", "role = \"primary\", rolle = \"x\""),
                "unknown field `local.rolle` of availability group ag-orders",
            ),
            (
                with_local.replace("shared_state", "shared_sate"),
                "unknown field `shared_sate`",
            ),
            (
                with_local.replace(
                    "{ vm_name = \"sqlvm-02\"",
                    "{ vm_nmae = \"x\", vm_name = \"sqlvm-02\"",
                ),
                "unknown field `replicas[1].vm_nmae`",
            ),
            (
                with_local.replace(
                    "availability_group = \"ag-orders\"",
                    "availability_group = \"ag2\"",
                ),
                "ag2, which is not in `availability_groups`",
            ),
            // Without `local`, and no replica of this VM says it is primary or not.
            (
                with_local
                    .replace(
                        "local = { instance = \"MSSQLSERVER\", role = \"primary\", \
                     synchronization_health = \"healthy\", backup_priority = 50 }\n",
                        "",
                    )
                    .replace("sqlvm-01\", resource_group", "sqlvm-03\", resource_group"),
                "has no `local` replica",
            ),
        ];
        for (text, expected) in cases {
            assert_ne!(text, with_local, "{expected}: the case changes the file");
            let err = format!("{:#}", InventoryFile::from_toml(&text).unwrap_err());
            assert!(err.contains(expected), "{err:?} should mention {expected}");
        }

        let twice = format!(
            "{with_local}\n[[availability_groups]]\nname = \"AG-ORDERS\"\n\
             backup_preference = \"primary\"\nreplicas = []\n"
        );
        let err = format!("{:#}", InventoryFile::from_toml(&twice).unwrap_err());
        assert!(err.contains("listed twice"), "{err}");
        let second = |shared: &str| {
            format!(
                "{with_local}\n[[availability_groups]]\nname = \"ag2\"\nbackup_preference = \"primary\"\n\
                 replicas = [{{ vm_name = \"sqlvm-01\", resource_group = \"rg-sql\", instance = \"SQL2012\" }}]\n\
                 local = {{ instance = \"SQL2012\", role = \"secondary\", \
                 synchronization_health = \"healthy\", backup_priority = 0 }}\nshared_state = \"{shared}\"\n"
            )
        };
        let err = format!(
            "{:#}",
            InventoryFile::from_toml(&second("ag-orders.state.json")).unwrap_err()
        );
        assert!(err.contains("a file of its own"), "{err}");
        let file = InventoryFile::from_toml(&second("ag2.state.json")).unwrap();
        assert_eq!(file.availability_groups.len(), 2);
    }

    #[test]
    fn simulation_knobs_parse_and_misspellings_do_not() {
        let toml = TOML.replace(
            "availability_group = \"ag1\"\n",
            "availability_group = \"ag1\"\nbusy = true\nbulk_operations = true\ntextual_lsns = true\n\
             external_backups = [{ id = \"x1\", type = \"full\" }, { id = \"x2\", type = \"log\" }]\n",
        );
        let file = InventoryFile::from_toml(&toml).unwrap();
        let sales = file.database("MSSQLSERVER", "sales").unwrap();
        assert!(sales.sim.busy && sales.sim.bulk_operations && sales.sim.textual_lsns);
        assert_eq!(
            sales.sim.external_backups,
            [
                ExternalBackup {
                    id: "x1".into(),
                    kind: RecoveryPointType::Full
                },
                ExternalBackup {
                    id: "x2".into(),
                    kind: RecoveryPointType::Log
                },
            ]
        );
        assert_eq!(sales.sql.availability_group.as_deref(), Some("ag1"));
        assert!(!file.sql_inventory().databases.is_empty());

        for (text, expected) in [
            (toml.replace("busy = true", "bussy = true"), "bussy"),
            (
                toml.replace("system = true", "sytem = true"),
                "unknown field `sytem`",
            ),
            (
                TOML.replace(
                    "size_bytes = 1024",
                    "size_bytes = 1024\nrecovery = \"full\"",
                ),
                "unknown field `recovery`",
            ),
            (
                toml.replace("type = \"log\"", "type = \"incremental\""),
                "incremental",
            ),
            (toml.replace("\"x2\"", "\"x1\""), "twice"),
        ] {
            let err = format!("{:#}", InventoryFile::from_toml(&text).unwrap_err());
            assert!(err.contains(expected), "{err:?} should mention {expected}");
        }
    }
}
