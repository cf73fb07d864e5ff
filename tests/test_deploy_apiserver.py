"""deploy/ against the real kube-apiserver: the node's credentials outlive the installer's pod, renewal
never leaves a CNI call with a dead token, and every identity holds only what deploy/base/rbac.yaml
grants it. Tokens, RBAC and TokenRequest are enforced by the real server, so these are real proofs."""

from __future__ import annotations

import copy
import json
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease
from ipam.errors import CNIError
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import RealCluster, RealKube
from tests.test_deploy import LAYOUTS, MANIFESTS, cni_path_store, fake_glibc, inst, kustomize, load_docs

GROUP_PATH = "/apis/whereabouts.cni.cncf.io/v1alpha1"
PLUGIN_SA, INSTALLER_SA, RECONCILER_SA = (
    "whereabouts-py",
    "whereabouts-py-installer",
    "whereabouts-py-reconciler",
)


def rbac_into(namespace: str) -> list[dict[str, Any]]:
    """deploy/base/rbac.yaml moved from kube-system into a test's namespace; cluster-scoped names get
    the namespace as suffix, so tests do not share a ClusterRole."""
    out = []
    for obj in load_docs(inst_path("base/rbac.yaml")):
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        if "namespace" in meta:
            meta["namespace"] = namespace
        else:
            meta["name"] += f"-{namespace}"
        if obj.get("roleRef", {}).get("kind") == "ClusterRole":
            obj["roleRef"]["name"] += f"-{namespace}"
        for subject in obj.get("subjects", []):
            subject["namespace"] = namespace
        out.append(obj)
    return out


def inst_path(rel: str) -> Path:
    return Path(inst.__file__).parent / rel


TOO_MANY: list[str] = []


