//! The responses every operation shares, added in one place: what the edge, the extractors
//! and `error.rs` can answer, whatever the handler. Statuses a handler documents itself
//! keep their description; each gets the `Problem` body the server sends.

use serde_json::{Map, Value, json};

use super::{operations_mut, problem_content};

/// Reusable responses, under `components/responses`.
const SHARED: &[(&str, &str, &str)] = &[
    (
        "400",
        "BadRequest",
        "The request is malformed: a body that is not JSON or not of the operation's shape (`malformed_body`, `body_not_object`), a path parameter that is not valid (`invalid_path`), or a query parameter that is unknown or not valid (`unknown_query_parameter`, `invalid_query`).",
    ),
    (
        "401",
        "Unauthorized",
        "No bearer token, or one that is not valid, has expired or was revoked (`missing_token`, `invalid_token`, `token_expired`, `token_revoked`).",
    ),
    (
        "403",
        "Forbidden",
        "The token's role may not perform this operation, or it does not grant the subscription (`forbidden`, `subscription_forbidden`).",
    ),
    (
        "404",
        "NotFound",
        "A resource named in the path does not exist, or the token does not grant its subscription.",
    ),
    (
        "412",
        "PreconditionFailed",
        "`If-Match` names a version the resource no longer has (`precondition_failed`): read it again.",
    ),
    (
        "413",
        "PayloadTooLarge",
        "The body is larger than the server accepts, 2 MiB (`body_too_large`).",
    ),
    (
        "415",
        "UnsupportedMediaType",
        "The body is not sent as `Content-Type: application/json` (`unsupported_media_type`).",
    ),
    (
        "422",
        "ValidationFailed",
        "The request breaks backvault's rules (`validation_failed`): `errors` lists every violation, each with a JSON pointer and a stable code (see docs/rules.md).",
    ),
    (
        "408",
        "RequestTimeout",
        "The request took longer than the server allows, 90 seconds (`request_timeout`): retry.",
    ),
    (
        "414",
        "UriTooLong",
        "The request URI is longer than 8 KiB (`uri_too_long`).",
    ),
    (
        "503",
        "Unavailable",
        "The database cannot be reached (`database_unavailable`); nothing was changed. Retry after `Retry-After` seconds.",
    ),
    (
        "default",
        "UnexpectedError",
        "A server error (500 `internal`), in the same problem form. Every other status is documented on its operation.",
    ),
];

fn reference(status: &str) -> Value {
    let (_, name, _) = SHARED
        .iter()
        .find(|(s, _, _)| *s == status)
        .expect("a shared response");
    json!({ "$ref": format!("#/components/responses/{name}") })
}

fn shared_response(status: &str, description: &str) -> Value {
    let mut response = json!({
        "description": description,
        "content": problem_content(),
    });
    if let Some(headers) = problem_headers(status) {
        response["headers"] = headers;
    }
    response
}

/// Headers a problem of this status always carries.
fn problem_headers(status: &str) -> Option<Value> {
    match status {
        "401" => Some(json!({ "WWW-Authenticate": {
            "description": "`Bearer`: how to authenticate.",
            "required": true,
            "schema": { "type": "string" },
        }})),
        "503" => Some(json!({ "Retry-After": {
            "description": "Seconds to wait before retrying.",
            "required": true,
            "schema": { "type": "integer", "minimum": 0 },
        }})),
        _ => None,
    }
}

/// Adds the shared responses to `components` and to every operation that can answer them.
pub fn add(doc: &mut Value) {
    let components = doc["components"]
        .as_object_mut()
        .expect("the document has components");
    let responses = components
        .entry("responses")
        .or_insert_with(|| Value::Object(Map::new()));
    for (status, name, description) in SHARED {
        responses[*name] = shared_response(status, description);
    }
    for operation in operations_mut(doc) {
        let statuses = shared_statuses(operation);
        let responses = operation["responses"]
            .as_object_mut()
            .expect("an operation has responses");
        for status in statuses {
            match responses.get_mut(status) {
                None => {
                    responses.insert(status.to_owned(), reference(status));
                }
                // A status the handler documents itself keeps its description (the codes it
                // can answer), with the body and headers every problem of that status has.
                Some(own) => {
                    own["content"] = problem_content();
                    if let Some(headers) = problem_headers(status) {
                        own["headers"] = headers;
                    }
                }
            }
        }
        for (status, response) in responses.iter_mut() {
            let is_error = status.starts_with('4') || status.starts_with('5');
            if is_error && response.get("$ref").is_none() && response.get("content").is_none() {
                response["content"] = problem_content();
            }
        }
    }
}

/// Liveness answers from the process alone.
const ANSWERED_WITHOUT_THE_DATABASE: [&str; 1] = ["healthz"];

/// The shared statuses an operation can answer.
fn shared_statuses(operation: &Value) -> Vec<&'static str> {
    let parameters = operation["parameters"].as_array();
    let has = |location: &str, name: Option<&str>| {
        parameters
            .into_iter()
            .flatten()
            .any(|p| p["in"] == location && name.is_none_or(|n| p["name"].as_str() == Some(n)))
    };
    let secured = operation.get("security") != Some(&json!([{}]));
    let mut statuses = vec!["400", "408", "414"];
    if secured {
        statuses.extend(["401", "403"]);
    }
    if has("path", None) {
        statuses.push("404");
    }
    if has("header", Some("If-Match")) {
        statuses.push("412");
    }
    let takes_instants = parameters
        .into_iter()
        .flatten()
        .any(|p| p["in"] == "query" && p["schema"]["format"] == "date-time");
    if operation.get("requestBody").is_some() {
        statuses.extend(["413", "415", "422"]);
    } else if takes_instants {
        // `instant_out_of_range`: a date-time whose year no format bounds.
        statuses.push("422");
    }
    if !ANSWERED_WITHOUT_THE_DATABASE.contains(&operation["operationId"].as_str().unwrap_or("")) {
        statuses.push("503");
    }
    statuses.push("default");
    statuses
}
