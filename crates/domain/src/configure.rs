//! Configure Protection's eligibility rules, and which backup types a database takes.
//! The rules run over facts the caller loads in bulk beforehand, so a request of many
//! databases costs a fixed number of queries.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

use uuid::Uuid;

use crate::agent::{RecoveryModel, RecoveryPointType};
use crate::availability::GroupIssue;
use crate::protection::{NameIssue, name_issue, name_issues};
use crate::violation::{Violation, Violations};

/// One database of a VM, as the sibling-name rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sibling<'a, Id> {
    pub id: Id,
    pub instance: Id,
    pub name: &'a str,
    /// Discovery still finds it.
    pub present: bool,
}

/// The name issue of each of a VM's databases, by id. A present database is judged among
/// the present names of its instance (case collisions); a database discovery no longer
/// finds is nobody's sibling, so it collides with nothing and is judged on its own name.
pub fn sibling_name_issues<Id: Copy + Eq + Hash>(
    databases: &[Sibling<'_, Id>],
) -> HashMap<Id, Option<NameIssue>> {
    let present: Vec<&Sibling<'_, Id>> = databases.iter().filter(|d| d.present).collect();
    let named: Vec<(Id, &str)> = present.iter().map(|d| (d.instance, d.name)).collect();
    let mut issues: HashMap<Id, Option<NameIssue>> = present
        .iter()
        .map(|d| d.id)
        .zip(name_issues(&named))
        .collect();
    for gone in databases.iter().filter(|d| !d.present) {
        issues.insert(gone.id, name_issue(gone.name));
    }
    issues
}

/// What Configure Protection knows of one requested database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseFacts {
    /// The vault the database's VM is registered with.
    pub vm_vault: Option<Uuid>,
    /// Discovery no longer finds it.
    pub gone: bool,
    /// The vault that protects it already.
    pub protected_in: Option<Uuid>,
    /// From `sibling_name_issues` over its VM's databases.
    pub name_issue: Option<NameIssue>,
    /// For a database of an availability group (the group database, or a replica's copy
    /// of it): the group database, which is what gets protected, once. None for a
    /// standalone database.
    pub group_database: Option<Uuid>,
    /// For a database of an availability group: why the vault cannot protect the group.
    pub group_issue: Option<GroupIssue>,
}

/// Everything Configure Protection decides on, loaded before the check.
#[derive(Debug, Clone, Default)]
pub struct ConfigureFacts {
    /// The requested policy, when the vault has it.
    pub policy_id: Option<Uuid>,
    /// The requested databases that exist; one missing here does not exist.
    pub databases: HashMap<Uuid, DatabaseFacts>,
}

/// A Configure Protection request, as the rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConfigureRequest<'a> {
    pub vault_id: Uuid,
    pub policy: &'a str,
    pub databases: &'a [Uuid],
}

/// What an accepted request protects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigurePlan {
    pub policy_id: Uuid,
    /// In request order.
    pub databases: Vec<Uuid>,
}

