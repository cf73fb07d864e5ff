"""A real etcd + kube-apiserver for the suite, started the way controller-runtime's envtest does.

`KUBEBUILDER_ASSETS` names a directory holding `etcd` and `kube-apiserver` (`.ci/run` unpacks
`../shared/k8s` there). `RealCluster` starts both on free loopback ports with certificates made for
the run (openssl), installs the project's CRDs, and stops both by pid at the end. Tests get a fresh
namespace each (`RealKube`), so one server serves the whole session.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"


def rbac_manifest() -> Path:
    """deploy/rbac.yaml, or deploy/base/rbac.yaml once the manifests are a kustomize base."""
    for path in (ROOT / "deploy" / "base" / "rbac.yaml", ROOT / "deploy" / "rbac.yaml"):
        if path.exists():
            return path
    raise FileNotFoundError("no deploy/rbac.yaml or deploy/base/rbac.yaml")


ASSETS_ENV = "KUBEBUILDER_ASSETS"


class ApiError(Exception):
    """A request the API server refused: `status` (HTTP code) and `body` (its Status object)."""

    def __init__(self, status: int, body: Any, what: str) -> None:
        reason = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{what}: HTTP {status}: {reason}")
        self.status = status
        self.body = body


def assets_dir() -> Path | None:
    value = os.environ.get(ASSETS_ENV, "")
    return Path(value) if value else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: Path) -> None:
    """CA, serving cert for 127.0.0.1/localhost, admin client cert (O=system:masters), SA key pair."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
             "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"))  # fmt: skip
    for name, subj, ext in (
        (
            "server",
            "/CN=kube-apiserver",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
        ),
        ("admin", "/O=system:masters/CN=test-admin", "extendedKeyUsage=clientAuth"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subj,
                 "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"))  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.crt"),
                 "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(d / f"{name}.ext"), "-out", str(d / f"{name}.crt"))  # fmt: skip
    _openssl("genrsa", "-out", str(d / "sa.key"), "2048")
    _openssl("rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub"))


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(path: Path, url: str, ca: Path, user: dict[str, str], namespace: str | None) -> Path:
    """A kubeconfig with inline data only (no file paths: the CNI path refuses them), mode 0600."""
    context: dict[str, str] = {"cluster": "real", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "real", "cluster": {"server": url, "certificate-authority-data": _b64(ca)}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "real", "context": context}],
        "current-context": "real",
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1)
    return path


