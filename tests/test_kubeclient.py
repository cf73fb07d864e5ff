"""The datastore's standard-library Kubernetes client: every kubeconfig form our users have, against
the real kube-apiserver, and the error mapping the engine relies on."""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from ipam import errors
from ipam.allocator import Lease
from ipam.errors import CNIError, ConflictError, TransientStoreError
from ipam.store import kubeclient
from ipam.store.kubeclient import KubeClient, KubeconfigError, in_cluster
from ipam.store.kubernetes import GROUP, KubernetesStore
from tests.cni_exec import cni_env, finish, kube_netconf, run, start
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.real import RealKube


def rewrite(path: str, dest: Path, change: Any) -> str:
    doc = json.loads(Path(path).read_text())
    change(doc)
    dest.write_text(json.dumps(doc))
    return str(dest)


def roundtrip(store: KubernetesStore) -> None:
    """Create a pool, update it at its version, and see a stale version refused."""
    empty = store.read_pool("p-10-0-0-0-24", "10.0.0.0/24")
    assert empty.version is None  # 404 on GET: an absent pool
    lease = Lease(id="c1", podref="ns/pod", ifname="net1")
    store.write_pool(empty, {1: lease})
    first = store.read_pool("p-10-0-0-0-24", "10.0.0.0/24")
    assert first.allocations[1].id == "c1" and first.version
    store.write_pool(first, {1: lease, 2: Lease(id="c2", podref="ns/pod2", ifname="net1")})
    with pytest.raises(ConflictError):  # 409: written since `first` was read
        store.write_pool(first, {})
    assert sorted(store.read_pool("p-10-0-0-0-24", "10.0.0.0/24").allocations) == [1, 2]


def grant(real_kube: RealKube, serviceaccount: str) -> None:
    ns = real_kube.namespace
    real_kube.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "ipam"},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "resources": ["ippools", "overlappingrangeipreservations"],
                        "verbs": ["get", "list", "create", "update", "delete"],
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "ipam"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ipam"},
                "subjects": [{"kind": "ServiceAccount", "name": serviceaccount, "namespace": ns}],
            },
        ]
    )
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{ns}:{serviceaccount}",
            "resourceAttributes": {"group": GROUP, "resource": "ippools", "verb": "get", "namespace": ns},
        },
    }
    for _ in range(300):  # until the authorizer's RBAC cache has the new binding (bounded)
        if real_kube.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)[
            "status"
        ].get("allowed"):
            return
        time.sleep(0.05)
    raise AssertionError("the RoleBinding never took effect")


def test_client_certificate_inline(real_kube: RealKube, tmp_path: Path) -> None:
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    assert store.namespace == real_kube.namespace  # the context's namespace
    roundtrip(store)
    store.close()


def test_client_certificate_and_ca_in_files_relative_to_the_kubeconfig(
    real_kube: RealKube, tmp_path: Path
) -> None:
    def to_files(doc: dict[str, Any]) -> None:
        cluster, user = doc["clusters"][0]["cluster"], doc["users"][0]["user"]
        for section, key in (
            (cluster, "certificate-authority"),
            (user, "client-certificate"),
            (user, "client-key"),
        ):
            (tmp_path / f"{key}.pem").write_bytes(base64.b64decode(section.pop(f"{key}-data")))
            section[key] = f"{key}.pem"  # relative: to the kubeconfig's directory

    path = rewrite(real_kube.kubeconfig_path, tmp_path / "kubeconfig", to_files)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
    roundtrip(store)
    store.close()


def test_yaml_kubeconfig(real_kube: RealKube, tmp_path: Path) -> None:
    import yaml

    doc = json.loads(Path(real_kube.kubeconfig_path).read_text())
    (tmp_path / "kubeconfig.yaml").write_text(yaml.safe_dump(doc))
    store = KubernetesStore.connect(str(tmp_path / "kubeconfig.yaml"), str(tmp_path / "locks"))
    roundtrip(store)
    store.close()


def test_service_account_token(real_kube: RealKube, tmp_path: Path) -> None:
    path = real_kube.token_kubeconfig("ipam", real_kube.namespace)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
    store.auth_settle_seconds = 0  # a refusal is final at once (not a just-started server's RBAC)
    with pytest.raises(CNIError) as refused:  # no RBAC yet: 403
        store.read_pool("p", "10.0.0.0/24")
    assert refused.value.code == errors.DATASTORE_ERROR
    assert "refused the plugin's credentials (HTTP 403)" in refused.value.msg
    grant(real_kube, "ipam")
    roundtrip(store)
    store.close()


