"""Two networks whose (network_name, range) pairs map to one pool or reservation name (issue 22.1).

IPv6 names turn ':' into '-', so `network_name: "fd00"` + `650::/120` and no network_name +
`fd00:650::/120` both use IPPool `fd00-650---120`. The second network must never write that pool
(its leases would be recorded as the other range's addresses), nor a reservation recording another
network's address: a clear code 103 naming both ranges (or addresses), the name, and `network_name`.
Black-box through the plugin executable, in direct mode and through the node agent, on the real
kube-apiserver and on the file datastore; the audit never reclaims a lease through the wrong range.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netaddr import IPNetwork

from ipam.allocator import Lease
from ipam.ctl import main as ctl_main
from ipam.errors import RangeTakenError
from ipam.ranges import pool_name, pool_name_readings
from ipam.reconcile import main as reconcile_main
from ipam.store.base import PoolSnapshot, check_range
from ipam.store.file import FileStore
from ipam.store.kubernetes import KubernetesStore
from tests.cni_exec import Call, cni_env, run
from tests.kubeapi.real import RealKube

POOL = "fd00-650---120"
A = {"network_name": "fd00", "range": "650::/120"}  # pool fd00-650---120
B = {"range": "fd00:650::/120"}  # pool fd00-650---120 as well
B_WIDE = {
    "range": "fd00:650::/64"
}  # pool fd00-650---64; its fd00:650::1 is reservation fd00-650--1 like A's 650::1


@pytest.fixture
def agent_sock(tmp_path: Path) -> Iterator[str]:
    sock = str(tmp_path / "run" / "agent.sock")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ipam-agent"), "--socket", sock, "--metrics-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "NODENAME": "a"},  # the agent's node (a call's NODENAME is the shim's)
    )
    try:
        for _ in range(200):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        assert os.path.exists(sock), "agent did not start"
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(params=["direct", "agent"])
def mode(request: pytest.FixtureRequest) -> dict[str, str]:
    """Extra CNI environment: none (direct mode), or the shim's socket of a running node agent."""
    if request.param == "direct":
        return {}
    return {"WHEREABOUTS_PY_AGENT_SOCKET": request.getfixturevalue("agent_sock")}


