"""Per process and per store state of node slices (`ipam.nodeslices`, `ipam.slicefence`): the fenced
view of the store slice pools are written through, the NodeSlicePools as last read, the in-process
locks, and the reads shared between calls."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from . import errors
from .allocator import Allocations, Lease
from .errors import CNIError, PoolRetiredError
from .slices import NodeSlices
from .store.base import PoolSnapshot, Store

if TYPE_CHECKING:
    from .engine import Engine


class FencedStore:
    """The store as slice pools see it: an absent slice pool is not created by a write of the engine
    (PoolRetiredError(absent=True)); `Slicer` creates it after checking the node holds the slice."""

    def __init__(self, inner: Store) -> None:
        # weakly: the per-store state below holds this, and must not keep its store alive
        self.inner: Store = cast(Store, weakref.proxy(inner))

    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        snap = self.inner.read_pool(name, cidr)
        if snap.version is None:
            raise PoolRetiredError(name, absent=True)
        return snap

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> PoolSnapshot | None:
        return self.inner.write_pool(snapshot, allocations)

    def list_pools(self) -> list[PoolSnapshot]:
        return self.inner.list_pools()

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        return self.inner.reserve(name, lease, address)

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        self.inner.unreserve(name, container_id, ifname)

    def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[int | None]:
        return self.inner.pool_lock(name, timeout)

    def pool_generation(self, name: str, settled: bool = False) -> int | None:
        return self.inner.pool_generation(name, settled)

    def check_reachable(self) -> None:
        self.inner.check_reachable()

    def close(self) -> None:
        self.inner.close()


# Per process and per store (the agent keeps its stores warm; an evicted one takes this with it):
# NodeSlicePools as last read, one claim at a time per NodeSlicePool, the slice pools this process
# made (after checking its node holds the slice) and when (see nodeslices), and the store's fenced view (one per store,
# so the agent's coalescer keys stay stable).


@dataclass
class StoreState:
    fenced: FencedStore
    pools: dict[str, NodeSlices] = field(default_factory=dict)
    claims: dict[str, threading.Lock] = field(default_factory=dict)
    reading: dict[str, threading.Lock] = field(default_factory=dict)
    created: dict[str, float] = field(default_factory=dict)
    # the node's claim stamp (see Slicer._stamp) each cached NodeSlicePool was read or written at
    stamps: dict[str, int | None] = field(default_factory=dict)
    # the claim lock's generation a thread of this process holds now: (thread id, generation)
    holding: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    # how long a claim attempt (read + conditional write) took last, per NodeSlicePool: spaces the
    # retries of nodes racing for the same first free slice (each loser's read and refused write of a
    # 1,024-entry object costs the API server ~35 ms; straight back, the same nodes meet again)
    attempt_seconds: dict[str, float] = field(default_factory=dict)
    # the NodeSlicePool reads that check a lease write (see SliceFence.still_held), shared by the calls
    # whose writes ended before the read began
    checks: dict[tuple[str, str], Shared] = field(default_factory=dict)
    # networks without network_name: the uid of the NodeSlicePool found alone on its range (SliceFence._held_alone)
    alone: dict[str, str] = field(default_factory=dict)


@dataclass
class Shared:
    """One read at a time, its answer shared with every caller that asked before it began."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    started: int = 0
    last: tuple[int, object] | None = None


LOCK = threading.RLock()  # state_of() is called with it held
STATE: weakref.WeakKeyDictionary[object, StoreState] = weakref.WeakKeyDictionary()


def state_of(store: object) -> StoreState:
    with LOCK:
        found = STATE.get(store)
        if found is None:
            found = STATE[store] = StoreState(FencedStore(cast(Store, store)))
        return found


def fenced(store: Store) -> FencedStore:
    return state_of(store).fenced


def forget_cache() -> None:
    """Drop what this process remembers about every store (tests)."""
    with LOCK:
        for state in STATE.values():
            state.pools.clear()
            state.claims.clear()
            state.reading.clear()
            state.created.clear()
            state.stamps.clear()
            state.checks.clear()
            state.alone.clear()


@contextmanager
def waiting(lock: threading.Lock, engine: Engine, deadline: float) -> Iterator[None]:
    """Hold an in-process lock, waiting for it no longer than the call's deadline."""
    if not lock.acquire(timeout=max(0.0, deadline - engine.clock())):
        raise CNIError(errors.TRY_AGAIN_LATER, "timed out waiting for another call of this node's agent")
    try:
        yield
    finally:
        lock.release()
