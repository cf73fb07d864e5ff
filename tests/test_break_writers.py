"""Adversarial tests of the controller's pool writers (Reclaimer._write_oldest) and of the paths that
queue a pod again after a failure (Reclaimer._guard, _later). No API server: the releaser is a fake
whose writes wait at gates, the judgement is given, and the retry timer (`reclaim._after`) is caught
so that a retry fires when the test says, not after a delay."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from ipam.audit import Holding, Reservation
from ipam.controller import reclaim
from ipam.controller.reclaim import Reclaimer
from ipam.controller.rules import Release
from ipam.errors import TransientStoreError
from ipam.reconcile import Summary
from tests.test_controller import wait_for
from tests.test_reclaim_writers import Writes, judging, point, release

BOUND = 5.0  # how long a wait_for waits for what must happen (a failure bound, not a timing claim)


class Releaser(Writes):
    """Writes, plus: pools whose next write reports a store error (as release_leases does when it
    caught one) or raises a transient error, each write's end and each reservation delete in one
    log, and which leases the pool still holds (a lease is released once)."""

    def __init__(self) -> None:
        super().__init__()
        self.report: set[str] = set()  # next write: summary.errors += 1, nothing released
        self.transient: set[str] = set()  # next write raises TransientStoreError
        self.log: list[tuple[str, str, int]] = []  # ("written" | "unreserved", pool, offset)
        self.gone: set[tuple[str, int, str]] = set()  # (pool, offset, container) released
        self.unreserved = threading.Event()

    def release_leases(self, held: Sequence[Holding], summary: Summary | None = None) -> list[int]:
        pool = held[0].pool.name
        if pool in self.held and (pool in self.report or pool in self.transient):
            assert self.gate.wait(10)
        if pool in self.report:
            self.report.discard(pool)
            assert summary is not None
            summary.errors += 1
            return []
        if pool in self.transient:
            self.transient.discard(pool)
            raise TransientStoreError(f"write of {pool}: HTTP 503")
        offsets = super().release_leases(held, summary)
        with self.lock:
            out = []
            for h in held:  # the conditional write: a lease already gone is not released again
                key = (pool, h.offset, h.lease.id)
                if key not in self.gone:
                    self.gone.add(key)
                    out.append(h.offset)
            self.log.extend(("written", pool, o) for o in offsets)
        return out

    def release_reservation(
        self, h: Holding, summary: Summary | None = None, cached: Reservation | None = None
    ) -> None:
        with self.lock:
            self.log.append(("unreserved", h.pool.name, h.offset))
        self.unreserved.set()


class Timers:
    """reclaim._after caught: each (seconds, fn, args), fired by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, Callable[..., None], tuple[Any, ...]]] = []

    def __call__(self, seconds: float, fn: Callable[..., None], *args: Any) -> None:
        with self.lock:
            self.calls.append((seconds, fn, args))

    def fire(self) -> float:
        with self.lock:
            seconds, fn, args = self.calls.pop(0)
        fn(*args)
        return seconds


@pytest.fixture
def releaser() -> Releaser:
    return Releaser()


@pytest.fixture
def timers(monkeypatch: pytest.MonkeyPatch) -> Timers:
    t = Timers()
    monkeypatch.setattr(reclaim, "_after", t)
    return t


@pytest.fixture
def leader() -> threading.Event:
    e = threading.Event()
    e.set()
    return e


@pytest.fixture
def reclaimer(releaser: Releaser, leader: threading.Event) -> Iterator[Reclaimer]:
    r = judging(releaser, leader.is_set)
    # every pod the tests name is one the caches point at (a retry's notify queues it again)
    r.suspicious = lambda ref: True  # type: ignore[method-assign]
    r.ready = True
    yield r
    releaser.gate.set()
    r.stop()


# -- breaks: each fails on the code before the fix ------------------------------------------------


