"""Node slices, the pure part: cut a range into equal slices, name slice pools as Whereabouts does,
pick a free slice, judge which slices may be returned. No I/O (claiming and returning are conditional
writes done by `nodeslices` through the engine's retry loop).

Layout kept from Whereabouts: a `NodeSlicePool` named after `network_name` (else the network's
`name`) with `spec: {range, sliceSize}` and `status.allocations: [{nodeName, sliceRange}]`, an empty
nodeName being a free slice; the leases of node N in slice S live in the IPPool `IPPoolName` gives
for (S, N): `<N>-<S normalized>`, or `<network_name>-<N>-<S normalized>`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from netaddr import AddrFormatError, IPNetwork

from . import errors
from .bytecache import ByteLRU, deep_size
from .errors import CNIError
from .ranges import CACHE_BYTES, RangeConfigError, RangeSpec, pool_name, usable_bounds

KEY = "ipam.node_slice_size"
MAX_SLICES = 16384  # one status entry each; far beyond this the object nears etcd's request limit
# Set on a slice pool that reclaim is returning: ADDs must not use it (it fences the return).
RETIRED_ANNOTATION = "whereabouts-py.cni.cncf.io/retired"
# Set on a NodeSlicePool we create: the network_name of its network ("" for none). A NodeSlicePool
# without it (Whereabouts' controller, an older version) may belong to a network without one.
NETWORK_ANNOTATION = "whereabouts-py.cni.cncf.io/network-name"
# Two networks without network_name on one range: the one whose NodeSlicePool is older by more than
# this keeps the range, the other is refused (both, when made closer together: clocks of API servers
# may differ by a little, and a wrong order would let both through).
CLASH_MARGIN_SECONDS = 30.0


def slice_prefix(text: str, network: IPNetwork) -> int:
    """The prefix length `node_slice_size` asks for ("/26" or "26"), checked against `network`."""
    raw = str(text).strip()
    digits = raw[1:] if raw.startswith("/") else raw
    if not (digits.isascii() and digits.isdigit()):
        raise RangeConfigError(KEY, text, "is not a prefix length like '/26' or '26'")
    prefix = int(digits)
    bits = 32 if network.version == 4 else 128
    if prefix > bits:
        raise RangeConfigError(KEY, text, f"is not an IPv{network.version} prefix length (at most /{bits})")
    if prefix <= network.prefixlen:
        raise RangeConfigError(
            KEY, text, f"must be longer than the prefix of range {network.cidr} (/{network.prefixlen})"
        )
    if prefix - network.prefixlen > MAX_SLICES.bit_length() - 1:
        raise RangeConfigError(
            KEY,
            text,
            f"cuts range {network.cidr} into {2 ** (prefix - network.prefixlen)} slices "
            f"(at most {MAX_SLICES})",
        )
    return prefix


def cut(network: IPNetwork, prefix: int) -> list[str]:
    """The range's slices in address order, as Whereabouts writes them (`10.0.0.64/26`)."""
    step = 1 << ((32 if network.version == 4 else 128) - prefix)
    first = int(network.cidr.first)
    count = 1 << (prefix - network.prefixlen)
    return [str(IPNetwork((first + i * step, prefix), network.version)) for i in range(count)]


def slice_pool_name(node: str, slice_range: str, network_name: str = "") -> str:
    """Whereabouts' `IPPoolName` with a node name: the slice's pool."""
    return pool_name(slice_range, f"{network_name}-{node}" if network_name else node)


def node_slice_pool_name(network_name: str, network: str) -> str:
    """The NodeSlicePool's name: `network_name`, else the network's (NAD's) `name`."""
    return network_name or network


_SLICE_SPECS: ByteLRU[tuple[IPNetwork, int, int, tuple[tuple[int, int], ...]]] = ByteLRU(CACHE_BYTES)


