"""Structural-schema pruning and validation of custom resources, as kube-apiserver does it.

Undeclared fields are dropped silently (pruning); declared fields with the wrong type and missing
required fields are 422 Invalid with one cause per field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CRD_DIR = Path(__file__).resolve().parents[2] / "crds"
# Whereabouts' own IPPool CRD as upstream publishes it (source and license in the file)
WHEREABOUTS_IPPOOL_CRD = Path(__file__).resolve().parents[1] / "third_party" / "whereabouts-ippools-crd.yaml"


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    schema: dict[str, Any] | None  # None: a built-in kind, not pruned by us
    status_subresource: bool = False  # /status is its own endpoint; the main one ignores status


CRDSource = Path | str | dict[str, Any]


def crd_documents(sources: list[CRDSource] | None = None) -> list[dict[str, Any]]:
    """CustomResourceDefinition documents from files (paths) and/or already-parsed dicts."""
    docs: list[dict[str, Any]] = []
    for source in sources if sources is not None else sorted(CRD_DIR.glob("*.yaml")):
        found = [source] if isinstance(source, dict) else list(yaml.safe_load_all(Path(source).read_text()))
        docs += [d for d in found if d and d.get("kind") == "CustomResourceDefinition"]
    return docs


def load_crds(sources: list[CRDSource] | None = None) -> dict[str, Kind]:
    """Kinds by plural, from CRDs (default: every file in crds/); a non-structural schema is an error,
    as kube-apiserver refuses such a CRD."""
    out: dict[str, Kind] = {}
    for doc in crd_documents(sources):
        spec = doc["spec"]
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            schema = version["schema"]["openAPIV3Schema"]
            problems = structural_errors(schema)
            if problems:
                raise ValueError(f"CRD {doc['metadata']['name']} is not structural: {'; '.join(problems)}")
            out[spec["names"]["plural"]] = Kind(
                spec["group"],
                version["name"],
                spec["names"]["plural"],
                spec["names"]["kind"],
                spec.get("scope", "Namespaced") == "Namespaced",
                schema,
                "status" in (version.get("subresources") or {}),
            )
    return out


def structural_errors(schema: dict[str, Any], path: str = "") -> list[str]:
    """The rules of a structural schema that matter here: every node has a type (or preserves unknown
    fields), properties and additionalProperties are not both set, metadata declares nothing but
    name/generateName."""
    problems: list[str] = []
    where = path or "<root>"
    if (
        "type" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
        and not schema.get("x-kubernetes-int-or-string")
    ):
        problems.append(f"{where}: type: Required value")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: additionalProperties and properties are mutual exclusive")
    for key, sub in (schema.get("properties") or {}).items():
        child = f"{path}.properties[{key}]" if path else f"properties[{key}]"
        if not path and key == "metadata":
            extra = set(sub.get("properties") or {}) - {"name", "generateName"}
            if extra or sub.get("type") != "object":
                problems.append(f"{child}: must be a plain object (only name/generateName may be restricted)")
            continue
        problems += structural_errors(sub, child)
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_errors(schema["additionalProperties"], f"{where}.additionalProperties")
    if isinstance(schema.get("items"), dict):
        problems += structural_errors(schema["items"], f"{where}.items")
    elif schema.get("type") == "array":
        problems.append(f"{where}.items: Required value")
    return problems


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop every field the schema does not declare (recursively)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = (
                props[key]
                if props is not None and key in props
                else extra
                if isinstance(extra, dict)
                else None
            )
            if sub is not None:
                if item is None and not sub.get("nullable") and "default" not in sub:
                    continue  # a null for a non-nullable field is dropped, as the API server does
                out[key] = prune(item, sub)
            elif extra is True:
                out[key] = item
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "object": (dict,),
    "array": (list,),
    "boolean": (bool,),
    "integer": (int,),
    "number": (int, float),
}


def _json_type(value: Any) -> str:
    """The JSON type name kube-apiserver reports for a value."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _bounds(value: Any, schema: dict[str, Any], path: str) -> list[dict[str, str]]:
    """maxLength, maxProperties, maxItems, minimum and maximum, as kube-apiserver words them."""
    field = path or "<root>"
    if isinstance(value, str) and len(value) > schema.get("maxLength", len(value)):
        message = f"Too long: may not be more than {schema['maxLength']} bytes"
        return [{"reason": "FieldValueTooLong", "message": message, "field": field}]
    limit = schema.get("maxProperties" if isinstance(value, dict) else "maxItems")
    if isinstance(value, dict | list) and limit is not None and len(value) > limit:
        message = f"Too many: {len(value)}: must have at most {limit} items"
        return [{"reason": "FieldValueTooMany", "message": message, "field": field}]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "maximum" in schema and value > schema["maximum"]:
            message = (
                f"Invalid value: {value}: {field} in body should be less than or equal to {schema['maximum']}"
            )
            return [{"reason": "FieldValueInvalid", "message": message, "field": field}]
        if "minimum" in schema and value < schema["minimum"]:
            message = f"Invalid value: {value}: {field} in body should be greater than or equal to {schema['minimum']}"
            return [{"reason": "FieldValueInvalid", "message": message, "field": field}]
    return []


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[dict[str, str]]:
    """Causes (FieldValueRequired / FieldValueTypeInvalid) in kube-apiserver's shape."""
    causes: list[dict[str, str]] = []
    expected = schema.get("type")
    if expected in _TYPES and value is not None:
        ok = isinstance(value, _TYPES[expected]) and not (
            expected in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            got = _json_type(value)
            causes.append(
                {
                    "reason": "FieldValueTypeInvalid",
                    "message": f'Invalid value: "{got}": {path or "<root>"} in body must be of type {expected}: "{got}"',
                    "field": path,
                }
            )
            return causes
    causes += _bounds(value, schema, path)
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                field = f"{path}.{key}" if path else key
                causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": field})
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            field = f"{path}.{key}" if path else key
            if key in props:
                causes += validate(item, props[key], field)
            elif isinstance(extra, dict):
                causes += validate(item, extra, f"{path}[{key}]")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            causes += validate(item, schema["items"], f"{path}[{i}]")
    return causes


# our fields that Whereabouts' CRDs do not declare: a lease's (packed `attrs`, and the separate ones
# of the previous version) and a reservation's (node, created)
OUR_EXTRA_FIELDS = ("attrs", "node", "poduid", "created", "network", "token")


def without_fields(
    fields: tuple[str, ...] = OUR_EXTRA_FIELDS, sources: list[CRDSource] | None = None
) -> list[dict[str, Any]]:
    """CRD documents (default: ours) with the named properties removed at every depth: by default
    what Whereabouts' own CRDs declare, to emulate them being applied over ours. Our IPPool CRD
    declares no lease properties, so its emulation is Whereabouts' real one: `whereabouts_crds`."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: strip(v) for k, v in node.items()}
            if isinstance(out.get("properties"), dict):
                out["properties"] = {k: v for k, v in out["properties"].items() if k not in fields}
                if "required" in out:
                    out["required"] = [r for r in out["required"] if r not in fields]
            return out
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return [strip(doc) for doc in crd_documents(sources)]


def whereabouts_crds(others_too: bool = False) -> list[dict[str, Any]]:
    """Whereabouts' own IPPool CRD (tests/third_party) applied over ours, which prunes our lease fields;
    with our other CRDs as they are, or with `others_too` also without our reservation fields (the
    reservation CRD Whereabouts ships, emulated by `without_fields`). WriterTurn is ours alone."""
    others: list[CRDSource] = [p for p in sorted(CRD_DIR.glob("*.yaml")) if "ippools" not in p.name]
    rest = without_fields(sources=others) if others_too else crd_documents(others)
    return [*crd_documents([WHEREABOUTS_IPPOOL_CRD]), *rest]
