"""A Kubernetes API test server: real HTTP, kube-apiserver's status codes and Status bodies.

It serves discovery (/version, /api, /apis, group and group-version documents), pods and
namespaces (core/v1) and the custom resources declared in crds/ (or any CRD set given) with GET,
LIST (label/field selectors, limit/continue paging, resourceVersion), POST (generateName), PUT,
PATCH (json-patch incl. `test`, merge-patch; strategic-merge as merge, for built-in kinds only) and
DELETE (uid/resourceVersion preconditions); the status subresource where declared; one global
resourceVersion counter; 409 Conflict on a stale resourceVersion; 422 for a custom resource PUT
without one; 409 AlreadyExists; 404 NotFound; 422 Invalid with causes; pruning of undeclared
custom-resource fields; no-op updates that keep their resourceVersion. Faults are injected on
demand (`KubeAPI.set_faults`): latency, a share of 500/503 answers, 429 with Retry-After, dropped
connections (before the request, or after it was carried out), always-conflicting writes; scoped by
method and resource, seeded.

The production code reaches it through an ordinary kubeconfig, so the code under test is unchanged.
Standalone: `python -m tests.kubeapi.server --port 0 --kubeconfig PATH [--latency-ms N]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import json
import random
import re
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .schema import CRDSource, Kind, load_crds, prune, validate

CORE = {
    "pods": Kind("", "v1", "pods", "Pod", True, None, status_subresource=True),
    "namespaces": Kind("", "v1", "namespaces", "Namespace", False, None),
}


class APIError(Exception):
    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
        }
        if self.reason:  # StatusReasonUnknown is "" and left out, as Go's omitempty does
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def _qualified(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _details(kind: Kind, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if kind.group:
        out["group"] = kind.group
    out["kind"] = kind.plural
    return out


def not_found(kind: Kind, name: str) -> APIError:
    return APIError(404, "NotFound", f'{_qualified(kind)} "{name}" not found', _details(kind, name))


def already_exists(kind: Kind, name: str) -> APIError:
    return APIError(409, "AlreadyExists", f'{_qualified(kind)} "{name}" already exists', _details(kind, name))


def conflict(
    kind: Kind,
    name: str,
    why: str = "the object has been modified; please apply your changes to the latest version and try again",
) -> APIError:
    return APIError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {_qualified(kind)} "{name}": {why}',
        _details(kind, name),
    )


def invalid(kind: Kind, name: str, causes: list[dict[str, str]], kind_name: str | None = None) -> APIError:
    """422 Invalid as apierrors.NewInvalid builds it; kind_name overrides the Kind (the generic store
    reports a missing resourceVersion with the resource's plural there)."""
    group = f".{kind.group}" if kind.group else ""
    summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    message = (
        f'{kind_name or kind.kind}{group} "{name}" is invalid: {summary}'
        if len(causes) == 1
        else f'{kind_name or kind.kind}{group} "{name}" is invalid: [{summary}]'
    )
    details: dict[str, Any] = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details["kind"] = kind_name or kind.kind
    details["causes"] = causes
    return APIError(422, "Invalid", message, details)


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


def no_route() -> APIError:
    """What kube-apiserver answers for a path or subresource it does not serve."""
    return APIError(404, "NotFound", "the server could not find the requested resource", {})


def internal_error(cause: str) -> APIError:
    return APIError(
        500, "InternalError", f"Internal error occurred: {cause}", {"causes": [{"message": cause}]}
    )


def patch_not_applied() -> APIError:
    """A JSON patch that cannot be applied (a failed `test`, a missing path): kube-apiserver answers
    422 with this generic body and no causes, the same for every such failure."""
    return APIError(422, "Invalid", "the server rejected our request due to an error in our request", {})


def _storage_key(kind: Kind, namespace: str, name: str) -> str:
    parts = [
        "/registry",
        *([kind.group] if kind.group else []),
        kind.plural,
        *([namespace] if namespace else []),
        name,
    ]
    return "/".join(parts)


def precondition_failed(
    kind: Kind, namespace: str, name: str, what: str, wanted: str, actual: str
) -> APIError:
    """409 for a failed uid/resourceVersion precondition, worded as kube-apiserver wraps etcd's error."""
    return conflict(
        kind,
        name,
        f"StorageError: invalid object, Code: 4, Key: {_storage_key(kind, namespace, name)}, ResourceVersion: 0, "
        f"AdditionalErrorMsg: Precondition failed: {what} in precondition: {wanted}, {what} in object meta: {actual}",
    )


# a lowercase RFC 1123 subdomain: what metadata.name of pods and custom resources must be
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com', regex used for "
    "validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


def name_problems(name: str) -> list[dict[str, str]]:
    if len(name) > 253:
        return [
            {
                "reason": "FieldValueTooLong",
                "message": "Too long: may not be more than 253 bytes",
                "field": "metadata.name",
            }
        ]
    if not _SUBDOMAIN.match(name):
        return [
            {
                "reason": "FieldValueInvalid",
                "message": f'Invalid value: "{name}": {_SUBDOMAIN_MSG}',
                "field": "metadata.name",
            }
        ]
    return []


@dataclass
class Faults:
    """What to inject into requests that match `methods` and `resources` (discovery is never hit).

    One random roll per matching request (from the seeded generator, so a sequence of requests is hit
    the same way every run) picks at most one of: drop (drop_rate), 429 (throttle_rate), 500/503
    (error_rate), drop after carrying it out (drop_after_rate); the shares add up, in that order.
    always_conflict is checked by the store on every PUT/PATCH of those plurals.
    """

    latency: float = 0.0  # seconds added before each matching request is handled
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 503)  # 500 -> InternalError, 503 -> ServiceUnavailable
    throttle_rate: float = 0.0
    retry_after: int = 1  # Retry-After header (and details.retryAfterSeconds of a "status" 429)
    # "text": API Priority and Fairness / max-in-flight rejection, plain text (the usual 429);
    # "status": a Status JSON with reason TooManyRequests (e.g. "storage is (re)initializing")
    throttle_format: str = "text"
    drop_rate: float = 0.0  # share of requests whose connection is closed without an answer
    methods: frozenset[str] | None = None  # None: every method; else e.g. {"PUT", "POST"}
    resources: frozenset[str] | None = None  # None: every resource; else plurals, e.g. {"ippools"}
    always_conflict: frozenset[str] = frozenset()  # plurals whose PUT/PATCH always answer 409 Conflict
    drop_after_rate: float = 0.0  # share of requests carried out and then dropped before the answer
    # at most this many matching requests are hit (None: no limit), e.g. methods={"PUT"}, max_hits=1,
    # drop_after_rate=1.0 loses the answer of exactly the next PUT
    max_hits: int | None = None


