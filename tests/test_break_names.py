"""Adversarial review of issue 22.1 (two networks, one name): what the fix did not cover.

Each test reproduces one break black-box where it can (plugin executable, ipam-reconcile, ipamctl on the
real kube-apiserver), and states the outcome the plugin must give.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import tests.test_name_collisions as nc
from ipam import audit
from ipam.allocator import Lease
from ipam.reconcile import main as reconcile_main
from ipam.store.base import PoolSnapshot
from tests.cni_exec import cni_env, run
from tests.kubeapi.real import RealKube
from tests.test_name_collisions import address, conf, pools, refused

OLD = datetime.now(UTC) - timedelta(hours=2)
STATUS = "k8s.v1.cni.cncf.io/network-status"


def _kube_store(kube: RealKube, tmp_path: Path) -> dict[str, Any]:
    return {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
        "data_dir": str(tmp_path / "node"),
    }


def _reservations(kube: RealKube) -> set[str]:
    return {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)}


# -- a network's shared pool taken for another network's node slice pool (by its name only) ---------


@pytest.mark.apiserver
def test_reconcile_keeps_the_reservations_of_a_pool_whose_name_ends_like_a_slice(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Network `slicenet` cuts 10.0.0.0/16 into /24 node slices (its NodeSlicePool lists 10.0.1.0/24 among
    them); network `storage` (network_name storage) uses 10.0.1.0/24 on an isolated L2: its pool
    `storage-10.0.1.0-24` ends like an unnamed slice pool of a node `storage`. The audit took it for one,
    so it read the Running pod's reservation `storage-10.0.1.1` as an orphan and ipam-reconcile deleted it
    (then a second network_name-storage network overlapping the range could hand out 10.0.1.1 again)."""
    ns, store = real_kube.namespace, _kube_store(real_kube, tmp_path)
    sliced = conf("slicenet", store, {"range": "10.0.0.0/16", "node_slice_size": "/24"})
    storage = conf("storage-net", store, {"network_name": "storage", "range": "10.0.1.0/24"})
    node = f"{ns}-n1"
    real_kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    address(run(sliced, cni_env("ADD", "s1", namespace=ns, NODENAME=node)))  # NodeSlicePool slicenet
    assert address(run(storage, cni_env("ADD", "x1", namespace=ns, NODENAME=node))) == "10.0.1.1/24"
    status = f'[{{"name": "{ns}/storage-net", "interface": "net1", "ips": ["10.0.1.1"]}}]'
    real_kube.api.put_pod(ns, "x1", annotations={STATUS: status})
    assert "storage-10.0.1.1" in _reservations(real_kube)
    out = io.StringIO()
    reconcile_main(["--kubeconfig", real_kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    assert "storage-10.0.1.1" in _reservations(real_kube), out.getvalue()
    assert "reservation=storage-10.0.1.1" not in out.getvalue(), out.getvalue()
    assert "10.0.1.1" not in _reservations(real_kube)  # nor one in the unnamed networks' names
    # network_name storage's reservations still guard 10.0.1.1 for another range of that network
    wide = conf("storage-b", store, {"network_name": "storage", "range": "10.0.1.0/25"})
    assert address(run(wide, cni_env("ADD", "y1", namespace=ns, NODENAME=node))) == "10.0.1.2/25"


def _slice_inventory(pool: str, cidr: str, reservation: str, ip: str, slices: list[tuple[str, str]]) -> Any:
    lease = Lease("ctr-x", "ns/x", "net1", created=OLD.strftime("%Y-%m-%dT%H:%M:%SZ"))
    sp = audit.SlicePool("slicenet", "", "", tuple(audit.Slice(n, r) for n, r in slices), "1")
    return audit.Inventory(
        [PoolSnapshot(pool, cidr, {2: lease}, "1")],
        reservations=[audit.Reservation(reservation, lease, OLD, "1")],
        slice_pools=[sp],
        pods={"ns/x": audit.PodInfo("u", "Running", False, OLD, frozenset({ip}))},
        nodes=frozenset({"n1"}),
    )


@pytest.mark.parametrize(
    ("pool", "cidr", "reservation", "ip", "slices"),
    [
        # IPv6: node n1's unnamed slice pool of fd00:650::/120 is named like network n1-fd00's 650::/120
        ("n1-fd00-650---120", "650::/120", "n1-fd00-650--2", "650::2", [("n1", "fd00:650::/120")]),
        # IPv4, same range: a free slice 10.0.1.0/24 and network storage's 10.0.1.0/24
        ("storage-10.0.1.0-24", "10.0.1.0/24", "storage-10.0.1.2", "10.0.1.2", [("", "10.0.1.0/24")]),
    ],
)
def test_the_audit_never_deletes_a_live_leases_reservation_of_a_pool_named_like_a_slice(
    pool: str, cidr: str, reservation: str, ip: str, slices: list[tuple[str, str]]
) -> None:
    inventory = _slice_inventory(pool, cidr, reservation, ip, slices)
    problems = audit.audit(inventory, datetime.now(UTC), 0)
    assert not [p for p in problems if p.fix is not None], problems


# -- shapes: dual-stack with one family colliding, host bits, A-B form, Go Whereabouts' spellings ----

# the collision tests' fixtures: datastore (file, real API server) x mode (direct, through the agent)
agent_sock, datastore, mode = nc.agent_sock, nc.datastore, nc.mode
POOL = nc.POOL


def test_dual_stack_where_only_the_ipv6_range_collides_rolls_the_ipv4_lease_back(
    datastore: dict[str, Any], mode: dict[str, str], tmp_path: Path
) -> None:
    owner = conf("net-a", datastore, {"network_name": "fd00", "range": "650::/120"})
    dual = conf("net-b", datastore, {"ipRanges": [{"range": "10.1.0.0/24"}, {"range": "fd00:650::/120"}]})
    assert address(run(owner, cni_env("ADD", "x1", **mode))) == "650::1/120"
    msg = refused(run(dual, cni_env("ADD", "y1", **mode)))
    assert "fd00:650::/120" in msg and POOL in msg, msg
    held = pools(datastore, tmp_path)
    assert held.get("10.1.0.0-24", {"leases": {}})["leases"] == {}, held  # the IPv4 lease rolled back
    assert held[POOL] == {"range": "650::/120", "leases": {"x1": 1}}
    assert run(dual, cni_env("DEL", "y1", **mode)).code == 0
    assert pools(datastore, tmp_path)[POOL]["leases"] == {"x1": 1}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"network_name": "fd00", "range": "650::10-650::20/120"}, {"range": "fd00:650::/120"}),
        ({"range": "fd00:650::7/120"}, {"network_name": "fd00", "range": "650::5/120"}),
        ({"range": "fd00:0650:0000::/120"}, {"network_name": "fd00", "range": "0650::/120"}),
        ({"network_name": "fd00", "range": "650::10-650::20/120"}, {"range": "fd00:650::1-fd00:650::9/120"}),
    ],
)
def test_every_spelling_of_a_colliding_range_is_refused(
    datastore: dict[str, Any],
    mode: dict[str, str],
    tmp_path: Path,
    first: dict[str, Any],
    second: dict[str, Any],
) -> None:
    got = address(run(conf("net-a", datastore, first), cni_env("ADD", "x1", **mode)))
    msg = refused(run(conf("net-b", datastore, second), cni_env("ADD", "y1", **mode)))
    assert POOL in msg, msg
    [(name, pool)] = pools(datastore, tmp_path).items()
    assert name == POOL and list(pool["leases"]) == ["x1"], pool
    assert address(run(conf("net-a", datastore, first), cni_env("ADD", "x2", **mode))) != got


