"""Pure judgement over what a datastore holds: which leases are leaked, which addresses are held twice,
which reservations no lease backs, which node slices belong to nodes that are gone.

`ipam-reconcile`, `ipamctl check` and `ipamctl repair` all decide here; none of this does I/O or reads
a clock (the caller passes `now`). Each `Problem` says whether it is safe to fix now (`fix`), so the
repair pass only carries out what this module decided.

What the caller must read, and in this order (see `reconcile.gather`): reservations, then pools, then
pods, then node slice pools, then nodes. A reservation seen before the pools were read was created
after its lease was written (ADD writes the pool first), so its missing lease is really missing; a
lease seen before the pods were listed was made for a pod that already existed then.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from netaddr import AddrFormatError, IPAddress, IPNetwork

from .allocator import STATEFULSET, Lease, statefulset_ordinal
from .ranges import pool_name, pool_name_readings, reservation_name, same_network, usable_bounds
from .store.base import PoolSnapshot

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
TERMINAL_PHASES = ("Succeeded", "Failed")

LEAKED = "leaked"
DUPLICATE = "duplicate"
MISMATCH = "reservation-mismatch"
ORPHAN = "orphan-reservation"
MISSING = "missing-reservation"
OUT_OF_RANGE = "out-of-range"
GONE_NODE_SLICE = "slice-of-gone-node"
# a pool whose recorded range is not the one its name stands for, or a lease whose pod shows the same
# offset in another range by the same pool name (two networks' names collided): never judged by address
RANGE_MISMATCH = "range-mismatch"
KINDS = (LEAKED, DUPLICATE, MISMATCH, ORPHAN, MISSING, OUT_OF_RANGE, GONE_NODE_SLICE, RANGE_MISMATCH)
WARNINGS = frozenset({MISSING})  # a network may run with enable_overlapping_ranges: false

# what the repair pass does about a problem (Problem.fix); None: leave it (to a person, or to a later pass)
RELEASE = "release"
DELETE_RESERVATION = "delete-reservation"
CREATE_RESERVATION = "create-reservation"
# slices of gone nodes are returned by node slices' own reclaim (`slicereturn.return_slices`, same pass)


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _older_than(made: datetime | None, now: datetime, grace: float) -> bool:
    return made is not None and (now - made).total_seconds() > grace


# -- pods ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodInfo:
    uid: str
    phase: str
    deleting: bool
    created: datetime | None
    ips: frozenset[str] | None  # addresses in Multus' network-status; None when there is no annotation


def pod_index(pods: Sequence[Mapping[str, Any]]) -> dict[str, PodInfo]:
    out: dict[str, PodInfo] = {}
    for pod in pods:
        meta = pod.get("metadata") or {}
        ips: frozenset[str] | None = None
        raw = (meta.get("annotations") or {}).get(NETWORK_STATUS)
        if raw:
            try:
                entries = json.loads(raw)
                ips = frozenset(str(ip) for e in entries if isinstance(e, dict) for ip in e.get("ips") or [])
            except (ValueError, TypeError):
                ips = None  # unreadable: judge nothing by it
        out[f"{meta.get('namespace', '')}/{meta.get('name', '')}"] = PodInfo(
            uid=str(meta.get("uid", "")),
            phase=str((pod.get("status") or {}).get("phase", "")),
            deleting=bool(meta.get("deletionTimestamp")),
            created=parse_time(meta.get("creationTimestamp")),
            ips=ips,
        )
    return out


def verdict(lease: Lease, address: str, pod: PodInfo | None, now: datetime, grace: float) -> str | None:
    """Why this lease is leaked (pod-gone, pod-replaced, pod-succeeded, pod-failed,
    not-in-network-status), or None when it is (or may be) in use."""
    if not lease.podref:
        return None  # nothing to judge it by
    if pod is None:
        return "pod-gone"
    if lease.poduid and pod.uid and lease.poduid != pod.uid:
        return "pod-replaced"
    if pod.phase in TERMINAL_PHASES:
        return f"pod-{pod.phase.lower()}"
    if pod.phase != "Running" or pod.deleting or pod.ips is None or address in pod.ips:
        return None
    lease_made = parse_time(lease.created)
    if lease_made is None or pod.created is None:
        return None  # age unknown: an ADD may be in flight
    if min((now - lease_made).total_seconds(), (now - pod.created).total_seconds()) <= grace:
        return None
    return "not-in-network-status"


def statefulset_index(statefulsets: Sequence[Mapping[str, Any]]) -> dict[str, range]:
    """`ns/name` -> the ordinals each StatefulSet covers: `spec.ordinals.start` (0 when unset) up to
    it plus `spec.replicas` (1 when unset, as Kubernetes defaults them)."""
    out: dict[str, range] = {}
    for sts in statefulsets:
        meta = sts.get("metadata") or {}
        spec = sts.get("spec") or {}
        replicas = spec.get("replicas", 1)
        start = (spec.get("ordinals") or {}).get("start", 0)
        if meta.get("deletionTimestamp"):
            continue  # being deleted: its pods go, and so does what is kept for them
        replicas = replicas if isinstance(replicas, int) else 1
        start = start if isinstance(start, int) else 0
        out[f"{meta.get('namespace', '')}/{meta.get('name', '')}"] = range(start, start + replicas)
    return out


def retention_verdict(
    lease: Lease, pod: PodInfo | None, statefulsets: Mapping[str, range] | None, now: datetime
) -> str | None:
    """Why a retained lease (sticky: released by its DEL, kept for its pod name) is kept no longer
    (sticky-expired, statefulset-gone, statefulset-scaled-down, not-a-statefulset-pod), or None while
    it is kept. The one rule `ipam-reconcile` and `ipam-controller` both apply.

    Kept while `until` (sticky_seconds) is ahead; with sticky `statefulset` also while the StatefulSet
    the pod name belongs to (`db-3`: `db`) exists and its ordinals (`statefulset_index`) cover it. A pod of that
    name that exists again (re-created, its ADD not yet done) keeps it too: that ADD takes it back.
    `statefulsets` None: they could not be read, so no StatefulSet retention is ended.
    """
    if not lease.retained:
        return None
    until = parse_time(lease.until)
    if until is not None and now < until:
        return None
    if pod is not None and pod.phase not in TERMINAL_PHASES and not pod.deleting:
        return None
    if lease.sticky != STATEFULSET:
        return "sticky-expired"
    owner = statefulset_ordinal(lease.podref)
    if owner is None:
        return "not-a-statefulset-pod"
    if statefulsets is None:
        return None
    name, ordinal = owner
    covered = statefulsets.get(name)
    if covered is None:
        return "statefulset-gone"
    if ordinal not in covered:
        return "statefulset-scaled-down"
    return None


def lease_verdict(
    lease: Lease,
    address: str,
    pod: PodInfo | None,
    statefulsets: Mapping[str, range] | None,
    now: datetime,
    grace: float,
) -> str | None:
    """Why this lease can go, or None: a retained lease by `retention_verdict` (its pod is gone by
    design), any other by `verdict`. What `audit` and the controller both ask of one lease."""
    if lease.retained:
        return retention_verdict(lease, pod, statefulsets, now)
    return verdict(lease, address, pod, now, grace)


def retention_note(lease: Lease) -> str:
    """How a retained lease is kept, for people: `until <time>` and/or `statefulset <ns/name>`."""
    parts = []
    if lease.until:
        parts.append(f"until {lease.until}")
    owner = statefulset_ordinal(lease.podref) if lease.sticky == STATEFULSET else None
    if owner is not None:
        parts.append(f"statefulset {owner[0]}")
    return ", ".join(parts) or "retained"


def holder_is_live(lease: Lease, pod: PodInfo | None) -> bool:
    """The pod the lease names exists and is the pod that made it (as far as the recorded UID tells)."""
    if pod is None:
        return False
    return not (lease.poduid and pod.uid and lease.poduid != pod.uid)


# -- reservations and node slices, as read from the API -----------------------------------------


@dataclass(frozen=True)
class Reservation:
    name: str
    holder: Lease
    created: datetime | None
    version: str  # resourceVersion: a delete is conditional on it

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> Reservation:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        made = parse_time(spec.get("created")) or parse_time(meta.get("creationTimestamp"))
        return cls(
            str(meta.get("name", "")),
            Lease.from_reservation(spec),
            made,
            str(meta.get("resourceVersion", "")),
        )


@dataclass(frozen=True)
class Slice:
    node: str  # "" for a free slice
    range: str


@dataclass(frozen=True)
class SlicePool:
    """A NodeSlicePool: Whereabouts' `spec: {range, sliceSize}`, `status.allocations: [{nodeName, sliceRange}]`."""

    name: str
    range: str
    slice_size: str
    slices: tuple[Slice, ...]
    version: str

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> SlicePool:
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        allocations = (obj.get("status") or {}).get("allocations") or []
        slices = tuple(
            Slice(str(a.get("nodeName") or ""), str(a.get("sliceRange") or ""))
            for a in allocations
            if isinstance(a, Mapping)
        )
        return cls(
            str(meta.get("name", "")),
            str(spec.get("range", "")),
            str(spec.get("sliceSize", "")),
            slices,
            str(meta.get("resourceVersion", "")),
        )

    def pool_names(self, node: str, slice_range: str) -> tuple[str, str]:
        """The IPPool names Whereabouts gives this slice: with the network name (this object's name, when
        the NAD sets `network_name`) and without (this object is then named after the NAD)."""
        cidr = _normalized(slice_range)
        return pool_name(cidr, f"{self.name}-{node}"), pool_name(cidr, node)


