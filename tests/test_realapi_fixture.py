"""The real-API fixture itself: what every real-tier test relies on."""

from __future__ import annotations

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


def test_service_account_token_is_authenticated_but_unauthorised_without_rbac(real_kube: RealKube, tmp_path: Path) -> None:
    from ipam.errors import CNIError

    path = real_kube.token_kubeconfig("nobody", real_kube.namespace)
    store = KubernetesStore.connect(path, str(tmp_path / "locks"))
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
