"""Sticky addresses on the real kube-apiserver: a StatefulSet object and pods owned by it (set by
hand: no controller-manager runs), the plugin executable with its own ServiceAccount playing the
kubelet's ADD/DEL, the reconciler with its own (deploy/base/rbac.yaml) deciding the retention's end."""

from __future__ import annotations

import contextlib
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease
from ipam.reconcile import KubeSource, Reconciler
from ipam.store.kubernetes import KubernetesStore
from tests.cni_exec import cni_env, run
from tests.kubeapi.real import ApiError, RealKube

POOL = "10.61.0.0-24"


def netconf(kube: RealKube, tmp: Path, **ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "storage",
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": "10.61.0.0/24",
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
            "data_dir": str(tmp / "node"),
            **ipam,
        },
    }


def statefulset(kube: RealKube, name: str, replicas: int) -> dict[str, Any]:
    body = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    [created] = kube.apply(body)
    return dict(created)


def owned_pod(kube: RealKube, owner: dict[str, Any], name: str) -> str:
    """Create pod `name` owned by StatefulSet `owner`; returns its UID."""
    meta = {
        "name": name,
        "labels": {"app": owner["metadata"]["name"]},
        "ownerReferences": [
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ],
    }
    pod = kube.request(
        "POST",
        f"/api/v1/namespaces/{kube.namespace}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"containers": [{"name": "c", "image": "x"}]},
        },
    )
    return str(pod["metadata"]["uid"])


def delete(kube: RealKube, path: str) -> None:
    kube.request("DELETE", path, {"gracePeriodSeconds": 0})


def leases(kube: RealKube) -> dict[str, Lease]:
    """{address offset: lease} of the pool."""
    [pool] = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == POOL]
    return {k: Lease.from_json(v) for k, v in (pool["spec"].get("allocations") or {}).items()}


def cni(kube: RealKube, conf: dict[str, Any], command: str, container: str, pod: str, uid: str) -> str:
    env = cni_env(command, container, pod=pod, namespace=kube.namespace)
    env["CNI_ARGS"] += f";K8S_POD_UID={uid}"
    call = run(conf, env)
    assert call.code == 0, call.stdout + call.stderr[-2000:]
    return str(call.result["ips"][0]["address"]) if command == "ADD" else ""


@pytest.fixture
def reconciler(real_kube: RealKube, tmp_path: Path) -> Any:
    store = KubernetesStore.connect(real_kube.reconciler_kubeconfig(), str(tmp_path / "r"))
    out = io.StringIO()

    def run_once(now: datetime | None = None) -> str:
        Reconciler(KubeSource(store), 0.0, False, out).run_once(now=now)
        return out.getvalue()

    yield run_once
    store.close()


def test_statefulset_pod_gets_its_address_back_until_scaled_down_or_deleted(
    real_kube: RealKube, tmp_path: Path, reconciler: Any
) -> None:
    kube, ns = real_kube, real_kube.namespace
    with contextlib.suppress(ApiError):  # pods need their ServiceAccount; no controller-manager makes it
        kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
    conf = netconf(kube, tmp_path, sticky="statefulset")
    sts = statefulset(kube, "db", replicas=2)
    uid0, uid1 = owned_pod(kube, sts, "db-0"), owned_pod(kube, sts, "db-1")
    kube.api.put_pod(ns, "other")
    addr0 = cni(kube, conf, "ADD", "c-db0", "db-0", uid0)
    addr1 = cni(kube, conf, "ADD", "c-db1", "db-1", uid1)
    assert (addr0, addr1) == ("10.61.0.1/24", "10.61.0.2/24")

    # db-0 deleted: its DEL keeps the lease for the name, the reconciler keeps it, nobody else gets it
    cni(kube, conf, "DEL", "c-db0", "db-0", uid0)
    delete(kube, f"/api/v1/namespaces/{ns}/pods/db-0")
    assert leases(kube)["1"].retained and leases(kube)["1"].sticky == "statefulset"
    reconciler()
    assert "1" in leases(kube)
    assert cni(kube, conf, "ADD", "c-other", "other", "") == "10.61.0.3/24"
    # re-created under its name with a new UID (on another node): the same address
    uid0b = owned_pod(kube, sts, "db-0")
    assert uid0b != uid0
    other_node = netconf(kube, tmp_path / "node-b", sticky="statefulset")
    assert cni(kube, other_node, "ADD", "c-db0-b", "db-0", uid0b) == addr0
    back = leases(kube)["1"]
    assert back.id == "c-db0-b" and back.poduid == uid0b and not back.retained

    # scaled to 1: db-1's address is free after the next pass
    cni(kube, conf, "DEL", "c-db1", "db-1", uid1)
    delete(kube, f"/api/v1/namespaces/{ns}/pods/db-1")
    kube.request("PATCH", f"/apis/apps/v1/namespaces/{ns}/statefulsets/db", {"spec": {"replicas": 1}})
    out = reconciler()
    assert "2" not in leases(kube) and "statefulset-scaled-down" in out
    assert "10.61.0.2" not in {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", ns)
    }

    # StatefulSet deleted: both free
    cni(kube, conf, "DEL", "c-db0-b", "db-0", uid0b)
    delete(kube, f"/api/v1/namespaces/{ns}/pods/db-0")
    reconciler()
    assert "1" in leases(kube)  # db-0 is still covered by replicas=1
    delete(kube, f"/apis/apps/v1/namespaces/{ns}/statefulsets/db")
    out = reconciler()
    assert set(leases(kube)) == {"3"} and "statefulset-gone" in out


