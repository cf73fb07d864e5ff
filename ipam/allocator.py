"""Pure allocation logic over one pool's leases. No I/O, no clocks, no randomness.

A pool's leases map an address's offset from the range's network address to a `Lease`, exactly the
shape of Whereabouts' `IPPool.spec.allocations`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import shown
from .ranges import RangeSpec

# `kind`, `retained`, `sticky`, `until`: requested / static / retained leases
# (docs/requested-and-sticky-addresses.md); Whereabouts reads such a lease as an ordinary one.
_EXTRAS = ("node", "poduid", "created", "network", "token", "kind", "retained", "sticky", "until")
_KNOWN_FIELDS = ("id", "podref", "ifname", "attrs", *_EXTRAS)
# A lease's text fields and the most characters each may hold. The API server checks nothing inside
# `spec.allocations` (our CRD leaves it opaque: see crds/), so the reader does, with the bounds the CRD
# used to declare per field: a value of another JSON type, or a longer one, makes the pool unreadable
# (code 101) instead of reaching a pod lookup, a log line or a reservation. `attrs` that is not a
# string is ignored instead (`_parse_attrs`). ADD never writes more (cni.py checks CNI_ARGS' pod).
LEASE_FIELD_LIMITS: dict[str, int] = {
    "id": 256,
    "podref": 320,  # a 63-character namespace, '/', a 253-character pod name
    "ifname": 64,
    "ipamclaimref": 320,  # Whereabouts' field: checked, then kept as written
    "attrs": 4096,
    # the extras: packed in attrs, or separate fields in leases of the previous version
    "node": 253,
    "poduid": 128,
    "created": 64,
    "network": 1024,
    "token": 256,
    "kind": 64,
    "retained": 64,
    "sticky": 64,
    "until": 64,
}
_ESCAPES = (("%", "%25"), (";", "%3B"), ("=", "%3D"))  # `%` first: it escapes the others


def _escape(value: str) -> str:
    for char, code in _ESCAPES:
        value = value.replace(char, code)
    return value


_CODES = {code: char for char, code in _ESCAPES}


def _unescape(text: str) -> str:
    """Undo `_escape`; any other `%` is kept as it is (written by hand or by someone else)."""
    if "%" not in text:
        return text  # nearly every value: a pool of 1,000 leases reads 5,000 of them
    codes = _CODES
    out: list[str] = []
    i = 0
    while i < len(text):
        char = codes.get(text[i : i + 3].upper()) if text[i] == "%" else None
        out.append(char or text[i])
        i += 3 if char else 1
    return "".join(out)


def _parse_attrs(raw: Any) -> tuple[dict[str, str], tuple[str, ...]]:
    """`attrs` text -> (our extras found in it, the other entries exactly as written).

    Never raises: a value that is not a string is ignored (only a foreign writer or a hand edit makes
    one: the API server checks nothing inside a lease), an empty entry is dropped, and an entry we do not own
    (another key, a repeated key of ours, text without `=`) is kept verbatim to be written back; a
    repeated key of ours only while that extra has a value (`_shadowed`).
    """
    ours: dict[str, str] = {}
    others: list[str] = []
    if not isinstance(raw, str):
        return ours, ()
    for entry in raw.split(";"):
        key, eq, value = entry.partition("=")
        if not entry or (eq and key in _EXTRAS and not value):
            continue  # carries nothing (we never write an empty extra)
        if eq and key in _EXTRAS and key not in ours:
            ours[key] = _unescape(value)
        else:
            others.append(entry)
    return ours, tuple(others)


def json_type(value: Any) -> str:
    """`value`'s JSON type with its article, for an error message (never the value: it may be huge)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names = ((str, "a string"), (Mapping, "an object"), (list, "an array"))
    return next((name for kind, name in names if isinstance(value, kind)), f"a {type(value).__name__}")


def _check_fields(data: Any) -> None:
    """ValueError unless `data` is an object whose text fields are strings (or null: absent) within
    LEASE_FIELD_LIMITS; `attrs` of another type is left to `_parse_attrs`, which ignores it."""
    if not isinstance(data, Mapping):
        raise ValueError(f"the lease is {json_type(data)}, not an object")
    for key, value in data.items():
        limit = LEASE_FIELD_LIMITS.get(key)
        if limit is None or value is None:
            continue
        if not isinstance(value, str):
            if key == "attrs":
                continue
            raise ValueError(f"lease field {key!r} is {json_type(value)}, not a string")
        if len(value) > limit:
            raise ValueError(f"lease field {key!r} is {len(value)} characters long, more than {limit}")


