"""whereabouts-py under Debian's real main plugins (bridge, macvlan, ipvlan) in real network namespaces.

The issue's scenarios (bridge ADD/CHECK/DEL, the Rook storage networks, the exhausted pool) run with
cniVersion 0.3.1, 0.4.0 and 1.0.0, the versions Debian's plugins speak; CHECK is sent where a runtime
would send it (0.4.0 and later). The further cases, whose point is not the wire format, run at 1.0.0
unless the version changes what the runtime sends. The datastore is read back after each step (pool
files, or IPPool objects in the Kubernetes API test server), so "DEL released the lease" means the
store no longer names the container.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.e2e import runtime as rt
from tests.e2e.conftest import IpamFactory, dumps, require_kernel_link

pytestmark = pytest.mark.e2e
Store = Callable[[], rt.StoreView]

IFNAME = "net1"


def bridge_conf(version: str, name: str, bridge: str, ipam: dict[str, Any]) -> dict[str, Any]:
    return {
        "cniVersion": version,
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "ipam": ipam,
    }


def vlan_conf(version: str, kind: str, name: str, master: str, ipam: dict[str, Any]) -> dict[str, Any]:
    """A macvlan (bridge mode) or ipvlan (L2 mode) attachment on `master`, as in a Rook NAD."""
    mode = {"macvlan": "bridge", "ipvlan": "l2"}[kind]
    return {"cniVersion": version, "name": name, "type": kind, "master": master, "mode": mode, "ipam": ipam}


def offset(address: str, cidr: str) -> str:
    ip = ipaddress.ip_interface(address).ip
    return str(int(ip) - int(ipaddress.ip_network(cidr, strict=False).network_address))


def assert_result_shape(result: dict[str, Any], version: str, cidr: str) -> str:
    """The ADD result as the runtime sees it; returns the one address (CIDR form)."""
    assert result.get("cniVersion") == version, dumps(result)
    ips = result.get("ips", [])
    assert len(ips) == 1, dumps(result)
    address = str(ips[0]["address"])
    assert ipaddress.ip_interface(address).network == ipaddress.ip_network(cidr, strict=False), address
    if rt.version_at_least(version, (1, 0, 0)):
        assert "version" not in ips[0], f"1.0.0 results carry no ips[].version: {dumps(result)}"
    else:
        assert ips[0].get("version") == "4", f"{version} results carry ips[].version: {dumps(result)}"
    return address


def lease_must_be_gone(store: Store, container_id: str, log: Callable[[], str]) -> None:
    held = store().held_by(container_id)
    assert not held, f"leases still held by {container_id} after DEL: {held}\nipam.log:\n{log()}"


# ---- scenario 1: bridge --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cni_version", "backend"),
    [pytest.param(v, "file", id=f"{v}-file") for v in ("0.3.1", "0.4.0", "1.0.0")]
    + [
        pytest.param("1.0.0", "kubernetes", id="1.0.0-kubernetes"),
        pytest.param("1.0.0", "apiserver", id="1.0.0-apiserver", marks=pytest.mark.apiserver),
    ],
    indirect=["backend"],
)
def test_bridge_add_check_del(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    cidr = "10.213.1.0/24"
    # Every route names its gw: Debian's bridge (plugins < 1.3) fails CHECK for a gw-less route
    # ("Expected Route ... GW:<nil> not found", containernetworking/plugins#886), whatever the IPAM.
    routes = [{"dst": "10.213.99.0/24", "gw": "10.213.1.1"}, {"dst": "10.213.98.0/24", "gw": "10.213.1.254"}]
    conf = bridge_conf(
        cni_version,
        "e2e-bridge",
        "wpybr1",
        ipam(cidr, gateway="10.213.1.1", routes=routes, network_name="e2e-bridge"),
    )
    pod = runtime.new_pod("web-0", namespace="default")
    att = runtime.add(pod, conf, IFNAME)

    address = assert_result_shape(att.result, cni_version, cidr)
    assert att.result["ips"][0].get("gateway") == "10.213.1.1", dumps(att.result)
    assert address != "10.213.1.1/24", "the gateway was handed out"
    assert [r["dst"] for r in att.result.get("routes", [])] == [r["dst"] for r in routes], dumps(att.result)

    # the address and routes of the result are what the pod's netns really has
    assert rt.netns_addresses(pod.netns, IFNAME) == [address]
    table = {r["dst"]: r for r in rt.netns_routes(pod.netns) if r.get("dev") == IFNAME}
    assert "10.213.1.0/24" in table, f"no subnet route: {dumps(table)}"
    assert table["10.213.99.0/24"].get("gateway") == "10.213.1.1", dumps(table)
    assert table["10.213.98.0/24"].get("gateway") == "10.213.1.254", dumps(table)
    # and it works: the gateway is the bridge in the node netns
    reply = rt.ping(pod.netns, "10.213.1.1")
    assert reply.returncode == 0, reply.stdout + reply.stderr

    # the lease on disk: right offset, this container, this pod, this interface
    leases = store().leases_of(pod.container_id)
    assert len(leases) == 1, leases
    _, off, lease = leases[0]
    assert off == offset(address, cidr)
    assert (lease.get("podref"), lease.get("ifname")) == (pod.podref, IFNAME), lease

    if rt.version_at_least(cni_version, (0, 4, 0)):
        runtime.check(att)

    runtime.delete(att)
    lease_must_be_gone(store, pod.container_id, ipam_log)
    assert IFNAME not in rt.netns_links(pod.netns)
    # runtimes repeat DEL (kubelet retries, GC): a second one must succeed too
    again = runtime.exec_plugin("DEL", runtime.delete_conf(att), pod, IFNAME)
    assert again.ok, again.describe()


@pytest.mark.parametrize("cni_version", ["0.4.0", "1.0.0"])
def test_check_reports_lost_lease_through_bridge(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store
) -> None:
    """CHECK really asks the IPAM plugin: once the lease is gone, the bridge's CHECK fails with our error."""
    conf = bridge_conf(cni_version, "e2e-check", "wpybr2", ipam("10.213.2.0/24", gateway="10.213.2.1"))
    pod = runtime.new_pod("check-0", namespace="default")
    att = runtime.add(pod, conf, IFNAME)
    runtime.check(att)

    # release the lease behind the main plugin's back (as a wrong reconcile would)
    released = runtime.exec_plugin("DEL", conf, pod, IFNAME, plugin=rt.OUR_TYPE)
    assert released.ok, released.describe()
    assert not store().leases_of(pod.container_id)

    through_bridge = runtime.try_check(att)
    assert not through_bridge.ok, f"CHECK passed without a lease:\n{through_bridge.describe()}"
    ours = runtime.exec_plugin("CHECK", runtime.with_prev_result(att), pod, IFNAME, plugin=rt.OUR_TYPE)
    assert not ours.ok, ours.describe()
    assert _error_fields(through_bridge) == _error_fields(ours), (
        f"bridge did not pass our CHECK error through unchanged:\n{through_bridge.describe()}\n\n{ours.describe()}"
    )


