"""Writer turns (ipam.turns): the waiting rules on a scripted store, then the agent taking a pool's
turn on both API servers once another node's write has refused one of its own."""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ipam.agent import Agent
from ipam.store.base import Turn, TurnStore, TurnsUnavailable, turn_name
from ipam.turns import POLL_UNKNOWN, TurnWaiter
from tests.kubeapi.fixtures import K8s, KubeHandle
from tests.test_pool_cache import call as pool_cache_call

# -- the waiting rules ------------------------------------------------------------------------------


@dataclass
class ScriptedTurns:
    """A TurnStore whose turn is held by `other` (a Turn) until `hand_on_at` on the fake clock (None:
    never, its holder died)."""

    now: list[float]
    other: Turn | None = None
    hand_on_at: float | None = None
    refuse: Exception | None = None
    taken: list[Turn] = field(default_factory=list)
    ended: list[Turn] = field(default_factory=list)
    requests: int = 0

    def _others(self) -> Turn | None:
        if self.other is not None and self.hand_on_at is not None and self.now[0] >= self.hand_on_at:
            self.other = None
        return self.other

    def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
        self.requests += 1
        if self.refuse is not None:
            raise self.refuse
        if self._others() is not None or any(t not in self.ended for t in self.taken):
            return None
        turn = Turn(turn_name(pool), f"uid-{len(self.taken)}", "1")
        self.taken.append(turn)
        return turn

    def current_turn(self, pool: str) -> Turn | None:
        self.requests += 1
        return self._others()

    def end_turn(self, turn: Turn) -> None:
        self.requests += 1
        self.ended.append(turn)
        if turn == self.other:
            self.other = None


def waiter(store: ScriptedTurns) -> TurnWaiter:
    def sleep(seconds: float) -> None:
        assert seconds > 0, "a waiter never polls without sleeping"
        store.now[0] += seconds

    return TurnWaiter(store, clock=lambda: store.now[0], sleep=sleep, rng=random.Random(1))


def test_the_scripted_store_is_a_turn_store() -> None:
    assert isinstance(ScriptedTurns([0.0]), TurnStore)


def test_a_free_turn_is_taken_and_handed_on_after_the_write_even_when_the_write_fails() -> None:
    store = ScriptedTurns([0.0])
    with waiter(store).held("p", deadline=90.0, write_seconds=0.1) as waited:
        assert not waited and len(store.taken) == 1 and not store.ended
    with pytest.raises(RuntimeError), waiter(store).held("p", deadline=90.0, write_seconds=0.1):
        raise RuntimeError("the write failed")
    assert store.ended == store.taken and len(store.taken) == 2


def test_a_waiter_polls_until_the_holder_hands_on_and_says_it_waited() -> None:
    other = Turn(turn_name("p"), "theirs", "7")
    store = ScriptedTurns([0.0], other=other, hand_on_at=1.0)
    with waiter(store).held("p", deadline=90.0, write_seconds=0.1) as waited:
        assert waited and len(store.taken) == 1
        assert store.now[0] >= 1.0
    assert other not in store.ended  # the other writer's turn is theirs to end
    assert store.requests < 60  # polled about once per write time, not in a hot loop


def test_a_waiter_that_has_not_written_the_pool_yet_polls_at_a_modest_pace() -> None:
    """No write time measured yet (0): polling at the 10 ms floor made ~100 requests per second of
    wait (found by review); it polls about every POLL_UNKNOWN instead."""
    store = ScriptedTurns([0.0], other=Turn(turn_name("p"), "theirs", "7"), hand_on_at=1.0)
    with waiter(store).held("p", deadline=90.0, write_seconds=0.0) as waited:
        assert waited and len(store.taken) == 1
    assert store.requests <= 1 + 2 * (1.0 / (POLL_UNKNOWN / 2)) + 2


def test_a_turn_left_unchanged_past_its_duration_is_deleted_by_a_waiter_and_taken() -> None:
    dead = Turn(turn_name("p"), "dead-holder", "3")
    store = ScriptedTurns([0.0], other=dead, hand_on_at=None)
    w = waiter(store)
    with w.held("p", deadline=90.0, write_seconds=0.1) as waited:
        assert waited and len(store.taken) == 1
    assert store.ended[0] == dead  # deleted as that very object (uid + version)
    assert w.turn_seconds <= store.now[0] < 2 * w.turn_seconds