def _shadowed(entries: tuple[str, ...], values: Mapping[str, str]) -> tuple[str, ...]:
    """`attrs_extra` without the repeats of an extra that `values` leaves empty. A repeat is harmless
    behind the extra's own entry (first wins), but with the extra empty it would be read back as the
    extra: a pod UID or token dropped on purpose would come back, and the leases written would not be
    the leases decided on."""
    kept = []
    for entry in entries:
        key, eq, _ = entry.partition("=")
        if not (eq and key in _EXTRAS and not values[key]):
            kept.append(entry)
    return tuple(kept)


@dataclass(frozen=True)
class Lease:
    """Who holds an address: container id, pod reference (`ns/name`) and interface name.

    `node`, `poduid`, `created`, `network` and `token` are our optional extras; a lease written by
    Whereabouts (or one whose extras a foreign CRD schema pruned) has them empty, and nothing may depend
    on them being set. `network` is the CNI config `name` that made the lease (CNI GC touches only its
    own network's leases); `token` is the id of the ADD call that created it, replaced by
    `CONFIRMED` + the other call's id when another call confirms it, so a rollback removes only what
    its own call created and nobody has confirmed since.
    `extra` keeps fields we do not know, so a rewrite never drops another writer's data.

    In the pool the extras travel packed in one string field, `attrs` (`node=n1;poduid=u;...`, values
    with `%`, `;`, `=` escaped as `%25`, `%3B`, `%3D`): the API server's cost of a pool write grows with
    the number of fields per lease. `attrs_extra` keeps the `attrs` entries we do not know, verbatim.
    Leases of the previous version carry the extras as separate fields; they are read (see
    `from_json`), and written back packed.
    """

    id: str
    podref: str = ""
    ifname: str = ""
    node: str = ""
    poduid: str = ""
    created: str = ""
    network: str = ""
    token: str = ""
    kind: str = ""  # "" (lowest free), REQUESTED (runtimeConfig.ips) or STATIC (Whereabouts' addresses / IP=)
    retained: str = ""  # when set (the DEL's time): released, but kept for its pod name (sticky)
    sticky: str = ""  # with `retained`: STATEFULSET when the StatefulSet decides how long
    until: str = ""  # with `retained`: kept at least until then (sticky_seconds)
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)
    attrs_extra: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.attrs_extra:  # however the lease was made (read, confirmed, replaced): see _shadowed
            values = {name: getattr(self, name) for name in _EXTRAS}
            object.__setattr__(self, "attrs_extra", _shadowed(self.attrs_extra, values))

    def holds_for(self, podref: str, ifname: str, container_id: str) -> bool:
        """The lease this attachment was given in its pool (a static one is an extra address, never that)."""
        return self.kind != STATIC and self.owned_by(podref, ifname, container_id)

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
        entries = [f"{name}={_escape(getattr(self, name))}" for name in _EXTRAS if getattr(self, name)]
        entries += self.attrs_extra
        if entries:
            out["attrs"] = ";".join(entries)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Lease:
        """Read a lease: the extras from `attrs`, or from the previous version's separate fields.

        A lease carrying any separate extra was last made or confirmed by a version before `attrs`
        (this one never writes them, and drops them on a rewrite): that version kept our `attrs` as an
        unknown field but did not read it, so the separate fields are its newer word on all five extras
        and a stale `attrs` value (the old pod's UID, the creator's token) must not come back.

        A field missing or null reads as empty: a lease without `id` or `podref` (the API server no
        longer requires them, so only a foreign writer or a hand edit makes one) still holds its address
        and matches no call. ValueError when `data` is not an object, or a text field is of another
        type or longer than LEASE_FIELD_LIMITS allows.
        """
        _check_fields(data)
        packed, others = _parse_attrs(data.get("attrs"))
        values = {k: data.get(k) or "" for k in ("id", "podref", "ifname", *_EXTRAS)}
        if not any(values[k] for k in _EXTRAS):
            values.update({k: packed.get(k, "") for k in _EXTRAS})
        extra = {k: v for k, v in data.items() if k not in _KNOWN_FIELDS}
        return cls(extra=extra, attrs_extra=others, **values)


Allocations = dict[int, Lease]
REQUESTED = "requested"
STATIC = "static"
STATEFULSET = "statefulset"
CONFIRMED = "~"  # prefixes the token of a lease another call confirmed (no creator's rollback matches it)