def test_token_file_and_ca_file_in_cluster_style(real_kube: RealKube, tmp_path: Path) -> None:
    path = real_kube.token_kubeconfig("ipam", real_kube.namespace)
    grant(real_kube, "ipam")
    doc = json.loads(Path(path).read_text())
    token = doc["users"][0]["user"]["token"]
    ca = base64.b64decode(doc["clusters"][0]["cluster"]["certificate-authority-data"])
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text(token + "\n")
    (sa / "ca.crt").write_bytes(ca)

    def token_file(d: dict[str, Any]) -> None:
        d["users"][0]["user"] = {"tokenFile": str(sa / "token")}
        d["clusters"][0]["cluster"] = {"server": real_kube.url, "certificate-authority": str(sa / "ca.crt")}

    store = KubernetesStore.connect(rewrite(path, tmp_path / "kubeconfig", token_file), str(tmp_path / "l"))
    roundtrip(store)
    store.close()

    # in-cluster: the service account directory and the KUBERNETES_SERVICE_* variables
    port = real_kube.url.rsplit(":", 1)[1]
    creds = in_cluster(str(sa), {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port})
    client = KubeClient(creds)
    pool = client.request(
        "GET", f"/apis/{GROUP}/v1alpha1/namespaces/{real_kube.namespace}/ippools/p-10-0-0-0-24"
    )
    assert set(pool["spec"]["allocations"]) == {"1", "2"}
    client.close()


def test_rotated_token_file_is_read_again(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant(real_kube, "ipam")
    good = json.loads(Path(real_kube.token_kubeconfig("ipam", real_kube.namespace)).read_text())
    token_file = tmp_path / "token"
    token_file.write_text("not-a-token")

    def use_file(d: dict[str, Any]) -> None:
        d["users"][0]["user"] = {"tokenFile": str(token_file)}

    path = rewrite(real_kube.token_kubeconfig("ipam", real_kube.namespace), tmp_path / "kc", use_file)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
    store.auth_settle_seconds = 0  # a refusal is final at once
    with pytest.raises(CNIError) as refused:
        store.read_pool("p", "10.0.0.0/24")
    assert "HTTP 401" in refused.value.msg
    token_file.write_text(good["users"][0]["user"]["token"])  # the kubelet rotated it
    monkeypatch.setattr(kubeclient, "TOKEN_REREAD_SECONDS", 0.0)
    assert store.read_pool("p", "10.0.0.0/24").version is None
    store.close()


def test_reservations_and_precondition_delete(real_kube: RealKube, tmp_path: Path) -> None:
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    mine, other = Lease(id="c1", podref="ns/a", ifname="net1"), Lease(id="c2", podref="ns/b", ifname="net1")
    assert store.reserve("10.0.0.1", mine) is None
    assert store.reserve("10.0.0.1", other) == Lease.from_reservation(mine.reservation_spec())
    [obj] = store.list_reservations()
    with pytest.raises(ConflictError):  # a stale resourceVersion precondition
        store.delete_reservation("10.0.0.1", "1")
    store.delete_reservation("10.0.0.1", obj["metadata"]["resourceVersion"])
    store.delete_reservation("10.0.0.1", "1")  # gone already: fine
    assert store.list_reservations() == []
    store.close()


def test_list_pods_across_namespaces(real_kube: RealKube, tmp_path: Path) -> None:
    real_kube.api.put_pod(real_kube.namespace, "web-0")
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    names = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in store.list_pods()}
    assert (real_kube.namespace, "web-0") in names
    store.close()


def test_status_check_reaches_the_server(real_kube: RealKube, tmp_path: Path) -> None:
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    store.check_reachable()
    store.close()


def test_wrong_ca_is_a_transient_connection_error(real_kube: RealKube, tmp_path: Path) -> None:
    """A server whose certificate does not verify is never talked to (the engine retries, then 11)."""
    other = Path(real_kube.kubeconfig_path).read_text()
    doc = json.loads(other)
    user = doc["users"][0]["user"]
    doc["clusters"][0]["cluster"]["certificate-authority-data"] = user[
        "client-certificate-data"
    ]  # not the CA
    (tmp_path / "kc").write_text(json.dumps(doc))
    store = KubernetesStore.connect(str(tmp_path / "kc"), str(tmp_path / "locks"))
    with pytest.raises(TransientStoreError, match="SSL"):
        store.read_pool("p", "10.0.0.0/24")


# -- error mapping (test server: injected faults) ----------------------------------------------------


