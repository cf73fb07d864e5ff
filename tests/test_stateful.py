"""Random ADD / re-ADD / DEL / GC sequences through Engine + FileStore against a model of live attachments.

Several ranges in one config: two overlapping IPv4 ranges (so reservations matter) with excludes at
their edges, and an IPv6 one. After every step: no address held twice, every lease allocatable under
the config, one lease per live attachment per range, no orphan reservation; a failed ADD changed nothing.
ADDs of new attachments can be made to meet injected write conflicts and transient errors (fake clock,
so the deadline passes instantly): they must then succeed whole, or fail leaving nothing after DEL.
Attachments come from two network configs sharing the pools (`net`, `net-b`): GC of one network
must never release the other's leases. An agent's ADD can stall midway while its direct-mode
fallback runs the same ADD to the end; the agent's later rollback must not take what was answered.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from netaddr import IPAddress

from ipam import errors
from ipam.allocator import Allocations, Lease, Request
from ipam.config import load_config
from ipam.engine import Engine, Op, RetryPolicy
from ipam.errors import CNIError, ConflictError, TransientStoreError
from ipam.ranges import RangeSpec, pool_name, reservation_name
from ipam.store.base import PoolSnapshot
from ipam.store.file import FileStore
from tests.cni_exec import opt_in_flat_file

SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
NODE = "node-a"

Key = tuple[str, str]  # (container id, ifname)


def ipam_block(data_dir: str) -> dict[str, Any]:
    return {
        "type": "whereabouts-py",
        "datastore": "file",
        "data_dir": data_dir,
        # .2 - .29: first and last usable excluded
        "range": "10.0.0.0/27",
        "exclude": ["10.0.0.1", "10.0.0.30"],
        "ipRanges": [
            # overlaps the upper half of the range above (shared through reservations):
            # range_start on the network address = first usable; .17-.19 and .24-.30
            {"range": "10.0.0.16/28", "range_start": "10.0.0.16", "exclude": ["10.0.0.20/30"]},
            {"range": "fd00::/124", "exclude": ["fd00::1"]},  # fd00::2 - fd00::e
        ],
    }


class ChaosStore(FileStore):
    """The file store, with pool writes that conflict and reservations that fail transiently at `rate`."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.rate = 0.0
        self.rng = random.Random(0)

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> None:
        if self.rng.random() < self.rate:
            raise ConflictError("chaos: another writer won")
        super().write_pool(snapshot, allocations)

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        if self.rng.random() < self.rate / 2:
            raise TransientStoreError("chaos: 503", retry_after=0.05)
        return super().reserve(name, lease, address)


