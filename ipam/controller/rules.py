"""Which leases of one pod the controller releases, given the pod as the API server has it now.

Pure: no I/O, no clock. The identity rules (gone, replaced by a new UID, finished) are `ipam.audit`'s,
applied through `audit.audit` itself to the pod's pools, so every rule the audit has (and any it gains)
decides here exactly as in `ipam-reconcile`. The controller adds one rule the CronJob does not have:
a pod stuck Terminating on a dead node (`dead_node`).

Sticky retention: a lease its DEL kept for the pod's name (`retained`) is never released here. The
audit's verdict on it comes from `audit.retention_verdict` and is never an identity reason, and the
dead-node rule skips it (its DEL already ran: the container is gone, the name may come back). The
end of a retention (sticky-expired, statefulset-gone, ...) is ipam-reconcile's: it reads the
StatefulSets, the controller does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from .. import audit
from ..audit import Holding, PodInfo, SlicePool
from ..store.base import PoolSnapshot
from .cache import NodeState

# audit verdicts the controller acts on at once; the others (not-in-network-status) need the
# CronJob's grace period and stay its business
IDENTITY_REASONS = frozenset({"pod-gone", "pod-replaced", "pod-succeeded", "pod-failed"})
NODE_GONE = "node-gone"
NODE_OUT_OF_SERVICE = "node-out-of-service"
NODE_NOT_READY = "node-not-ready"


@dataclass(frozen=True)
class Release:
    holding: Holding
    reason: str


def pod_info(pod: Mapping[str, Any] | None) -> PodInfo | None:
    """The pod as the audit reads it, from a full pod object (a GET by name)."""
    if pod is None:
        return None
    return next(iter(audit.pod_index([pod]).values()))


def dead_node(
    node: str,
    nodes: Mapping[str, NodeState] | None,
    now: datetime,
    not_ready_after: float | None,
) -> str | None:
    """Why a Terminating pod on `node` will never be cleaned up by its kubelet, or None."""
    if not node or nodes is None:
        return None  # not scheduled, or nodes not known yet
    state = nodes.get(node)
    if state is None:
        return NODE_GONE
    if state.out_of_service:
        return NODE_OUT_OF_SERVICE
    if (
        not_ready_after is not None
        and state.not_ready_since is not None
        and (now - state.not_ready_since).total_seconds() >= not_ready_after
    ):
        return NODE_NOT_READY
    return None


def judge(
    ref: str,
    pod: Mapping[str, Any] | None,
    pools: Sequence[PoolSnapshot],
    slice_pools: Sequence[SlicePool],
    nodes: Mapping[str, NodeState] | None,
    now: datetime,
    not_ready_after: float | None = None,
) -> list[Release]:
    """The leases of pod `ref` in `pools` to release, given `pod` as read from the API server just now
    (None: it does not exist). `pools` must have been read before `pod`."""
    info = pod_info(pod)
    # only this pod's leases are judged (each lease's verdict is its own): a pool of 250 leases
    # costs the audit 250 addresses and reservation names otherwise, for every pod looked at
    own = [
        replace(p, allocations={o: lease for o, lease in p.allocations.items() if lease.podref == ref})
        for p in pools
    ]
    inventory = audit.Inventory(own, (), slice_pools, {ref: info} if info is not None else {}, None)
    out = [
        Release(p.holding, p.detail)
        for p in audit.audit(inventory, now, 0.0)
        if p.kind == audit.LEAKED
        and p.fix == audit.RELEASE
        and p.podref == ref
        and p.holding is not None
        and p.detail in IDENTITY_REASONS
    ]
    if out or pod is None or info is None or not info.deleting:
        return out
    reason = dead_node(str((pod.get("spec") or {}).get("nodeName") or ""), nodes, now, not_ready_after)
    if reason is None:
        return []
    return [
        Release(h, reason)
        for h in audit.holdings(audit.pool_views(inventory))
        if h.lease.podref == ref and not h.lease.retained and audit.holder_is_live(h.lease, info)
    ]
