"""ipamctl on the real kube-apiserver: plant each problem, check finds exactly those, repair fixes the
safe ones, release refuses a live holder; and the repair pass racing ADDs and DELs through hooks."""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ipam.allocator import Allocations, Lease, Request
from ipam.ctl import main as ctl_main
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.reconcile import KubeSource, Reconciler
from ipam.store.base import PoolSnapshot
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import RealKube

GROUP = "whereabouts.cni.cncf.io/v1alpha1"
OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


def ctl(kube: RealKube, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(["--kubeconfig", kube.kubeconfig_path, *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def ctl_json(kube: RealKube, *args: str) -> tuple[int, Any]:
    code, out, err = ctl(kube, "-o", "json", *args)
    assert out, err
    return code, json.loads(out)


def entry(ctr: str, podref: str, uid: str = "", node: str = "node-a", created: str = OLD) -> dict[str, Any]:
    """A lease as the plugin writes it (extras packed in `attrs`)."""
    return Lease(ctr, podref, "net1", node=node, poduid=uid, created=created).to_json()


def ippool(name: str, cidr: str, leases: dict[int, dict[str, str]]) -> dict[str, Any]:
    allocations = {str(k): v for k, v in leases.items()}
    return {
        "apiVersion": GROUP,
        "kind": "IPPool",
        "metadata": {"name": name},
        "spec": {"range": cidr, "allocations": allocations},
    }


def reservation(name: str, ctr: str, podref: str, created: str = OLD) -> dict[str, Any]:
    spec = {"containerid": ctr, "podref": podref, "ifname": "net1", "created": created}
    return {
        "apiVersion": GROUP,
        "kind": "OverlappingRangeIPReservation",
        "metadata": {"name": name},
        "spec": spec,
    }


def leases(kube: RealKube, pool: str) -> dict[str, str]:
    [obj] = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == pool]
    return {k: v["podref"] for k, v in (obj["spec"].get("allocations") or {}).items()}


def reservations(kube: RealKube) -> set[str]:
    return {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)}


def test_check_finds_each_planted_problem_and_repair_fixes_them(real_kube: RealKube) -> None:
    kube, ns = real_kube, real_kube.namespace
    gone_node, live_node = f"gone-{uuid.uuid4().hex[:6]}", f"live-{uuid.uuid4().hex[:6]}"
    kube.apply({"apiVersion": "v1", "kind": "Node", "metadata": {"name": live_node}})
    web = kube.api.put_pod(ns, "web")["metadata"]["uid"]
    kube.api.put_pod(ns, "repl")  # recreated: the lease recorded the old pod's uid
    kube.api.put_pod(ns, "web2")
    kube.api.put_pod(ns, "web3")
    kube.apply(
        [
            ippool(
                "10.70.0.0-24",
                "10.70.0.0/24",
                {
                    1: entry("c-web", f"{ns}/web", uid=web),
                    2: entry("c-gone", f"{ns}/gone"),
                    3: entry("c-repl", f"{ns}/repl", uid="uid-of-the-old-pod"),
                    4: entry("c-web2", f"{ns}/web2"),  # its reservation was never made (crash window)
                },
            ),
            reservation("10.70.0.1", "c-web", f"{ns}/web"),
            reservation("10.70.0.2", "c-gone", f"{ns}/gone"),
            reservation("10.70.0.3", "c-repl", f"{ns}/repl"),
            reservation("10.70.0.77", "c-crashed", f"{ns}/crashed"),  # no lease backs it
            {
                "apiVersion": GROUP,
                "kind": "NodeSlicePool",
                "metadata": {"name": "storage"},
                "spec": {"range": "10.71.0.0/24", "sliceSize": "/28"},
                "status": {
                    "allocations": [
                        {"nodeName": gone_node, "sliceRange": "10.71.0.0/28"},
                        {"nodeName": live_node, "sliceRange": "10.71.0.16/28"},
                        {"nodeName": "", "sliceRange": "10.71.0.32/28"},
                        {"nodeName": gone_node, "sliceRange": "10.71.0.48/28"},  # it never made its pool
                    ]
                },
            },
            ippool(
                f"storage-{gone_node}-10.71.0.0-28",
                "10.71.0.0/28",
                {1: entry("c-x", f"{ns}/x", node=gone_node)},
            ),
            reservation("storage-10.71.0.1", "c-x", f"{ns}/x"),
            ippool(
                f"storage-{live_node}-10.71.0.16-28",
                "10.71.0.16/28",
                {1: entry("c-web3", f"{ns}/web3", node=live_node)},
            ),
            reservation("storage-10.71.0.17", "c-web3", f"{ns}/web3"),
        ]
    )
    code, doc = ctl_json(kube, "check")
    assert code == 1
    found = sorted((p["kind"], p["pool"], p["address"], p["podref"], p["detail"]) for p in doc["problems"])
    assert found == sorted(
        [
            ("leaked", "10.70.0.0-24", "10.70.0.2", f"{ns}/gone", "pod-gone"),
            ("leaked", "10.70.0.0-24", "10.70.0.3", f"{ns}/repl", "pod-replaced"),
            ("leaked", f"storage-{gone_node}-10.71.0.0-28", "10.71.0.1", f"{ns}/x", "pod-gone"),
            ("orphan-reservation", "", "10.70.0.77", f"{ns}/crashed", "reservation 10.70.0.77 has no lease"),
            ("missing-reservation", "10.70.0.0-24", "10.70.0.4", f"{ns}/web2", "no reservation 10.70.0.4"),
            ("slice-of-gone-node", "storage", "10.71.0.0/28", "", f"node {gone_node} no longer exists"),
            ("slice-of-gone-node", "storage", "10.71.0.48/28", "", f"node {gone_node} no longer exists"),
        ]
    )
    assert doc["summary"] == {
        "leaked": 3,
        "orphan-reservation": 1,
        "missing-reservation": 1,
        "slice-of-gone-node": 2,
    }

    before = kube.api.objects("ippools", ns)
    code, out, _ = ctl(kube, "repair", "--dry-run")
    assert code == 0, out
    assert kube.api.objects("ippools", ns) == before
    # the slice whose pool still holds the leaked lease is not returned while that lease is there
    assert [line for line in out.splitlines() if "would-return" in line] == [
        f"would-return nodeslicepool=storage slice=10.71.0.48/28 node={gone_node} reason=node-gone"
    ]

    code, out, err = ctl(kube, "repair", "--grace", "0")  # the leases are old; a pool emptied now is idle
    assert code == 0, out + err
    lines = out.splitlines()
    assert (
        f"release pool={ns}/10.70.0.0-24 address=10.70.0.2 podref={ns}/gone container=c-gone reason=pod-gone"
        in lines
    )
    assert f"delete reservation=10.70.0.77 podref={ns}/crashed reason=orphaned" in lines
    assert (
        f"create reservation=10.70.0.4 pool={ns}/10.70.0.0-24 address=10.70.0.4 podref={ns}/web2 reason=missing"
        in lines
    )
    assert f"return nodeslicepool=storage slice=10.71.0.0/28 node={gone_node} reason=node-gone" in lines
    assert f"return nodeslicepool=storage slice=10.71.0.48/28 node={gone_node} reason=node-gone" in lines
    assert lines[-1] == "summary pools=3 leases=6 kept=3 released=3 reservations_deleted=1 errors=0"

    assert leases(kube, "10.70.0.0-24") == {"1": f"{ns}/web", "4": f"{ns}/web2"}
    assert reservations(kube) == {"10.70.0.1", "10.70.0.4", "storage-10.71.0.17"}
    [nsp] = kube.api.objects("nodeslicepools", ns)
    assert [a["nodeName"] for a in nsp["status"]["allocations"]] == ["", live_node, "", ""]
    code, doc = ctl_json(kube, "check")
    assert (code, doc) == (0, {"problems": [], "summary": {}})


def test_duplicates_mismatches_and_out_of_range_are_reported_not_repaired(real_kube: RealKube) -> None:
    kube, ns = real_kube, real_kube.namespace
    for pod in ("a", "b", "c", "d"):
        kube.api.put_pod(ns, pod)
    kube.apply(
        [
            ippool("10.72.0.0-24", "10.72.0.0/24", {5: entry("c-a", f"{ns}/a"), 6: entry("c-c", f"{ns}/c")}),
            ippool(
                "10.72.0.0-25", "10.72.0.0/25", {5: entry("c-b", f"{ns}/b"), 130: entry("c-d", f"{ns}/d")}
            ),
            reservation("10.72.0.5", "c-a", f"{ns}/a"),
            reservation("10.72.0.6", "c-other", f"{ns}/other"),
        ]
    )
    code, doc = ctl_json(kube, "check")
    assert code == 1
    assert [(p["kind"], p["pool"], p["address"]) for p in doc["problems"]] == [
        ("duplicate", "10.72.0.0-24", "10.72.0.5"),
        ("duplicate", "10.72.0.0-25", "10.72.0.5"),
        ("reservation-mismatch", "10.72.0.0-24", "10.72.0.6"),
        ("reservation-mismatch", "10.72.0.0-25", "10.72.0.5"),
        ("out-of-range", "10.72.0.0-25", "10.72.0.130"),
    ]
    before = (kube.api.objects("ippools", ns), kube.api.objects("overlappingrangeipreservations", ns))
    code, out, _ = ctl(kube, "repair")
    assert code == 0
    assert out.count("report kind=") == 5
    assert (kube.api.objects("ippools", ns), kube.api.objects("overlappingrangeipreservations", ns)) == before


def test_show_lists_pools_and_who_holds_an_address(real_kube: RealKube) -> None:
    kube, ns = real_kube, real_kube.namespace
    kube.apply(
        [
            ippool(
                "public-10.73.0.0-29",
                "10.73.0.0/29",
                {1: entry("c-a", f"{ns}/a"), 2: entry("c-b", f"{ns}/b", node="node-b")},
            ),
            reservation("public-10.73.0.1", "c-a", f"{ns}/a"),
        ]
    )
    code, doc = ctl_json(kube, "show")
    assert code == 0
    assert doc == {
        "pools": [
            {
                "name": "public-10.73.0.0-29",
                "range": "10.73.0.0/29",
                "network": "public",
                "node": "",
                "used": 2,
                "free": 4,
                "leases": [
                    {
                        "address": "10.73.0.1",
                        "podref": f"{ns}/a",
                        "id": "c-a",
                        "ifname": "net1",
                        "node": "node-a",
                    },
                    {
                        "address": "10.73.0.2",
                        "podref": f"{ns}/b",
                        "id": "c-b",
                        "ifname": "net1",
                        "node": "node-b",
                    },
                ],
            }
        ]
    }
    code, out, _ = ctl(kube, "show")
    assert out.splitlines()[1].split() == [
        "public-10.73.0.0-29",
        "10.73.0.0/29",
        "public",
        "2",
        "4",
        "[###.......]",
        "33%",
        "node-a:1,node-b:1",
    ]
    code, doc = ctl_json(kube, "show", "--address", "10.73.0.1")
    assert code == 0
    assert [(e["pool"], e["podref"], e["reservation"]) for e in doc["leases"]] == [
        ("public-10.73.0.0-29", f"{ns}/a", "public-10.73.0.1")
    ]
    code, doc = ctl_json(kube, "show", "--pod", f"{ns}/b")
    assert (code, [e["address"] for e in doc["leases"]]) == (0, ["10.73.0.2"])
    code, out, _ = ctl(kube, "show", "--address", "10.73.0.5")
    assert code == 1 and "nothing holds 10.73.0.5" in out


def test_release_refuses_a_live_holder_and_works_with_force(real_kube: RealKube) -> None:
    kube, ns = real_kube, real_kube.namespace
    uid = kube.api.put_pod(ns, "db")["metadata"]["uid"]
    kube.apply(
        [
            ippool(
                "10.74.0.0-24",
                "10.74.0.0/24",
                {1: entry("c-db", f"{ns}/db", uid=uid), 2: entry("c-old", f"{ns}/old")},
            ),
            reservation("10.74.0.1", "c-db", f"{ns}/db"),
            reservation("10.74.0.2", "c-old", f"{ns}/old"),
        ]
    )
    code, out, err = ctl(kube, "release", "10.74.0.1")
    assert code == 1 and out == ""
    assert f"held by pod {ns}/db (uid {uid}), which still exists; pass --force" in err
    assert leases(kube, "10.74.0.0-24") == {"1": f"{ns}/db", "2": f"{ns}/old"}

    code, out, _ = ctl(kube, "release", "10.74.0.1", "--force", "--dry-run")
    assert (code, out) == (
        0,
        f"would-release pool={ns}/10.74.0.0-24 address=10.74.0.1 podref={ns}/db container=c-db\n",
    )
    assert "10.74.0.1" in reservations(kube)

    code, out, _ = ctl(kube, "release", "10.74.0.1", "--force")
    assert (code, out) == (
        0,
        f"release pool={ns}/10.74.0.0-24 address=10.74.0.1 podref={ns}/db container=c-db\n",
    )
    code, doc = ctl_json(kube, "release", "10.74.0.2")  # its pod is gone: no --force needed
    assert code == 0 and [e["address"] for e in doc["released"]] == ["10.74.0.2"]
    assert leases(kube, "10.74.0.0-24") == {}
    assert reservations(kube) == set()
    code, _, err = ctl(kube, "release", "10.74.0.1")
    assert code == 1 and "no lease holds 10.74.0.1" in err
    code, _, err = ctl(kube, "release", "10.74.0.0/24")
    assert code == 2 and "'10.74.0.0/24' is not an IP address" in err


class HookedStore(KubernetesStore):
    """Runs `before_write` / `before_reserve` once, just before the first such call goes out."""

    before_write: Any = None
    before_reserve: Any = None

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> None:
        hook, self.before_write = self.before_write, None
        if hook:
            hook()
        super().write_pool(snapshot, allocations)

    def remove_leases(self, name: str, leases: Mapping[int, Lease]) -> bool:
        """A release's write (the JSON patch testing each lease) is a write too."""
        hook, self.before_write = self.before_write, None
        if hook:
            hook()
        return super().remove_leases(name, leases)

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        hook, self.before_reserve = self.before_reserve, None
        if hook:
            hook()
        return super().reserve(name, lease, address)


def test_adds_between_repairs_read_and_write_keep_their_leases(real_kube: RealKube, tmp_path: Path) -> None:
    """Repair judges the pool, then 6 ADDs from other nodes land before its write (a patch that tests
    each judged lease): it removes only the leaked leases, and every ADD keeps its lease."""
    kube, ns = real_kube, real_kube.namespace
    spec = build_range("ipam", "10.75.0.0/24")
    kube.apply(
        ippool(
            "10.75.0.0-24",
            "10.75.0.0/24",
            {1: entry("c-gone", f"{ns}/gone"), 2: entry("c-gone2", f"{ns}/gone2")},
        )
    )
    errors: list[BaseException] = []

    def adds() -> None:
        def one(i: int) -> None:
            try:
                store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / f"node{i % 3}"))
                kube.api.put_pod(ns, f"new{i}")
                request = Request(f"c-new{i}", "net1", f"{ns}/new{i}", created=OLD)
                Engine(store, RetryPolicy(deadline_seconds=60)).add([spec], request)
                store.close()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    store = HookedStore.connect(kube.kubeconfig_path, str(tmp_path / "repair"))
    store.before_write = adds
    out = io.StringIO()
    summary = Reconciler(KubeSource(store), 300.0, False, out).run_once()
    store.close()
    assert not errors, errors
    assert summary.released == 2 and summary.errors == 0, out.getvalue()
    assert sorted(leases(kube, "10.75.0.0-24").values()) == sorted(f"{ns}/new{i}" for i in range(6))
    code, doc = ctl_json(kube, "check")
    assert (code, doc["problems"]) == (0, [])


