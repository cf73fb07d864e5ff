"""Attacks on slice claims under the NodeSlicePool's writer turn (ipam.nodeslices `Slicer._claim`,
ipam.turns): the turn is a courtesy, so no failure of it may give two nodes one slice, lose a claim,
or keep an ADD past its deadline; the agent's own claim lock, the turn and the slice pools' node locks
must not wait on each other in a cycle.

Break found (the test failed before its fix): a claim that failed under a refused turn API (the
NodeSlicePool exhausted, the deadline passed) left writer turns on, so every later call asked the
turn API again instead of pacing for NO_TURNS_SECONDS; the same held for a pool batch that failed.
The other cases guard what held.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from pathlib import Path
from random import Random
from typing import Any

import pytest

from ipam import errors, nodeslices
from ipam.allocator import Request
from ipam.cni import make_engine
from ipam.config import Config, load_config
from ipam.engine import Engine, PoolCache
from ipam.errors import CNIError, TransientStoreError
from ipam.slices import NodeSlices, SliceEntry
from ipam.store.base import Turn, TurnsUnavailable, turn_name
from ipam.store.kubernetes import KubernetesStore
from ipam.turns import TURN_SECONDS
from tests.kubeapi.real import RealKube
from tests.test_engine import FakeClock

WB = "whereabouts.cni.cncf.io/v1alpha1"
CLAIM_TURN = turn_name("net1.nodeslicepool")


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def node_config(tmp: Path, node: str, kubeconfig: str, rng: str = "10.0.0.0/26") -> Config:
    ipam = {"type": "whereabouts-py", "range": rng, "node_slice_size": "/28", "node_name": node,
            "network_name": "net1", "data_dir": str(tmp / node), "kubernetes": {"kubeconfig": kubeconfig}}  # fmt: skip
    return load_config(json.dumps({"cniVersion": "1.0.0", "name": "net1", "ipam": ipam}).encode())


def node_engine(
    store: Any,
    cfg: Config,
    clock: FakeClock | None,
    deadline: float = 30.0,
    seed: int = 1,
    agent: bool = True,
) -> Engine:
    """A node's engine: as the agent has it (a PoolCache, so claims take the turn) or direct mode."""
    engine = make_engine(cfg, store)
    engine.policy = replace(engine.policy, deadline_seconds=deadline)
    engine.rng = Random(seed)
    if clock is not None:
        engine.clock, engine.sleep = clock.clock, clock.sleep
    if agent:
        engine.pool_cache = PoolCache(clock=engine.clock)
    return engine


def add(engine: Engine, cfg: Config, cid: str, node: str) -> str:
    (got,) = engine.add(cfg.ranges, Request(cid, "eth0", f"ns/{cid}", node=node))
    return str(got.address)


def connect(cls: type[KubernetesStore], real_kube: RealKube, tmp: Path, node: str) -> Any:
    return cls.connect(real_kube.kubeconfig_path, str(tmp / node / "locks"))


def held(real_kube: RealKube) -> dict[str, str]:
    got = real_kube.request("GET", f"/apis/{WB}/namespaces/{real_kube.namespace}/nodeslicepools/net1")
    return {e["sliceRange"]: e["nodeName"] for e in got["status"]["allocations"] if e["nodeName"]}


def turns_of(real_kube: RealKube) -> list[str]:
    return [
        str(item["metadata"]["name"]) for item in real_kube.api.objects("writerturns", real_kube.namespace)
    ]


def leases(real_kube: RealKube) -> list[tuple[str, str]]:
    out = []
    for pool in real_kube.api.objects("ippools", real_kube.namespace):
        for offset, lease in (pool["spec"].get("allocations") or {}).items():
            out.append((lease["id"], f"{pool['metadata']['name']}+{offset}"))
    return sorted(out)


