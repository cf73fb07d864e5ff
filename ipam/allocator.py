"""Pure allocation logic over one pool's leases. No I/O, no clocks, no randomness.

A pool's leases map an address's offset from the range's network address to a `Lease`, exactly the
shape of Whereabouts' `IPPool.spec.allocations`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .ranges import RangeSpec

_KNOWN_FIELDS = ("id", "podref", "ifname", "node", "poduid", "created")


@dataclass(frozen=True)
class Lease:
    """Who holds an address: container id, pod reference (`ns/name`) and interface name.

    `node`, `poduid` and `created` are our optional extras; a lease written by Whereabouts (or one
    whose extras a foreign CRD schema pruned) has them empty, and nothing may depend on them being set.
    `extra` keeps fields we do not know, so a rewrite never drops another writer's data.
    """

    id: str
    podref: str = ""
    ifname: str = ""
    node: str = ""
    poduid: str = ""
    created: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def owned_by(self, podref: str, ifname: str, container_id: str) -> bool:
        """Same attachment: by pod reference + interface, or by container id + interface without a pod."""
        if self.ifname and ifname and self.ifname != ifname:
            return False
        if podref and self.podref:
            return self.podref == podref
        return self.id == container_id

    def held_by_container(self, container_id: str, ifname: str) -> bool:
        """This container on this interface (an empty ifname on either side matches any)."""
        return self.id == container_id and (not ifname or not self.ifname or self.ifname == ifname)

    def reservation_spec(self) -> dict[str, str]:
        """`spec` of an OverlappingRangeIPReservation held by this lease (Whereabouts' fields + ours)."""
        spec = {"containerid": self.id, "podref": self.podref, "ifname": self.ifname}
        if self.node:
            spec["node"] = self.node
        if self.created:
            spec["created"] = self.created
        return spec

    @classmethod
    def from_reservation(cls, spec: Mapping[str, Any]) -> Lease:
        """The holder named by an OverlappingRangeIPReservation's `spec`."""
        return cls(str(spec.get("containerid", "")), str(spec.get("podref", "")), str(spec.get("ifname", "")))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["id"] = self.id
        out["podref"] = self.podref
        if self.ifname:
            out["ifname"] = self.ifname
        for name in ("node", "poduid", "created"):
            value = getattr(self, name)
            if value:
                out[name] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lease:
        if not isinstance(data, Mapping) or not isinstance(data.get("id", ""), str):
            raise ValueError(f"lease is not an object with a string 'id': {data!r}")
        values = {k: str(data.get(k) or "") for k in _KNOWN_FIELDS}
        extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
        return cls(extra=extra, **values)


Allocations = dict[int, Lease]


def parse_allocations(raw: Mapping[str, Any]) -> Allocations:
    """Decode `spec.allocations`; raises ValueError on anything that is not offset -> lease."""
    out: Allocations = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"allocation key {key!r} is not a decimal offset")
        if int(key) in out:
            raise ValueError(f"allocation key {key!r} repeats offset {int(key)}")
        out[int(key)] = Lease.from_json(value)
    return out


def dump_allocations(allocations: Allocations) -> dict[str, dict[str, Any]]:
    return {str(offset): allocations[offset].to_json() for offset in sorted(allocations)}


@dataclass(frozen=True)
class Request:
    """One attachment asking for (or giving back) an address."""

    container_id: str
    ifname: str
    podref: str = ""
    poduid: str = ""
    node: str = ""
    created: str = ""

    def lease(self) -> Lease:
        return Lease(self.container_id, self.podref, self.ifname, self.node, self.poduid, self.created)


@dataclass(frozen=True)
class Decision:
    """What `allocate` chose: the offset, the pool's new leases, and whether they differ from the old."""

    offset: int
    allocations: Allocations
    changed: bool
    reused: bool


def find_owner(allocations: Allocations, request: Request) -> int | None:
    for offset in sorted(allocations):
        if allocations[offset].owned_by(request.podref, request.ifname, request.container_id):
            return offset
    return None


def find_container(allocations: Allocations, container_id: str, ifname: str) -> list[int]:
    """Offsets leased to this container on this interface (an empty ifname matches any)."""
    return sorted(
        offset for offset, lease in allocations.items() if lease.held_by_container(container_id, ifname)
    )


def lowest_free(spec: RangeSpec, taken_offsets: Iterable[int]) -> int | None:
    """Lowest allocatable offset not in `taken_offsets`.

    Cost is O(intervals + taken), independent of the range size: leased runs are skipped with a
    sorted list, excluded blocks by the precomputed intervals.
    """
    base = int(spec.network.first)
    taken = sorted({base + off for off in taken_offsets})
    for lo, hi in spec.intervals:
        candidate = lo
        index = bisect_left(taken, candidate)
        while index < len(taken) and taken[index] == candidate:
            candidate += 1
            index += 1
        if candidate <= hi:
            return candidate - base
    return None


def allocate(
    spec: RangeSpec, allocations: Allocations, request: Request, skip: Iterable[int] = ()
) -> Decision | None:
    """Choose the address for `request`: its existing lease if it has a usable one, else the lowest free.

    `skip` holds offsets known to be taken elsewhere (an overlapping range's reservation).
    Returns None when the range is exhausted.
    """
    base = int(spec.network.first)
    skip = set(skip)
    current = find_owner(allocations, request)
    if current is not None and spec.contains(base + current) and current not in skip:
        lease = allocations[current]
        wanted = Lease(
            request.container_id,
            request.podref or lease.podref,
            request.ifname or lease.ifname,
            request.node or lease.node,
            request.poduid or lease.poduid,
            lease.created or request.created,
            lease.extra,
        )
        if wanted == lease:
            return Decision(current, allocations, changed=False, reused=True)
        updated = dict(allocations)
        updated[current] = wanted
        return Decision(current, updated, changed=True, reused=True)
    remaining = dict(allocations)
    if current is not None:  # its old address is no longer allocatable under this config
        del remaining[current]
    offset = lowest_free(spec, set(remaining) | skip)
    if offset is None:
        return None
    remaining[offset] = request.lease()
    return Decision(offset, remaining, changed=True, reused=False)


def release(allocations: Allocations, container_id: str, ifname: str) -> tuple[Allocations, list[int]]:
    """Drop this container's leases on `ifname`; releasing something unknown is not an error."""
    gone = find_container(allocations, container_id, ifname)
    if not gone:
        return allocations, []
    return {k: v for k, v in allocations.items() if k not in gone}, gone


def release_stale(
    allocations: Allocations, valid: set[tuple[str, str]], node: str
) -> tuple[Allocations, list[int]]:
    """GC: drop leases made on `node` whose (container id, ifname) is not in `valid`.

    A lease without a node (written by Whereabouts, or pruned) is never released here.
    """
    gone = sorted(
        offset
        for offset, lease in allocations.items()
        if lease.node and lease.node == node and (lease.id, lease.ifname) not in valid
    )
    return {k: v for k, v in allocations.items() if k not in gone}, gone
