"""Giving node slices back: the reconciler's reclaim, and deleting a NodeSlicePool safely.

A node answers a lease only after reading, once the lease is written, that the NodeSlicePool still
gives it the slice (`slicefence.SliceFence.still_held`). So a slice may be freed only when no lease can
be in its pool or land there, which the *retired* mark makes sure of: a conditional write of the slice
pool (or a marked create when it is absent) made after reading that it holds no lease; a lease
written in between makes the mark's write fail, and a retired pool refuses every later write. Only
then is the slice freed (a conditional write of the NodeSlicePool) and the pool deleted.

- `reclaim_slices` (ipam-reconcile, ipamctl repair): slices of gone nodes, and live nodes' spare empty
  slices, once idle for the grace.
- `delete_node_slices` (ipamctl delete-nodeslicepool): every slice of one NodeSlicePool, then the
  NodeSlicePool itself with a delete conditional on its uid and version (so only once every slice is
  free: a node that claimed one meanwhile changed the version), refused while any slice holds a lease.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from netaddr import IPAddress, IPNetwork

from .errors import CNIError, ConflictError, TransientStoreError
from .log import log
from .ranges import same_network
from .slices import (
    NodeSlices,
    Returnable,
    SlicePoolState,
    network_prefixes,
    reclaimable,
    release,
    slice_pool_name,
)
from .store.base import PoolSnapshot
from .store.slicestore import SlicePoolView, SliceStore


def _with_retries(step: Callable[[], None], attempts: int = 8) -> None:
    for i in range(attempts):
        try:
            step()
            return
        except (ConflictError, TransientStoreError):
            if i == attempts - 1:
                raise
            time.sleep(0.01 * (2**i))


def _views(store: SliceStore, nsp: NodeSlices) -> dict[tuple[str, str], list[SlicePoolView]]:
    """The pools of every held slice, by (node, slice). A slice pool may be named with the
    NodeSlicePool's name as network name or without one (the pool is named after `network_name`,
    else after the network's `name`, which leaves no prefix): both candidates are looked at."""
    views: dict[tuple[str, str], list[SlicePoolView]] = {}
    for e in nsp.entries:
        if e.node:
            names = dict.fromkeys(
                [slice_pool_name(e.node, e.slice_range, nsp.name), slice_pool_name(e.node, e.slice_range)]
            )
            # a pool by that name recording another range is another network's (names collide): not judged,
            # never fenced nor deleted
            inspected = [store.inspect_pool(n, e.slice_range) for n in names]
            views[(e.node, e.slice_range)] = [
                v
                for v in inspected
                if v.snapshot.version is None or same_network(v.snapshot.cidr, e.slice_range)
            ]
    return views


def _where(nsp: str, r: Returnable) -> str:
    return f"nodeslicepool={nsp} slice={r.slice_range} node={r.node} reason={r.reason}"


def _give_back(
    store: SliceStore,
    nsp: str,
    r: Returnable,
    views: Sequence[SlicePoolView],
    before_free: Callable[[str, str], None] | None = None,
) -> str:
    """Fence the slice's pools (as `views` read them: empty), free the slice, delete the pools. The
    report line: `return ...`, `kept ...` (a pool changed: a lease may have landed) or `error ...`."""
    where = _where(nsp, r)
    try:
        for v in views:
            if not v.retired:
                store.retire_pool(v)
    except ConflictError:
        return f"kept {where} (its pool changed: a lease may have landed)"
    if before_free is not None:
        before_free(r.node, r.slice_range)

    def free() -> None:
        current = store.read_node_slices(nsp)
        if current is None:
            return
        entries = release(current, r.node, r.slice_range)
        if entries is not None:
            store.write_node_slices(current, entries)

    try:
        _with_retries(free)
        for v in views:
            after = store.inspect_pool(v.snapshot.name, r.slice_range)
            if after.retired and not after.snapshot.allocations and after.snapshot.version:

                def drop(name: str = after.snapshot.name, version: str = str(after.snapshot.version)) -> None:
                    store.delete_pool(name, version)

                _with_retries(drop)
    except (ConflictError, TransientStoreError, CNIError) as exc:
        return f"error {where}: {exc}"
    log.info("slice.return", nodeslicepool=nsp, slice=r.slice_range, node=r.node, reason=r.reason)
    return f"return {where}"


def reclaim_slices(
    store: SliceStore,
    live_nodes: set[str],
    grace: float,
    dry_run: bool,
    now: datetime | None = None,
    before_free: Callable[[str, str], None] | None = None,
) -> list[str]:
    """Return slices of nodes that no longer exist, and live nodes' spare empty slices, after `grace`
    seconds without a change to their pool. One report line per slice (`would-return` in a dry run).
    `before_free` is a test hook run between fencing and freeing."""
    now = now or datetime.now(UTC)
    lines: list[str] = []
    for nsp in store.list_node_slices():
        views = _views(store, nsp)
        states: dict[str, SlicePoolState] = {}
        for (node, s), found in views.items():
            stamps = [v.changed for v in found if v.changed is not None]
            states[slice_pool_name(node, s, nsp.name)] = SlicePoolState(
                sum(len(v.snapshot.allocations) for v in found),
                max(stamps) if stamps else None,
                any(v.snapshot.version is not None for v in found),
            )
        for r in reclaimable(nsp, live_nodes, states, now, grace, nsp.name):
            if dry_run:
                lines.append(f"would-return {_where(nsp.name, r)}")
            else:
                lines.append(_give_back(store, nsp.name, r, views[(r.node, r.slice_range)], before_free))
    return lines