def test_sticky_seconds_ends_when_the_clock_passes_it(
    real_kube: RealKube, tmp_path: Path, reconciler: Any
) -> None:
    kube, ns = real_kube, real_kube.namespace
    conf = netconf(kube, tmp_path, sticky_seconds=600)
    pod = kube.api.put_pod(ns, "web")
    assert cni(kube, conf, "ADD", "c-web", "web", pod["metadata"]["uid"]) == "10.61.0.1/24"
    cni(kube, conf, "DEL", "c-web", "web", pod["metadata"]["uid"])
    kube.api.delete_pod(ns, "web")
    [lease] = leases(kube).values()
    until = datetime.fromisoformat(lease.until.replace("Z", "+00:00"))
    reconciler(now=until - timedelta(seconds=5))
    assert set(leases(kube)) == {"1"}
    out = reconciler(now=until + timedelta(seconds=1))
    assert leases(kube) == {} and "sticky-expired" in out
    assert datetime.now(UTC) < until  # the clock was moved, not waited for


def test_requested_and_static_leases_are_recorded_and_reserved(real_kube: RealKube, tmp_path: Path) -> None:
    """In the IPPool a requested and a static lease are ordinary Whereabouts leases (id, podref, ifname)
    whose extra state is in `attrs`; each is reserved cluster-wide, and a second pod is refused."""
    kube, ns = real_kube, real_kube.namespace
    conf = {**netconf(kube, tmp_path), "runtimeConfig": {"ips": ["10.61.0.20/24"]}}
    env = cni_env("ADD", "c-a", pod="a", namespace=ns)
    env["CNI_ARGS"] += ";IP=10.61.0.30/24,192.0.2.1/24;GATEWAY=10.61.0.254"
    call = run(conf, env)
    assert call.code == 0, call.stderr[-2000:]
    assert call.result["ips"] == [
        {"address": "10.61.0.20/24"},
        {"address": "10.61.0.30/24", "gateway": "10.61.0.254"},
        {"address": "192.0.2.1/24"},
    ]
    [pool] = [o for o in kube.api.objects("ippools", ns) if o["metadata"]["name"] == POOL]
    allocations = pool["spec"]["allocations"]
    assert set(allocations) == {"20", "30"}
    for offset, kind in (("20", "requested"), ("30", "static")):
        raw = allocations[offset]
        assert {raw["id"], raw["podref"], raw["ifname"]} == {"c-a", f"{ns}/a", "net1"}
        assert f"kind={kind}" in raw["attrs"]
    assert {"10.61.0.20", "10.61.0.30"} <= {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", ns)
    }
    other = run(
        netconf(kube, tmp_path),
        {
            **cni_env("ADD", "c-b", pod="b", namespace=ns),
            "CNI_ARGS": f"K8S_POD_NAMESPACE={ns};K8S_POD_NAME=b;IP=10.61.0.30/24",
        },
    )
    assert other.code == 1 and other.result["code"] == 104 and f"{ns}/a" in other.result["msg"]
