"""Adversarial review of issue 22 items 2-4 (node slices), and the fixes: interleavings that gave one
address to two pods (a check vouching for later writes, deleting a NodeSlicePool under an ADD in
flight), and answered leases a DEL cannot find. Real kube-apiserver."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices, reconcile, slicestate
from ipam.agent import Agent
from ipam.ctl import main as ctl_main
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import RealKube
from tests.test_nodeslices_isolation import WB, add_via, address, conf, direct, holder, nsp_path, through


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def _pool(kube: RealKube, name: str) -> dict[str, Any]:
    return kube.request("GET", f"/apis/{WB}/namespaces/{kube.namespace}/ippools/{name}")


def test_a_write_into_a_slice_lost_to_a_node_making_no_reservations_is_not_answered(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """A reservation guards an address only against writers that make one. One network (one
    network_name, so one NodeSlicePool, one set of slice pool and reservation names) whose NADs (or
    nodes' flat files) differ in enable_overlapping_ranges: n1's agent (reservations on) checked slice
    1 a moment ago; the NodeSlicePool is deleted while no pod uses it; n2 (reservations off) claims
    slice 1 and answers its first address. n1's agent must not write the same address into its own
    slice pool, reserve it (nobody else did) and answer it: its write is checked too (there was a
    window in which a recent check vouched for it)."""
    n1 = conf(real_kube, tmp_path, "n1", name="nad-a", network_name="blue", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", name="nad-b", network_name="blue", enable_overlapping_ranges=False)
    agent = Agent()
    try:
        assert through(agent, real_kube, "ADD", "a0", n1)[0] == 0
        assert through(agent, real_kube, "DEL", "a0", n1)[0] == 0
        real_kube.request("DELETE", nsp_path(real_kube, "blue"))  # no pod uses its addresses
        code, theirs = direct(real_kube, "ADD", "b0", n2, forget=False)
        assert code == 0, theirs
        assert holder(real_kube, address(theirs), "blue") == "n2"
        code, mine = through(agent, real_kube, "ADD", "a1", n1)
    finally:
        agent.close()
    assert code != 0 or address(mine) != address(theirs), f"{address(mine)} answered to a1 on n1 and b0 on n2"


def _leases(kube: RealKube) -> dict[str, str]:
    """Container id -> pool, over every IPPool."""
    return {
        v["id"]: p["metadata"]["name"]
        for p in kube.api.objects("ippools", kube.namespace)
        for v in (p["spec"].get("allocations") or {}).values()
    }


def _reserved(kube: RealKube) -> dict[str, str]:
    """Reservation name -> container id."""
    return {
        r["metadata"]["name"]: r["spec"]["containerid"]
        for r in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }


def test_after_a_lost_slice_the_agent_answers_from_its_own_slice_and_the_del_releases_it(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The NodeSlicePool is deleted while no pod uses it and n2 claims slice 1; n1's warm agent finds
    its slice lost after its next lease write, takes the lease back, claims a slice of its own and
    answers from it, so the DEL (which looks in the node's slices) finds and releases it."""
    n1 = conf(real_kube, tmp_path, "n1", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", enable_overlapping_ranges=True)
    agent = Agent()
    try:
        assert through(agent, real_kube, "ADD", "a0", n1)[0] == 0
        assert through(agent, real_kube, "DEL", "a0", n1)[0] == 0
        real_kube.request("DELETE", nsp_path(real_kube, "net1"))
        assert direct(real_kube, "ADD", "b0", n2, forget=False)[0] == 0
        code, mine = through(agent, real_kube, "ADD", "a1", n1)
        assert code == 0, mine
        assert holder(real_kube, address(mine)) == "n1"
        assert _leases(real_kube)["a1"].startswith("n1-")
        code, out = through(agent, real_kube, "DEL", "a1", n1)
        assert code == 0, out
    finally:
        agent.close()
    assert "a1" not in _leases(real_kube) and "a1" not in _reserved(real_kube).values()


def test_a_lease_in_a_slice_lost_while_its_pod_lived_is_released_by_the_reconciler(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """What README forbids, done anyway: the NodeSlicePool deleted while pod a1 uses slice 1 (a raw
    delete, or a foreign controller reassigning the slice). n2 claims slice 1 (a1's reservation keeps
    its address from n2), n1's next ADD finds the slice lost and moves to a slice of its own. a1's DEL
    looks only in the slices n1 holds now, so it answers success without finding the lease: the
    reconciler releases it (and its reservation) once the pod is gone, and keeps the live ones."""
    n1 = conf(real_kube, tmp_path, "n1", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", enable_overlapping_ranges=True)
    agent = Agent()
    try:
        code, first = through(agent, real_kube, "ADD", "a1", n1)
        assert code == 0, first
        real_kube.request("DELETE", nsp_path(real_kube, "net1"))  # while a1 uses its address
        code, theirs = direct(real_kube, "ADD", "b0", n2, forget=False)
        assert code == 0, theirs
        code, moved = through(agent, real_kube, "ADD", "a2", n1)
        assert code == 0, moved
        assert through(agent, real_kube, "DEL", "a1", n1)[0] == 0
    finally:
        agent.close()
    assert len({address(first), address(theirs), address(moved)}) == 3
    assert holder(real_kube, address(theirs)) == "n2" and holder(real_kube, address(moved)) == "n1"
    ns = real_kube.namespace
    for pod, doc in (("b0", theirs), ("a2", moved)):
        status = json.dumps([{"name": "net1", "interface": "eth0", "ips": [address(doc)]}])
        real_kube.api.put_pod(ns, pod, annotations={"k8s.v1.cni.cncf.io/network-status": status})
    out = io.StringIO()
    assert reconcile.main(["--kubeconfig", real_kube.kubeconfig_path, "--grace", "0"], out) == 0, (
        out.getvalue()
    )
    assert set(_leases(real_kube)) == {"b0", "a2"}, out.getvalue()
    assert sorted(_reserved(real_kube).values()) == ["a2", "b0"], out.getvalue()


@pytest.mark.parametrize("mode", ["direct", "agent"])
def test_an_unnamed_network_on_a_named_networks_nodeslicepool_does_not_hide_it_from_the_clash_check(
    real_kube: RealKube, tmp_path: Path, mode: str
) -> None:
    """Item 3's check skips NodeSlicePools marked with a network_name. NAD "blue" (no network_name)
    uses the NodeSlicePool "blue" that NAD "blue-2" (network_name "blue") created, marked "blue"; NAD
    "net2" (no network_name) on the same range is made long after (no clock margin involved) and judges
    "blue" as a named network's, so is not refused. Without reservations "blue" on n1 and "net2" on n2
    both write the first address of slice 1 into slice pools named after the node alone, and answer it."""
    off = {"enable_overlapping_ranges": False}
    named = conf(real_kube, tmp_path, "n1", name="blue-2", network_name="blue", **off)
    blue = conf(real_kube, tmp_path, "n1", name="blue", **off)
    net2 = conf(real_kube, tmp_path, "n2", name="net2", **off)
    agent = Agent()

    def add(cid: str, netconf: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return add_via(mode, agent, real_kube, cid, netconf)

    try:
        assert add("c0", named)[0] == 0  # makes NodeSlicePool "blue", marked network_name "blue"
        mine = add("a0", blue)[1]
        theirs = add("b0", net2)[1]
    finally:
        agent.close()
    answered = [d for d in (mine, theirs) if "ips" in d]
    assert len({address(d) for d in answered}) == len(answered), (
        f"one address answered twice: {mine} {theirs}"
    )
    assert mine.get("code") == 103 and "network_name" in mine["msg"], mine
    assert not _pool(real_kube, "n1-10.0.0.0-26")["spec"].get("allocations")  # its lease taken back


def _delete_nodeslicepool(kube: RealKube, name: str = "net1") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(["--kubeconfig", kube.kubeconfig_path, "delete-nodeslicepool", name], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("when", ["before-write", "after-write", "after-check"])
def test_ipamctl_delete_nodeslicepool_during_an_add_in_flight_gives_no_address_twice(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """README's remedy for a changed cut (ipamctl delete-nodeslicepool), run while n1's ADD is in
    flight, every slice pool empty when the operator looks: just before n1's lease write, just after
    it, and after n1's check found the slice n1's (its answer not yet given). Then n2 ADDs. Without
    reservations nothing but the command keeps n2 from n1's address: a lease being written is either
    seen (the command refuses, naming it) or refused by the retired pool (n1 goes on elsewhere)."""
    n1, n2 = conf(real_kube, tmp_path, "n1"), conf(real_kube, tmp_path, "n2")
    assert direct(real_kube, "ADD", "a0", n1)[0] == 0
    assert direct(real_kube, "DEL", "a0", n1)[0] == 0  # every slice pool empty: "no pod uses it"
    ran: list[Any] = []

    def interleave(point: str) -> None:
        if point != when or ran:
            return
        ran.append(when)
        ran.append(_delete_nodeslicepool(real_kube))
        ran.append(direct(real_kube, "ADD", "b0", n2, forget=False)[1])

    write = slicestate.FencedStore.write_pool

    def writing(self: slicestate.FencedStore, snapshot: Any, allocations: Any) -> Any:
        if snapshot.name.startswith("n1-"):
            interleave("before-write")
        written = write(self, snapshot, allocations)
        if snapshot.name.startswith("n1-"):
            interleave("after-write")
        return written

    held = nodeslices.Slicer._still_held

    def checked(self: nodeslices.Slicer, engine: Any, slice_range: str, deadline: float) -> bool:
        kept = held(self, engine, slice_range, deadline)
        if self.node == "n1":
            interleave("after-check")
        return kept

    monkeypatch.setattr(slicestate.FencedStore, "write_pool", writing)
    monkeypatch.setattr(nodeslices.Slicer, "_still_held", checked)
    mine = direct(real_kube, "ADD", "a1", n1)[1]
    _, (code, out, err), theirs = ran
    assert "ips" in mine and "ips" in theirs, (mine, theirs)
    assert address(mine) != address(theirs), f"{address(mine)} answered on n1 and on n2"
    assert holder(real_kube, address(mine)) == "n1" and holder(real_kube, address(theirs)) == "n2"
    if when == "before-write":  # no lease yet: returned and deleted; n1's write then found its pool gone
        assert code == 0 and out.splitlines()[-1] == "delete nodeslicepool=net1", (out, err)
    else:  # the lease is in the pool: the command refuses and names it
        assert code == 1 and "slice 10.0.0.0/26 of node n1 holds 1 lease(s): 10.0.0.1 (" in err, (out, err)


def test_ipamctl_delete_nodeslicepool_is_refused_when_a_node_claims_just_before_the_delete(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command has returned every slice and reads the NodeSlicePool free; before its DELETE is
    made, n2 claims slice 1 and answers its first address. The DELETE carries the uid and
    resourceVersion read as preconditions, so it is refused (409); the command looks again, finds n2's
    lease and refuses. Deleted anyway, n3 would claim slice 1 anew and answer n2's address."""
    n1, n2, n3 = (conf(real_kube, tmp_path, n) for n in ("n1", "n2", "n3"))
    assert direct(real_kube, "ADD", "a0", n1)[0] == 0
    assert direct(real_kube, "DEL", "a0", n1)[0] == 0
    theirs: list[dict[str, Any]] = []
    delete = KubernetesStore.delete_node_slices

    def claimed_first(self: KubernetesStore, pool: Any) -> None:
        if not theirs:
            theirs.append(direct(real_kube, "ADD", "b0", n2, forget=False)[1])
        delete(self, pool)

    monkeypatch.setattr(KubernetesStore, "delete_node_slices", claimed_first)
    code, out, err = _delete_nodeslicepool(real_kube)
    assert code == 1 and "slice 10.0.0.0/26 of node n2 holds 1 lease(s)" in err, (out, err)
    assert "ips" in theirs[0], theirs
    assert holder(real_kube, address(theirs[0])) == "n2"  # the NodeSlicePool is still there
    code, mine = direct(real_kube, "ADD", "c0", n3)
    assert code == 0, mine
    assert address(mine) != address(theirs[0])
