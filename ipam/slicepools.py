"""A node's slice pools as `ipam.nodeslices` looks at them before an ADD: as this process last wrote
them, and which one already holds an attachment's lease (so a repeated ADD gets its address back)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .allocator import Request, allocate, find_owner
from .errors import PoolRetiredError
from .ranges import RangeSpec
from .store.base import PoolSnapshot

if TYPE_CHECKING:
    from .engine import Engine


def remembered(engine: Engine, name: str, cidr: str) -> PoolSnapshot | None:
    """The slice pool as this process last wrote it, if no other process of this node has written
    it since (its node lock's generation is unchanged). Other nodes never write a node's slice
    pools and the reconciler only removes leases, so a decision that reads it stays sound: a
    lease it shows that is gone now is found gone by that slice's own conditional write."""
    cache = engine.pool_cache
    if cache is None:
        return None
    return cache.unchanged(name, engine.store.pool_generation(name), cidr)


def remembered_full(engine: Engine, name: str, sub: RangeSpec, request: Request) -> bool:
    """Whether the slice pool `name` (of range `sub`) is full for this attachment as remembered (no
    address, and no lease of its own there); a slice not remembered is not known to be full."""
    snap = remembered(engine, name, sub.cidr)
    return snap is not None and allocate(sub, snap.allocations, request) is None


def owner_first(
    engine: Engine,
    held: Sequence[str],
    names: Callable[[str], tuple[str, RangeSpec]],
    request: Request,
    deadline: float,
) -> list[str]:
    """`held` with the slice whose pool already holds this attachment's lease moved to the front
    (`names`: a slice's pool name and range).

    With one slice there is nothing to search. With several, each later slice pool is looked at:
    as this process last wrote it when no other process of the node has written it since, else
    read (a GET): the cost of never giving a repeated ADD a second address in an earlier slice
    that has room again."""
    order = list(held)
    if len(order) < 2:
        return order
    snap: list[PoolSnapshot | None] = [None]
    for s in order[1:]:
        name, sub = names(s)

        def step(name: str = name, cidr: str = sub.cidr) -> bool:
            try:
                snap[0] = engine.store.read_pool(name, cidr)
            except PoolRetiredError:  # being returned: it holds no lease
                snap[0] = None
            return True

        known = remembered(engine, name, sub.cidr)
        if known is not None:
            snap[0] = known
        else:
            engine._retry(name, deadline, step)
        found = snap[0]
        if found is not None and find_owner(found.allocations, request) is not None:
            order.remove(s)
            return [s, *order]
    return order
