"""Node slices on a real kube-apiserver: racing claims, Whereabouts' objects read as they are,
reclaim after a Node is deleted (through ipam-reconcile), network_name, IPv6."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from ipam import errors, nodeslices, reconcile
from ipam.cni import run
from tests.kubeapi.real import RealKube

WB = "whereabouts.cni.cncf.io/v1alpha1"


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def call(
    kube: RealKube,
    tmp: Path,
    command: str,
    cid: str,
    node: str,
    rng: str = "10.0.0.0/24",
    size: str = "/26",
    kubeconfig: str | None = None,
    **extra: Any,
) -> tuple[int, dict[str, Any]]:
    ipam = {
        "type": "whereabouts-py",
        "range": rng,
        "node_slice_size": size,
        "node_name": node,
        "data_dir": str(tmp / node),
        "kubernetes": {"kubeconfig": kubeconfig or kube.kubeconfig_path},
        **extra,
    }
    conf = {"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam}
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={kube.namespace};K8S_POD_NAME={cid}",
    }
    out = io.StringIO()
    code = run(env, json.dumps(conf).encode(), out)
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def nsp(kube: RealKube, name: str = "net1") -> dict[str, Any]:
    got: dict[str, Any] = kube.request("GET", f"/apis/{WB}/namespaces/{kube.namespace}/nodeslicepools/{name}")
    return got


def held(kube: RealKube, name: str = "net1") -> dict[str, str]:
    return {e["sliceRange"]: e["nodeName"] for e in nsp(kube, name)["status"]["allocations"]}


def pool(kube: RealKube, name: str) -> dict[str, Any]:
    got: dict[str, Any] = kube.request("GET", f"/apis/{WB}/namespaces/{kube.namespace}/ippools/{name}")
    return got


def test_eight_nodes_race_for_slices_of_a_fresh_range(real_kube: RealKube, tmp_path: Path) -> None:
    nodes = [f"node-{i}" for i in range(8)]
    start = threading.Barrier(len(nodes))
    results: dict[str, tuple[int, dict[str, Any]]] = {}

    def node_adds(node: str) -> None:
        start.wait()
        results[node] = call(real_kube, tmp_path, "ADD", f"pod-{node}", node, rng="10.0.0.0/24", size="/28")

    threads = [threading.Thread(target=node_adds, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(code == 0 for code, _ in results.values()), results
    slices = held(real_kube)
    assert len(slices) == 16  # every slice listed, in Whereabouts' layout
    owners = [n for n in slices.values() if n]
    assert sorted(owners) == sorted(nodes)  # each node exactly one slice: none doubled, none lost
    for node, (_, doc) in results.items():
        addr = IPAddress(doc["ips"][0]["address"].split("/")[0])
        (mine,) = [s for s, n in slices.items() if n == node]
        assert addr in IPNetwork(mine) and doc["ips"][0]["address"].endswith("/24")
        leases = pool(real_kube, f"{node}-{mine.replace('/', '-')}")["spec"]["allocations"]
        assert [v["podref"] for v in leases.values()] == [f"{real_kube.namespace}/pod-{node}"]
    assert nsp(real_kube)["spec"] == {"range": "10.0.0.0/24", "sliceSize": "/28"}


def test_whereabouts_node_slice_pool_and_slice_pools_are_honoured(
    real_kube: RealKube, tmp_path: Path
) -> None:
    ns = real_kube.namespace
    slices = [f"10.0.0.{i * 64}/26" for i in range(4)]
    # as Whereabouts' node-slice controller writes it: every slice listed, one per node, size without "/"
    real_kube.apply(
        {
            "apiVersion": WB,
            "kind": "NodeSlicePool",
            "metadata": {"name": "net1", "namespace": ns},
            "spec": {"range": "10.0.0.0/24", "sliceSize": "26"},
            "status": {
                "allocations": [
                    {"nodeName": n, "sliceRange": s}
                    for n, s in zip(["", "node-a", "node-b", ""], slices, strict=True)
                ]
            },
        }
    )
    # and a slice pool Whereabouts' CNI made: offsets from the slice's network address
    real_kube.apply(
        {
            "apiVersion": WB,
            "kind": "IPPool",
            "metadata": {"name": "node-a-10.0.0.64-26", "namespace": ns},
            "spec": {
                "range": "10.0.0.64/26",
                "allocations": {"1": {"id": "wb-cid", "podref": f"{ns}/wb-pod", "ifname": "eth0"}},
            },
        }
    )
    code, doc = call(real_kube, tmp_path, "ADD", "ours", "node-a", size="/26")
    assert code == 0 and doc["ips"][0]["address"] == "10.0.0.66/24"
    code, doc = call(real_kube, tmp_path, "ADD", "b0", "node-b", size="/26")
    assert code == 0 and doc["ips"][0]["address"] == "10.0.0.129/24"
    assert held(real_kube) == dict(zip(slices, ["", "node-a", "node-b", ""], strict=True))  # no claim needed
    # DEL of the Whereabouts pod's container releases its lease in the same pool
    assert call(real_kube, tmp_path, "DEL", "wb-cid", "node-a", size="/26")[0] == 0
    assert set(pool(real_kube, "node-a-10.0.0.64-26")["spec"]["allocations"]) == {"2"}
    assert call(real_kube, tmp_path, "CHECK", "ours", "node-a", size="/26")[0] == 0


def test_reclaim_after_a_node_is_deleted(real_kube: RealKube, tmp_path: Path) -> None:
    for node in ("node-a", "node-b"):
        real_kube.apply(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"{real_kube.namespace}-{node}"}}
        )
    a, b = f"{real_kube.namespace}-node-a", f"{real_kube.namespace}-node-b"
    assert call(real_kube, tmp_path, "ADD", "a0", a)[0] == 0
    assert call(real_kube, tmp_path, "ADD", "b0", b)[0] == 0
    assert call(real_kube, tmp_path, "DEL", "b0", b)[0] == 0
    real_kube.request("DELETE", f"/api/v1/nodes/{b}")
    args = ["--kubeconfig", real_kube.kubeconfig_path, "--grace", "0"]
    out = io.StringIO()
    reconcile.main([*args, "--dry-run"], out)
    line = f"would-return nodeslicepool=net1 slice=10.0.0.64/26 node={b} reason=node-gone"
    assert line in out.getvalue().splitlines()
    assert held(real_kube)["10.0.0.64/26"] == b  # dry run: nothing changed
    out = io.StringIO()
    reconcile.main(args, out)
    assert line.replace("would-return", "return") in out.getvalue().splitlines()
    assert held(real_kube) == {"10.0.0.0/26": a, "10.0.0.64/26": "", "10.0.0.128/26": "", "10.0.0.192/26": ""}
    names = [p["metadata"]["name"] for p in real_kube.api.objects("ippools", real_kube.namespace)]
    assert names == [f"{a}-10.0.0.0-26"]  # b's pool (and the fence) are gone; a's lease is a's
    real_kube.request("DELETE", f"/api/v1/nodes/{a}")


def test_node_slice_size_with_network_name(real_kube: RealKube, tmp_path: Path) -> None:
    code, doc = call(real_kube, tmp_path, "ADD", "p0", "node-a", network_name="blue")
    assert code == 0 and doc["ips"][0]["address"] == "10.0.0.1/24"
    assert held(real_kube, "blue")["10.0.0.0/26"] == "node-a"
    assert set(pool(real_kube, "blue-node-a-10.0.0.0-26")["spec"]["allocations"]) == {"1"}
    reservations = [
        r["metadata"]["name"]
        for r in real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace)
    ]
    assert reservations == ["blue-10.0.0.1"]
    assert call(real_kube, tmp_path, "DEL", "p0", "node-a", network_name="blue")[0] == 0
    assert real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace) == []


def test_ipv6_slices(real_kube: RealKube, tmp_path: Path) -> None:
    got = [
        call(real_kube, tmp_path, "ADD", f"p{i}", "node-a", rng="fd00::/120", size="/124") for i in range(3)
    ]
    assert [doc["ips"][0]["address"] for _, doc in got] == ["fd00::1/120", "fd00::2/120", "fd00::3/120"]
    assert held(real_kube)["fd00::/124"] == "node-a" and len(held(real_kube)) == 16
    assert set(pool(real_kube, "node-a-fd00---124")["spec"]["allocations"]) == {"1", "2", "3"}
    assert (
        call(real_kube, tmp_path, "ADD", "q", "node-b", rng="fd00::/120", size="/124")[1]["ips"][0]["address"]
        == "fd00::11/120"
    )
    assert pool(real_kube, "node-b-fd00--10-124")["spec"]["range"] == "fd00::10/124"
    code, doc = call(real_kube, tmp_path, "ADD", "x", "node-a", rng="fd00::/120", size="/20")
    assert code == 1 and doc["code"] == errors.INVALID_CONFIG and "ipam.node_slice_size" in doc["msg"]


def test_reconciler_keeps_the_reservations_of_slice_pools(real_kube: RealKube, tmp_path: Path) -> None:
    ns = real_kube.namespace
    real_kube.apply(
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}, namespace=ns
    )
    for cid, net in (("p0", "blue"), ("p1", "")):
        real_kube.api.put_pod(ns, cid, node="node-a")
        extra = {"network_name": net} if net else {}
        assert call(real_kube, tmp_path, "ADD", cid, "node-a", **extra)[0] == 0
    before = sorted(
        r["metadata"]["name"] for r in real_kube.api.objects("overlappingrangeipreservations", ns)
    )
    assert before == ["10.0.0.1", "blue-10.0.0.1"]
    out = io.StringIO()
    assert reconcile.main(["--kubeconfig", real_kube.kubeconfig_path, "--grace", "0"], out) == 0, (
        out.getvalue()
    )
    assert "reservations_deleted=0" in out.getvalue()
    after = sorted(r["metadata"]["name"] for r in real_kube.api.objects("overlappingrangeipreservations", ns))
    assert after == before


def test_agent_coalesces_per_slice_pool_and_keeps_the_slice_list_warm(
    real_kube: RealKube, tmp_path: Path
) -> None:
    from ipam.agent import Agent

    agent = Agent()
    results: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        env = {
            "CNI_COMMAND": "ADD",
            "CNI_CONTAINERID": f"c{i}",
            "CNI_NETNS": "/x",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"K8S_POD_NAMESPACE={real_kube.namespace};K8S_POD_NAME=c{i}",
        }
        ipam = {
            "type": "whereabouts-py",
            "range": "10.0.0.0/24",
            "node_slice_size": "/28",
            "node_name": "node-a",
            "data_dir": str(tmp_path),
            "kubernetes": {"kubeconfig": real_kube.kubeconfig_path},
        }
        conf = {"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam}
        reply = agent.serve_call({"env": env, "stdin": json.dumps(conf)})
        assert reply["code"] == 0, reply
        with lock:
            results[f"c{i}"] = json.loads(reply["stdout"])["ips"][0]["address"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]  # two /28 slices' worth
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.close()
    assert len(set(results.values())) == 30
    mine = [IPNetwork(s) for s, n in held(real_kube).items() if n == "node-a"]
    assert len(mine) == 3  # 14 addresses a /28 slice: 30 ADDs need three, and no more were claimed
    assert all(any(IPAddress(a.split("/")[0]) in net for net in mine) for a in results.values())
    count = next(s.value for s in agent.metrics.batches.collect()[0].samples if s.name.endswith("_count"))
    assert count < 30  # fewer pool writes than calls: coalesced per slice pool


def test_pool_allocations_are_one_managed_field(real_kube: RealKube, tmp_path: Path) -> None:
    """`x-kubernetes-map-type: atomic`: managedFields do not grow with the leases (a big pool's PUT
    costs the API server about half)."""
    for i in range(5):
        assert call(real_kube, tmp_path, "ADD", f"p{i}", "node-a")[0] == 0
    obj = pool(real_kube, "node-a-10.0.0.0-26")
    assert len(obj["spec"]["allocations"]) == 5
    fields = [f["fieldsV1"] for f in obj["metadata"]["managedFields"] if "fieldsV1" in f]
    assert fields and all(f.get("f:spec", {}).get("f:allocations", {}) == {} for f in fields)


def test_an_add_meeting_a_retired_slice_pool_moves_on(real_kube: RealKube, tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from ipam.store.kubernetes import KubernetesStore

    def add(cid: str) -> str:
        code, doc = call(real_kube, tmp_path, "ADD", cid, "node-a", rng="10.0.0.0/28", size="/30")
        assert code == 0, doc
        return str(doc["ips"][0]["address"])

    for cid in ("a0", "a1", "a2"):
        add(cid)  # two slices: .1 .2 | .5
    for cid in ("a2", "a0", "a1"):
        assert call(real_kube, tmp_path, "DEL", cid, "node-a", rng="10.0.0.0/28", size="/30")[0] == 0
    seen: list[str] = []

    def adds_between_fence_and_free(node: str, slice_range: str) -> None:
        assert (node, slice_range) == ("node-a", "10.0.0.4/30")
        seen.extend(add(cid) for cid in ("x0", "x1", "x2"))  # x2 meets the retired pool of 10.0.0.4/30

    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    later = datetime.now(UTC) + timedelta(seconds=120)
    lines = nodeslices.reclaim_slices(
        store, {"node-a"}, 60, False, later, before_free=adds_between_fence_and_free
    )
    store.close()
    assert lines == ["return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare"]
    assert seen == ["10.0.0.1/28", "10.0.0.2/28", "10.0.0.9/28"]
    assert held(real_kube) == {
        "10.0.0.0/30": "node-a",
        "10.0.0.4/30": "",
        "10.0.0.8/30": "node-a",
        "10.0.0.12/30": "",
    }
    names = sorted(p["metadata"]["name"] for p in real_kube.api.objects("ippools", real_kube.namespace))
    assert names == [
        "node-a-10.0.0.0-30",
        "node-a-10.0.0.8-30",
    ]  # the retired pool was removed after the free


def test_deployed_rbac_is_enough_for_claiming_and_returning_slices(
    real_kube: RealKube, tmp_path: Path
) -> None:
    # deploy/base/rbac.yaml as deployed (Roles in the pools' namespace, the reconciler's ClusterRole),
    # rebased into this test's namespace; token kubeconfigs of the plugin's and reconciler's accounts
    plugin = real_kube.plugin_kubeconfig()
    reconciler = real_kube.reconciler_kubeconfig()
    gone = f"{real_kube.namespace}-gone"
    real_kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": gone}})
    # get + create the NodeSlicePool, create + get + update the pool, create the reservation
    assert call(real_kube, tmp_path, "ADD", "p0", gone, kubeconfig=plugin)[0] == 0
    real_kube.api.put_pod(real_kube.namespace, "p1", node="other")
    assert (
        call(real_kube, tmp_path, "ADD", "p1", "other", kubeconfig=plugin)[0] == 0
    )  # update the NodeSlicePool
    assert call(real_kube, tmp_path, "DEL", "p0", gone, kubeconfig=plugin)[0] == 0
    real_kube.request("DELETE", f"/api/v1/nodes/{gone}")
    out = io.StringIO()
    code = reconcile.main(["--kubeconfig", reconciler, "--grace", "0"], out)
    assert (
        f"return nodeslicepool=net1 slice=10.0.0.0/26 node={gone} reason=node-gone"
        in out.getvalue().splitlines()
    )
    assert held(real_kube)["10.0.0.0/26"] == "" and held(real_kube)["10.0.0.64/26"] == "other"
    assert code == 0, out.getvalue()  # every list, get, update, create and delete it issued was allowed
