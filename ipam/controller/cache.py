"""What the controller's watches know, kept small: a pod is its UID and whether it is being deleted
(never its spec), a node its out-of-service taint and readiness, a pool its leases.

Each cache is a watch's `Handler` (ipam.controller.watch) and calls `notify(podrefs)` with the pods
whose leases may now be leaked, so the reclaim worker looks at exactly those. The caches only point:
nothing is released on their word (ipam.controller.reclaim confirms with the API server first).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import audit
from ..allocator import Allocations, parse_allocations
from ..audit import PoolView, Reservation, SlicePool, parse_time
from ..log import log
from ..store.base import PoolSnapshot

OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
DELETED_KEPT = 20_000  # pods whose deleted UID is remembered (a release needs no GET for those)

Notify = Callable[[Iterable[str]], None]


def podref(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


@dataclass(frozen=True)
class PodMeta:
    uid: str
    deleting: bool


@dataclass(frozen=True)
class NodeState:
    out_of_service: bool
    not_ready_since: datetime | None  # when its Ready condition last turned False/Unknown; None: ready


class Pods:
    """Pods cluster-wide, from metadata: podref -> (uid, deleting). Also which pods finished
    (a second, field-selected watch: `finished`)."""

    def __init__(self, notify: Notify) -> None:
        self.notify = notify
        self.lock = threading.Lock()
        self.pods: dict[str, PodMeta] = {}
        # podref -> UID of its last DELETED event (the newest DELETED_KEPT): that UID is gone for good
        self.deleted: OrderedDict[str, str] = OrderedDict()

    @staticmethod
    def _meta(obj: dict[str, Any]) -> PodMeta:
        meta = obj.get("metadata") or {}
        return PodMeta(str(meta.get("uid", "")), bool(meta.get("deletionTimestamp")))

    def replace(self, items: list[dict[str, Any]]) -> None:
        fresh = {podref(o): self._meta(o) for o in items}
        with self.lock:
            old, self.pods = self.pods, fresh
        changed = [ref for ref, m in old.items() if fresh.get(ref) != m]
        changed += [ref for ref, m in fresh.items() if m.deleting]
        self.notify(changed)

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        ref = podref(obj)
        meta = self._meta(obj)
        with self.lock:
            old = self.pods.get(ref)
            if kind == "DELETED":
                if old is not None and old.uid == meta.uid:
                    del self.pods[ref]
                if meta.uid:
                    self.deleted[ref] = meta.uid
                    self.deleted.move_to_end(ref)
                    if len(self.deleted) > DELETED_KEPT:
                        self.deleted.popitem(last=False)
            else:
                self.pods[ref] = meta
        if kind == "DELETED" or meta.deleting or (old is not None and old.uid != meta.uid):
            self.notify([ref])

    def get(self, ref: str) -> PodMeta | None:
        with self.lock:
            return self.pods.get(ref)

    def deleted_uid(self, ref: str) -> str:
        """The UID of the pod `ref` whose deletion the watch delivered last ("" if none is kept)."""
        with self.lock:
            return self.deleted.get(ref, "")

    def terminating(self) -> list[str]:
        with self.lock:
            return [ref for ref, m in self.pods.items() if m.deleting]

    def __len__(self) -> int:
        return len(self.pods)


class Finished:
    """Pods whose phase is Succeeded or Failed (field selector), by podref -> uid."""

    def __init__(self, notify: Notify) -> None:
        self.notify = notify
        self.lock = threading.Lock()
        self.pods: dict[str, str] = {}

    def replace(self, items: list[dict[str, Any]]) -> None:
        fresh = {podref(o): str((o.get("metadata") or {}).get("uid", "")) for o in items}
        with self.lock:
            self.pods = fresh
        self.notify(fresh)

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        ref = podref(obj)
        with self.lock:
            if kind == "DELETED":
                self.pods.pop(ref, None)
            else:
                self.pods[ref] = str((obj.get("metadata") or {}).get("uid", ""))
        if kind != "DELETED":
            self.notify([ref])

    def has(self, ref: str, uid: str) -> bool:
        with self.lock:
            return self.pods.get(ref) == uid


def node_state(obj: dict[str, Any]) -> NodeState:
    spec = obj.get("spec") or {}
    taints = spec.get("taints") or []
    out = any(isinstance(t, dict) and t.get("key") == OUT_OF_SERVICE for t in taints)
    since = None
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == "Ready" and cond.get("status") != "True":
            since = parse_time(cond.get("lastTransitionTime"))
    return NodeState(out, since)


class Nodes:
    """Nodes by name: out-of-service taint and readiness. A change may free a Terminating pod's leases."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.on_change = on_change
        self.lock = threading.Lock()
        self.nodes: dict[str, NodeState] = {}
        self.synced = False

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.nodes = {str((o.get("metadata") or {}).get("name", "")): node_state(o) for o in items}
            self.synced = True
        self.on_change()

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        with self.lock:
            old = self.nodes.get(name)
            if kind == "DELETED":
                self.nodes.pop(name, None)
            else:
                self.nodes[name] = node_state(obj)
            new = self.nodes.get(name)
        if kind == "DELETED" or (
            old != new and new is not None and (new.out_of_service or new.not_ready_since)
        ):
            self.on_change()

    def snapshot(self) -> dict[str, NodeState] | None:
        with self.lock:
            return dict(self.nodes) if self.synced else None