def _normalized(cidr: str) -> str:
    try:
        return str(IPNetwork(cidr).cidr)
    except (AddrFormatError, ValueError, TypeError):
        return cidr


# -- what was read, and what it means ------------------------------------------------------------


@dataclass(frozen=True)
class Inventory:
    """One consistent-enough read of a datastore. `pods`/`nodes` None: not known (file datastore)."""

    pools: Sequence[PoolSnapshot]
    reservations: Sequence[Reservation] = ()
    slice_pools: Sequence[SlicePool] = ()
    pods: Mapping[str, PodInfo] | None = None
    nodes: frozenset[str] | None = None
    notes: tuple[str, ...] = ()  # what could not be read, so was not judged
    slices_read: bool = True  # False: the NodeSlicePools could not be read (notes say why)
    # `statefulset_index`: what ends StatefulSet retention (sticky); None when not read
    statefulsets: Mapping[str, range] | None = None


@dataclass(frozen=True)
class PoolView:
    """A pool with the network and node (slice pools) it belongs to, and its usage."""

    snapshot: PoolSnapshot
    network: str
    node: str
    size: int  # usable addresses of the pool's range (range_start/exclude are not recorded in the pool)
    name_agrees: bool = True  # the name is the pool name of its recorded range (with some network name)
    others: tuple[IPNetwork, ...] = ()  # other ranges whose pool name (with another network name) it is
    alt_networks: tuple[str, ...] = ()  # a slice pool's name read as other networks' pool names
    owner_known: bool = True  # False: taken for a slice pool by its name alone, or claimed by two networks

    @property
    def name(self) -> str:
        return self.snapshot.name

    def used(self) -> int:
        lo, hi = self._bounds()
        return sum(1 for o in self.snapshot.allocations if lo <= o <= hi)

    def free(self) -> int:
        return max(0, self.size - self.used())

    def nodes(self) -> dict[str, int]:
        return dict(sorted(Counter(lease.node for lease in self.snapshot.allocations.values()).items()))

    def _bounds(self) -> tuple[int, int]:
        try:
            network = IPNetwork(self.snapshot.cidr)
        except (AddrFormatError, ValueError, TypeError):
            return 1, 0
        first, last = usable_bounds(network)
        return first - int(network.first), last - int(network.first)


