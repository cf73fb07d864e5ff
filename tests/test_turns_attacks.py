"""Attacks on writer turns (ipam.turns; tests/test_turns.py has the waiting rules): the turn is a
courtesy, so no failure of it may lose or double a lease, make a call outlive its deadline, spin without
sleeping, or remove another writer's valid turn.

Breaks found (each test failed before its fix): a waiter whose take_turn found the turn held and whose
current_turn then found it handed on (a 404 on that turn, the common race under contention) took the
404 for "the cluster has no WriterTurn CRD" and switched turns off for the agent's lifetime; a waiter that found the turn taken and then gone on
every look retried at once forever (no sleep, no deadline); a dead holder's turn was never removed when
the ADD deadline is at most twice the turn's duration (each waiter gave up before its own sighting of
the turn was old enough), so every batch of every node waited half its deadline for good; one refusal of
the turn API (a restarting API server answers 403 for about a second) switched turns off for the
agent's lifetime; a long slice pool name cut before a '.' made an invalid object name; a batch that
failed after the turn API refused its turn left turns on, so every later batch asked again.
The other cases guard the failure rules of ipam.turns.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from random import Random
from typing import Any

import pytest

from ipam import errors
from ipam.allocator import Allocations, Request
from ipam.engine import DISTRUST_SECONDS, Engine, PoolCache, RetryPolicy
from ipam.errors import CNIError, TransientStoreError
from ipam.ranges import RangeSpec, build_range, pool_name
from ipam.slices import slice_pool_name
from ipam.store.base import PoolSnapshot, Turn, TurnStore, TurnsUnavailable, turn_name
from ipam.store.file import FileStore
from ipam.store.kubernetes import KubernetesStore
from ipam.turns import TURN_SECONDS, TurnWaiter
from tests.kubeapi.real import RealKube
from tests.test_engine import FakeClock

# Kubernetes' IsDNS1123Subdomain: a custom resource's name
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def ips(assigned: list[Any]) -> list[str]:
    return [str(a.address) for a in assigned]


def held_addresses(real_kube: RealKube) -> list[tuple[str, str]]:
    out = []
    for pool in real_kube.api.objects("ippools", real_kube.namespace):
        for offset, lease in (pool["spec"].get("allocations") or {}).items():
            out.append((lease["id"], f"{pool['metadata']['name']}+{offset}"))
    return sorted(out)


def turns_of(real_kube: RealKube) -> list[dict[str, Any]]:
    return real_kube.api.objects("writerturns", real_kube.namespace)


def agent_engine(store: Any, clock: FakeClock, deadline: float = 30.0, seed: int = 1) -> Engine:
    """An engine as the node agent has it (a PoolCache), on a fake clock."""
    return Engine(
        store,
        RetryPolicy(deadline_seconds=deadline),
        clock=clock.clock,
        sleep=clock.sleep,
        rng=Random(seed),
        pool_cache=PoolCache(clock=clock.clock),
    )


def contend(engine: Engine, spec: RangeSpec) -> str:
    """Make the engine's agent believe other writers were at the pool just now (a refused write)."""
    name = pool_name(spec.cidr)
    assert engine.pool_cache is not None
    engine.pool_cache.contended(name, conflict=True)
    return name


class ScriptedTurns:
    """A TurnStore answering from scripts; counts its calls."""

    def __init__(self, take: Any = None, current: Any = None) -> None:
        self.take = take or (lambda: None)
        self.current = current or (lambda: None)
        self.takes = 0
        self.reads = 0
        self.ended: list[Turn] = []

    def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
        self.takes += 1
        if self.takes > 10_000:
            raise RuntimeError("the waiter keeps asking without end")
        result: Turn | None = self.take()
        return result

    def current_turn(self, pool: str) -> Turn | None:
        self.reads += 1
        result: Turn | None = self.current()
        return result

    def end_turn(self, turn: Turn) -> None:
        self.ended.append(turn)


# -- breaks ----------------------------------------------------------------------------------------


def test_a_waiter_whose_turn_is_taken_yet_never_there_sleeps_and_gives_up_by_half_its_deadline() -> None:
    """take_turn keeps finding the turn (409) and current_turn keeps missing it (404): a turn that
    flickers between holders on every look, or a server answering so. The waiter must sleep between
    tries and write without the turn by half its deadline, not retry at once for ever."""
    clock = FakeClock()
    store = ScriptedTurns()
    waiter = TurnWaiter(store, clock.clock, clock.sleep, Random(1))
    started = clock.now
    with waiter.held("p", started + 20.0, 0.05) as waited:
        assert waited
    assert clock.now - started <= 10.0  # gave up by half its deadline
    assert clock.sleeps  # and slept while waiting
    # at most one immediate retry after each sleep
    assert store.takes <= 2 * (len(clock.sleeps) + 1)
    assert not store.ended


