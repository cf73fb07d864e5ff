"""Node slices on a real kube-apiserver, issue 22: a node never answers an address from a slice that
the NodeSlicePool no longer gives it (the NodeSlicePool deleted, or the slice reassigned, under a warm
agent or between a direct call's read and its write); two networks on one range never hand out one
address; a warm agent refuses a changed cut as direct mode does."""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from ipam import nodeslices, slices, slicestate
from ipam.agent import Agent
from ipam.cni import run
from tests.kubeapi.real import RealKube

WB = "whereabouts.cni.cncf.io/v1alpha1"


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def conf(kube: RealKube, tmp: Path, node: str, name: str = "net1", **extra: Any) -> dict[str, Any]:
    ipam = {
        "type": "whereabouts-py",
        "range": "10.0.0.0/24",
        "node_slice_size": "/26",
        "node_name": node,
        "data_dir": str(tmp / node),
        "enable_overlapping_ranges": False,
        "kubernetes": {"kubeconfig": kube.kubeconfig_path},
        **extra,
    }
    return {"cniVersion": "1.0.0", "name": name, "type": "macvlan", "ipam": ipam}


def env(kube: RealKube, command: str, cid: str) -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": f"K8S_POD_NAMESPACE={kube.namespace};K8S_POD_NAME={cid}",
    }


def direct(
    kube: RealKube, command: str, cid: str, netconf: dict[str, Any], forget: bool = True
) -> tuple[int, dict[str, Any]]:
    """One CNI call in direct mode, as a fresh plugin process makes it (nothing remembered; `forget`
    False when an agent of this test process must stay warm: the call's own store starts cold anyway)."""
    if forget:
        nodeslices.forget_cache()
    out = io.StringIO()
    code = run(env(kube, command, cid), json.dumps(netconf).encode(), out)
    text = out.getvalue().strip()
    return code, (json.loads(text) if text else {})