@dataclass(frozen=True)
class Holding:
    """One lease and the address it holds."""

    pool: PoolView
    offset: int
    address: str  # "" when the offset is not an address of the range's family at all
    lease: Lease
    in_range: bool
    alternates: tuple[str, ...] = ()  # the offset's address in `pool.others`: what it may really be

    @property
    def reservation(self) -> str:
        return reservation_name(IPAddress(self.address), self.pool.network) if self.address else ""

    @property
    def reservations(self) -> tuple[str, ...]:
        """Every reservation name this lease may be backed by (`PoolView.alt_networks`)."""
        if not self.address:
            return ()
        ip = IPAddress(self.address)
        return (self.reservation, *(reservation_name(ip, n) for n in self.pool.alt_networks))


def network_prefix(snapshot: PoolSnapshot) -> str:
    """The `network_name` a pool was made with, recovered from its name."""
    try:
        bare = pool_name(str(IPNetwork(snapshot.cidr).cidr))
    except (AddrFormatError, ValueError, TypeError):
        return ""
    if snapshot.name.endswith("-" + bare):
        return snapshot.name[: -len(bare) - 1]
    return ""


def pool_views(inventory: Inventory) -> list[PoolView]:
    slice_owner: dict[str, tuple[str, str, str]] = {}  # pool name -> (network, node, slice range)
    claims: dict[str, set[tuple[str, str]]] = defaultdict(set)  # pool name -> every (network, slice) named so
    for sp in inventory.slice_pools:
        for sl in sp.slices:
            if sl.node:
                with_net, without = sp.pool_names(sl.node, sl.range)
                slice_owner[with_net] = (sp.name, sl.node, sl.range)
                slice_owner.setdefault(without, ("", sl.node, sl.range))
                claims[with_net].add((sp.name, sl.range))
                claims[without].add(("", sl.range))
    guessed: dict[str, tuple[str, str, str]] = {}  # a slice's pool whose node no longer holds it: by its name
    names = [p.name for p in inventory.pools]
    for sp in inventory.slice_pools:
        for bare, slice_range in {pool_name(_normalized(sl.range)): sl.range for sl in sp.slices}.items():
            for name in names:
                if name in slice_owner or not name.endswith("-" + bare):
                    continue
                head = name[: -len(bare) - 1]
                if head.startswith(sp.name + "-"):
                    guessed[name] = (sp.name, head[len(sp.name) + 1 :], slice_range)
                else:
                    guessed.setdefault(name, ("", head, slice_range))
    out = []
    for snapshot in inventory.pools:
        shared = network_prefix(snapshot)
        network, node, sure = shared, "", True
        alts: tuple[str, ...] = ()
        owner = slice_owner.get(snapshot.name) or guessed.get(snapshot.name)
        # a slice's pool only if it records the slice's range (else another network's pool by that name);
        # its name may still be another network's shared pool of the same range (network_name = node name),
        # or another sliced network's slice pool (network `net` node `east-n1`, network `net-east` node
        # `n1`): those networks' reservations are kept (`alt_networks`), and an unsure owner repairs nothing
        if owner is not None and same_network(snapshot.cidr, owner[2]):
            network, node = owner[0], owner[1]
            claimed = {n for n, r in claims.get(snapshot.name, ()) if same_network(snapshot.cidr, r)}
            alts = tuple(sorted(({shared} | claimed) - {network}))
            sure = snapshot.name in slice_owner and len(claimed) == 1
        try:
            recorded = IPNetwork(snapshot.cidr).cidr
            first, last = usable_bounds(recorded)
            size = last - first + 1
        except (AddrFormatError, ValueError, TypeError):
            recorded, size = None, 0
        readings = {net for _, net in pool_name_readings(snapshot.name)}
        others = tuple(sorted(readings - {recorded})) if recorded in readings else ()
        out.append(PoolView(snapshot, network, node, size, recorded in readings, others, alts, sure))
    return out