@pytest.fixture(params=["file", pytest.param("kubernetes", marks=pytest.mark.apiserver)])
def datastore(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The ipam keys of a datastore: the file one, or the real kube-apiserver's (the plugin's own
    ServiceAccount)."""
    if request.param == "file":
        return {"datastore": "file", "data_dir": str(tmp_path / "data")}
    kube: RealKube = request.getfixturevalue("real_kube")
    return {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
        "data_dir": str(tmp_path / "node"),
    }


def conf(network: str, store: dict[str, Any], ipam: dict[str, Any]) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "type": "ipvlan",
        "ipam": {"type": "whereabouts-py", "retry_deadline_seconds": 30, **store, **ipam},
    }


def cni(command: str, network: dict[str, Any], ctr: str, extra: dict[str, str]) -> Call:
    return run(network, cni_env(command, ctr, **extra))


def address(call: Call) -> str:
    assert call.code == 0, call.stdout + call.stderr[-2000:]
    return str(call.result["ips"][0]["address"])


def refused(call: Call) -> str:
    assert call.code != 0 and call.stdout, call.stdout + call.stderr[-2000:]
    doc = call.result
    assert doc["code"] == 103, doc
    assert "Traceback" not in call.stderr
    return str(doc["msg"])


def pools(store: dict[str, Any], tmp_path: Path) -> dict[str, dict[str, Any]]:
    """{name: {range, leases: {container id: offset}}} of every pool in the datastore."""
    if store["datastore"] == "file":
        snaps = FileStore(store["data_dir"]).list_pools()
    else:
        kube = KubernetesStore.connect(store["kubernetes"]["kubeconfig"], str(tmp_path / "locks-ro"))
        snaps = kube.list_pools()
        kube.close()
    return {s.name: {"range": s.cidr, "leases": {v.id: o for o, v in s.allocations.items()}} for s in snaps}


@pytest.mark.parametrize("first", ["a", "b"])
def test_the_second_network_on_a_shared_pool_name_is_refused_and_writes_nothing(
    datastore: dict[str, Any], mode: dict[str, str], tmp_path: Path, first: str
) -> None:
    nets = {"a": conf("net-a", datastore, A), "b": conf("net-b", datastore, B)}
    owner, other = nets[first], nets["b" if first == "a" else "a"]
    own_range = owner["ipam"]["range"]
    assert address(cni("ADD", owner, "x1", mode)) == own_range.replace("/", "1/")
    msg = refused(cni("ADD", other, "y1", mode))
    for part in (POOL, "650::/120", "fd00:650::/120", "network_name"):
        assert part in msg, msg
    # the first network goes on as before; the pool holds its leases only, under its own range
    assert address(cni("ADD", owner, "x2", mode)) == own_range.replace("/", "2/")
    assert pools(datastore, tmp_path) == {POOL: {"range": own_range, "leases": {"x1": 1, "x2": 2}}}
    # the refused network's DELs succeed and touch nothing, even one naming the owner's container
    assert cni("DEL", other, "y1", mode).code == 0
    assert cni("DEL", other, "x1", mode).code == 0
    assert pools(datastore, tmp_path)[POOL]["leases"] == {"x1": 1, "x2": 2}
    assert cni("DEL", owner, "x1", mode).code == 0
    assert pools(datastore, tmp_path)[POOL]["leases"] == {"x2": 2}


def test_a_reservation_of_another_networks_address_by_the_same_name_is_refused(
    datastore: dict[str, Any], mode: dict[str, str], tmp_path: Path
) -> None:
    net_a, net_b = conf("net-a", datastore, A), conf("net-b", datastore, B_WIDE)
    assert address(cni("ADD", net_a, "a1", mode)) == "650::1/120"  # reservation fd00-650--1
    msg = refused(cni("ADD", net_b, "b1", mode))  # fd00:650::1: reservation fd00-650--1 as well
    for part in ("fd00-650--1", "650::1", "fd00:650::1", "network_name"):
        assert part in msg, msg
    # the refused ADD was rolled back: its pool holds no lease
    assert pools(datastore, tmp_path).get("fd00-650---64", {"leases": {}})["leases"] == {}


SLICED = {"network_name": "fd00", "range": "650::/112", "node_slice_size": "/120"}  # node a: fd00-a-650---120
UNSLICED = {"network_name": "fd00", "range": "a:650::/120"}  # pool fd00-a-650---120 too


@pytest.mark.parametrize("first", ["sliced", "unsliced"])
def test_a_node_slice_pool_and_a_pool_by_the_same_name_never_share_it(
    datastore: dict[str, Any], mode: dict[str, str], tmp_path: Path, first: str
) -> None:
    """A slice pool is named from network_name, node and slice: node `a`'s slice 650::/120 of network
    fd00 has the name of network fd00's unsliced range a:650::/120."""
    nets = {"sliced": conf("net-s", datastore, SLICED), "unsliced": conf("net-u", datastore, UNSLICED)}
    owner, other = nets[first], nets["unsliced" if first == "sliced" else "sliced"]
    on_a = {**mode, "NODENAME": "a"}  # direct mode's node; the agent runs on node a
    got = address(cni("ADD", owner, "x1", on_a))
    msg = refused(cni("ADD", other, "y1", on_a))
    for part in ("fd00-a-650---120", "650::/120", "a:650::/120", "network_name"):
        assert part in msg, msg
    assert address(cni("ADD", owner, "x1", on_a)) == got  # the owner's lease is where it was
    found = pools(datastore, tmp_path)["fd00-a-650---120"]
    assert found["leases"] == {"x1": 1}
    assert found["range"] == ("650::/120" if first == "sliced" else "a:650::/120")


def test_gc_of_the_refused_network_leaves_the_other_networks_pool_alone(tmp_path: Path) -> None:
    from ipam.allocator import Request
    from ipam.engine import Engine
    from ipam.ranges import build_range

    store = FileStore(str(tmp_path / "data"))
    owner = Engine(store, network_name="fd00", network="net-a")
    spec_a, spec_b = build_range("ipam", "650::/120"), build_range("ipam", "fd00:650::/120")
    owner.add([spec_a], Request("x1", "net1", "ns/x1", node="n1", network="net-a"))
    other = Engine(store, network="net-a")  # same CNI name and node: only the range tells them apart
    assert other.gc([spec_b], set(), "n1") == []
    assert pools({"datastore": "file", "data_dir": str(tmp_path / "data")}, tmp_path)[POOL]["leases"] == {
        "x1": 1
    }
    assert [str(a.address) for a in owner.gc([spec_a], set(), "n1")] == ["650::1"]  # its own GC still works


