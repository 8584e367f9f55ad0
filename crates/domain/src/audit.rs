//! The audit log's rules: how long events are kept, what of a change is written, and how
//! text a client sent (a User-Agent, a request id) is made fit to store and show.

use serde_json::{Map, Value};

/// Events are kept at least a year; the database refuses to delete a younger one (the
/// trigger of `audit_events` holds the same number).
pub const MIN_RETENTION_DAYS: u32 = 365;

/// A year plus a margin for an audit that runs late.
pub const DEFAULT_RETENTION_DAYS: u32 = 400;
const _: () = assert!(DEFAULT_RETENTION_DAYS >= MIN_RETENTION_DAYS);

/// The longest User-Agent kept; the rest is cut.
pub const MAX_USER_AGENT_CHARS: usize = 256;

/// The longest request id or path parameter kept; both can come from the client.
pub const MAX_REQUEST_TEXT_CHARS: usize = 256;

/// Written in place of a value whose field names a secret.
pub const REDACTED: &str = "[redacted]";

/// A retention setting: whole days, at least [`MIN_RETENTION_DAYS`].
pub fn parse_retention_days(raw: &str) -> Result<u32, String> {
    let days: u32 = raw
        .trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a number of days"))?;
    if days < MIN_RETENTION_DAYS {
        return Err(format!(
            "audit events are kept at least {MIN_RETENTION_DAYS} days (the database refuses to delete younger ones); {days} is too few"
        ));
    }
    Ok(days)
}

/// The top-level fields whose values differ between two representations of a resource,
/// as `{"field": {"before": .., "after": ..}}`; a field on one side only is `null` on the
/// other. Anything but a JSON object counts as an object without fields.
pub fn changed_fields(before: &Value, after: &Value) -> Map<String, Value> {
    let empty = Map::new();
    let before = before.as_object().unwrap_or(&empty);
    let after = after.as_object().unwrap_or(&empty);
    let mut changes = Map::new();
    for name in before.keys().chain(after.keys()) {
        let (old, new) = (before.get(name), after.get(name));
        if old != new && !changes.contains_key(name) {
            let mut change = Map::new();
            change.insert(
                "before".into(),
                old.map_or(Value::Null, redacted_under(name)),
            );
            change.insert(
                "after".into(),
                new.map_or(Value::Null, redacted_under(name)),
            );
            changes.insert(name.clone(), Value::Object(change));
        }
    }
    changes
}

/// Whether a field's name says its value is a credential: no resource the log diffs has
/// one, and if one ever does, its value still never reaches the log.
fn names_a_secret(field: &str) -> bool {
    let field = field.to_ascii_lowercase();
    field == "token"
        || field.ends_with("_token")
        || ["secret", "password", "authorization", "credential"]
            .iter()
            .any(|word| field.contains(word))
}

/// The value of the field `name`, with every secret in it (at any depth) redacted.
fn redacted_under(name: &str) -> impl Fn(&Value) -> Value {
    let secret = names_a_secret(name);
    move |value| {
        if secret {
            Value::from(REDACTED)
        } else {
            redacted(value)
        }
    }
}

fn redacted(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, v)| (name.clone(), redacted_under(name)(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redacted).collect()),
        other => other.clone(),
    }
}

/// Client-sent text as the log keeps it: control characters dropped (they could forge
/// lines in whatever renders the log; Postgres refuses NUL), cut to `max_chars`.
pub fn clean_text(text: &str, max_chars: usize) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(max_chars)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn retention_is_at_least_a_year() {
        assert_eq!(parse_retention_days("365"), Ok(365));
        assert_eq!(parse_retention_days(" 400 "), Ok(400));
        let short = parse_retention_days("364").unwrap_err();
        assert!(short.contains("at least 365 days"), "{short}");
        assert!(parse_retention_days("-1").is_err());
        assert!(parse_retention_days("a year").is_err());
    }

    #[test]
    fn only_changed_fields_are_kept() {
        let before = json!({"name": "a", "description": "old", "version": 1, "gone": true});
        let after = json!({"name": "a", "description": "new", "version": 2, "added": [1]});
        assert_eq!(
            Value::Object(changed_fields(&before, &after)),
            json!({
                "description": {"before": "old", "after": "new"},
                "version": {"before": 1, "after": 2},
                "gone": {"before": true, "after": null},
                "added": {"before": null, "after": [1]},
            })
        );
        assert!(changed_fields(&before, &before).is_empty());
        assert_eq!(
            Value::Object(changed_fields(&json!(null), &json!({"a": 1}))),
            json!({"a": {"before": null, "after": 1}})
        );
    }

    #[test]
    fn secrets_never_reach_a_change() {
        let before = json!({"token": "eyJold", "spec": {"agent_token": "eyJa", "days": 1}});
        let after = json!({"token": "eyJnew", "spec": {"agent_token": "eyJb", "days": 2}, "client_secret": "s"});
        let changes = Value::Object(changed_fields(&before, &after)).to_string();
        for secret in ["eyJ", "\"s\""] {
            assert!(!changes.contains(secret), "{changes}");
        }
        assert_eq!(
            changed_fields(&before, &after)["spec"]["after"],
            json!({"agent_token": REDACTED, "days": 2})
        );
        assert!(!names_a_secret("token_id") && !names_a_secret("description"));
    }

    #[test]
    fn client_text_is_cleaned_and_cut() {
        assert_eq!(
            clean_text("curl/8.0\r\nX-Forged: 1\0", 256),
            "curl/8.0X-Forged: 1"
        );
        assert_eq!(clean_text(&"é".repeat(300), 256).chars().count(), 256);
        assert_eq!(clean_text("\u{85}a\u{9f}", 10), "a");
    }
}