def test_a_turn_that_keeps_changing_hands_is_never_taken_for_abandoned() -> None:
    store = ScriptedTurns([0.0], other=Turn(turn_name("p"), "a", "1"), hand_on_at=None)
    w = waiter(store)
    versions = iter(range(2, 10_000))
    real_current = store.current_turn

    def current(pool: str) -> Turn | None:  # a new holder every time it is looked at
        store.other = Turn(turn_name(pool), f"u{next(versions)}", "1")
        return real_current(pool)

    store.current_turn = current  # type: ignore[method-assign]
    with w.held("p", deadline=40.0, write_seconds=0.1) as waited:
        assert waited and not store.taken  # gave up: written without a turn
    assert not store.ended  # no live writer's turn was deleted
    assert 19.0 <= store.now[0] <= 20.5  # half of the time left to the deadline


def test_a_store_that_refuses_turns_says_so_and_the_write_goes_on_without_one() -> None:
    store = ScriptedTurns([0.0], refuse=TurnsUnavailable("HTTP 403"))
    w = waiter(store)
    ran = False
    with w.held("p", deadline=90.0, write_seconds=0.1) as waited:
        ran = True
    assert ran and not waited and w.unavailable


def test_a_nodeslicepools_claim_turn_is_never_a_pools_turn() -> None:
    """A tenant picks network_name: a NodeSlicePool named like a pool (`net1-10.0.0.0-24`) and the
    pool of network `net1` must not share a turn. Pool names end in a prefix length."""
    from ipam.ranges import pool_name

    for network in ("nodeslicepool.foo", "foo", "x-10.0.0.0"):
        pool = pool_name("10.0.0.0/24", network)
        assert turn_name(pool) != turn_name(f"{pool}.nodeslicepool")
        assert not turn_name(f"{network}.nodeslicepool")[-1].isdigit()


def test_a_long_pool_name_gives_a_valid_lease_name_of_its_own() -> None:
    long_a, long_b = "n" * 240 + "-10.0.0.0-24", "n" * 240 + "-10.0.1.0-24"
    assert turn_name("net1-10.0.0.0-24") == "whereabouts-py.net1-10.0.0.0-24"
    assert len(turn_name(long_a)) <= 253 and turn_name(long_a) != turn_name(long_b)


# -- the agent, on both API servers -----------------------------------------------------------------