def slice_spec(spec: RangeSpec, slice_range: str) -> RangeSpec:
    """The part of `spec` inside one slice, with offsets counted from the slice's network address
    (the slice pool's `spec.range`). As in Whereabouts, the slice's own first and last address are
    not handed out; the range's start, end, excludes and gateway still hold. Cached by bytes, keyed by
    the spec's digest: an entry keeps no tenant config alive."""
    key = (spec.key, slice_range)
    found = _SLICE_SPECS.get(key)
    if found is None:
        net = IPNetwork(slice_range).cidr
        lo, hi = usable_bounds(net)
        start, end = max(lo, spec.start), min(hi, spec.end)
        intervals = tuple((max(a, start), min(b, end)) for a, b in spec.intervals if a <= end and b >= start)
        found = (net, start, end, intervals)
        _SLICE_SPECS.put(key, found, deep_size(intervals) + 300)
    net, start, end, intervals = found
    return RangeSpec(net, start, end, spec.exclude, spec.gateway, intervals)


def parse_slice(text: str) -> IPNetwork | None:
    try:
        return IPNetwork(text).cidr if "/" in text else None
    except (AddrFormatError, ValueError, TypeError):
        return None


@dataclass(frozen=True)
class SliceEntry:
    node: str
    slice_range: str

    def to_json(self) -> dict[str, str]:
        return {"nodeName": self.node, "sliceRange": self.slice_range}


@dataclass(frozen=True)
class NodeSlices:
    """A NodeSlicePool as read: `version` None when it does not exist yet; `token` is the store's;
    `uid` the object's (empty when the store has none)."""

    name: str
    range: str
    slice_size: str
    entries: tuple[SliceEntry, ...]
    version: str | None
    token: Any = None
    uid: str = ""
    created: datetime | None = None
    network_name: str | None = None  # NETWORK_ANNOTATION; None when absent

    def held_by(self, node: str) -> list[str]:
        return [e.slice_range for e in self.entries if e.node == node]

    def holder(self, slice_range: str) -> str | None:
        for e in self.entries:
            if e.slice_range == slice_range:
                return e.node
        return None


