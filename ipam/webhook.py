"""The validating admission webhook the controller serves: NADs checked with the plugin's own config
model, and IPPools that still hold leases kept from deletion.

`review` is pure (an AdmissionReview v1 in, its answer out). `WebhookServer` serves it over TLS with
the standard library (a thread per connection; the controller starts it next to its watches, in every
replica: admission does not need the leader). Certificates: ipam.webhook_certs.

- A NetworkAttachmentDefinition (CREATE, UPDATE) whose `spec.config` is a network config or a
  `plugins[]` list is checked, for each plugin whose `ipam.type` is `whereabouts-py`, by
  `config.build_config`: the ADD's own validation against the node settings the cluster's nodes have
  (`Policy.node_settings`: what deploy/install.py writes into every flat file). A refusal carries the
  message code 7 gives at ADD. A node-only key is refused unless it repeats the node's value, as at
  ADD; `node_name` always (it differs on every node). `Policy.allow_node_only_keys` is the cluster's
  opt-in (the flat file's `allow_nad_overrides: true` on every node).
- DELETE of an IPPool whose `spec.allocations` is not empty is refused, unless the caller is one of
  the project's own identities (`Policy.trusted_users`: reconciler, controller) or the pool carries
  the annotation `whereabouts-py.cni.cncf.io/allow-delete: "true"`.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import ssl
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import DEFAULT_DATA_DIR, build_config, node_only_error, parse_netconf
from .errors import CNIError
from .flatfile import DEFAULT_FLAT_FILES
from .log import log

PLUGIN_TYPE = "whereabouts-py"
ALLOW_DELETE_ANNOTATION = "whereabouts-py.cni.cncf.io/allow-delete"
NAD_GROUP, NAD_RESOURCE = "k8s.cni.cncf.io", "network-attachment-definitions"
POOL_GROUP, POOL_RESOURCE = "whereabouts.cni.cncf.io", "ippools"
#: the project's identities that may delete a pool with leases (they release leases themselves)
PROJECT_ACCOUNTS = ("whereabouts-py-reconciler", "whereabouts-py-controller")
#: the flat file deploy/install.py writes on every node, and its content but `node_name`
NODE_FLAT_FILE = DEFAULT_FLAT_FILES[-1]
DEFAULT_NODE_SETTINGS: Mapping[str, Any] = {
    "datastore": "kubernetes",
    "kubernetes": {"kubeconfig": NODE_FLAT_FILE.rsplit("/", 1)[0] + "/whereabouts.kubeconfig"},
    "data_dir": DEFAULT_DATA_DIR,
    "log_file": "/var/log/whereabouts-py.log",
}
MAX_BODY = 32 << 20  # an AdmissionReview of an IPPool with 20k leases is a few MB
READ_TIMEOUT = 10.0


def project_identities(namespace: str, accounts: tuple[str, ...] = PROJECT_ACCOUNTS) -> frozenset[str]:
    return frozenset(f"system:serviceaccount:{namespace}:{account}" for account in accounts)


@dataclass(frozen=True)
class Policy:
    """What the cluster allows; the controller builds it from its flags."""

    allow_node_only_keys: bool = False
    node_settings: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_NODE_SETTINGS))
    node_flat_file: str = NODE_FLAT_FILE
    trusted_users: frozenset[str] = project_identities("kube-system")


# -- NetworkAttachmentDefinitions --------------------------------------------------------------------


def _ours(plugin: Any) -> bool:
    return (
        isinstance(plugin, dict)
        and isinstance(plugin.get("ipam"), dict)
        and plugin["ipam"].get("type") == PLUGIN_TYPE
    )


def _our_plugins(netconf: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, the plugin's network config as the runtime hands it over) for each plugin that uses us.
    In a `plugins[]` list, the list's cniVersion and name are the plugin's (as libcni passes them)."""
    plugins = netconf.get("plugins")
    if not isinstance(plugins, list):
        return [("", dict(netconf))] if _ours(netconf) else []
    inherited = {k: netconf[k] for k in ("cniVersion", "name") if k in netconf}
    return [(f"plugins[{i}]: ", {**p, **inherited}) for i, p in enumerate(plugins) if _ours(p)]


def check_plugin(netconf: Mapping[str, Any], policy: Policy) -> None:
    """Raise the CNIError the plugin's ADD would raise for this network config on the cluster's nodes
    (before any datastore is touched); return when it would pass validation."""
    ipam = netconf.get("ipam") or {}
    flat = dict(policy.node_settings)
    if policy.allow_node_only_keys:
        flat["allow_nad_overrides"] = True
    elif ipam.get("node_name") not in (None, ""):  # each node has its own: no NAD value matches them all
        raise node_only_error("ipam.node_name", ipam["node_name"])
    conf = parse_netconf(json.dumps(netconf).encode())
    build_config(conf, flat, policy.node_flat_file, {})


def nad_refusal(nad: Mapping[str, Any], policy: Policy) -> str | None:
    """Why this NetworkAttachmentDefinition is refused, or None. A config that is not JSON, or uses
    another IPAM, is not ours to judge."""
    text = (nad.get("spec") or {}).get("config")
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        netconf = json.loads(text)
    except ValueError:
        return None
    if not isinstance(netconf, dict):
        return None
    for where, plugin in _our_plugins(netconf):
        try:
            check_plugin(plugin, policy)
        except CNIError as exc:
            return f"{where}{exc}"
    return None


# -- IPPools -------------------------------------------------------------------------------------------


