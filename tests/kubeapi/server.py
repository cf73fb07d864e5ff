"""A Kubernetes API test server: real HTTP, kube-apiserver's status codes and Status bodies.

It serves pods and namespaces (core/v1) and the custom resources declared in crds/ with GET, LIST
(label selectors, limit/continue paging), POST, PUT, PATCH (json-patch, merge-patch,
strategic-merge treated as merge) and DELETE (with preconditions); one global resourceVersion
counter; 409 Conflict on a stale resourceVersion; 409 AlreadyExists; 404 NotFound; 422 Invalid
with causes; pruning of undeclared custom-resource fields. Faults are injected on demand: latency,
a share of 500/503 answers, 429 with Retry-After, dropped connections, always-conflicting writes.

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

from .schema import Kind, load_crds, prune, validate

CORE = {
    "pods": Kind("", "v1", "pods", "Pod", True, None),
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
            "reason": self.reason,
        }
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


def invalid(kind: Kind, name: str, causes: list[dict[str, str]]) -> APIError:
    group = f".{kind.group}" if kind.group else ""
    summary = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    message = (
        f'{kind.kind}{group} "{name}" is invalid: {summary}'
        if len(causes) == 1
        else f'{kind.kind}{group} "{name}" is invalid: [{summary}]'
    )
    details: dict[str, Any] = {"name": name}
    if kind.group:
        details["group"] = kind.group
    details["kind"] = kind.kind
    details["causes"] = causes
    return APIError(422, "Invalid", message, details)


def bad_request(message: str) -> APIError:
    return APIError(400, "BadRequest", message)


@dataclass
class Faults:
    """What to inject; every share is a probability per matching request (seeded, deterministic)."""

    latency: float = 0.0
    error_rate: float = 0.0
    error_codes: tuple[int, ...] = (500, 503)
    throttle_rate: float = 0.0
    retry_after: int = 1
    drop_rate: float = 0.0
    methods: frozenset[str] | None = None  # None: every method; else e.g. {"PUT", "POST"}
    always_conflict: frozenset[str] = frozenset()  # plurals whose PUT/PATCH always answer 409 Conflict


@dataclass
class State:
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)  # (plural, ns, name)
    resource_version: int = 1000


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


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

    def __init__(self, crd_paths: list[Path] | None = None, seed: int = 0) -> None:
        self.lock = threading.RLock()
        self.kinds: dict[str, Kind] = {**CORE, **load_crds(crd_paths)}
        self.state = State()
        self.faults = Faults()
        self.rng = random.Random(seed)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.reset()

    # test-facing helpers
    def reset(self) -> None:
        with self.lock:
            self.state = State()
            self.faults = Faults()
            self.counts.clear()
            for ns in ("default", "kube-system"):
                self._store(
                    "namespaces", "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                )

    def set_faults(self, seed: int | None = None, **values: Any) -> None:
        with self.lock:
            if seed is not None:
                self.rng = random.Random(seed)
            for key in ("methods", "always_conflict"):
                if key in values and values[key] is not None:
                    values[key] = frozenset(values[key])
            self.faults = Faults(**values)

    def clear_faults(self) -> None:
        self.set_faults()

    def use_crds(self, paths: list[Path]) -> None:
        """Serve custom resources by other CRD files (e.g. Whereabouts' own, without our fields)."""
        with self.lock:
            self.kinds = {**CORE, **load_crds(paths)}

    def count(self, verb: str, plural: str) -> int:
        with self.lock:
            return self.counts[(verb, plural)]

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
    ) -> dict[str, Any]:
        """Create or replace a pod with the given status directly (what kubelet would have written)."""
        with self.lock:
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
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": {"containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": phase},
            }
            return self._store("pods", namespace, pod, keep_meta=True)

    def delete_pod(self, namespace: str, name: str) -> None:
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
        with self.lock:
            selector = query.get("labelSelector", "")
            field_selector = query.get("fieldSelector", "")
            items = []
            for (plural, ns, name), obj in sorted(self.state.objects.items()):
                if plural != kind.plural or (namespace is not None and ns != namespace):
                    continue
                labels = obj.get("metadata", {}).get("labels") or {}
                if selector and not selector_matches(selector, labels):
                    continue
                if field_selector and not self._field_matches(field_selector, obj):
                    continue
                items.append(((ns, name), obj))
            start = 0
            token = query.get("continue")
            if token:
                try:
                    after = json.loads(base64.urlsafe_b64decode(token.encode()))
                    start = next((i for i, (key, _) in enumerate(items) if list(key) > after), len(items))
                except (ValueError, TypeError):
                    raise APIError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ) from None
            limit = int(query.get("limit") or 0)
            page = items[start : start + limit] if limit > 0 else items[start:]
            meta: dict[str, Any] = {"resourceVersion": str(self.state.resource_version)}
            if limit > 0 and start + limit < len(items):
                last = list(page[-1][0])
                meta["continue"] = base64.urlsafe_b64encode(json.dumps(last).encode()).decode()
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

    def create(self, kind: Kind, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            meta = body.get("metadata") or {}
            name = meta.get("name") or ""
            if not name and meta.get("generateName"):
                name = meta["generateName"] + uuid.uuid4().hex[:5]
            if not name:
                raise invalid(
                    kind,
                    "",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "message": "name or generateName is required",
                            "field": "metadata.name",
                        }
                    ],
                )
            if meta.get("namespace") and kind.namespaced and meta["namespace"] != namespace:
                raise bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            self._check_namespace(kind, namespace)
            if (kind.plural, namespace, name) in self.state.objects:
                raise already_exists(kind, name)
            obj = self._admit(kind, name, copy.deepcopy(body))
            new_meta = {
                k: v
                for k, v in (obj.get("metadata") or {}).items()
                if k in ("name", "labels", "annotations", "finalizers", "ownerReferences")
            }
            new_meta["name"] = name
            obj["metadata"] = new_meta
            if kind.plural == "pods":
                obj["status"] = {"phase": "Pending"}
            return self._store(kind.plural, namespace if kind.namespaced else "", obj)

    def _faulty_write(self, kind: Kind, name: str) -> None:
        if kind.plural in self.faults.always_conflict:
            raise conflict(kind, name)

    def replace(
        self, kind: Kind, namespace: str, name: str, body: dict[str, Any], status_only: bool = False
    ) -> dict[str, Any]:
        with self.lock:
            key = (kind.plural, namespace, name)
            current = self.state.objects.get(key)
            if current is None:
                raise not_found(kind, name)
            self._faulty_write(kind, name)
            meta = body.get("metadata") or {}
            if meta.get("name") and meta["name"] != name:
                raise bad_request(
                    "the name of the object ({}) does not match the name on the URL ({})".format(
                        meta["name"], name
                    )
                )
            rv = meta.get("resourceVersion")
            if rv and rv != current["metadata"]["resourceVersion"]:
                raise conflict(kind, name)
            if status_only:
                obj = copy.deepcopy(current)
                obj["status"] = copy.deepcopy(body.get("status"))
            else:
                obj = self._admit(kind, name, copy.deepcopy(body))
                if "status" in current and kind.plural == "pods":
                    obj["status"] = current["status"]
            kept = {
                k: current["metadata"][k]
                for k in ("uid", "creationTimestamp", "namespace", "generation", "deletionTimestamp")
                if k in current["metadata"]
            }
            obj["metadata"] = {
                **{
                    k: v
                    for k, v in meta.items()
                    if k in ("labels", "annotations", "finalizers", "ownerReferences")
                },
                **kept,
                "name": name,
            }
            if not status_only and obj.get("spec") != current.get("spec"):
                obj["metadata"]["generation"] = int(current["metadata"].get("generation", 1)) + 1
            obj["metadata"]["resourceVersion"] = self._next_rv()
            self.state.objects[key] = obj
            return copy.deepcopy(obj)

    def patch(
        self, kind: Kind, namespace: str, name: str, content_type: str, patch: Any, status_only: bool = False
    ) -> dict[str, Any]:
        with self.lock:
            current = self.state.objects.get((kind.plural, namespace, name))
            if current is None:
                raise not_found(kind, name)
            self._faulty_write(kind, name)
            try:
                if content_type.startswith("application/json-patch+json"):
                    if not isinstance(patch, list):
                        raise bad_request("json patch must be a list of operations")
                    patched = json_patch(current, patch)
                elif content_type.startswith(
                    ("application/merge-patch+json", "application/strategic-merge-patch+json")
                ):
                    patched = merge_patch(current, patch)
                else:
                    raise APIError(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    )
            except PatchTestFailed as exc:
                raise invalid(
                    kind, name, [{"reason": "FieldValueInvalid", "message": str(exc), "field": ""}]
                ) from None
            except (KeyError, IndexError, ValueError, TypeError) as exc:
                raise APIError(
                    422, "Invalid", f"the server rejected our request due to an error in our request: {exc}"
                ) from None
            return self.replace(kind, namespace, name, patched, status_only=status_only)

    def delete(self, kind: Kind, namespace: str, name: str, options: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            key = (kind.plural, namespace, name)
            current = self.state.objects.get(key)
            if current is None:
                raise not_found(kind, name)
            pre = options.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != current["metadata"]["uid"]:
                raise conflict(
                    kind,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {current['metadata']['uid']}",
                )
            if (
                pre.get("resourceVersion")
                and pre["resourceVersion"] != current["metadata"]["resourceVersion"]
            ):
                raise conflict(
                    kind,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, ResourceVersion in object meta: {current['metadata']['resourceVersion']}",
                )
            del self.state.objects[key]
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

    def _inject(self, verb: str) -> bool:
        """Apply faults; True when the request was answered (or dropped) by a fault."""
        api = self.server.api
        with api.lock:
            faults = api.faults
            applies = faults.methods is None or self.command in faults.methods
            roll = api.rng.random() if applies else 1.0
            roll_code = api.rng.choice(faults.error_codes) if faults.error_codes else 500
        if faults.latency:
            time.sleep(faults.latency)
        if not applies:
            return False
        if roll < faults.drop_rate:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return True
        roll -= faults.drop_rate
        if roll < faults.throttle_rate:
            err = APIError(
                429,
                "TooManyRequests",
                "Too many requests, please try again later.",
                {"retryAfterSeconds": faults.retry_after},
                {"Retry-After": str(faults.retry_after)},
            )
            self._send(429, err.body(), err.headers)
            return True
        roll -= faults.throttle_rate
        if roll < faults.error_rate:
            if roll_code == 503:
                err = APIError(
                    503, "ServiceUnavailable", "the server is currently unable to handle the request"
                )
            else:
                err = APIError(roll_code, "InternalError", "Internal error occurred: injected fault")
            self._send(err.code, err.body())
            return True
        return False

    def _route(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        api = self.server.api
        if url.path in ("/version", "/version/"):
            self._send(200, {"major": "1", "minor": "31", "gitVersion": "v1.31.0-whereabouts-py-test"})
            return
        if url.path in ("/healthz", "/readyz", "/livez"):
            self._send(200, "ok")
            return
        m = _PATH.match(url.path)
        body = self._body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
        if not m:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        group = m.group("group") or ""
        version = m.group("core") or m.group("version")
        kind = api.kinds.get(m.group("plural"))
        if kind is None or kind.group != group or kind.version != version:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        ns, name, sub = m.group("ns") or "", m.group("name"), m.group("sub")
        verb = {
            "GET": "get" if name else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(self.command, "")
        with api.lock:
            api.counts[(verb, kind.plural)] += 1
        if self._inject(verb):
            return
        if self.command == "GET" and name:
            self._send(200, api.get(kind, ns, name))
        elif self.command == "GET":
            self._send(200, api.list(kind, ns if m.group("ns") else None, query))
        elif self.command == "POST" and not name:
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be an object")
            self._send(201, api.create(kind, ns, body))
        elif self.command == "PUT" and name:
            if not isinstance(body, dict):
                raise bad_request("the body of the request must be an object")
            self._send(200, api.replace(kind, ns, name, body, status_only=sub == "status"))
        elif self.command == "PATCH" and name:
            ctype = self.headers.get("Content-Type", "")
            self._send(200, api.patch(kind, ns, name, ctype, body, status_only=sub == "status"))
        elif self.command == "DELETE" and name:
            self._send(200, api.delete(kind, ns, name, body if isinstance(body, dict) else {}))
        else:
            raise APIError(
                405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
            )

    def _handle(self) -> None:
        try:
            self._route()
        except APIError as exc:
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
        host, port = self.server_address[:2]
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