def holdings(views: Sequence[PoolView]) -> list[Holding]:
    out = []
    for view in views:
        try:
            network = IPNetwork(view.snapshot.cidr)
        except (AddrFormatError, ValueError, TypeError):
            network = None
        lo, hi = view._bounds()
        for offset, lease in sorted(view.snapshot.allocations.items()):
            address = ""
            if network is not None:
                try:
                    address = str(IPAddress(int(network.first) + offset, network.version))
                except (AddrFormatError, ValueError):
                    address = ""
            alternates = tuple(
                str(IPAddress(int(o.first) + offset, o.version)) for o in view.others if offset < o.size
            )
            out.append(Holding(view, offset, address, lease, lo <= offset <= hi, alternates))
    return out


@dataclass(frozen=True)
class Problem:
    kind: str
    pool: str  # IPPool name; the NodeSlicePool name for slice-of-gone-node; "" for an orphan reservation
    address: str  # the slice range for slice-of-gone-node
    podref: str
    detail: str
    fix: str | None = None  # what repair does now; None: nothing (yet)
    holding: Holding | None = field(default=None, compare=False)
    reservation: Reservation | None = field(default=None, compare=False)
    slice_pool: SlicePool | None = field(default=None, compare=False)
    slice: Slice | None = field(default=None, compare=False)

    @property
    def warning(self) -> bool:
        return self.kind in WARNINGS

    def to_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "pool": self.pool,
            "address": self.address,
            "podref": self.podref,
            "detail": self.detail,
        }


