"""Node slices on the file datastore and in pure form: slice math and Whereabouts' names, claiming,
filling, exhaustion, DEL/CHECK/GC/STATUS per slice pool, bad sizes, and reclaim with its fence."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPNetwork

from ipam import errors, nodeslices
from ipam.cni import run
from ipam.config import load_config
from ipam.errors import ConflictError
from ipam.ranges import RangeConfigError, build_range
from ipam.slices import (
    NodeSlices,
    SliceEntry,
    SlicePoolState,
    claim,
    cut,
    network_prefixes,
    reclaimable,
    slice_pool_name,
    slice_prefix,
    slice_spec,
)
from ipam.store.file import FileStore
from ipam.store.slicestore import SlicePoolView


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def call(
    data_dir: Path,
    command: str,
    cid: str,
    node: str,
    size: str | None = "/30",
    rng: str = "10.0.0.0/28",
    extra: dict[str, Any] | None = None,
    version: str = "1.1.0",
    name: str = "net1",
) -> tuple[int, dict[str, Any]]:
    ipam: dict[str, Any] = {
        "type": "whereabouts-py",
        "datastore": "file",
        "data_dir": str(data_dir),
        "range": rng,
        "node_name": node,
        **(extra or {}),
    }
    if size is not None:
        ipam["node_slice_size"] = size
    conf: dict[str, Any] = {"cniVersion": version, "name": name, "type": "x", "ipam": ipam}
    if command == "GC":
        conf["cni.dev/valid-attachments"] = (extra or {}).get("valid", [])
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={cid}",
    }
    out = io.StringIO()
    code = run(env, json.dumps(conf).encode(), out)
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def address(doc: dict[str, Any]) -> str:
    return str(doc["ips"][0]["address"])


def slices_doc(data_dir: Path, name: str = "net1") -> list[dict[str, str]]:
    doc = json.loads((data_dir / "nodeslicepools" / f"{name}.json").read_text())
    return list(doc["status"]["allocations"])


def pool_leases(data_dir: Path, pool: str) -> dict[str, Any]:
    return dict(json.loads((data_dir / "pools" / f"{pool}.json").read_text())["spec"]["allocations"])


# -- pure ------------------------------------------------------------------------------------------


def test_slice_size_forms_and_errors() -> None:
    net = IPNetwork("10.0.0.0/16")
    assert slice_prefix("/26", net) == 26 == slice_prefix("26", net)
    for bad, words in (
        ("/16", "longer than the prefix"),
        ("/8", "longer than the prefix"),
        ("/33", "not an IPv4 prefix length"),
        ("x", "not a prefix length"),
        ("/", "not a prefix length"),
        ("/31", "slices (at most"),
    ):
        with pytest.raises(RangeConfigError) as info:
            slice_prefix(bad, net)
        assert info.value.key == "ipam.node_slice_size" and words in info.value.reason
    assert slice_prefix("/120", IPNetwork("fd00::/112")) == 120
    with pytest.raises(RangeConfigError):
        slice_prefix("/129", IPNetwork("fd00::/112"))


def test_cut_and_names_match_whereabouts() -> None:
    assert cut(IPNetwork("10.0.0.0/24"), 26) == [
        "10.0.0.0/26",
        "10.0.0.64/26",
        "10.0.0.128/26",
        "10.0.0.192/26",
    ]
    # host bits in the range name its network
    assert cut(IPNetwork("10.0.0.7/30"), 31) == ["10.0.0.4/31", "10.0.0.6/31"]
    assert cut(IPNetwork("fd00::/119"), 120) == ["fd00::/120", "fd00::100/120"]
    # IPPoolName with a node: <node>-<normalized>, <network_name>-<node>-<normalized>
    assert slice_pool_name("worker-1", "10.0.0.64/26") == "worker-1-10.0.0.64-26"
    assert slice_pool_name("worker-1", "10.0.0.64/26", "blue") == "blue-worker-1-10.0.0.64-26"
    assert slice_pool_name("w", "fd00::100/120") == "w-fd00--100-120"


def test_slice_spec_keeps_the_range_rules_inside_the_slice() -> None:
    spec = build_range("ipam", "10.0.0.0/24", "10.0.0.70", None, ["10.0.0.100/31"], None)
    sub = slice_spec(spec, "10.0.0.64/26")
    assert str(sub.network) == "10.0.0.64/26"
    first = int(IPNetwork("10.0.0.0/24").first)
    assert sub.intervals == ((first + 70, first + 99), (first + 102, first + 126))
    assert slice_spec(spec, "10.0.0.0/26").size() == 0  # all before range_start


def test_claim_takes_the_first_free_slice_not_skipped() -> None:
    pool = NodeSlices(
        "n",
        "10.0.0.0/28",
        "/30",
        tuple(
            SliceEntry(n, s)
            for n, s in (
                ("a", "10.0.0.0/30"),
                ("", "10.0.0.4/30"),
                ("", "10.0.0.8/30"),
                ("b", "10.0.0.12/30"),
            )
        ),
        "1",
    )
    assert claim(pool, "c") == (pool.entries[0], SliceEntry("c", "10.0.0.4/30"), *pool.entries[2:])
    got = claim(pool, "c", skip={"10.0.0.4/30"})
    assert got is not None and got[2] == SliceEntry("c", "10.0.0.8/30")
    assert claim(pool, "c", skip={"10.0.0.4/30", "10.0.0.8/30"}) is None


def test_reclaim_judgement() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    old, new = now - timedelta(seconds=600), now - timedelta(seconds=10)
    entries = (
        SliceEntry("gone", "10.0.0.0/30"),  # empty, node gone -> returned
        SliceEntry("gone", "10.0.0.4/30"),  # a lease -> kept
        SliceEntry("live", "10.0.0.8/30"),  # empty, but the first: kept
        SliceEntry("live", "10.0.0.12/30"),  # empty spare, old -> returned
        SliceEntry("live", "10.0.0.16/30"),  # empty spare, changed recently -> kept
        SliceEntry("", "10.0.0.20/30"),
    )
    pool = NodeSlices("n", "10.0.0.0/27", "/30", entries, "1")
    states = {
        slice_pool_name("gone", "10.0.0.4/30"): SlicePoolState(1, old, True),
        slice_pool_name("live", "10.0.0.12/30"): SlicePoolState(0, old, True),
        slice_pool_name("live", "10.0.0.16/30"): SlicePoolState(0, new, True),
    }
    got = {(r.node, r.slice_range, r.reason) for r in reclaimable(pool, {"live"}, states, now, 300)}
    assert got == {("gone", "10.0.0.0/30", "node-gone"), ("live", "10.0.0.12/30", "spare")}
    # a live node whose first slice is empty but its second holds a lease keeps the second, returns the first
    states[slice_pool_name("live", "10.0.0.12/30")] = SlicePoolState(3, old, True)
    got = {(r.node, r.slice_range) for r in reclaimable(pool, {"live", "gone"}, states, now, 300)}
    assert got == {("live", "10.0.0.8/30"), ("gone", "10.0.0.0/30")}  # both now live: spares


# -- through cni.run on the file datastore ---------------------------------------------------------


def test_nodes_fill_their_slices_then_claim_more_and_run_out(tmp_path: Path) -> None:
    got = [address(call(tmp_path, "ADD", f"a{i}", "node-a")[1]) for i in range(3)]
    assert got == ["10.0.0.1/28", "10.0.0.2/28", "10.0.0.5/28"]  # /30 slices: .1 .2 | .5 .6 | ...
    assert address(call(tmp_path, "ADD", "b0", "node-b")[1]) == "10.0.0.9/28"
    assert slices_doc(tmp_path) == [
        {"nodeName": "node-a", "sliceRange": "10.0.0.0/30"},
        {"nodeName": "node-a", "sliceRange": "10.0.0.4/30"},
        {"nodeName": "node-b", "sliceRange": "10.0.0.8/30"},
        {"nodeName": "", "sliceRange": "10.0.0.12/30"},
    ]
    assert set(pool_leases(tmp_path, "node-a-10.0.0.0-30")) == {"1", "2"}  # offsets from the slice
    assert set(pool_leases(tmp_path, "node-a-10.0.0.4-30")) == {"1"}
    for cid in ("b1", "b2", "b3"):
        call(tmp_path, "ADD", cid, "node-b")
    code, doc = call(tmp_path, "ADD", "a9", "node-a")
    assert code == 0 and address(doc) == "10.0.0.6/28"
    code, doc = call(tmp_path, "ADD", "a10", "node-a")
    assert code == 1 and doc["code"] == errors.POOL_EXHAUSTED
    for words in ("range 10.0.0.0/28", "node_slice_size /30", "4 slices", "node-a"):
        assert words in doc["msg"]
    # DEL frees in whichever slice held it; the next ADD reuses it
    assert call(tmp_path, "DEL", "a0", "node-a")[0] == 0
    assert address(call(tmp_path, "ADD", "a10", "node-a")[1]) == "10.0.0.1/28"
    # repeated ADD with the lease in the node's second slice returns it
    assert address(call(tmp_path, "ADD", "a9", "node-a")[1]) == "10.0.0.6/28"


def test_del_check_gc_status_per_slice_pool(tmp_path: Path) -> None:
    for i in range(3):
        call(tmp_path, "ADD", f"a{i}", "node-a")
    prev = {"prevResult": {"ips": [{"address": "10.0.0.5/28"}]}}
    assert call(tmp_path, "CHECK", "a2", "node-a")[0] == 0
    code, doc = call(tmp_path, "CHECK", "zz", "node-a")
    assert code == 1 and doc["code"] == errors.LEASE_NOT_FOUND
    assert prev  # CHECK against prevResult is covered by the generic CHECK tests
    # GC on node-a with only a1 valid releases a0 and a2 (in two slices)
    code, _ = call(tmp_path, "GC", "x", "node-a", extra={"valid": [{"containerID": "a1", "ifname": "eth0"}]})
    assert code == 0
    assert pool_leases(tmp_path, "node-a-10.0.0.0-30") == {
        "2": pool_leases(tmp_path, "node-a-10.0.0.0-30")["2"]
    }
    assert pool_leases(tmp_path, "node-a-10.0.0.4-30") == {}
    assert call(tmp_path, "STATUS", "x", "node-a")[0] == 0
    assert call(tmp_path, "DEL", "a1", "node-a")[0] == 0
    assert call(tmp_path, "DEL", "a1", "node-a")[0] == 0  # unknown: fine
    assert pool_leases(tmp_path, "node-a-10.0.0.0-30") == {}


def test_status_reports_a_node_with_no_room_left(tmp_path: Path) -> None:
    for i in range(7):
        call(tmp_path, "ADD", f"a{i}", "node-a")
    assert call(tmp_path, "STATUS", "x", "node-a")[0] == 0
    call(tmp_path, "ADD", "a7", "node-a")  # every slice is node-a's and full
    code, doc = call(tmp_path, "STATUS", "x", "node-a")
    assert code == 1 and doc["code"] == errors.PLUGIN_NOT_AVAILABLE


def test_network_name_names_the_slice_pools_and_the_node_slice_pool(tmp_path: Path) -> None:
    code, doc = call(tmp_path, "ADD", "a0", "node-a", extra={"network_name": "blue"})
    assert code == 0 and address(doc) == "10.0.0.1/28"
    assert slices_doc(tmp_path, "blue")[0] == {"nodeName": "node-a", "sliceRange": "10.0.0.0/30"}
    assert set(pool_leases(tmp_path, "blue-node-a-10.0.0.0-30")) == {"1"}
    assert (tmp_path / "reservations" / "blue-10.0.0.1.json").exists()


def test_ipv6_slices(tmp_path: Path) -> None:
    got = [
        address(call(tmp_path, "ADD", f"a{i}", "node-a", size="126", rng="fd00::/124")[1]) for i in range(3)
    ]
    assert got == ["fd00::1/124", "fd00::2/124", "fd00::5/124"]
    assert set(pool_leases(tmp_path, "node-a-fd00---124".replace("124", "126"))) == {"1", "2"}


@pytest.mark.parametrize(
    ("size", "rng", "words"),
    [
        ("/28", "10.0.0.0/28", "must be longer than the prefix"),
        ("/24", "10.0.0.0/28", "must be longer than the prefix"),
        ("/64", "10.0.0.0/28", "not an IPv4 prefix length"),
        ("/130", "fd00::/120", "not an IPv6 prefix length"),
        ("abc", "10.0.0.0/28", "not a prefix length"),
    ],
)
def test_bad_slice_size_is_code_7_naming_the_key(tmp_path: Path, size: str, rng: str, words: str) -> None:
    for command in ("ADD", "DEL"):
        code, doc = call(tmp_path, command, "a0", "node-a", size=size, rng=rng)
        assert code == 1 and doc["code"] == errors.INVALID_CONFIG
        assert "ipam.node_slice_size" in doc["msg"] and words in doc["msg"]
    assert not (tmp_path / "pools").exists()


def test_slices_of_a_network_without_any_name_is_code_7_naming_the_key(tmp_path: Path) -> None:
    """The NodeSlicePool is named after network_name, else the network's name: with neither, the
    config is refused before any datastore is opened."""
    code, doc = call(tmp_path, "ADD", "a0", "node-a", name="")
    assert code == 1 and doc["code"] == errors.INVALID_CONFIG
    assert "ipam.node_slice_size" in doc["msg"] and "network_name" in doc["msg"]
    assert not (tmp_path / "nodeslicepools").exists()


def test_without_node_slice_size_nothing_changes(tmp_path: Path) -> None:
    assert address(call(tmp_path, "ADD", "a0", "node-a", size=None)[1]) == "10.0.0.1/28"
    assert address(call(tmp_path, "ADD", "a1", "node-a", size="")[1]) == "10.0.0.2/28"
    assert sorted(p.name for p in (tmp_path / "pools").iterdir()) == ["10.0.0.0-28.json"]
    assert not (tmp_path / "nodeslicepools").exists()


def test_existing_node_slice_pool_for_another_slicing_is_refused(tmp_path: Path) -> None:
    call(tmp_path, "ADD", "a0", "node-a", size="/30")
    code, doc = call(tmp_path, "ADD", "a1", "node-a", size="/29")
    assert code == 1 and doc["code"] == errors.DATASTORE_ERROR and "NodeSlicePool net1" in doc["msg"]


# -- claiming races (deterministic: a second node claims between our read and our write) --------------


class RacingStore(FileStore):
    """Before this store's first NodeSlicePool write, `interleave` runs (another node claims)."""

    def __init__(self, data_dir: str, interleave: Any) -> None:
        super().__init__(data_dir)
        self.interleave = interleave
        self.writes = 0

    def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        self.writes += 1
        if self.interleave is not None:
            hook, self.interleave = self.interleave, None
            hook()
        super().write_node_slices(pool, entries)


