//! The committed `openapi/openapi.json` is the contract SDKs are generated from; it must be
//! exactly what the code describes.
// A test's unwrap is its assertion: a panic fails the test that made it.
#![allow(clippy::unwrap_used)]

#[test]
fn committed_spec_matches_the_code() {
    let generated = serde_json::to_string_pretty(&backvault_api::openapi()).unwrap() + "\n";
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == committed,
        "openapi/openapi.json is out of date with the code; regenerate it with\n  cargo run -q -- openapi > openapi/openapi.json\nand commit the result"
    );
}

#[test]
fn every_operation_is_documented() {
    let spec = backvault_api::openapi();
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} has no operationId"));
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            assert!(op["summary"].is_string(), "{method} {path} has no summary");
            assert!(op["tags"].is_array(), "{method} {path} has no tag");
        }
    }
    assert!(ids.contains("preview_policy"));
}

fn operations(spec: &serde_json::Value) -> Vec<(String, String, &serde_json::Value)> {
    let mut out = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            out.push((method.clone(), path.clone(), op));
        }
    }
    out
}

/// What the edge, the extractors and the error mapping can answer, whatever the handler:
/// documented on every operation that can reach them, with the problem body.
#[test]
fn every_operation_documents_what_the_server_can_answer() {
    let spec = backvault_api::openapi();
    for (method, path, op) in operations(&spec) {
        let id = op["operationId"].as_str().unwrap();
        let responses = op["responses"].as_object().unwrap();
        let has = |status: &str| responses.contains_key(status);
        let secured = op.get("security") != Some(&serde_json::json!([{}]));
        let mut expected = vec!["400", "default"];
        if secured {
            expected.extend(["401", "403"]);
        }
        if path.contains('{') {
            expected.push("404");
        }
        if op.get("requestBody").is_some() {
            expected.extend(["413", "415", "422"]);
        }
        if id != "healthz" {
            expected.push("503");
        }
        for status in expected {
            assert!(
                has(status),
                "{method} {path} ({id}) does not document {status}"
            );
        }
        for (status, response) in responses {
            let response = match response["$ref"].as_str() {
                Some(r) => &spec["components"]["responses"][r.rsplit('/').next().unwrap()],
                None => response,
            };
            assert!(
                response["description"]
                    .as_str()
                    .is_some_and(|d| !d.is_empty()),
                "{id} {status} has no description"
            );
            if status.starts_with('4') || status.starts_with('5') || status == "default" {
                assert_eq!(
                    response["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{id} {status} is not a problem"
                );
            }
        }
    }
    let unauthorized = &spec["components"]["responses"]["Unauthorized"];
    assert!(unauthorized["headers"]["WWW-Authenticate"].is_object());
    let unavailable = &spec["components"]["responses"]["Unavailable"];
    assert_eq!(
        unavailable["headers"]["Retry-After"]["schema"]["type"],
        "integer"
    );
}

/// Every single-resource read sends an ETag and answers 304 to a matching If-None-Match;
/// conditional and idempotency headers are plain bounded strings.
#[test]
fn reads_are_conditional_and_headers_are_bounded() {
    let spec = backvault_api::openapi();
    let single_reads = [
        "get_vault",
        "get_policy",
        "get_vm",
        "get_job",
        "get_protected_item",
        "get_auto_protection",
    ];
    for (method, _, op) in operations(&spec) {
        let id = op["operationId"].as_str().unwrap();
        if single_reads.contains(&id) {
            assert_eq!(method, "get");
            assert!(
                op["responses"]["200"]["headers"]["ETag"].is_object(),
                "{id}"
            );
            assert!(
                op["responses"]["304"]["headers"]["ETag"].is_object(),
                "{id}"
            );
        }
        if method == "get" {
            assert!(
                op["responses"]["200"]["headers"].get("Location").is_none(),
                "{id} documents Location on a read"
            );
        }
        for p in op["parameters"].as_array().into_iter().flatten() {
            if p["in"] == "header" {
                let name = p["name"].as_str().unwrap();
                assert_eq!(p["schema"]["type"], "string", "{id} {name}");
                assert_eq!(p["required"], false, "{id} {name}");
                assert!(p["schema"]["maxLength"].is_u64(), "{id} {name}");
            }
        }
    }
    let create_vault = &spec["paths"]["/v1/vaults"]["post"];
    assert_eq!(
        create_vault["parameters"][0]["schema"]["maxLength"],
        backvault_service::idempotency::MAX_IDEMPOTENCY_KEY_CHARS
    );
}

/// The schema's bounds are the domain's constants.
#[test]
fn schema_bounds_are_the_domains_constants() {
    use backvault_domain::{jobs, names, policy};
    let spec = backvault_api::openapi();
    let schemas = &spec["components"]["schemas"];
    let prop = |schema: &str, field: &str| schemas[schema]["properties"][field].clone();
    let claim = prop("ClaimRequest", "max_jobs");
    assert_eq!(claim["minimum"], 1);
    assert_eq!(claim["maximum"], backvault_service::agents::MAX_CLAIM_JOBS);
    assert_eq!(
        prop("ClaimRequest", "wait_seconds")["maximum"],
        backvault_service::agents::MAX_CLAIM_WAIT_SECONDS
    );
    let log = prop("LogSpec", "retention_days");
    assert_eq!(log["minimum"], policy::MIN_RETENTION_DAYS);
    assert_eq!(log["maximum"], policy::MAX_LOG_RETENTION_DAYS);
    assert_eq!(
        prop("LogSpec", "frequency_minutes")["enum"],
        serde_json::json!(policy::ALLOWED_LOG_FREQUENCIES)
    );
    assert_eq!(
        prop("DifferentialSpec", "retention_days")["maximum"],
        policy::MAX_DIFFERENTIAL_RETENTION_DAYS
    );
    assert_eq!(
        prop("DailyRetentionSpec", "days")["maximum"],
        policy::MAX_DAILY_RETENTION_DAYS
    );
    assert_eq!(
        prop("FullScheduleSpec", "time")["pattern"],
        policy::TIME_OF_DAY_PATTERN
    );
    let name = prop("CreateVault", "name");
    assert_eq!(name["pattern"], names::VAULT_NAME_PATTERN);
    assert_eq!(name["maxLength"], names::MAX_VAULT_NAME_CHARS);
    assert_eq!(
        prop("CreatePolicy", "name")["maxLength"],
        names::MAX_POLICY_NAME_CHARS
    );
    assert_eq!(
        prop("CreateVault", "resource_group")["maxLength"],
        names::MAX_RESOURCE_GROUP_CHARS
    );
    assert_eq!(
        schemas["DispatchJob"]["properties"]["items"]["maxItems"],
        jobs::MAX_ITEMS_PER_JOB
    );
    let dispatchable: Vec<&str> = jobs::JobKind::DISPATCHABLE
        .iter()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(
        schemas["DispatchJob"]["properties"]["kind"]["enum"],
        serde_json::json!(dispatchable)
    );
    assert_eq!(
        prop("RecoveryPointReport", "first_lsn")["pattern"],
        backvault_domain::lsn::LSN_PATTERN
    );
    let limit = spec["paths"]["/v1/vaults"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "limit")
        .unwrap()["schema"]
        .clone();
    assert_eq!(limit["maximum"], backvault_service::pagination::MAX_LIMIT);
}

/// Every integer and string a client sends is bounded, and every closed set is an enum.
#[test]
fn every_request_value_is_bounded() {
    let spec = backvault_api::openapi();
    let schemas = &spec["components"]["schemas"];
    // The schemas reachable from request bodies and parameters.
    let mut pending: Vec<String> = Vec::new();
    let mut checks: Vec<(String, serde_json::Value)> = Vec::new();
    for (_, _, op) in operations(&spec) {
        let id = op["operationId"].as_str().unwrap().to_owned();
        if let Some(body) = op["requestBody"]["content"]["application/json"]["schema"].as_object() {
            checks.push((
                format!("{id} body"),
                serde_json::Value::Object(body.clone()),
            ));
        }
        for p in op["parameters"].as_array().into_iter().flatten() {
            checks.push((format!("{id} {}", p["name"]), p["schema"].clone()));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    fn walk(
        at: &str,
        schema: &serde_json::Value,
        pending: &mut Vec<String>,
        faults: &mut Vec<String>,
    ) {
        if let Some(r) = schema["$ref"].as_str() {
            pending.push(r.rsplit('/').next().unwrap().to_owned());
            return;
        }
        let types: Vec<&str> = match &schema["type"] {
            serde_json::Value::String(t) => vec![t.as_str()],
            serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
            _ => Vec::new(),
        };
        let closed = schema.get("enum").is_some() || schema.get("const").is_some();
        if types.contains(&"integer")
            && !closed
            && !(schema["minimum"].is_number() && schema["maximum"].is_number())
        {
            faults.push(format!("{at}: an integer without minimum and maximum"));
        }
        if types.contains(&"string")
            && !closed
            && schema.get("format").is_none()
            && !schema["maxLength"].is_u64()
        {
            faults.push(format!("{at}: a string without maxLength"));
        }
        for (key, value) in schema.as_object().into_iter().flatten() {
            match key.as_str() {
                "properties" => {
                    for (name, s) in value.as_object().unwrap() {
                        walk(&format!("{at}.{name}"), s, pending, faults);
                    }
                }
                "items" | "additionalProperties" => {
                    walk(&format!("{at}[]"), value, pending, faults)
                }
                "oneOf" | "allOf" | "anyOf" => {
                    for s in value.as_array().unwrap() {
                        walk(at, s, pending, faults);
                    }
                }
                _ => {}
            }
        }
    }
    let mut faults = Vec::new();
    for (at, schema) in &checks {
        walk(at, schema, &mut pending, &mut faults);
    }
    while let Some(name) = pending.pop() {
        if seen.insert(name.clone()) {
            walk(&name, &schemas[&name], &mut pending, &mut faults);
        }
    }
    assert!(seen.contains("PolicySpec") && seen.contains("RecoveryPointReport"));
    assert!(
        faults.is_empty(),
        "unbounded request values:\n{}",
        faults.join("\n")
    );
}

/// The examples in the document are requests the server takes: each parses as its type,
/// and the policy one passes every rule.
#[test]
fn examples_are_valid_requests() {
    let spec = backvault_api::openapi();
    let example = |name: &str| spec["components"]["schemas"][name]["example"].clone();
    let vault: backvault_service::vaults::CreateVault =
        serde_json::from_value(example("CreateVault")).unwrap();
    assert_eq!(vault.name, "prod-sql");
    let policy: backvault_service::policies::CreatePolicy =
        serde_json::from_value(example("CreatePolicy")).unwrap();
    policy.spec.validate("/spec").unwrap();
    let spec_example: backvault_domain::policy::PolicySpec =
        serde_json::from_value(example("PolicySpec")).unwrap();
    spec_example.validate("").unwrap();
    let _: backvault_service::protection::ConfigureProtection =
        serde_json::from_value(example("ConfigureProtection")).unwrap();
    let _: backvault_service::restore::RestoreRequest =
        serde_json::from_value(example("RestoreRequest")).unwrap();
}

/// Job payloads and results are unions on `kind`, with a schema per variant.
#[test]
fn job_bodies_are_typed_by_kind() {
    let spec = backvault_api::openapi();
    let schemas = &spec["components"]["schemas"];
    for union in ["JobPayload", "JobResult"] {
        let mapping = schemas[union]["discriminator"]["mapping"]
            .as_object()
            .unwrap_or_else(|| panic!("{union} has no discriminator"));
        assert_eq!(schemas[union]["discriminator"]["propertyName"], "kind");
        for (kind, target) in mapping {
            let name = target.as_str().unwrap().rsplit('/').next().unwrap();
            let variant = &schemas[name];
            assert_eq!(variant["properties"]["kind"]["enum"][0], kind.as_str());
            assert!(
                variant["required"]
                    .as_array()
                    .unwrap()
                    .contains(&"kind".into())
            );
        }
    }
    assert_eq!(
        schemas["JobPayload"]["discriminator"]["mapping"]
            .as_object()
            .unwrap()
            .len(),
        backvault_domain::jobs::JobKind::ALL.len()
    );
    let job = &schemas["Job"]["properties"];
    for (field, target) in [
        ("payload", "JobPayload"),
        ("result", "JobResult"),
        ("progress", "JobProgress"),
    ] {
        assert!(
            job[field]
                .to_string()
                .contains(&format!("#/components/schemas/{target}")),
            "Job.{field} is not a {target}"
        );
    }
    assert_eq!(
        schemas["ClaimedJob"]["properties"]["payload"]["$ref"],
        "#/components/schemas/JobPayload"
    );
}

/// The examples docs/clients.md shows are the files CI runs, word for word.
#[test]
fn the_documented_examples_are_the_ones_ci_runs() {
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/clients.md")).unwrap();
    for file in [
        "sdk/python/test_example.py",
        "sdk/typescript/src/example.ts",
    ] {
        let marker = format!("<!-- {file} -->\n");
        let after = docs
            .split_once(&marker)
            .unwrap_or_else(|| panic!("docs/clients.md does not quote {file}"))
            .1;
        let (_, block) = after.split_once('\n').unwrap();
        let quoted = block.split_once("```\n").unwrap().0;
        let code = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        assert_eq!(
            quoted, code,
            "docs/clients.md's copy of {file} differs from it"
        );
    }
}
