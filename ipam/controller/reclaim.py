"""The reclaim worker: pods the watches point at are looked up by name on the API server, judged
(ipam.controller.rules, i.e. ipam.audit) and their leaked leases released through `ipam-reconcile`'s
own conditional write (`Reconciler.release_holdings`): one judgement, two triggers.

Why a stale cache never releases a live pod's lease: the caches only choose which pods to look at.
The decision reads the pod with a GET by name (no resourceVersion: a consistent read, never a stale
cache), made after the lease was seen; a pod exists before its ADD runs, so a lease seen before a 404
belongs to a pod that is gone (a pod recreated under its name has a new UID, and its lease is another
lease). The release then removes the lease only if the pool still holds exactly that lease.
"""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol

from ..allocator import Lease
from ..audit import Holding, Reservation
from ..errors import CNIError, TransientStoreError
from ..log import log
from ..reconcile import Reconciler, Summary
from .cache import Finished, Nodes, Pods, Pools
from .rules import Release, dead_node, judge

PARALLEL = 8  # GETs of pods side by side
# pools written side by side. More is not faster: each round is one write of the whole IPPool, whose
# cost on the API server grows with its leases, so fewer, fuller rounds cost it less (32 were slower
# than 8 at 10,000 pods, bench/RESULTS.md)
WRITERS = 8
RETRY_SECONDS = 1.0  # a pod whose look or pool write failed is looked at again this much later
DEFER_SECONDS = 5.0  # a released lease's reservation waits this long at most for the pool writes
GetPod = Callable[[str], "Mapping[str, Any] | None"]


class Releaser(Protocol):
    """`Reconciler`'s release path: the pool write, then each released lease's reservation."""

    def release_leases(self, held: Sequence[Holding], summary: Summary | None = None) -> list[int]: ...
    def release_reservation(
        self, h: Holding, summary: Summary | None = None, cached: Reservation | None = None
    ) -> None: ...


