//! Rules for registering VMs and protecting their databases: the prerequisites a VM must
//! meet before it is registered with a vault, which database names can be protected and
//! how, and the SQL Server versions that get a time-zone warning.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::{DeploymentModel, RecoveryModel, RecoveryPointType};
use crate::configure::backup_type_allowed;
use crate::violation::{Violation, Violations};

/// Combined length of VM name and resource group that Azure Backup reserves room for.
pub const MAX_NAME_PLUS_RG_RESOURCE_MANAGER: usize = 84;
pub const MAX_NAME_PLUS_RG_CLASSIC: usize = 77;
/// The oldest .NET Framework the backup extension runs on.
pub const MIN_DOTNET: (u32, u32, u32) = (4, 5, 2);

/// What registration needs to know of a VM.
#[derive(Debug, Clone)]
pub struct VmPrerequisites<'a> {
    pub name: &'a str,
    pub resource_group: &'a str,
    pub subscription_id: &'a str,
    pub region: &'a str,
    pub deployment_model: DeploymentModel,
    pub agent_installed: bool,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub dotnet_version: Option<&'a str>,
    pub other_backup_product: bool,
    /// The vault the VM is registered with, if any (as a display name or id).
    pub registered_vault: Option<&'a str>,
}

/// The vault a VM is to be registered with.
#[derive(Debug, Clone)]
pub struct VaultTarget<'a> {
    pub id: &'a str,
    pub subscription_id: &'a str,
    pub region: &'a str,
}

/// Parses `4.8`, `4.5.2`, `4.7.2.1` into (major, minor, patch).
pub fn parse_dotnet(version: &str) -> Option<(u32, u32, u32)> {
    let mut parts = version.trim().split('.').map(|p| p.parse::<u32>().ok());
    let major = parts.next()??;
    let minor = parts.next().unwrap_or(Some(0))?;
    let patch = parts.next().unwrap_or(Some(0))?;
    Some((major, minor, patch))
}

/// Every prerequisite the VM fails for registration with `vault`, each with its code.
/// Pointers name the VM fact at fault (`/region`, `/dotnet_version`...).
pub fn check_registration(
    vm: &VmPrerequisites<'_>,
    vault: &VaultTarget<'_>,
    now: DateTime<Utc>,
    heard_within: Duration,
) -> Vec<Violation> {
    let mut v = Violations::default();
    if vm.subscription_id != vault.subscription_id {
        v.push(
            "/subscription_id",
            "vm_subscription_mismatch",
            "the VM is in another subscription than the vault",
        );
    }
    if !vm.region.eq_ignore_ascii_case(vault.region) {
        v.push(
            "/region",
            "vm_region_mismatch",
            format!(
                "the VM is in region {} but the vault in {}; use a vault in the VM's region",
                vm.region, vault.region
            ),
        );
    }
    match (vm.agent_installed, vm.last_seen_at) {
        (false, _) | (true, None) => v.push(
            "/agent_installed",
            "vm_agent_missing",
            "no backup agent is installed on the VM; install and enroll backvault-agent",
        ),
        (true, Some(seen)) if now.signed_duration_since(seen) > heard_within => v.push(
            "/last_seen_at",
            "vm_agent_unresponsive",
            format!(
                "the VM's agent was last heard from at {seen}; make sure it runs and reaches backvault (it must be heard from within {} minutes)",
                heard_within.num_minutes()
            ),
        ),
        _ => {}
    }
    match vm.dotnet_version.and_then(parse_dotnet) {
        Some(version) if version >= MIN_DOTNET => {}
        _ => v.push(
            "/dotnet_version",
            "vm_dotnet_too_old",
            format!(
                "the VM needs .NET Framework 4.5.2 or later (it reports {})",
                vm.dotnet_version.unwrap_or("none")
            ),
        ),
    }
    let (limit, model) = match vm.deployment_model {
        DeploymentModel::ResourceManager => (MAX_NAME_PLUS_RG_RESOURCE_MANAGER, "Resource Manager"),
        DeploymentModel::Classic => (MAX_NAME_PLUS_RG_CLASSIC, "classic"),
    };
    let combined = vm
        .name
        .chars()
        .count()
        .saturating_add(vm.resource_group.chars().count());
    if combined > limit {
        v.push(
            "/name",
            "vm_name_too_long",
            format!("VM name and resource group together have {combined} characters; at most {limit} for {model} VMs"),
        );
    }
    if vm.other_backup_product {
        v.push(
            "/other_backup_product",
            "vm_other_backup_product",
            "another backup product backs up this VM's SQL databases; disable it first",
        );
    }
    if let Some(other) = vm.registered_vault
        && other != vault.id
    {
        v.push(
            "/vault_id",
            "vm_registered_elsewhere",
            "the VM is registered with another vault; a VM backs up to one vault only (unregister it there first)",
        );
    }
    v.into_vec()
}