def through(
    agent: Agent, kube: RealKube, command: str, cid: str, netconf: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    reply = agent.serve_call({"env": env(kube, command, cid), "stdin": json.dumps(netconf)})
    text = str(reply.get("stdout") or "").strip()
    return int(reply["code"]), (json.loads(text) if text else {})


def add_via(
    mode: str, agent: Agent, kube: RealKube, cid: str, netconf: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """An ADD through this test's warm agent (`mode` "agent") or in direct mode, the agent kept warm."""
    if mode == "agent":
        return through(agent, kube, "ADD", cid, netconf)
    return direct(kube, "ADD", cid, netconf, forget=False)


def address(doc: dict[str, Any]) -> str:
    return str(doc["ips"][0]["address"]).split("/")[0]


def nsp_path(kube: RealKube, name: str) -> str:
    return f"/apis/{WB}/namespaces/{kube.namespace}/nodeslicepools/{name}"


def holder(kube: RealKube, ip: str, name: str = "net1") -> str:
    doc = kube.request("GET", nsp_path(kube, name))
    for e in doc["status"]["allocations"]:
        if IPAddress(ip) in IPNetwork(e["sliceRange"]):
            return str(e["nodeName"])
    return ""


# -- item 2: a lost slice ----------------------------------------------------------------------------


def test_warm_agent_does_not_allocate_in_a_slice_given_to_another_node(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """n1's agent ADDs and DELs, the NodeSlicePool is deleted (by hand, or a foreign controller), n2
    claims the first slice in direct mode: n1's agent must not answer n2's address."""
    n1, n2 = conf(real_kube, tmp_path, "n1"), conf(real_kube, tmp_path, "n2")
    agent = Agent()
    try:
        code, doc = through(agent, real_kube, "ADD", "a0", n1)
        assert code == 0, doc
        assert through(agent, real_kube, "DEL", "a0", n1)[0] == 0
        real_kube.request("DELETE", nsp_path(real_kube, "net1"))
        code, theirs = direct(real_kube, "ADD", "b0", n2, forget=False)
        assert code == 0, theirs
        assert holder(real_kube, address(theirs)) == "n2"
        code, mine = through(agent, real_kube, "ADD", "a1", n1)
        assert code == 0, mine
    finally:
        agent.close()
    assert address(mine) != address(theirs)
    assert holder(real_kube, address(mine)) == "n1"


def test_with_reservations_a_lost_slice_is_left_at_the_next_write(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """With overlapping-range reservations on, every lease write is still checked (the reservation
    guards only against writers that make one): n1's warm agent, whose slice was lost a moment after
    its last check, moves to a slice of its own at its next ADD."""
    n1 = conf(real_kube, tmp_path, "n1", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", enable_overlapping_ranges=True)
    agent = Agent()
    try:
        assert through(agent, real_kube, "ADD", "a0", n1)[0] == 0
        assert through(agent, real_kube, "DEL", "a0", n1)[0] == 0
        real_kube.request("DELETE", nsp_path(real_kube, "net1"))
        code, theirs = direct(real_kube, "ADD", "b0", n2, forget=False)
        assert code == 0, theirs
        code, mine = through(agent, real_kube, "ADD", "a1", n1)
        assert code == 0, mine
    finally:
        agent.close()
    assert holder(real_kube, address(theirs)) == "n2"
    assert holder(real_kube, address(mine)) == "n1"
    assert address(mine) != address(theirs)


def test_direct_call_losing_its_slice_between_read_and_write_moves_on(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window of a check-then-write: n1 has read that it holds the slice; before its lease is
    written the NodeSlicePool is deleted and n2 claims the slice and takes the same first address. n1
    must not answer it (its write is checked after it is made, and rolled back)."""
    n1, n2 = conf(real_kube, tmp_path, "n1"), conf(real_kube, tmp_path, "n2")
    assert direct(real_kube, "ADD", "a0", n1)[0] == 0
    assert direct(real_kube, "DEL", "a0", n1)[0] == 0
    theirs: list[dict[str, Any]] = []
    write = slicestate.FencedStore.write_pool

    def interloper(self: slicestate.FencedStore, snapshot: Any, allocations: Any) -> Any:
        if snapshot.name.startswith("n1-") and not theirs:
            real_kube.request("DELETE", nsp_path(real_kube, "net1"))
            code, doc = direct(real_kube, "ADD", "b0", n2)
            assert code == 0, doc
            theirs.append(doc)
        return write(self, snapshot, allocations)

    monkeypatch.setattr(slicestate.FencedStore, "write_pool", interloper)
    out = io.StringIO()
    code = run(env(real_kube, "ADD", "a1"), json.dumps(n1).encode(), out)
    mine = json.loads(out.getvalue())
    assert code == 0, mine
    assert theirs and address(mine) != address(theirs[0])
    assert holder(real_kube, address(mine)) == "n1"
    leases = real_kube.request("GET", f"/apis/{WB}/namespaces/{real_kube.namespace}/ippools/n1-10.0.0.0-26")
    assert leases["spec"]["allocations"] == {}  # the lease written into the lost slice was rolled back


def test_the_check_after_a_write_reads_the_metadata_alone(real_kube: RealKube, tmp_path: Path) -> None:
    """The real API server answers the check's GET with the NodeSlicePool's metadata, not its entries."""
    from ipam.store.kubernetes import METADATA_ONLY, KubernetesStore

    assert direct(real_kube, "ADD", "a0", conf(real_kube, tmp_path, "n1"))[0] == 0
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    try:
        raw = store.client.request("GET", store._path("nodeslicepools", "net1"), accept=METADATA_ONLY)
        seen = store.node_slices_version("net1")
        full = store.read_node_slices("net1")
        assert store.node_slices_version("absent") is None
    finally:
        store.close()
    assert raw["kind"] == "PartialObjectMetadata" and "status" not in raw
    assert full is not None and seen == (full.uid, full.version) and full.uid


# -- item 4: a changed cut, warm or not --------------------------------------------------------------


@pytest.mark.parametrize("changed", [{"node_slice_size": "/28"}, {"range": "10.0.0.0/25"}])
def test_a_changed_cut_is_refused_alike_by_a_warm_agent_and_in_direct_mode(
    real_kube: RealKube, tmp_path: Path, changed: dict[str, str]
) -> None:
    """A NAD with the same network_name as another but another node_slice_size or range meets the
    NodeSlicePool cut the other way: code 103 naming both cuts, whether the agent is warm or not."""
    first = conf(real_kube, tmp_path, "n1", network_name="blue")
    other = conf(real_kube, tmp_path, "n1", name="net2", network_name="blue", **changed)
    agent = Agent()
    try:
        assert through(agent, real_kube, "ADD", "a0", first)[0] == 0
        warm = through(agent, real_kube, "ADD", "a1", other)[1]
        cold = direct(real_kube, "ADD", "a2", other, forget=False)[1]
        assert through(agent, real_kube, "ADD", "a3", first)[0] == 0  # the first network still works
    finally:
        agent.close()
    assert (warm.get("code"), cold.get("code")) == (103, 103), (warm, cold)
    assert warm["msg"] == cold["msg"]
    assert "NodeSlicePool blue cuts range 10.0.0.0/24 into /26 slices" in warm["msg"]
    assert "run `ipamctl delete-nodeslicepool blue`" in warm["details"]  # the safe way to change the cut


# -- item 3: two networks without network_name on one range ------------------------------------------


@pytest.mark.parametrize("overlapping", [False, True])
@pytest.mark.parametrize("mode", ["direct", "agent"])
def test_a_second_network_without_network_name_on_a_sliced_range_is_refused(
    real_kube: RealKube, tmp_path: Path, overlapping: bool, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two NADs (net1, net2) on one range with node slices and no network_name: each has its own
    NodeSlicePool, but their slice pools and reservations share names, so n1 (net1) and n2 (net2) would
    both be given the first slice and its first address. The second network is refused (code 103,
    saying to set network_name); the first, whose NodeSlicePool is older, keeps working (the margin
    for API servers' clocks set to 0 and the second network made a second later: creationTimestamp
    counts whole seconds)."""
    monkeypatch.setattr(slices, "CLASH_MARGIN_SECONDS", 0.0)
    net1 = conf(real_kube, tmp_path, "n1", enable_overlapping_ranges=overlapping)
    net2 = conf(real_kube, tmp_path, "n2", name="net2", enable_overlapping_ranges=overlapping)
    agent = Agent()

    def add(cid: str, netconf: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return add_via(mode, agent, real_kube, cid, netconf)

    try:
        code, first = add("a0", net1)
        assert code == 0, first
        time.sleep(1.1)
        second = add("b0", net2)[1]
        again = add("b1", net2)[1]
        code, later = add("a1", net1)
        assert code == 0, later
    finally:
        agent.close()
    assert second.get("code") == 103 and again.get("code") == 103, (second, again)
    assert "network_name" in second["msg"] and "net1" in second["msg"] and "net2" in second["msg"]
    assert "NodeSlicePool net1 was made more than 0 s earlier and keeps the range" in second["details"], (
        second
    )
    assert address(later) != address(first)
    # the refused network's lease was taken back: no pool of net2's node holds one
    pools = real_kube.api.objects("ippools", real_kube.namespace)
    assert [p["metadata"]["name"] for p in pools if p["spec"].get("allocations")] == ["n1-10.0.0.0-26"]


def test_which_networks_without_network_name_clash() -> None:
    """`slices.clashes`: overlapping ranges of NodeSlicePools not marked with a network_name of their
    own, unless clearly younger (by more than the margin); unknown ages clash."""
    t = datetime(2026, 1, 1, tzinfo=UTC)

    def nsp(name: str, rng: str, age: float | None, network_name: str | None = None) -> slices.NodeSlices:
        made = None if age is None else t - timedelta(seconds=age)
        return slices.NodeSlices(name, rng, "/26", (), "1", created=made, network_name=network_name)

    mine = nsp("net1", "10.0.0.0/24", 100)
    others = [
        nsp("older", "10.0.0.0/16", 200),
        nsp("close", "10.0.0.128/25", 90),
        nsp("unknown", "10.0.0.0/24", None),
        nsp("younger", "10.0.0.0/24", 10),
        nsp("named", "10.0.0.0/24", 200, network_name="blue"),
        nsp("unnamed-mark", "10.0.0.0/24", 200, network_name=""),
        nsp("elsewhere", "10.0.1.0/24", 200),
        nsp("net1", "10.0.0.0/24", 100),
    ]
    assert slices.clashes(mine, others, margin=30) == ["close", "older", "unknown", "unnamed-mark"]
    assert slices.clashes(mine, others, margin=0) == ["older", "unknown", "unnamed-mark"]
    by_name = {o.name: o for o in others}
    assert "older was made more than 30 s earlier and keeps" in slices.clash_outcome(
        mine, [by_name["older"]], 30
    )
    for which in (["older", "close"], ["unknown"]):
        said = slices.clash_outcome(mine, [by_name[n] for n in which], 30)
        assert "within 30 s of each other (or of unknown age) are all refused" in said, said


def test_two_networks_without_network_name_starting_together_never_share_an_address(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """net2 claims its slice while net1's first lease is being written (after net1's NodeSlicePool
    was made): each judges the range after its own NodeSlicePool exists, so each sees the other;
    made within the clocks' margin, both are refused and no address is given twice."""
    net1 = conf(real_kube, tmp_path, "n1")
    net2 = conf(real_kube, tmp_path, "n2", name="net2")
    theirs: list[dict[str, Any]] = []
    write = slicestate.FencedStore.write_pool

    def interloper(self: slicestate.FencedStore, snapshot: Any, allocations: Any) -> Any:
        if snapshot.name.startswith("n1-") and not theirs:
            theirs.append(direct(real_kube, "ADD", "b0", net2, forget=False)[1])
        return write(self, snapshot, allocations)

    monkeypatch.setattr(slicestate.FencedStore, "write_pool", interloper)
    mine = direct(real_kube, "ADD", "a0", net1)[1]
    assert (mine.get("code"), theirs[0].get("code")) == (103, 103), (mine, theirs)
    for refused in (mine, theirs[0]):  # the hint says what happened: neither keeps the range
        assert (
            "within 30 s of each other" in refused["details"] and "older keeps" not in refused["details"]
        ), refused
    pools = real_kube.api.objects("ippools", real_kube.namespace)
    assert [p["metadata"]["name"] for p in pools if p["spec"].get("allocations")] == []
