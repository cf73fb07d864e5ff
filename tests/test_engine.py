"""The engine's retry loop, deadline, all-or-nothing ADD and overlapping-range reservations.

Time is a fake clock advanced by the injected sleep, so deadline tests are instant.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from ipam import errors
from ipam.allocator import Allocations, Request
from ipam.engine import Assigned, Engine, PoolCache, RetryPolicy
from ipam.errors import CNIError, ConflictError, TransientStoreError
from ipam.ranges import RangeSpec, build_range, pool_name
from ipam.store.base import PoolSnapshot
from ipam.store.file import FileStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FlakyStore(FileStore):
    """A real file store whose writes fail in scripted ways."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.fail_writes: list[Exception] = []  # raised in order, then writes succeed
        self.always: Exception | None = None
        self.writes = 0
        self.reads = 0

    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        self.reads += 1
        return super().read_pool(name, cidr)

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> None:
        self.writes += 1
        if self.always is not None:
            raise self.always
        if self.fail_writes:
            raise self.fail_writes.pop(0)
        super().write_pool(snapshot, allocations)

    def reservation_names(self) -> list[str]:
        if not self.reservations.is_dir():
            return []
        return sorted(p.stem for p in self.reservations.glob("*.json"))


@pytest.fixture
def store(tmp_path: Path) -> FlakyStore:
    return FlakyStore(str(tmp_path / "data"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def engine_for(store: FileStore, clock: FakeClock, deadline: float = 30.0, **kw: object) -> Engine:
    return Engine(
        store,
        RetryPolicy(deadline_seconds=deadline, backoff_initial=0.01, backoff_max=1.0),
        clock=clock.clock,
        sleep=clock.sleep,
        rng=random.Random(7),
        **kw,  # type: ignore[arg-type]
    )


def req(n: int, ifname: str = "net1") -> Request:
    return Request(container_id=f"c{n}", ifname=ifname, podref=f"ns/p{n}", node="n1")


def leases(store: FileStore, spec: RangeSpec, network_name: str = "") -> Allocations:
    return store.read_pool(pool_name(spec.cidr, network_name), spec.cidr).allocations


def addresses(assigned: list[Assigned]) -> list[str]:
    return [str(a.address) for a in assigned]


V4 = build_range("ipam", "10.0.0.0/24")


# -- conflicts, transient errors, deadline ------------------------------------------------------


def test_conflict_forever_gives_code_11_after_the_deadline_and_no_lease(
    store: FlakyStore, clock: FakeClock
) -> None:
    store.always = ConflictError("someone else wrote")
    engine = engine_for(store, clock, deadline=30.0)
    with pytest.raises(CNIError) as info:
        engine.add([V4], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert "10.0.0.0-24" in info.value.msg
    assert "someone else wrote" in info.value.details
    assert store.writes > 5  # it did retry
    assert engine.stats.conflicts == store.writes
    assert clock.now - 1000.0 <= 30.0  # never slept past the deadline
    assert clock.now - 1000.0 > 10.0  # ...but used a good part of it
    assert leases(store, V4) == {}
    assert store.reservation_names() == []  # the reservation claimed on each attempt was given back


def test_backoff_grows_and_is_capped(store: FlakyStore, clock: FakeClock) -> None:
    store.always = ConflictError("busy")
    with pytest.raises(CNIError):
        engine_for(store, clock, deadline=20.0).add([V4], req(1))
    assert clock.sleeps[0] <= 0.01
    assert max(clock.sleeps) <= 1.0
    assert max(clock.sleeps) > 0.4  # exponential growth reached the cap region
    assert all(s > 0 for s in clock.sleeps)


def test_thousands_of_fast_failures_within_the_deadline_end_in_code_11_not_a_traceback(
    store: FlakyStore, clock: FakeClock
) -> None:
    """A datastore failing at once on every attempt, with backoffs short against the deadline: past
    attempt 1,024 the backoff's 2**attempt no longer fits a float; the call still ends in its
    deadline's error."""
    store.always = TransientStoreError("connection refused")
    engine = Engine(
        store,
        RetryPolicy(deadline_seconds=0.2, backoff_initial=0.0001, backoff_max=0.0002),
        clock=clock.clock,
        sleep=clock.sleep,
        rng=random.Random(7),
    )
    with pytest.raises(CNIError) as info:
        engine.add([V4], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert len(clock.sleeps) > 1100


def test_a_few_conflicts_then_success(store: FlakyStore, clock: FakeClock) -> None:
    store.fail_writes = [ConflictError("c1"), ConflictError("c2")]
    engine = engine_for(store, clock)
    got = engine.add([V4], req(1))
    assert addresses(got) == ["10.0.0.1"]
    assert engine.stats.conflicts == 2 and len(clock.sleeps) == 2
    assert store.reads >= 3  # re-read after each conflict
    assert set(leases(store, V4)) == {1}


def test_transient_error_honours_retry_after(store: FlakyStore, clock: FakeClock) -> None:
    store.fail_writes = [TransientStoreError("429 too many requests", retry_after=5.0)]
    engine = engine_for(store, clock)
    got = engine.add([V4], req(1))
    assert addresses(got) == ["10.0.0.1"]
    assert clock.sleeps and clock.sleeps[0] >= 5.0
    assert engine.stats.transient == 1


def test_transient_retry_after_past_the_deadline_gives_up_at_once(
    store: FlakyStore, clock: FakeClock
) -> None:
    store.fail_writes = [TransientStoreError("503", retry_after=60.0)]
    with pytest.raises(CNIError) as info:
        engine_for(store, clock, deadline=10.0).add([V4], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert clock.sleeps == []
    assert leases(store, V4) == {}


def test_other_errors_are_not_retried(store: FlakyStore, clock: FakeClock) -> None:
    store.fail_writes = [CNIError(errors.IO_FAILURE, "disk full")]
    with pytest.raises(CNIError) as info:
        engine_for(store, clock).add([V4], req(1))
    assert info.value.code == errors.IO_FAILURE
    assert store.writes == 1 and clock.sleeps == []
    assert store.reservation_names() == []


def test_release_retries_conflicts_too(store: FlakyStore, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    engine.add([V4], req(1))
    store.fail_writes = [ConflictError("x")]
    gone = engine.release([V4], "c1", "net1")
    assert addresses(gone) == ["10.0.0.1"]
    assert leases(store, V4) == {}
    assert store.reservation_names() == []


# -- all-or-nothing across ranges --------------------------------------------------------------------


def test_second_range_exhausted_rolls_back_the_first(store: FlakyStore, clock: FakeClock) -> None:
    first = build_range("ipam", "10.0.0.0/24")
    second = build_range("ipam", "10.1.0.0/30")  # two addresses
    engine = engine_for(store, clock)
    engine.add([second], req(8))
    engine.add([second], req(9))
    with pytest.raises(CNIError) as info:
        engine.add([first, second], req(1))
    assert info.value.code == errors.POOL_EXHAUSTED
    assert "10.1.0.0/30" in info.value.msg
    assert leases(store, first) == {}
    assert set(leases(store, second)) == {1, 2}
    assert store.reservation_names() == ["10.1.0.1", "10.1.0.2"]
    # once there is room the same ADD succeeds with the lowest address of each range
    engine.release([second], "c9", "net1")
    assert addresses(engine.add([first, second], req(1))) == ["10.0.0.1", "10.1.0.2"]


def test_second_range_failing_to_write_rolls_back_the_first(store: FlakyStore, clock: FakeClock) -> None:
    first = build_range("ipam", "10.0.0.0/24")
    second = build_range("ipam", "fd00::/120")
    engine = engine_for(store, clock, deadline=5.0)

    original = store.write_pool

    def write(snapshot: PoolSnapshot, allocations: Allocations) -> None:
        if snapshot.name == pool_name(second.cidr) and len(allocations) > len(snapshot.allocations):
            raise ConflictError("second pool busy")
        original(snapshot, allocations)

    store.write_pool = write  # type: ignore[method-assign]
    with pytest.raises(CNIError) as info:
        engine.add([first, second], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert leases(store, first) == {}
    assert leases(store, second) == {}
    assert store.reservation_names() == []


def test_rollback_after_a_spent_deadline_still_retries_its_conflicts(
    store: FlakyStore, clock: FakeClock
) -> None:
    """The second range used up the deadline; undoing the first must not give up at its first conflict."""
    first = build_range("ipam", "10.0.0.0/24")
    second = build_range("ipam", "10.1.0.0/24")
    engine = engine_for(store, clock, deadline=5.0)
    original = store.write_pool
    rollback_conflicts = [
        ConflictError("busy") for _ in range(10)
    ]  # a busy pool: more than the time left allows

    def write(snapshot: PoolSnapshot, allocations: Allocations) -> None:
        if snapshot.name == pool_name(second.cidr):
            raise ConflictError("second pool busy")
        if snapshot.name == pool_name(first.cidr) and not allocations and rollback_conflicts:
            raise rollback_conflicts.pop()  # the rollback meets a few conflicts of its own
        original(snapshot, allocations)

    store.write_pool = write  # type: ignore[method-assign]
    with pytest.raises(CNIError) as info:
        engine.add([first, second], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert rollback_conflicts == []
    assert leases(store, first) == {}
    assert store.reservation_names() == []


def test_rollback_keeps_a_reused_lease(store: FlakyStore, clock: FakeClock) -> None:
    """A re-ADD that fails on the second range must not release the lease the pod already had."""
    first = build_range("ipam", "10.0.0.0/24")
    second = build_range("ipam", "10.1.0.0/32")
    engine = engine_for(store, clock)
    engine.add([first], req(1))
    engine.add([second], req(2))  # takes the only address of the second range
    with pytest.raises(CNIError) as info:
        engine.add([first, second], req(1))
    assert info.value.code == errors.POOL_EXHAUSTED
    [(offset, kept)] = leases(store, first).items()
    assert (offset, kept.id, kept.podref, kept.ifname) == (1, "c1", "ns/p1", "net1")
    assert kept.token.startswith("~")  # confirmed by the failed re-ADD, so no rollback of any call takes it


def test_multi_range_add_is_idempotent(store: FlakyStore, clock: FakeClock) -> None:
    ranges = [build_range("ipam", "10.0.0.0/24"), build_range("ipam", "fd00::/64")]
    engine = engine_for(store, clock)
    first = addresses(engine.add(ranges, req(1)))
    again = addresses(engine.add(ranges, Request("c1-new", "net1", "ns/p1", node="n1")))
    assert first == again == ["10.0.0.1", "fd00::1"]
    assert leases(store, ranges[0])[1].id == "c1-new"
    assert leases(store, ranges[1])[1].id == "c1-new"


# -- overlapping ranges ----------------------------------------------------------------------------


def test_overlapping_pools_never_share_an_address(store: FlakyStore, clock: FakeClock) -> None:
    wide = build_range("ipam", "10.9.0.0/24")
    narrow = build_range("ipam", "10.9.0.0/25")
    engine = engine_for(store, clock)
    a = addresses(engine.add([wide], req(1)))
    b = addresses(engine.add([narrow], req(2)))
    c = addresses(engine.add([wide], req(3)))
    assert (a, b, c) == (["10.9.0.1"], ["10.9.0.2"], ["10.9.0.3"])
    assert set(leases(store, wide)) == {1, 3} and set(leases(store, narrow)) == {2}
    # once released, the address is free for the other pool
    engine.release([wide], "c1", "net1")
    assert addresses(engine.add([narrow], req(4))) == ["10.9.0.1"]


def test_overlapping_pool_exhausted_by_the_other_pools_reservations(
    store: FlakyStore, clock: FakeClock
) -> None:
    wide = build_range("ipam", "10.9.0.0/29")
    narrow = build_range("ipam", "10.9.0.0/30")  # .1 and .2
    engine = engine_for(store, clock)
    engine.add([wide], req(1))
    engine.add([wide], req(2))
    with pytest.raises(CNIError) as info:
        engine.add([narrow], req(3))
    assert info.value.code == errors.POOL_EXHAUSTED
    assert leases(store, narrow) == {}
    assert store.reservation_names() == ["10.9.0.1", "10.9.0.2"]


def test_network_name_is_a_separate_address_space(store: FlakyStore, clock: FakeClock) -> None:
    spec = build_range("ipam", "10.9.0.0/24")
    plain = engine_for(store, clock)
    blue = engine_for(store, clock, network_name="blue")
    assert addresses(plain.add([spec], req(1))) == ["10.9.0.1"]
    assert addresses(blue.add([spec], req(2))) == ["10.9.0.1"]
    assert set(leases(store, spec)) == {1} and set(leases(store, spec, "blue")) == {1}
    assert store.reservation_names() == ["10.9.0.1", "blue-10.9.0.1"]
    assert (store.pools / "blue-10.9.0.0-24.json").is_file()


def test_without_overlapping_ranges_no_reservation_is_made(store: FlakyStore, clock: FakeClock) -> None:
    wide = build_range("ipam", "10.9.0.0/24")
    narrow = build_range("ipam", "10.9.0.0/25")
    engine = engine_for(store, clock, overlapping=False)
    assert addresses(engine.add([wide], req(1))) == ["10.9.0.1"]
    assert addresses(engine.add([narrow], req(2))) == ["10.9.0.1"]
    assert store.reservation_names() == []


def test_reservation_follows_a_re_add_with_a_new_container(store: FlakyStore, clock: FakeClock) -> None:
    spec = build_range("ipam", "10.9.0.0/24")
    engine = engine_for(store, clock)
    engine.add([spec], req(1))
    engine.add([spec], Request("c1-new", "net1", "ns/p1", node="n1"))
    engine.release([spec], "c1-new", "net1")
    assert leases(store, spec) == {}
    assert store.reservation_names() == []


# -- GC, CHECK helpers ------------------------------------------------------------------------------


def test_gc_releases_only_unlisted_leases_of_this_node(store: FlakyStore, clock: FakeClock) -> None:
    spec = build_range("ipam", "10.0.0.0/24")
    engine = engine_for(store, clock, network="net")
    for n in range(4):
        engine.add([spec], req(n))
    engine.add([spec], Request("c-other", "net1", "ns/other", node="n2"))
    engine.add([spec], Request("c-nonode", "net1", "ns/nonode"))
    gone = engine.gc([spec], {("c0", "net1"), ("c2", "net1")}, "n1")
    assert sorted(addresses(gone)) == ["10.0.0.2", "10.0.0.4"]
    assert sorted(lease.id for lease in leases(store, spec).values()) == ["c-nonode", "c-other", "c0", "c2"]
    assert store.reservation_names() == ["10.0.0.1", "10.0.0.3", "10.0.0.5", "10.0.0.6"]


def test_leases_of_and_free_counts(store: FlakyStore, clock: FakeClock) -> None:
    ranges = [build_range("ipam", "10.0.0.0/30"), build_range("ipam", "fd00::/126")]
    engine = engine_for(store, clock)
    assert [free for _, free in engine.free_counts(ranges)] == [2, 2]
    engine.add(ranges, req(1))
    assert sorted(addresses(engine.leases_of(ranges, "c1", "net1"))) == ["10.0.0.1", "fd00::1"]
    assert engine.leases_of(ranges, "c1", "net2") == []
    assert [free for _, free in engine.free_counts(ranges)] == [1, 1]


def test_pool_lock_timeout_is_code_11(store: FlakyStore, clock: FakeClock) -> None:
    """Another holder of the node lock past the deadline: try again later, nothing written."""
    engine = engine_for(store, clock, deadline=0.05)
    engine.clock = time.monotonic  # the lock wait is real; keep it short
    with store.pool_lock(pool_name(V4.cidr), 1.0), pytest.raises(CNIError) as info:
        engine.add([V4], req(1))
    assert info.value.code == errors.TRY_AGAIN_LATER
    assert "lock" in info.value.msg
    assert leases(store, V4) == {}


# -- a pool other nodes write too: spacing after conflicts, pacing of the next batches -------------


def test_after_a_conflict_the_next_attempt_waits_about_one_write_of_that_pool(
    store: FlakyStore, clock: FakeClock
) -> None:
    cache = PoolCache(clock=clock.clock)
    cache.wrote(pool_name(V4.cidr), 0.2)  # the agent measured: a write of this pool takes 0.2 s
    store.fail_writes = [ConflictError("c1"), ConflictError("c2")]
    engine = engine_for(store, clock, pool_cache=cache)
    engine.add([V4], req(1))
    # never straight back (the writer that won is still being served): one write's time, doubling
    assert 0.1 <= clock.sleeps[0] <= 0.2 and 0.2 <= clock.sleeps[1] <= 0.4
    assert len(clock.sleeps) == 2
    # the pool is contended now: the next batch waits before its first attempt, taking in more calls
    engine.add([V4], req(2))
    assert len(clock.sleeps) == 3 and clock.sleeps[2] > 0
    assert len(leases(store, V4)) == 2


def test_without_a_measured_write_time_conflicts_keep_the_short_backoff(
    store: FlakyStore, clock: FakeClock
) -> None:
    store.fail_writes = [ConflictError("c1")]
    engine_for(store, clock, pool_cache=PoolCache(clock=clock.clock)).add([V4], req(1))
    assert len(clock.sleeps) == 1 and clock.sleeps[0] <= 0.01


def test_the_pacing_window_widens_on_conflicts_up_to_a_cap_and_decays_to_nothing() -> None:
    cache = PoolCache()
    assert cache.pacing("p") == 0.0
    cache.wrote("p", 0.1)
    widths = []
    for _ in range(8):
        cache.contended("p", conflict=True)
        widths.append(cache.pacing("p"))
    assert widths[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6]) and max(widths) == pytest.approx(1.6)
    for _ in range(60):
        cache.contended("p", conflict=False)
    assert cache.pacing("p") == 0.0  # uncontended again: no wait before a batch
