"""Adversarial review of issue 23 (requested, static and sticky addresses): each test here is a break
found by the review (branch break-sticky), named for what must hold."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipam.reconcile import KubeSource, Reconciler
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import ApiError, RealKube
from tests.test_requested import Node
from tests.test_sticky_real import cni, delete, leases, netconf, owned_pod


def reconcile_once(kube: RealKube, tmp_path: Path, source: Callable[[KubernetesStore], Any]) -> io.StringIO:
    """One `ipam-reconcile` pass under the reconciler's own identity, reading through `source(store)`;
    what it printed."""
    store = KubernetesStore.connect(kube.reconciler_kubeconfig(), str(tmp_path / "r"))
    try:
        out = io.StringIO()
        Reconciler(source(store), 0.0, False, out).run_once()
    finally:
        store.close()
    return out


# -- BREAK 1: sticky_seconds took a JSON bool (true -> 1 second) and a string ----------------------


@pytest.mark.parametrize("value", [True, "60"])
def test_sticky_seconds_of_the_wrong_type_is_refused_naming_it(tmp_path: Path, value: Any) -> None:
    """`"sticky_seconds": true` (meaning "on") was silently read as 1 second; `"60"` as 60."""
    node = Node(tmp_path, {"range": "10.0.0.0/28", "sticky_seconds": value})
    result = node.refused("c1", "a")
    assert result["code"] == 7 and "ipam.sticky_seconds" in result["msg"], result


# -- BREAK 2: a StatefulSet with spec.ordinals.start loses its pods' retained addresses -------------


def test_statefulset_with_a_start_ordinal_keeps_its_pods_addresses(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """`spec.ordinals.start: 5, replicas: 2` names its pods db-5 and db-6: the reconciler judged
    `ordinal >= replicas` and freed db-5's retained address while the StatefulSet still covers it."""
    kube, ns = real_kube, real_kube.namespace
    with contextlib.suppress(ApiError):
        kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
    body = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {
            "replicas": 2,
            "ordinals": {"start": 5},
            "serviceName": "db",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {
                "metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "c", "image": "x"}]},
            },
        },
    }
    [sts] = kube.apply(body)
    assert sts["spec"]["ordinals"]["start"] == 5
    conf = netconf(kube, tmp_path, sticky="statefulset")
    uid = owned_pod(kube, dict(sts), "db-5")
    assert cni(kube, conf, "ADD", "c-db5", "db-5", uid) == "10.61.0.1/24"
    cni(kube, conf, "DEL", "c-db5", "db-5", uid)
    delete(kube, f"/api/v1/namespaces/{ns}/pods/db-5")
    out = reconcile_once(kube, tmp_path, KubeSource)
    assert "1" in leases(kube), out.getvalue()
    uid_b = owned_pod(kube, dict(sts), "db-5")
    assert cni(kube, conf, "ADD", "c-db5-b", "db-5", uid_b) == "10.61.0.1/24"


# -- BREAK 3: under Whereabouts' own IPPool CRD (attrs pruned), a static address becomes the pod's own


def test_static_address_under_a_whereabouts_crd_is_not_taken_as_the_pods_range_address(
    kube: Any, tmp_path: Path
) -> None:
    """Whereabouts' CRD prunes `attrs`, so the static lease's `kind` is lost: the range's own allocation
    then finds it as the attachment's lease (`find_owner`) and gives the static address twice (no
    address of the range), and a repeated ADD is refused (104) naming the pod itself. The Python API
    server: the shared real API server cannot have its IPPool CRD swapped under the other tests."""
    from tests.cni_exec import cni_env, run
    from tests.kubeapi.schema import whereabouts_crds
    from tests.test_kubernetes_cni import netconf as kube_netconf

    kube.api.use_crds(whereabouts_crds())
    conf = kube_netconf(kube, tmp_path, {"range": "10.57.0.0/24", "addresses": [{"address": "10.57.0.9/24"}]})
    first = run(conf, cni_env("ADD", "p1"))
    assert first.code == 0, first.stdout
    assert [ip["address"] for ip in first.result["ips"]] == ["10.57.0.1/24", "10.57.0.9/24"]
    again = run(conf, cni_env("ADD", "p1"))  # a repeated ADD is idempotent
    assert again.code == 0, again.stdout
    assert again.result["ips"] == first.result["ips"]
    # README: no lease can be marked retained here; a sticky DEL leaves the pod's leases as they were
    sticky = kube_netconf(
        kube,
        tmp_path,
        {"range": "10.57.0.0/24", "addresses": [{"address": "10.57.0.9/24"}], "sticky_seconds": 600},
    )
    assert run(sticky, cni_env("DEL", "p1")).code == 0
    [pool] = [
        o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == "10.57.0.0-24"
    ]
    lease = {"id": "p1", "podref": "default/p1", "ifname": "net1"}
    assert pool["spec"]["allocations"] == {"1": lease, "9": lease}