class Pools:
    """IPPools, NodeSlicePools and reservations in the controller's namespace, and an index
    podref -> names of the pools holding its leases."""

    def __init__(self, namespace: str, notify: Notify) -> None:
        self.namespace = namespace
        self.notify = notify
        self.lock = threading.Lock()
        self.pools: dict[str, PoolSnapshot] = {}
        self.slice_pools: dict[str, SlicePool] = {}
        self.reservations: dict[str, Reservation] = {}
        # podref -> {pool: (offset, poduid) of each of its leases there}
        self.by_pod: dict[str, dict[str, frozenset[tuple[int, str]]]] = {}
        self._raw: dict[str, dict[str, Any]] = {}  # pool -> its allocations as last received
        self.generation = 0  # bumped on every change: the metrics' computed figures are reused until then

    def _snapshot(self, obj: dict[str, Any], keep: bool = True) -> PoolSnapshot | None:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        name = str(meta.get("name", ""))
        try:
            allocations = self._parse(name, spec.get("allocations") or {}, keep)
        except ValueError as exc:
            log.warning("controller.pool.unreadable", pool=name, error=str(exc))
            return None
        return PoolSnapshot(
            name, str(spec.get("range", "")), allocations, str(meta.get("resourceVersion", ""))
        )

    def _parse(self, name: str, raw: Any, keep: bool = True) -> Allocations:
        """`parse_allocations`, reusing the parsed lease of every entry equal to the one the pool's
        last event carried: a write changes a few leases of hundreds, and every write comes back as
        an event. `keep`: remember `raw` for the next event (not from a LIST: the pools' raw copies
        would add to the memory peak of the first LIST, and most pools never change)."""
        old, old_raw = self.pools.get(name), self._raw.get(name)
        if old is None or old_raw is None or not isinstance(raw, dict):
            out = parse_allocations(raw)
        else:
            changed = {k: v for k, v in raw.items() if old_raw.get(k) != v}
            out = parse_allocations(changed)
            for key in raw:
                if key not in changed:
                    out.setdefault(int(key), old.allocations[int(key)])
            if len(out) != len(raw):  # two keys for one offset: parsed whole, to be refused the same way
                out = parse_allocations(raw)
        if keep:
            self._raw[name] = raw
        return out

    def _set_pool(self, name: str, snapshot: PoolSnapshot | None) -> set[str]:
        """Store (or with None drop) one pool; the podrefs of the leases it holds now that it did not
        hold before (a new lease of a pod the pod cache may not know), by offset: a pod's second lease
        in the pool (another interface) that arrives after its first was released from a cache that
        lacked it is looked at too, not left to the CronJob."""
        old = self.pools.pop(name, None)
        if snapshot is None:
            self._raw.pop(name, None)
        before = {lease.podref: lease for lease in old.allocations.values()} if old is not None else {}
        now: dict[str, set[tuple[int, str]]] = defaultdict(set)  # podref -> its leases in this pool
        if snapshot is not None:
            self.pools[name] = snapshot
            for offset, lease in snapshot.allocations.items():
                if lease.podref:
                    now[lease.podref].add((offset, lease.poduid))
        for ref in before.keys() - now.keys():
            held = self.by_pod.get(ref)
            if held is not None:
                held.pop(name, None)
                if not held:
                    del self.by_pod[ref]
        fresh = set()
        for ref, leases in now.items():
            held = self.by_pod.setdefault(ref, {})
            if held.get(name) != frozenset(leases):
                fresh.add(ref)
                held[name] = frozenset(leases)
        self.generation += 1
        return fresh

    # -- IPPools: the Handler --------------------------------------------------------------------

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            for name in list(self.pools):
                self._set_pool(name, None)
            for obj in items:
                snap = self._snapshot(obj, keep=False)
                if snap is not None:
                    self._set_pool(snap.name, snap)
            refs = list(self.by_pod)
        self.notify(refs)

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        with self.lock:
            refs = self._set_pool(name, None if kind == "DELETED" else self._snapshot(obj))
        self.notify(refs)  # a new lease of a pod the pod cache does not know: looked at

    def holding(self, ref: str) -> list[str]:
        with self.lock:
            return sorted(self.by_pod.get(ref, ()))

    def poduids(self, ref: str) -> set[str]:
        """The pod UIDs the leases of `ref` were made for (empty ones left out)."""
        with self.lock:
            return {uid for leases in self.by_pod.get(ref, {}).values() for _, uid in leases if uid}

    def lease_nodes(self, ref: str) -> set[str]:
        """The nodes recorded on the leases of `ref` ("" for a lease that records none)."""
        with self.lock:
            return {
                self.pools[name].allocations[offset].node
                for name, leases in self.by_pod.get(ref, {}).items()
                for offset, _ in leases
            }

    def podrefs(self) -> list[str]:
        with self.lock:
            return list(self.by_pod)

    def views(self) -> list[PoolView]:
        """Every pool with its network and node (as `ipamctl show` computes them)."""
        with self.lock:
            inventory = audit.Inventory(list(self.pools.values()), (), list(self.slice_pools.values()))
        return audit.pool_views(inventory)

    def inventory(self) -> audit.Inventory:
        with self.lock:
            return audit.Inventory(
                list(self.pools.values()), list(self.reservations.values()), list(self.slice_pools.values())
            )


class Into:
    """The Handler of NodeSlicePools or reservations: parsed into one of `Pools`' mappings by name (a
    slice pool names its pools' network and node; reservations give the orphan-reservation figure)."""

    def __init__(self, pools: Pools, attr: str, parse: Callable[[dict[str, Any]], Any]) -> None:
        self.pools, self.attr, self.parse = pools, attr, parse

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self.pools.lock:
            setattr(self.pools, self.attr, {x.name: x for x in map(self.parse, items)})
            self.pools.generation += 1

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        parsed = self.parse(obj)
        with self.pools.lock:
            mapping = getattr(self.pools, self.attr)
            if kind == "DELETED":
                mapping.pop(parsed.name, None)
            else:
                mapping[parsed.name] = parsed
            self.pools.generation += 1
