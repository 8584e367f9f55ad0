//! The inventory file: the VM, SQL Server and faults this agent pretends to have.
//!
//! TOML, or JSON when the file name ends in `.json`. It is re-read before every job, so a
//! test can add a database or turn on a fault while the agent runs.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail, ensure};
#[cfg(test)]
use backvault_domain::agent::RecoveryModel;
use backvault_domain::agent::{
    AvailabilityGroup, RecoveryPointType, SqlDatabase, SqlInstance, SqlInventory, VmFacts,
};
use serde::Deserialize;

use crate::sim::Activity;
use crate::store::DbKey;

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
    pub availability_groups: Vec<AvailabilityGroup>,
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
        file.with_context(|| format!("inventory {}", path.display()))
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
            availability_groups: self.availability_groups.clone(),
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
            if let Some(ag) = &db.availability_group {
                ensure!(
                    self.availability_groups
                        .iter()
                        .any(|g| g.name.eq_ignore_ascii_case(ag)),
                    "database {} is in availability group {ag}, which is not in `availability_groups`",
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
    use backvault_domain::agent::{BackupPreference, DeploymentModel};

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
            file.availability_groups[0].backup_preference,
            BackupPreference::Secondary
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
