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


@dataclass(frozen=True)
class Kind:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    schema: dict[str, Any] | None  # None: a built-in kind, not pruned by us


def load_crds(paths: list[Path] | None = None) -> dict[str, Kind]:
    """Kinds by plural, from CRD YAML files (default: every file in crds/)."""
    out: dict[str, Kind] = {}
    for path in paths if paths is not None else sorted(CRD_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for version in spec["versions"]:
                if version.get("served", True):
                    out[spec["names"]["plural"]] = Kind(
                        spec["group"],
                        version["name"],
                        spec["names"]["plural"],
                        spec["names"]["kind"],
                        spec.get("scope", "Namespaced") == "Namespaced",
                        version["schema"]["openAPIV3Schema"],
                    )
    return out


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop every field the schema does not declare (recursively)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict) and schema.get("type", "object") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            if props is not None and key in props:
                out[key] = prune(item, props[key])
            elif isinstance(extra, dict):
                out[key] = prune(item, extra)
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


def validate(value: Any, schema: dict[str, Any], path: str = "") -> list[dict[str, str]]:
    """Causes (FieldValueRequired / FieldValueTypeInvalid) in kube-apiserver's shape."""
    causes: list[dict[str, str]] = []
    expected = schema.get("type")
    if expected in _TYPES and value is not None:
        ok = isinstance(value, _TYPES[expected]) and not (
            expected in ("integer", "number") and isinstance(value, bool)
        )
        if not ok:
            got = type(value).__name__
            causes.append(
                {
                    "reason": "FieldValueTypeInvalid",
                    "message": f'Invalid value: "{got}": {path or "<root>"} in body must be of type {expected}: "{got}"',
                    "field": path,
                }
            )
            return causes
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