def call(cluster: RealCluster, token: str, method: str, path: str, body: Any = None) -> int:
    """The HTTP status of one request made with `token` (no client certificate)."""
    context = ssl.create_default_context(cafile=str(cluster.certs / "ca.crt"))
    data = json.dumps(body).encode() if body is not None else None
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json",
        "Content-Type": "application/json",
    }
    for _ in range(40):  # 429 "storage is (re)initializing": a CRD's watch cache warming up; bounded
        request = urllib.request.Request(cluster.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            if exc.code != 429:
                return int(exc.code)
            TOO_MANY.append(exc.read().decode(errors="replace"))
            time.sleep(0.25)
    pytest.fail(f"{method} {path}: HTTP 429 throughout: {TOO_MANY[-1]}")


def poll(condition: Any, what: str, tries: int = 120, pause: float = 0.25) -> None:
    """Bounded polling (the API server caches authentication for ~10-15 s): never a wall-time assert."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(pause)
    pytest.fail(f"{what} never happened in {tries} tries")


class InstallerPod:
    """The DaemonSet's install container, in-process: its pod exists on the real server, its token is
    bound to that pod, and the host is a temp directory."""

    def __init__(self, kube: RealKube, tmp: Path, *extra: str) -> None:
        self.kube = kube
        ns = kube.namespace
        kube.apply(rbac_into(ns))
        self.pod = kube.request(
            "POST",
            f"/api/v1/namespaces/{ns}/pods",
            {
                "metadata": {"name": "whereabouts-py-install"},
                "spec": {
                    "serviceAccountName": INSTALLER_SA,
                    "nodeName": "node-a",
                    "containers": [{"name": "c", "image": "x"}],
                },
            },
        )
        self.own_token = kube.cluster.token(INSTALLER_SA, ns, 3600, bound_pod=self.pod)
        sa = tmp / "sa"
        sa.mkdir()
        (sa / "token").write_text(self.own_token)
        (sa / "ca.crt").write_bytes((kube.cluster.certs / "ca.crt").read_bytes())
        (sa / "namespace").write_text(ns)
        bundle = tmp / "bundle"
        (bundle / "bin").mkdir(parents=True)
        (bundle / "bin" / "python3").write_text("#!/bin/sh\n")
        (bundle / "bin" / "python3").chmod(0o755)
        self.host = tmp / "host"
        self.host.mkdir()
        fake_glibc(bundle, self.host)
        argv = [
            "--host-root", str(self.host), "--bundle-src", str(bundle), "--server", kube.url,
            "--token-file", str(sa / "token"), "--ca-file", str(sa / "ca.crt"),
            "--namespace-file", str(sa / "namespace"), "--ready-file", "", "--node-name", "node-a",
            "--interval", "0.05", *extra,
        ]  # fmt: skip
        self.installer = inst.Installer(inst.parse_args(argv))
        self.kubeconfig = str(self.host / inst.KUBECONFIG_PATH.lstrip("/"))

    def token(self) -> str:
        return str(json.loads(Path(self.kubeconfig).read_text())["users"][0]["user"]["token"])

    def installer_cluster(self) -> Any:
        return inst.read_cluster(self.installer.args)

    def delete(self) -> None:
        self.kube.api.delete_pod(self.kube.namespace, "whereabouts-py-install")


@pytest.fixture
def installer_pod(real_kube: RealKube, tmp_path: Path) -> InstallerPod:
    return InstallerPod(real_kube, tmp_path)


def pools_path(namespace: str) -> str:
    return f"{GROUP_PATH}/namespaces/{namespace}/ippools"


def test_a_pod_bound_token_dies_with_its_pod_but_the_installers_minted_token_lives_on(
    real_kube: RealKube, installer_pod: InstallerPod
) -> None:
    cluster, ns = real_kube.cluster, real_kube.namespace
    installer_pod.installer.install()
    minted = installer_pod.token()
    # the old way: the DaemonSet pod ran as the plugin's account and the node kubeconfig held that
    # pod's projected token, bound to the pod
    old_pod = real_kube.request(
        "POST",
        f"/api/v1/namespaces/{ns}/pods",
        {"metadata": {"name": "old-daemonset-pod"},
         "spec": {"serviceAccountName": PLUGIN_SA, "nodeName": "node-a", "containers": [{"name": "c", "image": "x"}]}},
    )  # fmt: skip
    pod_bound = cluster.token(PLUGIN_SA, ns, 3600, bound_pod=old_pod)
    for token in (minted, pod_bound):
        assert call(cluster, token, "GET", pools_path(ns)) == 200

    # a DaemonSet roll, eviction or crash: both pods are deleted
    real_kube.api.delete_pod(ns, "old-daemonset-pod")
    installer_pod.delete()
    poll(lambda: call(cluster, pod_bound, "GET", pools_path(ns)) == 401, "the pod-bound token refused")
    # the installer's own identity died with its pod too, but the node's token did not
    poll(
        lambda: call(cluster, installer_pod.own_token, "GET", "/api/v1/namespaces") == 401,
        "installer refused",
    )
    assert call(cluster, minted, "GET", pools_path(ns)) == 200
    store = KubernetesStore.connect(installer_pod.kubeconfig, str(installer_pod.host / "locks"))
    try:
        store.check_reachable()
        store.write_pool(store.read_pool("after-roll", "10.9.0.0/24"), {1: Lease("c1", f"{ns}/p", "net1")})
        assert store.read_pool("after-roll", "10.9.0.0/24").allocations[1].id == "c1"
    finally:
        store.close()


def test_renewal_rewrites_the_kubeconfig_before_expiry_and_calls_never_see_401(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 600 s token (the API server's minimum): the installer's clock is moved to two thirds of the
    lifetime (a hook, not a wait); CNI-style calls run throughout, one long-lived client (the agent's)
    and one fresh client per call (an exec'd plugin), and none is refused."""
    pod = InstallerPod(real_kube, tmp_path, "--token-lifetime", "600")
    offset = [0.0]
    monkeypatch.setattr(inst, "now", lambda: time.time() + offset[0])
    pod.installer.install()
    first = pod.token()
    first_token = pod.installer.token
    assert first_token is not None and first_token.expires - first_token.issued <= 600

    stop = threading.Event()
    watcher = threading.Thread(target=pod.installer.watch, args=(stop,), daemon=True)
    watcher.start()
    agent = cni_path_store(pod.kubeconfig, tmp_path / "agent")
    refused: list[str] = []

    def cni_calls() -> None:
        for store in (agent, cni_path_store(pod.kubeconfig, tmp_path / "exec")):
            try:
                store.check_reachable()
                store.read_pool("renewal", "10.8.0.0/24")
            except CNIError as exc:
                refused.append(str(exc))
            finally:
                if store is not agent:
                    store.close()

    try:
        for _ in range(5):
            cni_calls()
        offset[0] = first_token.renew_at - time.time() + 1  # a third of the lifetime left
        assert inst.now() < first_token.expires
        poll(lambda: (cni_calls(), pod.token() != first)[1], "the kubeconfig rewritten with a new token")
        renewed = pod.installer.token
        assert renewed is not None and renewed.token == pod.token() and inst.now() < first_token.expires
        for _ in range(5):
            cni_calls()
    finally:
        stop.set()
        watcher.join(timeout=30)
        agent.close()
    assert refused == []
    assert call(real_kube.cluster, renewed.token, "GET", pools_path(real_kube.namespace)) == 200


def test_the_installers_identity_can_mint_only_the_plugins_token(real_kube: RealKube) -> None:
    cluster, ns = real_kube.cluster, real_kube.namespace
    real_kube.apply(rbac_into(ns))
    real_kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "other"}})
    installer = cluster.token(INSTALLER_SA, ns)
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": 600},
    }

    def mint(account: str, namespace: str = ns) -> int:
        return call(
            cluster,
            installer,
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
            body,
        )

    assert mint(PLUGIN_SA) == 201
    assert mint(RECONCILER_SA) == 403
    assert mint("other") == 403
    assert mint(INSTALLER_SA) == 403  # not even a fresh one of its own
    assert mint(PLUGIN_SA, "default") == 403  # the same name in another namespace
    assert call(cluster, installer, "GET", pools_path(ns)) == 403  # and nothing else
    assert call(cluster, installer, "GET", f"/api/v1/namespaces/{ns}/serviceaccounts") == 403


