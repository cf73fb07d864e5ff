"""The real-API fixture itself: what every real-tier test relies on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import ApiError, RealKube


def test_admin_kubeconfig_reaches_the_namespace_with_our_crds(real_kube: RealKube, tmp_path: Path) -> None:
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    assert store.namespace == real_kube.namespace
    snapshot = store.read_pool("10.1.0.0-24", "10.1.0.0/24")
    assert snapshot.version is None
    store.write_pool(snapshot, {})
    pools = real_kube.api.objects("ippools", real_kube.namespace)
    assert [p["metadata"]["name"] for p in pools] == ["10.1.0.0-24"]
    store.close()


def test_pods_get_server_uids_phase_and_terminating_state(real_kube: RealKube) -> None:
    ns = real_kube.namespace
    running = real_kube.api.put_pod(ns, "web-0")
    terminating = real_kube.api.put_pod(ns, "web-1", deleting=True)
    assert running["metadata"]["uid"] and running["status"]["phase"] == "Running"
    assert terminating["metadata"].get("deletionTimestamp")
    real_kube.api.delete_pod(ns, "web-0")
    names = [p["metadata"]["name"] for p in real_kube.api.objects("pods", ns)]
    assert names == ["web-1"]


def test_service_account_token_is_authenticated_but_unauthorised_without_rbac(
    real_kube: RealKube, tmp_path: Path
) -> None:
    from ipam.errors import CNIError

    path = real_kube.token_kubeconfig("nobody", real_kube.namespace)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
    store.auth_settle_seconds = 0  # no grace for a just-started API server: the first refusal is final
    with pytest.raises(CNIError) as err:
        store.read_pool("10.2.0.0-24", "10.2.0.0/24")
    assert "HTTP 403" in err.value.msg
    store.close()


def test_server_side_dry_run_refuses_unknown_fields(real_kube: RealKube) -> None:
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"}}
    real_kube.apply(cm, dry_run=True)
    assert real_kube.request("GET", f"/api/v1/namespaces/{real_kube.namespace}/configmaps")["items"] == []
    with pytest.raises(ApiError) as err:
        real_kube.apply({**cm, "bogus": 1}, dry_run=True)
    assert err.value.status == 400


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "crds").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_crd_passes_a_server_side_dry_run(real_kube: RealKube, path: Path) -> None:
    """crds/ as written, replacing the installed copy under dry run with strict field validation."""
    from tests.kubeapi.real import load_yaml

    for crd in load_yaml(path):
        url = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"
        current = real_kube.request("GET", url)
        body = {
            **crd,
            "metadata": {**crd["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]},
        }
        answer = real_kube.request("PUT", url, body, {"dryRun": "All", "fieldValidation": "Strict"})
        assert answer["spec"]["group"] == "whereabouts.cni.cncf.io"
        broken = copy.deepcopy(body)
        broken["spec"]["bogus"] = True
        with pytest.raises(ApiError) as err:  # the dry run really validates
            real_kube.request("PUT", url, broken, {"dryRun": "All", "fieldValidation": "Strict"})
        assert err.value.status == 400


def test_rbac_rebase_gives_each_component_its_own_rights_in_the_test_namespace(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The identities the real-tier tests run as: the plugin writes pools but cannot list pods; the
    reconciler lists pools and pods. (Which namespaces each may reach: tests/test_deploy*.)"""
    from ipam.errors import CNIError

    plugin = KubernetesStore.connect(real_kube.plugin_kubeconfig(), str(tmp_path / "p"))
    reconciler = KubernetesStore.connect(real_kube.reconciler_kubeconfig(), str(tmp_path / "r"))
    try:
        plugin.auth_settle_seconds = 0
        plugin.write_pool(plugin.read_pool("10.3.0.0-24", "10.3.0.0/24"), {})
        assert [p.name for p in reconciler.list_pools()] == ["10.3.0.0-24"]
        real_kube.api.put_pod(real_kube.namespace, "p0")
        assert any(p["metadata"]["name"] == "p0" for p in reconciler.list_pods())
        with pytest.raises(CNIError, match="HTTP 403"):
            plugin.list_pods()
    finally:
        for store in (plugin, reconciler):
            store.close()


def test_pool_managed_fields_do_not_list_every_lease(real_kube: RealKube, tmp_path: Path) -> None:
    """allocations is an atomic map (crds/): managedFields name the map once, not each lease, so a
    pool's every write does not grow with its field-ownership bookkeeping."""
    from ipam.allocator import Lease

    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    snapshot = store.read_pool("10.4.0.0-24", "10.4.0.0/24")
    store.write_pool(snapshot, {i: Lease(f"c{i}", f"default/p{i}", "net1") for i in range(1, 4)})
    store.close()
    [pool] = real_kube.api.objects("ippools", real_kube.namespace)
    fields = [json.dumps(m.get("fieldsV1", {})) for m in pool["metadata"]["managedFields"]]
    assert any('"f:allocations": {}' in f for f in fields), fields
    assert not any('"f:1"' in f for f in fields), fields