/// Every reason the request cannot be carried out, each at its JSON pointer, or the plan.
/// A database is judged by the first rule it fails, in the order a backup administrator
/// fixes them: it exists, is listed once (a group database counts once, whichever of its
/// ids is given), sits on a VM of this vault, belongs to no group a replica of which is
/// outside the vault, is still there, is not protected yet, and has a name Configure
/// Protection accepts.
pub fn check_configure(
    request: ConfigureRequest<'_>,
    facts: &ConfigureFacts,
) -> Result<ConfigurePlan, Vec<Violation>> {
    let mut v = Violations::default();
    if facts.policy_id.is_none() {
        v.push(
            "/policy",
            "policy_not_found",
            format!("the vault has no policy '{}'", request.policy),
        );
    }
    if request.databases.is_empty() {
        v.push(
            "/databases",
            "databases_empty",
            "list at least one database",
        );
    }
    let mut seen = HashSet::with_capacity(request.databases.len());
    let mut accepted = Vec::with_capacity(request.databases.len());
    for (i, id) in request.databases.iter().enumerate() {
        let pointer = format!("/databases/{i}");
        let Some(d) = facts.databases.get(id) else {
            v.push(
                pointer,
                "database_not_found",
                "no such database; list protectable items",
            );
            continue;
        };
        if !seen.insert(d.group_database.unwrap_or(*id)) {
            v.push(
                pointer,
                "database_duplicate",
                "the database is listed twice (for a database of an availability group: itself or a replica's copy of it)",
            );
            continue;
        }
        // A group database's vault rule is the group's: every replica's VM in the vault.
        if d.group_database.is_none() && d.vm_vault != Some(request.vault_id) {
            v.push(
                pointer,
                "database_not_in_vault",
                "the database's VM is not registered with this vault",
            );
            continue;
        }
        if let Some(issue) = d.group_issue {
            v.push(pointer, issue.code(), issue.message());
            continue;
        }
        if d.gone {
            v.push(
                pointer,
                "database_gone",
                "the last discovery did not find this database; rediscover",
            );
            continue;
        }
        if let Some(vault) = d.protected_in {
            let message = if vault == request.vault_id {
                "the database is already protected in this vault"
            } else {
                "the database is protected in another vault; a database is protected in one vault only"
            };
            v.push(pointer, "database_already_protected", message);
            continue;
        }
        if let Some(issue) = d.name_issue {
            v.push(pointer, issue.code(), issue.message());
            continue;
        }
        accepted.push(*id);
    }
    match facts.policy_id {
        Some(policy_id) if v.is_empty() => Ok(ConfigurePlan {
            policy_id,
            databases: accepted,
        }),
        _ => Err(v.into_vec()),
    }
}

/// Why SQL Server refuses a backup type of a database, whatever its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupTypeRefusal {
    /// `master` takes full backups only (differentials: Msg 3024; logs: Msg 4212).
    MasterTakesFullsOnly,
    /// The simple recovery model keeps no log to back up (Msg 4208).
    SimpleRecoveryHasNoLog,
}

impl BackupTypeRefusal {
    /// The code Azure Backup reports for both.
    pub fn code(self) -> &'static str {
        "UserErrorSQLPODoesNotSupportBackupType"
    }

    pub fn message(self) -> &'static str {
        match self {
            BackupTypeRefusal::MasterTakesFullsOnly => {
                "master takes full backups only, whatever its recovery model"
            }
            BackupTypeRefusal::SimpleRecoveryHasNoLog => {
                "the database uses the simple recovery model, which has no log backups; switch it to full"
            }
        }
    }
}