def pool(name: str) -> dict[str, Any]:
    return {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"range": "10.7.0.0/24", "allocations": {}}}  # fmt: skip


def test_the_plugins_identity_is_confined_to_the_pools_namespace(real_kube: RealKube, tmp_path: Path) -> None:
    cluster, ns = real_kube.cluster, real_kube.namespace
    real_kube.apply(rbac_into(ns))
    other = f"{ns}-other"
    cluster.ensure_namespace(other)
    plugin = cluster.token(PLUGIN_SA, ns)
    assert call(cluster, plugin, "POST", pools_path(ns), pool("mine")) == 201
    assert call(cluster, plugin, "POST", pools_path(other), pool("theirs")) == 403
    real_kube.apply(pool("theirs"), namespace=other)
    assert call(cluster, plugin, "GET", f"{pools_path(other)}/theirs") == 403
    assert call(cluster, plugin, "DELETE", f"{pools_path(ns)}/mine") == 403  # no verb it does not use
    assert call(cluster, plugin, "GET", "/api/v1/pods") == 403
    assert call(cluster, plugin, "GET", f"{GROUP_PATH}/ippools") == 403  # no cluster-wide listing

    # every call the plugin's code makes is allowed, with its kubeconfig's namespace
    path = real_kube.token_kubeconfig(PLUGIN_SA, ns, context_namespace=ns)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
    try:
        lease = Lease("c1", f"{ns}/p", "net1")
        store.write_pool(store.read_pool("p1", "10.6.0.0/24"), {1: lease})  # get + create
        store.write_pool(store.read_pool("p1", "10.6.0.0/24"), {})  # get + update
        store.list_pools()
        store.check_reachable()
        assert store.reserve("10.6.0.1", lease) is None  # create
        assert store.reserve("10.6.0.1", Lease("c2", f"{ns}/p", "net1")) is None  # get + update
        store.unreserve("10.6.0.1", "c2", "net1")  # get + delete
        assert real_kube.api.objects("overlappingrangeipreservations", ns) == []
    finally:
        store.close()
    slices = f"{GROUP_PATH}/namespaces/{ns}/nodeslicepools"
    nsp = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool", "metadata": {"name": "s"},
           "spec": {"range": "10.5.0.0/16", "sliceSize": "/24"}}  # fmt: skip
    assert call(cluster, plugin, "POST", slices, nsp) == 201
    assert call(cluster, plugin, "GET", f"{slices}/s") == 200
    got = real_kube.request("GET", f"{slices}/s")
    got["status"] = {"allocations": [{"nodeName": "node-a", "sliceRange": "10.5.0.0/24"}]}
    assert call(cluster, plugin, "PUT", f"{slices}/s", got) == 200
    assert (
        call(cluster, plugin, "GET", slices) == 200
    )  # list: a network without network_name checks its range
    assert call(cluster, plugin, "DELETE", f"{slices}/s") == 403  # get/list/create/update only