# -- the audit: a lease is never judged through a range it was not allocated from ------------------

OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.apiserver
def test_reconcile_never_releases_a_lease_recorded_under_the_other_range(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """A pool written before this fix (or by Whereabouts): network B's lease of fd00:650::2 stored at
    offset 2 of A's range 650::/120. Its Running pod's network-status says fd00:650::2."""
    ns = real_kube.namespace
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    lease = Lease("ctr-b", f"{ns}/b", "net1", created=OLD)
    store.write_pool(PoolSnapshot(POOL, "650::/120", {}, None), {2: lease})
    store.close()
    status = '[{"name": "default/net-b", "interface": "net1", "ips": ["fd00:650::2"]}]'
    real_kube.api.put_pod(ns, "b", annotations={"k8s.v1.cni.cncf.io/network-status": status})
    out = io.StringIO()
    code = reconcile_main(["--kubeconfig", real_kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    text = out.getvalue()
    assert code == 0, text
    assert "not-in-network-status" not in text, text
    assert "range-mismatch" in text and "fd00:650::2" in text, text
    [pool] = [o for o in real_kube.api.objects("ippools", ns) if o["metadata"]["name"] == POOL]
    assert list(pool["spec"]["allocations"]) == ["2"]
    shown = io.StringIO()  # an operator looking for the pod's address finds the lease
    assert (
        ctl_main(["--kubeconfig", real_kube.kubeconfig_path, "show", "--address", "fd00:650::2"], out=shown)
        == 0
    )
    assert f"{ns}/b" in shown.getvalue(), shown.getvalue()


def test_a_pool_whose_range_is_not_its_names_is_reported_and_not_judged_by_address(tmp_path: Path) -> None:
    from ipam import audit

    lease = Lease("c", "ns/p", "net1", created=OLD)
    snap = PoolSnapshot("10.9.0.0-24", "10.8.0.0/24", {5: lease}, "1")
    pod = audit.PodInfo("u", "Running", False, None, frozenset({"10.9.0.5"}))
    now = datetime.now(UTC)
    problems = audit.audit(audit.Inventory([snap], pods={"ns/p": pod}), now, 0)
    # the pod shows 10.9.0.5, not 10.8.0.5: not judged leaked; nothing is fixed in such a pool
    [mismatch] = [p for p in problems if p.kind == audit.RANGE_MISMATCH]
    assert "10.8.0.0/24" in mismatch.detail and mismatch.pool == "10.9.0.0-24"
    assert audit.LEAKED not in {p.kind for p in problems}
    assert all(p.fix is None for p in problems), problems


# -- the name function -------------------------------------------------------------------------------

hex_group = st.integers(0, 0xFFFF).map(lambda v: format(v, "x"))


@given(
    groups=st.lists(hex_group, min_size=1, max_size=4),
    tail=st.lists(hex_group, min_size=0, max_size=3),
    prefixlen=st.integers(64, 128),
    named=st.booleans(),
)
def test_every_pair_sharing_a_pool_name_is_refused_by_the_range_check(
    groups: list[str], tail: list[str], prefixlen: int, named: bool
) -> None:
    """For a pool name with several (network_name, range) readings, each reading's range written first
    refuses every other reading's range; and every reading gives back the name."""
    network_name = "-".join(groups) if named else ""
    text = ":".join(tail) + "::/" + str(prefixlen)
    network = IPNetwork(text).cidr
    name = pool_name(str(network), network_name)
    readings = pool_name_readings(name)
    assert (network_name, network) in readings
    for prefix, net in readings:
        assert pool_name(str(net), prefix) == name
    ranges = {net for _, net in readings}
    for first in ranges:
        check_range(name, str(first), str(first))
        for other in ranges - {first}:
            with pytest.raises(RangeTakenError):
                check_range(name, str(first), str(other))


def test_names_of_pairs_that_cannot_collide_are_whereabouts_own() -> None:
    assert pool_name("10.0.0.0/24", "storage") == "storage-10.0.0.0-24"
    assert pool_name("fd00:650::/120") == "fd00-650---120"
    assert pool_name_readings("storage-10.0.0.0-24") == [("storage", IPNetwork("10.0.0.0/24"))]
    assert {net for _, net in pool_name_readings(POOL)} == {
        IPNetwork("650::/120"),
        IPNetwork("fd00:650::/120"),
    }
