//! Who may do what: the roles and the one permission table. Every use case asks this
//! table, `docs/security.md` prints it, and a test drives every operation with every role.
//!
//! Least privilege: readers read; operators run the backup machinery (policies,
//! protection, backups, restores that write a new database); only admins do what destroys
//! or exposes backup data or lets a new machine in (deleting data, overwriting a database,
//! unregistering or deleting VMs, vault changes, enrollment tokens, the scheduler).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Policies, protection, backups and restores to a new database; reads everything in
    /// scope.
    Operator,
    /// Reads only.
    Reader,
    /// Grants or denies approvals of operations that reduce protection (multi-user
    /// authorization); never approves its own requests, and does nothing else but read.
    Approver,
    /// Reads, including the audit log.
    Auditor,
    /// A VM's agent: the agent protocol for its own VM only.
    Agent,
    /// Short-lived: lets a new agent enroll its VM in the token's subscription.
    Enrollment,
}

impl Role {
    pub const ALL: [Role; 7] = [
        Role::Admin,
        Role::Operator,
        Role::Reader,
        Role::Approver,
        Role::Auditor,
        Role::Agent,
        Role::Enrollment,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Reader => "reader",
            Role::Approver => "approver",
            Role::Auditor => "auditor",
            Role::Agent => "agent",
            Role::Enrollment => "enrollment",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Role::parse(s).ok_or_else(|| {
            format!("unknown role '{s}' (admin, operator, reader, approver, auditor, enrollment)")
        })
    }
}

/// What a user-facing use case asks permission for. The agent protocol is not here: it
/// takes agent and enrollment tokens only, and each is bound to what it may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Any read: vaults, policies, VMs, jobs, protectable and protected items, recovery
    /// points, restore plans, RPO reports, policy previews.
    Read,
    CreateVault,
    UpdateVault,
    DeleteVault,
    /// Create, replace, copy and delete policies.
    WritePolicy,
    /// Register a VM with a vault (Discover DBs) and rediscover it.
    RegisterVm,
    /// Unregister a VM from its vault.
    UnregisterVm,
    /// Upsert VMs into the inventory (inventory automation).
    UpsertVm,
    /// Remove a VM from the inventory (revokes its agent).
    DeleteVm,
    /// Dispatch a discovery job to a VM's agent.
    DispatchJob,
    CancelJob,
    MintEnrollmentToken,
    /// List outstanding enrollment tokens (never the tokens themselves).
    ListEnrollmentTokens,
    /// Revoke an outstanding enrollment token: it can only reduce who may enroll.
    RevokeEnrollmentToken,
    /// Revoke a user or enrollment token by its id.
    RevokeToken,
    /// Configure protection, change an item's policy, resume protection.
    ConfigureProtection,
    /// Stop protection keeping the recovery points.
    StopProtectionRetainData,
    /// Stop protection and delete the recovery points.
    StopProtectionDeleteData,
    /// Turn auto-protection on and off.
    ManageAutoProtection,
    /// An on-demand backup.
    BackupNow,
    /// Restore to a database that does not exist on the target instance.
    RestoreAsNew,
    /// Restore over an existing database.
    RestoreOverwrite,
    /// Run a scheduler tick now.
    RunScheduler,
    /// Read the audit log.
    ReadAuditLog,
    /// Change a vault's soft delete, immutability, retention bounds or guard.
    ChangeVaultSecurity,
    /// List and undelete soft-deleted items.
    Undelete,
    /// Ask for an approval of an operation a vault's guard protects.
    RequestApproval,
    /// Grant or deny an approval (never one's own request).
    DecideApproval,
    /// Create and delete guards (Resource Guard).
    ManageGuards,
}

impl Operation {
    pub const ALL: [Operation; 29] = [
        Operation::Read,
        Operation::CreateVault,
        Operation::UpdateVault,
        Operation::DeleteVault,
        Operation::WritePolicy,
        Operation::RegisterVm,
        Operation::UnregisterVm,
        Operation::UpsertVm,
        Operation::DeleteVm,
        Operation::DispatchJob,
        Operation::CancelJob,
        Operation::MintEnrollmentToken,
        Operation::ListEnrollmentTokens,
        Operation::RevokeEnrollmentToken,
        Operation::RevokeToken,
        Operation::ConfigureProtection,
        Operation::StopProtectionRetainData,
        Operation::StopProtectionDeleteData,
        Operation::ManageAutoProtection,
        Operation::BackupNow,
        Operation::RestoreAsNew,
        Operation::RestoreOverwrite,
        Operation::RunScheduler,
        Operation::ReadAuditLog,
        Operation::ChangeVaultSecurity,
        Operation::Undelete,
        Operation::RequestApproval,
        Operation::DecideApproval,
        Operation::ManageGuards,
    ];
}

/// The permission table. Approving is the one thing an admin may not do: a stolen admin
/// token must not be able to approve its own destructive request.
pub fn allowed(role: Role, operation: Operation) -> bool {
    use Operation::*;
    match role {
        Role::Admin => operation != DecideApproval,
        Role::Operator => matches!(
            operation,
            Read | WritePolicy
                | RegisterVm
                | DispatchJob
                | CancelJob
                | ListEnrollmentTokens
                | RevokeEnrollmentToken
                | ConfigureProtection
                | StopProtectionRetainData
                | ManageAutoProtection
                | BackupNow
                | RestoreAsNew
                | RequestApproval
        ),
        Role::Reader => operation == Read,
        Role::Approver => matches!(operation, Read | DecideApproval),
        Role::Auditor => matches!(operation, Read | ReadAuditLog),
        Role::Agent | Role::Enrollment => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destructive_operations_are_for_admins_only() {
        for op in [
            Operation::DeleteVault,
            Operation::StopProtectionDeleteData,
            Operation::RestoreOverwrite,
            Operation::UnregisterVm,
            Operation::DeleteVm,
            Operation::MintEnrollmentToken,
            Operation::RevokeToken,
            Operation::RunScheduler,
            Operation::ChangeVaultSecurity,
            Operation::Undelete,
            Operation::ManageGuards,
        ] {
            let who: Vec<Role> = Role::ALL.into_iter().filter(|r| allowed(*r, op)).collect();
            assert_eq!(who, [Role::Admin], "{op:?}");
        }
    }

    #[test]
    fn readers_only_read_and_machines_use_no_user_operation() {
        for op in Operation::ALL {
            assert_eq!(allowed(Role::Reader, op), op == Operation::Read, "{op:?}");
            assert!(!allowed(Role::Agent, op));
            assert!(!allowed(Role::Enrollment, op));
            assert_eq!(
                allowed(Role::Admin, op),
                op != Operation::DecideApproval,
                "{op:?}"
            );
        }
    }

    #[test]
    fn only_approvers_approve_and_only_admins_and_auditors_read_the_audit_log() {
        for role in Role::ALL {
            assert_eq!(
                allowed(role, Operation::DecideApproval),
                role == Role::Approver,
                "{role:?}"
            );
            assert_eq!(
                allowed(role, Operation::ReadAuditLog),
                matches!(role, Role::Admin | Role::Auditor),
                "{role:?}"
            );
        }
        for op in Operation::ALL {
            assert_eq!(
                allowed(Role::Approver, op),
                matches!(op, Operation::Read | Operation::DecideApproval),
                "{op:?}"
            );
            assert_eq!(
                allowed(Role::Auditor, op),
                matches!(op, Operation::Read | Operation::ReadAuditLog),
                "{op:?}"
            );
        }
    }

    #[test]
    fn every_role_parses_from_its_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
