//! SQL that repeats a domain rule for set-based speed, checked against the rule over
//! generated inputs: a change to one without the other fails here.

use backvault_domain::agent::{RecoveryModel, RecoveryPointType};
use backvault_domain::configure::backup_type_allowed;
use backvault_domain::jobs::{JobKind, MAX_ITEMS_PER_JOB, Priority};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use sqlx::PgPool;

/// The backup job kinds the scheduler makes, with the recovery point each one takes.
const SCHEDULED: [(JobKind, RecoveryPointType); 3] = [
    (JobKind::BackupFull, RecoveryPointType::Full),
    (JobKind::BackupDifferential, RecoveryPointType::Differential),
    (JobKind::BackupLog, RecoveryPointType::Log),
];

/// Names around `master`: its casings, near misses, and characters whose case mapping
/// leaves ASCII (the long s, the Kelvin sign, the dotted and dotless i), where a
/// Unicode-aware `lower()` and an ASCII comparison could part ways.
fn names() -> Vec<String> {
    let mut names: Vec<String> = [
        "master",
        "MASTER",
        "Master",
        "mAsTeR",
        "master ",
        " master",
        "master2",
        "amaster",
        "ma\u{17F}ter",
        "MA\u{17F}TER",
        "mast\u{130}r",
        "\u{212A}master",
        "sales",
        "tempdb",
        "",
        "m",
    ]
    .map(String::from)
    .to_vec();
    let mut runner = TestRunner::deterministic();
    let strategy = "[mMaAsStTeErR\u{17F}\u{212A}\u{130}\u{131}x ]{0,8}";
    for _ in 0..400 {
        let tree = strategy.new_tree(&mut runner).expect("a name");
        names.push(tree.current());
    }
    names
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_scheduler_skips_exactly_the_backup_types_the_domain_refuses(pool: PgPool) {
    let mut database = Vec::new();
    let mut model = Vec::new();
    let mut kind = Vec::new();
    let mut expected = Vec::new();
    for name in names() {
        for m in RecoveryModel::ALL {
            for (job, point) in SCHEDULED {
                database.push(name.clone());
                model.push(m.as_str());
                kind.push(job.as_str());
                expected.push(backup_type_allowed(&name, m, point).is_ok());
            }
        }
    }
    let allowed: Vec<bool> = sqlx::query_scalar(
        "select backvault_backup_type_allowed(d, m, k)
         from unnest($1::text[], $2::text[], $3::text[]) with ordinality as t (d, m, k, n)
         order by n",
    )
    .bind(&database)
    .bind(&model)
    .bind(&kind)
    .fetch_all(&pool)
    .await
    .expect("the twin answers");
    assert_eq!(allowed.len(), expected.len());
    for (i, (sql, rule)) in allowed.iter().zip(&expected).enumerate() {
        assert_eq!(
            sql, rule,
            "{:?} in {} for {}: SQL {sql}, domain {rule}",
            database[i], model[i], kind[i]
        );
    }
    assert!(expected.iter().any(|a| !a) && expected.iter().any(|a| *a));
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_jobs_table_holds_the_domains_item_limit(pool: PgPool) {
    let definition: String = sqlx::query_scalar(
        "select pg_get_constraintdef(oid) from pg_constraint where conname = 'jobs_items_at_most_50'",
    )
    .fetch_one(&pool)
    .await
    .expect("the constraint exists");
    assert_eq!(
        definition,
        format!("CHECK ((jsonb_array_length(items) <= {MAX_ITEMS_PER_JOB}))")
    );
}

#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn the_job_tables_hold_exactly_the_domains_priorities(pool: PgPool) {
    let ranks: Vec<String> = Priority::ALL.iter().map(|p| p.rank().to_string()).collect();
    let expected = format!("CHECK ((priority = ANY (ARRAY[{}])))", ranks.join(", "));
    for constraint in ["jobs_priority_known", "job_queue_priority_known"] {
        let definition: String = sqlx::query_scalar(
            "select pg_get_constraintdef(oid) from pg_constraint where conname = $1",
        )
        .bind(constraint)
        .fetch_one(&pool)
        .await
        .expect("the constraint exists");
        assert_eq!(definition, expected, "{constraint}");
    }
}

/// `backvault_backup_placement` (the scheduler's and re-routing's choice between a group's
/// primary and its preferred replica) against `domain::availability::placement`, for every
/// job kind with and without copy-only.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn sql_places_group_backups_as_the_domain_does(pool: PgPool) {
    use backvault_domain::availability::{Placement, placement};
    for kind in JobKind::ALL {
        for copy_only in [false, true] {
            let sql: String = sqlx::query_scalar("select backvault_backup_placement($1, $2)")
                .bind(kind.as_str())
                .bind(copy_only)
                .fetch_one(&pool)
                .await
                .expect("the SQL twin answers");
            let point = match kind {
                JobKind::BackupFull if copy_only => Some(RecoveryPointType::CopyOnlyFull),
                JobKind::BackupFull => Some(RecoveryPointType::Full),
                JobKind::BackupDifferential => Some(RecoveryPointType::Differential),
                JobKind::BackupLog => Some(RecoveryPointType::Log),
                // Not backups. Of these only configure protection carries its group (and
                // goes to the primary's copy); restores and discoveries stay on their VM.
                _ => None,
            };
            let expected = match point.map(placement) {
                Some(Placement::Preferred) => "preferred",
                Some(Placement::PrimaryOnly) | None => "primary_only",
            };
            assert_eq!(sql, expected, "{kind:?} copy_only={copy_only}");
        }
    }
}