@pytest.mark.apiserver
@pytest.mark.parametrize("spelled", ["0650:0000:0000::/120", "650::5/120", "0650::0/120"])
def test_a_whereabouts_pool_spelling_the_same_range_otherwise_is_used(
    real_kube: RealKube, tmp_path: Path, spelled: str
) -> None:
    """Go Whereabouts (or an older writer) may record spec.range with leading zeros or host bits: the same
    range, so the network keeps working in it, and the audit does not call it a range mismatch."""
    ns, store = real_kube.namespace, _kube_store(real_kube, tmp_path)
    lease = {"id": "wb", "podref": f"{ns}/wb", "ifname": "net1"}
    real_kube.apply(
        {
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": POOL, "namespace": ns},
            "spec": {"range": spelled, "allocations": {"1": lease}},
        }
    )
    net = conf("net-a", store, {"network_name": "fd00", "range": "650::/120"})
    assert address(run(net, cni_env("ADD", "x1", namespace=ns))) == "650::2/120"
    real_kube.api.put_pod(
        ns, "x1", annotations={STATUS: '[{"name": "x", "interface": "net1", "ips": ["650::2"]}]'}
    )
    real_kube.api.put_pod(
        ns, "wb", annotations={STATUS: '[{"name": "x", "interface": "net1", "ips": ["650::1"]}]'}
    )
    out = io.StringIO()
    from ipam.ctl import main as ctl_main

    ctl_main(["--kubeconfig", real_kube.kubeconfig_path, "check", "--grace", "0"], out=out)
    assert "range-mismatch" not in out.getvalue(), out.getvalue()


