"""The repair pass: `ipam-reconcile` (the CronJob) and `ipamctl repair` are this same pass.

One pass reads the datastore once (`gather`: reservations, pools, pods, node slice pools, nodes, in
that order, see `ipam.audit`), lets `ipam.audit` judge it, and carries out each fix the audit marked
safe, every one through a conditional write that re-checks what was judged:
- a leaked lease is released through the engine's conditional pool write, only if it is still exactly
  the lease judged (an ADD or DEL racing the pass wins), then its reservation as a DEL does;
- an orphan reservation is deleted only at the version (Kubernetes) or with the holder (file) read;
- a missing reservation is created for its lease, and removed again if the lease is gone by then;
- a slice of a gone node is returned (its `nodeName` emptied) only if its pools still hold no lease,
  with a write conditional on the NodeSlicePool's resourceVersion.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol, TextIO

from . import audit
from .allocator import STATEFULSET, Allocations
from .audit import (
    Inventory,
    PodInfo,
    Problem,
    Reservation,
    Slice,
    SlicePool,
    network_prefix,
    parse_time,
    pod_index,
    statefulset_index,
    verdict,
)
from .engine import Engine, RetryPolicy
from .errors import CNIError, ConflictError, TransientStoreError
from .log import log
from .printable import printable
from .slicereturn import return_slices
from .slices import NodeSlices
from .store.base import LeaseRemoval, PoolSnapshot, StandingTurn, Store, Turn

if TYPE_CHECKING:
    from .store.file import FileStore
    from .store.kubernetes import KubernetesStore

# the pure judgement moved to ipam.audit; these names stay importable from here
__all__ = [
    "PodInfo",
    "Reconciler",
    "Summary",
    "gather",
    "main",
    "network_prefix",
    "parse_time",
    "pod_index",
    "verdict",
]

STORE_ERRORS = (CNIError, TransientStoreError)
# A writer turn (ipam.turns) is held for one read-modify-write, well under a second; one standing
# this long was left by an agent that died holding it.
ABANDONED_TURN_SECONDS = 60.0


class Source(Protocol):
    """What the pass reads and writes besides the pool writes of the engine's `Store`."""

    store: Store
    where: str  # put before pool names in output: the namespace ("" for the file datastore)

    def reservations(self) -> list[Reservation]: ...
    def pools(self) -> list[PoolSnapshot]: ...
    def pods(self) -> dict[str, PodInfo] | None: ...
    def slice_pools(self) -> list[SlicePool]: ...
    def nodes(self) -> frozenset[str] | None: ...
    def statefulsets(self) -> dict[str, range] | None:
        """`audit.statefulset_index` of the cluster's StatefulSets (sticky retention); None: none to read."""
        ...

    def delete_reservation(self, reservation: Reservation) -> None: ...
    def return_slices(self, grace: float, dry_run: bool, now: datetime) -> list[str]:
        """Node slices' reclaim (`slicereturn.return_slices`): one line per slice returned, or error."""
        ...

    def turns(self) -> list[StandingTurn]: ...
    def remove_turn(self, turn: Turn) -> None: ...


class KubeSource:
    def __init__(self, store: KubernetesStore) -> None:
        self.store: Store = store
        self.kube = store
        self.where = store.namespace

    def reservations(self) -> list[Reservation]:
        return [Reservation.from_object(obj) for obj in self.kube.list_reservations()]

    def pools(self) -> list[PoolSnapshot]:
        return self.kube.list_pools()

    def pods(self) -> dict[str, PodInfo]:
        return pod_index(self.kube.list_pods())

    def slice_pools(self) -> list[SlicePool]:
        return [_slice_pool(pool) for pool in self.kube.list_node_slices()]

    def nodes(self) -> frozenset[str]:
        return frozenset(self.kube.list_nodes())

    def statefulsets(self) -> dict[str, range]:
        return statefulset_index(self.kube.list_statefulsets())

    def delete_reservation(self, reservation: Reservation) -> None:
        self.kube.delete_reservation(reservation.name, reservation.version)

    def return_slices(self, grace: float, dry_run: bool, now: datetime) -> list[str]:
        return return_slices(self.kube, grace, dry_run, now)

    def turns(self) -> list[StandingTurn]:
        return self.kube.list_turns()

    def remove_turn(self, turn: Turn) -> None:
        self.kube.end_turn(turn)