def may(
    real_kube: RealKube,
    account: str,
    verb: str,
    resource: str,
    subresource: str = "",
    group: str = "whereabouts.cni.cncf.io",
    namespace: str | None = None,
) -> bool:
    """The API server's own answer (SubjectAccessReview): may ServiceAccount `account` of the test's
    namespace do `verb` on `resource` in `namespace` (the test's by default)?"""
    ns = real_kube.namespace
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{ns}:{account}",
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
            "resourceAttributes": {"namespace": namespace or ns, "verb": verb, "group": group,
                                   "resource": resource, "subresource": subresource},
        },
    }  # fmt: skip
    answer = real_kube.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return bool(answer["status"].get("allowed"))


def test_plugin_and_reconciler_may_write_node_slices_through_a_status_subresource(
    real_kube: RealKube,
) -> None:
    """A NodeSlicePool CRD that declares a status subresource ignores `status` on the main resource;
    claims and returns are then written to /status (KubernetesStore.write_node_slices), which RBAC
    grants separately. The API server itself answers whether each identity may."""
    real_kube.apply(rbac_into(real_kube.namespace))
    for account in (PLUGIN_SA, RECONCILER_SA):
        assert may(real_kube, account, "update", "nodeslicepools", "status")
        assert not may(real_kube, account, "patch", "nodeslicepools", "status")
        assert not may(real_kube, account, "delete", "nodeslicepools")


def test_the_plugin_may_keep_writer_turns_and_no_coordination_leases(real_kube: RealKube) -> None:
    """Writer turns (ipam.turns): a WriterTurn per contended pool, created, read and deleted by the
    plugin in the pools' namespace; never coordination.k8s.io Leases, whose create/delete there would
    reach the control plane's leader-election Leases. The API server itself answers."""
    real_kube.apply(rbac_into(real_kube.namespace))
    assert all(may(real_kube, PLUGIN_SA, verb, "writerturns") for verb in ("get", "create", "delete"))
    assert not any(
        may(real_kube, PLUGIN_SA, verb, "writerturns") for verb in ("update", "patch", "list", "watch")
    )
    assert not may(
        real_kube, PLUGIN_SA, "create", "writerturns", namespace="default"
    )  # the pools' namespace only
    assert not may(real_kube, RECONCILER_SA, "create", "writerturns")
    assert may(real_kube, RECONCILER_SA, "list", "writerturns") and may(
        real_kube, RECONCILER_SA, "delete", "writerturns"
    )
    for verb in ("get", "create", "update", "delete"):
        assert not may(real_kube, PLUGIN_SA, verb, "leases", group="coordination.k8s.io")