def engine_for(data_dir: Path, node: str, store: FileStore) -> Any:
    from ipam.cni import make_engine

    ipam = {
        "type": "whereabouts-py",
        "datastore": "file",
        "data_dir": str(data_dir),
        "range": "10.0.0.0/28",
        "node_slice_size": "/30",
        "node_name": node,
    }
    cfg = load_config(json.dumps({"cniVersion": "1.1.0", "name": "net1", "ipam": ipam}).encode())
    return make_engine(cfg, store), cfg


def request(cid: str, node: str) -> Any:
    from ipam.allocator import Request

    return Request(container_id=cid, ifname="eth0", podref=f"ns/{cid}", node=node)


def test_two_nodes_racing_for_a_slice_get_different_ones(tmp_path: Path) -> None:
    def other_node_claims() -> None:
        assert call(tmp_path, "ADD", "b0", "node-b")[0] == 0

    store = RacingStore(str(tmp_path), other_node_claims)
    engine, cfg = engine_for(tmp_path, "node-a", store)
    got = engine.add(cfg.ranges, request("a0", "node-a"))
    assert (
        str(got[0].address) == "10.0.0.5" and store.writes == 2
    )  # 409 on the first write, then the next slice
    assert slices_doc(tmp_path)[:2] == [
        {"nodeName": "node-b", "sliceRange": "10.0.0.0/30"},
        {"nodeName": "node-a", "sliceRange": "10.0.0.4/30"},
    ]


