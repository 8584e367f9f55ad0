//! Availability groups: where each backup of an availability-group database runs, and
//! whether a vault may protect the group at all.
//!
//! SQL Server takes full (not copy-only) and differential backups on the primary replica
//! only; log and copy-only full backups run on any replica, and the group's backup
//! preference with each replica's backup priority says which one should. LSNs are
//! group-wide, so wherever a backup runs it continues the same chain.

use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agent::{BackupPreference, RecoveryPointType, ReplicaRole, SynchronizationHealth};

/// Whether a backup type must run on the primary or follows the group's preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Full (not copy-only) and differential backups.
    PrimaryOnly,
    /// Log and copy-only full backups.
    Preferred,
}

pub fn placement(point_type: RecoveryPointType) -> Placement {
    match point_type {
        RecoveryPointType::Full | RecoveryPointType::Differential => Placement::PrimaryOnly,
        RecoveryPointType::Log | RecoveryPointType::CopyOnlyFull => Placement::Preferred,
    }
}

/// A replica as the server last heard of it: its role, health and priority from its own
/// VM's latest discovery, and whether that VM's agent is heard from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplicaState {
    pub vm_id: Uuid,
    pub role: ReplicaRole,
    pub health: SynchronizationHealth,
    pub backup_priority: u8,
    /// The agent has sent a heartbeat recently: a job sent there will be run.
    pub reachable: bool,
}

impl ReplicaState {
    /// A secondary that can take a log or copy-only backup: reachable, synchronizing
    /// (a secondary that is not cannot back up its log), and not excluded by priority 0.
    fn backs_up_as_secondary(&self) -> bool {
        self.role == ReplicaRole::Secondary
            && self.reachable
            && self.health != SynchronizationHealth::NotHealthy
            && self.backup_priority > 0
    }

    fn is_primary(&self) -> bool {
        self.role == ReplicaRole::Primary && self.reachable
    }
}

/// Why no replica can take a backup now. The job fails with
/// [`NO_REPLICA_CODE`] and the message, and runs again when the group changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NoReplica {
    /// No replica reports the primary role, or its agent is not heard from.
    NoPrimary,
    /// `secondary_only`: no secondary is reachable, synchronizing and of priority above 0.
    NoSecondary,
    /// Every replica that could take it has backup priority 0 or is unreachable.
    NoEligibleReplica,
}

/// Azure Backup's code for a backup preference no replica can satisfy.
pub const NO_REPLICA_CODE: &str = "FabricSvcBackupPreferenceCheckFailedUserError";

impl NoReplica {
    pub fn message(self) -> &'static str {
        match self {
            NoReplica::NoPrimary => {
                "no reachable replica is primary: full and differential backups run on the primary only; the job runs again once a discovery reports a primary whose agent is heard from"
            }
            NoReplica::NoSecondary => {
                "the backup preference is secondary_only and no secondary replica is reachable, synchronizing and of backup priority above 0; bring one back, or change the preference"
            }
            NoReplica::NoEligibleReplica => {
                "every replica is unreachable or has backup priority 0; raise a replica's priority or bring its agent back"
            }
        }
    }
}

/// The best secondary: healthiest, then highest priority, then lowest VM id (so that two
/// servers route alike).
fn best_secondary(replicas: &[ReplicaState]) -> Option<&ReplicaState> {
    replicas
        .iter()
        .filter(|r| r.backs_up_as_secondary())
        .max_by(|a, b| {
            (a.health, a.backup_priority)
                .cmp(&(b.health, b.backup_priority))
                .then_with(|| b.vm_id.cmp(&a.vm_id))
        })
}

