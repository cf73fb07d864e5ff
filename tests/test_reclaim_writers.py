"""The controller's pool writers (Reclaimer._write_oldest): the pool whose oldest pending release is
the oldest of all is written next, with everything it gathered meanwhile; one writer per pool at a
time; the writers' count stays true through a failing write. No API server: the releaser is a fake
that records each write, and the judgement is given."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from ipam.allocator import Lease
from ipam.audit import Holding, PoolView, Reservation
from ipam.controller import reclaim
from ipam.controller.cache import Finished, Nodes, Pods, Pools
from ipam.controller.reclaim import Reclaimer
from ipam.controller.rules import Release
from ipam.reconcile import Summary
from ipam.store.base import PoolSnapshot
from tests.test_controller import wait_for


class Writes:
    """A releaser whose pool writes wait at a gate while `held` names their pool."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.order: list[tuple[str, list[str]]] = []  # (pool, podrefs), as each write began
        self.now: dict[str, int] = {}  # pool -> writes of it going on
        self.most_at_once: dict[str, int] = {}
        self.held: set[str] = set()
        self.gate = threading.Event()
        self.fail: set[str] = set()  # pools whose next write raises

    def release_leases(self, held: Sequence[Holding], summary: Summary | None = None) -> list[int]:
        pool = held[0].pool.name
        with self.lock:
            self.order.append((pool, sorted(h.lease.podref for h in held)))
            self.now[pool] = self.now.get(pool, 0) + 1
            self.most_at_once[pool] = max(self.most_at_once.get(pool, 0), self.now[pool])
        try:
            if pool in self.held:
                assert self.gate.wait(10)
            if pool in self.fail:
                self.fail.discard(pool)
                raise RuntimeError("a bug in the write")
            return [h.offset for h in held]
        finally:
            with self.lock:
                self.now[pool] -= 1

    def release_reservation(
        self, h: Holding, summary: Summary | None = None, cached: Reservation | None = None
    ) -> None:
        pass


def release(pool: str, offset: int, pod: str) -> Release:
    view = PoolView(PoolSnapshot(pool, "10.64.0.0/24", {}, "1"), "", "", 254)
    lease = Lease(f"ctr-{pod}", f"ns/{pod}", "net1")
    return Release(Holding(view, offset, f"10.64.0.{offset}", lease, True), "pod-gone")


@pytest.fixture
def writes() -> Writes:
    return Writes()


def judging(releaser: Any, is_leader: Callable[[], bool] = lambda: True) -> Reclaimer:
    """A Reclaimer whose judgement is given (`r.judged`: podref -> its releases) and whose writes
    go to `releaser`."""
    noop = lambda _refs: None  # noqa: E731
    r = Reclaimer(
        Pods(noop),
        Finished(noop),
        Nodes(lambda: None),
        Pools("ns", noop),
        lambda _r: None,
        releaser,
        is_leader,
    )
    judged: dict[str, list[Release]] = {}
    r.judge = lambda ref: judged.get(ref, [])  # type: ignore[method-assign]
    r.judged = judged  # type: ignore[attr-defined]
    return r


@pytest.fixture
def reclaimer(writes: Writes) -> Iterator[Reclaimer]:
    r = judging(writes)
    yield r
    r.stop()


def point(r: Reclaimer, *releases: Release) -> None:
    """The worker looks at these releases' pods (one batch)."""
    for x in releases:
        r.judged[x.holding.lease.podref] = [x]  # type: ignore[attr-defined]
    r.work([x.holding.lease.podref for x in releases])


