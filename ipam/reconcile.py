"""ipam-reconcile: release leases whose pod is gone, and reservations no lease backs.

One pass reads every IPPool, then lists pods cluster-wide (in that order: a lease seen in a pool was
made for a pod that existed before the pod list was taken), judges each lease, and releases through
the engine's conditional write, removing a lease only if it is still exactly the one judged, so an
ADD or DEL racing the reconciler always wins.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

from netaddr import IPAddress, IPNetwork

from .allocator import Allocations, Lease
from .engine import Engine, RetryPolicy
from .errors import CNIError, ConflictError, TransientStoreError
from .log import log
from .nodeslices import return_slices, slice_network_prefixes
from .ranges import pool_name, reservation_name
from .store.base import PoolSnapshot
from .store.kubernetes import KubernetesStore

NETWORK_STATUS = "k8s.v1.cni.cncf.io/network-status"
TERMINAL_PHASES = ("Succeeded", "Failed")


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class PodInfo:
    uid: str
    phase: str
    deleting: bool
    created: datetime | None
    ips: frozenset[str] | None  # addresses in Multus' network-status; None when there is no annotation


def pod_index(pods: Sequence[dict[str, Any]]) -> dict[str, PodInfo]:
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
    """Why this lease should be released, or None to keep it."""
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


def network_prefix(snapshot: PoolSnapshot) -> str:
    """The `network_name` a pool was made with, recovered from its name."""
    bare = pool_name(str(IPNetwork(snapshot.cidr).cidr))
    if snapshot.name.endswith("-" + bare):
        return snapshot.name[: -len(bare) - 1]
    return ""


@dataclass
class Summary:
    pools: int = 0
    leases: int = 0
    kept: int = 0
    released: int = 0
    reservations_deleted: int = 0
    errors: int = 0
    lines: list[str] = field(default_factory=list)


class Reconciler:
    def __init__(self, store: KubernetesStore, grace: float, dry_run: bool, out: TextIO) -> None:
        self.store = store
        self.engine = Engine(store, RetryPolicy(deadline_seconds=60.0))
        self.grace = grace
        self.dry_run = dry_run
        self.out = out
        self.slice_prefixes: dict[str, str] = {}  # slice pool -> network name of its reservations

    def say(self, summary: Summary, line: str) -> None:
        summary.lines.append(line)
        self.out.write(line + "\n")
        self.out.flush()

    def run_once(self) -> Summary:
        summary = Summary()
        now = datetime.now(UTC)
        try:
            pools = self.store.list_pools()
            self.slice_prefixes = slice_network_prefixes(self.store, pools)
            pods = pod_index(self.store.list_pods())
        except (CNIError, TransientStoreError) as exc:
            summary.errors += 1
            self.say(summary, f"error listing pools or pods: {exc}")
            self._finish(summary)
            return summary
        verb = "would-release" if self.dry_run else "release"
        for snapshot in pools:
            summary.pools += 1
            network = IPNetwork(snapshot.cidr)
            judged: Allocations = {}
            for offset, lease in sorted(snapshot.allocations.items()):
                summary.leases += 1
                address = str(IPAddress(int(network.first) + offset, network.version))
                reason = verdict(lease, address, pods.get(lease.podref), now, self.grace)
                if reason is None:
                    summary.kept += 1
                    continue
                judged[offset] = lease
                self.say(
                    summary,
                    f"{verb} pool={self.store.namespace}/{snapshot.name} address={address} "
                    f"podref={lease.podref} container={lease.id} reason={reason}",
                )
            if judged and not self.dry_run:
                summary.released += self._release(snapshot, judged, summary)
            elif judged:
                summary.released += len(judged)
        self._orphaned_reservations(summary, now)
        for line in return_slices(self.store, self.grace, self.dry_run, now):  # node slices (nodeslices.py)
            summary.errors += line.startswith("error")
            self.say(summary, line)
        self._finish(summary)
        return summary

    def _finish(self, summary: Summary) -> None:
        self.say(
            summary,
            f"summary pools={summary.pools} leases={summary.leases} kept={summary.kept} "
            f"{'would_release' if self.dry_run else 'released'}={summary.released} "
            f"reservations_deleted={summary.reservations_deleted} errors={summary.errors}",
        )

    def _release(self, snapshot: PoolSnapshot, judged: Allocations, summary: Summary) -> int:
        def change(allocations: Allocations) -> tuple[Allocations, list[int]]:
            gone = [o for o, lease in judged.items() if allocations.get(o) == lease]
            return {k: v for k, v in allocations.items() if k not in gone}, gone

        try:
            gone = self.engine.mutate_pool(snapshot.name, snapshot.cidr, change)
        except (CNIError, TransientStoreError) as exc:
            summary.errors += 1
            self.say(summary, f"error releasing in pool {snapshot.name}: {exc}")
            return 0
        kept_by_race = len(judged) - len(gone)
        summary.kept += kept_by_race
        network = IPNetwork(snapshot.cidr)
        prefix = self.slice_prefixes.get(snapshot.name, network_prefix(snapshot))
        for offset in gone:
            lease = judged[offset]
            rname = reservation_name(IPAddress(int(network.first) + offset, network.version), prefix)
            try:
                self.engine.unreserve_name(rname, lease.id, lease.ifname, time.monotonic() + 30, quiet=False)
            except CNIError as exc:
                summary.errors += 1
                self.say(summary, f"error deleting reservation {rname}: {exc}")
        return len(gone)

    def _orphaned_reservations(self, summary: Summary, now: datetime) -> None:
        try:
            pools = self.store.list_pools()
            reservations = self.store.list_reservations()
            self.slice_prefixes = slice_network_prefixes(self.store, pools)
        except (CNIError, TransientStoreError) as exc:
            summary.errors += 1
            self.say(summary, f"error listing reservations: {exc}")
            return
        backed: set[str] = set()
        for snapshot in pools:
            network = IPNetwork(snapshot.cidr)
            prefix = self.slice_prefixes.get(snapshot.name, network_prefix(snapshot))
            for offset in snapshot.allocations:
                backed.add(reservation_name(IPAddress(int(network.first) + offset, network.version), prefix))
        for obj in reservations:
            meta = obj.get("metadata") or {}
            name = str(meta.get("name", ""))
            if name in backed:
                continue
            made = parse_time((obj.get("spec") or {}).get("created")) or parse_time(
                meta.get("creationTimestamp")
            )
            if made is None or (now - made).total_seconds() <= self.grace:
                continue  # an ADD may hold it between reserving and writing its pool
            podref = (obj.get("spec") or {}).get("podref", "")
            if self.dry_run:
                self.say(summary, f"would-delete reservation={name} podref={podref} reason=orphaned")
                summary.reservations_deleted += 1
                continue
            try:
                self.store.delete_reservation(name, str(meta.get("resourceVersion", "")))
            except (CNIError, TransientStoreError) as exc:
                summary.errors += 1
                self.say(summary, f"error deleting reservation {name}: {exc}")
                continue
            except ConflictError as exc:  # it changed hands since it was listed; the next pass decides
                self.say(summary, f"skip reservation={name}: {exc}")
                continue
            summary.reservations_deleted += 1
            self.say(summary, f"delete reservation={name} podref={podref} reason=orphaned")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipam-reconcile", description="Release whereabouts-py leases whose pods no longer exist."
    )
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    parser.add_argument(
        "--namespace", help="namespace of the IPPools (default: the kubeconfig context's, else kube-system)"
    )
    parser.add_argument("--dry-run", action="store_true", help="change nothing; print what would be released")
    parser.add_argument("--interval", type=float, help="run a pass every SECONDS forever (default: one pass)")
    parser.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="minimum age in seconds before a network-status mismatch counts",
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.grace < 0 or (args.interval is not None and args.interval <= 0):
        out.write("error: --grace must be >= 0 and --interval > 0\n")
        return 2
    try:
        store = KubernetesStore.connect(
            args.kubeconfig, tempfile.gettempdir() + "/whereabouts-py-reconcile", args.namespace
        )
    except CNIError as exc:
        out.write(f"error: {exc}\n")
        return 2
    reconciler = Reconciler(store, args.grace, args.dry_run, out)
    try:
        while True:
            summary = reconciler.run_once()
            log.info("reconcile.pass", released=summary.released, errors=summary.errors)
            if args.interval is None:
                return 1 if summary.errors else 0
            time.sleep(args.interval)
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
