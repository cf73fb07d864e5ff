"""Races and faults against the agent's memory of pools (PoolCache) and of the node's slices.

Breaks found (each test failed before its fix): a repeated ADD whose lease sits in a slice another
process of the node claimed took a second address from the agent's stale slice list; a DEL and an
ADD of the same container served in one batch left the ADD's address without its reservation.
The other cases (a pool deleted and recreated, a lost answer, a pruning CRD, a reclaimed slice, an
evicted datastore client) held: they guard the claim that a stale memory costs a refused write only.
"""

from __future__ import annotations

import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.agent import Agent, StoreCache
from ipam.allocator import Lease
from ipam.cni import run
from ipam.store.base import PoolSnapshot
from ipam.store.file import FileStore
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import K8s, KubeHandle
from tests.kubeapi.schema import whereabouts_crds


@pytest.fixture(autouse=True)
def _cold_slice_cache() -> None:
    nodeslices.forget_cache()


def netconf(k8s: K8s | KubeHandle, tmp: Path, **extra: Any) -> str:
    ipam: dict[str, Any] = {"type": "whereabouts-py", "range": "10.0.0.0/28", "node_name": "node-a",
                            "data_dir": str(tmp), "kubernetes": {"kubeconfig": k8s.kubeconfig_path}, **extra}  # fmt: skip
    return json.dumps({"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam})


def call(
    conf: str,
    command: str,
    cid: str,
    agent: Agent | None,
    ok: bool | None = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One CNI call through the agent (`timeout`: the shim's wait), or in this process (direct mode:
    another process of the node). `ok` None: either outcome."""
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/x", "CNI_IFNAME": "eth0",
           "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={cid}"}  # fmt: skip
    if agent is not None:
        request: dict[str, Any] = {"env": env, "stdin": conf}
        if timeout is not None:
            request["timeout"] = timeout
        reply = agent.serve_call(request)
        code, text = reply["code"], str(reply["stdout"])
    else:
        out = io.StringIO()
        code, text = run(env, conf.encode(), out), out.getvalue()
    if ok is not None:
        assert (code == 0) == ok, text
    return json.loads(text) if text.strip() else {}


def held(k8s: K8s | KubeHandle) -> list[tuple[str, str]]:
    """(container id, pool+offset) of every lease in the test's namespace."""
    out = []
    for pool in k8s.api.objects("ippools", str(getattr(k8s, "namespace", "kube-system"))):
        for offset, lease in (pool["spec"].get("allocations") or {}).items():
            out.append((lease["id"], f"{pool['metadata']['name']}+{offset}"))
    return sorted(out)


def addr(result: dict[str, Any]) -> str:
    return str(result["ips"][0]["address"])


def admin(k8s: K8s | KubeHandle, tmp: Path) -> KubernetesStore:
    return KubernetesStore.connect(k8s.kubeconfig_path, str(tmp / "admin-locks"))


# -- breaks ----------------------------------------------------------------------------------------


def test_a_repeated_add_finds_its_lease_in_a_slice_another_process_of_the_node_claimed(
    k8s: K8s, tmp_path: Path
) -> None:
    """The agent's slice list is [s1]; a direct-mode call claims s2 and leases c there; s1 gets room
    again. The agent's repeat of c's ADD must find c's lease in s2, not take a second address in s1:
    a claim by any process of the node makes the agent read the NodeSlicePool again."""
    conf, agent = netconf(k8s, tmp_path, node_slice_size="/30"), Agent()
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "a1", agent)  # s1 (.1 .2) full; the agent's cached slice list: [s1]
        first = call(conf, "ADD", "c", None)  # direct mode (the shim's fallback) claims s2
        call(conf, "DEL", "a0", agent)  # room in s1 again
        again = call(conf, "ADD", "c", agent)
    finally:
        agent.close()
    assert addr(first) == addr(again) == "10.0.0.5/28"
    assert [h for h in held(k8s) if h[0] == "c"] == [("c", "node-a-10.0.0.4-30+1")]


class Gate:
    """Pauses the next pool write (the pool's batch in flight) until `release` is set."""

    def __init__(self) -> None:
        self.armed, self.entered, self.release = False, threading.Event(), threading.Event()

    def wrap(self, original: Any) -> Any:
        def write_pool(store: Any, snapshot: PoolSnapshot, allocations: Any) -> Any:
            if self.armed:
                self.armed = False
                self.entered.set()
                assert self.release.wait(10)
            return original(store, snapshot, allocations)

        return write_pool


@pytest.mark.parametrize("datastore", ["kubernetes", "file"])
def test_a_del_and_an_add_of_the_same_container_in_one_batch_leave_the_add_its_reservation(
    kube: KubeHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, datastore: str
) -> None:
    """DEL c then ADD c queue behind a batch in flight and are served by one write: the ADD gets
    c's address back and reserves it (already c's); the DEL's caller then gave back the reservation
    of the address it released, held by c: the ADD's address was left unreserved (an overlapping
    range could hand it out again)."""
    conf, agent, gate = netconf(kube, tmp_path, datastore=datastore), Agent(), Gate()
    cls = KubernetesStore if datastore == "kubernetes" else FileStore
    monkeypatch.setattr(cls, "write_pool", gate.wrap(cls.write_pool))
    results: dict[str, dict[str, Any]] = {}

    def queued() -> int:
        return sum(q.qsize() for q in agent.coalescer.queues.values())

    def start(key: str, command: str, cid: str) -> threading.Thread:
        before = queued()
        thread = threading.Thread(target=lambda: results.setdefault(key, call(conf, command, cid, agent)))
        thread.start()
        for _ in range(2000):  # until its op is queued behind the batch in flight (bounded poll)
            if key == "z" or queued() > before:
                return thread
            threading.Event().wait(0.005)
        raise AssertionError(f"{key} never queued")

    try:
        assert addr(call(conf, "ADD", "c", agent)) == "10.0.0.1/28"
        gate.armed = True
        threads = [start("z", "ADD", "z")]
        assert gate.entered.wait(10)
        threads += [start("del", "DEL", "c"), start("add", "ADD", "c")]
        gate.release.set()
        for thread in threads:
            thread.join(10)
    finally:
        agent.close()
    assert addr(results["add"]) == "10.0.0.1/28"
    if datastore == "kubernetes":
        leases = dict(held(kube))
        reservations = [
            r["metadata"]["name"] for r in kube.api.objects("overlappingrangeipreservations", "kube-system")
        ]
    else:
        doc = json.loads((tmp_path / "pools" / "10.0.0.0-28.json").read_text())
        leases = {v["id"]: k for k, v in doc["spec"]["allocations"].items()}
        reservations = [p.stem for p in (tmp_path / "reservations").glob("*.json")]
    assert set(leases) == {"c", "z"}
    assert sorted(reservations) == ["10.0.0.1", "10.0.0.2"]


def test_a_call_whose_deadline_passed_in_the_queue_is_not_served(
    kube: KubeHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent's DEL of c waits in the pool's queue behind a slow batch until past its deadline:
    the shim has given up and run the DEL in direct mode, and the runtime has ADDed c again (a
    runtime that reuses container ids, e.g. podman's restart). Served late, the stale DEL would take
    the new lease of a successful ADD (invariant 3): a ticket whose deadline passed is answered
    with an error instead."""
    from ipam import cni
    from ipam.engine import Engine

    skew = [0.0]
    make_engine = cni.make_engine

    def skewed(cfg: Any, store: Any) -> Engine:
        engine = make_engine(cfg, store)
        engine.clock = lambda: time.monotonic() + skew[0]
        return engine

    monkeypatch.setattr(cni, "make_engine", skewed)
    gate, batch = Gate(), Engine.apply_batch

    def gated(engine: Engine, *args: Any, **kwargs: Any) -> None:
        if gate.armed:
            gate.armed = False
            gate.entered.set()
            assert gate.release.wait(10)
        batch(engine, *args, **kwargs)

    monkeypatch.setattr(Engine, "apply_batch", gated)
    conf, agent = netconf(kube, tmp_path), Agent()
    results: dict[str, dict[str, Any]] = {}
    try:
        assert addr(call(conf, "ADD", "c", agent)) == "10.0.0.1/28"
        gate.armed = True
        slow = threading.Thread(target=lambda: results.setdefault("z", call(conf, "ADD", "z", agent)))
        slow.start()
        assert gate.entered.wait(10)  # the pool's worker is busy with z's batch
        stale = threading.Thread(
            target=lambda: results.setdefault("del", call(conf, "DEL", "c", agent, ok=None, timeout=31.0))
        )
        stale.start()
        for _ in range(2000):  # until the DEL is queued (bounded poll)
            if sum(q.qsize() for q in agent.coalescer.queues.values()):
                break
            threading.Event().wait(0.005)
        skew[0] += 60.0  # past the DEL's deadline (1 s) and the shim's wait (31 s)
        call(conf, "DEL", "c", None)  # the shim's fallback
        assert addr(call(conf, "ADD", "c", None)) == "10.0.0.1/28"  # c again, answered: its lease must stay
        gate.release.set()
        slow.join(10)
        stale.join(10)
    finally:
        agent.close()
    assert dict(held(kube)) == {"c": "10.0.0.0-28+1", "z": "10.0.0.0-28+2"}
    assert sorted(
        r["metadata"]["name"] for r in kube.api.objects("overlappingrangeipreservations", "kube-system")
    ) == [
        "10.0.0.1",
        "10.0.0.2",
    ]
    assert results["del"].get("code") == 11  # try again later: the runtime's retry finds c's lease state anew


# -- what held -------------------------------------------------------------------------------------


@pytest.mark.parametrize("sliced", [True, False], ids=["slices", "one-pool"])
def test_a_pool_deleted_and_recreated_meanwhile_is_not_written_from_memory(
    k8s: K8s, tmp_path: Path, sliced: bool
) -> None:
    extra = {"node_slice_size": "/30"} if sliced else {}
    conf, agent, store = netconf(k8s, tmp_path, **extra), Agent(), admin(k8s, tmp_path)
    name, cidr = ("node-a-10.0.0.0-30", "10.0.0.0/30") if sliced else ("10.0.0.0-28", "10.0.0.0/28")
    try:
        assert addr(call(conf, "ADD", "a0", agent)) == "10.0.0.1/28"
        store.delete_pool(name, str(store.read_pool(name, cidr).version))
        store.write_pool(
            PoolSnapshot(name, cidr, {}, None), {1: Lease("zz", "ns/zz", "eth0")}
        )  # same name, new object
        again = call(conf, "ADD", "a1", agent)
    finally:
        agent.close()
        store.close()
    assert addr(again) == "10.0.0.2/28"
    assert held(k8s) == [("a1", f"{name}+2"), ("zz", f"{name}+1")]


def test_a_lost_answer_to_a_write_from_memory_costs_a_refused_write(kube: KubeHandle, tmp_path: Path) -> None:
    conf, agent = netconf(kube, tmp_path), Agent()
    try:
        call(conf, "ADD", "a0", agent)
        kube.api.set_faults(drop_after_rate=1.0, methods={"PUT"}, resources={"ippools"}, max_hits=1)
        got = [addr(call(conf, "ADD", "a1", agent))]  # written, answer lost: memory one version behind
        assert kube.api.fault_hits >= 1
        got.append(addr(call(conf, "ADD", "b0", None)))
        got.append(addr(call(conf, "ADD", "a2", agent)))
        call(conf, "DEL", "a1", agent)
        got.append(addr(call(conf, "ADD", "a3", agent)))
    finally:
        agent.close()
    assert got == ["10.0.0.2/28", "10.0.0.3/28", "10.0.0.4/28", "10.0.0.2/28"]
    assert [h[0] for h in held(kube)] == ["a0", "a2", "a3", "b0"]


def test_a_pruning_crd_and_a_multi_range_rollback_through_the_agent(kube: KubeHandle, tmp_path: Path) -> None:
    kube.api.use_crds(whereabouts_crds())
    conf, agent = netconf(kube, tmp_path, ipRanges=[{"range": "10.9.0.0/30"}]), Agent()
    try:
        call(conf, "ADD", "a0", agent)
        call(conf, "ADD", "a1", agent)
        call(conf, "ADD", "a2", agent, ok=False)  # the second range is full: the first is rolled back
        call(conf, "ADD", "a0", agent)  # a repeat: the same two addresses
        call(conf, "DEL", "a1", agent)
        a3 = call(conf, "ADD", "a3", agent)
    finally:
        agent.close()
    assert [ip["address"] for ip in a3["ips"]] == ["10.0.0.2/28", "10.9.0.2/30"]
    assert [h[0] for h in held(kube)] == ["a0", "a0", "a3", "a3"]


def test_a_slice_reclaimed_meanwhile_is_not_written_from_memory(kube: KubeHandle, tmp_path: Path) -> None:
    conf, agent, store = netconf(kube, tmp_path, node_slice_size="/30"), Agent(), admin(kube, tmp_path)
    try:
        for cid in ("a0", "a1", "a2"):  # a2 in s2, remembered by the agent
            call(conf, "ADD", cid, agent)
        call(conf, "DEL", "a2", agent)  # s2 empty and spare
        later = datetime.now(UTC) + timedelta(seconds=120)
        assert nodeslices.reclaim_slices(store, {"node-a", "node-b"}, 60, False, now=later) == [
            "return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare"
        ]
        b0 = call(conf.replace('"node-a"', '"node-b"'), "ADD", "b0", None)  # node-b claims s2
        call(conf, "DEL", "a0", agent)
        got = [addr(call(conf, "ADD", cid, agent)) for cid in ("a3", "a4")]
    finally:
        agent.close()
        store.close()
    assert addr(b0) == "10.0.0.5/28" and got == ["10.0.0.1/28", "10.0.0.9/28"]


def test_clients_of_one_kubeconfig_evicted_and_opened_again_share_a_pool_safely(
    kube: KubeHandle, tmp_path: Path
) -> None:
    agent = Agent()
    agent.cache = StoreCache(limit=1)  # every other call evicts the client the previous one used
    one = netconf(kube, tmp_path)
    two = one.replace(kube.kubeconfig_path, kube.kubeconfig(namespace="kube-system", name="second"))
    try:
        got = [addr(call(conf, "ADD", f"x{i}", agent)) for i, conf in enumerate([one, two, one, two])]
        call(two, "DEL", "x1", agent)
        got += [addr(call(conf, "ADD", f"y{i}", agent)) for i, conf in enumerate([one, two])]
    finally:
        agent.close()
    assert got == [f"10.0.0.{i}/28" for i in (1, 2, 3, 4, 2, 5)]
    assert len(held(kube)) == 5


def test_a_lost_answer_to_the_create_of_a_reclaimed_slices_pool_costs_a_refused_write(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """The agent remembers slice 2's pool (empty, after a DEL); reclaim returns the slice and deletes
    the pool (no node lock: another machine). The agent claims slice 2 again and creates its pool, but
    the create's answer is lost: the retry's 409 leaves the memory of the deleted pool in place (the
    create's node lock was this process's next one, so nothing was dropped). The memory is only ever
    trusted through a conditional write: one refused write, then a read; one lease per container."""
    conf, agent, store = netconf(kube, tmp_path, node_slice_size="/30"), Agent(), admin(kube, tmp_path)
    try:
        for cid in ("a0", "a1", "a2"):  # slice 1 full, a2 in slice 2
            call(conf, "ADD", cid, agent)
        call(conf, "DEL", "a2", agent)  # slice 2's pool remembered empty
        later = datetime.now(UTC) + timedelta(seconds=120)
        assert nodeslices.reclaim_slices(store, {"node-a"}, 60, False, now=later) == [
            "return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare"
        ]
        assert [p["metadata"]["name"] for p in kube.api.objects("ippools")] == ["node-a-10.0.0.0-30"]
        # what the agent knows of the NodeSlicePool, and its mark that it made slice 2's pool just now,
        # are gone (as after CREATED_FRESH_SECONDS and a claim by another process); its pools' memory stays
        nodeslices.forget_cache()
        kube.api.reset_counts()
        kube.api.set_faults(drop_after_rate=1.0, methods={"POST"}, resources={"ippools"}, max_hits=1)
        got = [addr(call(conf, "ADD", "a3", agent))]  # claims slice 2 again, its pool's create answer lost
        assert kube.api.count("create", "ippools") == 2  # carried out (answer lost), then AlreadyExists
        assert kube.api.count("conflict", "ippools") == 1  # the write from the old memory, refused
        got.append(addr(call(conf, "ADD", "a3", agent)))  # a repeat
        call(conf, "DEL", "a0", agent)  # room in slice 1: the repeat must still find a3 in slice 2
        got.append(addr(call(conf, "ADD", "a3", agent)))
    finally:
        agent.close()
        store.close()
    assert got == ["10.0.0.5/28"] * 3
    assert held(kube) == [("a1", "node-a-10.0.0.0-30+2"), ("a3", "node-a-10.0.0.4-30+1")]


def test_a_slice_returned_right_after_this_process_made_its_pool_is_claimed_again_without_a_read_loop(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """The agent makes slice 2's pool; reclaim (`--grace 0`, or a reconciler clock ahead) returns the
    slice and deletes the pool within CREATED_FRESH_SECONDS. The mark "this process made that pool
    just now" must not stand for a pool found absent: an ADD then re-reads the NodeSlicePool, sees
    the slice is no longer its own and claims again, instead of re-trying the absent pool until the
    mark expires (a read loop of ~1,500 GETs in two seconds)."""
    conf, agent, store = netconf(kube, tmp_path, node_slice_size="/30"), Agent(), admin(kube, tmp_path)
    try:
        for cid in ("a0", "a1", "a2"):  # slice 1 full, a2 in slice 2 (its pool made just now)
            call(conf, "ADD", cid, agent)
        call(conf, "DEL", "a2", agent)
        later = datetime.now(UTC) + timedelta(seconds=120)
        assert nodeslices.reclaim_slices(store, {"node-a"}, 60, False, now=later) == [
            "return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare"
        ]
        kube.api.reset_counts()
        got = addr(call(conf, "ADD", "a3", agent))
    finally:
        agent.close()
        store.close()
    assert got == "10.0.0.5/28"  # slice 2 claimed again, its pool made again
    assert kube.api.count("get", "ippools") < 10  # a few reads of the two slice pools, not a loop
    assert held(kube) == [
        ("a0", "node-a-10.0.0.0-30+1"),
        ("a1", "node-a-10.0.0.0-30+2"),
        ("a3", "node-a-10.0.0.4-30+1"),
    ]
