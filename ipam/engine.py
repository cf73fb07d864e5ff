"""The one retry loop every datastore shares.

read pool + version -> allocate / release (pure) -> conditional write -> on conflict re-read after a
jittered exponential backoff, all bounded by a deadline. Several ranges are all-or-nothing.

In the node agent a `PoolCache` remembers each pool as this process last wrote or read it, so a pool
that only this node writes (a node slice's) is written without reading it first: the write is
conditional on the remembered version, so a stale memory costs a refused write, never a wrong lease.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Protocol

from netaddr import IPAddress

from . import allocator, errors
from .allocator import REQUESTED, STATIC, Allocations, Lease, Request, Retention, Taken
from .errors import CNIError, ConflictError, RangeTakenError, TransientStoreError
from .log import log
from .ranges import RangeSpec, pool_name, reservation_name, same_network
from .reservations import Reservations, taken_error
from .store.base import PoolSnapshot, Store, Turn, TurnStore, check_range
from .turns import TurnWaiter


@dataclass(frozen=True)
class RetryPolicy:
    deadline_seconds: float = 90.0
    backoff_initial: float = 0.005
    backoff_max: float = 0.25
    # a failed ADD's rollback may retry this long even when the ADD used up its deadline
    rollback_seconds: float = 10.0


@dataclass(frozen=True)
class Assigned:
    """One address handed out: the range it came from and the address."""

    spec: RangeSpec
    address: IPAddress

    def cidr(self) -> str:
        return f"{self.address}/{self.spec.prefixlen}"


@dataclass(frozen=True)
class Want:
    """An exact address an ADD must get in `spec` (offset from its network address): REQUESTED
    (runtimeConfig.ips, the attachment's address in that range) or STATIC (Whereabouts' `addresses` /
    `IP=`, an extra address recorded so that no other pod is given it)."""

    spec: RangeSpec
    offset: int
    kind: str


@dataclass(eq=False)
class AddOp:
    """One range's share of an ADD; filled in by `Engine.apply_batch`. `want`: the exact offset
    (a `Want`'s), else the lowest free one."""

    spec: RangeSpec
    request: Request
    want: int | None = None
    offset: int | None = None
    reused: bool = False
    created: bool = False  # the last decision added a new lease (rather than confirming one)
    error: CNIError | None = None
    skip: set[int] = field(default_factory=set)  # offsets found reserved by another pool
    # leases this attachment held at addresses the config no longer allows, dropped by the write
    moved: list[tuple[int, Lease]] = field(default_factory=list)


@dataclass(eq=False)
class ReleaseOp:
    """A DEL's share of one pool; `released` holds the offsets given back.

    `released` accumulates over the attempts of the retry loop: an attempt whose write went through
    but whose answer was lost leaves nothing for the next attempt to find, yet its offsets were (maybe)
    released and their reservations must still be given back (unreserve checks the holder).
    With `token` (a rollback) only leases still carrying that ADD call's token are released.
    """

    container_id: str
    ifname: str
    released: list[int] = field(default_factory=list)
    token: str = ""
    untokened: bool = False  # with token: also leases without any (the pool's schema prunes tokens)
    retention: Retention | None = None  # a DEL under `sticky`: keep the leases for their pod name


Op = AddOp | ReleaseOp
# Runs a batch of ops on one pool; the default is Engine.apply_batch, the node agent coalesces.
BatchRunner = Callable[["Engine", str, str, list[Op], float], None]


def _drop_leases(
    taken: set[tuple[str, int | None]],
) -> Callable[[Allocations], tuple[Allocations, list[int]]]:
    """A pool change removing the leases at these (container id, offset) pairs."""

    def change(leases: Allocations) -> tuple[Allocations, list[int]]:
        gone = [o for o, lease in leases.items() if (lease.id, o) in taken]
        return {k: v for k, v in leases.items() if k not in gone}, gone

    return change


def _adds(ops: Sequence[Op]) -> list[AddOp]:
    return [op for op in ops if isinstance(op, AddOp)]


def _keep_readded_reservations(ops: Sequence[Op]) -> None:
    """A DEL (or rollback) followed in the same batch by an ADD of the same container that got an
    address it released: the ADD holds that address and its reservation now, and the release's
    caller unreserves by holder identity after the batch, which would remove the ADD's reservation.
    Those offsets are the ADD's: they leave the release's `released`."""
    for i, op in enumerate(ops):
        if not isinstance(op, ReleaseOp) or not op.released:
            continue
        readded = {
            later.offset
            for later in ops[i + 1 :]
            if isinstance(later, AddOp)
            and later.error is None
            and later.offset is not None
            and later.request.lease().held_by_container(op.container_id, op.ifname)
        }
        if readded & set(op.released):
            op.released = [o for o in op.released if o not in readded]


class Slicer(Protocol):
    """Node slices (ipam/nodeslices.py): a sliced range's leases live in the node's slice pools.
    Offsets in and out are the range's, so the rest of the engine does not know slices exist."""

    def covers(self, spec: RangeSpec) -> bool: ...

    def add(self, engine: Engine, op: AddOp, deadline: float) -> Assigned: ...

    def release(
        self,
        engine: Engine,
        spec: RangeSpec,
        container_id: str,
        ifname: str,
        deadline: float,
        token: str = "",
        untokened: bool = False,
    ) -> list[int]: ...

    def mutate(
        self, engine: Engine, deadline: float, change: Callable[[Allocations], tuple[Allocations, list[int]]]
    ) -> list[int]: ...

    def leases(self, engine: Engine, deadline: float) -> Allocations: ...

    def free(self, engine: Engine, deadline: float) -> int: ...


# Backoff jitter for every engine of the process: seeding a Random per engine (one per CNI call in the
# node agent) reads the OS's entropy each time. Tests give an engine its own seeded one.
_JITTER = random.Random()

# After a write from memory was refused, that pool is read before every write for this long: another
# writer is active (one IPPool shared by many nodes), and a refused write of a big pool costs the API
# server far more than the read it saved.
DISTRUST_SECONDS = 10.0
# After the datastore refused a writer turn (no WriterTurn CRD or RBAC), the agent writes without
# turns for this long (ipam.turns).
NO_TURNS_SECONDS = 300.0


def _of_range(snapshot: PoolSnapshot | None, cidr: str) -> PoolSnapshot | None:
    """`snapshot` if it records range `cidr` (any, when `cidr` is "")."""
    if snapshot is None or not cidr or same_network(snapshot.cidr, cidr):
        return snapshot
    return None


class PoolCache:
    """Pools as this process last wrote them (the node agent's, per datastore client; thread-safe),
    as the store's answer to the write gave them, or as it last read them holding the node lock.

    `trusted` gives a remembered snapshot only while no write from memory was refused recently.
    A decision made from memory is trusted only through its conditional write; one that writes
    nothing is made again on a fresh read (`Engine._write_batch`).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = 4096) -> None:
        self.clock = clock
        self.limit = limit
        self._lock = threading.Lock()
        self._pools: dict[str, PoolSnapshot] = {}
        self._own: dict[str, int | None] = {}  # the node lock's generation this process took last
        self._refused: dict[str, float] = {}
        self._write_seconds: dict[str, float] = {}
        self._window: dict[str, float] = {}
        self._contended: dict[str, float] = {}  # when a write was last refused, or a turn found taken
        self._no_turns_until = float("-inf")  # the store refused writer turns (ipam.turns): pace instead
        self.turns_seen: dict[str, tuple[Turn, float]] = {}  # TurnWaiter.sightings, across batches

    def trusted(self, name: str, cidr: str = "") -> PoolSnapshot | None:
        """The pool as remembered, unless a write from memory was refused lately; only when it
        records range `cidr` (another network's pool by the same name is read: the read refuses it)."""
        with self._lock:
            refused = self._refused.get(name)
            if refused is not None:
                if self.clock() - refused < DISTRUST_SECONDS:
                    return None
                del self._refused[name]
            return _of_range(self._pools.get(name), cidr)

    def acquired(self, name: str, generation: int | None) -> None:
        """This process took the pool's node lock as its `generation`-th holder. A holder in between
        (another process of the node) may have changed the pool: what is remembered is dropped."""
        with self._lock:
            last = self._own.get(name)
            if generation is None or last is None or generation != last + 1:
                self._pools.pop(name, None)
            self._own[name] = generation

    def unchanged(self, name: str, generation: int | None, cidr: str = "") -> PoolSnapshot | None:
        """The pool as remembered, if no other process of this node has taken its node lock since
        this one last did (`generation` is the lock's now). Only for pools no other node writes (a
        node's slice pools; the reconciler only removes leases from them): a read-only decision
        may then rest on it."""
        with self._lock:
            if generation is None or self._own.get(name) != generation:
                return None
            return _of_range(self._pools.get(name), cidr)

    def remember(self, name: str, snapshot: PoolSnapshot | None) -> None:
        """Called holding the pool's node lock."""
        with self._lock:
            if snapshot is None or snapshot.version is None:
                self._pools.pop(name, None)
                return
            if name not in self._pools and len(self._pools) >= self.limit:
                self._pools.pop(next(iter(self._pools)))  # the oldest remembered
            self._pools[name] = snapshot

    def wrote(self, name: str, seconds: float) -> None:
        """A successful read-decide-write of `name` took `seconds` (a moving average is kept)."""
        with self._lock:
            before = self._write_seconds.get(name)
            self._write_seconds[name] = seconds if before is None else 0.7 * before + 0.3 * seconds

    def write_seconds(self, name: str) -> float:
        with self._lock:
            return self._write_seconds.get(name, 0.0)

    def contended(self, name: str, conflict: bool) -> None:
        """Widen the pool's pacing window after a refused write (to at most 16 writes' time); narrow
        it after a write that went through."""
        with self._lock:
            write = self._write_seconds.get(name, 0.0)
            window = self._window.get(name, 0.0)
            if conflict:
                self._contended[name] = self.clock()
                window = min(16 * write, max(write, 2 * window))
            else:  # a slow decay: conflicts settle at a small share of the attempts
                window = 0.9 * window if window > write / 4 else 0.0
            self._window[name] = window

    @property
    def no_turns(self) -> bool:
        """The store refused writer turns lately (`turns_refused`): write without them, pacing."""
        with self._lock:
            return self.clock() < self._no_turns_until

    def turns_refused(self) -> None:
        """The datastore refused a turn (401/403, 404 to a create): no turns for NO_TURNS_SECONDS,
        then ask again. Not for good: a just-restarted API server refuses every ServiceAccount for
        about a second, and an operator may install the CRD or grant the Role `writerturns` later."""
        with self._lock:
            self._no_turns_until = self.clock() + NO_TURNS_SECONDS

    def turn_busy(self, name: str) -> None:
        """Another writer held the pool's writer turn: it is still contended."""
        with self._lock:
            self._contended[name] = self.clock()

    def recently_contended(self, name: str) -> bool:
        """Whether other writers were seen at this pool within DISTRUST_SECONDS: its writes then
        take turns (ipam.turns)."""
        with self._lock:
            last = self._contended.get(name)
            if last is None:
                return False
            if self.clock() - last < DISTRUST_SECONDS:
                return True
            del self._contended[name]
            self.turns_seen.pop(name, None)
            return False

    def pacing(self, name: str) -> float:
        """How long a batch should wait before its first attempt on this pool (0 when uncontended)."""
        with self._lock:
            return self._window.get(name, 0.0)

    def refused(self, name: str) -> None:
        """A write from memory met a newer version: forget the pool and read it for a while."""
        with self._lock:
            self._pools.pop(name, None)
            self._refused[name] = self.clock()


@dataclass
class Stats:
    attempts: int = 0
    conflicts: int = 0
    transient: int = 0


@dataclass
class Engine:
    store: Store
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    network_name: str = ""
    overlapping: bool = True
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=lambda: _JITTER)
    stats: Stats = field(default_factory=Stats)
    runner: BatchRunner | None = None
    network: str = ""  # the CNI config `name`, recorded on leases: GC touches only its own network's
    slicer: Slicer | None = None
    pool_cache: PoolCache | None = None  # the node agent's; direct mode reads every pool before writing

    @property
    def reservations(self) -> Reservations:
        return Reservations(self.store, self.network_name, self.overlapping, self._retry)

    def _sliced(self, spec: RangeSpec) -> Slicer | None:
        return self.slicer if self.slicer is not None and self.slicer.covers(spec) else None

    # -- the retry loop -------------------------------------------------------------------------

    def _pool(self, spec: RangeSpec) -> str:
        return pool_name(spec.cidr, self.network_name)

    @contextmanager
    def _locked(self, name: str, deadline: float) -> Iterator[int | None]:
        """The node lock of pool `name`; yields its generation (ipam.store.locks)."""
        with self.store.pool_lock(name, max(0.0, deadline - self.clock())) as generation:
            if self.pool_cache is not None:
                self.pool_cache.acquired(name, generation)
            yield generation

    def _retry(
        self,
        name: str,
        deadline: float,
        step: Callable[[], bool],
        write_seconds: float | Callable[[], float] = 0.0,
    ) -> None:
        """Run `step` until it returns True; conflicts and transient errors retry until the deadline.

        `write_seconds`: how long a write of this object takes (the agent measures its pools'). After
        a conflict another writer has just written, and the next attempt is spaced by about that much:
        retrying sooner only meets the same writers again, each refused write of a big pool costing the
        API server nearly a whole write, while the wait lets the agent's batch take in more calls.
        A callable gives it anew after each attempt (a time measured on the attempts themselves)."""
        attempt = 0
        last: Exception | None = None
        while True:
            self.stats.attempts += 1
            wait_hint: float | None = None
            conflict = False
            try:
                if step():
                    return
            except ConflictError as exc:
                self.stats.conflicts += 1
                last = exc
                conflict = True
            except TransientStoreError as exc:
                self.stats.transient += 1
                last = exc
                wait_hint = exc.retry_after
            write = write_seconds() if callable(write_seconds) else write_seconds
            growth = 2.0 ** min(attempt, 32)  # past the caps long before; 2**1024 would not fit a float
            if conflict and write > self.policy.backoff_initial:
                # equal jitter on a window growing from one write's time: never straight back
                cap = min(max(self.policy.backoff_max, 16 * write), write * growth)
                delay = self.rng.uniform(cap / 2, cap)
            else:
                cap = min(self.policy.backoff_max, self.policy.backoff_initial * growth)
                # full jitter: contenders spread over the whole window instead of colliding again at its end
                delay = self.rng.uniform(0, cap)
            if wait_hint is not None:
                delay = max(delay, wait_hint)
            attempt += 1
            if self.clock() + delay >= deadline:
                raise CNIError(
                    errors.TRY_AGAIN_LATER,
                    f"pool {name}: gave up after {attempt} attempts within the deadline; try again later",
                    str(last),
                )
            log.debug("retry", pool=name, attempt=attempt, delay=round(delay, 4), reason=str(last))
            self.sleep(delay)

    def _deadline(self) -> float:
        return self.clock() + self.policy.deadline_seconds

    # -- ADD ------------------------------------------------------------------------------------

    def add(
        self, ranges: Sequence[RangeSpec], request: Request, wants: Sequence[Want] = ()
    ) -> list[Assigned]:
        """One address per range, all or nothing (`wants`: exact addresses, see `Want`; the static ones
        are written first, so that the range's own address is never one of them, and are not returned).

        Every lease this call creates carries its own token; the rollback of a failed ADD removes only
        leases still carrying it (in every range it reached, the failing one included). A lease that
        another call has confirmed meanwhile (a direct-mode fallback of the same ADD, a repeat ADD) has
        lost the token and stays; so does a lease this call only confirmed.
        """
        deadline = self._deadline()
        request = replace(
            request, token=request.token or secrets.token_hex(8), network=request.network or self.network
        )
        done: list[Assigned] = []
        reached: list[AddOp] = []
        try:
            for spec in ranges:
                offsets = frozenset(w.offset for w in wants if w.spec == spec and w.kind == STATIC)
                own = replace(request, statics=offsets)
                statics = [AddOp(spec, replace(own, kind=STATIC), offset) for offset in sorted(offsets)]
                reached += statics
                self._add_statics(statics, deadline)
                requested = next((w.offset for w in wants if w.spec == spec and w.kind == REQUESTED), None)
                op = AddOp(spec, own if requested is None else replace(own, kind=REQUESTED), requested)
                reached.append(op)
                done.append(self._add_one(op, deadline))
        except BaseException:
            undo_deadline = max(deadline, self.clock() + self.policy.rollback_seconds)
            for op in reversed(reached):
                # a pool whose schema prunes our token (a Whereabouts CRD): what this call created as far
                # as it knows, i.e. the behaviour before tokens
                self._release_quietly(op.spec, request, undo_deadline, untokened=op.created)
            raise
        return done

    def _add_statics(self, ops: list[AddOp], deadline: float) -> None:
        """One range's static addresses in one batch (one pool write however many a NAD lists); in
        node slices each on its own (each finds its slice)."""
        if not ops or self._sliced(ops[0].spec) is not None:
            for op in ops:
                self._add_one(op, deadline)
            return
        self._submit(self._pool(ops[0].spec), ops[0].spec.cidr, list(ops), deadline)
        if (error := next((op.error for op in ops if op.error is not None), None)) is not None:
            raise error

    def _submit(self, name: str, cidr: str, ops: list[Op], deadline: float) -> None:
        (self.runner or Engine.apply_batch)(self, name, cidr, ops, deadline)

    def _add_one(self, op: AddOp, deadline: float) -> Assigned:
        if (slicer := self._sliced(op.spec)) is not None:
            return slicer.add(self, op, deadline)
        self._submit(self._pool(op.spec), op.spec.cidr, [op], deadline)
        if op.error is not None:
            raise op.error
        assert op.offset is not None
        return Assigned(op.spec, op.spec.address_at(op.offset))

    def apply_batch(
        self,
        name: str,
        cidr: str,
        ops: list[Op],
        deadline: float,
        absorb: Callable[[], list[Op]] | None = None,
    ) -> None:
        """Serve every op on one pool with a single read-modify-write (retried as a whole on conflict).

        Ops are applied in order to the leases as read, so a batch of N ADDs costs one GET and one PUT.
        Each op gets its own result (`offset`/`error`, `released`); only a failure of the first read
        or write (which carries every op) is raised for the whole batch. Anything failing after that
        write (an op's reservation, re-placing ops whose address another pool holds) is the error of
        the ops concerned alone. No op is answered before the write holding its lease,
        and then its overlapping-range reservation, succeeded. `absorb`, called before every attempt,
        adds ops that queued up meanwhile: under contention a retry then carries more work instead of
        leaving it for yet another contended write.

        The pool write comes first and the reservation after it, as in Whereabouts: claiming
        reservations before the write would make every contending node walk the addresses the others
        hold for their still-unwritten batches, one API round trip each.
        """
        pending = ops
        turns = self._turn_waiter(name)
        if turns is None and self.pool_cache is not None and (window := self.pool_cache.pacing(name)) > 0:
            # other nodes write this pool too and it keeps no writer turns: pace this node's writes so
            # that they take turns (the batch takes in the calls that arrive meanwhile); before the
            # node lock, within the deadline
            self.sleep(min(self.rng.uniform(window / 2, window), max(0.0, deadline - self.clock()) / 2))
        with self._locked(name, deadline):
            if turns is None:
                self._write_batch(name, cidr, pending, deadline, absorb)
            else:  # inside the node lock: the node's other writers wait there, not for the turn too
                assert self.pool_cache is not None
                with turns.held(name, deadline, self.pool_cache.write_seconds(name)) as waited:
                    if waited:
                        self.pool_cache.turn_busy(name)
                    # read under the turn: other writers have likely written since this one last did
                    self._write_batch(name, cidr, pending, deadline, absorb, fresh=True)
            while True:
                collided = self.reservations.reserve_batch(name, _adds(pending), deadline)
                if not collided:
                    break
                # another pool holds those addresses: give the leases back and place those ops again
                try:
                    drop = _drop_leases({(c.request.container_id, c.offset) for c in collided})
                    self._retry(name, deadline, self._mutation_step(name, cidr, drop, []))
                    self._write_batch(name, cidr, list(collided), deadline, None)
                except CNIError as exc:  # theirs alone: the other ops' leases and reservations stand
                    for failed in collided:
                        failed.offset, failed.error = None, exc
                    break
                pending = list(collided)
            self.reservations.unreserve_moved(name, _adds(ops), deadline)
        _keep_readded_reservations(ops)
        for op in ops:
            if isinstance(op, AddOp) and op.error is None and op.offset is not None:
                log.info("lease.add", pool=name, address=str(op.spec.address_at(op.offset)), reused=op.reused)

    def _turn_waiter(self, name: str) -> TurnWaiter | None:
        """Writer turns for pool `name` when other writers were seen at it lately (the node agent only)."""
        cache = self.pool_cache
        if cache is None or not cache.recently_contended(name):
            return None
        return self.turn_waiter()

    def turn_waiter(self) -> TurnWaiter | None:
        """Writer turns on this engine's store (ipam.turns), if it keeps them and has not refused them
        lately; the node agent only (direct mode has no PoolCache, and takes no turns)."""
        cache = self.pool_cache
        if cache is None or cache.no_turns or not isinstance(self.store, TurnStore):
            return None
        return TurnWaiter(
            self.store,
            self.clock,
            self.sleep,
            self.rng,
            sightings=cache.turns_seen,
            refused=cache.turns_refused,
        )

    def _write_batch(
        self,
        name: str,
        cidr: str,
        ops: list[Op],
        deadline: float,
        absorb: Callable[[], list[Op]] | None,
        fresh: bool = False,
    ) -> None:
        """`fresh`: the pool has likely changed since this process last saw it (it is taking turns
        with other writers): read it rather than deciding from memory."""
        cache = self.pool_cache

        def decide(snapshot: PoolSnapshot) -> tuple[Allocations, bool]:
            leases = snapshot.allocations
            changed = False
            for op in ops:
                if isinstance(op, ReleaseOp):
                    before = leases
                    leases, gone = allocator.release(
                        leases, op.container_id, op.ifname, op.token, op.untokened, op.retention
                    )
                    op.released = sorted(set(op.released) | set(gone))
                    changed = changed or leases is not before
                    continue
                decision = self._choose(name, op, leases)
                if decision is not None:
                    leases = decision.allocations
                    changed = changed or decision.changed
                    if decision.moved is not None and decision.moved not in op.moved:
                        op.moved.append(decision.moved)
            return leases, changed

        def step() -> bool:
            started = self.clock()
            if absorb is not None:
                ops.extend(absorb())
            released_before = [(op, op.released) for op in ops if isinstance(op, ReleaseOp)]
            snapshot = cache.trusted(name, cidr) if cache is not None and not fresh else None
            remembered = snapshot is not None
            if snapshot is not None:
                leases, changed = decide(snapshot)
                if not changed:  # nothing to write, so no write checks this answer: decide on a fresh read
                    remembered = False
            if not remembered:
                snapshot = self.store.read_pool(name, cidr)
                if cache is not None:  # read under the node lock: as good as our own last write
                    cache.remember(name, snapshot)
                leases, changed = decide(snapshot)
            assert snapshot is not None
            check_range(name, snapshot.cidr, cidr)  # never decided on, nor written, as another range
            if changed:
                try:
                    written = self.store.write_pool(snapshot, leases)
                except (CNIError, TransientStoreError):  # maybe written, its answer lost: forget the pool
                    if cache is not None:
                        cache.remember(name, None)
                    raise
                except ConflictError:  # refused, so certainly not written: nothing was released
                    for release_op, released in released_before:
                        release_op.released = released
                    if cache is not None:
                        cache.contended(name, conflict=True)
                        if remembered:
                            cache.refused(name)
                        else:
                            cache.remember(name, None)
                    raise
                if cache is not None:
                    cache.remember(name, written)
                    cache.wrote(name, self.clock() - started)
                    cache.contended(name, conflict=False)
            return True

        self._retry(name, deadline, step, cache.write_seconds(name) if cache is not None else 0.0)

    def _choose(self, name: str, op: AddOp, leases: Allocations) -> allocator.Decision | None:
        """Pick op's address among `leases`, avoiding addresses found reserved by another pool."""
        op.offset, op.error, op.created = None, None, False
        try:
            decision = allocator.allocate(op.spec, leases, op.request, op.skip, op.want)
        except Taken as exc:
            op.error = taken_error(
                op.spec.address_at(exc.offset), op.request.kind, exc.holder, f"pool {name}"
            )
            return None
        if decision is None:
            op.error = CNIError(
                errors.POOL_EXHAUSTED,
                f"no free address in range {op.spec.describe()} (pool {name})",
                f"{len(leases)} leases, {op.spec.size()} allocatable addresses"
                # the others' reservations (an overlapping range's, or a released lease's not yet
                # deleted: the controller defers those a few seconds), so a retry may well succeed
                + (f", {len(op.skip)} reserved by another attachment" if op.skip else ""),
            )
            return None
        op.offset, op.reused = decision.offset, decision.reused
        op.created = decision.changed and not decision.reused
        return decision

    # -- DEL / GC -------------------------------------------------------------------------------

    def _release_op(
        self,
        spec: RangeSpec,
        container_id: str,
        ifname: str,
        deadline: float,
        token: str = "",
        untokened: bool = False,
        retention: Retention | None = None,
    ) -> list[int]:
        if (slicer := self._sliced(spec)) is not None:
            return slicer.release(self, spec, container_id, ifname, deadline, token, untokened)
        op = ReleaseOp(container_id, ifname, token=token, untokened=untokened, retention=retention)
        self._submit(self._pool(spec), spec.cidr, [op], deadline)
        return op.released

    def _mutate(
        self, spec: RangeSpec, deadline: float, change: Callable[[Allocations], tuple[Allocations, list[int]]]
    ) -> list[int]:
        if (slicer := self._sliced(spec)) is not None:
            return slicer.mutate(self, deadline, change)
        return self.mutate_pool(self._pool(spec), spec.cidr, change, deadline)

    def mutate_pool(
        self,
        name: str,
        cidr: str,
        change: Callable[[Allocations], tuple[Allocations, list[int]]],
        deadline: float | None = None,
    ) -> list[int]:
        """Apply `change` to a pool's leases with the retry loop; returns the offsets it released.

        `change` is re-run on every attempt against freshly read leases, so a concurrent writer wins
        and the change is recomputed against what it wrote.
        """
        deadline = self._deadline() if deadline is None else deadline
        released: list[int] = []
        with self._locked(name, deadline):
            self._retry(name, deadline, self._mutation_step(name, cidr, change, released))
        return released

    def _mutation_step(
        self,
        name: str,
        cidr: str,
        change: Callable[[Allocations], tuple[Allocations, list[int]]],
        released: list[int],
    ) -> Callable[[], bool]:
        """One attempt of `change` on freshly read leases; the offsets it removed go to `released`."""

        def step() -> bool:
            snapshot: PoolSnapshot = self.store.read_pool(name, cidr)
            if snapshot.version is None:
                return True
            check_range(name, snapshot.cidr, cidr)
            remaining, gone = change(snapshot.allocations)
            if gone:
                try:
                    written = self.store.write_pool(snapshot, remaining)
                except ConflictError:
                    if self.pool_cache is not None:
                        self.pool_cache.remember(name, None)
                    raise
                if self.pool_cache is not None:
                    self.pool_cache.remember(name, written)
            released[:] = gone
            return True

        return step

    def release(
        self,
        ranges: Sequence[RangeSpec],
        container_id: str,
        ifname: str,
        retention: Retention | None = None,
    ) -> list[Assigned]:
        """DEL: release this attachment's leases, then its reservations by holder identity: those of
        the addresses released (in any attempt, even one whose answer was lost), and, when nothing was
        left to release (a retried DEL after a crash), any the store still lists for this holder.
        With `retention` (sticky) the leases it keeps stay, with their reservations, marked retained."""
        deadline = self._deadline()
        out: list[Assigned] = []
        for spec in ranges:
            try:
                gone = self._release_op(spec, container_id, ifname, deadline, retention=retention)
            except RangeTakenError as exc:  # another network's pool: no lease of ours, never written
                log.warning("lease.release-skipped", error=str(exc))
                continue
            self.reservations.unreserve(spec, gone, container_id, ifname, deadline)
            if not gone and (orphans := self.reservations.held(spec, container_id, ifname)):
                # not those of addresses this container holds again (an ADD of it after this DEL)
                leased = {
                    reservation_name(a.address, self.network_name)
                    for a in self.leases_of([spec], container_id, ifname)
                }
                for rname in orphans:
                    if rname in leased:
                        continue
                    log.info("reservation.orphan-release", reservation=rname, container=container_id)
                    self.reservations.unreserve_name(rname, container_id, ifname, deadline, quiet=False)
            out += [Assigned(spec, spec.address_at(o)) for o in gone]
            for o in gone:
                log.info("lease.release", pool=self._pool(spec), address=str(spec.address_at(o)))
        return out

    def _release_quietly(
        self, spec: RangeSpec, request: Request, deadline: float, untokened: bool = False
    ) -> None:
        """Roll back this ADD call's lease in `spec`: only one still carrying the call's token."""
        try:
            gone = self._release_op(
                spec, request.container_id, request.ifname, deadline, request.token, untokened
            )
            self.reservations.unreserve(spec, gone, request.container_id, request.ifname, deadline)
        except Exception as exc:  # the runtime's DEL after a failed ADD cleans up what is left
            log.error("rollback.failed", pool=self._pool(spec), error=str(exc))

    def gc(self, ranges: Sequence[RangeSpec], valid: set[tuple[str, str]], node: str) -> list[Assigned]:
        deadline = self._deadline()
        out: list[Assigned] = []
        for spec in ranges:
            holders: dict[int, tuple[str, str]] = {}

            def change(allocs: Allocations) -> tuple[Allocations, list[int]]:
                remaining, gone = allocator.release_stale(allocs, valid, node, self.network)
                holders.update({o: (allocs[o].id, allocs[o].ifname) for o in gone})  # noqa: B023
                return remaining, gone

            try:
                gone = self._mutate(spec, deadline, change)
            except RangeTakenError as exc:  # another network's pool: not judged through our range
                log.warning("lease.gc-skipped", error=str(exc))
                continue
            for offset in gone:
                cid, ifname = holders[offset]
                self.reservations.unreserve(spec, [offset], cid, ifname, deadline)
                log.info(
                    "lease.gc", pool=self._pool(spec), address=str(spec.address_at(offset)), container=cid
                )
            out += [Assigned(spec, spec.address_at(o)) for o in gone]
        return out

    # -- CHECK / STATUS -------------------------------------------------------------------------

    def leases_of(self, ranges: Sequence[RangeSpec], container_id: str, ifname: str) -> list[Assigned]:
        out = []
        for spec in ranges:
            leases = self._leases(spec)
            out += [
                Assigned(spec, spec.address_at(o))
                for o in allocator.find_container(leases, container_id, ifname)
            ]
        return out

    def free_counts(self, ranges: Sequence[RangeSpec]) -> list[tuple[RangeSpec, int]]:
        out = []
        for spec in ranges:
            if (slicer := self._sliced(spec)) is not None:
                out.append((spec, slicer.free(self, self._deadline())))
                continue
            base = int(spec.network.first)
            used = sum(1 for o in self._leases(spec) if spec.contains(base + o))
            out.append((spec, spec.size() - used))
        return out

    def _leases(self, spec: RangeSpec) -> Allocations:
        """A range's leases, keyed by offset from its network address (across its slices when sliced)."""
        if (slicer := self._sliced(spec)) is not None:
            return slicer.leases(self, self._deadline())
        return self.store.read_pool(self._pool(spec), spec.cidr).allocations