def test_the_pool_waiting_longest_is_written_next_not_the_one_just_written(
    reclaimer: Reclaimer, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One writer. While pool a is written, releases come for b, c, a again and b again: then b
    (both of its releases in one write), c, and a last. A writer that stayed on a until it had
    nothing left would write a again first, and under a burst the pools behind it would wait."""
    monkeypatch.setattr(reclaim, "WRITERS", 1)
    writes.held.add("a")
    point(reclaimer, release("a", 1, "p1"))
    wait_for("a's write began", lambda: len(writes.order) == 1)
    point(reclaimer, release("b", 2, "p2"))
    point(reclaimer, release("c", 3, "p3"))
    point(reclaimer, release("a", 4, "p4"))
    point(reclaimer, release("b", 5, "p5"))
    writes.held.clear()
    writes.gate.set()
    reclaimer.flush(10)
    assert writes.order == [
        ("a", ["ns/p1"]),
        ("b", ["ns/p2", "ns/p5"]),
        ("c", ["ns/p3"]),
        ("a", ["ns/p4"]),
    ]
    assert dict(reclaimer.released) == {"pod-gone": 5}


def test_a_pool_is_written_by_one_writer_at_a_time_while_the_others_go_on(
    reclaimer: Reclaimer, writes: Writes
) -> None:
    """Its base copy (the next PUT's) and the test of each lease assume one write of a pool at a
    time: a release for a pool being written waits for that write, while other pools are written."""
    writes.held.add("a")
    point(reclaimer, release("a", 1, "p1"))
    wait_for("a's write began", lambda: len(writes.order) == 1)
    point(reclaimer, release("a", 2, "p2"))
    point(reclaimer, release("b", 3, "p3"))
    wait_for("b written meanwhile", lambda: ("b", ["ns/p3"]) in writes.order)
    assert [w for w in writes.order if w[0] == "a"] == [("a", ["ns/p1"])]
    writes.gate.set()
    reclaimer.flush(10)
    assert writes.order[-1] == ("a", ["ns/p2"])
    assert writes.most_at_once == {"a": 1, "b": 1}
    assert reclaimer._writes_idle() and reclaimer._writers == 0


def test_a_write_that_raises_leaves_the_writers_able_to_go_on(
    reclaimer: Reclaimer, writes: Writes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one write is logged and counted; the writer takes the next pool, the count of
    writers comes back to zero (flush returns, the reservation deletes stop waiting), and a later
    release of that pool is written."""
    monkeypatch.setattr(reclaim, "WRITERS", 1)
    writes.fail.add("a")
    point(reclaimer, release("a", 1, "p1"), release("b", 2, "p2"))
    reclaimer.flush(10)
    assert [pool for pool, _ in writes.order] == ["a", "b"]
    assert reclaimer.errors == 1 and reclaimer._writers == 0 and reclaimer._writes_idle()
    point(reclaimer, release("a", 3, "p3"))
    reclaimer.flush(10)
    assert writes.order[-1] == ("a", ["ns/p3"])
    assert dict(reclaimer.released) == {"pod-gone": 2}


def test_many_pools_at_once_never_run_more_writers_than_writers(reclaimer: Reclaimer, writes: Writes) -> None:
    """Every pool pending is written, each once, by at most WRITERS writers."""
    writes.held.update(f"p{i}" for i in range(40))
    point(reclaimer, *[release(f"p{i}", i + 1, f"pod{i}") for i in range(40)])
    wait_for("every writer busy", lambda: len(writes.order) == reclaim.WRITERS)
    assert reclaimer._writers == reclaim.WRITERS
    writes.gate.set()
    reclaimer.flush(10)
    assert sorted(pool for pool, _ in writes.order) == sorted(f"p{i}" for i in range(40))
    assert reclaimer._writers == 0


def test_failures_meanwhile_wait_on_one_retry_timer(
    reclaimer: Reclaimer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep failing on thousands of pods (the API server away) must not start a timer thread
    for each: every failure until the timer fires joins it, and all are looked at again then."""
    timers: list[tuple[float, Any]] = []
    monkeypatch.setattr(reclaim, "_after", lambda seconds, fn, *args: timers.append((seconds, fn)))
    notified: list[str] = []
    reclaimer.notify = lambda refs: notified.extend(refs)  # type: ignore[method-assign]
    for i in range(2000):
        reclaimer._later({f"ns/p{i}"})
    assert [seconds for seconds, _ in timers] == [reclaim.RETRY_SECONDS]
    timers[0][1]()
    assert sorted(notified) == sorted(f"ns/p{i}" for i in range(2000))
    reclaimer._later({"ns/again"})  # a later failure starts the next timer
    assert len(timers) == 2