def parse_time(value: object) -> datetime | None:
    """A Kubernetes timestamp (`2026-01-02T03:04:05Z`) as an aware datetime; None when unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def from_object(obj: Mapping[str, Any], name: str) -> NodeSlices:
    """A NodeSlicePool object (Whereabouts' layout) as read from the store."""
    spec = obj.get("spec") or {}
    meta = obj.get("metadata") or {}
    return NodeSlices(
        name,
        str(spec.get("range") or ""),
        str(spec.get("sliceSize") or ""),
        parse_entries((obj.get("status") or {}).get("allocations")),
        str(meta.get("resourceVersion", "")),
        token=obj,
        uid=str(meta.get("uid") or ""),
        created=parse_time(meta.get("creationTimestamp")),
        network_name=_annotation(meta, NETWORK_ANNOTATION),
    )


def _annotation(meta: Mapping[str, Any], key: str) -> str | None:
    annotations = meta.get("annotations")
    value = annotations.get(key) if isinstance(annotations, Mapping) else None
    return value if isinstance(value, str) else None


def parse_entries(raw: object) -> tuple[SliceEntry, ...]:
    if not isinstance(raw, list):
        return ()
    out = []
    for item in raw:
        if isinstance(item, Mapping) and isinstance(item.get("sliceRange"), str):
            out.append(SliceEntry(str(item.get("nodeName") or ""), item["sliceRange"]))
    return tuple(out)


def fresh(name: str, spec: RangeSpec, size_text: str, prefix: int, network_name: str = "") -> NodeSlices:
    """A NodeSlicePool that does not exist yet: every slice free; marked with its network_name."""
    entries = _free_entries(str(spec.network.cidr), prefix)
    return NodeSlices(name, spec.cidr, size_text, entries, None, network_name=network_name)


_FREE: ByteLRU[tuple[SliceEntry, ...]] = ByteLRU(CACHE_BYTES)


def checked(
    pool: NodeSlices | None, name: str, spec: RangeSpec, size_text: str, prefix: int, network_name: str
) -> NodeSlices:
    """The NodeSlicePool `name` as read (None: absent, a fresh one), refused when it cuts another range
    or slice size than the config."""
    if pool is None:
        return fresh(name, spec, size_text, prefix, network_name)
    if not matches(pool, spec, prefix):
        raise CNIError(
            errors.DATASTORE_ERROR,
            f"NodeSlicePool {name} cuts range {pool.range} into {pool.slice_size} slices, "
            f"but the config has range {spec.cidr} with node_slice_size {size_text}",
            f"change the config back, or stop this network's pods and run `ipamctl delete-nodeslicepool "
            f"{name}` (it refuses while a slice holds a lease)",
        )
    if not pool.entries:  # created with a status subresource, status not written yet
        return replace(pool, entries=fresh(name, spec, size_text, prefix).entries)
    return pool


def _free_entries(cidr: str, prefix: int) -> tuple[SliceEntry, ...]:
    """Every slice of `cidr`, free (cached: a /16 in /26 slices takes ~15 ms to cut, and every call
    on a cold agent and every claim that finds no NodeSlicePool needs it)."""
    found = _FREE.get((cidr, prefix))
    if found is None:
        found = tuple(SliceEntry("", s) for s in cut(IPNetwork(cidr), prefix))
        _FREE.put((cidr, prefix), found, 300 * len(found))  # an entry object, its dict and its text
    return found


def matches(pool: NodeSlices, spec: RangeSpec, prefix: int) -> bool:
    """Whether an existing NodeSlicePool cuts the same range into the same slice size."""
    net = parse_slice(pool.range)
    size = pool.slice_size.strip().lstrip("/")
    return net == spec.network.cidr and size.isdigit() and int(size) == prefix


def clashes(mine: NodeSlices, others: Iterable[NodeSlices], margin: float | None = None) -> list[str]:
    """For a network without network_name: the other NodeSlicePools that take it from the range.

    Networks without network_name name their slice pools and reservations after the node and the
    slice alone, so two of them whose NodeSlicePools cut overlapping ranges give one address to two
    pods. Each is judged after its own NodeSlicePool exists: one that is not older than `mine` by more
    than `margin` (or of unknown age), not marked with a network_name of its own, and cutting an
    overlapping range, refuses `mine`. Of two such networks at most one is never refused: the later
    made sees the earlier one when it is judged, and is refused unless its clock says the earlier one
    is younger by more than `margin` (CLASH_MARGIN_SECONDS by default)."""
    margin = CLASH_MARGIN_SECONDS if margin is None else margin
    net = parse_slice(mine.range)
    if net is None:
        return []
    out = []
    for other in others:
        theirs = parse_slice(other.range)
        if other.name == mine.name or other.network_name or theirs is None:
            continue
        if theirs.first > net.last or net.first > theirs.last:
            continue
        if mine.created and other.created and (other.created - mine.created).total_seconds() > margin:
            continue
        out.append(other.name)
    return sorted(out)


def clash_outcome(mine: NodeSlices, others: Iterable[NodeSlices], margin: float | None = None) -> str:
    """Who keeps the range, for the error of a network `clashes` refuses (`others`: the clashing)."""
    margin = CLASH_MARGIN_SECONDS if margin is None else margin
    found = list(others)
    if found and all(
        mine.created and o.created and (mine.created - o.created).total_seconds() > margin for o in found
    ):
        return f"NodeSlicePool {', '.join(o.name for o in found)} was made more than {margin:g} s earlier and keeps the range"
    return (
        f"NodeSlicePools made within {margin:g} s of each other (or of unknown age) are all refused, "
        "so no network without network_name keeps the range"
    )


def claim(pool: NodeSlices, node: str, skip: Iterable[str] = ()) -> tuple[SliceEntry, ...] | None:
    """The entries with the first free slice (not in `skip`) given to `node`; None when none is free."""
    avoid = set(skip)
    entries = list(pool.entries)
    for i, e in enumerate(entries):
        if not e.node and e.slice_range not in avoid:
            entries[i] = SliceEntry(node, e.slice_range)
            return tuple(entries)
    return None


def release(pool: NodeSlices, node: str, slice_range: str) -> tuple[SliceEntry, ...] | None:
    """The entries with `slice_range` free again, if `node` still holds it; else None."""
    entries = list(pool.entries)
    for i, e in enumerate(entries):
        if e.slice_range == slice_range:
            if e.node != node:
                return None
            entries[i] = SliceEntry("", slice_range)
            return tuple(entries)
    return None


@dataclass(frozen=True)
class SlicePoolState:
    """What reclaim needs to know about one slice pool: leases, when it last changed (None: unknown
    or absent), whether it exists."""

    leases: int
    changed: datetime | None
    exists: bool


@dataclass(frozen=True)
class Returnable:
    node: str
    slice_range: str
    reason: str  # "node-gone" | "spare"


def reclaimable(
    pool: NodeSlices,
    live_nodes: set[str],
    states: Mapping[str, SlicePoolState],
    now: datetime,
    grace: float,
    network_name: str = "",
) -> list[Returnable]:
    """The slices to give back: those of nodes that no longer exist, and a live node's empty slices
    beyond its first one it keeps, each only when its pool holds no lease and has not changed for
    `grace` seconds. `states` is keyed by slice pool name; a missing key is an absent pool.

    A live node always keeps one slice (its first non-empty one, else its first), so a pod starting
    on it does not have to claim again.
    """
    out: list[Returnable] = []

    def idle(node: str, s: str) -> bool:
        st = states.get(slice_pool_name(node, s, network_name), SlicePoolState(0, None, False))
        if st.leases:
            return False
        return st.changed is None or (now - st.changed).total_seconds() > grace

    by_node: dict[str, list[str]] = {}
    for e in pool.entries:
        if e.node:
            by_node.setdefault(e.node, []).append(e.slice_range)
    for node, held in by_node.items():
        if node not in live_nodes:
            out += [Returnable(node, s, "node-gone") for s in held if idle(node, s)]
            continue
        used = [
            s
            for s in held
            if states.get(slice_pool_name(node, s, network_name), SlicePoolState(0, None, False)).leases
        ]
        keep = used[0] if used else held[0]
        out += [Returnable(node, s, "spare") for s in held if s != keep and s not in used and idle(node, s)]
    return out


def exhausted_message(spec: RangeSpec, size_text: str, pool: NodeSlices, node: str) -> str:
    held = pool.held_by(node)
    return (
        f"no free slice left in range {spec.cidr} (node_slice_size {size_text}: "
        f"{len(pool.entries)} slices, all held by nodes) and node {node}'s "
        f"{len(held)} slice(s) are full"
    )


def slice_marks(pool: NodeSlices) -> dict[str, Any]:
    """The metadata a NodeSlicePool is created with: its network_name mark, when known."""
    if pool.network_name is None:
        return {}
    return {"annotations": {NETWORK_ANNOTATION: pool.network_name}}


def to_status(entries: Sequence[SliceEntry]) -> dict[str, Any]:
    return {"allocations": [e.to_json() for e in entries]}


def network_prefixes(node_slice_pools: Iterable[NodeSlices], pool_names: Iterable[str]) -> dict[str, str]:
    """For each slice pool among `pool_names`: the network name its reservations carry.

    A slice pool's name holds the node between the network name and the slice (`blue-node-a-10.0.0.64-26`
    reserves `blue-10.0.0.65`), so the name alone does not tell where the network name ends; the
    NodeSlicePools do (named after network_name, or after the network's name when it has none, and
    then the pool names carry no prefix). Pools that are not slice pools are left out.
    """
    names = set(pool_names)
    out: dict[str, str] = {}
    guessed: dict[str, str] = {}  # the node holds no slice any more: go by the name
    for pool in node_slice_pools:
        nodes = {e.node for e in pool.entries if e.node}
        for bare in {pool_name(e.slice_range) for e in pool.entries}:
            for name in [n for n in names if n.endswith("-" + bare)]:
                head = name[: -len(bare) - 1]
                named = head.startswith(pool.name + "-")
                if named and head[len(pool.name) + 1 :] in nodes:
                    out[name] = pool.name
                elif head in nodes:
                    out.setdefault(name, "")
                elif named or name not in guessed:
                    guessed[name] = pool.name if named else ""
    return {**guessed, **out}
