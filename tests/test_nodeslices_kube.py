"""Node slices on the API test server, where requests can be counted and CRDs swapped: the warm
steady-state ADD costs one pool write (from the agent's memory of the pool), one reservation (none
without reservations) and a GET of the NodeSlicePool's metadata; a NodeSlicePool CRD with a
status subresource still gets its claims (written through /status)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices, slicestate
from ipam.agent import Agent
from ipam.cni import run
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.schema import crd_documents


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def add(
    kube: KubeHandle, tmp: Path, cid: str, node: str = "node-a", agent: Agent | None = None, **extra: Any
) -> dict[str, Any]:
    ipam = {
        "type": "whereabouts-py",
        "range": "10.0.0.0/24",
        "node_slice_size": "/28",
        "node_name": node,
        "data_dir": str(tmp),
        "kubernetes": {"kubeconfig": kube.kubeconfig_path},
        **extra,
    }
    conf = {"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam}
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={cid}",
    }
    if agent is not None:
        reply = agent.serve_call({"env": env, "stdin": json.dumps(conf)})
        assert reply["code"] == 0, reply
        got: dict[str, Any] = json.loads(reply["stdout"])
        return got
    out = io.StringIO()
    assert run(env, json.dumps(conf).encode(), out) == 0, out.getvalue()
    doc: dict[str, Any] = json.loads(out.getvalue())
    return doc


def test_warm_add_costs_a_pool_write_a_reservation_and_a_check(kube: KubeHandle, tmp_path: Path) -> None:
    """The agent keeps the node's slice list and its slice pools as it last wrote them: a warm ADD
    writes the pool at the remembered version without reading it first, reserves the address, and
    reads the NodeSlicePool's metadata after the write (uid and version unchanged: the slice list as
    read, the slice still the node's). The check is made with reservations on too: a reservation keeps
    an address only from writers that make one."""
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
        ("get-metadata", "nodeslicepools"): 4,
    }


def test_without_reservations_every_warm_add_checks_the_slice_is_still_the_nodes(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """Without reservations nothing else keeps a lost slice's address from two pods: after each lease
    write the NodeSlicePool's metadata is read (uid and version unchanged: the slice list as read)."""
    agent = Agent()
    add(kube, tmp_path, "c0", agent=agent, enable_overlapping_ranges=False)
    kube.api.reset_counts()
    for i in range(1, 5):
        add(kube, tmp_path, f"c{i}", agent=agent, enable_overlapping_ranges=False)
    agent.close()
    counts = {k: v for k, v in kube.api.counts_snapshot().items() if v}
    assert counts == {("update", "ippools"): 4, ("get-metadata", "nodeslicepools"): 4}


def test_claims_go_through_status_when_the_crd_has_a_status_subresource(
    kube: KubeHandle, tmp_path: Path
) -> None:
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


def test_creating_the_node_slice_pool_twice_is_a_conflict_then_the_next_slice(
    kube: KubeHandle, tmp_path: Path
) -> None:
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
    ipam = {
        "type": "whereabouts-py",
        "range": "10.0.0.0/24",
        "node_slice_size": "/28",
        "node_name": "node-a",
        "data_dir": str(tmp_path),
        "kubernetes": {"kubeconfig": kube.kubeconfig_path},
    }
    cfg = load_config(json.dumps({"cniVersion": "1.0.0", "name": "net1", "ipam": ipam}).encode())
    engine = make_engine(cfg, store)
    got = engine.add(cfg.ranges, Request(container_id="a0", ifname="eth0", podref="ns/a0", node="node-a"))
    assert str(got[0].address) == "10.0.0.17"
    assert engine.stats.conflicts == 1 and kube.api.count("create", "nodeslicepools") == 2  # AlreadyExists
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    held = [(e["nodeName"], e["sliceRange"]) for e in pool["status"]["allocations"] if e["nodeName"]]
    assert held == [("node-b", "10.0.0.0/28"), ("node-a", "10.0.0.16/28")]
    store.close()


def test_reconciler_without_the_node_slice_pool_crd_returns_nothing_and_fails_nothing(
    kube: KubeHandle,
) -> None:
    from ipam import reconcile

    kube.api.use_crds([d for d in crd_documents() if d["spec"]["names"]["plural"] != "nodeslicepools"])
    out = io.StringIO()
    assert reconcile.main(["--kubeconfig", kube.kubeconfig_path], out) == 0, out.getvalue()
    assert out.getvalue().splitlines()[-1].endswith("errors=0")
    assert kube.api.count("list", "nodes") == 0  # no NodeSlicePools: nodes are not even listed


