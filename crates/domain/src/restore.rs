//! Restoring: the statements a restore job runs, and where a restore may write. Which
//! statements reach an instant is `chain`'s to say.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::agent::{RecoveryModel, RecoveryPointType};
use crate::violation::{Violation, Violations};

/// How a step of a restore sequence ends: `WITH NORECOVERY` leaves the database restoring,
/// ready for the next step; `WITH RECOVERY` (the last step only) brings it online.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Recovery {
    NoRecovery,
    Recovery,
}

/// The statement a step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RestoreStatement {
    /// `RESTORE DATABASE` from a full, copy-only full or differential backup.
    RestoreDatabase,
    /// `RESTORE LOG`.
    RestoreLog,
}

/// One statement of a restore sequence, in order: exactly what the agent runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreStep {
    pub recovery_point_id: Uuid,
    pub statement: RestoreStatement,
    pub backup_type: RecoveryPointType,
    pub backup_time: DateTime<Utc>,
    /// The backup set to read (`msdb`'s identifier), when its agent reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_set_uuid: Option<Uuid>,
    pub first_lsn: String,
    pub last_lsn: String,
    pub recovery: Recovery,
    /// `STOPAT`: the last log step, when the target instant lies inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_at: Option<DateTime<Utc>>,
}

/// A restore job's payload: the target, what to do with a database already there, and
/// the statements to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RestoreJobPayload {
    pub target_database: String,
    pub target_instance: String,
    /// A database of that name exists on the target and is replaced.
    pub overwrite: bool,
    /// Before the first step: `BACKUP LOG … WITH NORECOVERY` of the database being
    /// overwritten, so no work since its last log backup is lost; reported as the result's
    /// `tail_log_backup`.
    #[serde(default)]
    pub tail_log_backup: bool,
    /// The first step runs `WITH REPLACE`: the database is overwritten without a tail-log
    /// backup (what it logged since its last log backup is lost).
    #[serde(default)]
    pub replace: bool,
    pub restores_to: DateTime<Utc>,
    pub steps: Vec<RestoreStep>,
    /// The protected items whose database this restore overwrites: each becomes a new
    /// recovery fork when the restore completes.
    #[serde(default)]
    pub overwritten_items: Vec<Uuid>,
}

/// Databases SQL Server needs to run; restoring over one takes the instance down or is
/// refused outright, so backvault never offers it.
pub const SYSTEM_DATABASES: [&str; 4] = ["master", "model", "msdb", "tempdb"];

pub fn is_system_database(name: &str) -> bool {
    SYSTEM_DATABASES
        .iter()
        .any(|s| s.eq_ignore_ascii_case(name))
}

/// What the server knows of the instance a restore would write to.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTargetFacts<'a> {
    pub database: &'a str,
    pub overwrite: bool,
    /// The instance exists on the target VM (at its latest discovery).
    pub instance_found: bool,
    /// Present databases of the target instance at its latest discovery.
    pub existing_databases: &'a [&'a str],
}

/// Every reason a restore may not write `database` on the target instance. The name
/// obeys the rules of a protectable database name and SQL Server's `sysname`; system
/// databases are never targets; a database that exists there is overwritten only when
/// asked (SQL Server would refuse without `REPLACE`, Msg 3154; comparing names ignoring
/// case, as SQL Server's default collation does).
pub fn check_restore_target(t: RestoreTargetFacts<'_>) -> Vec<Violation> {
    let mut v = Violations::default();
    let chars = t.database.chars().count();
    if chars == 0 || chars > crate::agent::MAX_SQL_NAME_CHARS {
        v.push(
            "/target_database",
            "restore_target_name_invalid",
            "a database name has 1 to 128 characters (SQL Server's sysname)",
        );
    } else if t.database.chars().any(char::is_control)
        || crate::protection::name_issue(t.database)
            == Some(crate::protection::NameIssue::UnsupportedCharacters)
    {
        v.push(
            "/target_database",
            "restore_target_name_invalid",
            "a database name has no control characters, no leading or trailing spaces, no trailing '!', and none of ']' ';' '/'",
        );
    }
    if is_system_database(t.database) {
        v.push(
            "/target_database",
            "restore_target_system_database",
            "master, model, msdb and tempdb are never restore targets; restore under another name",
        );
    }
    if !t.instance_found {
        v.push(
            "/target_instance",
            "restore_target_instance_not_found",
            "the target VM has no such SQL Server instance at its latest discovery; rediscover it or choose another",
        );
    } else if !t.overwrite
        && t.existing_databases
            .iter()
            .any(|d| d.eq_ignore_ascii_case(t.database))
    {
        v.push(
            "/overwrite",
            "UserErrorCannotRestoreExistingDBWithoutForceOverwrite",
            "a database of this name exists on the target instance; set overwrite: true to replace it, or choose another name",
        );
    }
    v.into_vec()
}