def reservation_address(name: str, networks: set[str]) -> tuple[str, str]:
    """(network, address) a reservation name stands for; ("", "") when it names no address."""

    def parse(text: str) -> str:
        candidate = text if "." in text else text.replace("-", ":")
        try:
            return str(IPAddress(candidate)) if candidate else ""
        except (AddrFormatError, ValueError):
            return ""

    for network in sorted(networks, key=len, reverse=True):
        if network and name.startswith(network + "-"):
            found = parse(name[len(network) + 1 :])
            if found:
                return network, found
    found = parse(name)
    if found:
        return "", found
    for i, ch in enumerate(name):  # an unknown network prefix: the longest tail that is an address
        if ch == "-":
            found = parse(name[i + 1 :])
            if found:
                return name[:i], found
    return "", ""


def audit(inventory: Inventory, now: datetime, grace: float) -> list[Problem]:
    """Every problem in `inventory`, in a stable order, each with the fix that is safe now.

    Safe now: a leaked lease older than `grace` (a lease of unknown age counts as old: Whereabouts
    records none), an orphan reservation older than `grace`, a missing reservation of a lease older
    than `grace` that is not leaked (only in networks that use reservations at all). A slice of a
    node that no longer exists is reported here and returned by node slices' reclaim in the same
    pass (`slicereturn.return_slices`: once its pool holds no lease and has been idle for `grace`).
    Duplicates, mismatched reservations and out-of-range leases need a person.
    """
    views = pool_views(inventory)
    held = holdings(views)
    problems: list[Problem] = []
    reservations = {r.name: r for r in inventory.reservations}
    networks_with_reservations = {
        reservation_address(r.name, {v.network for v in views})[0] for r in inventory.reservations
    }

    problems += [
        Problem(
            RANGE_MISMATCH,
            v.name,
            "",
            "",
            f"pool records range {v.snapshot.cidr}, which is not the range its name stands for: "
            "its leases are not judged by address",
        )
        for v in views
        if not v.name_agrees
    ]
    released: set[tuple[str, int]] = set()
    unsure: set[tuple[str, int]] = set()  # leases whose address is not known for certain
    for h in held:
        pod = inventory.pods.get(h.lease.podref) if inventory.pods is not None else None
        if inventory.pods is not None or h.lease.retained:  # expiry needs no pod list
            reason = lease_verdict(h.lease, h.address, pod, inventory.statefulsets, now, grace)
            shown = sorted(set(h.alternates) & (pod.ips or set())) if pod is not None else []
            if reason == "not-in-network-status" and (shown or not h.pool.name_agrees):
                unsure.add((h.pool.name, h.offset))
                if shown:  # the pod holds the same offset of another range by this pool name
                    problems.append(
                        Problem(
                            RANGE_MISMATCH,
                            h.pool.name,
                            h.address,
                            h.lease.podref,
                            f"the pod's network-status shows {', '.join(shown)}: the same offset in another "
                            f"range by this pool name, not {h.pool.snapshot.cidr} (two networks share the name)",
                            holding=h,
                        )
                    )
                reason = None
            if reason is not None:
                made = parse_time(h.lease.created)
                young = not h.lease.retained and made is not None and not _older_than(made, now, grace)
                fix = None if young else RELEASE
                if fix:
                    released.add((h.pool.name, h.offset))
                problems.append(
                    Problem(
                        LEAKED,
                        h.pool.name,
                        h.address,
                        h.lease.podref,
                        reason + (f" (lease younger than {grace:g}s)" if young else ""),
                        fix,
                        holding=h,
                    )
                )
        if not h.in_range:
            problems.append(
                Problem(
                    OUT_OF_RANGE,
                    h.pool.name,
                    h.address,
                    h.lease.podref,
                    f"offset {h.offset} is outside the usable addresses of {h.pool.snapshot.cidr}",
                    holding=h,
                )
            )

    by_address: dict[tuple[str, str], list[Holding]] = defaultdict(list)
    for h in held:
        if h.address and h.in_range:
            by_address[(h.pool.network, h.address)].append(h)
    for group in by_address.values():
        if len(group) < 2:
            continue
        for h in group:
            others = ", ".join(f"{o.pool.name} ({o.lease.podref or o.lease.id})" for o in group if o is not h)
            problems.append(
                Problem(
                    DUPLICATE, h.pool.name, h.address, h.lease.podref, f"also held in {others}", holding=h
                )
            )

    backed: set[str] = set()
    for h in held:
        if not h.address:
            continue
        backed.update(h.reservations)
        if not h.in_range:
            continue
        found = [reservations[n] for n in h.reservations if n in reservations]
        owned = [r for r in found if r.holder.owned_by(h.lease.podref, h.lease.ifname, h.lease.id)]
        reservation = next(iter(owned or found), None)
        name = reservation.name if reservation is not None else h.reservation
        if reservation is None:
            safe = (
                (h.pool.name, h.offset) not in released
                and h.pool.name_agrees
                and h.pool.owner_known
                and (h.pool.name, h.offset) not in unsure
                and h.pool.network in networks_with_reservations
                and (not h.lease.created or _older_than(parse_time(h.lease.created), now, grace))
            )
            problems.append(
                Problem(
                    MISSING,
                    h.pool.name,
                    h.address,
                    h.lease.podref,
                    f"no reservation {name}",
                    CREATE_RESERVATION if safe else None,
                    holding=h,
                )
            )
        elif not reservation.holder.owned_by(h.lease.podref, h.lease.ifname, h.lease.id):
            holder = reservation.holder
            problems.append(
                Problem(
                    MISMATCH,
                    h.pool.name,
                    h.address,
                    h.lease.podref,
                    f"reservation {name} names {holder.podref or '-'} container {holder.id or '-'}",
                    holding=h,
                    reservation=reservation,
                )
            )

    known_networks = {v.network for v in views}
    for r in sorted(inventory.reservations, key=lambda r: r.name):
        if r.name in backed:
            continue
        _, address = reservation_address(r.name, known_networks)
        old = _older_than(r.created, now, grace)
        age = "" if old else " (age unknown)" if r.created is None else f" (younger than {grace:g}s)"
        problems.append(
            Problem(
                ORPHAN,
                "",
                address,
                r.holder.podref,
                f"reservation {r.name} has no lease{age}",
                DELETE_RESERVATION if old else None,
                reservation=r,
            )
        )

    if inventory.nodes is not None:
        leases_by_pool = {v.name: v.snapshot.allocations for v in views}
        for sp in inventory.slice_pools:
            for sl in sp.slices:
                if not sl.node or sl.node in inventory.nodes:
                    continue
                staying = [
                    (name, o)
                    for name in sp.pool_names(sl.node, sl.range)
                    for o in leases_by_pool.get(name, {})
                    if (name, o) not in released
                ]
                detail = f"node {sl.node} no longer exists"
                if staying:
                    detail += f"; its slice pool holds {len(staying)} lease(s) that stay"
                problems.append(
                    Problem(
                        GONE_NODE_SLICE,
                        sp.name,
                        sl.range,
                        "",
                        detail,
                        None,
                        slice_pool=sp,
                        slice=sl,
                    )
                )
    order = {kind: i for i, kind in enumerate(KINDS)}
    return sorted(problems, key=lambda p: (order[p.kind], p.pool, _address_key(p.address), p.podref))


