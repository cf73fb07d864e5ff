"""Several simulated nodes (each with its own store and warm slice cache, like one agent each) ADD and
DEL into a sliced range on one file datastore, nodes disappear, and reclaim returns slices, sometimes
with an ADD landing between its fence and its free; ipamctl deletes the NodeSlicePool (refused while a
slice holds a lease); the NodeSlicePool is deleted by hand, or an empty slice
moved by a foreign controller, under the nodes' warm caches. After every step: no address in two slice pools,
no slice held by two nodes, every lease inside a slice its node holds (so reclaim never freed a slice
with a lease), and every live attachment still holds its address.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from netaddr import IPAddress, IPNetwork

from ipam import errors, nodeslices
from ipam.allocator import Request
from ipam.cni import make_engine
from ipam.config import load_config
from ipam.engine import Engine
from ipam.errors import CNIError
from ipam.slicereturn import SlicesInUse, delete_node_slices
from ipam.slices import slice_pool_name
from ipam.store.file import FileStore

NODES = ("n1", "n2", "n3")
RANGE = "10.0.0.0/27"  # /30 slices: 8 of them, two addresses each


class NodeSliceMachine(RuleBasedStateMachine):
    overlapping = True

    def __init__(self) -> None:
        super().__init__()
        nodeslices.forget_cache()
        self.dir = Path(tempfile.mkdtemp(prefix="slices-"))
        self.engines: dict[str, tuple[Engine, Any]] = {}
        self.live_nodes = set(NODES)
        self.pods: dict[str, tuple[str, str]] = {}  # container id -> (node, address)
        self.counter = 0

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def engine(self, node: str) -> tuple[Engine, Any]:
        if node not in self.engines:
            ipam = {
                "type": "whereabouts-py",
                "datastore": "file",
                "data_dir": str(self.dir),
                "range": RANGE,
                "node_slice_size": "/30",
                "node_name": node,
                "retry_deadline_seconds": 5,
                "enable_overlapping_ranges": self.overlapping,
            }
            cfg = load_config(json.dumps({"cniVersion": "1.1.0", "name": "net", "ipam": ipam}).encode())
            self.engines[node] = (make_engine(cfg, FileStore(str(self.dir))), cfg)
        return self.engines[node]

    def _add(self, node: str) -> None:
        self.counter += 1
        cid = f"c{self.counter}"
        engine, cfg = self.engine(node)
        try:
            got = engine.add(
                cfg.ranges, Request(container_id=cid, ifname="eth0", podref=f"ns/{cid}", node=node)
            )
        except CNIError as exc:
            assert exc.code == errors.POOL_EXHAUSTED, exc
            assert "node_slice_size /30" in exc.msg and "8 slices" in exc.msg
            return
        self.pods[cid] = (node, str(got[0].address))

    @rule(node=st.sampled_from(NODES))
    def add(self, node: str) -> None:
        self._add(node)

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        if not self.pods:
            return
        cid = data.draw(st.sampled_from(sorted(self.pods)))
        node, addr = self.pods.pop(cid)
        engine, cfg = self.engine(node)
        gone = engine.release(cfg.ranges, cid, "eth0")
        assert [str(a.address) for a in gone] == [addr]

    @rule(node=st.sampled_from(NODES))
    def node_goes_away(self, node: str) -> None:
        self.live_nodes.discard(node)

    @rule(node=st.sampled_from(NODES))
    def node_comes_back(self, node: str) -> None:
        self.live_nodes.add(node)

    @rule(racer=st.none() | st.sampled_from(NODES))
    def reclaim(self, racer: str | None) -> None:
        later = datetime.now(UTC) + timedelta(hours=1)

        def race(node: str, slice_range: str) -> None:
            assert racer is not None
            self._add(racer)

        nodeslices.reclaim_slices(
            FileStore(str(self.dir)),
            set(self.live_nodes),
            60,
            False,
            later,
            before_free=race if racer else None,
        )

    @rule()
    def ipamctl_deletes_the_node_slice_pool(self) -> None:
        """README's remedy for a changed cut: refused while a slice holds a lease."""
        with suppress(SlicesInUse, LookupError):
            delete_node_slices(FileStore(str(self.dir)), "net")

    # -- slices taken from a node behind its back (issue 22): the NodeSlicePool deleted by hand while
    # no pod uses the old slices, or an empty slice freed or given to another node by a foreign
    # controller (Go Whereabouts'), without reclaim's fence. The nodes' caches are warm.

    def _leases_in(self, node: str, slice_range: str) -> int:
        path = self.dir / "pools" / f"{slice_pool_name(node, slice_range)}.json"
        return len(json.loads(path.read_text())["spec"]["allocations"]) if path.exists() else 0

    @rule()
    def node_slice_pool_deleted(self) -> None:
        if not any(self._leases_in(node, s) for node, s in self._held() if node):
            (self.dir / "nodeslicepools" / "net.json").unlink(missing_ok=True)

    @rule(data=st.data(), to=st.sampled_from(("", *NODES)))
    def foreign_controller_moves_an_empty_slice(self, data: st.DataObject, to: str) -> None:
        empty = [(node, s) for node, s in self._held() if node and not self._leases_in(node, s)]
        if not empty:
            return
        _node, slice_range = data.draw(st.sampled_from(empty))
        path = self.dir / "nodeslicepools" / "net.json"
        doc = json.loads(path.read_text())
        for e in doc["status"]["allocations"]:
            if e["sliceRange"] == slice_range:
                e["nodeName"] = to
        doc["metadata"]["resourceVersion"] = str(int(doc["metadata"]["resourceVersion"]) + 1)
        path.write_text(json.dumps(doc))

    # -- invariants -----------------------------------------------------------------------------

    def _held(self) -> list[tuple[str, str]]:
        path = self.dir / "nodeslicepools" / "net.json"
        if not path.exists():
            return []
        return [
            (e["nodeName"], e["sliceRange"]) for e in json.loads(path.read_text())["status"]["allocations"]
        ]

    @invariant()
    def slices_have_one_holder_each(self) -> None:
        ranges = [s for _, s in self._held()]
        assert len(ranges) == len(set(ranges))

    @invariant()
    def leases_are_unique_and_inside_a_slice_their_node_holds(self) -> None:
        held = {slice_pool_name(node, s): s for node, s in self._held() if node}
        seen: dict[str, str] = {}
        pools = self.dir / "pools"
        for path in sorted(pools.glob("*.json")) if pools.exists() else []:
            doc = json.loads(path.read_text())
            leases = doc["spec"]["allocations"]
            if not leases:
                continue
            assert path.stem in held, f"{path.stem} holds leases but its node does not hold its slice"
            net = IPNetwork(held[path.stem])
            assert doc["spec"]["range"] == held[path.stem]
            for offset, lease in leases.items():
                addr = str(IPAddress(int(net.first) + int(offset)))
                assert IPAddress(addr) in net
                assert addr not in seen, f"{addr} in {seen.get(addr)} and {path.stem}"
                seen[addr] = lease["id"]
        assert seen == {addr: cid for cid, (_, addr) in self.pods.items()}


NodeSliceMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestNodeSlices = NodeSliceMachine.TestCase


class NoReservationsMachine(NodeSliceMachine):
    """The same without overlapping-range reservations: nothing but the slices keeps an address from
    two pods."""

    overlapping = False


NoReservationsMachine.TestCase.settings = NodeSliceMachine.TestCase.settings
TestNodeSlicesWithoutReservations = NoReservationsMachine.TestCase