def test_throttling_and_server_errors_are_transient_with_retry_after(
    kube: KubeHandle, tmp_path: Path
) -> None:
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    kube.api.set_faults(throttle_rate=1.0, retry_after=7)
    with pytest.raises(TransientStoreError) as throttled:
        store.read_pool("p", "10.0.0.0/24")
    assert throttled.value.retry_after == 7.0 and "HTTP 429" in str(throttled.value)
    kube.api.set_faults(error_rate=1.0, error_codes=(503,))
    with pytest.raises(TransientStoreError, match="HTTP 503"):
        store.read_pool("p", "10.0.0.0/24")
    kube.api.set_faults(drop_rate=1.0)
    with pytest.raises(TransientStoreError):
        store.read_pool("p", "10.0.0.0/24")
    kube.api.clear_faults()
    assert store.read_pool("p", "10.0.0.0/24").version is None  # and the client recovers
    store.close()


def test_refused_connection_is_transient(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    doc = {
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    (tmp_path / "kc").write_text(json.dumps(doc))
    store = KubernetesStore.connect(str(tmp_path / "kc"), str(tmp_path / "locks"))
    assert store.namespace == "kube-system"  # no context namespace: Whereabouts' default
    with pytest.raises(TransientStoreError, match="ConnectionRefused"):
        store.read_pool("p", "10.0.0.0/24")


# -- kubeconfig forms we refuse ----------------------------------------------------------------------


def kubeconfig_doc(user: dict[str, Any], cluster: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "clusters": [{"name": "c", "cluster": cluster or {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }


@pytest.mark.parametrize(
    ("doc", "message", "inline_only"),
    [
        # the CNI path (ipam.kubeconfig's policy): no credential plugins, no credential files
        (kubeconfig_doc({"exec": {"command": "aws"}}), "users[].user.exec", True),
        (kubeconfig_doc({"auth-provider": {"name": "gcp"}}), "users[].user.auth-provider", True),
        (kubeconfig_doc({"tokenFile": "/etc/shadow"}), "users[].user.tokenFile", True),
        # tools (ipam-reconcile --kubeconfig): what this client's reader refuses
        (
            kubeconfig_doc({"client-certificate-data": "QUJD"}),
            "needs both client-certificate and client-key",
            False,
        ),
        (kubeconfig_doc({"token": "t"}, {"server": ""}), "has no server", False),
        (
            kubeconfig_doc({"token": "t"}, {"server": "https://h", "certificate-authority-data": "!!"}),
            "not valid base64",
            False,
        ),
        (kubeconfig_doc({"tokenFile": "missing-token"}), "tokenFile", False),
        ({**kubeconfig_doc({"token": "t"}), "current-context": "nope"}, "no context named 'nope'", False),
        ([1, 2], "not a kubeconfig", False),
    ],
)
def test_unusable_kubeconfig_is_code_7_naming_the_problem(
    doc: Any, message: str, inline_only: bool, tmp_path: Path
) -> None:
    path = tmp_path / "kc"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(CNIError) as refused:
        KubernetesStore.connect(str(path), str(tmp_path / "locks"), inline_only=inline_only)
    assert refused.value.code == errors.INVALID_CONFIG
    assert "ipam.kubernetes.kubeconfig" in refused.value.msg
    assert message in refused.value.msg + str(refused.value.details)


def test_in_cluster_needs_the_service_environment(tmp_path: Path) -> None:
    with pytest.raises(KubeconfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster(str(tmp_path), {})
    with pytest.raises(KubeconfigError, match="token"):
        in_cluster(str(tmp_path), {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"})
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("x")
    creds = in_cluster(
        str(tmp_path), {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}
    )
    assert creds.server == "https://[fd00::1]:443" and creds.token == "t"
    assert creds.token_file == os.path.join(str(tmp_path), "token")


# -- the CNI executable in direct mode against the real server ---------------------------------------


def direct_conf(kubeconfig: str, tmp_path: Path, cidr: str) -> dict[str, Any]:
    return kube_netconf(kubeconfig, tmp_path, cidr)


def test_direct_mode_with_a_service_account_token_never_imports_the_kubernetes_package(
    real_kube: RealKube, tmp_path: Path
) -> None:
    grant(real_kube, "ipam")
    conf = direct_conf(real_kube.token_kubeconfig("ipam", real_kube.namespace), tmp_path, "10.77.0.0/24")
    env = cni_env("ADD", "c1", WHEREABOUTS_PY_AGENT_SOCKET="/nonexistent.sock", PYTHONPROFILEIMPORTTIME="1")
    done = run(conf, env)
    assert done.code == 0, done.stdout + done.stderr[-2000:]
    assert done.result["ips"][0]["address"] == "10.77.0.1/24"
    imported = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    assert "ipam.store.kubeclient" in imported
    assert not {m for m in imported if m.split(".")[0] in ("kubernetes", "urllib3", "requests", "filelock")}


@pytest.mark.slow
def test_concurrent_direct_mode_adds_on_one_node_all_succeed(real_kube: RealKube, tmp_path: Path) -> None:
    """Processes queue on the node lock (sleeping in flock) and each holds it only for its requests."""
    conf = direct_conf(real_kube.kubeconfig_path, tmp_path, "10.78.0.0/24")
    env = {"WHEREABOUTS_PY_AGENT_SOCKET": "/nonexistent.sock", "NODENAME": "node-a"}
    procs = [start(conf, cni_env("ADD", f"c{i}", **env)) for i in range(40)]
    calls = [finish(p) for p in procs]
    assert [c.code for c in calls] == [0] * 40, [c.stdout for c in calls if c.code]
    got = {f"c{i}": c.result["ips"][0]["address"] for i, c in enumerate(calls)}
    [pool] = real_kube.api.objects("ippools", real_kube.namespace)
    assert {v["id"]: f"10.78.0.{k}/24" for k, v in pool["spec"]["allocations"].items()} == got
    assert len(set(got.values())) == 40


def test_tls_server_name_is_the_name_verified(real_kube: RealKube, tmp_path: Path) -> None:
    """The serving certificate names 127.0.0.1 and localhost: tls-server-name picks which is checked."""

    def named(server_name: str) -> Any:
        return lambda d: d["clusters"][0]["cluster"].update({"tls-server-name": server_name})

    good = rewrite(real_kube.kubeconfig_path, tmp_path / "good", named("localhost"))
    store = KubernetesStore.connect(good, str(tmp_path / "locks"))
    assert store.read_pool("p", "10.0.0.0/24").version is None
    store.close()
    bad = rewrite(real_kube.kubeconfig_path, tmp_path / "bad", named("not-the-apiserver.example"))
    store = KubernetesStore.connect(bad, str(tmp_path / "locks"))
    with pytest.raises(TransientStoreError, match=r"not-the-apiserver\.example"):
        store.read_pool("p", "10.0.0.0/24")


def test_a_lost_answer_is_asked_again_only_for_a_get(kube: KubeHandle, tmp_path: Path) -> None:
    """A GET whose keep-alive connection dies is repeated once; a write is not (it may have been
    carried out: a repeat would answer 409 for our own write), so the engine re-reads and decides."""
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    empty = store.read_pool("p", "10.0.0.0/24")  # the connection is open and idle now
    store.write_pool(empty, {1: Lease(id="c1", podref="ns/a", ifname="net1")})
    kube.api.set_faults(drop_after_rate=1.0, methods={"GET"}, resources={"ippools"}, max_hits=1)
    snapshot = store.read_pool("p", "10.0.0.0/24")  # answered on the second try
    assert kube.api.fault_hits == 2 and snapshot.allocations[1].id == "c1"  # asked twice
    kube.api.set_faults(drop_after_rate=1.0, methods={"PUT"}, resources={"ippools"}, max_hits=1)
    with pytest.raises(TransientStoreError):
        store.write_pool(snapshot, {})
    kube.api.clear_faults()
    assert store.read_pool("p", "10.0.0.0/24").allocations == {}  # it was carried out
    store.close()


def test_exec_plugin_kubeconfig_serves_tools_and_is_refused_on_the_cni_path(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """An administrator's kubeconfig with an exec credential plugin (e.g. a cloud login) works for
    ipam-reconcile --kubeconfig; the CNI path, run as root for every pod, never runs a plugin."""
    grant(real_kube, "ipam")
    token = json.loads(Path(real_kube.token_kubeconfig("ipam", real_kube.namespace)).read_text())
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": {"token": token["users"][0]["user"]["token"]},
    }
    plugin = tmp_path / "login.sh"
    plugin.write_text(f"#!/bin/sh\ncat <<'EOF'\n{json.dumps(credential)}\nEOF\n")
    plugin.chmod(0o755)

    def use_plugin(d: dict[str, Any]) -> None:
        exec_spec = {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": str(plugin),
            "interactiveMode": "Never",
        }
        d["users"][0]["user"] = {"exec": exec_spec}

    path = rewrite(real_kube.kubeconfig_path, tmp_path / "kc", use_plugin)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))  # as ipam-reconcile connects
    assert store.namespace == real_kube.namespace
    roundtrip(store)
    store.close()
    with pytest.raises(CNIError) as refused:
        KubernetesStore.connect(path, str(tmp_path / "locks"), inline_only=True)
    assert refused.value.code == errors.INVALID_CONFIG and "users[].user.exec" in refused.value.msg