/// The database a restore overwrites, as the latest discovery saw it.
#[derive(Debug, Clone, Copy)]
pub struct Overwritten {
    /// It is the protected item's own database, where it lives.
    pub own_database: bool,
    pub recovery_model: RecoveryModel,
    /// It has joined an availability group.
    pub in_availability_group: bool,
}

/// How a restore treats the database it overwrites.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverwriteMode {
    pub tail_log_backup: bool,
    pub replace: bool,
}

/// Whether to back up the tail of the log of the database a restore overwrites, as asked
/// (`tail_log_backup`) or by default: possible only for the item's own database in the
/// full or bulk-logged model (SQL Server refuses the overwrite otherwise, Msg 3159, unless
/// told to `REPLACE` and lose what was logged since the last log backup), and the
/// default there. A database that has joined an availability group is never overwritten
/// (SQL Server refuses, Msg 3104): it must leave the group first.
pub fn overwrite_mode(
    overwritten: Option<Overwritten>,
    tail_log_backup: Option<bool>,
) -> Result<OverwriteMode, Violation> {
    if overwritten.is_some_and(|o| o.in_availability_group) {
        return Err(Violation::new(
            "/overwrite",
            "restore_target_in_availability_group",
            "the database has joined an availability group, and SQL Server cannot restore over it (Msg 3104); remove it from the group first, or restore under another name",
        ));
    }
    let possible =
        overwritten.is_some_and(|o| o.own_database && o.recovery_model != RecoveryModel::Simple);
    let tail_log_backup = match tail_log_backup {
        Some(true) if !possible => {
            return Err(Violation::new(
                "/tail_log_backup",
                "tail_log_backup_not_possible",
                "a tail-log backup is taken only when overwriting the item's own database in the full or bulk-logged recovery model",
            ));
        }
        Some(asked) => asked,
        None => possible,
    };
    Ok(OverwriteMode {
        tail_log_backup,
        replace: overwritten.is_some() && !tail_log_backup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target_codes(database: &str, overwrite: bool, instance_found: bool) -> Vec<&'static str> {
        check_restore_target(RestoreTargetFacts {
            database,
            overwrite,
            instance_found,
            existing_databases: &["sales", "Orders"],
        })
        .into_iter()
        .map(|v| v.code)
        .collect()
    }

    #[test]
    fn a_new_name_on_a_known_instance_is_a_fine_target() {
        assert!(target_codes("sales_copy", false, true).is_empty());
    }

    #[test]
    fn existing_databases_are_overwritten_only_when_asked() {
        assert_eq!(
            target_codes("SALES", false, true),
            ["UserErrorCannotRestoreExistingDBWithoutForceOverwrite"]
        );
        assert!(target_codes("orders", true, true).is_empty());
    }

    #[test]
    fn system_databases_are_never_targets() {
        for name in ["master", "MSDB", "model", "tempdb"] {
            assert_eq!(
                target_codes(name, true, true),
                ["restore_target_system_database"],
                "{name}"
            );
        }
    }

    #[test]
    fn names_follow_sysname_and_the_name_rules() {
        for bad in [
            "",
            "x]; DROP DATABASE y; --",
            " lead",
            "trail!",
            "tab\tname",
            &"d".repeat(129),
        ] {
            assert_eq!(
                target_codes(bad, false, true),
                ["restore_target_name_invalid"],
                "{bad:?}"
            );
        }
        assert!(target_codes(&"d".repeat(128), false, true).is_empty());
    }

    #[test]
    fn the_instance_must_exist() {
        assert_eq!(
            target_codes("sales_copy", false, false),
            ["restore_target_instance_not_found"]
        );
    }

    #[test]
    fn the_tail_of_the_items_own_database_is_backed_up_unless_told_otherwise() {
        let own = |recovery_model| {
            Some(Overwritten {
                own_database: true,
                recovery_model,
                in_availability_group: false,
            })
        };
        let mode = |tail, replace| OverwriteMode {
            tail_log_backup: tail,
            replace,
        };
        assert_eq!(
            overwrite_mode(own(RecoveryModel::Full), None),
            Ok(mode(true, false))
        );
        assert_eq!(
            overwrite_mode(own(RecoveryModel::BulkLogged), Some(false)),
            Ok(mode(false, true))
        );
        assert_eq!(
            overwrite_mode(own(RecoveryModel::Simple), None),
            Ok(mode(false, true))
        );
        let another = Overwritten {
            own_database: false,
            recovery_model: RecoveryModel::Full,
            in_availability_group: false,
        };
        let other = Some(another);
        let joined = Some(Overwritten {
            in_availability_group: true,
            ..another
        });
        assert_eq!(
            overwrite_mode(joined, Some(false)).unwrap_err().code,
            "restore_target_in_availability_group"
        );
        assert_eq!(overwrite_mode(other, None), Ok(mode(false, true)));
        assert_eq!(overwrite_mode(None, None), Ok(mode(false, false)));
        for refused in [other, own(RecoveryModel::Simple), None] {
            assert_eq!(
                overwrite_mode(refused, Some(true)).unwrap_err().code,
                "tail_log_backup_not_possible"
            );
        }
    }
}