/// The VM that runs a backup of `point_type` for a group with this `preference` and these
/// replicas.
pub fn route(
    point_type: RecoveryPointType,
    preference: BackupPreference,
    replicas: &[ReplicaState],
) -> Result<Uuid, NoReplica> {
    let primary = replicas.iter().find(|r| r.is_primary());
    if placement(point_type) == Placement::PrimaryOnly {
        return primary.map(|p| p.vm_id).ok_or(NoReplica::NoPrimary);
    }
    let eligible_primary = primary.filter(|p| p.backup_priority > 0);
    match preference {
        BackupPreference::Primary => primary.map(|p| p.vm_id).ok_or(NoReplica::NoPrimary),
        BackupPreference::SecondaryOnly => best_secondary(replicas)
            .map(|s| s.vm_id)
            .ok_or(NoReplica::NoSecondary),
        BackupPreference::PreferSecondary => best_secondary(replicas)
            .or(eligible_primary)
            .map(|r| r.vm_id)
            .ok_or(NoReplica::NoEligibleReplica),
        BackupPreference::AnyReplica => replicas
            .iter()
            .filter(|r| r.backs_up_as_secondary())
            .chain(eligible_primary)
            .max_by(|a, b| {
                (a.backup_priority, a.health)
                    .cmp(&(b.backup_priority, b.health))
                    .then_with(|| b.vm_id.cmp(&a.vm_id))
            })
            .map(|r| r.vm_id)
            .ok_or(NoReplica::NoEligibleReplica),
    }
}

/// Where a replica's VM stands towards the vault that would protect the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaVm {
    /// Registered with this vault.
    InVault,
    /// Registered with another vault.
    OtherVault,
    /// Known but not registered, or not known at all.
    NotRegistered,
}

/// Why a vault cannot protect an availability group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum GroupIssue {
    ReplicaInOtherVault,
    ReplicaNotRegistered,
}

impl GroupIssue {
    pub fn code(self) -> &'static str {
        match self {
            GroupIssue::ReplicaInOtherVault => "availability_group_replica_in_other_vault",
            GroupIssue::ReplicaNotRegistered => "availability_group_replica_not_registered",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            GroupIssue::ReplicaInOtherVault => {
                "a VM hosting a replica of this availability group is registered with another vault; every replica's VM must be registered with the vault that protects the group"
            }
            GroupIssue::ReplicaNotRegistered => {
                "a VM hosting a replica of this availability group is not registered with this vault; register it (Discover DBs) before protecting the group"
            }
        }
    }
}