def parse_allocations(raw: Mapping[str, Any]) -> Allocations:
    """Decode `spec.allocations`; raises ValueError on anything that is not offset -> lease."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"allocations is {json_type(raw)}, not an object")
    out: Allocations = {}
    for key, value in raw.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ValueError(f"allocation key {shown(key)} is not a decimal offset")
        if int(key) in out:
            raise ValueError(f"allocation key {shown(key)} repeats offset {int(key)}")
        try:
            out[int(key)] = Lease.from_json(value)
        except ValueError as exc:
            raise ValueError(f"allocation {key}: {exc}") from None
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
    network: str = ""  # the CNI config `name`
    token: str = ""  # this ADD call's id; a lease carrying it was created by this call
    kind: str = ""  # the lease's kind: "", REQUESTED or STATIC
    # offsets of this ADD's static addresses in the range: never the attachment's own lease, even where
    # a CRD that prunes `attrs` (Whereabouts') has dropped their `kind`
    statics: frozenset[int] = frozenset()

    def lease(self) -> Lease:
        return Lease(
            self.container_id,
            self.podref,
            self.ifname,
            self.node,
            self.poduid,
            self.created,
            self.network,
            self.token,
            self.kind,
        )


@dataclass(frozen=True)
class Decision:
    """What `allocate` chose: the offset, the pool's new leases, and whether they differ from the old.

    `moved` is the lease this attachment held at an address the config no longer allows (dropped for
    the new one), so its reservation can be given back.
    """

    offset: int
    allocations: Allocations
    changed: bool
    reused: bool
    moved: tuple[int, Lease] | None = None


def find_owner(allocations: Allocations, request: Request) -> int | None:
    for offset in sorted(allocations):
        if offset in request.statics:
            continue
        if allocations[offset].holds_for(request.podref, request.ifname, request.container_id):
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


class Taken(Exception):
    """A wanted address (requested or static) is held by another attachment: `holder`."""

    def __init__(self, offset: int, holder: Lease) -> None:
        super().__init__(f"offset {offset} is held by {holder.podref or holder.id}")
        self.offset = offset
        self.holder = holder


def _confirmed(lease: Lease, request: Request) -> Lease:
    """`lease` taken (again) by `request`'s attachment: its container id, its pod UID (empty when the
    request has none: a UID this call did not vouch for must not decide a release), a creator's token
    confirmed (that creator's rollback must no longer remove it), and no longer retained."""
    token = lease.token
    if token and not token.startswith(CONFIRMED):
        token = CONFIRMED + request.token
    return replace(
        lease,
        id=request.container_id,
        podref=request.podref or lease.podref,
        ifname=request.ifname or lease.ifname,
        node=request.node or lease.node,
        poduid=request.poduid,
        created=lease.created or request.created,
        network=request.network or lease.network,
        token=token,
        kind=request.kind,
        retained="",
        sticky="",
        until="",
    )


def _reuse(allocations: Allocations, offset: int, request: Request) -> Decision:
    """The attachment's existing lease at `offset`, confirmed; a lease carrying the request's token was
    created by this very call (an earlier attempt whose answer was lost) and is kept as it is."""
    lease = allocations[offset]
    if request.token and lease.token == request.token and lease.id == request.container_id:
        return Decision(offset, allocations, changed=False, reused=False)
    wanted = _confirmed(lease, request)
    if wanted == lease:
        return Decision(offset, allocations, changed=False, reused=True)
    return Decision(offset, {**allocations, offset: wanted}, changed=True, reused=True)


def allocate(
    spec: RangeSpec,
    allocations: Allocations,
    request: Request,
    skip: Iterable[int] = (),
    want: int | None = None,
) -> Decision | None:
    """Choose the address for `request`: its existing lease if it has a usable one, else the lowest free.

    `skip` holds offsets known to be taken elsewhere (an overlapping range's reservation).
    Returns None when the range is exhausted. With `want` (a requested or static address, checked
    against the range by the caller) exactly that offset, or `Taken` when another attachment holds it.

    A lease that carries the request's `token` was created by this very call (an earlier attempt whose
    answer was lost): it is kept as it is and not counted as reused. Any other existing lease is
    confirmed (`_confirmed`): a retained lease goes back to its pod name this way.
    """
    if want is not None:
        return _allocate_wanted(allocations, request, want)
    base = int(spec.network.first)
    skip = set(skip)
    current = find_owner(allocations, request)
    if current is not None and spec.contains(base + current) and current not in skip:
        return _reuse(allocations, current, request)
    remaining = dict(allocations)
    moved = None
    if current is not None:  # its old address is no longer allocatable under this config
        moved = (current, remaining.pop(current))
    offset = lowest_free(spec, set(remaining) | skip)
    if offset is None:
        return None
    remaining[offset] = request.lease()
    return Decision(offset, remaining, changed=True, reused=False, moved=moved)


def _allocate_wanted(allocations: Allocations, request: Request, want: int) -> Decision:
    holder = allocations.get(want)
    if holder is not None:
        mine = holder.owned_by(request.podref, request.ifname, request.container_id)
        if request.kind == STATIC:  # its own static lease again, or one whose `kind` a CRD pruned
            mine = mine and holder.kind != REQUESTED
        else:
            mine = mine and holder.kind != STATIC and want not in request.statics
        if not mine:
            raise Taken(want, holder)
        return _reuse(allocations, want, request)
    remaining = dict(allocations)
    moved = None
    if request.kind != STATIC and (current := find_owner(allocations, request)) is not None:
        moved = (current, remaining.pop(current))  # it asks for another address now
    remaining[want] = request.lease()
    return Decision(want, remaining, changed=True, reused=False, moved=moved)


@dataclass(frozen=True)
class Retention:
    """How a DEL keeps a lease for its pod name (sticky): `at` the DEL's time, `sticky` STATEFULSET
    when the StatefulSet decides, `until` the end of `sticky_seconds` (timestamps as `created`)."""

    at: str
    sticky: str = ""
    until: str = ""

    def keeps(self, lease: Lease) -> bool:
        """Whether this retention applies to `lease`: a requested or allocated lease with a pod name
        (a static one is the config's, given again by it); with STATEFULSET only, a name that ends in
        an ordinal (`db-0`)."""
        if lease.kind == STATIC or not lease.podref:
            return False
        return bool(self.until) or (
            self.sticky == STATEFULSET and statefulset_ordinal(lease.podref) is not None
        )


def statefulset_ordinal(podref: str) -> tuple[str, int] | None:
    """`ns/db-3` -> (`ns/db`, 3): the StatefulSet a pod of that name would belong to, and its ordinal."""
    head, dash, tail = podref.rpartition("-")
    if not dash or "/" not in head or not tail.isascii() or not tail.isdigit():
        return None
    if len(tail) > 1 and tail.startswith("0"):
        return None  # a StatefulSet never names an ordinal with a leading zero
    return head, int(tail)


def release(
    allocations: Allocations,
    container_id: str,
    ifname: str,
    token: str = "",
    untokened: bool = False,
    retention: Retention | None = None,
) -> tuple[Allocations, list[int]]:
    """Drop this container's leases on `ifname`; releasing something unknown is not an error.

    With `token` (a rollback), only leases still carrying that ADD call's token are dropped, and with
    `untokened` also ones carrying none (a foreign CRD schema pruned it; the caller knows it created
    the lease). With `retention` (a DEL under `sticky`), the leases it keeps are marked retained
    instead (not in the offsets returned); a lease already retained stays as it is.
    """
    mine = [
        o
        for o in find_container(allocations, container_id, ifname)
        if not token or allocations[o].token == token or (untokened and not allocations[o].token)
    ]
    kept = {o: allocations[o] for o in mine if allocations[o].retained}
    if retention is not None:
        kept.update(
            {
                o: replace(
                    allocations[o], retained=retention.at, sticky=retention.sticky, until=retention.until
                )
                for o in mine
                if o not in kept and retention.keeps(allocations[o])
            }
        )
    gone = [o for o in mine if o not in kept]
    if not gone and all(allocations[o] is lease for o, lease in kept.items()):
        return allocations, []
    out = {k: v for k, v in allocations.items() if k not in gone}
    out.update(kept)
    return out, gone


def release_stale(
    allocations: Allocations, valid: set[tuple[str, str]], node: str, network: str
) -> tuple[Allocations, list[int]]:
    """GC: drop leases made on `node` by `network` (the CNI config name) whose (container id, ifname)
    is not in `valid`.

    `valid` lists only that network's attachments, so a lease of another network sharing the pool is
    never judged by it. A lease without a node or a network (written by Whereabouts, by an older
    version, or pruned) is never released here, nor a retained one (its container is gone by design).
    """
    gone = sorted(
        offset
        for offset, lease in allocations.items()
        if lease.node
        and not lease.retained
        and lease.node == node
        and lease.network
        and lease.network == network
        and (lease.id, lease.ifname) not in valid
    )
    return {k: v for k, v in allocations.items() if k not in gone}, gone