/// SQL Server 2008 R2 and 2012 may store a wrong time zone with backups (KB2697983).
pub fn time_zone_warning(version: &str) -> Option<&'static str> {
    let v = version.to_ascii_lowercase();
    let affected = v.starts_with("2008 r2")
        || v.starts_with("2008r2")
        || v.starts_with("2012")
        || v.starts_with("10.5")
        || v.starts_with("11.");
    affected.then_some(
        "SQL Server 2008 R2 and 2012 can record a wrong time zone in backups (KB2697983): install the latest cumulative update, or disable daylight saving time on the VM",
    )
}

/// Where a protected item stands. The database holds the same set in a CHECK constraint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProtectionState {
    /// Configure protection is running.
    Protecting,
    Protected,
    ProtectionFailed,
    /// Stopped; recovery points kept forever.
    StoppedRetain,
    /// Stopped; recovery points kept as the policy says.
    StoppedRetainPerPolicy,
    /// Stopped and deleted by a user, kept for the vault's soft-delete period (when it can
    /// be undeleted), then purged.
    SoftDeleted,
}

impl ProtectionState {
    pub const ALL: [ProtectionState; 6] = [
        ProtectionState::Protecting,
        ProtectionState::Protected,
        ProtectionState::ProtectionFailed,
        ProtectionState::StoppedRetain,
        ProtectionState::StoppedRetainPerPolicy,
        ProtectionState::SoftDeleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProtectionState::Protecting => "protecting",
            ProtectionState::Protected => "protected",
            ProtectionState::ProtectionFailed => "protection_failed",
            ProtectionState::StoppedRetain => "stopped_retain",
            ProtectionState::StoppedRetainPerPolicy => "stopped_retain_per_policy",
            ProtectionState::SoftDeleted => "soft_deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Protection was stopped (the item keeps its recovery points).
    pub fn is_stopped(self) -> bool {
        matches!(
            self,
            ProtectionState::StoppedRetain | ProtectionState::StoppedRetainPerPolicy
        )
    }
}

/// Why a database name cannot be protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NameIssue {
    /// Leading or trailing spaces, a trailing `!`, or any of `]`, `;`, `/`.
    UnsupportedCharacters,
    /// Another database on the instance has the same name ignoring case.
    CaseCollision,
    /// `+` or `&`: Configure Protection refuses it; auto-protection protects it.
    NeedsAutoProtection,
    /// `tempdb`: SQL Server recreates it at every start and refuses to back it up
    /// (Msg 3147).
    Tempdb,
}

impl NameIssue {
    pub fn code(self) -> &'static str {
        match self {
            NameIssue::UnsupportedCharacters => "database_name_unsupported",
            NameIssue::CaseCollision => "database_name_case_collision",
            NameIssue::NeedsAutoProtection => "database_name_needs_auto_protection",
            NameIssue::Tempdb => "tempdb_not_protectable",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            NameIssue::UnsupportedCharacters => {
                "the name has leading or trailing spaces, a trailing '!', or one of ']' ';' '/': rename the database to protect it"
            }
            NameIssue::CaseCollision => {
                "another database on this instance has the same name in different case; rename one of them to protect either"
            }
            NameIssue::NeedsAutoProtection => {
                "names with '+' or '&' cannot be protected one by one; enable auto-protection on the instance or availability group, or rename the database"
            }
            NameIssue::Tempdb => {
                "tempdb is recreated at every SQL Server start and cannot be backed up (Msg 3147); it is never protected"
            }
        }
    }

    /// Whether auto-protection may still protect a database with this issue.
    pub fn auto_protection_allowed(self) -> bool {
        self == NameIssue::NeedsAutoProtection
    }
}

