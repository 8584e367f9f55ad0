//! Unions tagged by `kind` (serde's internally tagged enums) as generators handle them
//! best: each variant a named schema of its own, whole (its fields and its `kind`), and a
//! discriminator mapping every `kind` to it. utoipa writes a variant as `allOf` of the
//! variant's type and `{kind}`, which a type that refuses unknown fields cannot satisfy.

use serde_json::{Map, Value, json};

/// A variant's schema name, from its `kind`.
type VariantName = fn(&str) -> String;

/// Each union, and how its variants are named.
const UNIONS: &[(&str, VariantName)] = &[
    ("JobPayload", |kind| format!("{}Payload", pascal(kind))),
    ("JobResult", |kind| format!("{}JobResult", pascal(kind))),
];

fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            chars
                .next()
                .map(|first| first.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}

pub fn add(doc: &mut Value) {
    for (union, name_of) in UNIONS {
        let schemas = doc["components"]["schemas"]
            .as_object_mut()
            .expect("component schemas");
        let variants = schemas
            .get(*union)
            .and_then(|u| u["oneOf"].as_array())
            .unwrap_or_else(|| panic!("{union} is a oneOf"))
            .clone();
        let mut one_of = Vec::new();
        let mut mapping = Map::new();
        let mut bases = Vec::new();
        for variant in variants {
            let whole = whole_variant(&variant, schemas, &mut bases);
            let kind = whole["properties"]["kind"]["enum"][0]
                .as_str()
                .unwrap_or_else(|| panic!("a variant of {union} without a kind"))
                .to_owned();
            let name = name_of(&kind);
            assert!(
                !schemas.contains_key(&name),
                "{name} would replace another schema"
            );
            schemas.insert(name.clone(), whole);
            let reference = format!("#/components/schemas/{name}");
            one_of.push(json!({ "$ref": reference }));
            mapping.insert(kind, json!(reference));
        }
        let target = schemas.get_mut(*union).expect("the union");
        target["oneOf"] = Value::Array(one_of);
        target["discriminator"] = json!({ "propertyName": "kind", "mapping": mapping });
        bases.sort();
        bases.dedup();
        let text = serde_json::to_string(&doc).expect("serializes");
        for base in bases {
            // A variant's type that nothing else refers to is now only noise for generators.
            if !text.contains(&format!("\"#/components/schemas/{base}\"")) {
                doc["components"]["schemas"]
                    .as_object_mut()
                    .expect("component schemas")
                    .remove(&base);
            }
        }
    }
}

/// One object schema with everything a variant has: its own fields, or its type's fields
/// (from `allOf`'s `$ref`) and the `kind` beside them.
fn whole_variant(variant: &Value, schemas: &Map<String, Value>, bases: &mut Vec<String>) -> Value {
    let Some(parts) = variant["allOf"].as_array() else {
        return variant.clone();
    };
    let mut properties = Map::new();
    let mut required: Vec<Value> = Vec::new();
    let mut whole = Map::new();
    whole.insert("type".into(), json!("object"));
    for part in parts {
        let part = match part["$ref"].as_str() {
            Some(reference) => {
                let name = reference.trim_start_matches("#/components/schemas/");
                bases.push(name.to_owned());
                let base = &schemas[name];
                for key in ["description", "additionalProperties"] {
                    if let Some(value) = base.get(key) {
                        whole.insert(key.into(), value.clone());
                    }
                }
                base
            }
            None => part,
        };
        if let Some(own) = part["properties"].as_object() {
            properties.extend(own.clone());
        }
        if let Some(own) = part["required"].as_array() {
            required.extend(own.iter().cloned());
        }
    }
    whole.insert("properties".into(), Value::Object(properties));
    whole.insert("required".into(), Value::Array(required));
    Value::Object(whole)
}
