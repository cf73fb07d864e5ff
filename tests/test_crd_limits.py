"""Object sizes and counts a node's token can put into etcd (issue 22, item 9), on the real API server:
the CRDs bound every string and map (but inside an IPPool's leases, which the plugin's reader bounds,
and whose total the object's size limit bounds), objects as Whereabouts and whereabouts-py write them
still pass, and deploy's ResourceQuota caps how many objects the pools' namespace holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ipam.errors import CNIError
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import K8s
from tests.kubeapi.real import ApiError, RealKube

GROUP = "/apis/whereabouts.cni.cncf.io/v1alpha1"
QUOTA = Path(__file__).resolve().parent.parent / "deploy" / "base" / "quota.yaml"


def create(real_kube: RealKube, plural: str, body: dict[str, Any]) -> Any:
    return real_kube.request("POST", f"{GROUP}/namespaces/{real_kube.namespace}/{plural}", body)


def pool(name: str, allocations: dict[str, Any], cidr: str = "10.46.0.0/24") -> dict[str, Any]:
    return {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"range": cidr, "allocations": allocations}}  # fmt: skip


def refused(real_kube: RealKube, plural: str, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as info:
        create(real_kube, plural, body)
    assert info.value.status == 422 and field in str(info.value), info.value


# the longest values the formats allow: a 63-character namespace and a 253-character pod name, a
# 64-hex container id, a 15-character interface, a 253-character node and the packed extras
LONGEST = {
    "id": "f" * 64,
    "podref": "n" * 63 + "/" + "p" * 253,
    "ifname": "e" * 15,
    "attrs": f"node={'x' * 253};poduid={'u' * 36};created=2026-12-07T01:02:03.123456Z;network={'w' * 253};"
    f"token=~{'t' * 16}",
}


def test_a_one_megabyte_holder_identity_is_refused_to_the_nodes_token(k8s: K8s, tmp_path: Path) -> None:
    """On the real API server and on the test server (which applies the same schema bounds)."""
    store = KubernetesStore.connect(k8s.plugin_kubeconfig(), str(tmp_path / "locks"))
    with pytest.raises(CNIError) as info:
        store.take_turn("10.46.0.0-24", "h" * (1 << 20), 5)
    assert "holderIdentity" in str(info.value) and "Too long" in str(info.value)
    assert not k8s.api.objects("writerturns", k8s.namespace)
    assert store.take_turn("10.46.0.0-24", "n" * 64 + "/4194304", 5) is not None  # a host and a pid


@pytest.mark.apiserver
def test_a_turn_lasting_past_an_hour_is_refused(real_kube: RealKube) -> None:
    turn = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "WriterTurn", "metadata": {"name": "t"},
            "spec": {"holderIdentity": "h/1", "leaseDurationSeconds": 10**9}}  # fmt: skip
    refused(real_kube, "writerturns", turn, "spec.leaseDurationSeconds")


@pytest.mark.apiserver
@pytest.mark.parametrize(("field", "value"), [("id", "x" * 257), ("podref", "x" * 321), ("ifname", "x" * 65),
                                              ("attrs", "x" * 4097), ("node", "x" * 254), ("network", "x" * 1025),
                                              ("token", "x" * 257), ("podref", 5), ("podref", ["ns/p"])])  # fmt: skip
def test_an_oversize_or_mistyped_lease_field_is_stored_and_the_pool_refused_by_the_plugin(
    real_kube: RealKube, tmp_path: Path, field: str, value: Any
) -> None:
    """The API server keeps leases as written (the IPPool CRD's `allocations` is opaque, so that a pool
    write costs it half the CPU): the bound moved to the plugin's reader, which refuses the pool
    (code 101) naming the lease and the field, and ADD never writes such a lease (test_cni_blackbox)."""
    lease = {"id": "c1", "podref": "ns/p", field: value}
    assert (
        create(real_kube, "ippools", pool("10.46.0.0-24", {"1": lease}))["spec"]["allocations"]["1"] == lease
    )
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    try:
        with pytest.raises(CNIError) as info:
            store.read_pool("10.46.0.0-24", "10.46.0.0/24")
    finally:
        store.close()
    assert info.value.code == 101 and f"allocation 1: lease field '{field}'" in info.value.details


@pytest.mark.apiserver
def test_too_many_leases_or_a_long_range_are_refused(real_kube: RealKube) -> None:
    many = {str(i): {"id": "c", "podref": "ns/p"} for i in range(16385)}
    refused(real_kube, "ippools", pool("many", many, "10.0.0.0/16"), "spec.allocations")
    refused(real_kube, "ippools", pool("long", {}, "1" * 65), "spec.range")


@pytest.mark.apiserver
def test_whereabouts_format_and_the_longest_whereabouts_py_objects_are_accepted(real_kube: RealKube) -> None:
    whereabouts = {
        "1": {"id": "wb-ctr1", "podref": "rook-ceph/osd-0", "ifname": "net1"},
        "2": {"id": "wb-ctr2", "podref": "rook-ceph/osd-1", "ifname": "net1", "ipamclaimref": "ns/claim"},
    }
    create(real_kube, "ippools", pool("10.46.0.0-24", whereabouts))
    ours = {str(i): LONGEST for i in range(1, 1001)}  # 1,000 of the longest leases: ~1.1 MB
    create(real_kube, "ippools", pool("fd00-46---112", ours, "fd00:46::ffff:ffff:ffff:ffff/112"))
    create(real_kube, "overlappingrangeipreservations", {
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "OverlappingRangeIPReservation",
        "metadata": {"name": "10.46.0.1"},
        "spec": {"containerid": LONGEST["id"], "podref": LONGEST["podref"], "ifname": LONGEST["ifname"],
                 "node": "x" * 253, "created": "2026-12-07T01:02:03.123456Z"}})  # fmt: skip
    entries = [{"nodeName": "x" * 253, "sliceRange": "fd00:46:0:ffff::/64"}] * 4096
    slices = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool", "metadata": {"name": "net"},
              "spec": {"range": "fd00:46::/48", "sliceSize": "/64"}, "status": {"allocations": entries}}  # fmt: skip
    create(real_kube, "nodeslicepools", slices)
    slices["metadata"]["name"] = "net2"
    slices["status"]["allocations"] = [*entries, {"nodeName": "x" * 254, "sliceRange": "fd00:46::/64"}]
    with pytest.raises(ApiError) as info:
        create(real_kube, "nodeslicepools", slices)
    assert info.value.status == 422 and "nodeName" in str(info.value)


def _quota(real_kube: RealKube) -> dict[str, Any]:
    doc = yaml.safe_load(QUOTA.read_text())
    doc["metadata"]["namespace"] = real_kube.namespace
    return dict(doc)


@pytest.mark.apiserver
def test_deploys_resource_quota_caps_each_kind_in_the_pools_namespace(real_kube: RealKube) -> None:
    """No controller-manager runs here: the test writes the quota's status as its controller would, with
    the ippools count one below the limit; the API server's admission then counts and refuses."""
    quota = _quota(real_kube)
    real_kube.apply(quota, dry_run=True)
    made = real_kube.apply(quota)[0]
    hard = dict(made["spec"]["hard"])
    assert set(hard) == {f"count/{p}.whereabouts.cni.cncf.io" for p in
                         ("ippools", "overlappingrangeipreservations", "nodeslicepools", "writerturns")}  # fmt: skip
    limit = int(quota["spec"]["hard"]["count/ippools.whereabouts.cni.cncf.io"])  # the server shows "20k"
    used = dict.fromkeys(hard, "0") | {"count/ippools.whereabouts.cni.cncf.io": str(limit - 1)}
    made["status"] = {"hard": hard, "used": used}
    real_kube.request(
        "PUT",
        f"/api/v1/namespaces/{real_kube.namespace}/resourcequotas/{made['metadata']['name']}/status",
        made,
    )
    create(real_kube, "ippools", pool("10.46.0.0-24", {}))
    with pytest.raises(ApiError) as info:
        create(real_kube, "ippools", pool("10.47.0.0-24", {}, "10.47.0.0/24"))
    assert info.value.status == 403 and "exceeded quota" in str(info.value)
    create(real_kube, "writerturns", {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "WriterTurn",
                                      "metadata": {"name": "t"}, "spec": {"holderIdentity": "h/1", "leaseDurationSeconds": 5}})  # fmt: skip