/// The values a text column's CHECK constraint admits, from its definition.
async fn admitted(pool: &PgPool, constraint: &str) -> std::collections::BTreeSet<String> {
    let definition: String = sqlx::query_scalar(
        "select pg_get_constraintdef(oid) from pg_constraint where conname = $1",
    )
    .bind(constraint)
    .fetch_one(pool)
    .await
    .expect("the constraint exists");
    definition
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The CHECK constraints on availability-group columns admit exactly the domain's values:
/// a value added on one side only fails here.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn group_columns_admit_exactly_the_domains_values(pool: PgPool) {
    use backvault_domain::agent::{BackupPreference, ReplicaRole, SynchronizationHealth};
    let names = |values: Vec<&str>| values.into_iter().map(str::to_owned).collect();
    assert_eq!(
        admitted(&pool, "availability_groups_backup_preference_check").await,
        names(BackupPreference::ALL.map(BackupPreference::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "ag_replicas_role_check").await,
        names(ReplicaRole::ALL.map(ReplicaRole::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "ag_replicas_synchronization_health_check").await,
        names(
            SynchronizationHealth::ALL
                .map(SynchronizationHealth::as_str)
                .to_vec()
        )
    );
}

/// The data-safety columns' CHECK constraints admit exactly the domain's values.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn safety_columns_admit_exactly_the_domains_values(pool: PgPool) {
    use backvault_domain::protection::ProtectionState;
    use backvault_domain::safety::{ApprovalStatus, GuardedOperation, Immutability, SoftDelete};
    let names = |values: Vec<&str>| values.into_iter().map(str::to_owned).collect();
    assert_eq!(
        admitted(&pool, "vaults_soft_delete_check").await,
        names(SoftDelete::ALL.map(SoftDelete::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "vaults_immutability_check").await,
        names(Immutability::ALL.map(Immutability::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "approvals_operation_check").await,
        names(GuardedOperation::ALL.map(GuardedOperation::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "approvals_status_check").await,
        names(ApprovalStatus::ALL.map(ApprovalStatus::as_str).to_vec())
    );
    assert_eq!(
        admitted(&pool, "guards_operations_check").await,
        names(
            GuardedOperation::ALL
                .into_iter()
                .filter(|o| !o.always_guarded())
                .map(GuardedOperation::as_str)
                .collect()
        ),
        "a guard selects among the operations that are not always guarded"
    );
    assert_eq!(
        admitted(&pool, "protected_items_state_check").await,
        names(ProtectionState::ALL.map(ProtectionState::as_str).to_vec())
    );
}

/// The roles the audit log admits are the domain's.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn audit_roles_are_the_domains(pool: PgPool) {
    use backvault_domain::access::Role;
    let names = Role::ALL.map(Role::as_str).map(str::to_owned);
    assert_eq!(
        admitted(&pool, "audit_events_role_check").await,
        names.into_iter().collect()
    );
}

/// `backvault_job_status` (the status lists and reads show) against
/// `domain::jobs::JobStatus::as_seen`, for every stored status and queue state.
#[sqlx::test(migrator = "backvault_store::MIGRATOR")]
async fn sql_shows_a_jobs_status_as_the_domain_does(pool: PgPool) {
    use backvault_domain::jobs::JobStatus;
    for stored in JobStatus::ALL {
        for running in [None, Some(false), Some(true)] {
            let sql: String = sqlx::query_scalar("select backvault_job_status($1, $2)")
                .bind(stored.as_str())
                .bind(running)
                .fetch_one(&pool)
                .await
                .expect("the SQL twin answers");
            assert_eq!(
                sql,
                JobStatus::as_seen(stored, running).as_str(),
                "{stored:?} with the queue row running {running:?}"
            );
        }
    }
}
