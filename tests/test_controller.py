"""ipam-controller on the real kube-apiserver, as its own ServiceAccount (deploy/base/rbac.yaml): a
deleted, replaced or finished pod's lease is freed within seconds, a live pod's never; pods on dead
nodes; Events; the metrics equal `ipamctl show`; only the leader writes."""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ipam.allocator import Request, parse_allocations
from ipam.controller.leader import Elector, configure_client
from ipam.controller.main import Controller
from ipam.ctl import main as ctl_main
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.store.kubeclient import ApiError as KubeApiError
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import ROOT, ApiError, RealKube, load_yaml

pytestmark = pytest.mark.apiserver

SPEC = build_range("ipam", "10.61.0.0/24")
POOL = "10.61.0.0-24"
RELEASE_BOUND = 5.0  # seconds: the bound for a deleted pod's lease
FAST = {"lease_seconds": 4, "renew_deadline": 3, "retry_period": 1}  # leader election, shortened


def wait_for(what: str, ok: Callable[[], bool], seconds: float = RELEASE_BOUND) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if ok():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {seconds}s: {what}")


@pytest.fixture
def engine(real_kube: RealKube, tmp_path: Path) -> Iterator[Engine]:
    store = KubernetesStore.connect(real_kube.plugin_kubeconfig(), str(tmp_path / "locks"))
    yield Engine(store, RetryPolicy(deadline_seconds=30))
    store.close()


def start_controller(
    kube: RealKube, tmp: Path, leading: Callable[[], bool] = lambda: True, **kwargs: Any
) -> Controller:
    store = KubernetesStore.connect(
        kube.identity_kubeconfig("controller"), str(tmp / f"c-{uuid.uuid4().hex[:6]}")
    )
    controller = Controller(store, leading, "test", **kwargs)
    controller.start()
    wait_for("the controller's caches are listed", controller.ready, 30)
    return controller


@contextlib.contextmanager
def running(kube: RealKube, tmp: Path, **kwargs: Any) -> Iterator[Controller]:
    controller = start_controller(kube, tmp, **kwargs)
    try:
        yield controller
    finally:
        controller.stop()
        controller.store.close()


def counted(controller: Controller, released: dict[str, int]) -> None:
    """The controller counts a release once its reservation is deleted too, just after the pool write."""
    wait_for(f"released {released}", lambda: dict(controller.reclaimer.released) == released, 5)
    time.sleep(0.2)
    assert dict(controller.reclaimer.released) == released


def add(engine: Engine, kube: RealKube, pod: dict[str, Any], spec: Any = SPEC) -> str:
    meta = pod["metadata"]
    request = Request(
        f"ctr-{meta['name']}-{meta['uid'][:6]}",
        "net1",
        f"{kube.namespace}/{meta['name']}",
        poduid=meta["uid"],
        node="node-a",
    )
    return str(engine.add([spec], request)[0].address)


def holders(kube: RealKube, pool: str = POOL) -> dict[str, str]:
    """{podref name: poduid} of the pool's leases."""
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == pool]
    allocations = parse_allocations(found[0]["spec"]["allocations"] if found else {})
    return {v.podref.split("/", 1)[1]: v.poduid for v in allocations.values()}


def reservations(kube: RealKube) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }


def events(kube: RealKube, namespace: str | None = None) -> list[dict[str, Any]]:
    ns = namespace or kube.namespace
    items: list[dict[str, Any]] = kube.request("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events")[
        "items"
    ]
    return items