# -- races: both networks' first ADDs at once ------------------------------------------------------


def test_both_networks_first_adds_at_once_one_network_wins_the_other_is_refused(
    datastore: dict[str, Any], mode: dict[str, str], tmp_path: Path
) -> None:
    from netaddr import IPNetwork

    from tests.cni_exec import finish, start

    for i in range(4):
        nets = {
            "a": conf("net-a", datastore, {"network_name": f"fd0{i}", "range": "650::/120"}),
            "b": conf("net-b", datastore, {"range": f"fd0{i}:650::/120"}),
        }
        procs = {
            f"{n}{k}-{i}": start(nets[n], cni_env("ADD", f"{n}{k}-{i}", **mode)) for k in (1, 2) for n in "ab"
        }
        calls = {ctr: finish(p) for ctr, p in procs.items()}
        won = {ctr: c for ctr, c in calls.items() if c.code == 0}
        assert won, calls
        winner = {ctr[0] for ctr in won}
        assert len(winner) == 1, calls  # never both networks
        for ctr, c in calls.items():
            if ctr not in won:
                refused(c)
        pool = pools(datastore, tmp_path)[f"fd0{i}-650---120"]
        assert pool["range"] == nets[winner.pop()]["ipam"]["range"]
        assert set(pool["leases"]) == set(won)
        for ctr, c in won.items():  # each acknowledged address is the one recorded
            answered = IPNetwork(c.result["ips"][0]["address"])
            assert int(answered.ip) - int(IPNetwork(pool["range"]).first) == pool["leases"][ctr]


# -- an agent's memory of a pool the other network has since recreated -------------------------------


def _delete_pool(store: dict[str, Any], request: pytest.FixtureRequest, name: str) -> None:
    from ipam.store.file import FileStore
    from ipam.store.kubernetes import KubernetesStore

    if store["datastore"] == "file":
        fs = FileStore(store["data_dir"])
        fs.delete_pool(name, str(next(s for s in fs.list_pools() if s.name == name).version))
        return
    kube_fixture: RealKube = request.getfixturevalue("real_kube")  # an admin: the plugin may not delete
    kube = KubernetesStore.connect(kube_fixture.kubeconfig_path, str(kube_fixture.tmp_dir / "locks-del"))
    try:
        kube.delete_pool(name, str(next(s for s in kube.list_pools() if s.name == name).version))
    finally:
        kube.close()


@pytest.mark.parametrize("held", [False, True])
def test_an_agent_remembering_a_pool_the_other_network_recreated_never_answers_from_memory(
    datastore: dict[str, Any], agent_sock: str, tmp_path: Path, held: bool, request: pytest.FixtureRequest
) -> None:
    """Node agent warm with network A's pool; the pool is deleted (empty, or by force with A's lease in it)
    and network B creates a pool by the same name with its own range. A's next ADD through the agent (a new
    container, or the same one again) is refused, or answered with an address its pool records."""
    via_agent = {"WHEREABOUTS_PY_AGENT_SOCKET": agent_sock}
    net_a = conf("net-a", datastore, {"network_name": "fd00", "range": "650::/120"})
    net_b = conf("net-b", datastore, {"range": "fd00:650::/120"})
    assert address(run(net_a, cni_env("ADD", "x1", **via_agent))) == "650::1/120"
    if not held:
        assert run(net_a, cni_env("DEL", "x1", **via_agent)).code == 0
    _delete_pool(datastore, request, POOL)
    # direct mode: B's pool now (with A's lease deleted by force, A's reservation still refuses fd00:650::1)
    b_call = run(net_b, cni_env("ADD", "y1"))
    assert address(b_call) == "fd00:650::1/120" if not held else refused(b_call)
    for ctr in ("x2", "x1"):
        call = run(net_a, cni_env("ADD", ctr, **via_agent))
        if call.code == 0:
            answered = str(call.result["ips"][0]["address"])
            pytest.fail(f"{ctr} answered {answered}; the pool holds {pools(datastore, tmp_path)}")
        refused(call)
    assert pools(datastore, tmp_path)[POOL] == {
        "range": "fd00:650::/120",
        "leases": {} if held else {"y1": 1},
    }