def return_slices(store: object, grace: float, dry_run: bool, now: datetime | None = None) -> list[str]:
    """`reclaim_slices` for ipam-reconcile (and ipamctl): live nodes from the API; errors as lines."""
    list_nodes = getattr(store, "list_nodes", None)
    if not isinstance(store, SliceStore) or list_nodes is None:
        return []
    try:
        if not store.list_node_slices():
            return []
        live: set[str] = list_nodes()
        return reclaim_slices(store, live, grace, dry_run, now)
    except (CNIError, ConflictError, TransientStoreError) as exc:
        return [f"error returning node slices: {exc}"]


def slice_network_prefixes(store: object, pools: Sequence[PoolSnapshot]) -> dict[str, str]:
    """Which network name the reservations of each slice pool carry (see `slices.network_prefixes`);
    empty when the store has no NodeSlicePools. The reconciler must use it: deriving the prefix from a
    slice pool's name would take the node for part of the network name."""
    if not isinstance(store, SliceStore):
        return {}
    return network_prefixes(store.list_node_slices(), [p.name for p in pools])


# -- deleting a NodeSlicePool ---------------------------------------------------------------------


class SlicesInUse(Exception):
    """The NodeSlicePool has slices whose pools hold leases: `busy` names each (and its leases)."""

    def __init__(self, name: str, busy: list[str], lines: list[str]) -> None:
        super().__init__(f"NodeSlicePool {name} still has leases: " + "; ".join(busy))
        self.busy = busy
        self.lines = lines  # what was done before the leases were found (slices returned)


class KeptChanging(Exception):
    """Nodes kept claiming slices of the NodeSlicePool while it was being deleted."""


def _busy(slice_range: str, node: str, views: Sequence[SlicePoolView]) -> str | None:
    """The slice and its leases (up to three named), when any of its pools holds one."""
    held = [(v.snapshot.name, o, lease) for v in views for o, lease in sorted(v.snapshot.allocations.items())]
    if not held:
        return None
    first = IPNetwork(slice_range).first
    named = ", ".join(
        f"{IPAddress(first + o)} ({lease.podref or lease.id}, pool {name})" for name, o, lease in held[:3]
    )
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    return f"slice {slice_range} of node {node} holds {len(held)} lease(s): {named}{more}"


def delete_node_slices(
    store: SliceStore,
    name: str,
    dry_run: bool = False,
    attempts: int = 8,
) -> list[str]:
    """Delete the NodeSlicePool `name` without ever freeing a slice that holds a lease, or one that a
    lease is being written into. One report line per slice returned, then `delete nodeslicepool=NAME`
    (`would-...` in a dry run); LookupError when it does not exist; SlicesInUse (nothing deleted;
    nothing changed either, unless a lease landed while slices were being returned) while any
    slice's pool holds a lease; KeptChanging when nodes kept claiming slices.

    Each try: read it, refuse if a held slice's pool holds a lease, else return every held slice as
    the reconciler does (fence, free, delete the pool; grace 0, for this NodeSlicePool only). Then
    read it again: once no slice is held, delete it with a precondition on that uid and version. A
    node claiming a slice meanwhile changes the version: the delete is refused (409) and the next
    try looks again."""
    lines: list[str] = []
    for _ in range(attempts):
        nsp = store.read_node_slices(name)
        if nsp is None:
            if lines:  # deleted by someone else after this call returned its slices
                return lines
            raise LookupError(f"NodeSlicePool {name} does not exist")
        views = _views(store, nsp)
        busy = [b for (node, s), found in views.items() if (b := _busy(s, node, found))]
        if busy:
            raise SlicesInUse(name, busy, lines)
        returning = [Returnable(node, s, "delete") for node, s in views]
        if dry_run:
            return [f"would-return {_where(name, r)}" for r in returning] + [
                f"would-delete nodeslicepool={name}"
            ]
        done = [_give_back(store, name, r, views[(r.node, r.slice_range)]) for r in returning]
        lines += done
        if any(not line.startswith("return ") for line in done):
            continue  # a pool changed (a lease may have landed) or a write failed: look again
        current = store.read_node_slices(name)
        if current is None:
            return lines
        if any(e.node for e in current.entries):
            continue  # a node claimed a slice since: return it too, or find its lease
        try:
            store.delete_node_slices(current)
        except ConflictError:
            continue
        log.info("nodeslicepool.delete", nodeslicepool=name, uid=current.uid, version=current.version)
        return [*lines, f"delete nodeslicepool={name}"]
    raise KeptChanging(
        f"NodeSlicePool {name} kept changing over {attempts} tries (nodes claiming slices, or writes failing: "
        "see the lines above); stop the pods of this network and run the command again"
    )
