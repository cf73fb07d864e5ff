"""ipam-reconcile on the API test server and the real kube-apiserver: what it releases, what it keeps,
races. On the real server the reconciler runs as its own ServiceAccount (deploy/rbac.yaml).

The real server stamps every pod's creationTimestamp itself (now), so passes run with `--grace 0` and a
lease "inside the grace period" is one whose recorded creation is later than the pass (FUTURE)."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Request
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.reconcile import main as reconcile_main
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import K8s, KubeHandle

SPEC = build_range("ipam", "10.60.0.0/24")
POOL = "10.60.0.0-24"
OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
FUTURE = (datetime.now(UTC) + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def engine(k8s: K8s, tmp_path: Path) -> Iterator[Engine]:
    store = KubernetesStore.connect(k8s.plugin_kubeconfig(), str(tmp_path / "locks"))
    yield Engine(store, RetryPolicy(deadline_seconds=30))
    store.close()


def add(engine: Engine, kube: K8s, pod: str, uid: str = "", created: str = OLD, ifname: str = "net1") -> str:
    """ADD for pod `pod` in the test's namespace (pods live next to the pools on both servers)."""
    request = Request(
        f"ctr-{pod}", ifname, f"{kube.namespace}/{pod}", poduid=uid, node="node-a", created=created
    )
    return str(engine.add([SPEC], request)[0].address)


def leases(kube: K8s) -> dict[str, str]:
    """{pod name: offset} of the pool's leases."""
    [pool] = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == POOL]
    return {v["podref"].split("/", 1)[1]: k for k, v in pool["spec"]["allocations"].items()}


def reconcile(kube: K8s, *args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = reconcile_main(["--kubeconfig", kube.reconciler_kubeconfig(), "--grace", "0", *args], out=out)
    return code, out.getvalue()


def reservations(kube: K8s) -> set[str]:
    return {o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)}


def status(ip: str) -> dict[str, str]:
    return {
        "k8s.v1.cni.cncf.io/network-status": f'[{{"name": "apps/public", "interface": "net1", "ips": ["{ip}"]}}]'
    }


def uid(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["uid"])


def test_one_pass_releases_exactly_the_stale_leases(k8s: K8s, engine: Engine) -> None:
    api, ns = k8s.api, k8s.namespace
    pods = {name: api.put_pod(ns, name) for name in ("live", "gone", "replaced", "moved", "young")}
    pods["done"] = api.put_pod(ns, "done", phase="Succeeded")
    pods["crashed"] = api.put_pod(ns, "crashed", phase="Failed")
    ips = {
        name: add(engine, k8s, name, uid=uid(pods[name]))
        for name in ("live", "gone", "done", "crashed", "moved")
    }
    ips["young"] = add(
        engine, k8s, "young", uid=uid(pods["young"]), created=FUTURE
    )  # inside the grace period
    ips["replaced"] = add(engine, k8s, "replaced", uid=uid(pods["replaced"]))
    api.put_pod(ns, "live", annotations=status(ips["live"]))
    api.put_pod(ns, "moved", annotations=status("10.99.0.1"))
    api.put_pod(ns, "young", annotations=status("10.99.0.2"))
    api.delete_pod(ns, "gone")
    api.delete_pod(ns, "replaced")
    assert uid(api.put_pod(ns, "replaced")) != uid(pods["replaced"])  # same name, new pod
    code, out = reconcile(k8s)
    assert code == 0, out
    assert set(leases(k8s)) == {"live", "young"}
    released = {
        line.split("podref=")[1].split()[0]: line.split("reason=")[1]
        for line in out.splitlines()
        if line.startswith("release ")
    }
    assert released == {
        f"{ns}/gone": "pod-gone",
        f"{ns}/replaced": "pod-replaced",
        f"{ns}/done": "pod-succeeded",
        f"{ns}/crashed": "pod-failed",
        f"{ns}/moved": "not-in-network-status",
    }
    assert (
        out.splitlines()[-1] == "summary pools=1 leases=7 kept=2 released=5 reservations_deleted=0 errors=0"
    )
    assert reservations(k8s) == {ips["live"], ips["young"]}  # released leases took their reservations along


def test_dry_run_changes_nothing(k8s: K8s, engine: Engine) -> None:
    add(engine, k8s, "gone")
    before = k8s.api.objects("ippools", k8s.namespace)
    code, out = reconcile(k8s, "--dry-run")
    assert code == 0
    assert (
        f"would-release pool={k8s.namespace}/10.60.0.0-24 address=10.60.0.1 podref={k8s.namespace}/gone"
        in out
    )
    assert out.splitlines()[-1].startswith("summary pools=1 leases=1 kept=0 would_release=1")
    assert k8s.api.objects("ippools", k8s.namespace) == before  # same resourceVersion: never written
    if isinstance(k8s, KubeHandle):
        assert k8s.api.count("update", "ippools") == 0