def _slice_pool(pool: NodeSlices) -> SlicePool:
    """The node-slice module's NodeSlicePool as the audit reads it."""
    slices = tuple(Slice(e.node, e.slice_range) for e in pool.entries)
    return SlicePool(pool.name, pool.range, pool.slice_size, slices, pool.version or "")


class FileSource:
    """The file datastore: no pods (leaked leases cannot be judged), no nodes, no node slices."""

    def __init__(self, store: FileStore) -> None:
        self.store: Store = store
        self.files = store
        self.where = ""

    def reservations(self) -> list[Reservation]:
        return [Reservation.from_object(obj) for obj in self.files.list_reservations()]

    def pools(self) -> list[PoolSnapshot]:
        return self.files.list_pools()

    def pods(self) -> None:
        return None

    def slice_pools(self) -> list[SlicePool]:
        return [_slice_pool(pool) for pool in self.files.list_node_slices()]

    def nodes(self) -> None:
        return None

    def statefulsets(self) -> None:
        return None

    def delete_reservation(self, reservation: Reservation) -> None:
        self.files.delete_reservation(reservation.name, reservation.version)

    def return_slices(self, grace: float, dry_run: bool, now: datetime) -> list[str]:
        return return_slices(self.files, grace, dry_run, now)

    def turns(self) -> list[StandingTurn]:
        return []  # one node: its lock directory serializes writers, no turns are taken

    def remove_turn(self, turn: Turn) -> None:
        raise NotImplementedError


def gather(source: Source) -> Inventory:
    """Read everything once, in the order `ipam.audit` relies on."""
    reservations = source.reservations()
    pools = source.pools()
    pods = source.pods()
    notes: list[str] = []
    if pods is None:
        notes.append("leaked leases not judged: the file datastore has no pod list")
    statefulsets: dict[str, range] | None = None
    if any(lease.retained and lease.sticky == STATEFULSET for p in pools for lease in p.allocations.values()):
        try:  # only when a lease is kept for a StatefulSet: the common pass lists nothing more
            statefulsets = source.statefulsets()
        except STORE_ERRORS as exc:  # refused (RBAC of an older install): keep what is retained
            notes.append(f"StatefulSet retention not judged: {exc.msg if isinstance(exc, CNIError) else exc}")
    # node slices are judged only when they can be read: an identity without the RBAC for them
    # (NodeSlicePools, nodes) still gets every other check and repair
    slice_pools: list[SlicePool] = []
    nodes: frozenset[str] | None = None
    try:
        slice_pools = source.slice_pools()
        if any(sl.node for sp in slice_pools for sl in sp.slices):
            nodes = source.nodes()
    except STORE_ERRORS as exc:  # refused (RBAC), or failing now: the rest of the pass goes on
        notes.append(f"node slices not judged: {exc.msg if isinstance(exc, CNIError) else exc}")
        return Inventory(pools, reservations, [], pods, None, tuple(notes), False, statefulsets)
    return Inventory(pools, reservations, slice_pools, pods, nodes, tuple(notes), True, statefulsets)