def test_a_del_racing_the_recreated_reservation_leaves_no_orphan(real_kube: RealKube, tmp_path: Path) -> None:
    """Repair recreates a missing reservation; the pod's DEL ran in between (its pool write, then an
    unreserve that found nothing): repair sees the lease gone and takes the reservation back."""
    kube, ns = real_kube, real_kube.namespace
    kube.api.put_pod(ns, "web")
    kube.api.put_pod(ns, "keep")
    kube.apply(
        [
            ippool(
                "10.76.0.0-24",
                "10.76.0.0/24",
                {1: entry("c-web", f"{ns}/web"), 2: entry("c-keep", f"{ns}/keep")},
            ),
            reservation("10.76.0.2", "c-keep", f"{ns}/keep"),
        ]
    )
    spec = build_range("ipam", "10.76.0.0/24")
    deleter = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "node"))
    store = HookedStore.connect(kube.kubeconfig_path, str(tmp_path / "repair"))
    store.before_reserve = lambda: Engine(deleter, RetryPolicy(deadline_seconds=30)).release(
        [spec], "c-web", "net1"
    )
    out = io.StringIO()
    summary = Reconciler(KubeSource(store), 300.0, False, out).run_once()
    store.close()
    deleter.close()
    assert "skip reservation=10.76.0.1: its lease was released meanwhile" in out.getvalue()
    assert summary.errors == 0
    assert leases(kube, "10.76.0.0-24") == {"2": f"{ns}/keep"}
    assert reservations(kube) == {"10.76.0.2"}