def test_a_turn_handed_on_between_the_waiters_two_requests_is_taken_and_keeps_turns_on(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The waiter's take_turn finds the turn held (409); its holder hands it on before the waiter's
    current_turn (404 on the turn: the common case under contention). That 404 is "no turn now", not
    "the cluster has no WriterTurn CRD": the waiter takes the turn, and the agent keeps taking turns."""
    spec = build_range("ipam", "10.77.0.0/24")
    name = pool_name(spec.cidr)

    class HandedOn(KubernetesStore):
        other: Turn | None = None
        takes = 0

        def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
            self.takes += 1
            turn = super().take_turn(pool, holder, seconds)
            if turn is None and self.other is not None:
                super().end_turn(self.other)  # the holder hands on just after the waiter's 409
                self.other = None
            return turn

    store = HandedOn.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = agent_engine(store, FakeClock())
    contend(engine, spec)
    store.other = store.take_turn(name, "other-node/1", TURN_SECONDS)
    assert store.other is not None
    assert ips(engine.add([spec], Request("c0", "net1", "ns/p0"))) == ["10.77.0.1"]
    assert store.takes == 3  # the other's turn, refused; then the waiter's own
    assert engine.pool_cache is not None and not engine.pool_cache.no_turns
    assert engine._turn_waiter(name) is not None
    assert not turns_of(real_kube)


@pytest.mark.parametrize("deadline", [6.0, 10.0])
def test_a_dead_holders_turn_is_removed_even_when_each_waiter_gives_up_sooner_than_the_turn_lasts(
    real_kube: RealKube, tmp_path: Path, deadline: float
) -> None:
    """A holder died holding the turn; every ADD's deadline is at most twice TURN_SECONDS, so each waiter
    gives up before its own sighting of the turn is TURN_SECONDS old. The agent must still find the turn
    unchanged across its batches and remove it, rather than every batch waiting half its deadline for
    good (each waiter marks the pool contended again, so it never stops taking turns)."""
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    clock = FakeClock()
    engine = agent_engine(store, clock, deadline=deadline)
    spec = build_range("ipam", "10.70.0.0/24")
    name = contend(engine, spec)
    dead = store.take_turn(name, "dead-node/1", TURN_SECONDS)
    assert dead is not None
    for i in range(6):
        engine.add([spec], Request(f"c{i}", "net1", f"ns/p{i}"))
    current = store.current_turn(name)
    assert current is None or current.uid != dead.uid, "the dead holder's turn still stands"
    # once it is gone, batches no longer wait for it
    before = clock.now
    engine.add([spec], Request("after", "net1", "ns/after"))
    assert clock.now - before < TURN_SECONDS / 2
    assert len(held_addresses(real_kube)) == 7
    assert len({a for _, a in held_addresses(real_kube)}) == 7


def test_a_passing_refusal_of_the_lease_api_does_not_switch_turns_off_for_good(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """A just-restarted API server answers 403 until its RBAC cache syncs (KubernetesStore's
    auth_settle_seconds): one such answer on a turn must not stop the agent taking turns until it
    restarts. (Meanwhile it writes without turns, as before.)"""

    class RefusingOnce(KubernetesStore):
        refusals = 1
        takes = 0

        def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
            self.takes += 1
            if self.refusals:
                self.refusals -= 1
                raise TurnsUnavailable("take writer turn: HTTP 403 Forbidden")
            return super().take_turn(pool, holder, seconds)

    store = RefusingOnce.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    clock = FakeClock()
    engine = agent_engine(store, clock)
    spec = build_range("ipam", "10.71.0.0/24")
    contend(engine, spec)
    engine.add([spec], Request("c0", "net1", "ns/p0"))
    assert store.takes == 1
    engine.add([spec], Request("c1", "net1", "ns/p1"))  # right after: turns are off for now
    assert store.takes == 1
    clock.now += 3600.0  # much later, the pool contended again
    contend(engine, spec)
    engine.add([spec], Request("c2", "net1", "ns/p2"))
    assert store.takes == 2
    assert not turns_of(real_kube)  # taken and handed on
    assert len({a for _, a in held_addresses(real_kube)}) == 3


def test_a_long_slice_pool_name_makes_a_valid_turn_name(real_kube: RealKube, tmp_path: Path) -> None:
    """Slice pools are named after the node (a DNS subdomain, dots and all): a pool name over 238
    characters is cut for its WriterTurn, and a cut just after a '.' made a label starting with '-'."""
    node = "x" * 180 + "." + "y" * 45
    pool = slice_pool_name(node, "10.0.0.0/28", "net")
    assert len(pool) <= 253 and DNS_SUBDOMAIN.match(pool)
    for name in (pool, pool[:-1] + "9", "a" * 184 + "." + "b" * 60, "a" * 183 + ".-" + "b" * 60):
        assert DNS_SUBDOMAIN.match(turn_name(name)), turn_name(name)
        assert len(turn_name(name)) <= 253
    assert turn_name(pool) != turn_name(pool[:-1] + "9")
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    turn = store.take_turn(pool, "me/1", TURN_SECONDS)
    assert turn is not None
    store.end_turn(turn)
    assert store.current_turn(pool) is None


def test_a_batch_failing_under_a_refused_turn_api_still_turns_turns_off(tmp_path: Path) -> None:
    """The turn API refuses the pool's turn (403) and the batch then fails (every write refused until
    the deadline): the refusal must still switch turns off for NO_TURNS_SECONDS, not be asked again by
    every later batch."""

    class Refusing(FileStore):
        takes = 0

        def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
            self.takes += 1
            raise TurnsUnavailable("take writer turn: HTTP 403 Forbidden")

        def current_turn(self, pool: str) -> Turn | None:
            return None

        def end_turn(self, turn: Turn) -> None:
            pass

        def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> PoolSnapshot | None:
            raise TransientStoreError("write IPPool: HTTP 503 Service Unavailable")

    store = Refusing(str(tmp_path / "data"))
    engine = agent_engine(store, FakeClock(), deadline=5.0)
    spec = build_range("ipam", "10.75.0.0/24")
    name = contend(engine, spec)
    with pytest.raises(CNIError) as exc:
        engine.add([spec], Request("c0", "net1", "ns/p0"))
    assert exc.value.code == errors.TRY_AGAIN_LATER
    assert store.takes == 1
    assert engine.pool_cache is not None and engine.pool_cache.no_turns
    assert engine._turn_waiter(name) is None


# -- guards ----------------------------------------------------------------------------------------


def test_stores_without_turns_and_engines_without_a_pool_cache_take_no_turns(tmp_path: Path) -> None:
    """The file store keeps no turns (one node writes it): the agent paces as before; direct mode (no
    PoolCache) never takes turns."""
    assert not isinstance(FileStore(str(tmp_path / "data")), TurnStore)
    clock = FakeClock()
    engine = agent_engine(FileStore(str(tmp_path / "data")), clock)
    spec = build_range("ipam", "10.72.0.0/24")
    name = contend(engine, spec)
    assert engine._turn_waiter(name) is None
    assert ips(engine.add([spec], Request("c0", "net1", "ns/p0"))) == ["10.72.0.1"]

    direct = Engine(ScriptedTurns(take=lambda: pytest.fail("direct mode took a turn")), pool_cache=None)  # type: ignore[arg-type]
    assert direct._turn_waiter(name) is None


def test_direct_mode_on_kubernetes_makes_no_lease(real_kube: RealKube, tmp_path: Path) -> None:
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    spec = build_range("ipam", "10.73.0.0/24")
    assert ips(engine.add([spec], Request("c0", "net1", "ns/p0"))) == ["10.73.0.1"]
    assert not turns_of(real_kube)


def test_ending_a_turn_never_removes_another_writers_turn(real_kube: RealKube, tmp_path: Path) -> None:
    """end_turn (the holder's, or a waiter's removal of a turn it found unchanged) carries the uid and
    resourceVersion of the turn it saw: the next holder's turn under the same name stays."""
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    first = store.take_turn("p", "a/1", TURN_SECONDS)
    assert first is not None
    assert store.take_turn("p", "b/1", TURN_SECONDS) is None  # taken
    assert store.current_turn("p") == first
    store.end_turn(first)
    second = store.take_turn("p", "b/1", TURN_SECONDS)
    assert second is not None and second.uid != first.uid
    store.end_turn(first)  # late: the first holder's answer was lost, or a waiter saw `first` stale
    store.end_turn(first)
    assert store.current_turn("p") == second
    store.end_turn(second)
    assert store.current_turn("p") is None
    store.end_turn(second)  # already gone: fine