def test_a_node_that_lost_a_claim_race_waits_about_one_claim_before_trying_again(tmp_path: Path) -> None:
    """Nodes racing for the first free slice: the loser's next read and write come after about as long
    as its refused attempt took (the winners' writes of the whole NodeSlicePool are then done), not
    straight back into the same race."""
    now = [0.0]
    slept: list[float] = []

    def other_node_claims() -> None:
        assert call(tmp_path, "ADD", "b0", "node-b")[0] == 0
        now[0] += 0.2  # the refused attempt took 200 ms

    store = RacingStore(str(tmp_path), other_node_claims)
    engine, cfg = engine_for(tmp_path, "node-a", store)
    engine.clock = lambda: now[0]
    engine.sleep = lambda seconds: (slept.append(seconds), now.__setitem__(0, now[0] + seconds))
    got = engine.add(cfg.ranges, request("a0", "node-a"))
    assert str(got[0].address) == "10.0.0.5" and store.writes == 2
    assert len(slept) == 1 and 0.1 <= slept[0] <= 0.2


def test_a_claim_write_that_hung_then_failed_does_not_space_the_next_refused_claim(tmp_path: Path) -> None:
    """The time a claim attempt's write took spaces the retry after a refused claim. A write that hung
    until its timeout and failed (15 s) is measured too, but the retry after it is a transient one, and
    the next refused write is spaced by its own time (200 ms), never by the hung one's: a slow moment of
    the API server does not hold the node's claim lock (every ADD of the node waits on it) for seconds."""
    from ipam.errors import TransientStoreError

    now = [0.0]
    slept: list[float] = []

    class HungThenRaced(FileStore):
        writes = 0

        def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
            self.writes += 1
            if self.writes == 1:
                now[0] += 15.0
                raise TransientStoreError("write NodeSlicePool net1: TimeoutError: timed out")
            if self.writes == 2:
                assert call(tmp_path, "ADD", "b0", "node-b")[0] == 0  # node-b claims the first slice
                now[0] += 0.2
            super().write_node_slices(pool, entries)

    store = HungThenRaced(str(tmp_path))
    engine, cfg = engine_for(tmp_path, "node-a", store)
    engine.clock = lambda: now[0]
    engine.sleep = lambda seconds: (slept.append(seconds), now.__setitem__(0, now[0] + seconds))
    got = engine.add(cfg.ranges, request("a0", "node-a"))
    assert str(got[0].address) == "10.0.0.5" and store.writes == 3
    # the second retry's window: the refused write's 200 ms, doubled once for the attempt before it
    assert len(slept) == 2 and slept[0] <= engine.policy.backoff_initial and 0.2 <= slept[1] <= 0.4