def test_unreachable_or_unloadable_cluster_is_exit_2_with_the_reason(tmp_path: Path) -> None:
    from tests.kubeapi.server import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    out, err = io.StringIO(), io.StringIO()
    assert ctl_main(["--kubeconfig", str(kubeconfig), "check"], out=out, err=err) == 2
    assert out.getvalue() == ""
    assert err.getvalue().startswith("ipamctl: check failed: list reservations: ")
    assert "Traceback" not in err.getvalue()
    for command in (["show"], ["release", "10.1.1.1"], ["repair"]):
        err = io.StringIO()
        assert ctl_main(["--kubeconfig", str(kubeconfig), *command], out=io.StringIO(), err=err) == 2
        assert "list reservations: " in err.getvalue() and "Traceback" not in err.getvalue()
    bad = tmp_path / "not-yaml"
    bad.write_text("{{{")
    err = io.StringIO()
    assert ctl_main(["--kubeconfig", str(bad), "show"], out=io.StringIO(), err=err) == 2
    assert err.getvalue().startswith(f"ipamctl: cannot load kubeconfig {bad}: ")


def test_an_identity_without_node_slice_rbac_still_repairs_the_rest(real_kube: RealKube) -> None:
    """The reconciler's ServiceAccount before node slices: no NodeSlicePools, no nodes. Slices are not
    judged (a note says so); every other check and fix still runs, and nothing counts as an error."""
    kube, ns = real_kube, real_kube.namespace
    account = f"rec-{uuid.uuid4().hex[:6]}"
    rules = [
        {
            "apiGroups": ["whereabouts.cni.cncf.io"],
            "resources": ["ippools"],
            "verbs": ["get", "list", "update"],
        },
        {
            "apiGroups": ["whereabouts.cni.cncf.io"],
            "resources": ["overlappingrangeipreservations"],
            "verbs": ["get", "list", "create", "delete"],
        },
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    ]
    kube.apply(
        [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": account},
                "rules": rules,
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": account},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": account},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
            },
            ippool("10.77.0.0-24", "10.77.0.0/24", {1: entry("c-gone", f"{ns}/gone")}),
            reservation("10.77.0.1", "c-gone", f"{ns}/gone"),
        ]
    )
    kubeconfig = kube.token_kubeconfig(account, ns)
    out, err = io.StringIO(), io.StringIO()
    assert ctl_main(["--kubeconfig", kubeconfig, "repair"], out=out, err=err) == 0, (
        out.getvalue() + err.getvalue()
    )
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("note node slices not judged: list NodeSlicePools: ") and "403" in lines[0]
    assert lines[-1] == "summary pools=1 leases=1 kept=0 released=1 reservations_deleted=0 errors=0"
    assert reservations(kube) == set()


