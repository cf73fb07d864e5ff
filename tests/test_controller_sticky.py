"""ipam-controller and sticky addresses (issue 23) on the real kube-apiserver: a lease its DEL kept for a
StatefulSet pod's name (`sticky: statefulset`) is never released by the controller, whether the pod is
gone or stuck Terminating on a fenced node; the retention ends only by the shared rule, which
ipam-reconcile applies (the controller reads no StatefulSets: README, "Operating it: the controller")."""

from __future__ import annotations

import contextlib
import io
import time
from datetime import UTC, datetime
from pathlib import Path

from ipam.allocator import STATEFULSET, Retention, parse_allocations
from ipam.engine import Engine
from ipam.reconcile import KubeSource, Reconciler
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import ApiError, RealKube
from tests.test_controller import POOL, SPEC, add, counted, engine, node, running, wait_for
from tests.test_sticky_real import statefulset

__all__ = ["engine"]  # the fixture, imported


def retained(kube: RealKube) -> dict[str, str]:
    """{podref name: retained stamp} of the pool's leases."""
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == POOL]
    allocations = parse_allocations(found[0]["spec"]["allocations"] if found else {})
    return {v.podref.split("/", 1)[1]: v.retained for v in allocations.values()}


def test_the_controller_keeps_statefulset_retained_leases_and_leaves_their_end_to_reconcile(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns, tag = real_kube.api, real_kube.namespace, real_kube.namespace[-6:]
    fenced = f"fenced-{tag}"
    node(real_kube, fenced)
    db = statefulset(real_kube, "db", 2)
    pods = {name: api.put_pod(ns, name, node=fenced) for name in ("db-0", "db-1", "plain-0")}
    for pod in pods.values():
        add(engine, real_kube, pod)
    keep = Retention(datetime.now(UTC).isoformat(), sticky=STATEFULSET)
    for name in ("db-0", "db-1"):  # their DELs ran under `sticky: statefulset`
        engine.release([SPEC], f"ctr-{name}-{pods[name]['metadata']['uid'][:6]}", "net1", retention=keep)
    assert set(retained(real_kube)) == {"db-0", "db-1", "plain-0"}
    assert all(retained(real_kube)[n] for n in ("db-0", "db-1"))
    try:
        with running(real_kube, tmp_path) as controller:
            api.delete_pod(ns, "db-1")  # gone: the StatefulSet will make it again
            api.put_pod(ns, "db-0", node=fenced, deleting=True)  # Terminating on a node ...
            api.put_pod(ns, "plain-0", node=fenced, deleting=True)
            taint = {
                "key": "node.kubernetes.io/out-of-service",
                "effect": "NoExecute",
                "value": "nodeshutdown",
            }
            real_kube.request("PATCH", f"/api/v1/nodes/{fenced}", {"spec": {"taints": [taint]}})  # ... fenced
            wait_for(
                "the fenced node's unretained lease is released", lambda: "plain-0" not in retained(real_kube)
            )
            counted(controller, {"node-out-of-service": 1})
            api.delete_pod(ns, "db-0")
            real_kube.request(
                "DELETE", f"/apis/apps/v1/namespaces/{ns}/statefulsets/{db['metadata']['name']}"
            )
            time.sleep(2)  # the controller saw both pods go, and the StatefulSet: it still keeps them
            assert set(retained(real_kube)) == {"db-0", "db-1"}
            assert dict(controller.reclaimer.released) == {"node-out-of-service": 1}
        store = KubernetesStore.connect(real_kube.reconciler_kubeconfig(), str(tmp_path / "r"))
        out = io.StringIO()
        try:
            Reconciler(KubeSource(store), 0.0, False, out).run_once()
        finally:
            store.close()
        assert retained(real_kube) == {}
        assert out.getvalue().count("statefulset-gone") == 2
    finally:
        with contextlib.suppress(ApiError):
            real_kube.request("DELETE", f"/api/v1/nodes/{fenced}")