def test_a_turn_not_ended_is_removed_by_the_next_waiter_and_nothing_is_lost(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The holder wrote, then its end_turn failed (its answer lost, the server gone): the ADD stands,
    and the other node's next batch finds the turn unchanged for TURN_SECONDS, removes it and writes."""

    class EndFails(KubernetesStore):
        def end_turn(self, turn: Turn) -> None:
            raise TransientStoreError("end writer turn: ConnectionResetError")

    spec = build_range("ipam", "10.74.0.0/24")
    a_clock, b_clock = FakeClock(), FakeClock()
    a = agent_engine(EndFails.connect(real_kube.kubeconfig_path, str(tmp_path / "a")), a_clock)
    b = agent_engine(KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "b")), b_clock, seed=2)
    contend(a, spec)
    name = contend(b, spec)
    assert ips(a.add([spec], Request("a0", "net1", "ns/a0"))) == ["10.74.0.1"]
    left = turns_of(real_kube)
    assert len(left) == 1  # the turn a could not end
    before = b_clock.now
    assert ips(b.add([spec], Request("b0", "net1", "ns/b0"))) == ["10.74.0.2"]
    assert b_clock.now - before >= TURN_SECONDS  # b waited for the turn to stand unchanged that long
    assert not turns_of(real_kube)
    assert b.pool_cache is not None and b.pool_cache.recently_contended(name)
    assert held_addresses(real_kube) == [("a0", f"{name}+1"), ("b0", f"{name}+2")]