/// The issue of one name on its own (case collisions need the instance's other names).
pub fn name_issue(name: &str) -> Option<NameIssue> {
    if name.eq_ignore_ascii_case("tempdb") {
        return Some(NameIssue::Tempdb);
    }
    let bad = name.starts_with(' ')
        || name.ends_with(' ')
        || name.ends_with('!')
        || name.contains([']', ';', '/']);
    if bad {
        Some(NameIssue::UnsupportedCharacters)
    } else if name.contains(['+', '&']) {
        Some(NameIssue::NeedsAutoProtection)
    } else {
        None
    }
}

/// The issue of every database name on one instance, in input order: characters first,
/// then case collisions (both databases of a colliding pair are flagged).
pub fn instance_name_issues(names: &[&str]) -> Vec<Option<NameIssue>> {
    let on_one: Vec<((), &str)> = names.iter().map(|n| ((), *n)).collect();
    name_issues(&on_one)
}

/// The issue of every database name of a VM, in input order. Each database is
/// `(instance, name)`, judged among the names of its own instance (case collisions); the
/// caller lists every present database of the VM once. Linear: each name is folded once
/// and judged once, however many databases an instance has.
pub fn name_issues<K: Eq + std::hash::Hash, N: AsRef<str>>(
    databases: &[(K, N)],
) -> Vec<Option<NameIssue>> {
    let folded: Vec<(&K, String)> = databases
        .iter()
        .map(|(instance, name)| (instance, name.as_ref().to_lowercase()))
        .collect();
    let mut count: HashMap<(&K, &str), usize> = HashMap::with_capacity(folded.len());
    for (instance, name) in &folded {
        let seen = count.entry((*instance, name.as_str())).or_default();
        *seen = seen.saturating_add(1);
    }
    databases
        .iter()
        .zip(&folded)
        .map(|((_, name), (instance, lower))| {
            let own = name_issue(name.as_ref());
            let collides = count
                .get(&(*instance, lower.as_str()))
                .is_some_and(|n| *n > 1);
            match own {
                Some(NameIssue::UnsupportedCharacters) => own,
                _ if collides => Some(NameIssue::CaseCollision),
                _ => own,
            }
        })
        .collect()
}

/// On-demand backup types, as Azure Backup offers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnDemandType {
    Full,
    CopyOnlyFull,
    Differential,
    Log,
}

impl OnDemandType {
    /// The recovery point such a backup makes.
    pub fn point_type(self) -> RecoveryPointType {
        match self {
            OnDemandType::Full => RecoveryPointType::Full,
            OnDemandType::CopyOnlyFull => RecoveryPointType::CopyOnlyFull,
            OnDemandType::Differential => RecoveryPointType::Differential,
            OnDemandType::Log => RecoveryPointType::Log,
        }
    }
}

pub const ON_DEMAND_FULL_MIN_RETENTION_DAYS: u32 = 45;
/// 99 years.
pub const ON_DEMAND_FULL_MAX_RETENTION_DAYS: u32 = 36_159;
/// A copy-only full is kept at least a day.
pub const COPY_ONLY_MIN_RETENTION_DAYS: u32 = 1;
/// Besides the scheduled full, at most this many on-demand fulls a day.
pub const MAX_ON_DEMAND_FULLS_PER_DAY: i64 = 3;

/// What an on-demand backup needs to know of its database.
#[derive(Debug, Clone, Copy)]
pub struct OnDemandTarget<'a> {
    pub database_name: &'a str,
    pub read_only: bool,
    pub recovery_model: RecoveryModel,
    pub on_demand_fulls_today: i64,
}

