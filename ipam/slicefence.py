"""What a node may write in a range's slices (`ipam.nodeslices`): the check after every lease write
that the slice is still the node's, that networks without network_name do not share a range, and
where a requested address may go."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from netaddr import IPAddress

from . import errors
from .errors import CNIError
from .ranges import RangeSpec
from .slices import NodeSlices, clash_outcome, clashes, slice_spec
from .slicestate import LOCK, Shared, state_of, waiting
from .store.slicestore import SliceStore

if TYPE_CHECKING:
    from .engine import Assigned, Engine

_T = TypeVar("_T")


@dataclass
class SliceFence:
    """The fences of one node's slices of one range (for its `Slicer`)."""

    spec: RangeSpec
    pool_name: str  # the NodeSlicePool
    node: str
    network_name: str
    store: SliceStore

    def _shared_read(self, kind: str, engine: Engine, deadline: float, read: Callable[[], _T]) -> _T:
        """`read()` as begun after this call asked: the answer of a read another call of this process
        began after that, else one of its own (one at a time per NodeSlicePool and kind). A burst of
        ADDs whose lease writes have ended shares one read."""
        with LOCK:
            shared = state_of(self.store).checks.setdefault((self.pool_name, kind), Shared())
            ticket = shared.started
        with waiting(shared.lock, engine, deadline):
            with LOCK:
                if shared.last is not None and shared.last[0] > ticket:
                    return cast(_T, shared.last[1])
                shared.started += 1
                number = shared.started
            value = read()
            with LOCK:
                shared.last = (number, value)
            return value

    def still_held(
        self, engine: Engine, slice_range: str, deadline: float, read: Callable[[], NodeSlices]
    ) -> bool:
        """Whether the NodeSlicePool, read after a lease was written into `slice_range`'s pool, still
        gives that slice to this node: the fence that keeps a node from answering an address of a
        slice it lost (issue 22). `read`: a read of the whole NodeSlicePool (the slicer's, which remembers it).

        A check *before* the write cannot be enough: the lease goes into this node's own slice pool,
        and the node that is given the slice next writes its own pool (another object), so nothing
        would refuse a write made after the slice changed hands. Checked after the write, instead, an
        answered lease was in the slice pool while the NodeSlicePool gave the slice to this node; from
        then on the slice only moves by reclaim, whose fence (the retired mark, a conditional write)
        fails on a pool holding a lease (as does `ipamctl delete-nodeslicepool`'s), or by someone freeing
        a slice that holds leases (deleting the NodeSlicePool by hand, a foreign controller), which
        README forbids. A write the check
        finds in a lost slice is rolled back (its token) before the call goes on elsewhere.

        Every answered lease is checked, with or without overlapping-range reservations: a reservation
        keeps an address from two pods only when both make one, and a network's NADs (or its nodes'
        flat files) may differ in `enable_overlapping_ranges`.

        The read is cheap: the NodeSlicePool's metadata alone (uid, resourceVersion); unchanged since
        this process read the whole object (not only memory: this read is begun after the write), its
        entries are those remembered. Changed, the whole object is read. Concurrent calls share reads
        (only one begun after this call's write counts). A store that cannot give the version alone
        (the file store: a file's version restarts when it is made again) is read whole."""
        probe = getattr(self.store, "node_slices_version", None)
        if probe is not None:
            seen: list[object] = [None]

            def step() -> bool:
                seen[0] = probe(self.pool_name)
                return True

            def version() -> object:
                engine._retry(self.pool_name, deadline, step)
                return seen[0]

            now = self._shared_read("version", engine, deadline, version)
            if now is None:  # no NodeSlicePool: no slice is held
                return False
            with LOCK:
                cached = state_of(self.store).pools.get(self.pool_name)
            if cached is not None and cached.version and (cached.uid, cached.version) == now:
                return self._held_alone(engine, deadline, cached, slice_range)
        pool = self._shared_read("pool", engine, deadline, read)
        return self._held_alone(engine, deadline, pool, slice_range)

    def _held_alone(self, engine: Engine, deadline: float, pool: NodeSlices, slice_range: str) -> bool:
        """`pool` (as it is now) gives the slice to this node; without network_name, also: no other
        network without one takes the range (else CNIError 103, see `slices.clashes`). Judged once
        per NodeSlicePool uid: another such network made later is refused by its own judgement, and
        this one is judged again when its NodeSlicePool is made again."""
        if slice_range not in pool.held_by(self.node):
            return False
        if self.network_name:
            return True
        if pool.network_name:  # a named network's mark: other networks' checks would pass this one by
            raise CNIError(
                errors.DATASTORE_ERROR,
                f"NodeSlicePool {self.pool_name} is marked as network_name {pool.network_name[:63]!r}'s, "
                "but this network has no network_name: other networks without one would not see it "
                "on the range",
                f"set network_name in the ipam config of network {self.pool_name}",
            )
        with LOCK:
            if pool.uid and state_of(self.store).alone.get(self.pool_name) == pool.uid:
                return True
        found: list[list[NodeSlices]] = [[]]

        def step() -> bool:
            found[0] = self.store.list_node_slices()
            return True

        engine._retry(self.pool_name, deadline, step)
        others = clashes(pool, found[0])
        if others:
            raise CNIError(
                errors.DATASTORE_ERROR,
                f"NodeSlicePool {self.pool_name} and NodeSlicePool(s) {', '.join(others)} cut overlapping "
                f"ranges ({self.spec.cidr}) for networks without network_name: their slice pools and "
                "reservations share names, so they would give one address to two pods",
                f"set network_name in the ipam config of network {self.pool_name} (each network on this "
                f"range needs its own); {clash_outcome(pool, [o for o in found[0] if o.name in others])}",
            )
        with LOCK:
            if pool.uid:
                state_of(self.store).alone[self.pool_name] = pool.uid
        return True

    def add_wanted(
        self, pool: NodeSlices, address: IPAddress, add_in: Callable[[str], Assigned | str]
    ) -> Assigned:
        """A requested or static address: only in a slice this node holds, written in that slice's pool
        as any lease of the node. One in another node's slice, or in a slice no node holds, is refused:
        only the slice's holder writes its pool, so the address can never be given twice. `pool`: the
        NodeSlicePool as read now; `add_in`: a lease in one slice of this node, or why not."""
        for entry in pool.entries:
            if address not in slice_spec(self.spec, entry.slice_range).network:
                continue
            if entry.node == self.node:
                done = add_in(entry.slice_range)
                if not isinstance(done, str):
                    return done
                why = f"its slice {entry.slice_range} of this node cannot take a lease now ({done})"
            elif entry.node:
                why = f"it lies in slice {entry.slice_range} of node {entry.node}"
            else:
                why = f"it lies in slice {entry.slice_range}, which no node holds yet"
            break
        else:
            why = f"it lies in no slice of NodeSlicePool {self.pool_name}"
        raise CNIError(
            errors.ADDRESS_TAKEN,
            f"requested address {address} is not available on node {self.node}: {why}",
            "with node_slice_size a requested address is given only on a node holding its slice",
        )