class Pausing(KubernetesStore):
    """Pauses its first NodeSlicePool write (the claim's, read made and the turn held) until `go`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.paused = threading.Event()
        self.go = threading.Event()
        self.armed = True

    def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        if self.armed:
            self.armed = False
            self.paused.set()
            assert self.go.wait(60)
        super().write_node_slices(pool, entries)


def in_thread(target: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(target())
        except BaseException as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


# -- breaks ----------------------------------------------------------------------------------------


def test_a_claim_failing_under_a_refused_turn_api_still_turns_turns_off(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The turn API refuses (403) the claim's turn and the claim then fails (no free slice): the
    refusal must still switch turns off for NO_TURNS_SECONDS, not be asked again on every later call."""

    class Refusing(KubernetesStore):
        takes = 0

        def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
            self.takes += 1
            raise TurnsUnavailable("take writer turn: HTTP 403 Forbidden")

    rng = "10.0.0.0/27"  # two slices, both taken by other nodes
    for node, address in (("node-b", "10.0.0.1"), ("node-c", "10.0.0.17")):
        cfg = node_config(tmp_path, node, real_kube.kubeconfig_path, rng)
        other = node_engine(
            connect(KubernetesStore, real_kube, tmp_path, node), cfg, FakeClock(), agent=False
        )
        assert add(other, cfg, f"{node}-0", node) == address
    a_cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path, rng)
    store = connect(Refusing, real_kube, tmp_path, "node-a")
    a = node_engine(store, a_cfg, FakeClock())
    with pytest.raises(CNIError) as exc:
        add(a, a_cfg, "a0", "node-a")
    assert exc.value.code == errors.POOL_EXHAUSTED
    assert store.takes == 1
    assert a.pool_cache is not None and a.pool_cache.no_turns
    assert a.turn_waiter() is None
    with pytest.raises(CNIError):
        add(a, a_cfg, "a1", "node-a")
    assert store.takes == 1  # not asked again


# -- guards ----------------------------------------------------------------------------------------


def test_a_stalled_claimers_turn_is_taken_over_and_no_slice_is_held_twice(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Node a holds the claim turn and stalls between its read and its write; node b finds the turn
    unchanged for TURN_SECONDS, removes it and claims. a's write is then refused (AlreadyExists: it read
    no NodeSlicePool), it reads again and claims the next slice; its end_turn removes nothing of b's."""
    a_cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path)
    b_cfg = node_config(tmp_path, "node-b", real_kube.kubeconfig_path)
    a_store = connect(Pausing, real_kube, tmp_path, "node-a")
    a = node_engine(a_store, a_cfg, FakeClock())
    b_clock = FakeClock()
    b = node_engine(connect(KubernetesStore, real_kube, tmp_path, "node-b"), b_cfg, b_clock, seed=2)
    thread, got = in_thread(lambda: add(a, a_cfg, "a0", "node-a"))
    try:
        assert a_store.paused.wait(30)
        assert turns_of(real_kube) == [CLAIM_TURN]
        before = b_clock.now
        assert add(b, b_cfg, "b0", "node-b") == "10.0.0.1"
        assert b_clock.now - before >= TURN_SECONDS  # it waited out the stalled turn, then took it
    finally:
        a_store.go.set()
        thread.join(60)
    assert got == ["10.0.0.17"]
    assert held(real_kube) == {"10.0.0.0/28": "node-b", "10.0.0.16/28": "node-a"}
    assert not turns_of(real_kube)
    assert len({where for _, where in leases(real_kube)}) == 2


def test_reclaim_between_a_claims_read_and_write_under_the_turn(real_kube: RealKube, tmp_path: Path) -> None:
    """ipam-reconcile takes no turn: it returns a gone node's slice while node a, holding the claim
    turn, is between its read of the NodeSlicePool and its write. a's write is refused, it reads again
    (still under its turn) and takes the returned slice; nothing is held twice."""
    gone_cfg = node_config(tmp_path, "gone", real_kube.kubeconfig_path)
    gone = node_engine(
        connect(KubernetesStore, real_kube, tmp_path, "gone"), gone_cfg, FakeClock(), agent=False
    )
    assert add(gone, gone_cfg, "g0", "gone") == "10.0.0.1"
    gone.release(gone_cfg.ranges, "g0", "eth0")
    b_cfg = node_config(tmp_path, "node-b", real_kube.kubeconfig_path)
    b = node_engine(connect(KubernetesStore, real_kube, tmp_path, "node-b"), b_cfg, FakeClock(), agent=False)
    assert add(b, b_cfg, "b0", "node-b") == "10.0.0.17"
    a_cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path)
    a_store = connect(Pausing, real_kube, tmp_path, "node-a")
    a = node_engine(a_store, a_cfg, FakeClock())
    thread, got = in_thread(lambda: add(a, a_cfg, "a0", "node-a"))
    try:
        assert a_store.paused.wait(30)
        assert turns_of(real_kube) == [CLAIM_TURN]
        reconciler = connect(KubernetesStore, real_kube, tmp_path, "reconciler")
        lines = nodeslices.reclaim_slices(reconciler, {"node-a", "node-b"}, grace=0, dry_run=False)
        assert [line.split()[0] for line in lines] == ["return"]
    finally:
        a_store.go.set()
        thread.join(60)
    assert got == ["10.0.0.1"]  # the returned slice, claimed on a's second attempt
    assert held(real_kube) == {"10.0.0.0/28": "node-a", "10.0.0.16/28": "node-b"}
    assert not turns_of(real_kube)
    assert [lease for lease, _ in leases(real_kube)] == ["a0", "b0"]


