"""Random requested ADDs, plain ADDs, repeated ADDs, sticky DELs (StatefulSet and sticky_seconds),
StatefulSet scaling and reconcile passes through Engine + FileStore + the reconciler, against a model.

After every step: no address is held by two live attachments, no acknowledged address is lost
(each live attachment still holds, under its container id, what its ADD answered), every address a
DEL kept is still kept for its pod name and given to nobody else, nothing else is held (no leak), and
the reservations are exactly the held addresses.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ipam import errors
from ipam.allocator import STATEFULSET, Request, Retention
from ipam.audit import PodInfo
from ipam.engine import REQUESTED, Engine, RetryPolicy, Want
from ipam.errors import CNIError
from ipam.ranges import build_range, pool_name, reservation_name
from ipam.reconcile import FileSource, Reconciler
from ipam.store.file import FileStore

SPEC = build_range("ipam", "10.0.0.0/29")  # .1 - .6
POOL = pool_name(SPEC.cidr)
NAMES = ("db-0", "db-1", "db-2", "web")
DEL_AT = datetime(2026, 1, 1, tzinfo=UTC)
STAMP = "%Y-%m-%dT%H:%M:%SZ"
UNTIL = DEL_AT + timedelta(minutes=10)


class ModelSource(FileSource):
    """The file datastore, with the pods and StatefulSets the model says exist."""

    def __init__(self, store: FileStore, machine: StickyMachine) -> None:
        super().__init__(store)
        self.machine = machine

    def pods(self) -> dict[str, PodInfo]:  # type: ignore[override]
        return {f"ns/{name}": PodInfo("", "Running", False, None, None) for name in self.machine.live}

    def statefulsets(self) -> dict[str, range] | None:  # type: ignore[override]
        return {} if self.machine.replicas is None else {"ns/db": range(self.machine.replicas)}


class StickyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="wpy-sticky-")
        self.store = FileStore(self.dir)
        self.engine = Engine(self.store, RetryPolicy(deadline_seconds=5.0))
        self.live: dict[str, tuple[str, str]] = {}  # pod name -> (container id, address answered)
        self.kept: dict[str, tuple[str, str]] = {}  # pod name -> (address kept, STATEFULSET or "seconds")
        self.replicas: int | None = 2
        self.counter = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def held(self) -> dict[str, tuple[str, bool]]:
        """address -> (pod name, retained) as stored."""
        snap = self.store.read_pool(POOL, SPEC.cidr)
        return {
            str(SPEC.address_at(o)): (lease.podref.split("/", 1)[1], bool(lease.retained))
            for o, lease in snap.allocations.items()
        }

    # -- rules ----------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES), wanted=st.one_of(st.none(), st.integers(1, 6)))
    def add(self, name: str, wanted: int | None) -> None:
        if name in self.live:
            return
        self.counter += 1
        cid = f"c{self.counter}"
        wants = [] if wanted is None else [Want(SPEC, wanted, REQUESTED)]
        holder = {addr: who for addr, (who, _) in self.held().items()}
        try:
            [got] = self.engine.add([SPEC], Request(cid, "net1", f"ns/{name}"), wants)
        except CNIError as exc:
            if wanted is not None:
                address = str(SPEC.address_at(wanted))
                assert exc.code == errors.ADDRESS_TAKEN and holder.get(address) not in (None, name), exc
            else:
                assert exc.code == errors.POOL_EXHAUSTED and len(holder) == 6, exc
                assert name not in self.kept
            return
        address = str(got.address)
        if wanted is not None:
            assert address == str(SPEC.address_at(wanted))
        elif name in self.kept:
            assert address == self.kept[name][0], "a kept address did not go back to its pod name"
        assert holder.get(address) in (None, name), f"{address} of {holder.get(address)} given to {name}"
        self.kept.pop(name, None)  # taken back, or moved to the requested address
        self.live[name] = (cid, address)

    @rule(name=st.sampled_from(NAMES))
    def repeat_add(self, name: str) -> None:
        if name not in self.live:
            return
        cid, address = self.live[name]
        [got] = self.engine.add([SPEC], Request(cid, "net1", f"ns/{name}"))
        assert str(got.address) == address

    @rule(name=st.sampled_from(NAMES), sticky=st.sampled_from(["", STATEFULSET, "seconds"]))
    def delete(self, name: str, sticky: str) -> None:
        if name not in self.live:
            return
        cid, address = self.live.pop(name)
        retention = None
        if sticky:
            until = UNTIL.strftime(STAMP) if sticky == "seconds" else ""
            retention = Retention(DEL_AT.strftime(STAMP), STATEFULSET if sticky == STATEFULSET else "", until)
        self.engine.release([SPEC], cid, "net1", retention)
        if retention is not None and (sticky == "seconds" or name.startswith("db-")):
            self.kept[name] = (address, sticky)

    @rule(replicas=st.one_of(st.none(), st.integers(0, 3)))
    def scale(self, replicas: int | None) -> None:
        self.replicas = replicas  # None: the StatefulSet is deleted

    @rule(minutes=st.sampled_from([1, 20]))
    def reconcile(self, minutes: int) -> None:
        now = DEL_AT + timedelta(minutes=minutes)
        Reconciler(ModelSource(self.store, self), 0.0, False, io.StringIO()).run_once(now=now)
        for name, (_, sticky) in list(self.kept.items()):
            if sticky == "seconds":
                ends = now >= UNTIL
            else:
                ends = self.replicas is None or int(name.split("-")[1]) >= self.replicas
            if ends:
                del self.kept[name]

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def one_holder_and_nothing_lost(self) -> None:
        held = self.held()
        expected = {addr: (name, False) for name, (_, addr) in self.live.items()}
        expected.update({addr: (name, True) for name, (addr, _) in self.kept.items()})
        assert len(expected) == len(self.live) + len(self.kept), "one address for two holders"
        assert held == expected
        reservations = {r["metadata"]["name"] for r in self.store.list_reservations()}
        from netaddr import IPAddress

        assert reservations == {reservation_name(IPAddress(a)) for a in held}


StickyMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=list(HealthCheck)
)
TestSticky = StickyMachine.TestCase