def test_the_reconcilers_identity_lists_pods_cluster_wide_and_pools_only_in_their_namespace(
    real_kube: RealKube, tmp_path: Path
) -> None:
    cluster, ns = real_kube.cluster, real_kube.namespace
    real_kube.apply(rbac_into(ns))
    reconciler = cluster.token(RECONCILER_SA, ns)
    assert call(cluster, reconciler, "GET", "/api/v1/pods") == 200
    assert call(cluster, reconciler, "GET", pools_path(ns)) == 200
    assert call(cluster, reconciler, "GET", pools_path("default")) == 403
    assert call(cluster, reconciler, "POST", pools_path("default"), pool("x")) == 403
    assert call(cluster, reconciler, "GET", "/api/v1/nodes") == 200  # node slices: which nodes exist
    assert call(cluster, reconciler, "GET", f"/api/v1/namespaces/{ns}/secrets") == 403
    store = KubernetesStore.connect(real_kube.token_kubeconfig(RECONCILER_SA, ns, ns), str(tmp_path / "l"))
    try:
        store.list_pods()
        store.list_pools()
        store.list_reservations()
    finally:
        store.close()


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda p: p.name)
def test_every_layout_passes_a_server_side_dry_run(apiserver: RealCluster, layout: Path) -> None:
    objects = kustomize(layout)
    assert {o["kind"] for o in objects} >= {"DaemonSet", "CronJob", "Role", "RoleBinding", "ServiceAccount"}
    answers = apiserver.apply(objects, dry_run=True)
    assert [a["metadata"]["name"] for a in answers] == [o["metadata"]["name"] for o in objects]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_file_passes_a_server_side_dry_run(apiserver: RealCluster, path: Path) -> None:
    apiserver.apply(load_docs(path), dry_run=True)


def test_a_broken_manifest_fails_the_dry_run(apiserver: RealCluster) -> None:
    """Guards the two tests above: the server really validates (strict fields) under dry run."""
    from tests.kubeapi.real import ApiError

    [ds] = [o for o in kustomize(LAYOUTS[0]) if o["kind"] == "DaemonSet"]
    ds["spec"]["template"]["spec"]["containers"][0]["imagee"] = "x"
    with pytest.raises(ApiError) as caught:
        apiserver.apply(ds, dry_run=True)
    assert caught.value.status in (400, 422)


def test_recreating_the_plugins_service_account_revokes_every_token_and_installers_mint_anew(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """README's "revoke every node at once": the real server refuses tokens of the deleted account; a
    running installer notices at its next check and writes a token of the new account."""
    cluster, ns = real_kube.cluster, real_kube.namespace
    pod = InstallerPod(real_kube, tmp_path, "--token-check-interval", "0.2")
    pod.installer.install()
    first = pod.token()
    assert inst.token_works(pod.installer_cluster(), first) is True
    agent = cni_path_store(pod.kubeconfig, tmp_path / "agent")  # the node agent's long-lived client
    agent.check_reachable()
    real_kube.request("DELETE", f"/api/v1/namespaces/{ns}/serviceaccounts/{PLUGIN_SA}")
    real_kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": PLUGIN_SA}})
    poll(lambda: call(cluster, first, "GET", pools_path(ns)) == 401, "the old account's token refused")
    stop = threading.Event()
    watcher = threading.Thread(target=pod.installer.watch, args=(stop,), daemon=True)
    watcher.start()
    try:
        poll(lambda: pod.token() != first, "a token of the new account in the kubeconfig")
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert call(cluster, pod.token(), "GET", pools_path(ns)) == 200
    # the agent's client, opened with the revoked token, carries the new one without being reopened
    try:
        agent.check_reachable()
        agent.read_pool("after-revocation", "10.3.0.0/24")
    finally:
        agent.close()


def test_only_the_reconciler_may_read_statefulsets_and_never_write_them(real_kube: RealKube) -> None:
    """Sticky addresses: the reconciler reads StatefulSets in every namespace to end retentions; the
    plugin gains nothing (its DEL records the retention in the lease). The API server itself answers."""
    real_kube.apply(rbac_into(real_kube.namespace))
    for namespace in (real_kube.namespace, "default"):
        for verb in ("list", "get"):
            assert may(real_kube, RECONCILER_SA, verb, "statefulsets", group="apps", namespace=namespace)
    for verb in ("create", "update", "patch", "delete", "watch"):
        assert not may(real_kube, RECONCILER_SA, verb, "statefulsets", group="apps")
    for verb in ("list", "get", "watch"):
        assert not may(real_kube, PLUGIN_SA, verb, "statefulsets", group="apps")