def test_ipam_reconcile_is_the_same_pass_as_ipamctl_repair(real_kube: RealKube) -> None:
    from ipam.reconcile import main as reconcile_main

    kube, ns = real_kube, real_kube.namespace
    kube.api.put_pod(ns, "web")
    kube.apply(
        [
            ippool(
                "10.78.0.0-24",
                "10.78.0.0/24",
                {1: entry("c-gone", f"{ns}/gone"), 2: entry("c-web", f"{ns}/web")},
            ),
            reservation("10.78.0.1", "c-gone", f"{ns}/gone"),
            reservation("10.78.0.5", "c-crashed", f"{ns}/crashed"),
        ]
    )
    out = io.StringIO()
    assert reconcile_main(["--kubeconfig", kube.kubeconfig_path, "--dry-run"], out=out) == 0
    code, ctl_out, _ = ctl(kube, "repair", "--dry-run")
    assert code == 0
    assert out.getvalue() == ctl_out
    assert ctl_out.splitlines() == [
        f"would-release pool={ns}/10.78.0.0-24 address=10.78.0.1 podref={ns}/gone container=c-gone reason=pod-gone",
        f"would-delete reservation=10.78.0.5 podref={ns}/crashed reason=orphaned",
        f"would-create reservation=10.78.0.2 pool={ns}/10.78.0.0-24 address=10.78.0.2 podref={ns}/web reason=missing",
        "summary pools=1 leases=2 kept=1 would_release=1 reservations_deleted=1 errors=0",
    ]
    code, doc = ctl_json(kube, "repair")
    assert code == 0
    assert [c["action"] for c in doc["changes"]] == ["release", "delete-reservation", "create-reservation"]
    assert doc["summary"]["released"] == 1 and doc["summary"]["reservations_created"] == 1
    assert reservations(kube) == {"10.78.0.2"}