def test_a_lost_answer_to_the_claim_turns_create_costs_the_others_one_turn_duration(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The claim turn's create was carried out, its answer lost: node a claims without the turn (its
    ADD stands); its WriterTurn stays until node b, claiming next, finds it unchanged for TURN_SECONDS."""

    class LostAnswer(KubernetesStore):
        def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
            super().take_turn(pool, holder, seconds)
            raise TransientStoreError("take writer turn: TimeoutError")

    a_cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path)
    a = node_engine(connect(LostAnswer, real_kube, tmp_path, "node-a"), a_cfg, FakeClock())
    assert add(a, a_cfg, "a0", "node-a") == "10.0.0.1"
    assert turns_of(real_kube) == [CLAIM_TURN]
    b_cfg = node_config(tmp_path, "node-b", real_kube.kubeconfig_path)
    b_clock = FakeClock()
    b = node_engine(connect(KubernetesStore, real_kube, tmp_path, "node-b"), b_cfg, b_clock, seed=2)
    assert add(b, b_cfg, "b0", "node-b") == "10.0.0.17"
    assert TURN_SECONDS <= b_clock.now - 1000.0 < b.policy.deadline_seconds
    assert not turns_of(real_kube)
    assert held(real_kube) == {"10.0.0.0/28": "node-a", "10.0.0.16/28": "node-b"}


@pytest.mark.parametrize("deadline", [4.0, 30.0])
def test_a_dead_claimers_turn_keeps_no_add_past_its_deadline(
    real_kube: RealKube, tmp_path: Path, deadline: float
) -> None:
    """A claimer died holding the claim turn: a new node's ADD gives up waiting by half its deadline
    (4 s) or removes the turn once it stood unchanged for TURN_SECONDS (30 s), and gets its address
    within the deadline either way."""
    dead = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "dead"))
    assert dead.take_turn("net1.nodeslicepool", "dead-node/1", TURN_SECONDS) is not None
    cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path)
    clock = FakeClock()
    a = node_engine(connect(KubernetesStore, real_kube, tmp_path, "node-a"), cfg, clock, deadline=deadline)
    assert add(a, cfg, "a0", "node-a") == "10.0.0.1"
    assert clock.now - 1000.0 < deadline
    if deadline > 2 * TURN_SECONDS:
        assert not turns_of(real_kube)
    else:
        assert clock.now - 1000.0 >= deadline / 2 - 0.5  # waited, then claimed without the turn
        assert turns_of(real_kube) == [CLAIM_TURN]


def test_the_agent_and_a_direct_mode_call_of_one_node_claim_once(real_kube: RealKube, tmp_path: Path) -> None:
    """The agent holds the node's claim lock and the claim turn, paused before its write; a direct-mode
    call of the same node (another process: its own store, no turn) waits on the claim lock, then
    finds the agent's slice and uses it: one slice for the node, two addresses."""

    class Spying(KubernetesStore):
        waiting = threading.Event()

        def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[int | None]:
            @contextmanager
            def spied() -> Iterator[int | None]:
                if name.startswith("nodeslicepool-"):
                    self.waiting.set()
                with super(Spying, self).pool_lock(name, timeout) as generation:
                    yield generation

            return spied()

    cfg = node_config(tmp_path, "node-a", real_kube.kubeconfig_path)
    agent_store = connect(Pausing, real_kube, tmp_path, "node-a")
    agent = node_engine(agent_store, cfg, None)
    direct_store = connect(Spying, real_kube, tmp_path, "node-a")
    direct = node_engine(direct_store, cfg, None, agent=False)
    thread, got = in_thread(lambda: add(agent, cfg, "a0", "node-a"))
    try:
        assert agent_store.paused.wait(30)
        other, direct_got = in_thread(lambda: add(direct, cfg, "a1", "node-a"))
        assert direct_store.waiting.wait(30)
    finally:
        agent_store.go.set()
        thread.join(60)
        other.join(60)
    assert sorted(got + direct_got) == ["10.0.0.1", "10.0.0.2"]
    assert held(real_kube) == {"10.0.0.0/28": "node-a"}
    assert not turns_of(real_kube)