class FakeClock:
    """Engine time: sleeping advances it, so deadlines pass without waiting."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class Attachment:
    def __init__(
        self, container_id: str, ifname: str, podref: str, addresses: tuple[str, ...], network: str = "net"
    ) -> None:
        self.container_id = container_id
        self.ifname = ifname
        self.podref = podref
        self.addresses = addresses
        self.network = network


NETWORKS = ("net", "net-b")  # two network configs (CNI `name`) with the same ranges: they share pools


class IPAMMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="wpy-stateful-", dir=SCRATCH)
        stdin = json.dumps({"cniVersion": "1.1.0", "name": "net", "ipam": ipam_block(self.dir)}).encode()
        self.cfg = load_config(stdin, flat_search=[opt_in_flat_file()])
        self.ranges: tuple[RangeSpec, ...] = self.cfg.ranges
        self.store = ChaosStore(self.cfg.ipam.data_dir)
        self.time = FakeClock()
        self.engines = {network: self.new_engine(network) for network in NETWORKS}
        self.engine = self.engines[self.cfg.network]
        self.live: dict[str, Attachment] = {}  # podref/ifname -> attachment
        self.counter = 0
        self.exhausted = 0
        self.gave_up = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------

    def new_engine(self, network: str) -> Engine:
        return Engine(
            self.store,
            RetryPolicy(deadline_seconds=1.0, backoff_initial=0.01, backoff_max=0.1, rollback_seconds=3.0),
            network_name=self.cfg.ipam.network_name,
            network=network,
            clock=self.time.clock,
            sleep=self.time.sleep,
            rng=random.Random(1),
        )

    def leases(self) -> dict[str, list[tuple[str, str, str]]]:
        """pool name -> [(address, container id, ifname)] as stored."""
        out: dict[str, list[tuple[str, str, str]]] = {}
        for spec in self.ranges:
            name = pool_name(spec.cidr, self.cfg.ipam.network_name)
            snap = self.store.read_pool(name, spec.cidr)
            out[name] = sorted((str(spec.address_at(o)), x.id, x.ifname) for o, x in snap.allocations.items())
        return out

    def reservations(self) -> set[str]:
        if not self.store.reservations.is_dir():
            return set()
        return {p.stem for p in self.store.reservations.glob("*.json")}

    def add(self, request: Request, engine: Engine | None = None) -> tuple[str, ...] | CNIError:
        try:
            return tuple(str(a.address) for a in (engine or self.engine).add(self.ranges, request))
        except CNIError as exc:
            return exc

    @contextmanager
    def calm(self) -> Iterator[None]:
        """No injected failures inside (DEL/GC under chaos would release only part of an attachment)."""
        rate, self.store.rate = self.store.rate, 0.0
        try:
            yield
        finally:
            self.store.rate = rate

    def truly_exhausted(self) -> bool:
        """Some range has every allocatable address held (in any pool: the ranges overlap)."""
        held = {addr for pool in self.leases().values() for addr, _, _ in pool}
        for spec in self.ranges:
            free = [
                v
                for lo, hi in spec.intervals
                for v in range(lo, hi + 1)
                if str(spec.address_at(v - int(spec.network.first))) not in held
            ]
            if not free:
                return True
        return False

    # -- rules ----------------------------------------------------------------------------------

    @rule(ifname=st.sampled_from(["net1", "net2"]), network=st.sampled_from(NETWORKS))
    def add_new(self, ifname: str, network: str = "net") -> None:
        self.counter += 1
        podref = f"ns/pod{self.counter}"
        cid = f"c{self.counter}"
        before_leases, before_res = self.leases(), self.reservations()
        got = self.add(Request(cid, ifname, podref, node=NODE), self.engines[network])
        if isinstance(got, CNIError) and self.store.rate >= 1.0:
            # every write conflicts: not even the rollback can write. The runtime answers a failed
            # ADD with DEL; after that nothing of this ADD may be left.
            assert got.code in (errors.TRY_AGAIN_LATER, errors.POOL_EXHAUSTED), got
            with self.calm():
                self.engine.release(self.ranges, cid, ifname)
            assert self.leases() == before_leases
            assert self.reservations() == before_res
            return
        if isinstance(got, CNIError) and got.code == errors.TRY_AGAIN_LATER:
            assert self.store.rate > 0, got  # only injected failures may exhaust the deadline
            # all-or-nothing without help: the rollback outlasts the conflicts
            assert self.leases() == before_leases
            assert self.reservations() == before_res
            self.gave_up += 1
            return
        if isinstance(got, CNIError):
            assert got.code == errors.POOL_EXHAUSTED, got
            assert "no free address in range" in got.msg
            # all-or-nothing: nothing of this ADD is left behind
            assert self.leases() == before_leases
            assert self.reservations() == before_res
            assert self.truly_exhausted(), f"ADD failed with room left: {got}"
            self.exhausted += 1
            return
        assert len(got) == len(self.ranges)
        self.live[f"{podref}/{ifname}"] = Attachment(cid, ifname, podref, got, network)

    @rule(ifname=st.sampled_from(["net1", "net2"]), stall_at=st.integers(1, 2))
    def agent_stalls_and_direct_mode_answers(self, ifname: str, stall_at: int) -> None:
        """The agent's ADD wrote ranges before `stall_at` and stalls; the shim gives up and direct mode
        runs the same ADD to the end and answers; then the agent gives up too and rolls back. The
        answered ADD's leases must all survive (else the next pod gets one of its addresses)."""
        self.counter += 1
        request = Request(f"c{self.counter}", ifname, f"ns/pod{self.counter}", node=NODE)
        before_leases, before_res = self.leases(), self.reservations()
        stall_pool = pool_name(self.ranges[stall_at].cidr, self.cfg.ipam.network_name)
        answered: list[tuple[str, ...] | CNIError] = []

        def runner(engine: Engine, name: str, cidr: str, ops: list[Op], deadline: float) -> None:
            if name == stall_pool and not answered:
                answered.append(self.add(request))  # direct mode, while the agent waits
                raise CNIError(errors.TRY_AGAIN_LATER, "agent: gave up at its deadline")
            Engine.apply_batch(engine, name, cidr, ops, deadline)

        agent = self.new_engine(self.cfg.network)
        agent.runner = runner
        with self.calm():
            failed = self.add(request, agent)
            assert isinstance(failed, CNIError), failed
            got = answered[0] if answered else failed  # the agent may run out of room before it stalls
            if isinstance(got, CNIError):  # exhausted: both failed, and the runtime DELs the attachment
                assert got.code == errors.POOL_EXHAUSTED, got
                self.engine.release(self.ranges, request.container_id, ifname)
                assert self.leases() == before_leases
                assert self.reservations() == before_res
                return
        assert len(got) == len(self.ranges)
        self.live[f"{request.podref}/{ifname}"] = Attachment(
            request.container_id, ifname, request.podref, got
        )

    @rule(rate=st.sampled_from([0.0, 0.3, 0.7, 1.0]), seed=st.integers(0, 2**16))
    def chaos(self, rate: float, seed: int) -> None:
        """From now on ADDs of new attachments meet conflicts and transient errors at this rate."""
        self.store.rate = rate
        self.store.rng.seed(seed)

    @rule(ifname=st.sampled_from(["net1", "net2"]))
    def fill(self, ifname: str) -> None:
        """ADD until the config runs out of room: high occupancy and the exhaustion path every time."""
        before = self.exhausted
        with self.calm():
            for _ in range(40):
                self.add_new(ifname, "net")
                if self.exhausted > before:
                    return
        raise AssertionError(f"never exhausted with {len(self.live)} live attachments")

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), restart=st.booleans())
    def re_add(self, data: st.DataObject, restart: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        att = self.live[key]
        cid = f"{att.container_id}-r" if restart else att.container_id
        with self.calm():
            got = self.add(Request(cid, att.ifname, att.podref, node=NODE), self.engines[att.network])
        assert got == att.addresses
        att.container_id = cid

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.live)))
        att = self.live.pop(key)
        with self.calm():
            gone = self.engine.release(self.ranges, att.container_id, att.ifname)
        assert sorted(str(a.address) for a in gone) == sorted(att.addresses)

    @rule(ifname=st.sampled_from(["net1", "net2", "eth0"]))
    def delete_unknown(self, ifname: str) -> None:
        before = self.leases()
        assert self.engine.release(self.ranges, "never-added", ifname) == []
        assert self.leases() == before

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data(), network=st.sampled_from(NETWORKS))
    def gc(self, data: st.DataObject, network: str) -> None:
        """GC by one network's runtime: its valid attachments are only its own network's."""
        own = sorted(k for k, att in self.live.items() if att.network == network)
        keep = data.draw(st.sets(st.sampled_from(own))) if own else set()
        valid = {(self.live[k].container_id, self.live[k].ifname) for k in keep}
        with self.calm():
            gone = self.engines[network].gc(self.ranges, valid, NODE)
        stale = [k for k in own if k not in keep]
        expected = sorted(a for k in stale for a in self.live[k].addresses)
        assert sorted(str(a.address) for a in gone) == expected
        self.live = {k: v for k, v in self.live.items() if k not in stale}

    # -- invariants -------------------------------------------------------------------------------

    @invariant()
    def no_address_held_twice(self) -> None:
        held = [addr for pool in self.leases().values() for addr, _, _ in pool]
        assert len(held) == len(set(held)), held

    @invariant()
    def every_lease_allocatable(self) -> None:
        for spec in self.ranges:
            snap = self.store.read_pool(pool_name(spec.cidr, self.cfg.ipam.network_name), spec.cidr)
            for offset in snap.allocations:
                assert spec.contains(int(spec.network.first) + offset), (spec.describe(), offset)

    @invariant()
    def leases_match_live_attachments(self) -> None:
        leases = self.leases()
        assert sum(len(v) for v in leases.values()) == len(self.live) * len(self.ranges)
        stored = sorted((addr, cid, ifn) for pool in leases.values() for addr, cid, ifn in pool)
        model = sorted((a, att.container_id, att.ifname) for att in self.live.values() for a in att.addresses)
        assert stored == model

    @invariant()
    def one_reservation_per_lease(self) -> None:
        expected = {
            reservation_name(IPAddress(a), self.cfg.ipam.network_name)
            for att in self.live.values()
            for a in att.addresses
        }
        assert self.reservations() == expected


IPAMMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIPAM = IPAMMachine.TestCase