def test_a_turn_removed_while_its_holder_writes_costs_a_refused_write_only(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Node a takes the turn, reads the pool and stalls before its write; node b finds the turn
    unchanged for TURN_SECONDS, removes it, takes it, writes and hands it on; node c takes the turn next.
    a's write is then refused and made again; a's end_turn leaves c's turn alone. Every ADD has its own
    address."""
    spec = build_range("ipam", "10.75.0.0/24")
    read = threading.Event()
    go = threading.Event()

    class Stalls(KubernetesStore):
        stall = True

        def read_pool(self, name: str, cidr: str) -> Any:
            snapshot = super().read_pool(name, cidr)
            if self.stall:
                self.stall = False
                read.set()
                assert go.wait(60)
            return snapshot

    a_store = Stalls.connect(real_kube.kubeconfig_path, str(tmp_path / "a"))
    a = agent_engine(a_store, FakeClock())
    b = agent_engine(
        KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "b")), FakeClock(), seed=2
    )
    c_store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "c"))
    name = contend(a, spec)
    contend(b, spec)
    outcome: dict[str, Any] = {}

    def run_a() -> None:
        try:
            outcome["a"] = ips(a.add([spec], Request("a0", "net1", "ns/a0")))
        except BaseException as exc:
            outcome["a"] = exc

    thread = threading.Thread(target=run_a)
    thread.start()
    try:
        assert read.wait(60)
        a_turn = c_store.current_turn(name)
        assert a_turn is not None
        assert ips(b.add([spec], Request("b0", "net1", "ns/b0"))) == ["10.75.0.1"]
        assert c_store.current_turn(name) is None  # b removed a's turn, wrote, handed its own on
        c_turn = c_store.take_turn(name, "c/1", TURN_SECONDS)
        assert c_turn is not None
    finally:
        go.set()
        thread.join(60)
    assert outcome["a"] == ["10.75.0.2"]
    assert c_store.current_turn(name) == c_turn  # a's end_turn left c's turn alone
    assert held_addresses(real_kube) == [("a0", f"{name}+2"), ("b0", f"{name}+1")]


def test_turns_refused_by_rbac_fall_back_to_writing_without_them(real_kube: RealKube, tmp_path: Path) -> None:
    """A plugin Role without writerturns (an older deploy): the agent writes as before and stops asking."""
    ns = real_kube.namespace
    rules = [
        {
            "apiGroups": ["whereabouts.cni.cncf.io"],
            "verbs": ["*"],
            "resources": ["ippools", "overlappingrangeipreservations", "nodeslicepools"],
        }
    ]
    real_kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                     "metadata": {"name": "no-turns", "namespace": ns}, "rules": rules})  # fmt: skip
    real_kube.apply({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                     "metadata": {"name": "no-turns", "namespace": ns},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-turns"},
                     "subjects": [{"kind": "ServiceAccount", "name": "plugin", "namespace": ns}]})  # fmt: skip
    kubeconfig = real_kube.token_kubeconfig("plugin", ns)
    store = KubernetesStore.connect(kubeconfig, str(tmp_path / "locks"))
    clock = FakeClock()
    engine = agent_engine(store, clock)
    spec = build_range("ipam", "10.76.0.0/24")
    name = contend(engine, spec)
    with pytest.raises(TurnsUnavailable):
        store.take_turn(name, "me/1", TURN_SECONDS)
    assert ips(engine.add([spec], Request("c0", "net1", "ns/p0"))) == ["10.76.0.1"]
    assert engine.pool_cache is not None and engine._turn_waiter(name) is None  # stopped asking
    assert ips(engine.add([spec], Request("c1", "net1", "ns/p1"))) == ["10.76.0.2"]
    assert clock.now < 1000.0 + DISTRUST_SECONDS  # no waiting for a turn it cannot have