def test_threads_of_one_node_claim_one_slice(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    engine, cfg = engine_for(tmp_path, "node-a", store)
    results: list[str] = []
    threads = [
        threading.Thread(
            target=lambda i=i: results.append(
                str(engine.add(cfg.ranges, request(f"a{i}", "node-a"))[0].address)
            )
        )
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == ["10.0.0.1", "10.0.0.2"]
    assert [e["nodeName"] for e in slices_doc(tmp_path)] == ["node-a", "", "", ""]


# -- reclaim ---------------------------------------------------------------------------------------


def test_reclaim_returns_a_gone_nodes_empty_slice_and_spares(tmp_path: Path) -> None:
    for i in range(3):
        call(tmp_path, "ADD", f"a{i}", "node-a")  # two slices
    call(tmp_path, "ADD", "b0", "node-b")
    call(tmp_path, "DEL", "b0", "node-b")
    call(tmp_path, "DEL", "a2", "node-a")  # node-a's second slice is empty now
    store = FileStore(str(tmp_path))
    later = datetime.now(UTC) + timedelta(seconds=120)
    dry = nodeslices.reclaim_slices(store, {"node-a"}, 60, dry_run=True, now=later)
    assert sorted(dry) == [
        "would-return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare",
        "would-return nodeslicepool=net1 slice=10.0.0.8/30 node=node-b reason=node-gone",
    ]
    assert nodeslices.reclaim_slices(store, {"node-a"}, 600, dry_run=True, now=later) == []  # inside grace
    done = nodeslices.reclaim_slices(store, {"node-a"}, 60, dry_run=False, now=later)
    assert sorted(done) == sorted(line.replace("would-return", "return") for line in dry)
    assert [e["nodeName"] for e in slices_doc(tmp_path)] == ["node-a", "", "", ""]
    assert sorted(p.name for p in (tmp_path / "pools").iterdir()) == ["node-a-10.0.0.0-30.json"]
    # node-a's agent cache still lists 10.0.0.4/30: its ADD must not land there
    assert address(call(tmp_path, "ADD", "a3", "node-a")[1]) == "10.0.0.5/28"  # claimed again, properly
    assert slices_doc(tmp_path)[1] == {"nodeName": "node-a", "sliceRange": "10.0.0.4/30"}


def test_reclaim_keeps_a_slice_whose_pool_got_a_lease_meanwhile(tmp_path: Path) -> None:
    call(tmp_path, "ADD", "a0", "node-a")
    call(tmp_path, "ADD", "a1", "node-a")
    call(tmp_path, "ADD", "a2", "node-a")
    call(tmp_path, "DEL", "a2", "node-a")

    class LateLease(FileStore):
        def retire_pool(self, view: SlicePoolView) -> None:
            # the node's ADD lands after reclaim judged the pool empty, before the fence
            assert address(call(tmp_path, "ADD", "a5", "node-a")[1]) == "10.0.0.5/28"
            super().retire_pool(view)

    later = datetime.now(UTC) + timedelta(seconds=120)
    lines = nodeslices.reclaim_slices(LateLease(str(tmp_path)), {"node-a"}, 60, dry_run=False, now=later)
    assert lines == [
        "kept nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare (its pool changed: a lease may have landed)"
    ]
    assert slices_doc(tmp_path)[1] == {"nodeName": "node-a", "sliceRange": "10.0.0.4/30"}
    assert pool_leases(tmp_path, "node-a-10.0.0.4-30") != {}


def test_an_add_after_the_fence_moves_on(tmp_path: Path) -> None:
    for i in range(3):
        call(tmp_path, "ADD", f"a{i}", "node-a")
    call(tmp_path, "DEL", "a2", "node-a")
    call(tmp_path, "DEL", "a0", "node-a")
    call(tmp_path, "DEL", "a1", "node-a")  # both slices empty; the second is spare
    seen: list[str] = []

    def add_between_fence_and_free(node: str, slice_range: str) -> None:
        # slice 1 is full? no: it is empty, so the ADD goes to slice 1 and never touches the fenced one
        for cid in ("x0", "x1", "x2"):
            seen.append(address(call(tmp_path, "ADD", cid, "node-a")[1]))

    later = datetime.now(UTC) + timedelta(seconds=120)
    store = FileStore(str(tmp_path))
    lines = nodeslices.reclaim_slices(
        store, {"node-a"}, 60, False, later, before_free=add_between_fence_and_free
    )
    assert lines == ["return nodeslicepool=net1 slice=10.0.0.4/30 node=node-a reason=spare"]
    # x2 met the fenced slice pool (node-a still held the slice) and claimed the next free one
    assert seen == ["10.0.0.1/28", "10.0.0.2/28", "10.0.0.9/28"]
    assert [e["nodeName"] for e in slices_doc(tmp_path)] == ["node-a", "", "node-a", ""]


def test_conflicting_nodeslicepool_write_is_a_conflict(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path))
    pool = NodeSlices("p", "10.0.0.0/28", "/30", (SliceEntry("", "10.0.0.0/30"),), None)
    store.write_node_slices(pool, pool.entries)
    with pytest.raises(ConflictError):
        store.write_node_slices(pool, pool.entries)  # created meanwhile: AlreadyExists
    current = store.read_node_slices("p")
    assert current is not None and current.version == "1"
    store.write_node_slices(current, (SliceEntry("a", "10.0.0.0/30"),))
    with pytest.raises(ConflictError):
        store.write_node_slices(current, (SliceEntry("b", "10.0.0.0/30"),))


def test_reservation_prefix_of_slice_pools_comes_from_the_node_slice_pool() -> None:
    blue = NodeSlices(
        "blue",
        "10.0.0.0/24",
        "/26",
        (SliceEntry("node-a", "10.0.0.0/26"), SliceEntry("", "10.0.0.64/26")),
        "1",
    )
    net1 = NodeSlices("net1", "10.1.0.0/24", "/26", (SliceEntry("net1-x", "10.1.0.0/26"),), "1")
    names = [
        "blue-node-a-10.0.0.0-26",
        "blue-old-node-10.0.0.64-26",
        "net1-x-10.1.0.0-26",
        "10.2.0.0-24",
        "blue-10.0.0.0-24",
    ]
    assert network_prefixes([blue, net1], names) == {
        "blue-node-a-10.0.0.0-26": "blue",
        "blue-old-node-10.0.0.64-26": "blue",  # its node holds no slice now: by the name
        "net1-x-10.1.0.0-26": "",  # NodeSlicePool named after the network (no network_name): no prefix
    }


def test_a_failing_second_range_rolls_back_the_slice_lease(tmp_path: Path) -> None:
    extra = {"ipRanges": [{"range": "10.9.0.0/30"}]}  # two addresses: the third ADD fails there
    for cid in ("a0", "a1"):
        code, doc = call(tmp_path, "ADD", cid, "node-a", extra=extra)
        assert code == 0 and len(doc["ips"]) == 2
    code, doc = call(tmp_path, "ADD", "a2", "node-a", extra=extra)
    assert code == 1 and doc["code"] == errors.POOL_EXHAUSTED and "10.9.0.0/30" in doc["msg"]
    leases = {
        **pool_leases(tmp_path, "node-a-10.0.0.0-30"),
        **{"4+" + k: v for k, v in pool_leases(tmp_path, "node-a-10.0.0.4-30").items()},
    }
    assert sorted(v["id"] for v in leases.values()) == ["a0", "a1"]  # a2's slice lease was given back
    assert sorted(p.name for p in (tmp_path / "reservations").iterdir()) == [
        "10.0.0.1.json",
        "10.0.0.2.json",
        "10.9.0.1.json",
        "10.9.0.2.json",
    ]


def test_repeated_add_with_its_lease_in_a_later_slice_never_takes_a_second_address(tmp_path: Path) -> None:
    """The node's first slice has room again while the attachment's lease sits in its second slice:
    the repeated ADD must return that lease, not take a second address in the first slice."""
    for i in range(3):  # .1 .2 fill the first /30 slice, a2 lands in the second (.5)
        call(tmp_path, "ADD", f"a{i}", "node-a")
    assert call(tmp_path, "DEL", "a0", "node-a")[0] == 0  # room again in the first slice
    code, doc = call(tmp_path, "ADD", "a2", "node-a")
    assert code == 0 and address(doc) == "10.0.0.5/28"
    assert set(pool_leases(tmp_path, "node-a-10.0.0.0-30")) == {"2"}  # a1 only; .1 stays free
    assert set(pool_leases(tmp_path, "node-a-10.0.0.4-30")) == {"1"}