/// Every reason an on-demand backup of this type cannot run now.
pub fn check_on_demand(
    kind: OnDemandType,
    retention_days: Option<u32>,
    t: OnDemandTarget<'_>,
) -> Vec<Violation> {
    let mut v = Violations::default();
    match (kind, retention_days) {
        (OnDemandType::Full, None) => v.push(
            "/retention_days",
            "on_demand_retention_required",
            "an on-demand full backup carries its own retention: 45 days to 99 years",
        ),
        (OnDemandType::Full, Some(days))
            if !(ON_DEMAND_FULL_MIN_RETENTION_DAYS..=ON_DEMAND_FULL_MAX_RETENTION_DAYS)
                .contains(&days) =>
        {
            v.push(
                "/retention_days",
                "on_demand_retention_out_of_range",
                "an on-demand full backup is kept 45 days to 99 years (36159 days)",
            )
        }
        (OnDemandType::CopyOnlyFull, None) => v.push(
            "/retention_days",
            "on_demand_retention_required",
            "a copy-only full backup carries its own retention: 1 day to 99 years",
        ),
        (OnDemandType::CopyOnlyFull, Some(days))
            if !(COPY_ONLY_MIN_RETENTION_DAYS..=ON_DEMAND_FULL_MAX_RETENTION_DAYS)
                .contains(&days) =>
        {
            v.push(
                "/retention_days",
                "on_demand_retention_out_of_range",
                "a copy-only full backup is kept 1 day to 99 years (36159 days)",
            )
        }
        (OnDemandType::Differential | OnDemandType::Log, Some(_)) => v.push(
            "/retention_days",
            "on_demand_retention_not_allowed",
            "differential and log backups follow the policy's retention; leave retention_days out",
        ),
        _ => {}
    }
    if kind == OnDemandType::Full && t.on_demand_fulls_today >= MAX_ON_DEMAND_FULLS_PER_DAY {
        v.push(
            "/type",
            "on_demand_full_limit",
            "at most 3 on-demand full backups a day besides the scheduled one; use a copy-only full or wait until tomorrow (UTC)",
        );
    }
    if t.read_only && matches!(kind, OnDemandType::Differential | OnDemandType::Log) {
        v.push(
            "/type",
            "read_only_database",
            "read-only databases take only full and copy-only full backups",
        );
    }
    if let Err(refusal) = backup_type_allowed(t.database_name, t.recovery_model, kind.point_type())
    {
        v.push("/type", refusal.code(), refusal.message());
    }
    v.into_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmPrerequisites<'static> {
        VmPrerequisites {
            name: "sqlvm-01",
            resource_group: "rg-sql",
            subscription_id: "sub-1",
            region: "westeurope",
            deployment_model: DeploymentModel::ResourceManager,
            agent_installed: true,
            last_seen_at: Some("2026-11-25T12:00:00Z".parse().unwrap()),
            dotnet_version: Some("4.8"),
            other_backup_product: false,
            registered_vault: None,
        }
    }

    const VAULT: VaultTarget<'static> = VaultTarget {
        id: "v1",
        subscription_id: "sub-1",
        region: "westeurope",
    };

    fn codes(vm: &VmPrerequisites<'_>) -> Vec<&'static str> {
        let now = "2026-11-25T12:05:00Z".parse().unwrap();
        check_registration(vm, &VAULT, now, Duration::minutes(15))
            .into_iter()
            .map(|v| v.code)
            .collect()
    }

    #[test]
    fn a_healthy_vm_passes() {
        assert!(codes(&vm()).is_empty());
        let mut same_vault = vm();
        same_vault.registered_vault = Some("v1");
        assert!(
            codes(&same_vault).is_empty(),
            "re-discovery in its own vault"
        );
    }

    #[test]
    fn each_prerequisite_has_its_code() {
        type Case = (fn(&mut VmPrerequisites<'static>), &'static str);
        let cases: Vec<Case> = vec![
            (|v| v.subscription_id = "sub-2", "vm_subscription_mismatch"),
            (|v| v.region = "eastus", "vm_region_mismatch"),
            (|v| v.agent_installed = false, "vm_agent_missing"),
            (
                |v| v.last_seen_at = Some("2026-11-25T11:00:00Z".parse().unwrap()),
                "vm_agent_unresponsive",
            ),
            (|v| v.dotnet_version = Some("4.5.1"), "vm_dotnet_too_old"),
            (|v| v.dotnet_version = None, "vm_dotnet_too_old"),
            (|v| v.other_backup_product = true, "vm_other_backup_product"),
            (
                |v| v.registered_vault = Some("v2"),
                "vm_registered_elsewhere",
            ),
        ];
        for (edit, code) in cases {
            let mut v = vm();
            edit(&mut v);
            assert_eq!(codes(&v), [code]);
        }
    }

    #[test]
    fn name_length_limits_depend_on_the_deployment_model() {
        let name = "n".repeat(40);
        let rg = "r".repeat(44);
        let mut v = VmPrerequisites {
            name: &name,
            resource_group: &rg,
            ..vm()
        };
        assert!(codes(&v).is_empty(), "84 is allowed for Resource Manager");
        v.deployment_model = DeploymentModel::Classic;
        assert_eq!(codes(&v), ["vm_name_too_long"]);
        let rg77 = "r".repeat(37);
        v.resource_group = &rg77;
        assert!(codes(&v).is_empty(), "77 is allowed for classic");
        let rg85 = "r".repeat(45);
        let v = VmPrerequisites {
            name: &name,
            resource_group: &rg85,
            ..vm()
        };
        assert_eq!(codes(&v), ["vm_name_too_long"]);
    }

    #[test]
    fn all_failures_are_reported_together() {
        let mut v = vm();
        v.region = "eastus";
        v.dotnet_version = Some("3.5");
        v.other_backup_product = true;
        assert_eq!(
            codes(&v),
            [
                "vm_region_mismatch",
                "vm_dotnet_too_old",
                "vm_other_backup_product"
            ]
        );
    }

    #[test]
    fn dotnet_versions_compare_numerically() {
        assert_eq!(parse_dotnet("4.5.2"), Some((4, 5, 2)));
        assert_eq!(parse_dotnet("4.10"), Some((4, 10, 0)));
        assert!(parse_dotnet("4.10").unwrap() > MIN_DOTNET);
        assert_eq!(parse_dotnet("x"), None);
    }

    #[test]
    fn old_sql_versions_warn_about_time_zones() {
        for v in ["2008 R2", "2012", "11.0.7001"] {
            assert!(time_zone_warning(v).is_some(), "{v}");
        }
        for v in ["2008", "2014", "2019", "2022"] {
            assert!(time_zone_warning(v).is_none(), "{v}");
        }
    }

    #[test]
    fn unsupported_names() {
        for bad in [" lead", "trail ", "bang!", "a]b", "a;b", "a/b"] {
            assert_eq!(
                name_issue(bad),
                Some(NameIssue::UnsupportedCharacters),
                "{bad:?}"
            );
        }
        for auto in ["R&D", "a+b"] {
            assert_eq!(name_issue(auto), Some(NameIssue::NeedsAutoProtection));
            assert!(NameIssue::NeedsAutoProtection.auto_protection_allowed());
        }
        for ok in ["sales", "mid!dle", "a[b", "a-b_c.d"] {
            assert_eq!(name_issue(ok), None, "{ok:?}");
        }
    }

    fn target() -> OnDemandTarget<'static> {
        OnDemandTarget {
            database_name: "sales",
            read_only: false,
            recovery_model: RecoveryModel::Full,
            on_demand_fulls_today: 0,
        }
    }

    fn on_demand(
        kind: OnDemandType,
        days: Option<u32>,
        t: OnDemandTarget<'_>,
    ) -> Vec<&'static str> {
        check_on_demand(kind, days, t)
            .into_iter()
            .map(|v| v.code)
            .collect()
    }

    #[test]
    fn on_demand_retention_rules() {
        use OnDemandType::*;
        assert!(on_demand(Full, Some(45), target()).is_empty());
        assert!(on_demand(Full, Some(36_159), target()).is_empty());
        assert_eq!(
            on_demand(Full, Some(44), target()),
            ["on_demand_retention_out_of_range"]
        );
        assert_eq!(
            on_demand(Full, Some(36_160), target()),
            ["on_demand_retention_out_of_range"]
        );
        assert_eq!(
            on_demand(Full, None, target()),
            ["on_demand_retention_required"]
        );
        assert!(on_demand(CopyOnlyFull, Some(1), target()).is_empty());
        assert!(on_demand(CopyOnlyFull, Some(36_159), target()).is_empty());
        // Past 99 years a copy-only full is refused like a full: its expiry could not be
        // computed (u32::MAX days overflowed the completion's arithmetic).
        for days in [0, 36_160, 100_000_000, u32::MAX] {
            assert_eq!(
                on_demand(CopyOnlyFull, Some(days), target()),
                ["on_demand_retention_out_of_range"],
                "{days}"
            );
        }
        assert!(on_demand(Log, None, target()).is_empty());
        assert_eq!(
            on_demand(Differential, Some(30), target()),
            ["on_demand_retention_not_allowed"]
        );
    }

    #[test]
    fn at_most_three_on_demand_fulls_a_day() {
        let t = OnDemandTarget {
            on_demand_fulls_today: 2,
            ..target()
        };
        assert!(on_demand(OnDemandType::Full, Some(45), t).is_empty());
        let t = OnDemandTarget {
            on_demand_fulls_today: 3,
            ..target()
        };
        assert_eq!(
            on_demand(OnDemandType::Full, Some(45), t),
            ["on_demand_full_limit"]
        );
        assert!(
            on_demand(OnDemandType::CopyOnlyFull, Some(5), t).is_empty(),
            "copy-only is not counted"
        );
    }

    #[test]
    fn database_state_limits_backup_types() {
        let ro = OnDemandTarget {
            read_only: true,
            ..target()
        };
        assert_eq!(
            on_demand(OnDemandType::Log, None, ro),
            ["read_only_database"]
        );
        assert!(on_demand(OnDemandType::Full, Some(60), ro).is_empty());
        let master = OnDemandTarget {
            database_name: "master",
            ..target()
        };
        assert_eq!(
            on_demand(OnDemandType::Differential, None, master),
            ["UserErrorSQLPODoesNotSupportBackupType"]
        );
        assert_eq!(
            on_demand(OnDemandType::Log, None, master),
            ["UserErrorSQLPODoesNotSupportBackupType"],
            "by name: master in the full recovery model still takes no log backups"
        );
        assert_eq!(name_issue("TempDB"), Some(NameIssue::Tempdb));
        let simple = OnDemandTarget {
            recovery_model: RecoveryModel::Simple,
            ..target()
        };
        assert_eq!(
            on_demand(OnDemandType::Log, None, simple),
            ["UserErrorSQLPODoesNotSupportBackupType"]
        );
    }

    #[test]
    fn case_collisions_flag_both_databases() {
        let issues = instance_name_issues(&["Sales", "sales", "hr", "R&D", "bad;"]);
        assert_eq!(
            issues,
            [
                Some(NameIssue::CaseCollision),
                Some(NameIssue::CaseCollision),
                None,
                Some(NameIssue::NeedsAutoProtection),
                Some(NameIssue::UnsupportedCharacters),
            ]
        );
    }

    /// A name that counts how often it is read.
    struct Counted<'a> {
        name: String,
        reads: &'a std::cell::Cell<usize>,
    }

    impl AsRef<str> for Counted<'_> {
        fn as_ref(&self) -> &str {
            self.reads.set(self.reads.get() + 1);
            &self.name
        }
    }

    /// Judging every database of a VM reads each name a fixed number of times, however many
    /// databases share its instance: 3,000 databases under one intent used to take one
    /// pass over the instance per database (a minute of one discovery's completion).
    #[test]
    fn name_issues_are_linear_in_the_number_of_databases() {
        for n in [10, 3_000] {
            let reads = std::cell::Cell::new(0);
            let dbs: Vec<(u8, Counted<'_>)> = (0..n)
                .map(|i| {
                    (
                        (i % 2) as u8,
                        Counted {
                            name: format!("db{i}"),
                            reads: &reads,
                        },
                    )
                })
                .collect();
            let issues = name_issues(&dbs);
            assert!(issues.iter().all(Option::is_none));
            assert!(reads.get() <= 2 * n, "{} reads for {n} names", reads.get());
        }
    }

    #[test]
    fn name_issues_judge_each_name_among_its_own_instance() {
        let dbs = [
            ("A", "Sales"),
            ("A", "sales"),
            ("B", "SALES"),
            ("B", "R&D"),
            ("A", "bad;name"),
            ("A", "BAD;NAME"),
            ("B", "r&d"),
        ];
        assert_eq!(
            name_issues(&dbs),
            [
                Some(NameIssue::CaseCollision),
                Some(NameIssue::CaseCollision),
                None,
                Some(NameIssue::CaseCollision),
                Some(NameIssue::UnsupportedCharacters),
                Some(NameIssue::UnsupportedCharacters),
                Some(NameIssue::CaseCollision),
            ]
        );
    }

    proptest::proptest! {
        /// Per VM or per instance, the same verdicts.
        #[test]
        fn name_issues_of_a_vm_are_those_of_each_instance(
            dbs in proptest::collection::vec((0u8..3, "[a-cA-C+;]{1,3}"), 0..40)
        ) {
            let by_vm = name_issues(&dbs);
            for instance in 0u8..3 {
                let names: Vec<&str> = dbs
                    .iter()
                    .filter(|d| d.0 == instance)
                    .map(|d| d.1.as_str())
                    .collect();
                let alone = instance_name_issues(&names);
                let together: Vec<Option<NameIssue>> = dbs
                    .iter()
                    .zip(&by_vm)
                    .filter(|(d, _)| d.0 == instance)
                    .map(|(_, issue)| *issue)
                    .collect();
                proptest::prop_assert_eq!(alone, together);
            }
        }
    }
}
