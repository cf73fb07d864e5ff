"""whereabouts-py processes on the Kubernetes datastore: concurrency, faults, deadlines, dual-stack,
Whereabouts' own CRDs. Each process is the real executable with a normal kubeconfig. Tests taking
`k8s` run on the API test server and on the real kube-apiserver (there with the plugin's own
ServiceAccount from deploy/rbac.yaml); tests injecting faults or counting requests take `kube`."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease
from tests.cni_exec import Call, cni_env, finish, run, start
from tests.kubeapi.fixtures import K8s, KubeHandle
from tests.kubeapi.real import RealKube
from tests.kubeapi.schema import whereabouts_crds


def netconf(kube: K8s, tmp: Path, ipam: dict[str, Any], version: str = "1.0.0") -> dict[str, Any]:
    base = {
        "type": "whereabouts-py",
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
        "data_dir": str(tmp / "node"),
        "log_file": str(tmp / "ipam.log"),
        "log_level": "debug",
        "retry_deadline_seconds": 60,
    }
    return {"cniVersion": version, "name": "storage", "type": "ipvlan", "ipam": {**base, **ipam}}


def pool(kube: K8s, name: str) -> dict[str, Any]:
    [obj] = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == name]
    return obj


def reservations(kube: K8s) -> set[str]:
    return {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)}


def add_many(kube: K8s, tmp: Path, ipam: dict[str, Any], count: int, nodes: int) -> list[Call]:
    procs = []
    for i in range(count):
        node = f"node-{i % nodes}"
        conf = netconf(kube, tmp, ipam)
        conf["ipam"]["data_dir"] = str(tmp / node)  # each simulated node has its own lock dir
        procs.append(start(conf, cni_env("ADD", f"ctr{i:03d}", NODENAME=node)))
    return [finish(p, timeout=300) for p in procs]


def addresses(calls: list[Call]) -> list[str]:
    return [ip["address"].split("/")[0] for c in calls for ip in c.result["ips"]]


def check_40_distinct(kube: K8s, calls: list[Call]) -> None:
    failed = [c for c in calls if c.code != 0]
    assert not failed, failed[0].stdout + failed[0].stderr[-2000:]
    got = addresses(calls)
    assert len(got) == 40 and len(set(got)) == 40
    leases = pool(kube, "10.50.0.0-24")["spec"]["allocations"]
    assert len(leases) == 40  # none lost, none extra
    held = {str(ipaddress.ip_address("10.50.0.0") + int(k)) for k in leases}
    assert held == set(got)
    assert {Lease.from_json(lease).node for lease in leases.values()} == {f"node-{n}" for n in range(4)}
    assert reservations(kube) == set(got)


@pytest.mark.slow
def test_40_processes_on_4_nodes_get_distinct_addresses(real_kube: RealKube, tmp_path: Path) -> None:
    # the real server only: the test server runs the same burst under injected 500s just below
    check_40_distinct(real_kube, add_many(real_kube, tmp_path, {"range": "10.50.0.0/24"}, count=40, nodes=4))


@pytest.mark.slow
def test_40_processes_under_20pct_500s_get_distinct_addresses(kube: KubeHandle, tmp_path: Path) -> None:
    kube.api.set_faults(seed=7, latency=0.1, error_rate=0.2, error_codes=(500,))
    calls = add_many(kube, tmp_path, {"range": "10.50.0.0/24"}, count=40, nodes=4)
    kube.api.clear_faults()
    check_40_distinct(kube, calls)
    assert kube.api.count("update", "ippools") + kube.api.count("create", "ippools") >= 40


def test_deadline_under_constant_conflicts_is_code_11_without_a_lease(
    kube: KubeHandle, tmp_path: Path
) -> None:
    conf = netconf(kube, tmp_path, {"range": "10.51.0.0/24", "retry_deadline_seconds": 2})
    assert run(conf, cni_env("ADD", "first")).code == 0  # the pool exists
    kube.api.set_faults(always_conflict={"ippools"})
    call = run(conf, cni_env("ADD", "second"))
    assert call.code != 0
    assert call.result["code"] == 11 and "try again later" in call.result["msg"]
    kube.api.clear_faults()
    leases = pool(kube, "10.51.0.0-24")["spec"]["allocations"]
    assert [v["id"] for v in leases.values()] == ["first"]
    # its reservation was given back too
    assert reservations(kube) == {"10.51.0.1"}
    assert kube.api.count("update", "ippools") >= 2  # it really retried


def test_throttling_is_retried_honouring_retry_after(kube: KubeHandle, tmp_path: Path) -> None:
    kube.api.set_faults(seed=3, throttle_rate=0.5, retry_after=0)
    conf = netconf(kube, tmp_path, {"range": "10.52.0.0/24"})
    calls = [run(conf, cni_env("ADD", f"c{i}")) for i in range(4)]
    assert all(c.code == 0 for c in calls), [c.stdout for c in calls]
    assert len(set(addresses(calls))) == 4


def test_dropped_connections_are_retried(kube: KubeHandle, tmp_path: Path) -> None:
    kube.api.set_faults(seed=5, drop_rate=0.3)
    conf = netconf(kube, tmp_path, {"range": "10.53.0.0/24"})
    calls = [run(conf, cni_env("ADD", f"c{i}")) for i in range(4)]
    assert all(c.code == 0 for c in calls), [c.stdout for c in calls]
    kube.api.clear_faults()
    assert len(pool(kube, "10.53.0.0-24")["spec"]["allocations"]) == 4


def test_dual_stack_gives_one_address_per_family(k8s: K8s, tmp_path: Path) -> None:
    ipam = {"ipRanges": [{"range": "10.54.0.0/24"}, {"range": "fd00:54::/64"}]}
    call = run(netconf(k8s, tmp_path, ipam), cni_env("ADD", "ds1"))
    assert call.code == 0, call.stdout
    assert [ip["address"] for ip in call.result["ips"]] == ["10.54.0.1/24", "fd00:54::1/64"]
    assert pool(k8s, "fd00-54---64")["spec"]["allocations"]["1"]["id"] == "ds1"


def test_dual_stack_is_all_or_nothing(k8s: K8s, tmp_path: Path) -> None:
    ipam = {"ipRanges": [{"range": "10.55.0.0/24"}, {"range": "fd00:55::/126"}]}  # v6: two usable addresses
    conf = netconf(k8s, tmp_path, ipam)
    assert run(conf, cni_env("ADD", "a")).code == 0
    assert run(conf, cni_env("ADD", "b")).code == 0
    call = run(conf, cni_env("ADD", "c"))
    assert call.result["code"] == 100 and "fd00:55::/126" in call.result["msg"]
    v4 = pool(k8s, "10.55.0.0-24")["spec"]["allocations"]
    assert sorted(v["id"] for v in v4.values()) == ["a", "b"]  # c's IPv4 lease was rolled back
    assert "10.55.0.3" not in reservations(k8s)


def test_whereabouts_crd_prunes_our_fields_and_nothing_breaks(kube: KubeHandle, tmp_path: Path) -> None:
    """A Whereabouts CRD applied over ours drops attrs (and the old extras); leases still work, GC skips them."""
    kube.api.use_crds(whereabouts_crds())
    conf = netconf(kube, tmp_path, {"range": "10.56.0.0/24"})
    first = run(conf, cni_env("ADD", "p1", NODENAME="node-a"))
    assert first.code == 0
    lease = pool(kube, "10.56.0.0-24")["spec"]["allocations"]["1"]
    assert lease == {"id": "p1", "podref": "default/p1", "ifname": "net1"}  # pruned to Whereabouts' fields
    gc_conf = {
        **netconf(kube, tmp_path, {"range": "10.56.0.0/24"}, version="1.1.0"),
        "cni.dev/valid-attachments": [],
    }
    gc = run(gc_conf, cni_env("GC", "unused", NODENAME="node-a"))
    assert gc.code == 0, gc.stdout
    assert "1" in pool(kube, "10.56.0.0-24")["spec"]["allocations"]  # no node recorded: GC keeps it
    assert run(conf, cni_env("ADD", "p1", NODENAME="node-a")).result["ips"][0]["address"] == "10.56.0.1/24"


def test_status_reports_an_unreachable_api(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    from tests.kubeapi.server import write_kubeconfig

    write_kubeconfig(kubeconfig, "http://127.0.0.1:9")  # nothing listens on the discard port
    conf = {
        "cniVersion": "1.1.0",
        "name": "n",
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": "10.57.0.0/24",
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": str(kubeconfig)},
            "data_dir": str(tmp_path),
        },
    }
    call = run(conf, cni_env("STATUS", "x"))
    assert call.code != 0 and call.result["code"] == 50


def test_gc_releases_only_this_nodes_stale_leases(k8s: K8s, tmp_path: Path) -> None:
    conf = netconf(k8s, tmp_path, {"range": "10.58.0.0/24"})
    for ctr, node in (("keep-a", "node-a"), ("stale-a", "node-a"), ("stale-b", "node-b")):
        assert run(conf, cni_env("ADD", ctr, NODENAME=node)).code == 0
    gc_conf = {
        **netconf(k8s, tmp_path, {"range": "10.58.0.0/24"}, version="1.1.0"),
        "cni.dev/valid-attachments": [{"containerID": "keep-a", "ifname": "net1"}],
    }
    assert run(gc_conf, cni_env("GC", "unused", NODENAME="node-a")).code == 0
    left = sorted(v["id"] for v in pool(k8s, "10.58.0.0-24")["spec"]["allocations"].values())
    assert left == ["keep-a", "stale-b"]
    assert reservations(k8s) == {"10.58.0.1", "10.58.0.3"}


def test_refusals_are_retried_for_a_moment_then_reported(kube: KubeHandle, tmp_path: Path) -> None:
    """A just-restarted kube-apiserver answers 403 until its RBAC cache syncs (seen on the real server,
    tests/test_realapi_faults.py): scattered 403s are retried; a steady 403 becomes the final error."""
    from ipam.allocator import Request
    from ipam.engine import Engine, RetryPolicy
    from ipam.errors import CNIError
    from ipam.ranges import build_range
    from ipam.store.kubernetes import KubernetesStore

    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    store.auth_settle_seconds = 0.5
    engine = Engine(store, RetryPolicy(deadline_seconds=60))
    spec = build_range("ipam", "10.59.0.0/24")
    kube.api.set_faults(seed=2, error_rate=0.5, error_codes=(403,))
    assert str(engine.add([spec], Request("a", "net1", "default/a"))[0].address) == "10.59.0.1"
    kube.api.set_faults(error_rate=1.0, error_codes=(403,))
    with pytest.raises(CNIError) as err:
        engine.add([spec], Request("b", "net1", "default/b"))
    assert err.value.code == 103 and "HTTP 403" in err.value.msg and "RBAC" in err.value.msg
    kube.api.clear_faults()
    assert [v["id"] for v in pool(kube, "10.59.0.0-24")["spec"]["allocations"].values()] == ["a"]
    store.close()


# -- the lease format on the real server: extras packed in `attrs`, old separate fields still read -------

OLD_EXTRAS = {"created": "2026-01-01T00:00:00Z", "poduid": "uid-x", "token": "~t0"}


def old_lease(ctr: str, node: str = "", network: str = "") -> dict[str, str]:
    """A lease as the previous version wrote it: the extras as separate fields."""
    out = {"id": ctr, "podref": f"default/{ctr}", "ifname": "net1", **OLD_EXTRAS}
    return {**out, **({"node": node} if node else {}), **({"network": network} if network else {})}


def test_the_real_server_stores_a_plugin_lease_as_attrs_only(real_kube: RealKube, tmp_path: Path) -> None:
    """Our CRD declares `attrs`: the API server's pruning keeps it, and no extra travels separately."""
    conf = netconf(real_kube, tmp_path, {"range": "10.73.0.0/24"})
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p1;K8S_POD_UID=uid-p1"
    assert run(conf, cni_env("ADD", "p1", NODENAME="node-a", CNI_ARGS=args)).code == 0
    raw = pool(real_kube, "10.73.0.0-24")["spec"]["allocations"]["1"]
    assert set(raw) == {"id", "podref", "ifname", "attrs"}
    lease = Lease.from_json(raw)
    assert (lease.id, lease.podref, lease.ifname) == ("p1", "default/p1", "net1")
    assert (lease.node, lease.poduid, lease.network) == ("node-a", "uid-p1", "storage")
    assert lease.created and lease.token  # the ADD's own time and call id
    assert raw["attrs"] == lease.to_json()["attrs"]
    assert run(conf, cni_env("ADD", "p2", NODENAME="node-b")).code == 0  # the pool is written again
    again = pool(real_kube, "10.73.0.0-24")["spec"]["allocations"]
    assert again["1"] == raw and Lease.from_json(again["2"]).node == "node-b"