class RealCluster:
    """etcd + kube-apiserver processes owned by the test session."""

    def __init__(self, assets: Path, work: Path, fsync: bool = False) -> None:
        for binary in ("etcd", "kube-apiserver"):
            if not os.access(assets / binary, os.X_OK):
                raise RuntimeError(f"{ASSETS_ENV}={assets} has no executable {binary}")
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl is needed to make the test cluster's certificates")
        self.assets = assets
        self.work = work
        self.fsync = fsync
        self.certs = work / "pki"
        self.certs.mkdir(parents=True, exist_ok=True)
        make_certs(self.certs)
        self.etcd_port, self.peer_port, self.port = free_port(), free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.admin_kubeconfig = str(self.kubeconfig(work / "admin.kubeconfig", namespace="default"))
        self._ssl = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        self._ssl.load_cert_chain(str(self.certs / "admin.crt"), str(self.certs / "admin.key"))
        self._plurals: dict[tuple[str, str], tuple[str, bool]] = {}

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - kept open for the process's life
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_etcd(self) -> None:
        """Start etcd (again: same data directory, same ports) and wait for its /health."""
        peer = f"http://127.0.0.1:{self.peer_port}"
        client = f"http://127.0.0.1:{self.etcd_port}"
        argv = [
            str(self.assets / "etcd"), "--name", "t", "--data-dir", str(self.work / "etcd"),
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"t={peer}", "--log-level", "warn",
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--unsafe-no-fsync")
        self.etcd = self._spawn("etcd", argv)
        self._wait(lambda: self._http_ok(f"{client}/health"), "etcd /health", self.etcd)

    def start_apiserver(self) -> None:
        c = self.certs
        argv = [
            str(self.assets / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1", f"--secure-port={self.port}",
            f"--tls-cert-file={c / 'server.crt'}", f"--tls-private-key-file={c / 'server.key'}",
            f"--client-ca-file={c / 'ca.crt'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={c / 'sa.pub'}",
            f"--service-account-signing-key-file={c / 'sa.key'}",
            "--authorization-mode=RBAC", "--service-cluster-ip-range=10.96.0.0/16",
            "--allow-privileged=true", "--disable-admission-plugins=ServiceAccount",
        ]  # fmt: skip
        self.apiserver = self._spawn("kube-apiserver", argv)
        self._wait(self._ready, "kube-apiserver /readyz", self.apiserver, timeout=90)

    def start(self) -> RealCluster:
        self.start_etcd()
        self.start_apiserver()
        self.install_crds()
        return self

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop_apiserver(self) -> None:
        self._terminate(self.apiserver)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver (etcd keeps every object) and start it again on the same port; return
        once custom resources are served again (after /readyz they answer 429 "storage is
        (re)initializing" for a while)."""
        self.stop_apiserver()
        self.start_apiserver()
        self.wait_crs_served()

    def wait_crs_served(self, polls: int = 1200) -> None:
        """Until IPPools can be listed: a CRD is Established before its storage is ready (429)."""
        for _ in range(polls):
            try:
                self.request("GET", "/apis/whereabouts.cni.cncf.io/v1alpha1/ippools", params={"limit": "1"})
                return
            except ApiError as exc:
                if exc.status not in (429, 503):
                    raise
            time.sleep(0.05)
        raise RuntimeError("custom resources not served after the API server restart")

    def stop_etcd(self) -> None:
        self._terminate(self.etcd)

    def stop(self) -> None:
        self.stop_apiserver()
        self.stop_etcd()

    def _wait(self, ok: Any, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited with {proc.returncode}; see {self.work}")
            if ok():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s; see logs in {self.work}")

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/readyz", timeout=5, context=self._ssl) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    # -- credentials ----------------------------------------------------------------------------

    def kubeconfig(self, path: Path, namespace: str | None) -> Path:
        c = self.certs
        user = {"client-certificate-data": _b64(c / "admin.crt"), "client-key-data": _b64(c / "admin.key")}
        return write_kubeconfig(path, self.url, c / "ca.crt", user, namespace)

    def token(
        self,
        serviceaccount: str,
        namespace: str,
        expiration_seconds: int = 3600,
        bound_pod: dict[str, Any] | None = None,
    ) -> str:
        """A TokenRequest token for the ServiceAccount (created when missing), optionally pod-bound."""
        self.ensure_namespace(namespace)
        with contextlib.suppress(ApiError):
            self.request("POST", f"/api/v1/namespaces/{namespace}/serviceaccounts",
                         {"metadata": {"name": serviceaccount}})  # fmt: skip
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if bound_pod is not None:
            meta = bound_pod["metadata"]
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": meta["name"],
                "uid": meta["uid"],
            }
        answer = self.request(
            "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{serviceaccount}/token", {"spec": spec}
        )
        return str(answer["status"]["token"])

    # -- REST -----------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        """One admin request; the decoded JSON answer, or ApiError."""
        url = self.url + path + ("?" + urllib.parse.urlencode(params) if params else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
            headers["Content-Type"] = ctype
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60, context=self._ssl) as r:
                raw = r.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail: Any = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise ApiError(exc.code, detail, f"{method} {path}") from None
        return json.loads(raw) if raw else {}

    def resource(self, api_version: str, kind: str) -> tuple[str, bool]:
        """(URL prefix for the group/version, plural) by discovery; namespaced or not."""
        key = (api_version, kind)
        if key not in self._plurals:
            base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
            for res in self.request("GET", base)["resources"]:
                if "/" not in res["name"]:
                    self._plurals[(api_version, res["kind"])] = (res["name"], bool(res["namespaced"]))
        if key not in self._plurals:
            raise ApiError(404, f"no resource for {api_version} {kind}", "discovery")
        return self._plurals[key]

    def path_for(self, obj: dict[str, Any], namespace: str | None = None) -> str:
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural, namespaced = self.resource(api_version, kind)
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if not namespaced:
            return f"{base}/{plural}"
        ns = namespace or obj.get("metadata", {}).get("namespace") or "default"
        return f"{base}/namespaces/{ns}/{plural}"

    def apply(
        self, objs: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None, dry_run: bool = False
    ) -> list[Any]:
        """Create each object (POST through discovery); `dry_run` asks for a server-side dry run."""
        out = []
        for obj in objs if isinstance(objs, list) else [objs]:
            params = (
                {"dryRun": "All", "fieldValidation": "Strict"} if dry_run else {"fieldValidation": "Strict"}
            )
            body = obj
            if namespace and obj.get("metadata", {}).get("namespace") not in (None, namespace):
                body = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
            out.append(self.request("POST", self.path_for(body, namespace), body, params))
        return out

    def ensure_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.request("POST", "/api/v1/namespaces", {"metadata": {"name": name}})

    def install_crds(self) -> None:
        names = []
        for path in sorted(CRDS.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
                    names.append(doc["metadata"]["name"])
        for name in names:
            self.wait_established(name)
        self.wait_crs_served()

    def wait_established(self, crd: str) -> None:
        for _ in range(300):
            obj = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            conditions = (obj.get("status") or {}).get("conditions") or []
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                self._plurals.clear()
                return
            time.sleep(0.05)
        raise RuntimeError(f"CRD {crd} never became Established")


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def rebase_rbac(
    docs: list[dict[str, Any]], namespace: str, suffix: str, cluster: RealCluster
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """RBAC manifests moved into one test namespace, whatever their shape (ClusterRole+Binding or
    Role+RoleBinding): namespaced objects and ServiceAccount subjects go to `namespace`; cluster-scoped
    objects (and roleRefs to ClusterRoles) get `-suffix` so tests never share or clobber them.
    Also returns {app.kubernetes.io/component label (else name): ServiceAccount name}."""
    out, accounts = [], {}
    for doc in docs:
        doc = copy.deepcopy(doc)
        meta = doc.setdefault("metadata", {})
        _, namespaced = cluster.resource(doc["apiVersion"], doc["kind"])
        if namespaced:
            meta["namespace"] = namespace
        else:
            meta["name"] = f"{meta['name']}-{suffix}"
        ref = doc.get("roleRef")
        if ref and ref.get("kind") == "ClusterRole":
            ref["name"] = f"{ref['name']}-{suffix}"
        for subject in doc.get("subjects") or []:
            if subject.get("kind") == "ServiceAccount":
                subject["namespace"] = namespace
        if doc["kind"] == "ServiceAccount":
            component = (meta.get("labels") or {}).get("app.kubernetes.io/component", meta["name"])
            accounts[component] = meta["name"]
        out.append(doc)
    return out, accounts


@dataclass
class RealAPI:
    """The test server's helper surface (objects, put_pod, delete_pod) on the real server."""

    cluster: RealCluster
    namespace: str

    def objects(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        group = (
            "" if plural in ("pods", "namespaces", "serviceaccounts") else "whereabouts.cni.cncf.io/v1alpha1"
        )
        base = "/api/v1" if not group else f"/apis/{group}"
        path = f"{base}/namespaces/{namespace}/{plural}" if namespace else f"{base}/{plural}"
        items: list[dict[str, Any]] = self.cluster.request("GET", path).get("items") or []
        return sorted(items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))

    def put_pod(
        self,
        namespace: str,
        name: str,
        phase: str = "Running",
        annotations: dict[str, str] | None = None,
        deleting: bool = False,
        labels: dict[str, str] | None = None,
        node: str | None = None,
    ) -> dict[str, Any]:
        """Create a pod (the server assigns uid and creationTimestamp), set its phase through the status
        subresource, and with `deleting` delete it gracefully so it stays Terminating (no kubelet).
        An existing pod of that name is updated (annotations, labels, phase) and keeps its uid."""
        self.cluster.ensure_namespace(namespace)
        meta: dict[str, Any] = {"name": name, "annotations": annotations or {}}
        if labels:
            meta["labels"] = labels
        spec: dict[str, Any] = {"containers": [{"name": "c", "image": "x"}]}
        if node or deleting:
            spec["nodeName"] = node or "node-a"
        base = f"/api/v1/namespaces/{namespace}/pods"
        try:
            pod = self.cluster.request(
                "POST", base, {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
            )
        except ApiError as exc:  # it exists: an update of the same pod (same uid), as the test server does
            if exc.status != 409:
                raise
            update = {k: v for k, v in (("annotations", annotations), ("labels", labels)) if v}
            pod = self.cluster.request("PATCH", f"{base}/{name}", {"metadata": update})
        if phase != "Pending":
            pod["status"] = {**(pod.get("status") or {}), "phase": phase}
            pod = self.cluster.request("PUT", f"{base}/{name}/status", pod)
        if deleting:
            self.cluster.request("DELETE", f"{base}/{name}", {"gracePeriodSeconds": 30})
            pod = self.cluster.request("GET", f"{base}/{name}")
        return dict(pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.cluster.request(
                "DELETE", f"/api/v1/namespaces/{namespace}/pods/{name}", {"gracePeriodSeconds": 0}
            )


@dataclass
class RealKube:
    """One test's view of the real server: a fresh namespace and an admin kubeconfig into it."""

    cluster: RealCluster
    namespace: str
    tmp_dir: Path
    kubeconfig_path: str = ""
    api: RealAPI = field(init=False)
    kind: str = "apiserver"  # the `k8s` fixture's parameter: which server this is
    _accounts: dict[str, str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.cluster.ensure_namespace(self.namespace)
        self.api = RealAPI(self.cluster, self.namespace)
        if not self.kubeconfig_path:
            self.kubeconfig_path = self.kubeconfig(self.namespace)

    @property
    def url(self) -> str:
        return self.cluster.url

    def kubeconfig(self, namespace: str | None = None, name: str | None = None) -> str:
        """Admin kubeconfig with this context namespace (None: none)."""
        path = self.tmp_dir / (name or f"kubeconfig-{namespace or 'none'}-{uuid.uuid4().hex[:6]}")
        return str(self.cluster.kubeconfig(path, namespace))

    def token_kubeconfig(
        self,
        serviceaccount: str,
        sa_namespace: str,
        context_namespace: str | None = None,
        expiration_seconds: int = 3600,
        bound_pod: dict[str, Any] | None = None,
    ) -> str:
        token = self.cluster.token(serviceaccount, sa_namespace, expiration_seconds, bound_pod)
        path = self.tmp_dir / f"kubeconfig-sa-{serviceaccount}-{uuid.uuid4().hex[:6]}"
        ns = context_namespace or self.namespace
        return str(write_kubeconfig(path, self.url, self.cluster.certs / "ca.crt", {"token": token}, ns))

    def apply(
        self, objs: dict[str, Any] | list[dict[str, Any]], namespace: str | None = None, dry_run: bool = False
    ) -> list[Any]:
        return self.cluster.apply(objs, namespace or self.namespace, dry_run)

    # -- the components' own identities (deploy/rbac.yaml) ------------------------------------------

    def apply_rbac(self) -> dict[str, str]:
        """deploy's RBAC manifest, rebased into this namespace (once): {component label: ServiceAccount}."""
        if self._accounts is None:
            docs, accounts = rebase_rbac(
                load_yaml(rbac_manifest()), self.namespace, self.namespace, self.cluster
            )
            self.cluster.apply(docs)
            self._accounts = accounts
        return self._accounts

    def identity_kubeconfig(self, component: str) -> str:
        """A TokenRequest kubeconfig of the component's own ServiceAccount (`cni-plugin`, `reconciler`),
        context namespace = this test's namespace (where the pools live)."""
        accounts = self.apply_rbac()
        if component not in accounts:
            raise KeyError(
                f"deploy/rbac.yaml has no ServiceAccount labelled component={component}: {accounts}"
            )
        return self.token_kubeconfig(accounts[component], self.namespace)

    def plugin_kubeconfig(self) -> str:
        return self.identity_kubeconfig("cni-plugin")

    def reconciler_kubeconfig(self) -> str:
        return self.identity_kubeconfig("reconciler")

    def request(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        return self.cluster.request(method, path, body, params)