@dataclass
class State:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    resource_version: int = 1000


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# -- managedFields --------------------------------------------------------------------------------

_TRACKED_META = ("labels", "annotations", "finalizers", "ownerReferences")


def _fields_v1(value: Any) -> dict[str, Any]:
    """The FieldsV1 set of an object: every field path, lists atomic (no list-type is declared)."""
    if not isinstance(value, dict):
        return {}
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = _fields_v1(item)
        out[f"f:{key}"] = {".": {}, **sub} if isinstance(item, dict) and item else sub
    return out


def manager_name(user_agent: str) -> str:
    """The field manager kube-apiserver records for a request without fieldManager: the User-Agent up to
    its first '/' (e.g. "OpenAPI-Generator" for the Python client)."""
    return (user_agent.split("/", 1)[0] or "unknown")[:128]


def record_manager(
    obj: dict[str, Any], manager: str, api_version: str, subresource: str | None = None
) -> None:
    """Set the requester's managedFields entry (operation Update) to the fields the object now has."""
    meta = obj["metadata"]
    if subresource:
        fields = _fields_v1({"status": obj.get("status")}) if "status" in obj else {}
    else:
        body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
        tracked = {k: meta[k] for k in _TRACKED_META if meta.get(k)}
        if tracked:
            body = {"metadata": tracked, **body}
        fields = _fields_v1(body)
    entry: dict[str, Any] = {
        "manager": manager,
        "operation": "Update",
        "apiVersion": api_version,
        "time": _now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }
    if subresource:
        entry["subresource"] = subresource
    others = [
        e
        for e in meta.get("managedFields") or []
        if not (e.get("manager") == manager and e.get("subresource") == subresource)
    ]
    meta["managedFields"] = [*others, entry]


# -- label selectors ------------------------------------------------------------------------------