def test_a_claim_whose_answer_was_lost_is_found_and_no_second_slice_taken(
    kube: KubeHandle, tmp_path: Path
) -> None:
    agent = Agent()
    for i in range(14):  # the first /28 slice: 14 addresses
        add(kube, tmp_path, f"c{i}", agent=agent)
    # the claim's write is carried out, its answer lost: the next attempt reads and finds the slice ours
    kube.api.set_faults(methods=frozenset({"PUT"}), resources=frozenset({"nodeslicepools"}),
                        drop_after_rate=1.0, max_hits=1)  # fmt: skip
    assert add(kube, tmp_path, "c14", agent=agent)["ips"][0]["address"] == "10.0.0.17/24"
    agent.close()
    [pool] = kube.api.objects("nodeslicepools", "kube-system")
    assert [e["sliceRange"] for e in pool["status"]["allocations"] if e["nodeName"] == "node-a"] == [
        "10.0.0.0/28", "10.0.0.16/28",
    ]  # fmt: skip


def test_a_call_arriving_while_another_call_claims_uses_the_claimers_list(
    kube: KubeHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of the same agent arriving while another claims does not read the whole NodeSlicePool
    itself: it uses the list the claim leaves (a guard on behaviour; which path it takes depends on
    whether the claimer could vouch for its remembered list, see Slicer._read and _claim)."""
    import threading
    from collections.abc import Sequence
    from contextlib import AbstractContextManager

    from ipam.slices import NodeSlices, SliceEntry
    from ipam.store.kubernetes import KubernetesStore

    agent = Agent()
    for i in range(14):  # the first /28 slice: 14 addresses; the next ADD claims
        add(kube, tmp_path, f"c{i}", agent=agent)
    waiting = threading.Event()
    original_waiting = nodeslices._waiting

    def spy_waiting(lock: threading.Lock, engine: Any, deadline: float) -> AbstractContextManager[None]:
        claims = [c for state in slicestate.STATE.values() for c in state.claims.values()]
        if threading.current_thread().name == "late" and any(lock is c for c in claims):
            waiting.set()
        return original_waiting(lock, engine, deadline)

    monkeypatch.setattr(nodeslices, "_waiting", spy_waiting)
    original_write = KubernetesStore.write_node_slices
    late: list[dict[str, Any]] = []

    def write_node_slices(store: KubernetesStore, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        if not late and threading.current_thread().name != "late":
            thread = threading.Thread(
                target=lambda: late.append(add(kube, tmp_path, "c15", agent=agent)), name="late"
            )
            thread.start()
            assert waiting.wait(10)  # the late call is waiting for this claim, not reading
            late.append({})
        original_write(store, pool, entries)

    monkeypatch.setattr(KubernetesStore, "write_node_slices", write_node_slices)
    kube.api.reset_counts()
    claimed = add(kube, tmp_path, "c14", agent=agent)
    for t in threading.enumerate():
        if t.name == "late":
            t.join(10)
    agent.close()
    assert {claimed["ips"][0]["address"], late[1]["ips"][0]["address"]} == {"10.0.0.17/24", "10.0.0.18/24"}
    # the claim's own read and the read after creating the slice pool: none by the late call
    assert kube.api.count("get", "nodeslicepools") == 2


def test_the_first_add_into_a_newly_claimed_slice_reads_no_slice_pool(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """The agent remembers the slice pool it has just created (empty, at the version the create
    answered): the ADD that claimed the slice writes its lease there without a GET, and so does the
    owner search of the ADDs after it."""
    agent = Agent()
    for i in range(14):  # the first /28 slice: 14 addresses
        add(kube, tmp_path, f"c{i}", agent=agent)
    kube.api.reset_counts()
    assert add(kube, tmp_path, "c14", agent=agent)["ips"][0]["address"] == "10.0.0.17/24"
    assert add(kube, tmp_path, "c15", agent=agent)["ips"][0]["address"] == "10.0.0.18/24"
    agent.close()
    counts = {k: v for k, v in kube.api.counts_snapshot().items() if v}
    assert counts == {
        ("get", "ippools"): 1,  # the first slice, remembered full: looked at once before claiming
        ("get", "nodeslicepools"): 2,  # the claim's read, and the check after creating the slice pool
        ("get-metadata", "nodeslicepools"): 2,  # after each lease write: the slice still this node's
        ("update", "nodeslicepools"): 1,
        ("create", "writerturns"): 1,  # the claim under the NodeSlicePool's writer turn (ipam.turns)
        ("delete", "writerturns"): 1,
        ("create", "ippools"): 1,
        ("update", "ippools"): 2,
        ("create", "overlappingrangeipreservations"): 2,
    }