def test_finished_pods_and_network_status_mismatches_are_leaked_too(real_kube: RealKube) -> None:
    kube, ns = real_kube, real_kube.namespace

    def status(ip: str) -> dict[str, str]:
        return {
            "k8s.v1.cni.cncf.io/network-status": json.dumps(
                [{"name": "public", "interface": "net1", "ips": [ip]}]
            )
        }

    kube.api.put_pod(ns, "done", phase="Succeeded")
    kube.api.put_pod(ns, "crashed", phase="Failed")
    kube.api.put_pod(ns, "moved", annotations=status("10.99.0.1"))
    kube.api.put_pod(ns, "live", annotations=status("10.79.0.4"))
    pods = ("done", "crashed", "moved", "live")
    kube.apply(
        [
            ippool(
                "10.79.0.0-24",
                "10.79.0.0/24",
                {i + 1: entry(f"c-{p}", f"{ns}/{p}") for i, p in enumerate(pods)},
            ),
            *[reservation(f"10.79.0.{i + 1}", f"c-{p}", f"{ns}/{p}") for i, p in enumerate(pods)],
        ]
    )
    code, doc = ctl_json(kube, "check", "--grace", "0")
    assert code == 1
    assert [(p["kind"], p["podref"], p["detail"]) for p in doc["problems"]] == [
        ("leaked", f"{ns}/done", "pod-succeeded"),
        ("leaked", f"{ns}/crashed", "pod-failed"),
        ("leaked", f"{ns}/moved", "not-in-network-status"),
    ]
    code, doc = ctl_json(kube, "check")  # the pods are seconds old: a network-status mismatch waits
    assert [p["podref"] for p in doc["problems"]] == [f"{ns}/done", f"{ns}/crashed"]
    code, _, _ = ctl(kube, "repair", "--grace", "0")
    assert code == 0
    assert leases(kube, "10.79.0.0-24") == {"4": f"{ns}/live"}
    assert reservations(kube) == {"10.79.0.4"}
