"""Node slices on the API test server, where requests can be counted and CRDs swapped: the warm
steady-state ADD costs one pool write (from the agent's memory of the pool) and one reservation; a NodeSlicePool CRD with a
status subresource still gets its claims (written through /status)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.agent import Agent
from ipam.cni import run
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.schema import crd_documents


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def add(kube: KubeHandle, tmp: Path, cid: str, node: str = "node-a", agent: Agent | None = None) -> dict[str, Any]:
    ipam = {"type": "whereabouts-py", "range": "10.0.0.0/24", "node_slice_size": "/28", "node_name": node,
            "data_dir": str(tmp), "kubernetes": {"kubeconfig": kube.kubeconfig_path}}
    conf = {"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": cid, "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={cid}"}
    if agent is not None:
        reply = agent.serve_call({"env": env, "stdin": json.dumps(conf)})
        assert reply["code"] == 0, reply
        got: dict[str, Any] = json.loads(reply["stdout"])
        return got
    out = io.StringIO()
    assert run(env, json.dumps(conf).encode(), out) == 0, out.getvalue()
    doc: dict[str, Any] = json.loads(out.getvalue())
    return doc


def test_warm_add_costs_a_pool_write_and_a_reservation(kube: KubeHandle, tmp_path: Path) -> None:
    """The agent keeps the node's slice list and its slice pools as it last wrote them: a warm ADD
    writes the pool at the remembered version without reading it first."""
    agent = Agent()
    add(kube, tmp_path, "c0", agent=agent)  # claims the slice, creates its pool: the cold path
    kube.api.reset_counts()
    for i in range(1, 5):
        add(kube, tmp_path, f"c{i}", agent=agent)
    agent.close()
    counts = {k: v for k, v in kube.api.counts_snapshot().items() if v}
    assert counts == {
        ("update", "ippools"): 4,
        ("create", "overlappingrangeipreservations"): 4,
    }


def test_claims_go_through_status_when_the_crd_has_a_status_subresource(kube: KubeHandle, tmp_path: Path) -> None:
    docs = crd_documents()
    for doc in docs:
        if doc["spec"]["names"]["plural"] == "nodeslicepools":
            doc["spec"]["versions"][0]["subresources"] = {"status": {}}
    kube.api.use_crds(docs)
    assert add(kube, tmp_path, "a0", "node-a")["ips"][0]["address"] == "10.0.0.1/24"
    nodeslices.forget_cache()
    assert add(kube, tmp_path, "b0", "node-b")["ips"][0]["address"] == "10.0.0.17/24"
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    held = {e["sliceRange"]: e["nodeName"] for e in pool["status"]["allocations"]}
    assert held["10.0.0.0/28"] == "node-a" and held["10.0.0.16/28"] == "node-b" and len(held) == 16


def test_creating_the_node_slice_pool_twice_is_a_conflict_then_the_next_slice(kube: KubeHandle, tmp_path: Path) -> None:
    from collections.abc import Sequence

    from ipam.allocator import Request
    from ipam.cni import make_engine
    from ipam.config import load_config
    from ipam.slices import NodeSlices, SliceEntry
    from ipam.store.kubernetes import KubernetesStore

    class Racing(KubernetesStore):
        hook: Any = None

        def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
            hook, Racing.hook = Racing.hook, None
            if hook is not None:
                hook()  # node-b creates the NodeSlicePool between our read (absent) and our create
            super().write_node_slices(pool, entries)

    Racing.hook = lambda: add(kube, tmp_path / "b", "b0", "node-b")
    store = Racing.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    ipam = {"type": "whereabouts-py", "range": "10.0.0.0/24", "node_slice_size": "/28", "node_name": "node-a",
            "data_dir": str(tmp_path), "kubernetes": {"kubeconfig": kube.kubeconfig_path}}
    cfg = load_config(json.dumps({"cniVersion": "1.0.0", "name": "net1", "ipam": ipam}).encode())
    engine = make_engine(cfg, store)
    got = engine.add(cfg.ranges, Request(container_id="a0", ifname="eth0", podref="ns/a0", node="node-a"))
    assert str(got[0].address) == "10.0.0.17"
    assert engine.stats.conflicts == 1 and kube.api.count("create", "nodeslicepools") == 2  # AlreadyExists
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    held = [(e["nodeName"], e["sliceRange"]) for e in pool["status"]["allocations"] if e["nodeName"]]
    assert held == [("node-b", "10.0.0.0/28"), ("node-a", "10.0.0.16/28")]
    store.close()


def test_reconciler_without_the_node_slice_pool_crd_returns_nothing_and_fails_nothing(kube: KubeHandle) -> None:
    from ipam import reconcile

    kube.api.use_crds([d for d in crd_documents() if d["spec"]["names"]["plural"] != "nodeslicepools"])
    out = io.StringIO()
    assert reconcile.main(["--kubeconfig", kube.kubeconfig_path], out) == 0, out.getvalue()
    assert out.getvalue().splitlines()[-1].endswith("errors=0")
    assert kube.api.count("list", "nodes") == 0  # no NodeSlicePools: nodes are not even listed


def test_a_node_claims_its_next_slice_with_one_patch_and_no_read_first(kube: KubeHandle, tmp_path: Path) -> None:
    """The agent remembers the NodeSlicePool as its last claim left it: the next claim is a JSON
    patch testing that one entry (still that slice, still free), with no read of the whole object
    before it. (The one read is the check after creating the slice's pool that reclaim has not
    returned the slice meanwhile.)"""
    agent = Agent()
    for i in range(14):  # the first /28 slice: 14 addresses
        add(kube, tmp_path, f"c{i}", agent=agent)
    kube.api.reset_counts()
    assert add(kube, tmp_path, "c14", agent=agent)["ips"][0]["address"] == "10.0.0.17/24"
    agent.close()
    counts = {k: v for k, v in kube.api.counts_snapshot().items() if v and k[1] == "nodeslicepools"}
    assert counts == {("patch", "nodeslicepools"): 1, ("get", "nodeslicepools"): 1}
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    assert [e["sliceRange"] for e in pool["status"]["allocations"] if e["nodeName"] == "node-a"] == [
        "10.0.0.0/28", "10.0.0.16/28",
    ]  # fmt: skip


def test_a_claim_from_a_stale_memory_is_refused_and_the_next_free_slice_taken(kube: KubeHandle, tmp_path: Path) -> None:
    """node-a remembers slice 2 as free; node-b has taken it since. node-a's patch tests the entry,
    is refused (never a slice held twice), and node-a tries the next free slice of the same view, so
    nodes starting together do not each read the whole NodeSlicePool after every lost race."""
    node_a, node_b = Agent(), Agent()
    for i in range(14):
        add(kube, tmp_path / "a", f"a{i}", "node-a", agent=node_a)
    assert add(kube, tmp_path / "b", "b0", "node-b", agent=node_b)["ips"][0]["address"] == "10.0.0.17/24"
    kube.api.reset_counts()
    assert add(kube, tmp_path / "a", "a14", "node-a", agent=node_a)["ips"][0]["address"] == "10.0.0.33/24"
    node_a.close()
    node_b.close()
    counts = {k: v for k, v in kube.api.counts_snapshot().items() if v and k[1] == "nodeslicepools"}
    assert counts == {("patch", "nodeslicepools"): 2, ("get", "nodeslicepools"): 1}
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    held = [(e["nodeName"], e["sliceRange"]) for e in pool["status"]["allocations"] if e["nodeName"]]
    assert held == [("node-a", "10.0.0.0/28"), ("node-b", "10.0.0.16/28"), ("node-a", "10.0.0.32/28")]


def test_a_claim_patch_refused_on_a_fresh_read_falls_back_to_writing_the_whole_object(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """A NodeSlicePool whose entry the patch's tests cannot match (however it is laid out): after one
    refusal on what was just read, the claim writes the object at the version read, as before."""
    from ipam.allocator import Request
    from ipam.cni import make_engine
    from ipam.config import load_config
    from ipam.errors import ConflictError
    from ipam.slices import NodeSlices
    from ipam.store.kubernetes import KubernetesStore

    class NoPatch(KubernetesStore):
        def claim_node_slice(self, pool: NodeSlices, index: int, node: str) -> NodeSlices:
            raise ConflictError("the object is no longer as the patch's tests expect")

    store = NoPatch.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    ipam = {"type": "whereabouts-py", "range": "10.0.0.0/24", "node_slice_size": "/28", "node_name": "node-a",
            "data_dir": str(tmp_path), "kubernetes": {"kubeconfig": kube.kubeconfig_path}}
    cfg = load_config(json.dumps({"cniVersion": "1.0.0", "name": "net1", "ipam": ipam}).encode())
    add(kube, tmp_path / "b", "b0", "node-b")  # the NodeSlicePool exists: a claim patches, then writes
    engine = make_engine(cfg, store)
    got = engine.add(cfg.ranges, Request(container_id="a0", ifname="eth0", podref="ns/a0", node="node-a"))
    store.close()
    assert str(got[0].address) == "10.0.0.17"
    assert kube.api.count("update", "nodeslicepools") == 1  # node-b created it; node-a wrote it whole


def test_after_three_refused_claims_the_node_slice_pool_is_read_again(kube: KubeHandle, tmp_path: Path) -> None:
    """Every slice node-a remembers as free was taken since: three refusals from one view, then a
    read, then the claim of a slice that is really free."""
    node_a = Agent()
    for i in range(14):
        add(kube, tmp_path / "a", f"a{i}", "node-a", agent=node_a)
    for n in "bcde":  # four other nodes (direct mode: a client and memory of their own) take slices 2-5
        add(kube, tmp_path / n, f"{n}0", f"node-{n}")
    kube.api.reset_counts()
    assert add(kube, tmp_path / "a", "a14", "node-a", agent=node_a)["ips"][0]["address"] == "10.0.0.81/24"
    node_a.close()
    # slices 2, 3, 4 refused from memory; the read shows 5 taken too; slice 6 claimed; then the check read
    assert kube.api.count("patch", "nodeslicepools") == 4 and kube.api.count("get", "nodeslicepools") == 2
