//! OpenAPI links from the operations that create something to those that read, change or
//! delete it, so that clients and fuzzers can follow a resource through its life.

use serde_json::{Map, Value, json};

/// (operation, status) → (link name, target operation, [(parameter, expression)]).
type Link = (&'static str, &'static [(&'static str, &'static str)]);

const VAULT: &[(&str, &str)] = &[("vault_id", "$response.body#/id")];
const POLICY: &[(&str, &str)] = &[
    ("vault_id", "$request.path.vault_id"),
    ("policy_name", "$response.body#/name"),
];
const JOB: &[(&str, &str)] = &[("job_id", "$response.body#/id")];
const VM: &[(&str, &str)] = &[("vm_id", "$response.body#/id")];
const INTENT: &[(&str, &str)] = &[
    ("vault_id", "$request.path.vault_id"),
    ("intent_id", "$response.body#/id"),
];
const FIRST_ITEM: &[(&str, &str)] = &[
    ("vault_id", "$request.path.vault_id"),
    ("item_id", "$response.body#/items/0/id"),
];
const TOKEN: &[(&str, &str)] = &[("token_id", "$response.body#/id")];

fn links() -> Vec<(&'static str, &'static str, Vec<Link>)> {
    vec![
        (
            "create_vault",
            "201",
            vec![
                ("get_vault", VAULT),
                ("update_vault", VAULT),
                ("delete_vault", VAULT),
                ("list_policies", VAULT),
                ("create_policy", VAULT),
            ],
        ),
        (
            "create_policy",
            "201",
            vec![
                ("get_policy", POLICY),
                ("replace_policy", POLICY),
                ("copy_policy", POLICY),
                ("delete_policy", POLICY),
            ],
        ),
        (
            "copy_policy",
            "201",
            vec![(
                "get_policy",
                &[
                    ("vault_id", "$response.body#/vault_id"),
                    ("policy_name", "$response.body#/name"),
                ],
            )],
        ),
        ("upsert_vm", "201", vec![("get_vm", VM), ("delete_vm", VM)]),
        (
            "dispatch_job",
            "202",
            vec![("get_job", JOB), ("cancel_job", JOB)],
        ),
        ("discover_vm", "202", vec![("get_job", JOB)]),
        ("rediscover_vm", "202", vec![("get_job", JOB)]),
        ("backup_now", "202", vec![("get_job", JOB)]),
        ("start_restore", "202", vec![("get_job", JOB)]),
        (
            "configure_protection",
            "202",
            vec![
                ("get_protected_item", FIRST_ITEM),
                ("list_recovery_points", FIRST_ITEM),
            ],
        ),
        (
            "enable_auto_protection",
            "201",
            vec![
                ("get_auto_protection", INTENT),
                ("disable_auto_protection", INTENT),
            ],
        ),
        (
            "create_enrollment_token",
            "201",
            vec![("revoke_enrollment_token", TOKEN)],
        ),
    ]
}

pub fn add(doc: &mut Value) {
    let mut responses_of = Map::new();
    for item in doc["paths"].as_object_mut().expect("paths").values_mut() {
        for operation in item.as_object_mut().expect("a path item").values_mut() {
            if let Some(id) = operation["operationId"].as_str() {
                responses_of.insert(id.to_owned(), Value::Null);
            }
        }
    }
    for (source, status, targets) in links() {
        for (target, _) in &targets {
            assert!(
                responses_of.contains_key(*target),
                "a link to an operation that does not exist: {target}"
            );
        }
        let response = super::operations_mut(doc)
            .into_iter()
            .find(|op| op["operationId"] == source)
            .and_then(|op| op["responses"].get_mut(status))
            .unwrap_or_else(|| panic!("a link from {source} {status}, which is not documented"));
        let links: Map<String, Value> = targets
            .iter()
            .map(|(target, parameters)| {
                let parameters: Map<String, Value> = parameters
                    .iter()
                    .map(|(name, expression)| ((*name).to_owned(), json!(expression)))
                    .collect();
                (
                    (*target).to_owned(),
                    json!({ "operationId": target, "parameters": parameters }),
                )
            })
            .collect();
        response["links"] = Value::Object(links);
    }
}