@dataclass
class Summary:
    pools: int = 0
    leases: int = 0
    kept: int = 0
    released: int = 0
    reservations_deleted: int = 0
    reservations_created: int = 0
    slices_returned: int = 0
    turns_removed: int = 0
    errors: int = 0
    lines: list[str] = field(default_factory=list)
    changes: list[dict[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in (
                "pools",
                "leases",
                "kept",
                "released",
                "reservations_deleted",
                "reservations_created",
                "slices_returned",
                "turns_removed",
                "errors",
            )
        }


class Reconciler:
    """One repair pass over a datastore; `out` gets one line per change (see README)."""

    def __init__(self, source: Source, grace: float, dry_run: bool, out: TextIO) -> None:
        self.source = source
        self.store = source.store
        self.engine = Engine(self.store, RetryPolicy(deadline_seconds=60.0))
        self.grace = grace
        self.dry_run = dry_run
        self.out = out

    def say(self, summary: Summary, line: str) -> None:
        line = printable(line)  # names, podrefs and holders read from the cluster
        summary.lines.append(line)
        self.out.write(line + "\n")
        self.out.flush()

    def change(self, summary: Summary, action: str, line: str, **fields: str) -> None:
        summary.changes.append({"action": action, **fields})
        self.say(summary, line)

    def _pool(self, name: str) -> str:
        return f"{self.source.where}/{name}" if self.source.where else name

    def run_once(self, now: datetime | None = None) -> Summary:
        summary = Summary()
        now = now or datetime.now(UTC)
        try:
            inventory = gather(self.source)
        except STORE_ERRORS as exc:
            summary.errors += 1
            self.say(summary, f"error listing pools or pods: {exc}")
            self._finish(summary)
            return summary
        for note in inventory.notes:
            self.say(summary, f"note {note}")
        problems = audit.audit(inventory, now, self.grace)
        summary.problems = problems
        summary.pools = len(inventory.pools)
        summary.leases = sum(len(p.allocations) for p in inventory.pools)
        fixes: dict[str, list[Problem]] = defaultdict(list)
        for problem in problems:
            if problem.fix:
                fixes[problem.fix].append(problem)
        self._release(summary, fixes[audit.RELEASE])
        summary.kept = summary.leases - summary.released
        for problem in fixes[audit.DELETE_RESERVATION]:
            self._delete_orphan(summary, problem)
        for problem in fixes[audit.CREATE_RESERVATION]:
            self._create_reservation(summary, problem)
        if inventory.slices_read:
            self._return_slices(summary, datetime.now(UTC))  # after this pass's releases emptied pools
        self._remove_abandoned_turns(summary, now)
        for problem in problems:
            if problem.kind in (audit.DUPLICATE, audit.MISMATCH, audit.OUT_OF_RANGE, audit.RANGE_MISMATCH):
                self.say(
                    summary,
                    f"report kind={problem.kind} pool={self._pool(problem.pool)} address={problem.address} "
                    f"podref={problem.podref} detail={problem.detail!r}",
                )
        self._finish(summary)
        return summary

    def _finish(self, summary: Summary) -> None:
        self.say(
            summary,
            f"summary pools={summary.pools} leases={summary.leases} kept={summary.kept} "
            f"{'would_release' if self.dry_run else 'released'}={summary.released} "
            f"reservations_deleted={summary.reservations_deleted} errors={summary.errors}",
        )

    # -- leaked leases ----------------------------------------------------------------------------

    def _release(self, summary: Summary, problems: list[Problem]) -> None:
        verb = "would-release" if self.dry_run else "release"
        by_pool: dict[str, list[Problem]] = defaultdict(list)
        for problem in problems:
            assert problem.holding is not None
            by_pool[problem.holding.pool.name].append(problem)
        for name, judged in by_pool.items():
            for p in judged:
                h = p.holding
                assert h is not None
                self.change(
                    summary,
                    "release",
                    f"{verb} pool={self._pool(name)} address={h.address} podref={h.lease.podref} "
                    f"container={h.lease.id} reason={p.detail}",
                    pool=name,
                    address=h.address,
                    podref=h.lease.podref,
                    reason=p.detail,
                )
            if self.dry_run:
                summary.released += len(judged)
                continue
            summary.released += len(self.release_holdings([p.holding for p in judged if p.holding], summary))

    def release_holdings(self, held: Sequence[audit.Holding], summary: Summary | None = None) -> list[int]:
        """Release exactly these leases of one pool (each only if unchanged), then their reservations;
        returns the offsets released. Errors go to `summary` when given, else they are raised."""
        gone = self.release_leases(held, summary)
        for h in held:
            if h.offset in gone:
                self.release_reservation(h, summary)
        return gone

    def release_leases(self, held: Sequence[audit.Holding], summary: Summary | None = None) -> list[int]:
        """The pool write of `release_holdings`: these leases of one pool, each only if unchanged."""
        if not held:
            return []
        view = held[0].pool
        judged: Allocations = {h.offset: h.lease for h in held}

        def change(allocations: Allocations) -> tuple[Allocations, list[int]]:
            gone = [o for o, lease in judged.items() if allocations.get(o) == lease]
            return {k: v for k, v in allocations.items() if k not in gone}, gone

        try:
            store = self.engine.store
            # one write that tests each lease, no read first; when one changed, or the write met a
            # transient error (retried by the loop, as the write it replaced was), the read-and-write loop
            if isinstance(store, LeaseRemoval):
                with contextlib.suppress(TransientStoreError):
                    if store.remove_leases(view.name, judged):
                        return sorted(judged)
            return self.engine.mutate_pool(view.name, view.snapshot.cidr, change)
        except STORE_ERRORS as exc:
            if summary is None:
                raise
            summary.errors += 1
            self.say(summary, f"error releasing in pool {view.name}: {exc}")
            return []

    def release_reservation(
        self, h: audit.Holding, summary: Summary | None = None, cached: Reservation | None = None
    ) -> None:
        """The reservation of a lease just released (only if it still names that container). With
        `cached` (a watch's copy of it) naming that container, it is deleted at the copy's
        resourceVersion with no read first; if it changed since (409), it is read and judged anew."""
        if not h.address:
            return
        if (
            cached is not None
            and cached.name == h.reservation
            and cached.version
            and cached.holder.held_by_container(h.lease.id, h.lease.ifname)
        ):
            try:
                self.source.delete_reservation(cached)
                return
            except (ConflictError, *STORE_ERRORS):
                pass  # changed since the copy, or a failed request: the read below decides
        try:
            self.engine.reservations.unreserve_name(
                h.reservation, h.lease.id, h.lease.ifname, time.monotonic() + 30, quiet=False
            )
        except CNIError as exc:
            if summary is None:
                raise
            summary.errors += 1
            self.say(summary, f"error deleting reservation {h.reservation}: {exc}")

    # -- reservations -----------------------------------------------------------------------------

    def _delete_orphan(self, summary: Summary, problem: Problem) -> None:
        r = problem.reservation
        assert r is not None
        podref = r.holder.podref
        if self.dry_run:
            summary.reservations_deleted += 1
            self.change(
                summary,
                "delete-reservation",
                f"would-delete reservation={r.name} podref={podref} reason=orphaned",
                reservation=r.name,
                podref=podref,
                reason="orphaned",
            )
            return
        try:
            self.source.delete_reservation(r)
        except STORE_ERRORS as exc:
            summary.errors += 1
            self.say(summary, f"error deleting reservation {r.name}: {exc}")
            return
        except ConflictError as exc:  # it changed hands since it was listed; the next pass decides
            self.say(summary, f"skip reservation={r.name}: {exc}")
            return
        summary.reservations_deleted += 1
        self.change(
            summary,
            "delete-reservation",
            f"delete reservation={r.name} podref={podref} reason=orphaned",
            reservation=r.name,
            podref=podref,
            reason="orphaned",
        )

    def _create_reservation(self, summary: Summary, problem: Problem) -> None:
        h = problem.holding
        assert h is not None
        name = h.reservation
        fields = {"reservation": name, "pool": h.pool.name, "address": h.address, "podref": h.lease.podref}
        tail = f"reservation={name} pool={self._pool(h.pool.name)} address={h.address} podref={h.lease.podref} reason=missing"
        if self.dry_run:
            summary.reservations_created += 1
            self.change(summary, "create-reservation", "would-create " + tail, reason="missing", **fields)
            return
        try:
            holder = self.store.reserve(name, h.lease, h.address)
            if holder is not None:
                self.say(summary, f"skip reservation={name}: now held by {holder.podref or holder.id}")
                return
            # a DEL may have released the lease meanwhile (and found no reservation to delete): re-check
            current = self.store.read_pool(h.pool.name, h.pool.snapshot.cidr).allocations.get(h.offset)
            if current is None or not current.owned_by(h.lease.podref, h.lease.ifname, h.lease.id):
                self.store.unreserve(name, h.lease.id, h.lease.ifname)
                self.say(summary, f"skip reservation={name}: its lease was released meanwhile")
                return
            if current.id != h.lease.id:
                # the pod's new sandbox took the lease back meanwhile (sticky, or re-created by name) and
                # `reserve` just gave its reservation to the old one: hand it back to the holder
                self.store.reserve(name, current)
        except (*STORE_ERRORS, ConflictError) as exc:
            summary.errors += 1
            self.say(summary, f"error creating reservation {name}: {exc}")
            return
        summary.reservations_created += 1
        self.change(summary, "create-reservation", "create " + tail, reason="missing", **fields)

    # -- node slices ------------------------------------------------------------------------------

    def _return_slices(self, summary: Summary, now: datetime) -> None:
        """Slices of gone nodes, and live nodes' spare empty ones, go back through node slices' reclaim:
        it fences the slice's pool before freeing the slice, so an ADD racing it retries elsewhere."""
        for line in self.source.return_slices(self.grace, self.dry_run, now):
            if line.startswith("error"):
                summary.errors += 1
                self.say(summary, line)
                continue
            verb, _, rest = line.partition(" ")
            if verb in ("return", "would-return"):
                summary.slices_returned += 1
                fields = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
                self.change(summary, "return-slice", line, **fields)
            else:
                self.say(summary, line)

    def _remove_abandoned_turns(self, summary: Summary, now: datetime) -> None:
        """Writer turns (ipam.turns) standing for ABANDONED_TURN_SECONDS: a turn is held for one write,
        so its holder died holding it. A waiting agent would remove it too, after waiting out its
        duration; this spares that wait. Removed only if still that very object."""
        try:
            standing = self.source.turns()
        except STORE_ERRORS as exc:
            self.say(summary, f"note writer turns not read: {exc}")
            return
        for t in standing:
            age = (now - t.created).total_seconds() if t.created is not None else None
            if age is None or age < ABANDONED_TURN_SECONDS:
                continue
            fields = {"turn": t.turn.name, "holder": t.holder or "-", "age": f"{int(age)}s"}
            text = " ".join(f"{k}={v}" for k, v in fields.items())
            if not self.dry_run:
                try:
                    self.source.remove_turn(t.turn)
                except STORE_ERRORS as exc:
                    summary.errors += 1
                    self.say(summary, f"error removing writer turn {t.turn.name}: {exc}")
                    continue
            summary.turns_removed += 1
            verb = "would-remove" if self.dry_run else "remove"
            self.change(summary, "remove-turn", f"{verb} {text} reason=abandoned", **fields)


def connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--kubeconfig and --namespace, as ipam-reconcile and ipam-controller take them."""
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster service account)")
    parser.add_argument(
        "--namespace", help="namespace of the IPPools (default: the kubeconfig context's, else kube-system)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipam-reconcile",
        description="Repair whereabouts-py's pools (the same pass as `ipamctl repair`): release leases "
        "whose pods no longer exist, delete orphan reservations, recreate missing ones, return slices of "
        "gone nodes.",
    )
    connection_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="change nothing; print what would be released")
    parser.add_argument("--interval", type=float, help="run a pass every SECONDS forever (default: one pass)")
    parser.add_argument(
        "--grace",
        type=float,
        default=300.0,
        help="minimum age in seconds of what is changed (and before a network-status mismatch counts)",
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    if args.grace < 0 or (args.interval is not None and args.interval <= 0):
        out.write("error: --grace must be >= 0 and --interval > 0\n")
        return 2
    from .store.kubernetes import KubernetesStore

    try:
        store = KubernetesStore.connect(
            args.kubeconfig, tempfile.gettempdir() + "/whereabouts-py-reconcile", args.namespace
        )
    except CNIError as exc:
        out.write(printable(f"error: {exc}") + "\n")
        return 2
    reconciler = Reconciler(KubeSource(store), args.grace, args.dry_run, out)
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
