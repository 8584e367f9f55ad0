//! Bounds, patterns and closed sets in the schema, taken from the constants and patterns
//! the domain checks with: a client that validates against the document is refused by the
//! server only for rules no schema can state (a time zone that does not exist, a
//! differential kept longer than its full).

use backvault_domain::agent::{
    FIRST_LEASE, MAX_AG_REPLICAS, MAX_AVAILABILITY_GROUPS, MAX_BACKUP_PRIORITY, MAX_CLAIM_REPORTS,
    MAX_HEARTBEAT_LEASES, MAX_PROGRESS_MESSAGE_CHARS, MAX_SQL_NAME_CHARS, MAX_VERSION_FACT_CHARS,
    MAX_WARNING_CHARS, MAX_WARNINGS,
};
use backvault_domain::jobs::{JobKind, MAX_ITEMS_PER_JOB};
use backvault_domain::lsn::LSN_PATTERN;
use backvault_domain::names::{
    IDENTIFIER_PATTERN, MAX_POLICY_NAME_CHARS, MAX_REGION_CHARS, MAX_RESOURCE_GROUP_CHARS,
    MAX_SUBSCRIPTION_ID_CHARS, MAX_VAULT_NAME_CHARS, MAX_VM_NAME_CHARS, MIN_POLICY_NAME_CHARS,
    MIN_VAULT_NAME_CHARS, POLICY_NAME_PATTERN, VAULT_NAME_PATTERN,
};
use backvault_domain::policy::{
    ALLOWED_LOG_FREQUENCIES, MAX_DAILY_RETENTION_DAYS, MAX_DIFFERENTIAL_RETENTION_DAYS,
    MAX_LOG_RETENTION_DAYS, MAX_MONTHLY_RETENTION_MONTHS, MAX_TIME_ZONE_CHARS,
    MAX_WEEKLY_RETENTION_WEEKS, MAX_YEARLY_RETENTION_YEARS, MIN_RETENTION_DAYS,
    TIME_OF_DAY_PATTERN,
};
use backvault_domain::preview::MAX_PREVIEW_RUNS;
use backvault_domain::protection::{
    COPY_ONLY_MIN_RETENTION_DAYS, ON_DEMAND_FULL_MAX_RETENTION_DAYS,
};
use backvault_domain::safety::{
    MAX_APPROVAL_MINUTES, MAX_RETENTION_BOUND_DAYS, MAX_SOFT_DELETE_DAYS, MIN_SOFT_DELETE_DAYS,
};
use backvault_domain::text::MAX_TEXT_CHARS;
use backvault_domain::text::TEXT_PATTERN;
use backvault_domain::tokens::{
    MAX_ENROLLMENT_TTL_SECONDS, MAX_ENROLLMENT_USES, MIN_TOKEN_TTL_SECONDS,
};
use backvault_domain::violation::{MAX_MESSAGE_CHARS, MAX_POINTER_CHARS};
use backvault_service::agents::{MAX_CLAIM_JOBS, MAX_CLAIM_WAIT_SECONDS, MAX_FAILURE_CODE_CHARS};
use backvault_service::data_safety::MAX_REASON_CHARS;
use backvault_service::pagination::MAX_LIMIT;
use backvault_service::vaults::MAX_DESCRIPTION_CHARS;
use serde_json::{Value, json};

use super::operations_mut;