def _address_key(address: str) -> tuple[int, int]:
    try:
        ip = IPAddress(address.split("/")[0])
        return int(ip.version), int(ip)
    except (AddrFormatError, ValueError):
        return 0, 0


def summary(problems: Sequence[Problem]) -> dict[str, int]:
    counts = Counter(p.kind for p in problems)
    return {kind: counts[kind] for kind in KINDS if counts[kind]}


def find_address(views: Sequence[PoolView], address: str, network: str | None = None) -> list[Holding]:
    """The leases holding `address` (in `network` only, when given); also those whose pool's name is
    shared by a range in which their offset is `address` (range-mismatch: which one is not certain)."""
    return [
        h
        for h in holdings(views)
        if (h.address == address or address in h.alternates)
        and (network is None or h.pool.network == network)
    ]


def find_pod(views: Sequence[PoolView], podref: str) -> list[Holding]:
    return [h for h in holdings(views) if h.lease.podref == podref]


def find_reservations(
    inventory: Inventory,
    views: Sequence[PoolView],
    address: str | None = None,
    podref: str | None = None,
    network: str | None = None,
) -> list[Reservation]:
    """Reservations naming `address` (in `network` only, when given), or held by `podref`."""
    networks = {v.network for v in views}
    out = []
    for r in inventory.reservations:
        net, addr = reservation_address(r.name, networks)
        if address is not None and (addr != address or (network is not None and net != network)):
            continue
        if podref is not None and r.holder.podref != podref:
            continue
        out.append(r)
    return sorted(out, key=lambda r: r.name)