def test_deleted_replaced_and_finished_pods_lose_their_leases_in_seconds_live_ones_keep_them(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns = real_kube.api, real_kube.namespace
    pods = {name: api.put_pod(ns, name) for name in ("live", "deleted", "replaced", "finished")}
    for pod in pods.values():
        add(engine, real_kube, pod)
    api.delete_pod(ns, "replaced")  # replaced while no controller ran: its first sweep finds it
    wait_for(
        "the old pod is gone",
        lambda: "replaced" not in {p["metadata"]["name"] for p in api.objects("pods", ns)},
    )
    new = api.put_pod(ns, "replaced")
    with running(real_kube, tmp_path) as controller:
        wait_for("the replaced pod's old lease is freed", lambda: "replaced" not in holders(real_kube))
        add(engine, real_kube, new)
        time.sleep(1)  # the first sweep has looked at every lease: the others' pods live
        assert set(holders(real_kube)) == set(pods)

        api.delete_pod(ns, "deleted")
        wait_for("the deleted pod's lease is freed", lambda: "deleted" not in holders(real_kube))

        api.put_pod(ns, "finished", phase="Succeeded")
        wait_for("the finished pod's lease is freed", lambda: "finished" not in holders(real_kube))

        time.sleep(1)
        assert holders(real_kube) == {
            "live": pods["live"]["metadata"]["uid"],
            "replaced": new["metadata"]["uid"],
        }
        counted(controller, {"pod-gone": 1, "pod-replaced": 1, "pod-succeeded": 1})
        wait_for("the released leases' reservations are deleted", lambda: len(reservations(real_kube)) == 2)
        assert {r["spec"]["podref"] for r in reservations(real_kube).values()} == {
            f"{ns}/live",
            f"{ns}/replaced",
        }
        assert {r["spec"]["containerid"] for r in reservations(real_kube).values()} >= {
            f"ctr-replaced-{new['metadata']['uid'][:6]}"
        }
        wait_for("an Event on each released pod", lambda: len(events(real_kube)) >= 3)
        released = {e["regarding"]["name"]: e for e in events(real_kube) if e["reason"] == "AddressReleased"}
        assert set(released) == {"deleted", "replaced", "finished"}
        assert released["replaced"]["regarding"]["uid"] == pods["replaced"]["metadata"]["uid"]
        assert released["deleted"]["reportingController"] == "whereabouts-py.cni.cncf.io/ipam-controller"


def test_a_pool_crossing_95_percent_gets_one_warning_event(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    small = build_range("ipam", "10.62.0.0/28")  # 14 usable addresses: the 14th lease crosses 95%
    with running(real_kube, tmp_path):
        for i in range(14):
            add(engine, real_kube, real_kube.api.put_pod(real_kube.namespace, f"p{i}"), small)
        wait_for(
            "a Warning on the IPPool",
            lambda: any(e["type"] == "Warning" for e in events(real_kube)),
        )
        time.sleep(0.5)
    warnings = [e for e in events(real_kube) if e["type"] == "Warning"]
    assert len(warnings) == 1
    assert warnings[0]["regarding"]["kind"] == "IPPool"
    assert warnings[0]["regarding"]["name"] == "10.62.0.0-28"
    assert "100% full: 14 of 14" in warnings[0]["note"]


def node(kube: RealKube, name: str, ready: bool = True) -> None:
    body: dict[str, Any] = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {}}
    with contextlib.suppress(ApiError):
        kube.request("DELETE", f"/api/v1/nodes/{name}")
    made = kube.request("POST", "/api/v1/nodes", body)
    if not ready:
        stamp = "2020-01-01T00:00:00Z"
        made["status"] = {
            "conditions": [
                {"type": "Ready", "status": "Unknown", "lastTransitionTime": stamp, "lastHeartbeatTime": stamp,
                 "reason": "NodeStatusUnknown", "message": "Kubelet stopped posting node status."}
            ]
        }  # fmt: skip
        kube.request("PUT", f"/api/v1/nodes/{name}/status", made)


def test_terminating_pods_on_dead_nodes_are_released_not_ready_only_when_asked(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns, tag = real_kube.api, real_kube.namespace, real_kube.namespace[-6:]
    names = {k: f"{k}-{tag}" for k in ("healthy", "fenced", "gone", "notready")}
    for key, name in names.items():
        node(real_kube, name, ready=key != "notready")
    pods = {}
    for key, name in names.items():
        pods[key] = api.put_pod(ns, f"on-{key}", node=name)
        add(engine, real_kube, pods[key])
    try:
        with running(real_kube, tmp_path) as controller:
            for key in names:
                api.put_pod(ns, f"on-{key}", node=names[key], deleting=True)  # Terminating: no kubelet
            time.sleep(1.5)
            assert set(holders(real_kube)) == {f"on-{k}" for k in names}  # all nodes there, none tainted
            taint = {
                "key": "node.kubernetes.io/out-of-service",
                "effect": "NoExecute",
                "value": "nodeshutdown",
            }
            real_kube.request("PATCH", f"/api/v1/nodes/{names['fenced']}", {"spec": {"taints": [taint]}})
            real_kube.request("DELETE", f"/api/v1/nodes/{names['gone']}")
            wait_for(
                "the fenced and the gone node's pods are released",
                lambda: set(holders(real_kube)) == {"on-healthy", "on-notready"},
            )
            counted(controller, {"node-out-of-service": 1, "node-gone": 1})
        with running(real_kube, tmp_path, not_ready_after=60.0) as controller:
            wait_for("NotReady for long enough: released", lambda: set(holders(real_kube)) == {"on-healthy"})
            counted(controller, {"node-not-ready": 1})
    finally:
        for name in names.values():
            with contextlib.suppress(ApiError):
                real_kube.request("DELETE", f"/api/v1/nodes/{name}")


def scrape(controller: Controller) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from ipam.controller.metrics import registry

    text = generate_latest(registry(controller.collector())).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_pool_metrics_equal_ipamctl_show(real_kube: RealKube, engine: Engine, tmp_path: Path) -> None:
    api, ns = real_kube.api, real_kube.namespace
    other = build_range("ipam", "10.63.0.0/27")
    for i in range(5):
        add(engine, real_kube, api.put_pod(ns, f"m{i}"))
    for i in range(3):
        add(engine, real_kube, api.put_pod(ns, f"o{i}"), other)
    with running(real_kube, tmp_path, leading=lambda: False) as controller:  # a follower's figures
        api.delete_pod(ns, "m0")  # not released (not leading): a retained lease
        wait_for("the cache sees the deletion", lambda: controller.pods.get(f"{ns}/m0") is None)
        out = io.StringIO()
        assert (
            ctl_main(
                ["show", "--kubeconfig", real_kube.kubeconfig_path, "--namespace", ns, "-o", "json"], out=out
            )
            == 0
        )
        shown = json.loads(out.getvalue())["pools"]
        wait_for("the pool cache has both pools", lambda: len(controller.pools.pools) == 2)
        metrics = scrape(controller)
    assert len(shown) == 2
    for pool in shown:
        labels = (("network", pool["network"]), ("range", pool["range"]))
        assert metrics[("whereabouts_py_pool_allocated_addresses", labels)] == pool["used"]
        assert metrics[("whereabouts_py_pool_free_addresses", labels)] == pool["free"]
        assert metrics[("whereabouts_py_pool_size_addresses", labels)] == pool["used"] + pool["free"]
    assert (
        metrics[("whereabouts_py_pool_retained_addresses", (("network", ""), ("range", "10.61.0.0/24")))] == 0
    )
    assert metrics[("whereabouts_py_leaks_pending", ())] == 1  # m0's: a follower releases nothing
    assert metrics[("whereabouts_py_controller_is_leader", ())] == 0
    assert metrics[("whereabouts_py_watch_healthy", (("resource", "pods"),))] == 1
    assert metrics[("whereabouts_py_orphan_reservations", ())] == 0


def shipped_lease(kube: RealKube) -> None:
    """deploy/base/controller.yaml's Lease, in this test's namespace (the RBAC names it; no create)."""
    [lease] = [d for d in load_yaml(ROOT / "deploy" / "base" / "controller.yaml") if d["kind"] == "Lease"]
    kube.apply(lease)


def test_two_replicas_only_the_leader_writes_and_the_other_takes_over(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns = real_kube.api, real_kube.namespace
    shipped_lease(real_kube)
    for name in ("first", "second"):
        add(engine, real_kube, api.put_pod(ns, name))
    replicas = []
    for _ in range(2):
        elector = Elector(
            configure_client(real_kube.identity_kubeconfig("controller")), ns, lambda: None, **FAST
        )
        controller = start_controller(real_kube, tmp_path, leading=elector.leading)
        elector.on_started = controller.became_leader
        elector.start()
        replicas.append((elector, controller))
    try:
        wait_for("one replica leads", lambda: any(e.leading() for e, _ in replicas), 15)
        time.sleep(2 * FAST["retry_period"])
        assert sorted(e.leading() for e, _ in replicas) == [False, True]  # never both
        (leader, led), (follower, waiting) = sorted(replicas, key=lambda r: not r[0].leading())
        lease = real_kube.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/whereabouts-py-controller"
        )
        assert lease["spec"]["holderIdentity"] == leader.identity

        api.delete_pod(ns, "first")
        wait_for("the leader frees the lease", lambda: "first" not in holders(real_kube))
        counted(led, {"pod-gone": 1})
        assert dict(waiting.reclaimer.released) == {}

        leader.stop()  # its Lease is no longer renewed: the other replica takes it once it expires
        led.stop()
        wait_for("the other replica leads", follower.leading, 20)
        api.delete_pod(ns, "second")
        wait_for("the new leader frees the lease", lambda: "second" not in holders(real_kube))
        counted(waiting, {"pod-gone": 1})
        assert dict(led.reclaimer.released) == {"pod-gone": 1}
    finally:
        for elector, controller in replicas:
            elector.stop()
            controller.stop()
            controller.store.close()


def test_the_controllers_identity_cannot_touch_other_leases(real_kube: RealKube) -> None:
    """Its RBAC names its own Lease: another Lease in its namespace (a control-plane one, say) can be
    neither read, changed nor created."""
    shipped_lease(real_kube)
    ns = real_kube.namespace
    other = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "kube-scheduler"},
        "spec": {},
    }
    real_kube.apply(other)
    store = KubernetesStore.connect(real_kube.identity_kubeconfig("controller"), "/tmp/unused-locks")
    base = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
    try:
        own = store.client.request("GET", f"{base}/whereabouts-py-controller")
        store.client.request("PUT", f"{base}/whereabouts-py-controller", own)
        for method, path, body in (
            ("GET", f"{base}/kube-scheduler", None),
            (
                "PUT",
                f"{base}/kube-scheduler",
                {**other, "metadata": {"name": "kube-scheduler", "namespace": ns}},
            ),
            ("POST", base, {**other, "metadata": {"name": "another"}}),
            ("DELETE", f"{base}/whereabouts-py-controller", None),
        ):
            with pytest.raises(KubeApiError) as refused:
                store.client.request(method, path, body)
            assert refused.value.status == 403, (method, path)
    finally:
        store.close()