def netconf(kubeconfig: str, tmp: Path) -> str:
    ipam = {"type": "whereabouts-py", "range": "10.0.0.0/24", "node_name": "node-a", "data_dir": str(tmp),
            "kubernetes": {"kubeconfig": kubeconfig}}  # fmt: skip
    return json.dumps({"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam})


def call(conf: str, command: str, cid: str, agent: Agent | None) -> str:
    """One CNI call (tests.test_pool_cache.call); an ADD's address."""
    result = pool_cache_call(conf, command, cid, agent)
    return str(result["ips"][0]["address"]) if command == "ADD" else ""


def all_at_once(work: Callable[[int], None], n: int) -> list[BaseException]:
    """`work(0..n-1)` in n threads at once; what they raised."""
    failures: list[BaseException] = []

    def one(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def leases(k8s: K8s) -> dict[str, str]:
    out: dict[str, str] = {}
    for pool in k8s.api.objects("ippools", k8s.namespace):
        for offset, lease in (pool["spec"].get("allocations") or {}).items():
            assert lease["id"] not in out, f"{lease['id']} holds two leases"
            out[lease["id"]] = f"10.0.0.{offset}/24"
    return out


def turn_leases(k8s: K8s) -> list[dict[str, Any]]:
    return k8s.api.objects("writerturns", k8s.namespace)


def test_after_another_nodes_write_refused_its_own_the_agent_takes_the_pools_turn_and_hands_it_on(
    k8s: K8s, tmp_path: Path
) -> None:
    """The plugin's own identity on the real server: its Role lets it keep turns."""
    kubeconfig = k8s.plugin_kubeconfig()
    conf, other_node = netconf(kubeconfig, tmp_path / "a"), netconf(kubeconfig, tmp_path / "b")
    agent = Agent()
    try:
        got = {"a0": call(conf, "ADD", "a0", agent), "b0": call(other_node, "ADD", "b0", None)}
        if isinstance(k8s, KubeHandle):
            k8s.api.reset_counts()
        got["a1"] = call(conf, "ADD", "a1", agent)  # from memory: refused by b0's write, then written
        got["a2"] = call(conf, "ADD", "a2", agent)  # the pool is contended: under its turn
        if isinstance(k8s, KubeHandle):
            counts = k8s.api.counts_snapshot()
            assert counts[("create", "writerturns")] == 1 and counts[("delete", "writerturns")] == 1
            assert counts[("conflict", "ippools")] == 1  # a1's; a2 read under the turn
        call(conf, "DEL", "a2", agent)
    finally:
        agent.close()
    del got["a2"]
    assert leases(k8s) == got
    assert turn_leases(k8s) == []  # every turn taken was handed on


def test_a_cluster_without_the_writerturn_crd_turns_turns_off_and_the_writes_go_on(
    kube: KubeHandle, tmp_path: Path
) -> None:
    del kube.api.kinds["writerturns"]  # 404 for every turn request (kube.reset serves them again)
    conf, other_node = (
        netconf(kube.kubeconfig_path, tmp_path / "a"),
        netconf(kube.kubeconfig_path, tmp_path / "b"),
    )
    agent = Agent()
    try:
        got = {"a0": call(conf, "ADD", "a0", agent), "b0": call(other_node, "ADD", "b0", None)}
        got["a1"] = call(conf, "ADD", "a1", agent)
        kube.api.reset_counts()
        got["a2"] = call(conf, "ADD", "a2", agent)
        got["a3"] = call(conf, "ADD", "a3", agent)
        counts = {k: v for k, v in kube.api.counts_snapshot().items() if v}
    finally:
        agent.close()
    assert leases(kube) == got
    assert not any(plural == "writerturns" for _, plural in counts)  # asked once (a2), never again


def test_nodes_adding_to_one_pool_at_once_take_turns_and_lose_no_lease(k8s: K8s, tmp_path: Path) -> None:
    """Four nodes (an agent and a node lock each), six ADDs each, all at once, twice over."""
    nodes = [(Agent(), netconf(k8s.kubeconfig_path, tmp_path / f"n{n}")) for n in range(4)]
    got: dict[str, str] = {}
    failures: list[BaseException] = []

    def node(n: int, rnd: int) -> None:
        agent, conf = nodes[n]
        for i in range(6):
            got[f"r{rnd}n{n}c{i}"] = call(conf, "ADD", f"r{rnd}n{n}c{i}", agent)

    try:
        for rnd in range(2):
            failures += all_at_once(lambda n, rnd=rnd: node(n, rnd), 4)
    finally:
        for agent, _ in nodes:
            agent.close()
    assert not failures
    assert len(set(got.values())) == 48
    assert leases(k8s) == got
    assert turn_leases(k8s) == []
    if isinstance(k8s, KubeHandle):  # the second round found the pool contended
        assert k8s.api.count("create", "writerturns") > 0


def sliced_netconf(kubeconfig: str, tmp: Path, node: str) -> str:
    ipam = {"type": "whereabouts-py", "range": "10.0.0.0/24", "node_name": node, "data_dir": str(tmp),
            "node_slice_size": "/28", "network_name": "net1", "kubernetes": {"kubeconfig": kubeconfig}}  # fmt: skip
    return json.dumps({"cniVersion": "1.0.0", "name": "net1", "type": "macvlan", "ipam": ipam})


@pytest.mark.parametrize("turns_served", [True, False], ids=["turns", "no-writerturn-crd"])
def test_nodes_claiming_slices_at_once_take_the_nodeslicepools_turn_and_never_refuse_each_other(
    kube: KubeHandle, tmp_path: Path, turns_served: bool
) -> None:
    """Six new nodes' first ADDs at once: each claims a slice under the NodeSlicePool's writer turn, so
    no claim is refused (without the WriterTurn CRD they claim as before, refusals and all)."""
    if not turns_served:
        del kube.api.kinds["writerturns"]
    nodes = [
        (Agent(), sliced_netconf(kube.kubeconfig_path, tmp_path / f"n{n}", f"node-{n}")) for n in range(6)
    ]
    start = threading.Barrier(6)
    got: dict[str, str] = {}

    def node(n: int) -> None:
        agent, conf = nodes[n]
        start.wait()
        got[f"n{n}"] = call(conf, "ADD", f"n{n}", agent)

    try:
        failures = all_at_once(node, 6)
    finally:
        for agent, _ in nodes:
            agent.close()
    assert not failures and len(set(got.values())) == 6
    (nsp,) = kube.api.objects("nodeslicepools", kube.namespace)
    owners = [a["nodeName"] for a in nsp["status"]["allocations"] if a["nodeName"]]
    assert sorted(owners) == [f"node-{n}" for n in range(6)]  # one slice each, none held twice
    if turns_served:
        assert kube.api.count("conflict", "nodeslicepools") == 0
        assert kube.api.count("create", "writerturns") >= 6  # a turn per claim
        assert kube.api.objects("writerturns", kube.namespace) == []