# -- BREAK 4: a NAD's `addresses` list costs one pool write per entry (quadratic in its length) -----


def test_static_addresses_of_one_range_are_written_in_one_pool_write(tmp_path: Path) -> None:
    """`addresses` is written by tenants and unbounded: 400 entries in one range took 16 s of
    single-core time for one ADD (each a separate read-modify-write of the growing pool) and held the
    pool's node lock as many times; the range's statics are one batch, as the agent's are."""
    from ipam.allocator import Request
    from ipam.engine import Engine, Want
    from ipam.ranges import build_range
    from ipam.store.file import FileStore

    store = FileStore(str(tmp_path / "data"))
    writes: list[int] = []
    original = store.write_pool

    def counting(snapshot: Any, allocations: Any) -> Any:
        writes.append(len(allocations))
        return original(snapshot, allocations)

    store.write_pool = counting  # type: ignore[method-assign]
    spec = build_range("ipam", "10.0.0.0/24")
    wants = [Want(spec, offset, "static") for offset in range(100, 140)]
    [own] = Engine(store).add([spec], Request("c1", "net1", "ns/a"), wants)
    assert str(own.address) == "10.0.0.1"
    assert len(writes) <= 2, writes  # the statics, then the range's own address
    assert writes[-1] == 41


# -- held: concurrent requests for one address on the real API server -------------------------------


