"""Every example in the OpenAPI document validates against the schema it illustrates.

    python ci/spec-examples.py openapi/openapi.json

Uses `jsonschema` (installed with openapi-spec-validator), Draft 2020-12 as OpenAPI 3.1
does, with the document's components reachable through `$ref`.
"""
import json
import sys

import jsonschema

doc = json.load(open(sys.argv[1]))
resolver_root = {"components": doc["components"]}


def check(where, schema, example):
    wrapped = dict(schema)
    wrapped["components"] = doc["components"]
    validator = jsonschema.Draft202012Validator(
        wrapped, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(example), key=str)
    for error in errors:
        print(f"{where}: {error.message} at {list(error.absolute_path)}")
    return not errors


checked, ok = 0, True


def walk(where, node, schema_here):
    global checked, ok
    if isinstance(node, dict):
        if "example" in node and isinstance(node.get("example"), (dict, list)):
            checked += 1
            ok &= check(where, {k: v for k, v in node.items() if k != "example"}, node["example"])
        for key, value in node.items():
            walk(f"{where}/{key}", value, schema_here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            walk(f"{where}/{i}", value, schema_here)


walk("#/components/schemas", doc["components"]["schemas"], None)
for path, item in doc["paths"].items():
    for method, op in item.items():
        for media in op.get("requestBody", {}).get("content", {}).values():
            if "example" in media:
                checked += 1
                ok &= check(f"{method} {path}", media["schema"], media["example"])
if checked < 4:
    print(f"only {checked} examples found; expected the main request bodies to have them")
    ok = False
print(f"spec examples: {checked} checked, {'all valid' if ok else 'INVALID'}")
sys.exit(0 if ok else 1)
