//! Conditional, idempotent and approved requests, the same on every operation: `If-Match`,
//! `Idempotency-Key` and `Backvault-Approval` where a handler takes them, `ETag` and
//! `If-None-Match` (304) on every single-resource read.

use backvault_service::idempotency::MAX_IDEMPOTENCY_KEY_CHARS;
use serde_json::{Value, json};

use super::methods_and_operations_mut;

/// What the server sends as an ETag: a quoted version or digest, never longer than this.
pub const MAX_ETAG_CHARS: usize = 64;
/// The longest `If-Match` or `If-None-Match`: a list of a few ETags.
pub const MAX_CONDITIONAL_HEADER_CHARS: usize = 8 * MAX_ETAG_CHARS;

fn request_header(name: &str) -> Option<Value> {
    let (description, schema) = match name {
        // No minLength: HTTP allows an empty list (which matches nothing).
        "If-Match" => (
            "The `ETag` you read: the change applies only to that version (412 otherwise). `*` or no header: unconditionally.",
            json!({ "type": "string", "maxLength": MAX_CONDITIONAL_HEADER_CHARS }),
        ),
        "If-None-Match" => (
            "The `ETag`s you hold (a comma-separated list): 304 Not Modified, without a body, while the resource still has one of them.",
            json!({ "type": "string", "maxLength": MAX_CONDITIONAL_HEADER_CHARS }),
        ),
        "Idempotency-Key" => (
            "Makes retries safe: a retried create with the same key and body returns the first response; with another body, 422 `idempotency_key_reused`. Visible ASCII.",
            json!({
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_IDEMPOTENCY_KEY_CHARS,
                "pattern": "^[!-~]([ -~]*[!-~])?$",
            }),
        ),
        "Backvault-Approval" => (
            "A granted approval's id, on a vault whose guard covers this operation: the operation uses it up.",
            json!({ "type": "string", "format": "uuid", "maxLength": 36 }),
        ),
        _ => return None,
    };
    Some(json!({
        "name": name,
        "in": "header",
        "required": false,
        "description": description,
        "schema": schema,
    }))
}

fn etag_header() -> Value {
    json!({
        "description": "The resource's version, for `If-Match` and `If-None-Match`.",
        "required": true,
        "schema": { "type": "string", "maxLength": MAX_ETAG_CHARS },
    })
}

pub fn add(doc: &mut Value) {
    for (method, operation) in methods_and_operations_mut(doc) {
        let parameters = operation
            .as_object_mut()
            .expect("an operation")
            .entry("parameters")
            .or_insert_with(|| json!([]));
        for parameter in parameters.as_array_mut().expect("parameters").iter_mut() {
            if parameter["in"] == "header"
                && let Some(documented) = parameter["name"].as_str().and_then(request_header)
            {
                *parameter = documented;
            }
        }
        let single_read = method == "get"
            && operation["responses"]["200"]["headers"]
                .get("ETag")
                .is_some();
        if single_read {
            operation["responses"]["200"]["headers"]["ETag"] = etag_header();
            operation["parameters"]
                .as_array_mut()
                .expect("parameters")
                .push(request_header("If-None-Match").expect("documented"));
            operation["responses"]["304"] = json!({
                "description": "Not Modified: the resource still has the `ETag` sent in `If-None-Match`.",
                "headers": { "ETag": etag_header() },
            });
        }
        for response in operation["responses"]
            .as_object_mut()
            .expect("responses")
            .values_mut()
        {
            if let Some(headers) = response.get_mut("headers").and_then(Value::as_object_mut) {
                if headers.contains_key("ETag") {
                    headers.insert("ETag".into(), etag_header());
                }
                if let Some(location) = headers.get_mut("Location") {
                    *location = json!({
                        "description": "The created (or started) resource.",
                        "required": true,
                        "schema": { "type": "string", "format": "uri-reference" },
                    });
                }
            }
        }
        if operation["parameters"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            operation
                .as_object_mut()
                .expect("an operation")
                .remove("parameters");
        }
    }
}