def test_a_look_that_fails_is_asked_again_only_after_the_retry_delay(
    reclaimer: Reclaimer, timers: Timers
) -> None:
    """The pod GET meets a 429 (or 503, or a refused connection): the pod is looked at again
    RETRY_SECONDS later. Before the fix `_guard` put it straight back in the worker's queue, and the
    worker, finding its queue not empty, asked again at once: a loop of GETs as fast as the API
    server refused them, against a server that was asking for fewer."""
    fired = threading.Event()
    looks: list[bool] = []  # per look: had the retry timer fired yet

    def judge(ref: str) -> list[Release]:
        looks.append(fired.is_set())
        if len(looks) == 1 or not fired.is_set():
            raise TransientStoreError("get pod ns/p: HTTP 429 Too Many Requests")
        return []

    reclaimer.judge = judge  # type: ignore[method-assign]
    reclaimer.start()
    reclaimer.notify(["ns/p"])
    wait_for("a retry timer or a second look", lambda: bool(timers.calls) or len(looks) >= 2, BOUND)
    assert looks == [False], f"looked at again {len(looks) - 1} times before any retry delay"
    fired.set()
    assert timers.fire() == reclaim.RETRY_SECONDS
    wait_for("the second look, after the delay", lambda: len(looks) == 2, BOUND)
    assert looks == [False, True]
    assert reclaimer.errors == 1