def pool_delete_refusal(pool: Mapping[str, Any], username: str, policy: Policy) -> str | None:
    meta = pool.get("metadata") or {}
    allocations = (pool.get("spec") or {}).get("allocations") or {}
    if not isinstance(allocations, dict) or not allocations:
        return None
    if username in policy.trusted_users:
        return None
    if (meta.get("annotations") or {}).get(ALLOW_DELETE_ANNOTATION) == "true":
        return None
    first = allocations[min(allocations, key=lambda k: (len(str(k)), str(k)))]
    holder = first.get("podref") if isinstance(first, dict) else None
    return (
        f"IPPool {meta.get('namespace', '')}/{meta.get('name', '')} still holds {len(allocations)} "
        f"lease(s){f' (one is {holder})' if holder else ''}: deleting it would hand their addresses out "
        f"again while their pods use them. Delete those pods (ipam-reconcile then releases the leases), "
        f'or annotate the pool {ALLOW_DELETE_ANNOTATION}="true" to delete it anyway'
    )


# -- AdmissionReview -----------------------------------------------------------------------------------


def _refusal(request: Mapping[str, Any], policy: Policy) -> tuple[int, str] | None:
    resource = request.get("resource") or {}
    what = (resource.get("group"), resource.get("resource"))
    operation = request.get("operation")
    if what == (NAD_GROUP, NAD_RESOURCE) and operation in ("CREATE", "UPDATE"):
        why = nad_refusal(request.get("object") or {}, policy)
        return (422, why) if why else None
    if what == (POOL_GROUP, POOL_RESOURCE) and operation == "DELETE":
        username = str((request.get("userInfo") or {}).get("username", ""))
        why = pool_delete_refusal(request.get("oldObject") or {}, username, policy)
        return (403, why) if why else None
    return None


def review(admission_review: Mapping[str, Any], policy: Policy | None = None) -> dict[str, Any]:
    """The AdmissionReview v1 answer to one request. ValueError when it is not an AdmissionReview."""
    request = admission_review.get("request") if isinstance(admission_review, Mapping) else None
    if not isinstance(request, Mapping) or not isinstance(request.get("uid"), str):
        raise ValueError("not an AdmissionReview with a request uid")
    refusal = _refusal(request, policy or Policy())
    response: dict[str, Any] = {"uid": request["uid"], "allowed": refusal is None}
    if refusal is not None:
        code, message = refusal
        response["status"] = {
            "code": code,
            "reason": "Invalid" if code == 422 else "Forbidden",
            "message": message,
        }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


# -- the TLS server -----------------------------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    server: WebhookServer
    timeout = READ_TIMEOUT  # also bounds the TLS handshake, done on the first read in this thread
    protocol_version = "HTTP/1.1"

    def _answer(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._answer(200, b"ok\n", "text/plain")
        else:
            self._answer(404, b"not found\n", "text/plain")

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if self.path.split("?")[0] != self.server.path or not 0 <= length <= MAX_BODY:
            self.close_connection = True  # the body is not read
            bad_path = self.path.split("?")[0] != self.server.path
            self._answer(
                404 if bad_path else 400, b"not found\n" if bad_path else b"bad length\n", "text/plain"
            )
            return
        try:
            answer = review(json.loads(self.rfile.read(length)), self.server.policy)
        except ValueError as exc:  # not JSON, not an AdmissionReview
            self._answer(400, f"{exc}\n".encode(), "text/plain")
            return
        except Exception as exc:  # a bug: the API server applies the webhook's failurePolicy
            log.log("error", "webhook.failed", error=repr(exc))
            self._answer(500, b"internal error\n", "text/plain")
            return
        response = answer["response"]
        if not response["allowed"]:
            log.info("webhook.refused", uid=response["uid"], message=response["status"]["message"])
        self._answer(200, json.dumps(answer).encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one record per refusal (above); request lines would be noise


class WebhookServer(http.server.ThreadingHTTPServer):
    """HTTPS on `bind` ("host:port", ":9443" for every address). TLS is wrapped per connection without
    handshaking in the accept loop (a slow client cannot stall it)."""

    daemon_threads = True

    def __init__(
        self, bind: str, certfile: str, keyfile: str, policy: Policy | None = None, path: str = "/validate"
    ) -> None:
        host, _, port = bind.rpartition(":")
        self.policy = policy or Policy()
        self.path = path
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certfile, keyfile)
        self._thread: threading.Thread | None = None
        self._open: set[Any] = set()  # connections being served: stop() closes the kept-alive ones too
        self._lock = threading.Lock()
        super().__init__((host.strip("[]") or "", int(port)), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake or a dropped connection: one record, not a traceback on stderr."""
        log.log(
            "warning",
            "webhook.connection_failed",
            client=str(client_address[0]),
            error=repr(sys.exc_info()[1]),
        )

    def reload_certificate(self, certfile: str, keyfile: str) -> None:
        """New connections use the renewed certificate; open ones keep theirs."""
        self.context.load_cert_chain(certfile, keyfile)

    def start(self) -> WebhookServer:
        self._thread = threading.Thread(target=self.serve_forever, name="webhook", daemon=True)
        self._thread.start()
        log.info("webhook.serving", port=self.port, path=self.path)
        return self

    def stop(self) -> None:
        """Stop accepting, and end the connections the API server keeps alive (it would go on
        sending reviews over them)."""
        self.shutdown()
        self.server_close()
        with self._lock:
            still_open = list(self._open)
        for conn in still_open:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)


def serve_webhook(
    bind: str, certfile: str, keyfile: str, policy: Policy | None = None, path: str = "/validate"
) -> WebhookServer:
    """Bind and serve in a daemon thread; `stop()` the returned server to end it."""
    return WebhookServer(bind, certfile, keyfile, policy, path).start()
