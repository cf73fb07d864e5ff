"""Node slices, the I/O side: where a range's leases live for this node, claiming a slice (giving
slices back, reclaim and deleting a NodeSlicePool, is `ipam.slicereturn`).

With `node_slice_size` the engine hands a sliced range to a `Slicer` (its `slicer` hook). The slicer
reads the NodeSlicePool (cached per process, so the agent keeps it warm), tries the node's slices in
order through the engine's own batch path (so the agent still coalesces, per slice pool), and when
they are all full claims the first free slice itself: a conditional write of the NodeSlicePool in the
engine's retry loop (created when absent; a 409 re-reads and takes the next free one).

Safety of returning a slice rests on two rules:
- reclaim first *retires* the slice pool (a conditional write of a mark, or a marked create when the
  pool is absent), and only then frees the slice; a retired pool refuses every read_pool, so an ADD
  racing with reclaim either wrote its lease first (the mark's write then conflicts and the slice is
  kept) or sees the mark and moves on;
- an ADD never creates a slice pool blindly: it re-reads the NodeSlicePool, creates the pool only when
  the node holds the slice, and re-reads once more after creating it (reclaim may have returned the
  slice in between).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

from . import errors
from .allocator import Allocations
from .errors import CNIError, ConflictError, PoolRetiredError
from .log import log
from .ranges import RangeSpec
from .slicefence import SliceFence
from .slicepools import owner_first, remembered_full
from .slicereturn import reclaim_slices as reclaim_slices  # reclaim moved there; still importable here
from .slicereturn import return_slices as return_slices
from .slices import (
    NodeSlices,
    checked,
    claim,
    exhausted_message,
    matches,
    slice_pool_name,
    slice_spec,
)
from .slicestate import LOCK as _LOCK
from .slicestate import StoreState as _StoreState
from .slicestate import fenced
from .slicestate import forget_cache as forget_cache  # moved there; still importable here
from .slicestate import state_of as _state
from .slicestate import waiting as _waiting
from .store.base import PoolSnapshot
from .store.slicestore import SliceStore

if TYPE_CHECKING:
    from .engine import AddOp, Assigned, Engine


CREATED_FRESH_SECONDS = 2.0  # other calls that found the same pool absent retry at once


@dataclass
class Slicer:
    """Node slices of one range for one node (the engine's `slicer` hook)."""

    spec: RangeSpec
    size_text: str
    prefix: int
    pool_name: str  # the NodeSlicePool
    node: str
    network_name: str
    store: SliceStore
    reads: list[str] = field(default_factory=list)  # NodeSlicePool reads, for tests and the bench

    def covers(self, spec: RangeSpec) -> bool:
        return spec == self.spec

    @property
    def _st(self) -> _StoreState:
        return _state(self.store)

    def _names(self, slice_range: str) -> tuple[str, RangeSpec]:
        return slice_pool_name(self.node, slice_range, self.network_name), slice_spec(self.spec, slice_range)

    def _shift(self, sub: RangeSpec) -> int:
        """Add to a slice pool's offset to get the range's."""
        return int(sub.network.first) - int(self.spec.network.first)

    @property
    def _fence(self) -> SliceFence:
        return SliceFence(self.spec, self.pool_name, self.node, self.network_name, self.store)

    def _sub_engine(self, engine: Engine) -> Engine:
        return replace(engine, store=fenced(engine.store), slicer=None)

    # -- the NodeSlicePool ----------------------------------------------------------------------

    def _checked(self, pool: NodeSlices | None) -> NodeSlices:
        return checked(pool, self.pool_name, self.spec, self.size_text, self.prefix, self.network_name)

    @property
    def _claim_lock_name(self) -> str:
        return f"nodeslicepool-{self.pool_name}-{self.node}"

    def _stamp(self, settled: bool = False) -> int | None:
        """The generation of this node's claim lock (every claim by any process of the node takes
        it; None: never taken, or the store does not count).

        A slice another process of the node claimed (a direct-mode call, an evicted datastore client
        of the agent) is missing from this process's cached NodeSlicePool, and a repeated ADD whose
        lease sits in it would take a second address in a slice the cache knows: a cache read at
        another generation is read again (a local file read, no API request).

        `settled`: the generation a read made now may be noted at. A claim in progress (its holder
        already counted, its write not made yet) gives None, unless this thread is that holder."""
        generation = getattr(self.store, "pool_generation", None)
        if generation is None:
            return None
        if not settled:
            return cast("int | None", generation(self._claim_lock_name))
        with _LOCK:
            holder = self._st.holding.get(self.pool_name)
        if holder is not None and holder[0] == threading.get_ident():
            return holder[1]
        return cast("int | None", generation(self._claim_lock_name, settled=True))

    def _remember(self, pool: NodeSlices, stamp: int | None) -> None:
        with _LOCK:
            self._st.pools[self.pool_name] = pool
            self._st.stamps[self.pool_name] = stamp

    def _cached(self) -> NodeSlices | None:
        """The cached NodeSlicePool, unless the node claimed a slice since it was read, or it cuts
        another range or slice size than this config (another network with the same network_name
        read it): a read then gives this config the answer direct mode gives (code 103)."""
        stamp = self._stamp()
        with _LOCK:
            pool = self._st.pools.get(self.pool_name)
            if pool is not None and self._st.stamps.get(self.pool_name) != stamp:
                return None
        if pool is not None and not matches(pool, self.spec, self.prefix):
            return None
        return pool

    def _read(self, engine: Engine, deadline: float, refresh: bool) -> NodeSlices:
        if not refresh:
            cached = self._cached()
            if cached is not None:
                return cached
            with _LOCK:
                holder = self._st.holding.get(self.pool_name)
                claims = self._st.claims.get(self.pool_name)
            if holder is not None and holder[0] != threading.get_ident() and claims is not None:
                # another call of this process is claiming: the list it leaves is the one to use
                with _waiting(claims, engine, deadline):
                    pass
                cached = self._cached()
                if cached is not None:
                    return cached
            # a cold cache: one read for every call arriving at once (a NodeSlicePool of a /16 cut in
            # /26 slices is 1,024 entries, ~12 ms of the API server's CPU per read)
            with _LOCK:
                lock = self._st.reading.setdefault(self.pool_name, threading.Lock())
            with _waiting(lock, engine, deadline):
                cached = self._cached()
                if cached is not None:
                    return cached
                return self._read(engine, deadline, refresh=True)
        found: list[NodeSlices | None] = [None]
        # before the read, and with no claim in progress: a claim after it makes the next call read again
        stamp = self._stamp(settled=True)

        def step() -> bool:
            found[0] = self.store.read_node_slices(self.pool_name)
            return True

        engine._retry(self.pool_name, deadline, step)
        self.reads.append(self.pool_name)
        pool = self._checked(found[0])
        if stamp is None and self._stamp() is not None:
            # a claim was in progress when the read began (the lock held, its write maybe not made):
            # this read is good for this call only; what the claimer remembers is not overwritten (in
            # a burst every call reading now would otherwise leave a list that the next call re-reads)
            return pool
        self._remember(pool, stamp)
        return pool

    def _still_held(self, engine: Engine, slice_range: str, deadline: float) -> bool:
        """Whether the NodeSlicePool, read after a lease was written into `slice_range`'s pool, still
        gives that slice to this node (`slicefence.SliceFence.still_held`)."""
        return self._fence.still_held(
            engine, slice_range, deadline, lambda: self._read(engine, deadline, True)
        )

    @contextmanager
    def _claiming(self, engine: Engine, deadline: float) -> Iterator[int | None]:
        with _LOCK:
            lock = self._st.claims.setdefault(self.pool_name, threading.Lock())
        # this node's processes claim one at a time (a lock per node: on the file store all share a dir)
        name = self._claim_lock_name
        with (
            _waiting(lock, engine, deadline),
            engine.store.pool_lock(name, max(0.0, deadline - engine.clock())) as generation,
        ):
            with _LOCK:
                self._st.holding[self.pool_name] = (threading.get_ident(), generation)
            try:
                yield generation
            finally:
                with _LOCK:
                    self._st.holding.pop(self.pool_name, None)

    def _claim(self, engine: Engine, deadline: float, tried: set[str]) -> NodeSlices:
        """Give this node the first free slice (or find one another caller just claimed for it)."""
        out: list[NodeSlices | None] = [None]

        def step() -> bool:
            pool = self._checked(self.store.read_node_slices(self.pool_name))
            if any(s not in tried for s in pool.held_by(self.node)):
                out[0] = pool
                return True
            entries = claim(pool, self.node, skip=tried)
            if entries is None:
                raise CNIError(
                    errors.POOL_EXHAUSTED, exhausted_message(self.spec, self.size_text, pool, self.node)
                )
            started = engine.clock()
            try:
                self.store.write_node_slices(pool, entries)
            finally:
                with _LOCK:
                    self._st.attempt_seconds[self.pool_name] = engine.clock() - started
            out[0] = replace(pool, entries=entries)
            new = [e.slice_range for e in entries if e.node == self.node and e.slice_range not in tried]
            log.info("slice.claim", nodeslicepool=self.pool_name, node=self.node, slices=new)
            return True

        with self._claiming(engine, deadline) as generation:
            with _LOCK:
                cached = self._st.pools.get(self.pool_name)
                if (
                    cached is not None
                    and generation is not None
                    and self._st.stamps.get(self.pool_name) == generation - 1
                ):
                    self._st.stamps[self.pool_name] = generation  # no other process claimed in between
                elif generation is not None:
                    cached = None
            if cached is not None and any(s not in tried for s in cached.held_by(self.node)):
                return cached  # another call of this process claimed one while this one waited
            before = set(self._cached_held())
            # nodes claim one at a time through the NodeSlicePool's writer turn (ipam.turns): a burst
            # on a new network otherwise has every node refuse every other's claim, each refused
            # write of the whole NodeSlicePool (1,024 entries for a /16 in /26s) costing the API server
            # half a write, and the reads after them; only a courtesy, as for pools
            turns = engine.turn_waiter()
            if turns is None:
                engine._retry(self.pool_name, deadline, step, self._attempt_seconds)
            else:
                # ends in a letter: an IPPool's name ends in its prefix length, so never the same turn
                key = f"{self.pool_name}.nodeslicepool"
                with turns.held(key, deadline, self._attempt_seconds()):
                    engine._retry(self.pool_name, deadline, step, self._attempt_seconds)
            pool = out[0]
            assert pool is not None
            # the claim lock is held: every claim made so far is in what step read or wrote
            self._remember(pool, generation)
            # make the new slice's pool now, while this node's other calls wait for the claim: they
            # then find it instead of all taking the absent-pool path together
            for s in pool.held_by(self.node):
                if s not in before and s not in tried:
                    self._create_pool(engine, s, deadline, held=True)
        return pool

    def _attempt_seconds(self) -> float:
        with _LOCK:
            return self._st.attempt_seconds.get(self.pool_name, 0.0)

    def _cached_held(self) -> list[str]:
        with _LOCK:
            cached = self._st.pools.get(self.pool_name)
        return cached.held_by(self.node) if cached is not None else []

    def _create_pool(self, engine: Engine, slice_range: str, deadline: float, held: bool = False) -> bool:
        """Create the node's pool of a slice it holds; False when the slice is not (or no longer) its.
        `held`: the caller has just written the claim, so the first check is skipped."""
        name, sub = self._names(slice_range)
        with _LOCK:
            made = self._st.created.get(name)
        if made is not None and engine.clock() - made < CREATED_FRESH_SECONDS:
            return True  # another call of this process just made (and checked) it
        if not held and slice_range not in self._read(engine, deadline, refresh=True).held_by(self.node):
            return False

        def step() -> bool:
            # ConflictError: it exists (another caller made it, or reclaim's fence: read_pool will say)
            with suppress(ConflictError):
                written = engine.store.write_pool(PoolSnapshot(name, sub.cidr, {}, None), {})
                if (
                    engine.pool_cache is not None
                ):  # empty as made: its first batch and the owner search need no read
                    engine.pool_cache.remember(name, written)
            return True

        with engine._locked(name, deadline):  # the node lock, counted as this process's (PoolCache.acquired)
            engine._retry(name, deadline, step)
        # reclaim may have returned the slice between the read above and the create
        if slice_range not in self._read(engine, deadline, refresh=True).held_by(self.node):
            return False
        with _LOCK:
            self._st.created[name] = engine.clock()
        return True

    # -- ADD ------------------------------------------------------------------------------------

    def _add_in(self, engine: Engine, op: AddOp, slice_range: str, deadline: float) -> Assigned | str:
        """A lease in one slice (`op` filled in with range offsets), or why not: "full", "retired"
        (reclaim is returning it), "not-held"."""
        from .engine import AddOp, Assigned

        name, sub = self._names(slice_range)
        if sub.size() == 0:
            return "full"
        sub_engine = self._sub_engine(engine)
        for _ in range(3):
            sub_op = AddOp(sub, op.request, None if op.want is None else op.want - self._shift(sub))
            try:
                sub_engine._submit(name, sub.cidr, [sub_op], deadline)
            except PoolRetiredError as exc:
                if not exc.absent:
                    return "retired"
                with _LOCK:  # absent after all: whoever made it, it is gone (reclaim deletes returned ones)
                    self._st.created.pop(name, None)
                if self._create_pool(engine, slice_range, deadline):
                    continue
                return "not-held"
            if sub_op.error is None:
                assert sub_op.offset is not None
                try:
                    kept = self._still_held(engine, slice_range, deadline)
                except BaseException:
                    self._undo(engine, op, sub_op, slice_range)
                    raise
                if not kept:
                    log.info("slice.lost", nodeslicepool=self.pool_name, node=self.node, slice=slice_range)
                    self._undo(engine, op, sub_op, slice_range)
                    return "not-held"
                op.created = op.created or sub_op.created
                op.offset, op.reused = sub_op.offset + self._shift(sub), sub_op.reused
                return Assigned(op.spec, sub.address_at(sub_op.offset))
            op.created = op.created or sub_op.created
            if sub_op.error.code == errors.POOL_EXHAUSTED:
                return "full"
            raise sub_op.error
        return "not-held"

    def _undo(self, engine: Engine, op: AddOp, sub_op: AddOp, slice_range: str) -> None:
        """Take back the lease (and its reservation) this call wrote into a slice it must not use:
        only one still carrying the call's token, as the engine's rollback does."""
        from .engine import ReleaseOp

        name, sub = self._names(slice_range)
        request = op.request
        undo = ReleaseOp(request.container_id, request.ifname, token=request.token, untokened=sub_op.created)
        deadline = engine.clock() + engine.policy.rollback_seconds
        try:
            self._sub_engine(engine)._submit(name, sub.cidr, [undo], deadline)
            shift = self._shift(sub)
            engine.reservations.unreserve(
                self.spec, [o + shift for o in undo.released], request.container_id, request.ifname, deadline
            )
        except (CNIError, PoolRetiredError) as exc:  # the runtime's DEL and the reconciler clean up after
            log.error("rollback.failed", pool=name, error=str(exc))

    def add(self, engine: Engine, op: AddOp, deadline: float) -> Assigned:
        if op.want is not None:
            wanted = op.spec.address_at(op.want)
            pool = self._read(engine, deadline, refresh=True)
            return self._fence.add_wanted(pool, wanted, lambda s: self._add_in(engine, op, s, deadline))
        pool = self._read(engine, deadline, refresh=False)
        tried: set[str] = set()  # not again in this ADD
        unusable: set[str] = set()  # full or being returned: not worth claiming again
        assumed_full: set[str] = set()  # full as remembered, not read: read before claiming a slice
        shortcut = True
        while True:
            # the slice already holding this attachment's lease first, then the NodeSlicePool's order:
            # a repeated ADD gets its address back and never a second one in an earlier slice
            held = owner_first(engine, pool.held_by(self.node), self._names, op.request, deadline)
            for s in [s for s in held if s not in tried]:
                if shortcut and remembered_full(engine, *self._names(s), op.request):
                    # passing it costs nothing; a batch would re-read a full pool to be sure
                    tried.add(s)
                    unusable.add(s)
                    assumed_full.add(s)
                    continue
                done = self._add_in(engine, op, s, deadline)
                if not isinstance(done, str):
                    return done
                tried.add(s)
                if done != "not-held":
                    unusable.add(s)
            if assumed_full:  # a lease may have gone from one (the reconciler): look before claiming
                tried -= assumed_full
                unusable -= assumed_full
                assumed_full.clear()
                shortcut = False
                continue
            # no separate re-read here: the claim reads the NodeSlicePool afresh and takes a slice that
            # another process of this node claimed meanwhile before claiming one itself
            if engine.clock() >= deadline:
                raise CNIError(
                    errors.TRY_AGAIN_LATER,
                    f"no usable slice of range {self.spec.cidr} for node {self.node} within the deadline; try again later",
                )
            pool = self._claim(engine, deadline, unusable)
            tried -= set(pool.held_by(self.node)) - unusable

    # -- DEL / GC / CHECK / STATUS --------------------------------------------------------------

    def _each_held(
        self, engine: Engine, deadline: float, refresh: bool
    ) -> Iterator[tuple[str, str, RangeSpec]]:
        for s in self._read(engine, deadline, refresh).held_by(self.node):
            name, sub = self._names(s)
            yield s, name, sub

    def release(
        self,
        engine: Engine,
        spec: RangeSpec,
        container_id: str,
        ifname: str,
        deadline: float,
        token: str = "",
        untokened: bool = False,
    ) -> list[int]:
        """Give back this container's lease in whichever of the node's slices holds it (range offsets);
        with `token` (a rollback) only leases still carrying it, as `ReleaseOp` does."""
        from .engine import ReleaseOp

        sub_engine = self._sub_engine(engine)
        tried: set[str] = set()
        out: list[int] = []
        for refresh in (False, True):
            for s, name, sub in self._each_held(engine, deadline, refresh):
                if s in tried:
                    continue
                tried.add(s)
                op = ReleaseOp(container_id, ifname, token=token, untokened=untokened)
                try:
                    sub_engine._submit(name, sub.cidr, [op], deadline)
                except PoolRetiredError:
                    continue
                out += [o + self._shift(sub) for o in op.released]
            if out:
                break
        return out

    def mutate(
        self, engine: Engine, deadline: float, change: Callable[[Allocations], tuple[Allocations, list[int]]]
    ) -> list[int]:
        """`change` (over range offsets) applied to each of the node's slice pools."""
        sub_engine = self._sub_engine(engine)
        out: list[int] = []
        for _s, name, sub in self._each_held(engine, deadline, refresh=True):
            shift = self._shift(sub)

            def shifted(allocs: Allocations, shift: int = shift) -> tuple[Allocations, list[int]]:
                remaining, gone = change({o + shift: lease for o, lease in allocs.items()})
                return {o - shift: lease for o, lease in remaining.items()}, gone

            try:
                out += sub_engine.mutate_pool(name, sub.cidr, shifted, deadline)
            except PoolRetiredError:
                continue
        return out

    def leases(self, engine: Engine, deadline: float) -> Allocations:
        """Every lease in the node's slices, keyed by range offset."""
        out: Allocations = {}
        for _s, name, sub in self._each_held(engine, deadline, refresh=True):
            try:
                snap = engine.store.read_pool(name, sub.cidr)
            except PoolRetiredError:
                continue
            out.update({o + self._shift(sub): lease for o, lease in snap.allocations.items()})
        return out

    def free(self, engine: Engine, deadline: float) -> int:
        """Addresses this node can still hand out: free ones in its slices, and every free slice."""
        pool = self._read(engine, deadline, refresh=True)
        total = 0
        for e in pool.entries:
            name, sub = self._names(e.slice_range)
            if not e.node:
                total += sub.size()
            elif e.node == self.node:
                try:
                    used = len(engine.store.read_pool(name, sub.cidr).allocations)
                except PoolRetiredError:
                    continue
                total += max(0, sub.size() - used)
        return total
