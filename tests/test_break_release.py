"""Adversarial tests of the release path: the JSON-patch lease removal (KubernetesStore.remove_leases),
the controller's keyed pending releases / in-flight skip, the cached reservation delete and the IPPool
cache's incremental parse. Each interleaving is forced, on the real kube-apiserver where its
behaviour matters, on the Python test server where a fault must be injected."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Request, parse_allocations
from ipam.audit import Holding
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.reconcile import Summary
from ipam.reconcile import main as reconcile_main
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.real import RealKube
from tests.test_controller import running, wait_for

SPEC = build_range("ipam", "10.63.0.0/24")
POOL = "10.63.0.0-24"
OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _engine(kubeconfig: str, tmp: Path) -> Iterator[Engine]:
    store = KubernetesStore.connect(kubeconfig, str(tmp / "locks"))
    yield Engine(store, RetryPolicy(deadline_seconds=30))
    store.close()


@pytest.fixture
def real_engine(real_kube: RealKube, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(real_kube.plugin_kubeconfig(), tmp_path)


@pytest.fixture
def test_engine(kube: KubeHandle, tmp_path: Path) -> Iterator[Engine]:
    yield from _engine(kube.plugin_kubeconfig(), tmp_path)


def add(engine: Engine, namespace: str, pod: str, uid: str = "") -> str:
    request = Request(f"ctr-{pod}", "net1", f"{namespace}/{pod}", poduid=uid, node="node-a", created=OLD)
    return str(engine.add([SPEC], request)[0].address)


def pool_leases(api: Any, namespace: str) -> dict[int, str]:
    """offset -> pod name of the pool's leases."""
    found = [o for o in api.objects("ippools", namespace) if o["metadata"]["name"] == POOL]
    allocations = parse_allocations(found[0]["spec"]["allocations"] if found else {})
    return {offset: lease.podref.split("/", 1)[1] for offset, lease in allocations.items()}


# -- the CronJob's pass: a refused patch is retried as the write it replaced was ----------------------


def test_reconcile_pass_retries_a_release_whose_patch_met_a_transient_error(
    kube: KubeHandle, test_engine: Engine
) -> None:
    """Before the JSON patch, a release's conditional PUT that met a 503 was retried within the pass
    (the engine's retry loop). The patch's 503 must not end the release for this pass: a leaked lease
    would stay until the next CronJob run."""
    ns = kube.namespace
    add(test_engine, ns, "gone")  # no such pod: leaked
    kube.api.set_faults(
        methods=frozenset({"PATCH", "PUT"}),
        resources=frozenset({"ippools"}),
        error_rate=1.0,
        error_codes=(503,),
        max_hits=1,
    )
    out = io.StringIO()
    code = reconcile_main(["--kubeconfig", kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    assert pool_leases(kube.api, ns) == {}, out.getvalue()
    assert code == 0, out.getvalue()


# -- the controller: a release judged while another lease of that offset is being written -----------


@pytest.mark.apiserver
def test_a_lease_judged_while_its_offset_is_in_flight_for_an_older_lease_is_still_released(
    real_kube: RealKube, real_engine: Engine, tmp_path: Path
) -> None:
    """Offset 1 is being written for pod a's leaked lease (slow: a big pool, a conflict loop) when a
    DEL frees it, pod b gets it and b is found gone too. The in-flight write fails its test (b's lease
    is there now) and releases nothing; b's judgement, made meanwhile, must not have been dropped as
    'already being written': nothing else points at b again before the CronJob."""
    ns = real_kube.namespace
    with running(real_kube, tmp_path) as controller:
        reclaimer = controller.reclaimer
        releaser: Any = reclaimer.releaser
        real_release = releaser.release_leases
        real_judge = reclaimer.judge
        entered, gate = threading.Event(), threading.Event()
        judged_b = threading.Event()

        def release_leases(held: Sequence[Holding], summary: Summary | None = None) -> list[int]:
            if any(h.lease.podref == f"{ns}/a" for h in held):
                entered.set()
                assert gate.wait(20)
            gone: list[int] = real_release(held, summary)
            return gone

        def judge(ref: str) -> Any:
            out = real_judge(ref)
            if ref == f"{ns}/b" and out:
                judged_b.set()
            return out

        releaser.release_leases = release_leases
        reclaimer.judge = judge  # type: ignore[method-assign]
        address = add(real_engine, ns, "a")  # no pod: leaked at once
        assert entered.wait(10), "a's release never started"
        # meanwhile a's own DEL frees the address and pod b (gone as well) gets it
        real_engine.release([SPEC], "ctr-a", "net1")
        assert add(real_engine, ns, "b") == address
        assert judged_b.wait(10), "b was never judged"
        time.sleep(0.3)  # b's judgement is handed to the pool's writer
        gate.set()
        wait_for("b's leaked lease is released", lambda: pool_leases(real_kube.api, ns) == {}, 5)