def test_orphaned_reservations_go_fresh_ones_stay(k8s: K8s, engine: Engine) -> None:
    k8s.api.put_pod(k8s.namespace, "live")
    add(engine, k8s, "live")
    store = engine.store
    from ipam.allocator import Lease

    store.reserve("10.60.0.77", Lease("crashed-ctr", f"{k8s.namespace}/crashed", "net1", created=OLD))
    store.reserve("10.60.0.78", Lease("inflight-ctr", f"{k8s.namespace}/inflight", "net1", created=FUTURE))
    code, out = reconcile(k8s)
    assert code == 0, out
    assert reservations(k8s) == {"10.60.0.1", "10.60.0.78"}
    assert f"delete reservation=10.60.0.77 podref={k8s.namespace}/crashed reason=orphaned" in out


def test_reconciler_racing_20_adds_loses_no_new_lease(k8s: K8s, tmp_path: Path) -> None:
    """Pods appear and ADD while reconciler passes run; stale leases go, no live one is taken."""
    setup = KubernetesStore.connect(k8s.plugin_kubeconfig(), str(tmp_path / "setup"))
    stale_engine = Engine(setup, RetryPolicy(deadline_seconds=30))
    for i in range(10):
        add(stale_engine, k8s, f"stale{i}")  # pods that no longer exist
    errors: list[BaseException] = []
    stop = threading.Event()

    def adder(i: int) -> None:
        try:
            store = KubernetesStore.connect(k8s.plugin_kubeconfig(), str(tmp_path / f"node{i % 4}"))
            k8s.api.put_pod(k8s.namespace, f"new{i}")  # kubelet runs ADD only for existing pods
            add(Engine(store, RetryPolicy(deadline_seconds=60)), k8s, f"new{i}")
            store.close()
        except BaseException as exc:
            errors.append(exc)

    def reconciler() -> None:
        while not stop.is_set():
            code, out = reconcile(k8s)
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
    code, out = reconcile(k8s)
    assert code == 0, out
    assert set(leases(k8s)) == {f"new{i}" for i in range(20)}
    setup.close()


def test_unreachable_api_is_a_failed_pass(tmp_path: Path) -> None:
    from tests.kubeapi.server import write_kubeconfig

    kubeconfig = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9")
    out = io.StringIO()
    assert reconcile_main(["--kubeconfig", str(kubeconfig)], out=out) == 1
    assert out.getvalue().splitlines()[-1].endswith("errors=1")


def test_writer_turns_standing_a_minute_are_removed_and_fresh_ones_kept(k8s: K8s, tmp_path: Path) -> None:
    """A writer turn (ipam.turns) is held for one write; one standing for ABANDONED_TURN_SECONDS was
    left by an agent that died. The pass removes it (dry-run only says so), and only that very
    object: a turn taken again since the listing is another writer's."""
    from ipam.reconcile import ABANDONED_TURN_SECONDS, KubeSource, Reconciler

    plugin = KubernetesStore.connect(k8s.plugin_kubeconfig(), str(tmp_path / "locks"))
    reconciler = KubernetesStore.connect(k8s.reconciler_kubeconfig(), str(tmp_path / "r"))
    try:
        dead = plugin.take_turn("dead-pool", "node-a/123", 5)
        replaced = plugin.take_turn("busy-pool", "node-b/7", 5)
        assert dead is not None and replaced is not None

        def run(seconds_later: float, dry_run: bool = False, source: Any = None) -> str:
            out = io.StringIO()
            now = datetime.now(UTC) + timedelta(seconds=seconds_later)
            Reconciler(source or KubeSource(reconciler), 0.0, dry_run, out).run_once(now=now)
            return out.getvalue()

        assert "turn=" not in run(0)  # fresh: kept
        dry = run(ABANDONED_TURN_SECONDS + 60, dry_run=True)
        assert f"would-remove turn={dead.name} holder=node-a/123" in dry
        assert len(reconciler.list_turns()) == 2

        class Racing(KubeSource):  # busy-pool's turn is handed on and taken again after the listing
            def turns(self) -> list[Any]:
                listed = super().turns()
                assert replaced is not None
                plugin.end_turn(replaced)
                assert plugin.take_turn("busy-pool", "node-c/9", 5) is not None
                return listed

        out = run(ABANDONED_TURN_SECONDS + 60, source=Racing(reconciler))
        assert f"remove turn={dead.name} holder=node-a/123" in out and "reason=abandoned" in out
        left = reconciler.list_turns()
        assert [(t.turn.name, t.holder) for t in left] == [(replaced.name, "node-c/9")]
    finally:
        plugin.close()
        reconciler.close()
