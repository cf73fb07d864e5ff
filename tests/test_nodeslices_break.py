"""Adversarial review of issue 22 items 2-4 (node slices): interleavings that still give one address to
two pods, or leave an answered lease where its DEL cannot find it. Real kube-apiserver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.agent import Agent
from tests.kubeapi.real import RealKube
from tests.test_nodeslices_isolation import WB, address, conf, direct, holder, nsp_path, through


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def _pool(kube: RealKube, name: str) -> dict[str, Any]:
    return kube.request("GET", f"/apis/{WB}/namespaces/{kube.namespace}/ippools/{name}")


def test_verified_window_gives_a_duplicate_when_the_slices_new_holder_makes_no_reservations(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 5 s window trusts the reservation to keep n2's address from n1, but the reservation guards
    only against writers that make one. One network (one network_name, so one NodeSlicePool, one set of
    slice pool and reservation names) whose NADs (or nodes' flat files) differ in
    enable_overlapping_ranges: n1's agent (reservations on) checked slice 1 a moment ago; the
    NodeSlicePool is deleted while no pod uses it; n2 (reservations off) claims slice 1 and answers its
    first address; n1's agent, inside its window, writes the same address into its own slice pool,
    reserves it (nobody else did) and answers it."""
    n1 = conf(real_kube, tmp_path, "n1", name="nad-a", network_name="blue", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", name="nad-b", network_name="blue", enable_overlapping_ranges=False)
    monkeypatch.setattr(nodeslices, "VERIFIED_FRESH_SECONDS", 3600.0)  # the calls below stand for < 5 s
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


def test_a_lease_answered_inside_the_verified_window_is_released_by_its_del(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README: a lease in a slice its node no longer holds comes "only [from] a foreign controller". The
    verified window makes one without any: the NodeSlicePool is deleted while no pod uses it, n2
    claims slice 1, n1's agent answers a1 from slice 1 inside its window, then learns the slice is
    lost (a2, past the window) and claims another. a1's DEL then looks only in n1's current slices:
    it answers success and leaves a1's lease (and its reservation) behind."""
    n1 = conf(real_kube, tmp_path, "n1", enable_overlapping_ranges=True)
    n2 = conf(real_kube, tmp_path, "n2", enable_overlapping_ranges=True)
    monkeypatch.setattr(nodeslices, "VERIFIED_FRESH_SECONDS", 3600.0)
    agent = Agent()
    try:
        assert through(agent, real_kube, "ADD", "a0", n1)[0] == 0
        assert through(agent, real_kube, "DEL", "a0", n1)[0] == 0
        real_kube.request("DELETE", nsp_path(real_kube, "net1"))
        assert direct(real_kube, "ADD", "b0", n2, forget=False)[0] == 0
        code, inside = through(agent, real_kube, "ADD", "a1", n1)
        assert code == 0, inside
        assert holder(real_kube, address(inside)) == "n2"  # answered from a slice n1 does not hold
        monkeypatch.setattr(nodeslices, "VERIFIED_FRESH_SECONDS", 0.0)
        assert through(agent, real_kube, "ADD", "a2", n1)[0] == 0
        code, out = through(agent, real_kube, "DEL", "a1", n1)
        assert code == 0, out
    finally:
        agent.close()
    left = _pool(real_kube, "n1-10.0.0.0-26")["spec"]["allocations"]
    assert not any(v.get("id") == "a1" for v in left.values()), f"a1's lease survives its DEL: {left}"


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
        if mode == "agent":
            return through(agent, real_kube, "ADD", cid, netconf)
        return direct(real_kube, "ADD", cid, netconf, forget=False)

    try:
        assert add("c0", named)[0] == 0  # makes NodeSlicePool "blue", marked network_name "blue"
        mine = add("a0", blue)[1]
        theirs = add("b0", net2)[1]
    finally:
        agent.close()
    answered = [d for d in (mine, theirs) if "ips" in d]
    assert len({address(d) for d in answered}) == len(answered), f"one address answered twice: {mine} {theirs}"
    assert mine.get("code") == 103 and "network_name" in mine["msg"], mine
    assert not _pool(real_kube, "n1-10.0.0.0-26")["spec"].get("allocations")  # its lease taken back


def test_deleting_an_empty_nodeslicepool_during_an_add_in_flight_gives_no_address_twice(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README's remedy for a changed cut (delete the NodeSlicePool once no pod uses its addresses)
    raced by an ADD in flight: every slice pool is empty when the operator looks, n1's ADD writes its
    lease and its check finds the slice n1's; the NodeSlicePool is deleted before n1 answers, and n2
    claims slice 1. Without reservations nothing then keeps n2 from n1's address."""
    n1, n2 = conf(real_kube, tmp_path, "n1"), conf(real_kube, tmp_path, "n2")
    assert direct(real_kube, "ADD", "a0", n1)[0] == 0
    assert direct(real_kube, "DEL", "a0", n1)[0] == 0  # every slice pool empty: "no pod uses it"
    theirs: list[dict[str, Any]] = []
    check = nodeslices.Slicer._check_held

    def then_delete(self: nodeslices.Slicer, engine: Any, slice_range: str, deadline: float) -> bool:
        held = check(self, engine, slice_range, deadline)
        if self.node == "n1" and not theirs:
            real_kube.request("DELETE", nsp_path(real_kube, "net1"))
            theirs.append(direct(real_kube, "ADD", "b0", n2, forget=False)[1])
        return held

    monkeypatch.setattr(nodeslices.Slicer, "_check_held", then_delete)
    mine = direct(real_kube, "ADD", "a1", n1)[1]
    assert "ips" in mine and "ips" in theirs[0], (mine, theirs)
    assert address(mine) != address(theirs[0]), f"{address(mine)} answered on n1 and on n2"
