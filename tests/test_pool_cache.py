"""The node agent writes a pool at the version it last wrote, without reading it first (PoolCache).

A stale memory must cost a refused write and a re-read, never a wrong answer: another process of the
node (a direct-mode fallback) or the reconciler may have changed the pool meanwhile. Each case runs
with node slices (the pools only this node writes) and on one shared pool, on both API servers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.agent import Agent
from ipam.cni import run
from ipam.engine import DISTRUST_SECONDS, PoolCache
from ipam.store.base import PoolSnapshot
from tests.kubeapi.fixtures import K8s, KubeHandle


@pytest.fixture(autouse=True)
def _cold_slice_cache() -> None:
    nodeslices.forget_cache()


def netconf(k8s: K8s | KubeHandle, tmp: Path, sliced: bool) -> str:
    ipam: dict[str, Any] = {
        "type": "whereabouts-py",
        "range": "10.0.0.0/24",
        "node_name": "node-a",
        "data_dir": str(tmp),
        "kubernetes": {"kubeconfig": k8s.kubeconfig_path},
    }
    if sliced:
        ipam["node_slice_size"] = "/28"
    return json.dumps({"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam})


def call(conf: str, command: str, cid: str, agent: Agent | None) -> dict[str, Any]:
    """One CNI call through the agent, or in this process (direct mode: no memory of pools)."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={cid}"}  # fmt: skip
    if agent is not None:
        reply = agent.serve_call({"env": env, "stdin": conf})
        assert reply["code"] == 0, reply
        text = str(reply["stdout"])
    else:
        out = io.StringIO()
        assert run(env, conf.encode(), out) == 0, out.getvalue()
        text = out.getvalue()
    return json.loads(text) if text.strip() else {}


def leases(k8s: K8s | KubeHandle, namespace: str) -> dict[str, str]:
    """container id -> address, over every IPPool of the namespace."""
    out: dict[str, str] = {}
    for pool in k8s.api.objects("ippools", namespace):
        base = pool["spec"]["range"].split("/")[0].rsplit(".", 1)
        for offset, lease in (pool["spec"].get("allocations") or {}).items():
            assert lease["id"] not in out, f"{lease['id']} holds two leases"
            out[lease["id"]] = f"{base[0]}.{int(base[1]) + int(offset)}"
    return out


def namespace_of(k8s: K8s | KubeHandle) -> str:
    return str(getattr(k8s, "namespace", "kube-system"))


def address(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"]).split("/")[0]


@pytest.mark.parametrize("sliced", [True, False], ids=["slices", "one-pool"])
def test_a_pool_another_process_wrote_meanwhile_is_read_again_and_keeps_its_lease(
    k8s: K8s, tmp_path: Path, sliced: bool
) -> None:
    conf, agent = netconf(k8s, tmp_path, sliced), Agent()
    try:
        a0 = call(conf, "ADD", "a0", agent)  # the agent now remembers the pool as it wrote it
        b0 = call(conf, "ADD", "b0", None)  # direct mode on the same node writes the same pool
        a1 = call(conf, "ADD", "a1", agent)  # written from memory: refused, read again, written
    finally:
        agent.close()
    got = leases(k8s, namespace_of(k8s))
    assert got == {"a0": address(a0), "b0": address(b0), "a1": address(a1)}
    assert len(set(got.values())) == 3


@pytest.mark.parametrize("sliced", [True, False], ids=["slices", "one-pool"])
def test_a_repeated_add_whose_lease_was_removed_meanwhile_gets_a_lease_that_exists(
    k8s: K8s, tmp_path: Path, sliced: bool
) -> None:
    """From memory the repeat would be answered with the old lease and nothing written: a decision
    that writes nothing is made again on a fresh read."""
    conf, agent = netconf(k8s, tmp_path, sliced), Agent()
    try:
        first = call(conf, "ADD", "a0", agent)
        call(conf, "DEL", "a0", None)  # removed by another process (the reconciler would do the same)
        again = call(conf, "ADD", "a0", agent)
    finally:
        agent.close()
    assert leases(k8s, namespace_of(k8s)) == {"a0": address(again)}
    assert address(again) == address(first)  # the lowest free address once more, and now leased


@pytest.mark.parametrize("sliced", [True, False], ids=["slices", "one-pool"])
def test_a_del_of_a_lease_the_agent_never_saw_releases_it(k8s: K8s, tmp_path: Path, sliced: bool) -> None:
    conf, agent = netconf(k8s, tmp_path, sliced), Agent()
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "b0", None)  # not in the agent's memory of the pool
        call(conf, "DEL", "b0", agent)
    finally:
        agent.close()
    assert set(leases(k8s, namespace_of(k8s))) == {"a0"}