/// Where a constraint goes: a property of a component schema (`items` steps into an
/// array: `[]` steps into its items), every query or path parameter of that name, or the
/// parameter of that name of one operation (where other operations' parameters of the
/// name are something else).
enum At {
    Property(&'static str, &'static str),
    Parameter(&'static str),
    ParameterOf(&'static str, &'static str),
}

enum Constraint {
    /// One of these strings.
    Strings(Vec<&'static str>),
    /// A UUID in the hyphenated form the server reads.
    Uuid,
    Integer {
        min: i64,
        max: i64,
    },
    OneOf(Vec<i64>),
    Text {
        min: usize,
        max: usize,
        pattern: &'static str,
    },
    MaxItems(usize),
    MinItems(usize),
}

use At::{Parameter, ParameterOf, Property};
use Constraint::{Integer, MaxItems, MinItems, OneOf, Text};

/// What `uuid::Uuid` parses and the server writes.
pub const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn int(min: impl Into<i64>, max: impl TryInto<i64>) -> Constraint {
    Integer {
        min: min.into(),
        max: max.try_into().unwrap_or(i64::MAX),
    }
}

fn text(min: usize, max: usize, pattern: &'static str) -> Constraint {
    Text { min, max, pattern }
}

fn identifier(max: usize) -> Constraint {
    text(1, max, IDENTIFIER_PATTERN)
}

fn sql_name() -> Constraint {
    text(1, MAX_SQL_NAME_CHARS, TEXT_PATTERN)
}

fn policy_name() -> Constraint {
    text(
        MIN_POLICY_NAME_CHARS,
        MAX_POLICY_NAME_CHARS,
        POLICY_NAME_PATTERN,
    )
}

fn lease() -> Constraint {
    int(FIRST_LEASE, i64::MAX)
}

fn lsn() -> Constraint {
    text(1, MAX_TEXT_CHARS, LSN_PATTERN)
}

fn rules() -> Vec<(At, Constraint)> {
    let retention = |max: u32| int(MIN_RETENTION_DAYS, max);
    vec![
        // Vaults and the inventory.
        (
            Property("CreateVault", "name"),
            text(
                MIN_VAULT_NAME_CHARS,
                MAX_VAULT_NAME_CHARS,
                VAULT_NAME_PATTERN,
            ),
        ),
        (
            Property("CreateVault", "subscription_id"),
            identifier(MAX_SUBSCRIPTION_ID_CHARS),
        ),
        (
            Property("CreateVault", "resource_group"),
            identifier(MAX_RESOURCE_GROUP_CHARS),
        ),
        (
            Property("CreateVault", "region"),
            identifier(MAX_REGION_CHARS),
        ),
        (
            Property("CreateVault", "description"),
            text(0, MAX_DESCRIPTION_CHARS, TEXT_PATTERN),
        ),
        (
            Property("UpdateVault", "description"),
            text(0, MAX_DESCRIPTION_CHARS, TEXT_PATTERN),
        ),
        (Property("UpsertVm", "name"), identifier(MAX_VM_NAME_CHARS)),
        (
            Property("UpsertVm", "subscription_id"),
            identifier(MAX_SUBSCRIPTION_ID_CHARS),
        ),
        (
            Property("UpsertVm", "resource_group"),
            identifier(MAX_RESOURCE_GROUP_CHARS),
        ),
        (Property("UpsertVm", "region"), identifier(MAX_REGION_CHARS)),
        (Property("VmFacts", "name"), identifier(MAX_VM_NAME_CHARS)),
        (
            Property("VmFacts", "subscription_id"),
            identifier(MAX_SUBSCRIPTION_ID_CHARS),
        ),
        (
            Property("VmFacts", "resource_group"),
            identifier(MAX_RESOURCE_GROUP_CHARS),
        ),
        (Property("VmFacts", "region"), identifier(MAX_REGION_CHARS)),
        (
            Property("VmFacts", "agent_version"),
            text(0, MAX_VERSION_FACT_CHARS, TEXT_PATTERN),
        ),
        (
            Property("VmFacts", "dotnet_version"),
            text(0, MAX_VERSION_FACT_CHARS, TEXT_PATTERN),
        ),
        (
            Parameter("subscription_id"),
            identifier(MAX_SUBSCRIPTION_ID_CHARS),
        ),
        (
            Parameter("resource_group"),
            identifier(MAX_RESOURCE_GROUP_CHARS),
        ),
        (Parameter("region"), identifier(MAX_REGION_CHARS)),
        // Enrollment tokens.
        (
            Property("CreateEnrollmentToken", "subscription_id"),
            identifier(MAX_SUBSCRIPTION_ID_CHARS),
        ),
        (
            Property("CreateEnrollmentToken", "vm_name"),
            identifier(MAX_VM_NAME_CHARS),
        ),
        (
            Property("CreateEnrollmentToken", "resource_group"),
            identifier(MAX_RESOURCE_GROUP_CHARS),
        ),
        (
            Property("CreateEnrollmentToken", "ttl_seconds"),
            int(MIN_TOKEN_TTL_SECONDS, MAX_ENROLLMENT_TTL_SECONDS),
        ),
        (
            Property("CreateEnrollmentToken", "max_uses"),
            int(1, MAX_ENROLLMENT_USES),
        ),
        // Policies.
        (Property("CreatePolicy", "name"), policy_name()),
        (Property("CopyPolicy", "name"), policy_name()),
        (Property("ConfigureProtection", "policy"), policy_name()),
        (Property("ConfigureProtection", "databases"), MinItems(1)),
        (
            Property("PolicySpec", "time_zone"),
            text(1, MAX_TIME_ZONE_CHARS, TEXT_PATTERN),
        ),
        (Property("ChangePolicy", "policy"), policy_name()),
        (Property("CreateAutoProtection", "policy"), policy_name()),
        (Parameter("policy_name"), policy_name()),
        (Parameter("policy"), policy_name()),
        (
            Property("FullScheduleSpec", "time"),
            text(5, 5, TIME_OF_DAY_PATTERN),
        ),
        (
            Property("DifferentialSpec", "time"),
            text(5, 5, TIME_OF_DAY_PATTERN),
        ),
        (
            Property("DifferentialSpec", "retention_days"),
            retention(MAX_DIFFERENTIAL_RETENTION_DAYS),
        ),
        (
            Property("LogSpec", "frequency_minutes"),
            OneOf(ALLOWED_LOG_FREQUENCIES.iter().map(|&m| m.into()).collect()),
        ),
        (
            Property("LogSpec", "retention_days"),
            retention(MAX_LOG_RETENTION_DAYS),
        ),
        (
            Property("DailyRetentionSpec", "days"),
            retention(MAX_DAILY_RETENTION_DAYS),
        ),
        (
            Property("WeeklyRetentionSpec", "weeks"),
            int(1, MAX_WEEKLY_RETENTION_WEEKS),
        ),
        (
            Property("MonthlyRetentionSpec", "months"),
            int(1, MAX_MONTHLY_RETENTION_MONTHS),
        ),
        (
            Property("MonthlyRetentionSpec", "days_of_month/[]"),
            int(1, 31),
        ),
        (
            Property("YearlyRetentionSpec", "years"),
            int(1, MAX_YEARLY_RETENTION_YEARS),
        ),
        (
            Property("YearlyRetentionSpec", "days_of_month/[]"),
            int(1, 31),
        ),
        (Parameter("count"), int(1, MAX_PREVIEW_RUNS)),
        // Protection and recovery.
        (
            Property("OnDemandBackup", "retention_days"),
            int(
                COPY_ONLY_MIN_RETENTION_DAYS,
                ON_DEMAND_FULL_MAX_RETENTION_DAYS,
            ),
        ),
        (Property("RestoreRequest", "target_database"), sql_name()),
        (Property("RestoreRequest", "target_instance"), sql_name()),
        // Jobs and the agent protocol.
        (Property("JobItem", "instance"), sql_name()),
        (Property("JobItem", "database"), sql_name()),
        (
            Property("DispatchJob", "items"),
            MaxItems(MAX_ITEMS_PER_JOB),
        ),
        (
            Property("DispatchJob", "kind"),
            Constraint::Strings(JobKind::DISPATCHABLE.iter().map(|k| k.as_str()).collect()),
        ),
        (Property("ClaimRequest", "max_jobs"), int(1, MAX_CLAIM_JOBS)),
        (
            Property("ClaimRequest", "wait_seconds"),
            int(0, MAX_CLAIM_WAIT_SECONDS),
        ),
        (
            Property("AgentHeartbeat", "jobs"),
            MaxItems(MAX_HEARTBEAT_LEASES),
        ),
        (Property("CompleteJob", "warnings"), MaxItems(MAX_WARNINGS)),
        (
            Property("CompleteJob", "warnings/[]"),
            text(0, MAX_WARNING_CHARS, TEXT_PATTERN),
        ),
        (
            Property("ClaimV2Request", "max_jobs"),
            int(0, MAX_CLAIM_JOBS),
        ),
        (
            Property("ClaimV2Request", "wait_seconds"),
            int(0, MAX_CLAIM_WAIT_SECONDS),
        ),
        (
            Property("ClaimV2Request", "completions"),
            MaxItems(MAX_CLAIM_REPORTS),
        ),
        (
            Property("ClaimV2Request", "failures"),
            MaxItems(MAX_CLAIM_REPORTS),
        ),
        (Property("JobCompletion", "lease"), lease()),
        (
            Property("JobCompletion", "warnings"),
            MaxItems(MAX_WARNINGS),
        ),
        (
            Property("JobCompletion", "warnings/[]"),
            text(0, MAX_WARNING_CHARS, TEXT_PATTERN),
        ),
        (Property("JobFailure", "lease"), lease()),
        (
            Property("JobFailure", "code"),
            text(1, MAX_FAILURE_CODE_CHARS, TEXT_PATTERN),
        ),
        (Property("JobLease", "lease"), lease()),
        (Property("JobHeartbeat", "lease"), lease()),
        (Property("CompleteJob", "lease"), lease()),
        (Property("FailJob", "lease"), lease()),
        (Property("SqlDatabase", "size_bytes"), int(0, i64::MAX)),
        (
            Property("RecoveryPointReport", "size_bytes"),
            int(0, i64::MAX),
        ),
        (Property("JobProgress", "percent"), int(0, 100)),
        (
            Property("JobProgress", "message"),
            text(0, MAX_PROGRESS_MESSAGE_CHARS, TEXT_PATTERN),
        ),
        (
            Property("FailJob", "code"),
            text(1, MAX_FAILURE_CODE_CHARS, TEXT_PATTERN),
        ),
        (Property("SqlInstance", "name"), sql_name()),
        (
            Property("SqlInstance", "version"),
            text(0, MAX_VERSION_FACT_CHARS, TEXT_PATTERN),
        ),
        (
            Property("ChangeVaultSafety", "soft_delete_days"),
            int(MIN_SOFT_DELETE_DAYS, MAX_SOFT_DELETE_DAYS),
        ),
        (
            Property("ChangeVaultSafety", "min_retention_days"),
            int(1, MAX_RETENTION_BOUND_DAYS),
        ),
        (
            Property("ChangeVaultSafety", "max_retention_days"),
            int(1, MAX_RETENTION_BOUND_DAYS),
        ),
        (
            Property("GrantApproval", "minutes"),
            int(1, MAX_APPROVAL_MINUTES),
        ),
        (
            Property("CreateGuard", "name"),
            text(1, MAX_RESOURCE_GROUP_CHARS, IDENTIFIER_PATTERN),
        ),
        (
            Property("RequestApproval", "reason"),
            text(0, MAX_REASON_CHARS, TEXT_PATTERN),
        ),
        (Property("SqlDatabase", "instance"), sql_name()),
        (Property("SqlDatabase", "name"), sql_name()),
        (Property("SqlDatabase", "availability_group"), sql_name()),
        (
            Property("SqlInventory", "availability_groups"),
            MaxItems(MAX_AVAILABILITY_GROUPS),
        ),
        (Property("AvailabilityGroup", "name"), sql_name()),
        (
            Property("AvailabilityGroup", "replicas"),
            MaxItems(MAX_AG_REPLICAS),
        ),
        (Property("AgReplica", "vm_name"), sql_name()),
        (Property("AgReplica", "resource_group"), sql_name()),
        (Property("AgReplica", "instance"), sql_name()),
        (Property("LocalReplica", "instance"), sql_name()),
        (
            Property("LocalReplica", "backup_priority"),
            int(0, MAX_BACKUP_PRIORITY),
        ),
        (
            Property("GroupReplica", "backup_priority"),
            int(0, MAX_BACKUP_PRIORITY),
        ),
        (Property("RecoveryPointReport", "instance"), sql_name()),
        (Property("RecoveryPointReport", "database"), sql_name()),
        (Property("RecoveryPointReport", "first_lsn"), lsn()),
        (Property("RecoveryPointReport", "last_lsn"), lsn()),
        (
            Property("RecoveryPointReport", "database_backup_lsn"),
            lsn(),
        ),
        (Property("RecoveryPointReport", "checkpoint_lsn"), lsn()),
        (
            Property("RecoveryPointReport", "differential_base_lsn"),
            lsn(),
        ),
        (Property("RecoveryPointReport", "fork_point_lsn"), lsn()),
        // What comes back quoting what a client sent, cut to these lengths.
        (
            Property("Problem", "detail"),
            text(0, crate::error::MAX_DETAIL_CHARS, TEXT_PATTERN),
        ),
        (
            Property("Violation", "pointer"),
            text(0, MAX_POINTER_CHARS, TEXT_PATTERN),
        ),
        (
            Property("Violation", "message"),
            text(0, MAX_MESSAGE_CHARS, TEXT_PATTERN),
        ),
        // Every list.
        (Parameter("limit"), int(1, MAX_LIMIT)),
        (Parameter("cursor"), Constraint::Uuid),
        (
            Parameter("wait"),
            text(1, 11, crate::routes::jobs::WAIT_PATTERN),
        ),
        // The audit log's filters: what the log holds is bounded by the text rule (an
        // empty filter matches the events whose field is empty: none).
        (
            ParameterOf("list_audit_events", "subject"),
            text(0, crate::routes::audit::MAX_FILTER_CHARS, TEXT_PATTERN),
        ),
        (
            ParameterOf("list_audit_events", "operation"),
            text(0, crate::routes::audit::MAX_FILTER_CHARS, TEXT_PATTERN),
        ),
        (
            ParameterOf("list_audit_events", "resource"),
            text(0, crate::routes::audit::MAX_FILTER_CHARS, TEXT_PATTERN),
        ),
        (
            ParameterOf("list_audit_events", "problem_code"),
            text(0, crate::routes::audit::MAX_FILTER_CHARS, TEXT_PATTERN),
        ),
        (ParameterOf("list_audit_events", "status"), int(100, 599)),
    ]
}

fn apply(schema: &mut Value, constraint: &Constraint) {
    match constraint {
        Constraint::Strings(values) => {
            *schema = json!({ "type": "string", "enum": values });
        }
        Constraint::Uuid => {
            schema["type"] = json!("string");
            schema["format"] = json!("uuid");
            schema["pattern"] = json!(UUID_PATTERN);
        }
        Integer { min, max } => {
            schema["minimum"] = json!(min);
            schema["maximum"] = json!(max);
        }
        OneOf(values) => {
            schema["enum"] = json!(values);
        }
        Text { min, max, pattern } => {
            schema["minLength"] = json!(min);
            schema["maxLength"] = json!(max);
            schema["pattern"] = json!(pattern);
        }
        MaxItems(max) => {
            schema["maxItems"] = json!(max);
        }
        MinItems(min) => {
            schema["minItems"] = json!(min);
        }
    }
}

/// The schema a property path names (`[]`: the array's items). Panics when the path
/// names nothing, so a renamed field cannot silently lose its constraint.
fn property<'a>(schemas: &'a mut Value, name: &str, path: &str) -> &'a mut Value {
    let mut at = schemas
        .get_mut(name)
        .unwrap_or_else(|| panic!("constraint on a schema that does not exist: {name}"));
    for step in path.split('/') {
        at = if step == "[]" {
            at.get_mut("items")
        } else {
            at.get_mut("properties").and_then(|p| p.get_mut(step))
        }
        .unwrap_or_else(|| panic!("constraint on {name}/{path}: no {step}"));
    }
    at
}