_SET_RE = re.compile(r"^\s*([\w./-]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    for term in _split_selector(selector):
        term = term.strip()
        if not term:
            continue
        m = _SET_RE.match(term)
        if m:
            key, op, values = m.group(1), m.group(2), {v.strip() for v in m.group(3).split(",") if v.strip()}
            present = key in labels and labels[key] in values
            if present != (op == "in"):
                return False
            continue
        if "!=" in term:
            key, value = (s.strip() for s in term.split("!=", 1))
            if labels.get(key) == value:
                return False
        elif "==" in term or "=" in term:
            key, value = (s.strip() for s in re.split("==|=", term, maxsplit=1))
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


# -- JSON patch (RFC 6902) and merge patch (RFC 7386) ----------------------------------------------


class PatchTestFailed(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str]) -> Any:
    for part in parts:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    return doc


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op.get("op"), _pointer(op.get("path", ""))
        if kind == "test":
            try:
                current = _resolve(doc, parts)
            except (KeyError, IndexError, TypeError, ValueError):
                raise PatchTestFailed(f"testing value {op.get('path')} failed: path does not exist") from None
            if current != op.get("value"):
                raise PatchTestFailed(f"testing value {op.get('path')} failed: test failed")
            continue
        if kind in ("move", "copy"):
            source = _pointer(op["from"])
            value = copy.deepcopy(_resolve(doc, source))
            if kind == "move":
                parent = _resolve(doc, source[:-1])
                del parent[int(source[-1]) if isinstance(parent, list) else source[-1]]
            kind, op = "add", {"value": value}
        parent = _resolve(doc, parts[:-1])
        last = parts[-1] if parts else None
        if last is None:
            if kind in ("add", "replace"):
                doc = op["value"]
                continue
            raise ValueError("cannot remove the whole document")
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind == "replace":
                parent[index] = op["value"]
            elif kind == "remove":
                del parent[index]
            else:
                raise ValueError(f"unknown op {kind!r}")
        else:
            if kind == "add":
                parent[last] = op["value"]
            elif kind == "replace":
                if last not in parent:
                    raise KeyError(last)
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            else:
                raise ValueError(f"unknown op {kind!r}")
    return doc


def _json_kind(value: Any) -> str:
    return {dict: "object", str: "string", bool: "bool", int: "number", float: "number"}.get(
        type(value), "null"
    )


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


# -- the API --------------------------------------------------------------------------------------