def test_a_write_by_another_process_of_the_node_is_noticed_without_a_refused_write(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """It took the pool's node lock in between (the lock's generation moved on): the agent reads."""
    conf, agent = netconf(kube, tmp_path, sliced=False), Agent()
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "b0", None)  # direct mode, same node: same lock directory
        kube.api.reset_counts()
        call(conf, "ADD", "a1", agent)
        counts = {k: v for k, v in kube.api.counts_snapshot().items() if v and k[1] == "ippools"}
    finally:
        agent.close()
    assert counts == {("get", "ippools"): 1, ("update", "ippools"): 1}


def test_after_a_refused_write_from_memory_the_pool_is_read_before_writing(
    kube: KubeHandle, tmp_path: Path
) -> None:
    conf, agent = netconf(kube, tmp_path, sliced=False), Agent()
    other_node = netconf(kube, tmp_path / "other-node", sliced=False)  # its own lock directory
    try:
        call(conf, "ADD", "a0", agent)
        call(other_node, "ADD", "b0", None)
        kube.api.reset_counts()
        call(conf, "ADD", "a1", agent)  # from memory: refused (409), then read and written
        refused = {k: v for k, v in kube.api.counts_snapshot().items() if v and k[1] == "ippools"}
        kube.api.reset_counts()
        call(conf, "ADD", "a2", agent)  # another writer is active: read first, no refused write
        after = {k: v for k, v in kube.api.counts_snapshot().items() if v and k[1] == "ippools"}
    finally:
        agent.close()
    assert refused == {("get", "ippools"): 1, ("update", "ippools"): 2, ("conflict", "ippools"): 1}
    assert after == {("get", "ippools"): 1, ("update", "ippools"): 1}


def test_pool_cache_trusts_a_pool_again_only_after_the_distrust_window() -> None:
    now = [100.0]
    cache = PoolCache(clock=lambda: now[0], limit=2)
    snap = PoolSnapshot("p", "10.0.0.0/24", {}, "7")
    cache.remember("p", snap)
    assert cache.trusted("p") is snap
    cache.refused("p")
    assert cache.trusted("p") is None
    cache.remember("p", PoolSnapshot("p", "10.0.0.0/24", {}, "9"))  # written after reading it
    now[0] += DISTRUST_SECONDS - 0.1
    assert cache.trusted("p") is None
    now[0] += 0.2
    trusted = cache.trusted("p")
    assert trusted is not None and trusted.version == "9"
    cache.remember("p", None)  # a store that gives no answer forgets the pool
    assert cache.trusted("p") is None
    for name in ("a", "b", "c"):  # bounded: the oldest remembered goes first
        cache.remember(name, PoolSnapshot(name, "10.0.0.0/24", {}, "1"))
    assert cache.trusted("a") is None and cache.trusted("c") is not None


def slices_held(k8s: K8s | KubeHandle, node: str = "node-a") -> list[str]:
    [nsp] = k8s.api.objects("nodeslicepools", namespace_of(k8s))
    return [e["sliceRange"] for e in nsp["status"]["allocations"] if e["nodeName"] == node]