class Reclaimer:
    """A queue of podrefs to look at, and the one thread that works it (only while leading)."""

    def __init__(
        self,
        pods: Pods,
        finished: Finished,
        nodes: Nodes,
        pools: Pools,
        get_pod: GetPod,
        releaser: Releaser,
        is_leader: Callable[[], bool],
        not_ready_after: float | None = None,
        on_release: Callable[[Release], None] | None = None,
    ) -> None:
        self.pods, self.finished, self.nodes, self.pools = pods, finished, nodes, pools
        self.get_pod = get_pod
        self.releaser = releaser
        self.is_leader = is_leader
        self.not_ready_after = not_ready_after
        self.on_release = on_release
        self.released: Counter[str] = Counter()  # by reason
        self.errors = 0
        self._queue: set[str] = set()
        # Terminating pods to look at again when their node has been NotReady long enough
        self._rechecks: set[str] = set()
        self._retries: set[str] = set()  # pods to look at again when the retry timer fires (_later)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = False  # every cache has been listed once: until then a missing pod means nothing
        # a batch's GETs run side by side, and so do the pools' writers (each pool's leases in one
        # conditional write per round): each is a round trip to the API server. Apart, so that looks
        # never wait behind writes.
        self._lookers = ThreadPoolExecutor(PARALLEL, thread_name_prefix="reclaim-get")
        self._threads = ThreadPoolExecutor(WRITERS, thread_name_prefix="reclaim-write")
        self._unreservers = ThreadPoolExecutor(PARALLEL, thread_name_prefix="reclaim-reservation")
        self._count = threading.Lock()
        self._idle = threading.Condition()  # guards _pending, _writing, _in_flight and _writers
        # pool -> offset -> judged, not yet written: a pod looked at again before its pool was written
        # (its deletion and a later event both pointed at it) is one release, not two. In the order
        # the pools' oldest pending release came (a dict keeps it): the writers take the oldest first
        self._pending: dict[str, dict[int, Release]] = {}
        self._writing: set[str] = set()  # pools being written now, each by one writer
        # pool -> the leases (offset, lease) its writer is writing: the same lease judged again
        # meanwhile is not queued again; another lease at that offset is (the write's test fails on it)
        self._in_flight: dict[str, set[tuple[int, Lease]]] = {}
        self._writers = 0  # _write_oldest loops running or queued

    # -- what the caches point at -----------------------------------------------------------------

    def notify(self, refs: Iterable[str]) -> None:
        """Pods whose leases may be leaked now: queued if the caches say they might be."""
        if not self.ready:
            return
        picked = [r for r in refs if self.suspicious(r)]
        if picked:
            with self._cond:
                self._queue.update(picked)
                self._cond.notify()

    def suspicious(self, ref: str) -> bool:
        """Worth a GET: the pod holds leases and is missing, replaced, finished or terminating as far
        as the caches know. A live-looking pod is not looked up (the CronJob's pass still is)."""
        names = self.pools.holding(ref)
        if not names:
            return False
        meta = self.pods.get(ref)
        if meta is None or self.finished.has(ref, meta.uid) or self.pools.poduids(ref) - {meta.uid}:
            return True
        # Terminating: its kubelet frees it (the DELETED event brings it back here), unless its node is
        # dead. Pod metadata has no node: the leases name the node that made them (none: looked at).
        return meta.deleting and self.on_dead_node(ref)

    def on_dead_node(self, ref: str) -> bool:
        nodes = self.nodes.snapshot()
        if nodes is None:
            return False  # looked at again once the nodes are listed (the first sweep)
        now = datetime.now(UTC)
        soonest: float | None = None
        for node in self.pools.lease_nodes(ref):
            if not node or dead_node(node, nodes, now, self.not_ready_after) is not None:
                return True
            since = nodes[node].not_ready_since
            if self.not_ready_after is not None and since is not None:
                left = self.not_ready_after - (now - since).total_seconds()
                soonest = left if soonest is None else min(soonest, left)
        if soonest is not None:
            # NotReady, not yet for long enough: a dead kubelet posts nothing more, so no event
            # would bring the pod back here when it is; looked at again then
            self._recheck(ref, soonest)
        return False

    def _recheck(self, ref: str, seconds: float) -> None:
        with self._cond:
            if ref in self._rechecks:
                return
            self._rechecks.add(ref)

        def fire() -> None:
            with self._cond:
                self._rechecks.discard(ref)
            self.notify([ref])

        _after(max(seconds, 0.0) + 0.05, fire)

    def sweep(self) -> None:
        """Every pod holding leases (once every cache is listed, and on becoming leader)."""
        self.ready = True
        self.notify(self.pools.podrefs())

    def nodes_changed(self) -> None:
        self.notify(self.pods.terminating())

    # -- the worker -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reclaim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._lookers.shutdown(wait=False)
        self._unreservers.shutdown(wait=False)
        self._threads.shutdown(wait=False)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                batch, self._queue = self._queue, set()
            self.work(batch)

    def work(self, batch: Iterable[str]) -> None:
        """Look at each pod of `batch` side by side (when leading), and hand what was judged leaked to
        the pool writers (`_write_oldest`) without waiting for them. A pod whose look or release
        failed is looked at again RETRY_SECONDS later."""
        if not self.is_leader():
            return  # the leader does it; a new leader sweeps everything

        def look(ref: str) -> list[Release]:
            with self._guard([ref]):
                return self.judge(ref)
            return []

        refs = sorted(batch)
        by_pool: dict[str, list[Release]] = defaultdict(list)
        for judged in self._lookers.map(look, refs):
            for r in judged:
                by_pool[r.holding.pool.name].append(r)
        with self._idle:
            for pool, group in by_pool.items():
                busy = self._in_flight.get(pool, set())
                fresh = [r for r in group if (r.holding.offset, r.holding.lease) not in busy]
                if fresh:
                    self._pending.setdefault(pool, {}).update((r.holding.offset, r) for r in fresh)
            start = min(WRITERS - self._writers, len(self._pending))
            self._writers += max(0, start)
        for started in range(start):
            try:
                self._threads.submit(self._write_oldest)
            except RuntimeError:  # stopping: the writers not started are not counted
                with self._idle:
                    self._writers -= start - started
                    self._idle.notify_all()
                break
        log.debug("controller.batch", pods=len(refs), pools=len(by_pool))

    def _write_oldest(self) -> None:
        """One of WRITERS: writes the pool whose oldest pending release is the oldest of all (and
        that no other writer is writing), all its pending releases in one conditional write, then
        the next such pool, until none is left. Oldest first, not one pool until it is drained:
        under a burst a pool that keeps getting releases would hold its writer while the releases of
        pools queued behind it waited. Taken in turn, each write carries what its pool gathered
        meanwhile: when the writes fall behind, they carry more releases each and catch up."""
        exited = False
        try:
            while True:
                with self._idle:
                    pool = next((p for p in self._pending if p not in self._writing), None)
                    if pool is None:  # a pool still pending is being written: its writer goes on
                        exited = True  # decided under the lock: work() starts a writer if needed
                        self._writers -= 1
                        self._idle.notify_all()
                        return
                    group = list(self._pending.pop(pool).values())
                    self._writing.add(pool)
                    self._in_flight[pool] = {(r.holding.offset, r.holding.lease) for r in group}
                try:
                    if self.is_leader():
                        with self._guard(sorted({r.holding.lease.podref for r in group})):
                            try:
                                self.release(group)
                            finally:  # before a failure queues its pods again: looked at anew
                                with self._idle:
                                    self._in_flight.pop(pool, None)
                finally:
                    with self._idle:
                        self._writing.discard(pool)
                        self._in_flight.pop(pool, None)
        finally:
            if not exited:  # not a way out the writes take, but the count must stay true
                with self._idle:
                    self._writers -= 1
                    self._idle.notify_all()

    def _writes_idle(self) -> bool:
        """No pool write pending or going on (under _idle)."""
        return not self._writers and not self._writing and not self._pending

    def flush(self, timeout: float = 60.0) -> None:
        """Until every judged release has been written (tests; the worker never waits)."""
        with self._idle:
            self._idle.wait_for(self._writes_idle, timeout)

    @contextlib.contextmanager
    def _guard(self, refs: list[str]) -> Iterator[None]:
        try:
            yield
        except (CNIError, TransientStoreError) as exc:
            with self._count:
                self.errors += 1
            log.warning("controller.reclaim.error", podrefs=refs, error=str(exc))
            # looked at again RETRY_SECONDS later, through notify (which wakes the worker: a failed
            # write's pods are queued from a writer thread, while the worker may sleep). Not at once:
            # a GET refused with 429/503 or a refused connection fails in milliseconds, and the worker,
            # finding its queue not empty, would ask again as fast as the server refused it.
            if refs:
                self._later(set(refs))
        except Exception as exc:  # a bug must not stop the worker: logged, the CronJob still runs
            with self._count:
                self.errors += 1
            log.error("controller.reclaim.failed", podrefs=refs, error=f"{type(exc).__name__}: {exc}")

    def _later(self, refs: set[str]) -> None:
        """Look at these pods again in RETRY_SECONDS (not at once: a refusal that lasts must not
        become a loop of requests); only those the caches still point at are queued then. One timer
        for every failure meanwhile: a sweep failing on thousands of pods (the API server away)
        waits on one thread, not on one each."""
        with self._cond:
            first = not self._retries
            self._retries.update(refs)
        if first:
            _after(RETRY_SECONDS, self._retry)

    def _retry(self) -> None:
        with self._cond:
            refs, self._retries = self._retries, set()
        self.notify(sorted(refs))

    def take(self) -> set[str]:
        """The queued pods, now (the worker's batch; tests drive `work` with it)."""
        with self._cond:
            batch, self._queue = self._queue, set()
        return batch

    def judge(self, ref: str) -> list[Release]:
        """Look pod `ref` up and judge its leases: those to release."""
        names = self.pools.holding(ref)
        if not names:
            return []
        with self.pools.lock:
            pools = [self.pools.pools[n] for n in names if n in self.pools.pools]
            slice_pools = list(self.pools.slice_pools.values())
        gone = self.pods.deleted_uid(ref)
        if gone and all(
            lease.poduid == gone for p in pools for lease in p.allocations.values() if lease.podref == ref
        ):
            # every lease names the UID whose DELETED event the pod watch delivered: that pod is gone
            # for good (a UID is never reused; a pod made again under the name has another), so no GET
            pod = None
        else:
            pod = self.get_pod(ref)  # after the leases were read: see the module's docstring
        log.debug(
            "controller.reclaim.look", podref=ref, uid=str(((pod or {}).get("metadata") or {}).get("uid", ""))
        )
        return judge(
            ref, pod, pools, slice_pools, self.nodes.snapshot(), datetime.now(UTC), self.not_ready_after
        )

    def release(self, group: list[Release]) -> list[Release]:
        """Release judged leases of one pool (each only if unchanged since), counted once the pool is
        written; their reservations are deleted side by side after. What was released."""
        summary = Summary()
        gone = set(self.releaser.release_leases([r.holding for r in group], summary))
        done = [r for r in group if r.holding.offset in gone]
        with self._count:
            self.errors += summary.errors
            self.released.update(r.reason for r in done)
        if summary.errors:  # the write failed (logged by the releaser): its pods are looked at again
            self._later({r.holding.lease.podref for r in group})
        # the deferral is counted from now, not from when a reservation thread takes it up: under a
        # steady stream of writes each of PARALLEL threads would wait DEFER_SECONDS per delete, and
        # the queue (and the time the freed addresses stay reserved) would grow without bound
        until = time.monotonic() + DEFER_SECONDS
        for r in done:
            h = r.holding
            log.info(
                "controller.release",
                podref=h.lease.podref,
                pool=h.pool.name,
                address=h.address,
                reason=r.reason,
            )
            try:
                self._unreservers.submit(self._unreserve, h, until)
            except RuntimeError:  # stopping (the executor is shut down): the lease already left
                self._unreserve(h, time.monotonic())  # its pool, so its reservation goes now, here
            if self.on_release is not None:
                self.on_release(r)
        return done

    def _unreserve(self, h: Holding, until: float | None = None) -> None:
        # after the pool writes pending now (a lease is free once its pool is written; its reservation
        # only names it), so that a burst's reservation deletes do not slow its releases; under a
        # steady stream not past `until` (DEFER_SECONDS after the release)
        if until is None:
            until = time.monotonic() + DEFER_SECONDS
        with self._idle:
            self._idle.wait_for(self._writes_idle, max(0.0, until - time.monotonic()))
        summary = Summary()
        with self.pools.lock:
            cached = self.pools.reservations.get(h.reservation)
        with self._guard([]):
            self.releaser.release_reservation(h, summary, cached)
        if summary.errors:
            with self._count:
                self.errors += summary.errors
            log.warning("controller.reservation.error", reservation=h.reservation, lines=summary.lines)


def _after(seconds: float, fn: Callable[..., None], *args: Any) -> None:
    """Call `fn(*args)` on a timer thread that does not keep the process alive."""
    timer = threading.Timer(seconds, fn, args)
    timer.daemon = True
    timer.start()


class _Discard(io.StringIO):
    def write(self, text: str) -> int:
        return len(text)


def quiet_reconciler(source: Any) -> Reconciler:
    """`ipam-reconcile`'s Reconciler, used only for its release path (errors are counted and logged here)."""
    return Reconciler(source, grace=0.0, dry_run=False, out=_Discard())
