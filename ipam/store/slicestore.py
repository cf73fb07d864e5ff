"""What node slices need from a datastore beyond `Store`: the NodeSlicePool object, and a raw view of
slice pools so reclaim can fence ("retire") one before returning its slice.

A store may also offer `node_slices_version(name) -> (uid, resourceVersion) | None`, the NodeSlicePool's
identity as of now without its entries (the Kubernetes store: a GET of its metadata alone); the check
after every lease write (`slicefence.SliceFence.still_held`) then reads the whole object only when it
changed. Without it the whole object is read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

from ..slices import NodeSlices, SliceEntry
from .base import PoolSnapshot


@dataclass(frozen=True)
class SlicePoolView:
    """A pool as reclaim sees it: `snapshot.version` None when absent; `retired` when fenced;
    `changed` the last time it was written, when the store knows."""

    snapshot: PoolSnapshot
    retired: bool
    changed: datetime | None


@runtime_checkable
class SliceStore(Protocol):
    def read_node_slices(self, name: str) -> NodeSlices | None:
        """The NodeSlicePool `name`, or None when it does not exist."""
        ...

    def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        """Replace its status allocations if still at `pool.version` (create it when None);
        ConflictError otherwise (also when another writer created it first)."""
        ...

    def list_node_slices(self) -> list[NodeSlices]: ...

    def delete_node_slices(self, pool: NodeSlices) -> None:
        """Delete the NodeSlicePool if it is still exactly `pool` (its uid and version: a precondition
        of the delete itself); ConflictError otherwise; gone already is fine."""
        ...

    def inspect_pool(self, name: str, cidr: str) -> SlicePoolView:
        """The pool, retired or not (read_pool refuses retired ones)."""
        ...

    def retire_pool(self, view: SlicePoolView) -> None:
        """Mark the pool retired if still at `view.snapshot.version` (create it marked when absent);
        ConflictError otherwise. A retired pool refuses every later read_pool, so no lease lands in it."""
        ...

    def delete_pool(self, name: str, version: str) -> None:
        """Delete the pool if still at `version`; ConflictError otherwise; gone already is fine."""
        ...