def test_an_old_format_pool_is_rewritten_packed_and_gc_still_tells_nodes_and_networks_apart(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Leases of the previous version exist in clusters: a later ADD rewrites them packed with every extra
    intact, and CNI GC still releases only its own node's and network's stale leases."""
    planted = {
        "1": old_lease("stale", "node-a", "storage"),
        "2": old_lease("valid", "node-a", "storage"),
        "3": old_lease("other-node", "node-b", "storage"),
        "4": old_lease("other-net", "node-a", "public"),
        "5": old_lease("no-node", network="storage"),
        "6": {"id": "wb", "podref": "default/wb", "ifname": "net1"},  # Whereabouts' own
    }
    body = {
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": "10.74.0.0-24"},
    }
    real_kube.apply({**body, "spec": {"range": "10.74.0.0/24", "allocations": planted}})
    assert pool(real_kube, "10.74.0.0-24")["spec"]["allocations"] == planted  # the server kept the old fields
    conf = netconf(real_kube, tmp_path, {"range": "10.74.0.0/24"})
    added = run(conf, cni_env("ADD", "new", NODENAME="node-a"))
    assert added.code == 0 and added.result["ips"][0]["address"] == "10.74.0.7/24"
    stored = pool(real_kube, "10.74.0.0-24")["spec"]["allocations"]
    for offset, raw in planted.items():
        assert set(stored[offset]) <= {"id", "podref", "ifname", "attrs"}, stored[offset]  # packed now
        assert Lease.from_json(stored[offset]) == Lease.from_json(raw)  # every extra intact
    assert Lease.from_json(stored["1"]).to_json()["attrs"] == (
        "node=node-a;poduid=uid-x;created=2026-01-01T00:00:00Z;network=storage;token=~t0"
    )
    gc_conf = {
        **netconf(real_kube, tmp_path, {"range": "10.74.0.0/24"}, version="1.1.0"),
        "cni.dev/valid-attachments": [{"containerID": c, "ifname": "net1"} for c in ("valid", "new")],
    }
    assert run(gc_conf, cni_env("GC", "unused", NODENAME="node-a")).code == 0
    left = pool(real_kube, "10.74.0.0-24")["spec"]["allocations"]
    assert sorted(v["id"] for v in left.values()) == [
        "new",
        "no-node",
        "other-net",
        "other-node",
        "valid",
        "wb",
    ]


def test_a_write_answers_the_pool_as_stored_decoded_again_only_when_the_schema_changed_it(
    kube: KubeHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KubernetesStore.write_pool returns the pool as the server stored it. With our CRD that is what
    was sent, and the answer is not decoded again; under a Whereabouts CRD that prunes `attrs`, the
    returned leases are the pruned ones (what the agent then remembers)."""
    from ipam.store import kubernetes as kstore
    from ipam.store.kubernetes import KubernetesStore

    decoded: list[int] = []
    real_parse = kstore.parse_allocations
    monkeypatch.setattr(
        kstore, "parse_allocations", lambda raw: (decoded.append(len(raw)), real_parse(raw))[1]
    )
    lease = Lease("c1", "ns/p1", "net1", node="node-a", token="t1")
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    try:
        made = store.write_pool(store.read_pool("p", "10.57.0.0/24"), {1: lease})
        assert made is not None and made.allocations == {1: lease} and made.allocations[1].token == "t1"
        assert decoded == []
        kube.api.use_crds(whereabouts_crds())
        second = Lease("c2", "ns/p2", "net1", node="node-a", token="t2")
        written = store.write_pool(made, {1: lease, 2: second})
    finally:
        store.close()
    assert written is not None and decoded == [2]
    assert written.allocations == {1: Lease("c1", "ns/p1", "net1"), 2: Lease("c2", "ns/p2", "net1")}
    assert written.allocations[2].token == "" and written.allocations[2].node == ""


def test_the_pool_a_write_answers_is_the_pool_read_back_after_it(k8s: K8s, tmp_path: Path) -> None:
    """The node agent remembers write_pool's answer and decides from it; when the server stored what was
    sent, that answer is the leases passed in, not decoded. They must be what a read decodes, in every
    field a decision looks at, also for a lease whose `attrs` repeats an extra (kept behind the first,
    POST) and that a call without a pod UID then confirms (PUT): the repeat must not come back as the
    lease's pod UID on the server while the agent remembers none."""
    from ipam.allocator import Request, allocate, parse_allocations
    from ipam.ranges import build_range
    from ipam.store.kubernetes import KubernetesStore

    raw = {"id": "c1", "podref": "ns/p1", "ifname": "net1", "attrs": "node=n1;poduid=u1;token=t1;poduid=u0"}
    store = KubernetesStore.connect(k8s.kubeconfig_path, str(tmp_path / "locks"))
    try:
        made = store.write_pool(store.read_pool("p", "10.58.0.0/24"), parse_allocations({"1": raw}))
        read = store.read_pool("p", "10.58.0.0/24")
        assert (
            made is not None and made.allocations == read.allocations and read.allocations[1].poduid == "u1"
        )
        confirm = Request("c2", "net1", "ns/p1", node="n1", token="t2")  # no K8S_POD_UID in CNI_ARGS
        decision = allocate(build_range("ipam", "10.58.0.0/24"), read.allocations, confirm)
        assert decision is not None and decision.changed
        written = store.write_pool(read, decision.allocations)
        again = store.read_pool("p", "10.58.0.0/24")
    finally:
        store.close()
    assert written is not None and written.version == again.version
    assert written.allocations == again.allocations == decision.allocations
    assert again.allocations[1].poduid == "" and again.allocations[1].token == "~t2"