class KubeAPI:
    """Thread-safe object store with kube-apiserver semantics; the HTTP layer calls into it."""

    def __init__(self, crd_paths: list[CRDSource] | None = None, seed: int = 0) -> None:
        """crd_paths: CRD files and/or parsed CRD dicts to serve (default: every file in crds/)."""
        self.lock = threading.RLock()
        self.kinds: dict[str, Kind] = {**CORE, **load_crds(crd_paths)}
        self.state = State()
        self.faults = Faults()
        self.seed = seed
        self.rng = random.Random(seed)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.fault_hits = 0
        self.reset()

    # test-facing helpers
    def reset(self) -> None:
        """Forget every object, fault and counter (the CRD set stays); default namespaces exist again."""
        with self.lock:
            self.state = State()
            self.faults = Faults()
            self.fault_hits = 0
            self.rng = random.Random(self.seed)
            self.counts.clear()
            for ns in ("default", "kube-system"):
                self._store(
                    "namespaces", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                )

    def set_faults(self, seed: int | None = None, **values: Any) -> None:
        """Replace the active faults (fields of `Faults`; unnamed ones go back to off). A seed restarts
        the random sequence that decides which requests are hit, so a run is reproducible."""
        with self.lock:
            if seed is not None:
                self.rng = random.Random(seed)
            for key in ("methods", "resources", "always_conflict"):
                if key in values and values[key] is not None:
                    values[key] = frozenset(values[key])
            self.faults = Faults(**values)
            self.fault_hits = 0

    def clear_faults(self) -> None:
        self.set_faults()

    def use_crds(self, paths: list[CRDSource] | None) -> None:
        """Serve custom resources by other CRDs (files or parsed dicts; None: ours from crds/), e.g.
        Whereabouts' own without our extra fields. Stored objects are kept, as when a CRD is re-applied;
        the new schema applies from the next write."""
        with self.lock:
            self.kinds = {**CORE, **load_crds(paths)}

    def count(self, verb: str, plural: str) -> int:
        """Requests seen (including those answered by a fault) for a verb (get, list, create, update,
        patch, delete) and a plural; ("conflict", plural) counts 409 Conflict answers."""
        with self.lock:
            return self.counts[(verb, plural)]

    def counts_snapshot(self) -> dict[tuple[str, str], int]:
        with self.lock:
            return dict(self.counts)

    def reset_counts(self) -> None:
        with self.lock:
            self.counts.clear()

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                copy.deepcopy(o)
                for (p, ns, _), o in sorted(self.state.objects.items())
                if p == plural and (namespace is None or ns == namespace)
            ]

    def put_pod(
        self,
        namespace: str,
        name: str,
        phase: str = "Running",
        uid: str | None = None,
        annotations: dict[str, str] | None = None,
        created: str | None = None,
        deleting: bool = False,
        labels: dict[str, str] | None = None,
        node: str | None = None,
    ) -> dict[str, Any]:
        """Create or replace a pod with the given status directly (what kubelet would have written);
        its namespace is created when missing. deleting: a deletionTimestamp is set (terminating).
        Replacing an existing pod without `uid` keeps its uid and creationTimestamp (an update)."""
        with self.lock:
            existing = self.state.objects.get(("pods", namespace, name))
            if existing is not None and uid is None:  # an update of the same pod, as on a real server
                uid = existing["metadata"]["uid"]
                created = created or existing["metadata"].get("creationTimestamp")
            if ("namespaces", "", namespace) not in self.state.objects:
                self._store(
                    "namespaces",
                    "",
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                )
            meta: dict[str, Any] = {
                "name": name,
                "namespace": namespace,
                "uid": uid or str(uuid.uuid4()),
                "annotations": annotations or {},
                "creationTimestamp": created or _now(),
            }
            if deleting:
                meta["deletionTimestamp"] = _now()
            if labels:
                meta["labels"] = dict(labels)
            spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
            if node:
                spec["nodeName"] = node
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": spec,
                "status": {"phase": phase},
            }
            return self._store("pods", namespace, pod, keep_meta=True)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Remove a pod at once (what kubelet's final delete does); a missing one is no error."""
        with self.lock:
            self.state.objects.pop(("pods", namespace, name), None)

    # internals
    def _next_rv(self) -> str:
        self.state.resource_version += 1
        return str(self.state.resource_version)

    def _store(
        self, plural: str, namespace: str, obj: dict[str, Any], keep_meta: bool = False
    ) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if not keep_meta or "uid" not in meta:
            meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = self._next_rv()
        meta.setdefault("generation", 1)
        if namespace:
            meta["namespace"] = namespace
        self.state.objects[(plural, namespace, meta["name"])] = obj
        return copy.deepcopy(obj)

    def _admit(self, kind: Kind, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Prune and validate a custom resource's body, as the API server does on every write."""
        if kind.schema is None:
            obj["apiVersion"], obj["kind"] = kind.version, kind.kind
            return obj
        props = kind.schema.get("properties") or {}
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key in ("apiVersion", "kind", "metadata"):
                out[key] = value
            elif key in props:
                out[key] = prune(value, props[key])
        body_schema = {k: v for k, v in kind.schema.items() if k != "properties"}
        body_schema["properties"] = {k: v for k, v in props.items() if k != "metadata"}
        causes = validate({k: v for k, v in out.items() if k != "metadata"}, body_schema)
        if causes:
            raise invalid(kind, name, causes)
        out["apiVersion"] = f"{kind.group}/{kind.version}" if kind.group else kind.version
        out["kind"] = kind.kind
        return out

    def _check_namespace(self, kind: Kind, namespace: str) -> None:
        if kind.namespaced and ("namespaces", "", namespace) not in self.state.objects:
            raise not_found(CORE["namespaces"], namespace)

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any]:
        with self.lock:
            obj = self.state.objects.get((kind.plural, namespace, name))
            if obj is None:
                raise not_found(kind, name)
            return copy.deepcopy(obj)

    def list(self, kind: Kind, namespace: str | None, query: dict[str, str]) -> dict[str, Any]:
        """LIST with labelSelector/fieldSelector, limit/continue paging (ordered by namespace/name, as
        etcd keys are) and resourceVersion: unset or "0" or not newer than now serves the current state;
        newer than now is 504 "Too large resource version", as from the watch cache."""
        with self.lock:
            selector = query.get("labelSelector", "")
            field_selector = query.get("fieldSelector", "")
            token = query.get("continue")
            list_rv = str(self.state.resource_version)
            wanted_rv = query.get("resourceVersion", "")
            if token and wanted_rv:
                raise bad_request("specifying resource version is not allowed when using continue")
            if wanted_rv:
                if not wanted_rv.isdigit():
                    raise bad_request(
                        f'invalid resource version: strconv.ParseUint: parsing "{wanted_rv}": invalid syntax'
                    )
                if int(wanted_rv) > self.state.resource_version:
                    raise APIError(
                        504,
                        "Timeout",
                        f"Too large resource version: {wanted_rv}, current: {self.state.resource_version}",
                        {
                            "causes": [
                                {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                            ],
                            "retryAfterSeconds": 1,
                        },
                    )
            items = []
            for (plural, ns, name), obj in self.state.objects.items():
                if plural != kind.plural or (namespace is not None and ns != namespace):
                    continue
                labels = obj.get("metadata", {}).get("labels") or {}
                if selector and not selector_matches(selector, labels):
                    continue
                if field_selector and not self._field_matches(field_selector, obj):
                    continue
                items.append((f"{ns}/{name}" if ns else name, obj))
            items.sort(key=lambda item: item[0])
            start = 0
            if token:
                try:
                    decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
                    after, list_rv = str(decoded["start"]), str(decoded["rv"])
                except (ValueError, TypeError, KeyError) as exc:
                    raise bad_request(f"continue key is not valid: {exc}") from None
                start = next((i for i, (key, _) in enumerate(items) if key > after), len(items))
            try:
                limit = int(query.get("limit") or 0)
            except ValueError:
                raise bad_request(f"limit: invalid value {query.get('limit')!r}") from None
            page = items[start : start + limit] if limit > 0 else items[start:]
            meta: dict[str, Any] = {"resourceVersion": list_rv}
            if limit > 0 and start + limit < len(items):
                last = page[-1][0]
                meta["continue"] = base64.urlsafe_b64encode(
                    json.dumps({"v": "meta.k8s.io/v1", "rv": list_rv, "start": last}).encode()
                ).decode()
                if not selector and not field_selector:
                    meta["remainingItemCount"] = len(items) - start - limit
            return {
                "apiVersion": f"{kind.group}/{kind.version}" if kind.group else kind.version,
                "kind": f"{kind.kind}List",
                "metadata": meta,
                "items": [copy.deepcopy(o) for _, o in page],
            }

    @staticmethod
    def _field_matches(selector: str, obj: dict[str, Any]) -> bool:
        for term in selector.split(","):
            key, _, value = term.partition("=")
            key = key.rstrip("=!")
            negate = "!=" in term
            actual = {
                "metadata.name": obj["metadata"].get("name"),
                "metadata.namespace": obj["metadata"].get("namespace"),
                "status.phase": obj.get("status", {}).get("phase"),
                "spec.nodeName": obj.get("spec", {}).get("nodeName"),
            }.get(key)
            if (actual == value.lstrip("=")) == negate:
                return False
        return True

    def create(
        self, kind: Kind, namespace: str, body: dict[str, Any], manager: str | None = None
    ) -> dict[str, Any]:
        """POST. manager: the field manager to record in managedFields (None: none, as for helpers)."""
        with self.lock:
            meta = body.get("metadata") or {}
            name = meta.get("name") or ""
            if not name and meta.get("generateName"):
                # five characters from the alphabet kube-apiserver's name generator uses
                while True:
                    name = meta["generateName"] + "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))
                    if (kind.plural, namespace, name) not in self.state.objects:
                        break
            if not name:
                raise invalid(
                    kind,
                    "",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "message": "Required value: name or generateName is required",
                            "field": "metadata.name",
                        }
                    ],
                )
            if meta.get("namespace") and kind.namespaced and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            problems = name_problems(name)
            if problems:
                raise invalid(kind, name, problems)
            # order as in kube-apiserver: validation (422), then admission (namespace 404), then storage (409)
            obj = self._admit(kind, name, copy.deepcopy(body))
            self._check_namespace(kind, namespace)
            if meta.get("resourceVersion"):  # etcd3 store's plain error: a 500 without a reason
                raise APIError(500, "", "resourceVersion should not be set on objects to be created")
            if (kind.plural, namespace, name) in self.state.objects:
                raise already_exists(kind, name)
            new_meta = {
                k: v
                for k, v in (obj.get("metadata") or {}).items()
                if k in ("name", "labels", "annotations", "finalizers", "ownerReferences")
            }
            new_meta["name"] = name
            obj["metadata"] = new_meta
            if kind.plural == "pods":
                obj["status"] = {"phase": "Pending"}
            elif kind.status_subresource:
                obj.pop("status", None)  # status is only written through /status
            if manager:
                record_manager(obj, manager, obj["apiVersion"])
            return self._store(kind.plural, namespace if kind.namespaced else "", obj)

    def _faulty_write(self, kind: Kind, name: str) -> None:
        if kind.plural in self.faults.always_conflict:
            raise conflict(kind, name)

    def replace(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        body: dict[str, Any],
        status_only: bool = False,
        manager: str | None = None,
    ) -> dict[str, Any]:
        """PUT, in kube-apiserver's order: name check (400), existence (404), uid precondition and
        resourceVersion (409; a missing one is 422 for custom resources, which do not allow
        unconditional updates), schema (422). A write that changes nothing keeps its resourceVersion."""
        with self.lock:
            meta = body.get("metadata") or {}
            if meta.get("name") and meta["name"] != name:
                raise bad_request(
                    "the name of the object ({}) does not match the name on the URL ({})".format(
                        meta["name"], name
                    )
                )
            key = (kind.plural, namespace, name)
            current = self.state.objects.get(key)
            if current is None:
                raise not_found(kind, name)
            self._faulty_write(kind, name)
            current_meta = current["metadata"]
            if meta.get("uid") and meta["uid"] != current_meta["uid"]:
                raise precondition_failed(kind, namespace, name, "UID", meta["uid"], current_meta["uid"])
            rv = meta.get("resourceVersion")
            if not rv and kind.group:
                raise invalid(
                    kind,
                    name,
                    [
                        {
                            "reason": "FieldValueInvalid",
                            "message": "Invalid value: 0x0: must be specified for an update",
                            "field": "metadata.resourceVersion",
                        }
                    ],
                    kind_name=kind.plural,
                )
            if rv and rv != current_meta["resourceVersion"]:
                raise conflict(kind, name)
            if status_only:
                obj = copy.deepcopy(current)
                checked = self._admit(kind, name, {**current, "status": copy.deepcopy(body.get("status"))})
                if "status" in checked:
                    obj["status"] = checked["status"]
                else:
                    obj.pop("status", None)
                new_meta = copy.deepcopy(current_meta)
            else:
                obj = self._admit(kind, name, copy.deepcopy(body))
                if kind.status_subresource:  # the main endpoint leaves status as it was
                    obj.pop("status", None)
                    if "status" in current:
                        obj["status"] = copy.deepcopy(current["status"])
                kept = {
                    k: current_meta[k]
                    for k in ("uid", "creationTimestamp", "namespace", "generation", "deletionTimestamp")
                    if k in current_meta
                }
                new_meta = {
                    **{
                        k: v
                        for k, v in meta.items()
                        if k in ("labels", "annotations", "finalizers", "ownerReferences")
                    },
                    **kept,
                    "name": name,
                }
            new_meta["resourceVersion"] = current_meta["resourceVersion"]
            if "managedFields" in current_meta:  # kept by the server, whatever the body says
                new_meta["managedFields"] = copy.deepcopy(current_meta["managedFields"])
            else:
                new_meta.pop("managedFields", None)
            obj["metadata"] = new_meta
            if obj == current:  # a no-op update is not written: same object, same resourceVersion
                return copy.deepcopy(current)
            if manager:
                record_manager(obj, manager, obj["apiVersion"], "status" if status_only else None)
            if not status_only and self._generation_content(kind, obj) != self._generation_content(
                kind, current
            ):
                new_meta["generation"] = int(current_meta.get("generation", 1)) + 1
            new_meta["resourceVersion"] = self._next_rv()
            self.state.objects[key] = obj
            return copy.deepcopy(obj)

    @staticmethod
    def _generation_content(kind: Kind, obj: dict[str, Any]) -> Any:
        """What metadata.generation tracks: spec for built-in kinds and custom resources with a status
        subresource, everything but metadata for custom resources without one."""
        if not kind.group:
            return obj.get("spec")
        skip = {"metadata", "status"} if kind.status_subresource else {"metadata"}
        return {k: v for k, v in obj.items() if k not in skip}

    def patch(
        self,
        kind: Kind,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        status_only: bool = False,
        manager: str | None = None,
    ) -> dict[str, Any]:
        with self.lock:
            current = self.state.objects.get((kind.plural, namespace, name))
            if current is None:
                raise not_found(kind, name)
            self._faulty_write(kind, name)
            try:
                if content_type.startswith("application/json-patch+json"):
                    if not isinstance(patch, list):
                        raise bad_request(
                            f"json: cannot unmarshal {_json_kind(patch)} into Go value of type jsonpatch.Patch"
                        )
                    patched = json_patch(current, patch)
                elif content_type.startswith("application/merge-patch+json") or (
                    # strategic merge (treated as a merge patch here) exists for built-in kinds only
                    not kind.group and content_type.startswith("application/strategic-merge-patch+json")
                ):
                    patched = merge_patch(current, patch)
                else:
                    accepted = ["application/json-patch+json", "application/merge-patch+json"]
                    if not kind.group:
                        accepted.append("application/strategic-merge-patch+json")
                    accepted.append("application/apply-patch+yaml")
                    raise APIError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: "
                        + ", ".join(accepted),
                        {},
                    )
            except (PatchTestFailed, KeyError, IndexError, ValueError, TypeError):
                raise patch_not_applied() from None
            if not isinstance(patched, dict):
                raise patch_not_applied()
            patched_meta = patched.setdefault("metadata", {})
            if not isinstance(patched_meta, dict):
                raise patch_not_applied()
            if not patched_meta.get("resourceVersion"):  # a patch is applied to the object as it is now
                patched_meta["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self.replace(kind, namespace, name, patched, status_only=status_only, manager=manager)

    def delete(self, kind: Kind, namespace: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            key = (kind.plural, namespace, name)
            current = self.state.objects.get(key)
            if current is None:
                raise not_found(kind, name)
            # a precondition that is present is compared, even when empty (Go's *string)
            pre = options.get("preconditions") or {}
            meta = current["metadata"]
            if pre.get("uid") is not None and pre["uid"] != meta["uid"]:
                raise precondition_failed(kind, namespace, name, "UID", pre["uid"], meta["uid"])
            if pre.get("resourceVersion") is not None and pre["resourceVersion"] != meta["resourceVersion"]:
                raise precondition_failed(
                    kind, namespace, name, "ResourceVersion", pre["resourceVersion"], meta["resourceVersion"]
                )
            del self.state.objects[key]
            if kind.plural == "namespaces":  # what the namespace controller does, at once
                for other in [k for k in self.state.objects if k[1] == name]:
                    del self.state.objects[other]
            self._next_rv()
            if kind.group:
                return {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {**_details(kind, name), "uid": current["metadata"]["uid"]},
                }
            return copy.deepcopy(current)


# -- HTTP -----------------------------------------------------------------------------------------

_PATH = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status))?/?$"
)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: APIServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def setup(self) -> None:
        super().setup()
        # answer without Nagle's delay, as Go's net/http (kube-apiserver) does by default
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _send(self, code: int, body: Any, headers: dict[str, str] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise bad_request(f"couldn't get version/kind; json parse error: {exc}") from None

    def _drop(self) -> None:
        """Close the connection without an answer (the client sees the peer hang up)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _inject(self, kind: Kind) -> tuple[bool, bool]:
        """Apply faults before the request is carried out. Returns (answered, drop_after): answered when
        a fault already answered (or dropped) the request; drop_after when the request is to be carried
        out and its answer then lost."""
        api = self.server.api
        with api.lock:
            faults = api.faults
            applies = (faults.methods is None or self.command in faults.methods) and (
                faults.resources is None or kind.plural in faults.resources
            )
            if applies and faults.max_hits is not None:
                applies = api.fault_hits < faults.max_hits
                api.fault_hits += 1
            roll = api.rng.random() if applies else 1.0
            roll_code = api.rng.choice(faults.error_codes) if faults.error_codes else 500
        if not applies:
            return False, False
        if faults.latency:
            time.sleep(faults.latency)
        if roll < faults.drop_rate:
            self._drop()
            return True, False
        roll -= faults.drop_rate
        if roll < faults.throttle_rate:
            if faults.throttle_format == "status":
                err = APIError(
                    429,
                    "TooManyRequests",
                    "storage is (re)initializing",
                    {"retryAfterSeconds": faults.retry_after},
                    {"Retry-After": str(faults.retry_after)},
                )
                self._send(429, err.body(), err.headers)
            else:  # what the APF/max-in-flight filter writes: http.Error, plain text, before any handler
                self._send_text(
                    429,
                    "Too many requests, please try again later.\n",
                    {"Retry-After": str(faults.retry_after), "X-Content-Type-Options": "nosniff"},
                )
            return True, False
        roll -= faults.throttle_rate
        if roll < faults.error_rate:
            if roll_code == 503:
                err = APIError(
                    503, "ServiceUnavailable", "the server is currently unable to handle the request", {}
                )
            else:
                err = internal_error("injected fault")
                err.code = roll_code
            self._send(err.code, err.body())
            return True, False
        roll -= faults.error_rate
        return False, roll < faults.drop_after_rate

    def _discovery(self, path: str) -> Any:
        """Discovery documents (/api, /apis, group and group-version resource lists); None if not one."""
        api = self.server.api
        kinds = list(api.kinds.values())
        path = path.rstrip("/")
        groups: dict[str, list[str]] = {}
        for k in kinds:
            if k.group and k.version not in groups.setdefault(k.group, []):
                groups[k.group].append(k.version)

        def group_doc(name: str) -> dict[str, Any]:
            versions = [{"groupVersion": f"{name}/{v}", "version": v} for v in groups[name]]
            return {"name": name, "versions": versions, "preferredVersion": versions[0]}

        def resources(group: str, version: str) -> dict[str, Any]:
            out: list[dict[str, Any]] = []
            for k in kinds:
                if k.group != group or k.version != version:
                    continue
                out.append(
                    {
                        "name": k.plural,
                        "singularName": k.kind.lower(),
                        "namespaced": k.namespaced,
                        "kind": k.kind,
                        "verbs": ["delete", "get", "list", "patch", "create", "update"],
                    }
                )
                if k.status_subresource:
                    out.append(
                        {
                            "name": f"{k.plural}/status",
                            "singularName": "",
                            "namespaced": k.namespaced,
                            "kind": k.kind,
                            "verbs": ["get", "patch", "update"],
                        }
                    )
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": out,
            }

        host, port = str(self.server.server_address[0]), int(self.server.server_address[1])
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{host}:{port}"}
                ],
            }
        if path == "/api/v1":
            return resources("", "v1")
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group_doc(g) for g in groups]}
        parts = path.split("/")
        if len(parts) == 3 and parts[1] == "apis" and parts[2] in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **group_doc(parts[2])}
        if len(parts) == 4 and parts[1] == "apis" and parts[3] in groups.get(parts[2], []):
            return resources(parts[2], parts[3])
        return None

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api = self.server.api
        body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
        if self.command == "GET":
            if url.path in ("/version", "/version/"):
                self._send(
                    200,
                    {
                        "major": "1",
                        "minor": "33",
                        "gitVersion": "v1.33.0-whereabouts-py-test",
                        "gitCommit": "0000000000000000000000000000000000000000",
                        "gitTreeState": "clean",
                        "buildDate": "2026-01-01T00:00:00Z",
                        "goVersion": "go1.24.0",
                        "compiler": "gc",
                        "platform": "linux/amd64",
                    },
                )
                return
            if url.path in ("/healthz", "/readyz", "/livez"):
                self._send_text(200, "ok")
                return
            with api.lock:
                doc = self._discovery(url.path)
            if doc is not None:
                self._send(200, doc)
                return
        m = _PATH.match(url.path)
        if not m:
            raise no_route()
        group = m.group("group") or ""
        version = m.group("core") or m.group("version")
        kind = api.kinds.get(m.group("plural"))
        if kind is None or kind.group != group or kind.version != version:
            raise no_route()
        if m.group("ns") and not kind.namespaced:
            raise no_route()
        ns, name, sub = m.group("ns") or "", m.group("name"), m.group("sub")
        if sub and not kind.status_subresource:
            raise no_route()
        verb = {
            "GET": "get" if name else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(self.command, "")
        # a GET of the metadata alone (as the real API server answers it), counted apart
        metadata_only = verb == "get" and "as=PartialObjectMetadata" in self.headers.get("Accept", "")
        if metadata_only:
            verb = "get-metadata"
        with api.lock:
            api.counts[(verb, kind.plural)] += 1
        answered, drop_after = self._inject(kind)
        if answered:
            return
        if self.command == "GET" and name:
            code, out = 200, api.get(kind, ns, name)
            if metadata_only:
                out = {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": out.get("metadata"),
                }
        elif self.command == "GET" and not sub:
            if query.get("watch") in ("1", "true"):
                raise bad_request("watch is not supported by this test server")
            code, out = 200, api.list(kind, ns if m.group("ns") else None, query)
        elif self.command == "POST" and not name:
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be an object")
            code, out = 201, api.create(kind, ns, body, manager=self._manager(query))
        elif self.command == "PUT" and name:
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be an object")
            code, out = (
                200,
                api.replace(kind, ns, name, body, status_only=sub == "status", manager=self._manager(query)),
            )
        elif self.command == "PATCH" and name:
            ctype = self.headers.get("Content-Type", "")
            code, out = (
                200,
                api.patch(
                    kind, ns, name, ctype, body, status_only=sub == "status", manager=self._manager(query)
                ),
            )
        elif self.command == "DELETE" and name and not sub:
            code, out = 200, api.delete(kind, ns, name, body if isinstance(body, dict) else {})
        else:
            raise APIError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {}
            )
        if drop_after:
            self._drop()  # done, but the client never hears of it
            return
        self._send(code, out)

    def _manager(self, query: dict[str, str]) -> str:
        return query.get("fieldManager") or manager_name(self.headers.get("User-Agent", ""))

    def _send_text(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        payload = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self) -> None:
        try:
            self._route()
        except APIError as exc:
            if exc.reason == "Conflict" and exc.details:
                with self.server.api.lock:
                    self.server.api.counts[("conflict", str(exc.details.get("kind", "")))] += 1
            self._send(exc.code, exc.body(), exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class APIServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, api: KubeAPI, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), Handler)
        self.api = api
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"http://{host}:{port}"

    def start(self) -> APIServer:
        self.thread = threading.Thread(target=self.serve_forever, name="kubeapi", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def write_kubeconfig(
    path: Path, url: str, namespace: str | None = "kube-system", token: str = "test-token"
) -> Path:
    context: dict[str, Any] = {"cluster": "test", "user": "plugin"}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": url}}],
        "users": [{"name": "plugin", "user": {"token": token}}],
        "contexts": [{"name": "test", "context": context}],
        "current-context": "test",
    }
    path.write_text(json.dumps(doc, indent=1))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Kubernetes API test server for whereabouts-py")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    api = KubeAPI()
    if args.latency_ms:
        api.set_faults(latency=args.latency_ms / 1000)
    server = APIServer(api, args.port)
    write_kubeconfig(args.kubeconfig, server.url)
    print(server.url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