/// A vault may protect a group only when every replica's VM is registered with it: a
/// replica elsewhere would take backups the vault never sees. Another vault's claim is
/// the graver reason, so it is the one reported.
pub fn group_issue(replica_vms: &[ReplicaVm]) -> Option<GroupIssue> {
    if replica_vms.contains(&ReplicaVm::OtherVault) {
        Some(GroupIssue::ReplicaInOtherVault)
    } else if replica_vms.contains(&ReplicaVm::NotRegistered) {
        Some(GroupIssue::ReplicaNotRegistered)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn replica(n: u128, role: ReplicaRole, priority: u8) -> ReplicaState {
        ReplicaState {
            vm_id: Uuid::from_u128(n),
            role,
            health: SynchronizationHealth::Healthy,
            backup_priority: priority,
            reachable: true,
        }
    }

    const LOG: RecoveryPointType = RecoveryPointType::Log;

    #[test]
    fn full_and_differential_run_on_the_primary_whatever_the_preference() {
        let replicas = [
            replica(1, ReplicaRole::Secondary, 100),
            replica(2, ReplicaRole::Primary, 0),
            replica(3, ReplicaRole::Secondary, 90),
        ];
        for preference in BackupPreference::ALL {
            for kind in [RecoveryPointType::Full, RecoveryPointType::Differential] {
                assert_eq!(
                    route(kind, preference, &replicas),
                    Ok(Uuid::from_u128(2)),
                    "{kind:?} {preference:?}"
                );
            }
        }
    }

    #[test]
    fn logs_follow_the_preference() {
        let replicas = [
            replica(1, ReplicaRole::Primary, 70),
            replica(2, ReplicaRole::Secondary, 40),
            replica(3, ReplicaRole::Secondary, 60),
        ];
        let on = |p| route(LOG, p, &replicas).map(|v| v.as_u128());
        assert_eq!(on(BackupPreference::Primary), Ok(1));
        assert_eq!(on(BackupPreference::SecondaryOnly), Ok(3));
        assert_eq!(on(BackupPreference::PreferSecondary), Ok(3));
        assert_eq!(on(BackupPreference::AnyReplica), Ok(1));
        assert_eq!(
            route(
                RecoveryPointType::CopyOnlyFull,
                BackupPreference::SecondaryOnly,
                &replicas
            ),
            Ok(Uuid::from_u128(3))
        );
    }

    #[test]
    fn healthier_secondaries_come_before_higher_priorities() {
        let mut partly = replica(2, ReplicaRole::Secondary, 100);
        partly.health = SynchronizationHealth::PartiallyHealthy;
        let replicas = [
            replica(1, ReplicaRole::Primary, 50),
            partly,
            replica(3, ReplicaRole::Secondary, 10),
        ];
        assert_eq!(
            route(LOG, BackupPreference::PreferSecondary, &replicas),
            Ok(Uuid::from_u128(3))
        );
    }

    #[test]
    fn without_a_usable_secondary() {
        let mut unhealthy = replica(2, ReplicaRole::Secondary, 100);
        unhealthy.health = SynchronizationHealth::NotHealthy;
        let mut gone = replica(3, ReplicaRole::Secondary, 100);
        gone.reachable = false;
        let replicas = [
            replica(1, ReplicaRole::Primary, 50),
            unhealthy,
            gone,
            replica(4, ReplicaRole::Secondary, 0),
        ];
        assert_eq!(
            route(LOG, BackupPreference::SecondaryOnly, &replicas),
            Err(NoReplica::NoSecondary)
        );
        assert_eq!(
            route(LOG, BackupPreference::PreferSecondary, &replicas),
            Ok(Uuid::from_u128(1))
        );
        let mut excluded = replicas;
        excluded[0].backup_priority = 0;
        assert_eq!(
            route(LOG, BackupPreference::PreferSecondary, &excluded),
            Err(NoReplica::NoEligibleReplica)
        );
        assert_eq!(
            route(
                RecoveryPointType::Full,
                BackupPreference::PreferSecondary,
                &excluded
            ),
            Ok(Uuid::from_u128(1))
        );
    }

    #[test]
    fn no_primary_during_a_failover() {
        let replicas = [
            replica(1, ReplicaRole::Resolving, 50),
            replica(2, ReplicaRole::Secondary, 50),
        ];
        assert_eq!(
            route(
                RecoveryPointType::Full,
                BackupPreference::AnyReplica,
                &replicas
            ),
            Err(NoReplica::NoPrimary)
        );
        assert_eq!(
            route(LOG, BackupPreference::Primary, &replicas),
            Err(NoReplica::NoPrimary)
        );
        assert_eq!(
            route(LOG, BackupPreference::AnyReplica, &replicas),
            Ok(Uuid::from_u128(2))
        );
    }

    #[test]
    fn a_group_is_protectable_only_with_every_replica_in_the_vault() {
        use ReplicaVm::*;
        assert_eq!(group_issue(&[InVault, InVault]), None);
        assert_eq!(
            group_issue(&[InVault, NotRegistered]),
            Some(GroupIssue::ReplicaNotRegistered)
        );
        assert_eq!(
            group_issue(&[NotRegistered, OtherVault, InVault]),
            Some(GroupIssue::ReplicaInOtherVault)
        );
    }

    fn any_replica() -> impl Strategy<Value = ReplicaState> {
        (
            0u128..16,
            prop::sample::select(ReplicaRole::ALL.to_vec()),
            prop::sample::select(SynchronizationHealth::ALL.to_vec()),
            prop_oneof![Just(0u8), 0u8..=100],
            any::<bool>(),
        )
            .prop_map(
                |(n, role, health, backup_priority, reachable)| ReplicaState {
                    vm_id: Uuid::from_u128(n),
                    role,
                    health,
                    backup_priority,
                    reachable,
                },
            )
    }

    /// A group as SQL Server has it: at most one primary, distinct VMs, up to nine.
    fn any_group() -> impl Strategy<Value = Vec<ReplicaState>> {
        prop::collection::vec(any_replica(), 0..=9).prop_map(|mut replicas| {
            let mut seen = std::collections::HashSet::new();
            replicas.retain(|r| seen.insert(r.vm_id));
            let mut primary_seen = false;
            for r in &mut replicas {
                if r.role == ReplicaRole::Primary {
                    if primary_seen {
                        r.role = ReplicaRole::Secondary;
                    }
                    primary_seen = true;
                }
            }
            replicas
        })
    }

    proptest! {
        #[test]
        fn routes_obey_sql_servers_and_the_groups_rules(
            replicas in any_group(),
            preference in prop::sample::select(BackupPreference::ALL.to_vec()),
            point_type in prop::sample::select(RecoveryPointType::ALL.to_vec()),
        ) {
            let chosen = route(point_type, preference, &replicas);
            let by_vm = |id: Uuid| replicas.iter().find(|r| r.vm_id == id).copied();
            match chosen {
                Ok(vm) => {
                    let r = by_vm(vm).expect("the chosen VM hosts a replica");
                    prop_assert!(r.reachable, "an unreachable replica was chosen");
                    prop_assert!(r.role != ReplicaRole::Resolving);
                    if placement(point_type) == Placement::PrimaryOnly
                        || preference == BackupPreference::Primary
                    {
                        prop_assert_eq!(r.role, ReplicaRole::Primary);
                    } else {
                        prop_assert!(r.backup_priority > 0, "priority 0 is never chosen");
                        if preference == BackupPreference::SecondaryOnly {
                            prop_assert_eq!(r.role, ReplicaRole::Secondary);
                        }
                        if r.role == ReplicaRole::Secondary {
                            prop_assert!(r.health != SynchronizationHealth::NotHealthy);
                        }
                        let usable = |s: &&ReplicaState| s.backs_up_as_secondary();
                        if preference == BackupPreference::PreferSecondary {
                            // The primary only when no secondary is usable.
                            prop_assert!(
                                r.role == ReplicaRole::Secondary
                                    || !replicas.iter().any(|s| usable(&s))
                            );
                        }
                        if r.role == ReplicaRole::Secondary
                            && preference != BackupPreference::AnyReplica
                        {
                            // No usable secondary is healthier, or as healthy with a
                            // higher priority.
                            for s in replicas.iter().filter(usable) {
                                prop_assert!(
                                    (s.health, s.backup_priority) <= (r.health, r.backup_priority)
                                );
                            }
                        }
                        if preference == BackupPreference::AnyReplica {
                            for s in replicas.iter().filter(usable) {
                                prop_assert!(s.backup_priority <= r.backup_priority);
                            }
                        }
                    }
                }
                Err(NoReplica::NoPrimary) => {
                    prop_assert!(!replicas.iter().any(|r| r.is_primary()));
                }
                Err(NoReplica::NoSecondary) => {
                    prop_assert_eq!(preference, BackupPreference::SecondaryOnly);
                    prop_assert!(!replicas.iter().any(|r| r.backs_up_as_secondary()));
                }
                Err(NoReplica::NoEligibleReplica) => {
                    prop_assert!(!replicas.iter().any(|r| r.backs_up_as_secondary()));
                    prop_assert!(!replicas.iter().any(|r| r.is_primary() && r.backup_priority > 0));
                }
            }
        }

        #[test]
        fn a_route_does_not_depend_on_the_order_replicas_are_listed(
            replicas in any_group(),
            preference in prop::sample::select(BackupPreference::ALL.to_vec()),
            point_type in prop::sample::select(RecoveryPointType::ALL.to_vec()),
        ) {
            let mut reversed = replicas.clone();
            reversed.reverse();
            prop_assert_eq!(
                route(point_type, preference, &replicas),
                route(point_type, preference, &reversed)
            );
        }

        #[test]
        fn some_replica_is_chosen_whenever_one_could_be(
            replicas in any_group(),
            preference in prop::sample::select(BackupPreference::ALL.to_vec()),
        ) {
            let secondary = replicas.iter().any(|r| r.backs_up_as_secondary());
            let primary = replicas.iter().any(|r| r.is_primary() && r.backup_priority > 0);
            let expect_route = match preference {
                BackupPreference::Primary => replicas.iter().any(|r| r.is_primary()),
                BackupPreference::SecondaryOnly => secondary,
                _ => secondary || primary,
            };
            prop_assert_eq!(route(LOG, preference, &replicas).is_ok(), expect_route);
        }
    }
}