def test_bridge_dual_stack(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """ipRanges: one IPv4 and one IPv6 address per attachment, both on the interface, both released."""
    v4, v6 = "10.213.3.0/24", "fd00:213:3::/64"
    # start at .10 / ::10: the bridge plugin (isGateway, no gateway in the result) takes network+1 itself
    block = ipam(
        ipRanges=[
            {"range": v4, "range_start": "10.213.3.10"},
            {"range": v6, "range_start": "fd00:213:3::10"},
        ],
        network_name="dual",
    )
    conf = bridge_conf(cni_version, "dual", "wpybr3", block)
    pod = runtime.new_pod("dual-0", namespace="default")
    att = runtime.add(pod, conf, IFNAME)

    ips = att.result.get("ips", [])
    assert [ip["address"] for ip in ips] == ["10.213.3.10/24", "fd00:213:3::10/64"], dumps(att.result)
    if not rt.version_at_least(cni_version, (1, 0, 0)):
        assert [ip.get("version") for ip in ips] == ["4", "6"], dumps(att.result)
    assert sorted(rt.netns_addresses(pod.netns, IFNAME)) == ["10.213.3.10/24", "fd00:213:3::10/64"]
    assert len(store().leases_of(pod.container_id)) == 2

    if rt.version_at_least(cni_version, (0, 4, 0)):
        runtime.check(att)
    runtime.delete(att)
    lease_must_be_gone(store, pod.container_id, ipam_log)


def test_del_after_netns_is_gone(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """After a node reboot the sandbox's netns is gone; the runtime's DEL must still release the lease."""
    conf = bridge_conf(cni_version, "gone", "wpybr4", ipam("10.213.4.0/24", gateway="10.213.4.1"))
    pod = runtime.new_pod("gone-0", namespace="default")
    att = runtime.add(pod, conf, IFNAME)
    assert store().leases_of(pod.container_id)

    rt.delete_netns(pod.netns)
    runtime.delete(att)  # CNI_NETNS still names the vanished path, as it does for a real runtime
    lease_must_be_gone(store, pod.container_id, ipam_log)


# ---- scenario 2: Rook/Ceph storage networks --------------------------------------------------------

PODS = 10
PUBLIC = "10.213.10.0/24"
PUBLIC_EXCLUDE = "10.213.10.0/28"  # .0-.15 are never handed out
CLUSTER = "10.213.11.0/24"
CLUSTER_START, CLUSTER_END = "10.213.11.100", "10.213.11.150"


# Every cniVersion and both main plugins on the file datastore. The Kubernetes datastore (IPPools in
# the real kube-apiserver) once, at 1.0.0 on macvlan: neither the version nor the main plugin changes
# how the datastore is used, and each kubernetes call costs ~0.5 s of CPU for its imports.
# ipvlan cases carry the `ipvlan` marker: `make test` deselects them because the kernel of this
# project's CI machines has no CONFIG_IPVLAN; `make test-ipvlan` runs them on a kernel that has it
# (and fails, never skips, on one that does not).
STORAGE_CASES = [
    pytest.param(
        kind,
        version,
        "file",
        id=f"{kind}-{version}-file",
        marks=[pytest.mark.ipvlan] if kind == "ipvlan" else [],
    )
    for kind in ("ipvlan", "macvlan")
    for version in ("0.3.1", "0.4.0", "1.0.0")
] + [pytest.param("macvlan", "1.0.0", "apiserver", id="macvlan-1.0.0-apiserver", marks=pytest.mark.apiserver)]


@pytest.mark.parametrize(("kind", "cni_version", "backend"), STORAGE_CASES, indirect=["backend"])
def test_storage_networks(
    runtime: rt.Runtime,
    cni_version: str,
    kind: str,
    ipam: IpamFactory,
    store: Store,
    ipam_log: Callable[[], str],
) -> None:
    """Rook's public + cluster NADs: 10 OSD pods attach to both at once, on two parent links."""
    require_kernel_link(kind)
    public_parent = runtime.add_parent_link("pub0")
    cluster_parent = runtime.add_parent_link("clu0")
    nads = {
        "public": vlan_conf(
            cni_version,
            kind,
            "public-net",
            public_parent,
            ipam(PUBLIC, exclude=[PUBLIC_EXCLUDE], network_name="public-net"),
        ),
        "cluster": vlan_conf(
            cni_version,
            kind,
            "cluster-net",
            cluster_parent,
            ipam(CLUSTER, range_start=CLUSTER_START, range_end=CLUSTER_END, network_name="cluster-net"),
        ),
    }
    ifnames = {"public": "net1", "cluster": "net2"}

    def start_pod(i: int) -> rt.Pod:
        pod = runtime.new_pod(f"rook-ceph-osd-{i}")
        for net in ("public", "cluster"):  # Multus attaches a pod's networks one after the other
            runtime.add(pod, nads[net], ifnames[net])
        return pod

    with ThreadPoolExecutor(max_workers=PODS) as pool:
        pods = list(pool.map(start_pod, range(PODS)))

    addresses: dict[str, list[str]] = {"public": [], "cluster": []}
    for pod in pods:
        for net, att in zip(("public", "cluster"), pod.attachments, strict=True):
            cidr = PUBLIC if net == "public" else CLUSTER
            address = assert_result_shape(att.result, cni_version, cidr)
            assert rt.netns_addresses(pod.netns, ifnames[net]) == [address], (pod.netns, net)
            addresses[net].append(address)
    for net, got in addresses.items():
        assert len(set(got)) == PODS, f"{net}: an address was handed out twice: {sorted(got)}"
    public_ips = [ipaddress.ip_interface(a).ip for a in addresses["public"]]
    assert all(ip not in ipaddress.ip_network(PUBLIC_EXCLUDE) for ip in public_ips), sorted(public_ips)
    cluster_ips = [ipaddress.IPv4Interface(a).ip for a in addresses["cluster"]]
    low, high = ipaddress.IPv4Address(CLUSTER_START), ipaddress.IPv4Address(CLUSTER_END)
    assert all(low <= ip <= high for ip in cluster_ips), sorted(cluster_ips)

    # the two pools on disk: ten leases each, one per pod, for the right interface
    view = store()
    by_range = {doc["spec"]["range"]: doc["spec"].get("allocations", {}) for doc in view.pools.values()}
    assert set(by_range) == {PUBLIC, CLUSTER}, f"pool files: {sorted(view.pools)}"
    for net, cidr in (("public", PUBLIC), ("cluster", CLUSTER)):
        owners = sorted((lease["id"], lease["ifname"]) for lease in by_range[cidr].values())
        assert owners == sorted((p.container_id, ifnames[net]) for p in pods), (net, owners)

    # every pod reaches two others on each network (a ring plus a chord), pings in parallel
    jobs = [
        (pods[i].netns, pods[(i + step) % PODS].attachments[n].addresses()[0].split("/")[0])
        for i in range(PODS)
        for step in (1, PODS // 2)
        for n in (0, 1)
    ]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        replies = list(pool.map(lambda job: rt.ping(*job), jobs))
    failed = [
        f"{src} -> {dst}: {r.stdout.strip()} {r.stderr.strip()}"
        for (src, dst), r in zip(jobs, replies, strict=True)
        if r.returncode
    ]
    assert not failed, "pings failed:\n" + "\n".join(failed)

    if rt.version_at_least(cni_version, (0, 4, 0)):
        # CHECK runs the same path for every pod; two pods' attachments keep the suite fast
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(runtime.check, [a for p in (pods[0], pods[-1]) for a in p.attachments]))

    with ThreadPoolExecutor(max_workers=PODS) as pool:
        list(pool.map(runtime.delete, [a for p in pods for a in reversed(p.attachments)]))
    view = store()
    left = {
        path: doc["spec"].get("allocations")
        for path, doc in view.pools.items()
        if doc["spec"].get("allocations")
    }
    assert not left, f"leases left after DEL of every pod: {dumps(left)}\nipam.log:\n{ipam_log()}"
    assert not view.reservations, f"reservations left: {sorted(view.reservations)}"


# ---- scenario 3: an exhausted pool ------------------------------------------------------------------


def _error_fields(call: rt.CniCall) -> tuple[Any, Any, Any]:
    try:
        doc = call.json()
    except ValueError:
        raise AssertionError(f"not a CNI error JSON on stdout:\n{call.describe()}") from None
    return doc.get("code"), doc.get("msg"), doc.get("details") or ""


@pytest.mark.parametrize(
    ("kind", "cni_version", "backend"),
    [
        pytest.param("bridge", version, "file", id=f"bridge-{version}-file")
        for version in ("0.3.1", "0.4.0", "1.0.0")
    ]
    + [
        pytest.param("macvlan", "1.0.0", "file", id="macvlan-1.0.0-file"),
        pytest.param(
            "bridge", "1.0.0", "apiserver", id="bridge-1.0.0-apiserver", marks=pytest.mark.apiserver
        ),
    ],
    indirect=["backend"],
)
def test_exhausted_pool(
    runtime: rt.Runtime,
    cni_version: str,
    kind: str,
    ipam: IpamFactory,
    store: Store,
    ipam_log: Callable[[], str],
) -> None:
    """One allocatable address, two pods: the second ADD fails with our error, passed through as is."""
    cidr = "10.213.20.0/24"
    block = ipam(cidr, range_start="10.213.20.10", range_end="10.213.20.10", network_name="tiny")
    if kind == "bridge":
        conf = bridge_conf(cni_version, "tiny", "wpybr20", block)
    else:
        require_kernel_link(kind)
        conf = vlan_conf(cni_version, kind, "tiny", runtime.add_parent_link("tiny0"), block)

    first = runtime.new_pod("first")
    held = runtime.add(first, conf, IFNAME)
    assert held.addresses() == ["10.213.20.10/24"], dumps(held.result)

    second = runtime.new_pod("second")
    call, att = runtime.try_add(second, conf, IFNAME)
    assert att is None and call.code != 0, f"ADD on an exhausted pool succeeded:\n{call.describe()}"
    code, msg, details = _error_fields(call)

    # what our plugin itself answers to the same ADD (the pool stays exhausted, so this takes nothing)
    ours = runtime.exec_plugin("ADD", conf, second, IFNAME, plugin=rt.OUR_TYPE)
    assert not ours.ok, ours.describe()
    assert (code, msg, details) == _error_fields(ours), (
        f"{kind} changed our error:\nthrough {kind}:\n{call.describe()}\n\nours:\n{ours.describe()}"
    )
    assert code == 100, call.describe()
    assert "10.213.20." in str(msg), f"the message does not name the range: {msg!r}"

    lease_must_be_gone(store, second.container_id, ipam_log)
    # the failed ADD did not disturb the first pod's lease
    assert [o for _, o, _ in store().leases_of(first.container_id)] == ["10"]

    # the runtime DELs a sandbox whose ADD failed (no cached result, so no prevResult): it succeeds
    cleanup = runtime.delete_unknown(second, conf, IFNAME)
    assert cleanup.ok, cleanup.describe()
    assert IFNAME not in rt.netns_links(second.netns)
    assert [o for _, o, _ in store().leases_of(first.container_id)] == ["10"], (
        "DEL of the failed pod released someone else's lease"
    )

    # once the first pod is gone, the second one gets the address
    runtime.delete(held)
    lease_must_be_gone(store, first.container_id, ipam_log)
    retry = runtime.add(second, conf, IFNAME)
    assert retry.addresses() == ["10.213.20.10/24"], dumps(retry.result)
    assert rt.netns_addresses(second.netns, IFNAME) == ["10.213.20.10/24"]


def test_concurrent_burst_into_small_pool(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """8 pods race for 5 addresses: exactly 5 win distinct addresses, 3 get our exhaustion error and
    keep nothing. One cniVersion: the race is the point here, the formats are covered above."""
    require_kernel_link("macvlan")
    cidr = "10.213.21.0/24"
    block = ipam(cidr, range_start="10.213.21.10", range_end="10.213.21.14", network_name="burst")
    conf = vlan_conf("1.0.0", "macvlan", "burst", runtime.add_parent_link("burst0"), block)
    pods = [runtime.new_pod(f"burst-{i}") for i in range(8)]
    with ThreadPoolExecutor(max_workers=len(pods)) as pool:
        outcomes = list(pool.map(lambda pod: runtime.try_add(pod, conf, IFNAME), pods))

    won = [att for _, att in outcomes if att is not None]
    lost = [(pod, call) for pod, (call, att) in zip(pods, outcomes, strict=True) if att is None]
    got = sorted(a.addresses()[0] for a in won)
    assert got == [f"10.213.21.{n}/24" for n in range(10, 15)], (got, [c.describe() for _, c in lost])
    for pod, call in lost:
        assert _error_fields(call)[0] == 100, call.describe()
        lease_must_be_gone(store, pod.container_id, ipam_log)
    assert len(store().leases_of(won[0].pod.container_id)) == 1


@pytest.mark.parametrize("cni_version", ["1.0.0"])
def test_invalid_config_is_reported_through_the_main_plugin(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store
) -> None:
    """A range that cannot exist: code 7 naming the key, passed through by the bridge; nothing stored."""
    conf = bridge_conf(cni_version, "bad", "wpybr5", ipam("10.213.5.0/33"))
    pod = runtime.new_pod("bad-0", namespace="default")
    call, att = runtime.try_add(pod, conf, IFNAME)
    assert att is None, call.describe()
    code, msg, _ = _error_fields(call)
    assert code == 7 and "ipam.range" in str(msg) and "10.213.5.0/33" in str(msg), call.describe()
    ours = runtime.exec_plugin("ADD", conf, pod, IFNAME, plugin=rt.OUR_TYPE)
    assert _error_fields(call) == _error_fields(ours), f"{call.describe()}\n\n{ours.describe()}"
    assert not store().pools, "a rejected config wrote a pool"


@pytest.mark.parametrize("cni_version", ["1.0.0"])
def test_main_plugin_failure_after_ipam_rolls_the_lease_back(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """macvlan gets an address from us, then cannot install a route (its gateway is off-link) and
    calls our DEL to undo the ADD: the runtime sees the failure and the pool keeps no lease."""
    require_kernel_link("macvlan")
    block = ipam("10.213.6.0/24", routes=[{"dst": "10.213.96.0/24", "gw": "10.213.250.1"}])
    conf = vlan_conf(cni_version, "macvlan", "rollback", runtime.add_parent_link("rb0"), block)
    pod = runtime.new_pod("rollback-0")
    call, att = runtime.try_add(pod, conf, IFNAME)
    assert att is None, f"ADD with an off-link route gateway succeeded:\n{call.describe()}"
    lease_must_be_gone(store, pod.container_id, ipam_log)
    assert "lease.add" in ipam_log(), "the main plugin failed before it asked us for an address"
    cleanup = runtime.delete_unknown(pod, conf, IFNAME)
    assert cleanup.ok, cleanup.describe()


@pytest.mark.parametrize("cni_version", ["1.0.0"])
def test_recreated_sandbox_keeps_its_address(
    runtime: rt.Runtime, cni_version: str, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """A pod's sandbox is recreated (new container id, new netns) before the old one is torn down, as
    after a node reboot: the pod keeps its address, and the late DEL of the old sandbox must not take
    it from the new one."""
    require_kernel_link("macvlan")
    conf = vlan_conf(cni_version, "macvlan", "sticky", runtime.add_parent_link("st0"), ipam("10.213.7.0/24"))
    old = runtime.new_pod("rook-ceph-mon-a")
    first = runtime.add(old, conf, IFNAME)
    new = runtime.new_pod("rook-ceph-mon-a")
    new.uid = old.uid
    second = runtime.add(new, conf, IFNAME)
    assert second.addresses() == first.addresses(), (first.result, second.result)
    [(_, _, lease)] = store().leases_of(new.container_id)
    assert lease.get("podref") == new.podref

    runtime.delete(first)
    assert [lease for _, _, lease in store().leases_of(new.container_id)], (
        f"DEL of the old sandbox released the new sandbox's lease\nipam.log:\n{ipam_log()}"
    )
    assert rt.netns_addresses(new.netns, IFNAME) == second.addresses()
    if rt.version_at_least(cni_version, (0, 4, 0)):
        runtime.check(second)
    runtime.delete(second)
    lease_must_be_gone(store, new.container_id, ipam_log)


def test_containers_without_pod_identity_get_distinct_addresses(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """A plain runtime (podman, cnitool) sends no K8S_POD_* args: each container still gets its own
    address, so the idempotent re-ADD (same pod and interface) must not match on an empty pod ref."""
    conf = bridge_conf("1.0.0", "plain", "wpybr8", ipam("10.213.8.0/24", gateway="10.213.8.1"))
    pods = [runtime.new_pod(f"plain-{i}") for i in range(2)]
    for pod in pods:
        pod.kubernetes = False
    atts = [runtime.add(pod, conf, "eth0") for pod in pods]
    got = [a.addresses()[0] for a in atts]
    assert len(set(got)) == 2, f"two containers share {got[0]}\nipam.log:\n{ipam_log()}"
    for pod, att in zip(pods, atts, strict=True):
        assert rt.netns_addresses(pod.netns, "eth0") == att.addresses()
        assert len(store().leases_of(pod.container_id)) == 1
    runtime.delete(atts[0])
    assert len(store().leases_of(pods[1].container_id)) == 1, "DEL of one container released the other's"


def test_overlapping_ranges_in_two_nads_never_share_an_address(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store
) -> None:
    """Two NADs on one L2 segment with overlapping ranges (no network_name, enable_overlapping_ranges
    on by default): the reservation keeps the second pool off the address the first one gave out."""
    require_kernel_link("macvlan")
    parent = runtime.add_parent_link("ov0")
    wide = vlan_conf("1.0.0", "macvlan", "wide", parent, ipam("10.213.12.0/24", range_start="10.213.12.10"))
    narrow = vlan_conf(
        "1.0.0", "macvlan", "narrow", parent, ipam("10.213.12.0/25", range_start="10.213.12.10")
    )
    a, b = runtime.new_pod("overlap-a"), runtime.new_pod("overlap-b")
    on_wide = runtime.add(a, wide, IFNAME)
    on_narrow = runtime.add(b, narrow, IFNAME)
    assert on_wide.addresses() == ["10.213.12.10/24"], on_wide.result
    assert on_narrow.addresses() == ["10.213.12.11/25"], on_narrow.result
    assert len(store().reservations) == 2, sorted(store().reservations)
    reply = rt.ping(a.netns, "10.213.12.11")
    assert reply.returncode == 0, reply.stdout + reply.stderr
    runtime.delete(on_wide)
    assert len(store().reservations) == 1, sorted(store().reservations)


@pytest.mark.parametrize(
    "backend", ["file", "kubernetes", pytest.param("apiserver", marks=pytest.mark.apiserver)], indirect=True
)
def test_del_before_any_add_succeeds_and_creates_nothing(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store
) -> None:
    """A runtime DELs sandboxes whose ADD never got as far as IPAM (and repeats DELs); on a store that
    has never seen the pool that must succeed and must not create the pool."""
    conf = bridge_conf("1.0.0", "never", "wpybr10", ipam("10.213.13.0/24"))
    pod = runtime.new_pod("never-0")
    call = runtime.delete_unknown(pod, conf, IFNAME)
    assert call.ok, call.describe()
    view = store()
    assert not view.pools and not view.reservations, (sorted(view.pools), sorted(view.reservations))


def test_requested_address_through_multus_ips_capability(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    """A NAD declaring `"capabilities": {"ips": true}` and a pod's network selection element with
    `ips`: that address, in the pod's namespace. The same request from a second pod is refused,
    naming the first; a pod without a request gets the lowest free address."""
    conf = {
        **bridge_conf("1.0.0", "storage-public", "wpybr14", ipam("192.168.2.224/28")),
        "capabilities": {"ips": True},
    }
    first, second, third = (runtime.new_pod(f"req-{i}") for i in range(3))
    att = runtime.add(first, conf, IFNAME, {"name": "storage-public", "ips": ["192.168.2.230/28"]})
    assert att.addresses() == ["192.168.2.230/28"], f"{att.result}\nipam.log:\n{ipam_log()}"
    assert rt.netns_addresses(first.netns, IFNAME) == ["192.168.2.230/28"]
    [(_, _, lease)] = store().leases_of(first.container_id)
    assert lease["podref"] == first.podref and "kind=requested" in lease["attrs"]

    call, refused = runtime.try_add(
        second, conf, IFNAME, {"name": "storage-public", "ips": ["192.168.2.230/28"]}
    )
    assert refused is None and not call.ok
    error = call.json()
    assert error["code"] == 104 and "192.168.2.230" in error["msg"] and first.podref in error["msg"], error
    assert not store().leases_of(second.container_id)
    assert runtime.add(third, conf, IFNAME).addresses() == ["192.168.2.225/28"]
    # a NAD without the capability: Multus passes no runtimeConfig, so the request does not reach IPAM
    plain = bridge_conf("1.0.0", "storage-plain", "wpybr15", ipam("192.168.3.0/28"))
    att = runtime.add(second, plain, "net2", {"name": "storage-plain", "ips": ["192.168.3.9/28"]})
    assert att.addresses() == ["192.168.3.1/28"]


def test_dual_stack_with_only_the_ipv4_side_requested(
    runtime: rt.Runtime, ipam: IpamFactory, store: Store, ipam_log: Callable[[], str]
) -> None:
    block = ipam(ipRanges=[{"range": "10.213.16.0/24"}, {"range": "fd00:213:16::/120"}])
    conf = {**bridge_conf("1.0.0", "dual-req", "wpybr16", block), "capabilities": {"ips": True}}
    pod = runtime.new_pod("dual-req-0")
    att = runtime.add(pod, conf, IFNAME, {"name": "dual-req", "ips": ["10.213.16.40/24"]})
    assert att.addresses() == ["10.213.16.40/24", "fd00:213:16::1/120"], f"{att.result}\n{ipam_log()}"
    assert sorted(rt.netns_addresses(pod.netns, IFNAME)) == sorted(att.addresses())
    assert len(store().leases_of(pod.container_id)) == 2