pub fn add(doc: &mut Value) {
    let rules = rules();
    for (at, constraint) in &rules {
        match at {
            Property(schema, path) => {
                let schemas = &mut doc["components"]["schemas"];
                apply(property(schemas, schema, path), constraint);
            }
            Parameter(name) | ParameterOf(_, name) => {
                let only = match at {
                    ParameterOf(operation, _) => Some(*operation),
                    _ => None,
                };
                let mut found = false;
                for operation in operations_mut(doc)
                    .into_iter()
                    .filter(|op| only.is_none_or(|id| op["operationId"] == id))
                {
                    for parameter in operation
                        .get_mut("parameters")
                        .and_then(Value::as_array_mut)
                        .into_iter()
                        .flatten()
                    {
                        if parameter["name"] == *name && parameter["in"] != "header" {
                            apply(&mut parameter["schema"], constraint);
                            found = true;
                        }
                    }
                }
                assert!(
                    found,
                    "constraint on a parameter no operation takes: {name}"
                );
            }
        }
    }
    text_rule(doc);
}

/// Every other string obeys the text rule the edge checks (`domain::text`).
fn text_rule(doc: &mut Value) {
    fn walk(schema: &mut Value) {
        match schema {
            Value::Object(fields) => {
                let is_string = match fields.get("type") {
                    Some(Value::String(t)) => t == "string",
                    Some(Value::Array(types)) => types.iter().any(|t| t == "string"),
                    _ => false,
                };
                if is_string && fields.get("format") == Some(&json!("uuid")) {
                    fields.insert("pattern".into(), json!(UUID_PATTERN));
                }
                let open = ["enum", "const", "format", "pattern", "contentEncoding"]
                    .iter()
                    .all(|k| !fields.contains_key(*k));
                if is_string && open {
                    fields.insert("pattern".into(), json!(TEXT_PATTERN));
                    fields
                        .entry("maxLength")
                        .or_insert_with(|| json!(MAX_TEXT_CHARS));
                }
                for value in fields.values_mut() {
                    walk(value);
                }
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut doc["components"]["schemas"]);
    for operation in operations_mut(doc) {
        for parameter in operation
            .get_mut("parameters")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if parameter["in"] != "header" {
                walk(&mut parameter["schema"]);
            }
        }
    }
}
