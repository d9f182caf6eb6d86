#!/usr/bin/env python3
"""Keep charts/partnergate/values.yaml, values.schema.json and docs/install.md in step.

    values_doc.py            check (run by tests/chart/test.sh)
    values_doc.py --write    regenerate the values table in docs/install.md

Checks: the schema is valid draft-07; values.yaml and tests/chart/values-max.yaml validate
against it; the schema describes exactly the keys of values.yaml (every object closed with
additionalProperties: false unless free-form on purpose, every property with a description);
the table between the values-table markers in docs/install.md is what this script generates.
"""

import json
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts/partnergate"
DOC = ROOT / "docs/install.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"


def fail(msg):
    print(f"FAIL {msg}", file=sys.stderr)
    sys.exit(1)


def leaves(schema, values, prefix=""):
    """(key, schema, default) rows; recurses into closed objects."""
    for key, sub in schema["properties"].items():
        path = f"{prefix}{key}"
        if key == "global" and not prefix:
            continue
        if sub.get("type") == "object" and "properties" in sub:
            yield from leaves(sub, (values or {}).get(key, {}), path + ".")
        else:
            yield path, sub, (values or {}).get(key)


def walk_schema(schema, path="(root)"):
    if schema.get("type") == "object" and "properties" in schema:
        if schema.get("additionalProperties") is not False:
            fail(f"values.schema.json: {path} is not closed (additionalProperties: false)")
        for key, sub in schema["properties"].items():
            if not sub.get("description") and not (path == "(root)" and key == "global"):
                fail(f"values.schema.json: {path}.{key} has no description")
            walk_schema(sub, f"{path}.{key}")


def keys_match(schema, values, path="(root)"):
    props = schema.get("properties", {})
    have = set(values) - {"global"}
    want = set(props) - {"global"}
    if have != want:
        fail(f"values.yaml and values.schema.json differ at {path}: only in values.yaml {sorted(have - want)}, "
             f"only in the schema {sorted(want - have)}")
    for key, sub in props.items():
        if key in values and sub.get("type") == "object" and "properties" in sub:
            keys_match(sub, values[key] or {}, f"{path}.{key}")


def type_of(sub):
    if "enum" in sub:
        return " \\| ".join(f"`{e}`" for e in sub["enum"])
    if "oneOf" in sub:
        return " or ".join(o.get("type", "?") for o in sub["oneOf"])
    return sub.get("type", "any")


def table(schema, values):
    rows = ["| value | type | default | description |", "|---|---|---|---|"]
    for key, sub, default in leaves(schema, values):
        d = '""' if default == "" else json.dumps(default, separators=(", ", ": "))
        desc = sub["description"].replace("|", "\\|")
        rows.append(f"| `{key}` | {type_of(sub)} | `{d}` | {desc} |")
    return "\n".join(rows)


def main():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    for f in (CHART / "values.yaml", ROOT / "tests/chart/values-max.yaml"):
        errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(yaml.safe_load(f.read_text())), key=str)
        if errors:
            fail(f"{f.relative_to(ROOT)} does not validate: " + "; ".join(
                f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors))
    walk_schema(schema)
    keys_match(schema, values)
    keys_match(schema, yaml.safe_load((ROOT / "tests/chart/values-max.yaml").read_text()))
    generated = f"{START}\n{table(schema, values)}\n{END}"
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        fail(f"{DOC.relative_to(ROOT)} has no {START} ... {END} section")
    current = doc[doc.index(START):doc.index(END) + len(END)]
    if "--write" in sys.argv:
        DOC.write_text(doc.replace(current, generated))
        print(f"wrote the values table into {DOC.relative_to(ROOT)}")
    elif current != generated:
        fail(f"the values table in {DOC.relative_to(ROOT)} is stale: run tests/chart/values_doc.py --write")
    print("ok   values.yaml, values-max.yaml and values.schema.json agree; docs/install.md values table in sync")


if __name__ == "__main__":
    main()