def test_a_write_that_raises_a_transient_error_has_its_pods_looked_at_again(
    reclaimer: Reclaimer, releaser: Releaser, timers: Timers
) -> None:
    """A pool write raised TransientStoreError (a releaser that does not fold it into its summary):
    `_guard` queued the pods again, but from a writer thread and without waking the worker, which
    slept on until some unrelated event came; in a quiet cluster the lease stayed leaked until the
    CronJob. Now it is retried RETRY_SECONDS later, like a write that reported its error."""
    looks: list[str] = []
    x = release("a", 1, "p1")

    def judge(ref: str) -> list[Release]:
        looks.append(ref)
        return [x]

    asleep = threading.Event()

    class Cond(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            asleep.set()  # the worker found its queue empty and waits to be woken
            return super().wait(timeout)

    reclaimer._cond = Cond()
    reclaimer.judge = judge  # type: ignore[method-assign]
    releaser.held.add("a")
    releaser.transient.add("a")
    reclaimer.start()
    wait_for("the worker waiting", asleep.is_set, BOUND)
    asleep.clear()
    reclaimer.notify(["ns/p1"])
    wait_for("a's write began", lambda: reclaimer._writing == {"a"}, BOUND)
    wait_for("the worker waiting again", asleep.is_set, BOUND)
    releaser.gate.set()  # the write raises now, while the worker sleeps
    wait_for("the failed write", lambda: reclaimer.errors == 1, BOUND)
    reclaimer.flush(BOUND)
    wait_for("a retry planned or a second look", lambda: bool(timers.calls) or len(looks) >= 2, BOUND)
    while timers.calls:
        timers.fire()
    wait_for("looked at again and released", lambda: dict(reclaimer.released) == {"pod-gone": 1}, BOUND)
    assert looks == ["ns/p1", "ns/p1"]
    assert releaser.order == [("a", ["ns/p1"])]  # the failed write raised before it was recorded


def test_a_lease_released_while_the_controller_stops_still_has_its_reservation_deleted(
    reclaimer: Reclaimer, releaser: Releaser
) -> None:
    """stop() (SIGTERM: a rollout) while a pool write is on the wire: the write goes through and the
    lease leaves the pool, but the reservation deletes' executor is shut down, so `submit` raised
    RuntimeError inside release(): logged as a bug, the reservation left behind. Its address stayed
    reserved (an ADD of it refused) until the CronJob's pass. Now deleted by the writer itself."""
    releaser.held.add("a")
    point(reclaimer, release("a", 1, "p1"))
    wait_for("a's write began", lambda: len(releaser.order) == 1, BOUND)
    reclaimer.stop()
    releaser.gate.set()
    wait_for("the write done", lambda: ("written", "a", 1) in releaser.log, BOUND)
    assert releaser.unreserved.wait(BOUND), "the released lease's reservation was never deleted"
    assert releaser.log == [("written", "a", 1), ("unreserved", "a", 1)]
    assert reclaimer.errors == 0


# -- the scheduler's promises (these hold; kept as regression tests) ------------------------------


def test_a_writer_exiting_while_its_pool_is_written_leaves_nothing_pending_unwritten(
    reclaimer: Reclaimer, releaser: Releaser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two writers. a is being written; a release for a comes: work() starts a second writer, which
    finds only a pending, being written, and exits. The first writer, once done, writes it."""
    monkeypatch.setattr(reclaim, "WRITERS", 2)
    releaser.held.add("a")
    point(reclaimer, release("a", 1, "p1"))
    wait_for("a's write began", lambda: len(releaser.order) == 1, BOUND)
    point(reclaimer, release("a", 2, "p2"))
    wait_for("the second writer gave up", lambda: reclaimer._writers == 1, BOUND)
    assert list(reclaimer._pending) == ["a"] and reclaimer._writing == {"a"}
    releaser.gate.set()
    reclaimer.flush(BOUND)
    assert releaser.order == [("a", ["ns/p1"]), ("a", ["ns/p2"])]
    assert reclaimer._writers == 0 and reclaimer._writes_idle()


def test_the_same_lease_judged_again_while_its_pool_is_written_is_written_and_counted_once(
    reclaimer: Reclaimer, releaser: Releaser
) -> None:
    releaser.held.add("a")
    x = release("a", 1, "p1")
    point(reclaimer, x)
    wait_for("a's write began", lambda: len(releaser.order) == 1, BOUND)
    point(reclaimer, x)
    assert "a" not in reclaimer._pending
    releaser.gate.set()
    reclaimer.flush(BOUND)
    point(reclaimer, x)  # judged once more from a cache that has not seen the write yet
    reclaimer.flush(BOUND)
    assert dict(reclaimer.released) == {"pod-gone": 1}
    assert [u for u in releaser.log if u[0] == "unreserved"] == [("unreserved", "a", 1)]


def test_a_lease_skipped_as_in_flight_during_a_failed_write_is_released_on_the_retry(
    reclaimer: Reclaimer, releaser: Releaser, timers: Timers
) -> None:
    """The write of a reports a store error; meanwhile the same lease was judged again and skipped as
    in flight. The retry looks at the pod again and releases it, counted once."""
    releaser.held.add("a")
    releaser.report.add("a")
    x = release("a", 1, "p1")
    point(reclaimer, x)
    wait_for("a's write began", lambda: len(releaser.order) == 0 and reclaimer._writing == {"a"}, BOUND)
    point(reclaimer, x)  # skipped: in flight
    releaser.gate.set()
    reclaimer.flush(BOUND)
    assert reclaimer.errors == 1 and not reclaimer.released
    assert not reclaimer._in_flight and not reclaimer._pending
    assert timers.fire() == reclaim.RETRY_SECONDS
    reclaimer.work(reclaimer.take())
    reclaimer.flush(BOUND)
    assert dict(reclaimer.released) == {"pod-gone": 1}


def test_leadership_lost_mid_write_drops_what_is_pending_and_the_writers_stop(
    reclaimer: Reclaimer, releaser: Releaser, leader: threading.Event, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write under way completes (a conditional write: harmless); b, pending, is not written by
    a replica no longer leading; the count of writers comes back to zero; leading again, b is."""
    monkeypatch.setattr(reclaim, "WRITERS", 1)
    releaser.held.add("a")
    point(reclaimer, release("a", 1, "p1"))
    wait_for("a's write began", lambda: len(releaser.order) == 1, BOUND)
    point(reclaimer, release("b", 2, "p2"))
    leader.clear()
    releaser.gate.set()
    reclaimer.flush(BOUND)
    assert releaser.order == [("a", ["ns/p1"])]
    assert reclaimer._writers == 0 and reclaimer._writes_idle() and not reclaimer._in_flight
    leader.set()
    point(reclaimer, release("b", 2, "p2"))
    reclaimer.flush(BOUND)
    assert releaser.order[-1] == ("b", ["ns/p2"])
    assert dict(reclaimer.released) == {"pod-gone": 2}


def test_every_reservation_is_deleted_after_its_lease_left_the_pool(
    reclaimer: Reclaimer, releaser: Releaser, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b's reservation waits for the pool writes at most DEFER_SECONDS (a's write is held), a's waits
    for a's write: no reservation is deleted before its lease left the pool."""
    monkeypatch.setattr(reclaim, "DEFER_SECONDS", 0.2)
    releaser.held.add("a")
    point(reclaimer, release("a", 1, "p1"), release("b", 2, "p2"))
    wait_for("b's reservation deleted", lambda: ("unreserved", "b", 2) in releaser.log, BOUND)
    assert ("unreserved", "a", 1) not in releaser.log
    releaser.gate.set()
    reclaimer.flush(BOUND)
    wait_for("a's reservation deleted", lambda: ("unreserved", "a", 1) in releaser.log, BOUND)
    for kind, pool, offset in releaser.log:
        if kind == "unreserved":
            assert releaser.log.index(("written", pool, offset)) < releaser.log.index((kind, pool, offset))


def test_concurrent_batches_write_every_lease_once_one_writer_per_pool_at_most_writers(
    reclaimer: Reclaimer, releaser: Releaser
) -> None:
    """Four threads hand batches to work() at once (with lookers and writers racing): every lease is
    released once, no pool is written twice at a time, never more than WRITERS writes at once, and
    the writers' count comes back to zero."""
    rng = random.Random(7)
    most = [0]
    now = [0]
    lock = threading.Lock()
    inner = releaser.release_leases

    def counted(held: Sequence[Holding], summary: Summary | None = None) -> list[int]:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            return inner(held, summary)
        finally:
            with lock:
                now[0] -= 1

    releaser.release_leases = counted  # type: ignore[method-assign]
    xs = [release(f"pool{rng.randrange(12)}", i + 1, f"pod{i}") for i in range(200)]
    for x in xs:
        reclaimer.judged[x.holding.lease.podref] = [x]  # type: ignore[attr-defined]
    refs = [x.holding.lease.podref for x in xs]

    def feed(k: int) -> None:
        for start in range(k * 5, len(refs), 20):
            reclaimer.work(refs[start : start + 5] + rng.sample(refs, 3))  # some looked at twice

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND * 4)
    reclaimer.flush(BOUND * 4)
    assert sum(reclaimer.released.values()) == 200
    assert len(releaser.gone) == 200
    assert all(n <= 1 for n in releaser.most_at_once.values())
    assert most[0] <= reclaim.WRITERS
    assert reclaimer._writers == 0 and reclaimer._writes_idle()


def test_a_batch_worked_after_stop_leaves_the_writers_count_true(reclaimer: Reclaimer) -> None:
    """stop() waits 10 s at most for the worker: a batch whose GETs outlast it reaches the writers
    after their executor was shut down. Before the fix `submit` raised out of work() (the worker
    thread died on it) with the writers it had counted never started, so `_writers` stayed above
    zero for good."""
    looking, go = threading.Event(), threading.Event()
    x = release("a", 1, "p1")

    def judge(ref: str) -> list[Release]:
        looking.set()
        assert go.wait(BOUND)
        return [x]

    reclaimer.judge = judge  # type: ignore[method-assign]
    raised: list[BaseException] = []

    def worker() -> None:
        try:
            reclaimer.work(["ns/p1"])
        except BaseException as exc:  # what the worker thread would have died of
            raised.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    assert looking.wait(BOUND)
    reclaimer.stop()  # the GET still on the wire
    go.set()
    t.join(BOUND)
    assert not t.is_alive() and raised == []
    assert reclaimer._writers == 0