def test_a_repeated_add_finds_its_lease_in_a_later_slice_another_process_wrote(
    k8s: K8s, tmp_path: Path
) -> None:
    """The agent remembers its slice pools, but a direct-mode call of the node wrote the pod's lease
    into the second slice: the owner search must not trust the memory of that pool (its node lock
    was taken by another process since), or the repeat would get a second address in the first."""
    conf, agent = netconf(k8s, tmp_path, sliced=True), Agent()
    try:
        for i in range(14):  # the first /28 slice: 14 addresses
            call(conf, "ADD", f"f{i}", agent)
        call(conf, "ADD", "g0", agent)  # claims the second slice; the agent remembers its pool
        mine = call(conf, "ADD", "p0", None)  # direct mode: into the second slice
        call(
            conf, "DEL", "f3", None
        )  # room in the first slice again (the agent takes no lock of either pool)
        again = call(conf, "ADD", "p0", agent)
    finally:
        agent.close()
    assert address(again) == address(mine)
    assert list(leases(k8s, namespace_of(k8s))).count("p0") == 1
    assert len(slices_held(k8s)) == 2


def test_a_slice_remembered_full_is_looked_at_again_before_a_new_slice_is_claimed(
    k8s: K8s, tmp_path: Path
) -> None:
    """The reconciler (not on this node, so no node lock) freed an address in the node's only slice:
    the agent passes the slice as full from memory, but reads it before claiming another."""
    conf, agent = netconf(k8s, tmp_path, sliced=True), Agent()
    try:
        for i in range(14):
            call(conf, "ADD", f"f{i}", agent)
        namespace = namespace_of(k8s)
        [pool] = [p for p in k8s.api.objects("ippools", namespace) if p["spec"]["allocations"]]
        gone = next(k for k, v in pool["spec"]["allocations"].items() if v["id"] == "f5")
        del pool["spec"]["allocations"][gone]
        pool["metadata"].pop("managedFields", None)
        name = pool["metadata"]["name"]
        path = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{namespace}/ippools/{name}"
        _request(k8s, "PUT", path, pool)
        base = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{namespace}/overlappingrangeipreservations"
        _request(k8s, "DELETE", f"{base}/10.0.0.{gone}")  # the reconciler releases both
        got = call(conf, "ADD", "late", agent)
    finally:
        agent.close()
    assert slices_held(k8s) == ["10.0.0.0/28"]  # no second slice taken
    assert leases(k8s, namespace_of(k8s))["late"] == address(got)


def _request(k8s: K8s | KubeHandle, method: str, path: str, body: dict[str, Any] | None = None) -> None:
    """A change by someone else than the node (the reconciler, an administrator)."""
    request = getattr(k8s, "request", None)
    if request is not None:  # the real server's admin client
        request(method, path, body)
        return
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(k8s.url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as answer:
        assert answer.status == 200


def test_pool_cache_trusts_a_read_only_decision_only_while_no_other_process_took_the_node_lock() -> None:
    cache = PoolCache()
    snap = PoolSnapshot("p", "10.0.0.0/28", {}, "3")
    cache.acquired("p", 5)
    cache.remember("p", snap)
    assert cache.unchanged("p", 5) is snap
    assert cache.unchanged("p", 6) is None  # another process of the node took the lock since
    assert cache.unchanged("p", None) is None  # a store that does not count
    cache.acquired("p", 6)  # this process again, next in line: the memory stands
    assert cache.unchanged("p", 6) is snap
    cache.acquired("p", 8)  # someone held it as 7: whatever they wrote is not remembered here
    assert cache.unchanged("p", 8) is None and cache.trusted("p") is None


def test_the_node_lock_counts_its_holders(tmp_path: Path) -> None:
    from ipam.store.locks import pool_generation, pool_lock

    lock_dir = str(tmp_path / "locks")
    assert pool_generation(lock_dir, "p") is None  # never taken
    with pool_lock(lock_dir, "p", 1.0) as first:
        assert pool_generation(lock_dir, "p") == first
    with pool_lock(lock_dir, "p", 1.0) as second:
        assert second == first + 1
    assert pool_generation(lock_dir, "p") == second and pool_generation(lock_dir, "q") is None