/// Whether a database takes backups of `kind` at all: the rule on-demand backups are
/// checked against, the scheduler skips by (its SQL twin, `backvault_backup_type_allowed`,
/// is tested against this function) and the reference agent's simulation agrees with.
pub fn backup_type_allowed(
    database: &str,
    model: RecoveryModel,
    kind: RecoveryPointType,
) -> Result<(), BackupTypeRefusal> {
    let incremental = matches!(
        kind,
        RecoveryPointType::Differential | RecoveryPointType::Log
    );
    if incremental && database.eq_ignore_ascii_case("master") {
        Err(BackupTypeRefusal::MasterTakesFullsOnly)
    } else if kind == RecoveryPointType::Log && model == RecoveryModel::Simple {
        Err(BackupTypeRefusal::SimpleRecoveryHasNoLog)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VAULT: Uuid = Uuid::from_u128(1);
    const OTHER_VAULT: Uuid = Uuid::from_u128(2);
    const POLICY: Uuid = Uuid::from_u128(3);

    fn eligible() -> DatabaseFacts {
        DatabaseFacts {
            vm_vault: Some(VAULT),
            gone: false,
            protected_in: None,
            name_issue: None,
            group_database: None,
            group_issue: None,
        }
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(100 + n)
    }

    fn facts(dbs: &[(u128, DatabaseFacts)]) -> ConfigureFacts {
        ConfigureFacts {
            policy_id: Some(POLICY),
            databases: dbs.iter().map(|(n, f)| (id(*n), *f)).collect(),
        }
    }

    fn check(dbs: &[Uuid], facts: &ConfigureFacts) -> Result<ConfigurePlan, Vec<Violation>> {
        check_configure(
            ConfigureRequest {
                vault_id: VAULT,
                policy: "Gold",
                databases: dbs,
            },
            facts,
        )
    }

    fn codes(r: Result<ConfigurePlan, Vec<Violation>>) -> Vec<(String, String)> {
        r.expect_err("refused")
            .into_iter()
            .map(|v| (v.pointer.to_string(), v.code.to_string()))
            .collect()
    }

    #[test]
    fn eligible_databases_are_planned_in_request_order() {
        let f = facts(&[(1, eligible()), (2, eligible())]);
        assert_eq!(
            check(&[id(2), id(1)], &f),
            Ok(ConfigurePlan {
                policy_id: POLICY,
                databases: vec![id(2), id(1)],
            })
        );
    }

    #[test]
    fn a_group_database_is_planned_once_whichever_of_its_ids_is_given() {
        let group_db = id(50);
        let f = facts(&[
            (
                50,
                DatabaseFacts {
                    group_database: Some(group_db),
                    ..eligible()
                },
            ),
            (
                51,
                DatabaseFacts {
                    group_database: Some(group_db),
                    ..eligible()
                },
            ),
            (1, eligible()),
        ]);
        assert_eq!(
            codes(check(&[id(50), id(1), id(51)], &f)),
            [("/databases/2".to_owned(), "database_duplicate".to_owned())]
        );
        assert!(check(&[id(51), id(1)], &f).is_ok());
    }

    #[test]
    fn a_group_with_a_replica_outside_the_vault_is_refused_with_the_reason() {
        for issue in [
            GroupIssue::ReplicaInOtherVault,
            GroupIssue::ReplicaNotRegistered,
        ] {
            let f = facts(&[(
                1,
                DatabaseFacts {
                    group_database: Some(id(1)),
                    group_issue: Some(issue),
                    ..eligible()
                },
            )]);
            assert_eq!(
                codes(check(&[id(1)], &f)),
                [("/databases/0".to_owned(), issue.code().to_owned())]
            );
        }
    }

    #[test]
    fn every_violation_comes_back_at_its_pointer() {
        let known = facts(&[
            (1, eligible()),
            (
                2,
                DatabaseFacts {
                    vm_vault: Some(OTHER_VAULT),
                    ..eligible()
                },
            ),
            (
                3,
                DatabaseFacts {
                    gone: true,
                    ..eligible()
                },
            ),
            (
                4,
                DatabaseFacts {
                    protected_in: Some(VAULT),
                    ..eligible()
                },
            ),
            (
                5,
                DatabaseFacts {
                    protected_in: Some(OTHER_VAULT),
                    ..eligible()
                },
            ),
            (
                6,
                DatabaseFacts {
                    name_issue: Some(NameIssue::CaseCollision),
                    ..eligible()
                },
            ),
            (
                7,
                DatabaseFacts {
                    vm_vault: None,
                    ..eligible()
                },
            ),
        ]);
        let f = ConfigureFacts {
            policy_id: None,
            ..known
        };
        let got = codes(check(
            &[
                id(1),
                id(9),
                id(1),
                id(2),
                id(3),
                id(4),
                id(5),
                id(6),
                id(7),
            ],
            &f,
        ));
        let want = [
            ("/policy", "policy_not_found"),
            ("/databases/1", "database_not_found"),
            ("/databases/2", "database_duplicate"),
            ("/databases/3", "database_not_in_vault"),
            ("/databases/4", "database_gone"),
            ("/databases/5", "database_already_protected"),
            ("/databases/6", "database_already_protected"),
            ("/databases/7", "database_name_case_collision"),
            ("/databases/8", "database_not_in_vault"),
        ];
        assert_eq!(
            got,
            want.map(|(p, c)| (p.to_string(), c.to_string())).to_vec()
        );
    }

    #[test]
    fn an_empty_request_is_refused_even_with_a_policy() {
        assert_eq!(
            codes(check(&[], &facts(&[]))),
            vec![("/databases".to_string(), "databases_empty".to_string())]
        );
    }

    #[test]
    fn a_failing_database_is_judged_by_its_first_rule_only() {
        let f = facts(&[(
            1,
            DatabaseFacts {
                vm_vault: Some(OTHER_VAULT),
                gone: true,
                protected_in: Some(OTHER_VAULT),
                name_issue: Some(NameIssue::Tempdb),
                group_database: None,
                group_issue: Some(GroupIssue::ReplicaInOtherVault),
            },
        )]);
        assert_eq!(
            codes(check(&[id(1)], &f)),
            vec![(
                "/databases/0".to_string(),
                "database_not_in_vault".to_string()
            )]
        );
    }

    #[test]
    fn a_gone_database_is_no_sibling_but_keeps_its_own_issue() {
        let instance = 7u32;
        let dbs = [
            Sibling {
                id: 1u32,
                instance,
                name: "Sales",
                present: true,
            },
            Sibling {
                id: 2,
                instance,
                name: "sales",
                present: false,
            },
            Sibling {
                id: 3,
                instance,
                name: "tempdb",
                present: false,
            },
            Sibling {
                id: 4,
                instance: 8,
                name: "SALES",
                present: true,
            },
        ];
        let issues = sibling_name_issues(&dbs);
        assert_eq!(issues[&1], None, "its gone twin collides with nothing");
        assert_eq!(issues[&2], None);
        assert_eq!(issues[&3], Some(NameIssue::Tempdb));
        assert_eq!(issues[&4], None, "another instance is no sibling");
        let both_present = [
            dbs[0],
            Sibling {
                present: true,
                ..dbs[1]
            },
        ];
        let issues = sibling_name_issues(&both_present);
        assert_eq!(issues[&1], Some(NameIssue::CaseCollision));
        assert_eq!(issues[&2], Some(NameIssue::CaseCollision));
    }

    #[test]
    fn master_takes_fulls_only_and_simple_recovery_no_logs() {
        use RecoveryModel::{BulkLogged, Simple};
        use RecoveryPointType::{CopyOnlyFull, Differential, Full, Log};
        for model in RecoveryModel::ALL {
            for kind in [Full, CopyOnlyFull] {
                assert_eq!(backup_type_allowed("master", model, kind), Ok(()));
            }
            for kind in [Differential, Log] {
                assert_eq!(
                    backup_type_allowed("MaStEr", model, kind),
                    Err(BackupTypeRefusal::MasterTakesFullsOnly)
                );
            }
        }
        assert_eq!(
            backup_type_allowed("sales", Simple, Log),
            Err(BackupTypeRefusal::SimpleRecoveryHasNoLog)
        );
        assert_eq!(backup_type_allowed("sales", Simple, Differential), Ok(()));
        assert_eq!(backup_type_allowed("sales", BulkLogged, Log), Ok(()));
        assert_eq!(
            backup_type_allowed("master2", RecoveryModel::Full, Log),
            Ok(())
        );
    }

    proptest! {
        /// Whatever the request, each listed database gets exactly one verdict: planned,
        /// or one violation at its own pointer.
        #[test]
        fn each_database_gets_one_verdict(
            dbs in proptest::collection::vec((0u128..6, any::<bool>(), any::<bool>(), 0u8..3, 0u8..3), 0..12),
            request in proptest::collection::vec(0u128..8, 0..12),
        ) {
            let known: Vec<(u128, DatabaseFacts)> = dbs
                .iter()
                .map(|(n, in_vault, gone, protected, issue)| {
                    (*n, DatabaseFacts {
                        vm_vault: in_vault.then_some(VAULT),
                        gone: *gone,
                        protected_in: [None, Some(VAULT), Some(OTHER_VAULT)][usize::from(*protected)],
                        name_issue: [None, Some(NameIssue::CaseCollision), Some(NameIssue::NeedsAutoProtection)][usize::from(*issue)],
                        group_database: None,
                        group_issue: None,
                    })
                })
                .collect();
            let f = facts(&known);
            let ids: Vec<Uuid> = request.iter().map(|n| id(*n)).collect();
            match check(&ids, &f) {
                Ok(plan) => {
                    prop_assert!(!ids.is_empty());
                    prop_assert_eq!(plan.databases, ids);
                }
                Err(violations) => {
                    let mut pointers: Vec<&str> = violations.iter().map(|v| &*v.pointer).collect();
                    pointers.dedup();
                    prop_assert_eq!(pointers.len(), violations.len(), "one violation per pointer");
                    let accepted = (0..ids.len())
                        .filter(|i| !violations.iter().any(|v| *v.pointer == format!("/databases/{i}")))
                        .count();
                    let refused = violations.iter().filter(|v| v.pointer.starts_with("/databases/")).count();
                    prop_assert_eq!(accepted + refused, ids.len());
                }
            }
        }
    }
}
