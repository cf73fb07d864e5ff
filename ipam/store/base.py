"""The small interface every datastore implements, so the engine's retry loop is written once."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from ..allocator import Allocations, Lease
from ..errors import RangeTakenError
from ..ranges import same_network


@dataclass(frozen=True)
class PoolSnapshot:
    """A pool as read: its leases and the version a conditional write must still find.

    `version` is None when the pool does not exist yet (the write then creates it).
    `token` is the store's own bookkeeping for the conditional write.
    """

    name: str
    cidr: str
    allocations: Allocations
    version: str | None
    token: Any = field(default=None, compare=False)


# An OverlappingRangeIPReservation made by whereabouts-py records the address it reserves here: two
# networks' addresses can map to one reservation name (see `name_taken`).
ADDRESS_ANNOTATION = "whereabouts-py.cni.cncf.io/address"

_RENAME = (
    "two (network_name, range) pairs map to this one name (IPv6 ':' become '-', so a network name can "
    "read as the start of an address): set a different `network_name` for one of the two networks"
)


def recorded_address(reservation: Mapping[str, Any]) -> str:
    """The address a reservation object records (ADDRESS_ANNOTATION); "" when it records none (Whereabouts)."""
    return str(((reservation.get("metadata") or {}).get("annotations") or {}).get(ADDRESS_ANNOTATION) or "")


def check_range(name: str, recorded: str, wanted: str) -> None:
    """Refuse a pool that records another range than the one this network allocates from: its
    offsets would be read as another range's addresses (`wanted` "" when the caller has no range)."""
    if wanted and recorded and not same_network(recorded, wanted):
        raise RangeTakenError(
            f"IPPool {name} records range {recorded}, but this network's range is {wanted}; {_RENAME}"
        )


def name_taken(name: str, recorded: str, wanted: str) -> RangeTakenError:
    """Reservation `name` reserves address `recorded` of another network, not `wanted`."""
    return RangeTakenError(
        f"reservation {name} reserves address {recorded}, so it cannot reserve this network's {wanted}; {_RENAME}",
    )


@dataclass(frozen=True)
class Turn:
    """A writer turn held on a shared pool (ipam.turns): the WriterTurn object as created."""

    name: str
    uid: str
    version: str


@dataclass(frozen=True)
class StandingTurn:
    """A writer turn as listed (the reconciler removes abandoned ones)."""

    turn: Turn
    holder: str
    created: datetime | None  # the object's creationTimestamp


class TurnsUnavailable(Exception):
    """The datastore cannot keep writer turns (no WriterTurn CRD, or no RBAC for it)."""


def turn_name(pool: str) -> str:
    """The WriterTurn of pool `pool`: `whereabouts-py.<pool>`, shortened with a digest of the
    pool's name when that would pass the 253 characters of an object name."""
    name = f"whereabouts-py.{pool}"
    if len(name) <= 253:
        return name
    import hashlib

    # cut before a '.' the name would go on with a label starting '-': not a valid object name
    return f"{name[:200].rstrip('.-')}-{hashlib.sha256(pool.encode()).hexdigest()[:16]}"


@runtime_checkable
class TurnStore(Protocol):
    """A store several nodes write the same pool through (Kubernetes): it can keep a writer turn per
    pool, so that contending writers take turns instead of refusing each other's writes."""

    def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None: ...

    def current_turn(self, pool: str) -> Turn | None: ...

    def end_turn(self, turn: Turn) -> None: ...


@runtime_checkable
class LeaseRemoval(Protocol):
    """A store that removes given leases in one step that checks each is unchanged, without reading
    the pool first (Kubernetes: a JSON patch testing each lease). Release paths try it before the
    engine's read-and-write loop, which stays the fallback."""

    def remove_leases(self, name: str, leases: Mapping[int, Lease]) -> bool:
        """True: every lease was removed; False: nothing was written (one is no longer exactly as
        given, or the pool is gone)."""
        ...


class Store(Protocol):
    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        """The pool's leases and version; an empty snapshot with version None when it does not exist."""
        ...

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> PoolSnapshot | None:
        """Replace the pool's leases if it is still at `snapshot.version`; else raise ConflictError.

        Returns the pool as the write left it (its new version, the leases as stored) when the store's
        answer carries it (the API server's does), else None."""
        ...

    def list_pools(self) -> list[PoolSnapshot]:
        """Every pool this store holds (reconciler, STATUS)."""
        ...

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        """Claim the overlapping-range reservation `name` of `address` for `lease`.

        Returns None when it is now held by the same attachment (pod reference + interface), or the
        other holder's lease when it belongs to someone else. A reservation recording another address
        (ADDRESS_ANNOTATION: another network's address with the same name) is `name_taken`.
        """
        ...

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        """Delete reservation `name` if this container holds it; a missing one is fine."""
        ...

    def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[int | None]:
        """Node-local lock serialising this node's writers of one pool; yields the lock's generation
        (ipam.store.locks), or None when the store does not count them."""
        ...

    def pool_generation(self, name: str, settled: bool = False) -> int | None:
        """The generation of the pool's node lock now; None when unknown (never taken, not counted;
        `settled`: also while anyone holds it, see ipam.store.locks.pool_generation)."""
        ...

    def check_reachable(self) -> None:
        """Raise CNIError when the datastore cannot be used right now."""
        ...

    def close(self) -> None: ...