def test_concurrent_requests_for_one_address_through_two_overlapping_pools_give_it_once(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """Six pods on three simulated nodes ask at once for 10.61.0.40, through two NADs whose ranges
    (two pools) both hold it: one gets it, the others are refused (104)
    naming the holder, and one lease and one reservation hold it."""
    from tests.cni_exec import cni_env, finish, start

    kube = real_kube
    wide = netconf(kube, tmp_path, sticky_seconds=600)
    narrow = netconf(kube, tmp_path, range="10.61.0.32/27", sticky_seconds=600)
    procs = []
    for i in range(6):
        conf = dict(wide if i % 2 else narrow)
        conf["ipam"] = {**conf["ipam"], "data_dir": str(tmp_path / f"node-{i % 3}")}
        conf["runtimeConfig"] = {"ips": ["10.61.0.40/24"]}
        procs.append(start(conf, cni_env("ADD", f"c{i}", pod=f"p{i}", namespace=kube.namespace)))
    calls = [finish(p, timeout=300) for p in procs]
    won = [c for c in calls if c.code == 0]
    assert len(won) == 1, [c.stdout for c in calls]
    assert won[0].result["ips"][0]["address"].startswith("10.61.0.40/")
    lost = [c.result for c in calls if c.code != 0]
    assert all(r["code"] == 104 and "10.61.0.40" in r["msg"] for r in lost), lost
    holders = [
        (o["metadata"]["name"], k)
        for o in kube.api.objects("ippools", kube.namespace)
        for k, v in (o["spec"].get("allocations") or {}).items()
        if int(k) + (32 if o["metadata"]["name"].startswith("10.61.0.32") else 0) == 40
    ]
    assert len(holders) == 1, holders
    names = {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }
    assert "10.61.0.40" in names


# -- held: the reconciler's release racing the ADD that takes a retained lease back -----------------


def test_reconcile_release_racing_a_take_back_leaves_the_new_pods_lease(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The reconciler reads the pools (db-0's lease retained) and the pods (none), then, before it
    writes, db-0 is re-created and its ADD takes the lease back; the StatefulSet it then reads is gone,
    so it judges the lease released. Its conditional write must leave the live lease and its
    reservation alone; a late repeated DEL of the old container must too."""
    kube, ns = real_kube, real_kube.namespace
    with contextlib.suppress(ApiError):
        kube.request("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
    from tests.test_sticky_real import statefulset

    conf = netconf(kube, tmp_path, sticky="statefulset")
    sts = statefulset(kube, "db", replicas=1)
    uid = owned_pod(kube, sts, "db-0")
    assert cni(kube, conf, "ADD", "c-old", "db-0", uid) == "10.61.0.1/24"
    cni(kube, conf, "DEL", "c-old", "db-0", uid)
    delete(kube, f"/api/v1/namespaces/{ns}/pods/db-0")
    assert leases(kube)["1"].retained

    class Racing(KubeSource):
        def statefulsets(self) -> dict[str, range]:
            uid_b = owned_pod(kube, sts, "db-0")
            assert cni(kube, conf, "ADD", "c-new", "db-0", uid_b) == "10.61.0.1/24"
            return {}  # as if the StatefulSet were gone by now

    out = reconcile_once(kube, tmp_path, Racing)
    assert "statefulset-gone" in out.getvalue()  # judged released on what it had read
    held = leases(kube)["1"]
    assert held.id == "c-new" and not held.retained, out.getvalue()
    reservations = {o["metadata"]["name"]: o for o in kube.api.objects("overlappingrangeipreservations", ns)}
    assert reservations["10.61.0.1"]["spec"]["containerid"] == "c-new"
    cni(kube, conf, "DEL", "c-old", "db-0", uid)  # the old sandbox's DEL, repeated late
    assert leases(kube)["1"].id == "c-new"
    assert "10.61.0.1" in {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", ns)
    }


# -- held: one agent batch with the old sandbox's sticky DEL, the new sandbox's ADD and a thief -----


def test_agent_batch_with_sticky_del_take_back_and_a_request_for_that_address(
    k8s: Any, tmp_path: Path
) -> None:
    """db-0's old sandbox DEL (sticky), its new sandbox's ADD, other pods requesting db-0's address and
    plain ADDs, all at once through one agent, in whatever order its batches take them: db-0's new
    sandbox has the address, nobody else does, one lease holds it."""
    import json
    import threading

    from ipam.agent import Agent
    from tests.cni_exec import cni_env
    from tests.kubeapi.fixtures import KubeHandle
    from tests.test_agent import call, kube_conf

    if isinstance(k8s, KubeHandle):
        k8s.api.set_faults(latency=0.02)
    conf = kube_conf(k8s, tmp_path, "10.74.0.0/24")
    conf["ipam"]["sticky_seconds"] = 60
    agent = Agent()
    try:
        assert call(agent, conf, cni_env("ADD", "old", pod="db-0"))["ips"][0]["address"] == "10.74.0.1/24"
        wanted = {**conf, "runtimeConfig": {"ips": ["10.74.0.1/24"]}}
        jobs = [("DEL", "old", "db-0", conf), ("ADD", "new", "db-0", conf)]
        jobs += [("ADD", f"t{i}", f"thief{i}", wanted) for i in range(3)]
        jobs += [("ADD", f"p{i}", f"plain{i}", conf) for i in range(3)]
        replies: dict[str, dict[str, Any]] = {}

        def one(command: str, ctr: str, pod: str, doc: dict[str, Any]) -> None:
            replies[ctr] = agent.serve_call({"env": cni_env(command, ctr, pod=pod), "stdin": json.dumps(doc)})

        threads = [threading.Thread(target=one, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert replies["old"]["code"] == 0 and replies["new"]["code"] == 0, replies
        assert json.loads(replies["new"]["stdout"])["ips"][0]["address"] == "10.74.0.1/24"
        for i in range(3):
            refused = json.loads(replies[f"t{i}"]["stdout"])
            assert refused["code"] == 104 and "default/db-0" in refused["msg"], refused
            assert "10.74.0.1/24" not in replies[f"p{i}"]["stdout"]
    finally:
        agent.close()
    [pool] = k8s.api.objects("ippools", k8s.namespace)
    holders = {k: v for k, v in pool["spec"]["allocations"].items() if k == "1"}
    assert holders["1"]["id"] == "new" and "retained" not in holders["1"].get("attrs", "")


# -- held: `ipamctl release` of a retained lease racing its take-back -------------------------------


def test_ipamctl_release_of_a_retained_lease_racing_its_take_back(
    real_kube: RealKube, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ipamctl reads the pools (web's lease retained: no live holder, no --force needed), then web is
    re-created and its ADD takes the lease back before ipamctl writes: the release must skip it."""
    from ipam import ctl

    kube = real_kube
    conf = netconf(kube, tmp_path, sticky_seconds=600)
    assert cni(kube, conf, "ADD", "c-old", "web", "") == "10.61.0.1/24"
    cni(kube, conf, "DEL", "c-old", "web", "")
    assert leases(kube)["1"].retained

    class Racing(KubeSource):
        def pods(self) -> Any:
            assert cni(kube, conf, "ADD", "c-new", "web", "") == "10.61.0.1/24"
            return super().pods()

    monkeypatch.setattr(
        ctl,
        "open_source",
        lambda args: Racing(KubernetesStore.connect(kube.reconciler_kubeconfig(), str(tmp_path / "c"))),
    )
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(["release", "10.61.0.1"], out, err)
    assert code != 0 and "changed since it was read" in out.getvalue(), (out.getvalue(), err.getvalue())
    held = leases(kube)["1"]
    assert held.id == "c-new" and not held.retained
    names = {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }
    assert "10.61.0.1" in names


# -- BREAK 5: the reconciler re-creates a missing reservation for a stale holder ---------------------


def test_reservation_repair_racing_a_take_back_keeps_the_new_holder(tmp_path: Path) -> None:
    """db-0's reservation is missing (a crash between its pool write and its reservation) and its
    lease is retained. The reconciler reads the pools, db-0 is re-created and its ADD takes the lease
    back (and reserves it for its new sandbox), then the reconciler re-creates the reservation from
    what it read: for the OLD sandbox (`reserve` lets the same pod name take a reservation over). A
    late repeated DEL of the old sandbox then deletes the reservation of the new one's address, and a
    pod of another NAD whose range overlaps is given that address too: two live pods, one address."""
    from ipam.reconcile import FileSource
    from ipam.store.file import FileStore

    node = Node(tmp_path, {"range": "10.0.0.0/28", "sticky_seconds": 600})
    assert node.add("c-keep", "keep")["ips"][0]["address"] == "10.0.0.1/28"
    assert node.add("c-old", "db-0")["ips"][0]["address"] == "10.0.0.2/28"
    [reservation] = [p for p in (tmp_path / "data").rglob("10.0.0.2.json")]
    reservation.unlink()  # the crash between the pool write and the reservation
    assert node.call("DEL", "c-old", "db-0")[0] == 0
    assert node.leases("10.0.0.0-28")["2"].retained

    class Racing(FileSource):
        def pods(self) -> None:
            assert node.add("c-new", "db-0")["ips"][0]["address"] == "10.0.0.2/28"  # taken back
            return super().pods()

    out = io.StringIO()
    Reconciler(Racing(FileStore(str(tmp_path / "data"))), 0.0, False, out).run_once()
    assert node.leases("10.0.0.0-28")["2"].id == "c-new"
    assert node.call("DEL", "c-old", "db-0")[0] == 0  # the old sandbox's DEL, repeated late
    assert reservation.exists(), out.getvalue()
    narrow = Node(tmp_path, {"range": "10.0.0.0/29"})  # another NAD, an overlapping range: another pool
    got = narrow.call("ADD", "c-other", "other")[1]
    assert got is not None and "10.0.0.2/" not in str(got.get("ips")), got


def test_reservation_repair_racing_a_take_back_on_the_real_api_server(
    real_kube: RealKube, tmp_path: Path
) -> None:
    """The same race on the real API server holds: the reconciler's RBAC has no `update` on
    reservations, so it cannot take the new sandbox's reservation over (its pass reports that as an
    error), and the reservation names the new sandbox."""
    kube, ns = real_kube, real_kube.namespace
    conf = netconf(kube, tmp_path, sticky_seconds=600)
    assert cni(kube, conf, "ADD", "c-keep", "keep", "") == "10.61.0.1/24"
    assert cni(kube, conf, "ADD", "c-old", "db-0", "") == "10.61.0.2/24"
    delete(
        kube,
        f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{ns}/overlappingrangeipreservations/10.61.0.2",
    )
    cni(kube, conf, "DEL", "c-old", "db-0", "")
    assert leases(kube)["2"].retained

    class Racing(KubeSource):
        def pods(self) -> Any:
            pods = super().pods()  # listed before db-0's new pod exists
            assert cni(kube, conf, "ADD", "c-new", "db-0", "") == "10.61.0.2/24"
            return pods

    out = reconcile_once(kube, tmp_path, Racing)
    assert leases(kube)["2"].id == "c-new", out.getvalue()
    reservations = {o["metadata"]["name"]: o for o in kube.api.objects("overlappingrangeipreservations", ns)}
    assert reservations["10.61.0.2"]["spec"]["containerid"] == "c-new"


# -- held: CNI GC never frees a retained lease ------------------------------------------------------


def test_cni_gc_keeps_retained_leases_and_frees_the_rest(real_kube: RealKube, tmp_path: Path) -> None:
    from tests.cni_exec import cni_env, run

    kube = real_kube
    conf = {**netconf(kube, tmp_path, sticky="statefulset"), "cniVersion": "1.1.0"}
    assert cni(kube, conf, "ADD", "c-db", "db-0", "") == "10.61.0.1/24"
    assert cni(kube, conf, "ADD", "c-web", "web", "") == "10.61.0.2/24"
    cni(kube, conf, "DEL", "c-db", "db-0", "")
    gc = run({**conf, "cni.dev/valid-attachments": []}, cni_env("GC", "unused"))
    assert gc.code == 0, gc.stdout + gc.stderr[-2000:]
    held = leases(kube)
    assert set(held) == {"1"} and held["1"].retained and held["1"].podref.endswith("/db-0")
