"""ipam-reconcile against the Kubernetes API test server: what it releases, what it keeps, races."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ipam.allocator import Request
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.reconcile import main as reconcile_main
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import KubeHandle

SPEC = build_range("ipam", "10.60.0.0/24")
POOL = "10.60.0.0-24"
NS = "kube-system"
OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def engine(kube: KubeHandle, tmp_path: Path) -> Iterator[Engine]:
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    yield Engine(store, RetryPolicy(deadline_seconds=30))
    store.close()


def add(
    engine: Engine, kube: KubeHandle, pod: str, uid: str = "", created: str = OLD, ifname: str = "net1"
) -> str:
    request = Request(f"ctr-{pod}", ifname, f"apps/{pod}", poduid=uid, node="node-a", created=created)
    return str(engine.add([SPEC], request)[0].address)


def leases(kube: KubeHandle) -> dict[str, str]:
    [pool] = [o for o in kube.api.objects("ippools", NS) if o["metadata"]["name"] == POOL]
    return {v["podref"]: k for k, v in pool["spec"]["allocations"].items()}


def reconcile(kube: KubeHandle, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = reconcile_main(["--kubeconfig", kube.kubeconfig_path, *args], out=out)
    return code, out.getvalue()


def status(ip: str) -> dict[str, str]:
    return {
        "k8s.v1.cni.cncf.io/network-status": f'[{{"name": "apps/public", "interface": "net1", "ips": ["{ip}"]}}]'
    }


def test_one_pass_releases_exactly_the_stale_leases(kube: KubeHandle, engine: Engine) -> None:
    api = kube.api
    api.put_pod("apps", "live", uid="u-live", created=OLD)
    api.put_pod("apps", "gone", uid="u-gone", created=OLD)
    api.put_pod("apps", "replaced", uid="u-old", created=OLD)
    api.put_pod("apps", "done", uid="u-done", phase="Succeeded", created=OLD)
    api.put_pod("apps", "crashed", uid="u-crashed", phase="Failed", created=OLD)
    api.put_pod("apps", "moved", uid="u-moved", created=OLD)
    api.put_pod("apps", "young", uid="u-young")  # created now: inside the grace period
    ips = {
        name: add(engine, kube, name, uid=f"u-{name}")
        for name in ("live", "gone", "done", "crashed", "moved", "young")
    }
    ips["replaced"] = add(engine, kube, "replaced", uid="u-old")
    api.put_pod("apps", "live", uid="u-live", created=OLD, annotations=status(ips["live"]))
    api.put_pod("apps", "moved", uid="u-moved", created=OLD, annotations=status("10.99.0.1"))
    api.put_pod("apps", "young", uid="u-young", annotations=status("10.99.0.2"))
    api.delete_pod("apps", "gone")
    api.put_pod("apps", "replaced", uid="u-new", created=OLD)  # same name, new pod
    code, out = reconcile(kube)
    assert code == 0, out
    assert set(leases(kube)) == {"apps/live", "apps/young"}
    released = {
        line.split("podref=")[1].split()[0]: line.split("reason=")[1]
        for line in out.splitlines()
        if line.startswith("release ")
    }
    assert released == {
        "apps/gone": "pod-gone",
        "apps/replaced": "pod-replaced",
        "apps/done": "pod-succeeded",
        "apps/crashed": "pod-failed",
        "apps/moved": "not-in-network-status",
    }
    assert (
        out.splitlines()[-1] == "summary pools=1 leases=7 kept=2 released=5 reservations_deleted=0 errors=0"
    )
    names = {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", NS)}
    assert names == {ips["live"], ips["young"]}  # released leases took their reservations along


def test_dry_run_changes_nothing(kube: KubeHandle, engine: Engine) -> None:
    add(engine, kube, "gone")
    before = kube.api.objects("ippools", NS)
    code, out = reconcile(kube, "--dry-run")
    assert code == 0
    assert "would-release pool=kube-system/10.60.0.0-24 address=10.60.0.1 podref=apps/gone" in out
    assert out.splitlines()[-1].startswith("summary pools=1 leases=1 kept=0 would_release=1")
    assert kube.api.objects("ippools", NS) == before
    assert kube.api.count("update", "ippools") == 0


def test_orphaned_reservations_go_fresh_ones_stay(kube: KubeHandle, engine: Engine) -> None:
    kube.api.put_pod("apps", "live", created=OLD)
    add(engine, kube, "live")
    store = engine.store
    from ipam.allocator import Lease

    store.reserve("10.60.0.77", Lease("crashed-ctr", "apps/crashed", "net1", created=OLD))
    store.reserve(
        "10.60.0.78", Lease("inflight-ctr", "apps/inflight", "net1")
    )  # no age but its creation: now
    code, out = reconcile(kube)
    assert code == 0, out
    names = {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", NS)}
    assert names == {"10.60.0.1", "10.60.0.78"}
    assert "delete reservation=10.60.0.77 podref=apps/crashed reason=orphaned" in out


def test_reconciler_racing_20_adds_loses_no_new_lease(kube: KubeHandle, tmp_path: Path) -> None:
    """Pods appear and ADD while reconciler passes run; stale leases go, no live one is taken."""
    setup = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "setup"))
    stale_engine = Engine(setup, RetryPolicy(deadline_seconds=30))
    for i in range(10):
        add(stale_engine, kube, f"stale{i}")  # pods that no longer exist
    errors: list[BaseException] = []
    stop = threading.Event()

    def adder(i: int) -> None:
        try:
            store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / f"node{i % 4}"))
            kube.api.put_pod("apps", f"new{i}", created=OLD)  # kubelet runs ADD only for existing pods
            add(Engine(store, RetryPolicy(deadline_seconds=60)), kube, f"new{i}")
            store.close()
        except BaseException as exc:
            errors.append(exc)

    def reconciler() -> None:
        while not stop.is_set():
            code, out = reconcile(kube)
            if code != 0:
                errors.append(AssertionError(out))

    loop = threading.Thread(target=reconciler)
    loop.start()
    adders = [threading.Thread(target=adder, args=(i,)) for i in range(20)]
    for t in adders:
        t.start()
        time.sleep(0.01)
    for t in adders:
        t.join()
    stop.set()
    loop.join()
    assert not errors, errors[0]
    code, out = reconcile(kube)
    assert code == 0, out
    assert set(leases(kube)) == {f"apps/new{i}" for i in range(20)}
    setup.close()


def test_unreachable_api_is_a_failed_pass(tmp_path: Path) -> None:
    from tests.kubeapi.server import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    out = io.StringIO()
    assert reconcile_main(["--kubeconfig", str(kubeconfig)], out=out) == 1
    assert out.getvalue().splitlines()[-1].endswith("errors=1")