# -- the audit's reading of IPv6 names whose address text has dots ---------------------------------


@pytest.mark.parametrize(
    ("cidr", "network_name"),
    [("::ffff:10.0.0.0/120", ""), ("::ffff:10.0.0.0/120", "mapped"), ("::1:0/112", "x")],
)
def test_a_pool_of_an_ipv6_range_printed_with_dots_is_not_a_range_mismatch(
    cidr: str, network_name: str
) -> None:
    """netaddr prints IPv4-mapped (and -compatible) IPv6 ranges with a dotted tail, so their pool names have
    dots: the audit must still read them as IPv6 and judge their leases by address."""
    from netaddr import IPNetwork

    from ipam.ranges import pool_name

    network = str(IPNetwork(cidr).cidr)
    name = pool_name(network, network_name)
    lease = Lease("c", "ns/p", "net1", created=OLD.strftime("%Y-%m-%dT%H:%M:%SZ"))
    pod = audit.PodInfo("u", "Running", False, OLD, frozenset({"10.9.9.9"}))  # shows another address
    problems = audit.audit(
        audit.Inventory([PoolSnapshot(name, network, {5: lease}, "1")], pods={"ns/p": pod}),
        datetime.now(UTC),
        0,
    )
    kinds = {p.kind for p in problems}
    assert audit.RANGE_MISMATCH not in kinds, problems
    assert audit.LEAKED in kinds, problems  # its lease is judged: the pod does not show it


# -- node slices' reclaim, on a slice pool name that is another network's pool ----------------------


