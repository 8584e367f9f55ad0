//! The committed `openapi/openapi.json` is the contract SDKs are generated from; it must be
//! exactly what the code describes.

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
    let spec = serde_json::to_value(backvault_api::openapi()).unwrap();
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