@pytest.mark.apiserver
@pytest.mark.parametrize("leased", [True, False])
def test_reclaim_returns_a_gone_nodes_slice_without_touching_another_networks_pool_by_that_name(
    real_kube: RealKube, tmp_path: Path, leased: bool
) -> None:
    """Node `<ns>-gone` held slice fd00:650::/120 of the unnamed network slicenet: its slice pool would be
    `<ns>-gone-fd00-650---120`, the name of network_name `<ns>-gone-fd00`'s pool of 650::/120. Reclaim went
    by name: with that network's lease in the pool the slice was never returned; with it empty, reclaim
    retired and deleted the other network's pool."""
    ns, store = real_kube.namespace, _kube_store(real_kube, tmp_path)
    gone = f"{ns}-gone"
    other_pool = f"{gone}-fd00-650---120"
    wb = "whereabouts.cni.cncf.io/v1alpha1"
    real_kube.apply(
        {
            "apiVersion": wb,
            "kind": "NodeSlicePool",
            "metadata": {"name": "slicenet", "namespace": ns},
            "spec": {"range": "fd00:650::/119", "sliceSize": "120"},
            "status": {
                "allocations": [
                    {"nodeName": gone, "sliceRange": "fd00:650::/120"},
                    {"nodeName": "", "sliceRange": "fd00:650::100/120"},
                ]
            },
        }
    )
    net = conf("other", store, {"network_name": f"{gone}-fd00", "range": "650::/120"})
    assert address(run(net, cni_env("ADD", "x1", namespace=ns))) == "650::1/120"
    if leased:
        status = '[{"name": "x", "interface": "net1", "ips": ["650::1"]}]'
        real_kube.api.put_pod(ns, "x1", annotations={STATUS: status})
    else:
        assert run(net, cni_env("DEL", "x1", namespace=ns)).code == 0
    out = io.StringIO()
    reconcile_main(["--kubeconfig", real_kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    text = out.getvalue()
    found = {o["metadata"]["name"]: o for o in real_kube.api.objects("ippools", ns)}
    assert other_pool in found, text  # never deleted
    assert "annotations" not in found[other_pool]["metadata"] or not any(
        "retired" in k for k in found[other_pool]["metadata"]["annotations"]
    ), found[other_pool]
    assert list(found[other_pool]["spec"]["allocations"]) == (["1"] if leased else []), text
    assert "return nodeslicepool=slicenet slice=fd00:650::/120" in text, text
    assert address(run(net, cni_env("ADD", "x2", namespace=ns))) == ("650::2/120" if leased else "650::1/120")


# -- DEL of a network whose reservation names are another network's --------------------------------


def test_a_del_of_the_other_network_never_deletes_a_reservation_of_another_address(
    mode: dict[str, str], tmp_path: Path
) -> None:
    """Network A (network_name fd00, 650::/120) and network B (no network_name, fd00:650::/64) use different
    pools, but A's 650::1 and B's fd00:650::1 are both reservation fd00-650--1. A DEL of B for the attachment
    A's container holds (a runtime's cleanup DEL: a DEL is for any attachment, ADDed or not) went through the
    file store's reservations held by that attachment, read fd00-650--1 as B's fd00:650::1 and deleted A's
    reservation of a live pod's address."""
    store = {"datastore": "file", "data_dir": str(tmp_path / "data")}
    net_a = conf("net-a", store, {"network_name": "fd00", "range": "650::/120"})
    net_b = conf("net-b", store, {"range": "fd00:650::/64"})
    assert address(run(net_a, cni_env("ADD", "x1", **mode))) == "650::1/120"
    reservations = tmp_path / "data" / "reservations"
    names = sorted(p.stem for p in reservations.glob("*.json"))
    assert names == ["fd00-650--1"], names
    assert run(net_b, cni_env("DEL", "x1", **mode)).code == 0
    assert sorted(p.stem for p in reservations.glob("*.json")) == names  # A's reservation stays
    assert run(net_a, cni_env("DEL", "x1", **mode)).code == 0  # A's own DEL still gives it back
    assert sorted(p.stem for p in reservations.glob("*.json")) == []


# -- two sliced networks whose slice pool names meet (network net + node east-X, net-east + node X) ---


@pytest.mark.apiserver
def test_reconcile_keeps_both_sliced_networks_reservations_in_a_slice_pool_they_both_name(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Two sliced networks on one range (isolated L2s reuse ranges): network_name `net` on node `east-X`
    and network_name `net-east` on node `X` both name their first slice's pool `net-east-X-10.10.0.0-24`;
    same range, so both write it. The audit read the pool as one network's, called the other's Running
    pod's reservation an orphan, and ipam-reconcile deleted it."""
    ns, store = real_kube.namespace, _kube_store(real_kube, tmp_path)
    east, plain = f"east-{ns}", ns
    for node in (east, plain):
        real_kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    net = conf("net", store, {"network_name": "net", "range": "10.10.0.0/16", "node_slice_size": "/24"})
    net_east = conf(
        "net-e", store, {"network_name": "net-east", "range": "10.10.0.0/16", "node_slice_size": "/24"}
    )
    got = {
        "p1": address(run(net, cni_env("ADD", "p1", namespace=ns, NODENAME=east))),
        "p2": address(run(net_east, cni_env("ADD", "p2", namespace=ns, NODENAME=plain))),
    }
    assert sorted(got.values()) == ["10.10.0.1/16", "10.10.0.2/16"], got  # one pool, shared
    for pod, ip in got.items():
        status = f'[{{"name": "x", "interface": "net1", "ips": ["{ip.split("/")[0]}"]}}]'
        real_kube.api.put_pod(ns, pod, annotations={STATUS: status})
    before = _reservations(real_kube)
    assert before == {"net-10.10.0.1", "net-east-10.10.0.2"}, before
    out = io.StringIO()
    reconcile_main(["--kubeconfig", real_kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    assert _reservations(real_kube) == before, out.getvalue()


def test_the_audit_keeps_both_sliced_networks_reservations_in_a_pool_they_both_name() -> None:
    old = OLD.strftime("%Y-%m-%dT%H:%M:%SZ")
    l1, l2 = Lease("c1", "ns/p1", "net1", created=old), Lease("c2", "ns/p2", "net1", created=old)
    inventory = audit.Inventory(
        [PoolSnapshot("net-east-n1-10.10.0.0-24", "10.10.0.0/24", {1: l1, 2: l2}, "1")],
        reservations=[
            audit.Reservation("net-10.10.0.1", l1, OLD, "1"),
            audit.Reservation("net-east-10.10.0.2", l2, OLD, "1"),
        ],
        slice_pools=[
            audit.SlicePool("net", "", "", (audit.Slice("east-n1", "10.10.0.0/24"),), "1"),
            audit.SlicePool("net-east", "", "", (audit.Slice("n1", "10.10.0.0/24"),), "1"),
        ],
        pods={
            "ns/p1": audit.PodInfo("u1", "Running", False, OLD, frozenset({"10.10.0.1"})),
            "ns/p2": audit.PodInfo("u2", "Running", False, OLD, frozenset({"10.10.0.2"})),
        },
        nodes=frozenset({"n1", "east-n1"}),
    )
    problems = audit.audit(inventory, datetime.now(UTC), 0)
    assert not [p for p in problems if p.fix is not None], problems


def test_refused_adds_of_a_sliced_network_never_claim_slice_after_slice(
    datastore: dict[str, Any], mode: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """Node a's first slice pool name is another network's pool: a sliced ADD there is refused (103). A pod
    the kubelet keeps retrying must not make the node claim one more slice per attempt."""
    from ipam.store.file import FileStore

    on_a = {**mode, "NODENAME": "a"}
    sliced = conf("net-s", datastore, nc.SLICED)
    address(run(conf("net-u", datastore, nc.UNSLICED), cni_env("ADD", "u1", **on_a)))
    calls = [run(sliced, cni_env("ADD", f"s{i}", **on_a)) for i in range(4)]
    if datastore["datastore"] == "file":
        held = [
            e.slice_range
            for n in FileStore(datastore["data_dir"]).list_node_slices()
            for e in n.entries
            if e.node == "a"
        ]
    else:
        kube: RealKube = request.getfixturevalue("real_kube")
        objs = kube.api.objects("nodeslicepools", kube.namespace)
        held = [
            a["sliceRange"]
            for o in objs
            for a in (o.get("status") or {}).get("allocations", [])
            if a.get("nodeName") == "a"
        ]
    assert len(held) <= 2, (held, [c.stdout for c in calls])
    for c in calls:
        assert "fd00-a-650---120" in refused(c)


@pytest.mark.apiserver
@pytest.mark.parametrize("held", [False, True])
def test_an_agent_remembering_its_slice_pool_recreated_by_another_network_never_answers_from_memory(
    real_kube: RealKube, agent_sock: str, tmp_path: Path, held: bool, request: pytest.FixtureRequest
) -> None:
    """The agent trusts its memory of its node's slice pools while its node lock's generation is unchanged
    (no other node writes them). Network fd00's slice pool fd00-a-650---120 is deleted and recreated by
    the unsliced network fd00 + a:650::/120 from another node (other node locks): node a's next ADDs are
    refused, or answered with an address the pool records."""
    store = _kube_store(real_kube, tmp_path)
    on_a = {"WHEREABOUTS_PY_AGENT_SOCKET": agent_sock, "NODENAME": "a"}
    sliced = conf("net-s", store, nc.SLICED)
    other = conf("net-u", {**store, "data_dir": str(tmp_path / "node-b")}, nc.UNSLICED)
    assert address(run(sliced, cni_env("ADD", "x1", **on_a))) == "650::1/112"
    if not held:
        assert run(sliced, cni_env("DEL", "x1", **on_a)).code == 0
    _delete_pool({"datastore": "kubernetes"}, request, "fd00-a-650---120")
    assert address(run(other, cni_env("ADD", "y1", NODENAME="b"))) == "a:650::1/120"
    for ctr in ("x2", "x1"):
        call = run(sliced, cni_env("ADD", ctr, **on_a))
        if call.code == 0:
            answered = str(call.result["ips"][0]["address"])
            pytest.fail(f"{ctr} answered {answered}; the pools are {pools(store, tmp_path)}")
        assert "fd00-a-650---120" in refused(call)
