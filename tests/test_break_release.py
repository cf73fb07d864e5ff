"""Adversarial tests of the release path: the JSON-patch lease removal (KubernetesStore.remove_leases),
the controller's keyed pending releases / in-flight skip, the cached reservation delete and the IPPool
cache's incremental parse. Each interleaving is forced, on the real kube-apiserver where its
behaviour matters, on the Python test server where a fault must be injected."""

from __future__ import annotations

import contextlib
import io
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipam.allocator import Lease, Request, parse_allocations
from ipam.audit import Holding, PoolView, Reservation
from ipam.controller.cache import Pools
from ipam.controller.reclaim import quiet_reconciler
from ipam.engine import Engine, RetryPolicy
from ipam.ranges import build_range
from ipam.reconcile import KubeSource, Summary
from ipam.reconcile import main as reconcile_main
from ipam.store.base import PoolSnapshot
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.real import ApiError, RealKube
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


# -- the JSON patch on the real API server: a test passes only for the very lease judged -----------


def _put_pool(kube: RealKube, allocations: dict[str, Any]) -> None:
    path = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{kube.namespace}/ippools"
    body = {
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": POOL},
        "spec": {"range": "10.63.0.0/24", "allocations": allocations},
    }
    with contextlib.suppress(ApiError):  # absent
        kube.request("DELETE", f"{path}/{POOL}")
    kube.request("POST", path, body)


def _raw(kube: RealKube) -> dict[str, Any]:
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == POOL]
    return dict(found[0]["spec"]["allocations"]) if found else {}


@pytest.mark.apiserver
def test_the_release_patch_removes_only_the_exact_lease_judged_on_the_real_server(
    real_kube: RealKube, tmp_path: Path
) -> None:
    store = KubernetesStore.connect(real_kube.identity_kubeconfig("reconciler"), str(tmp_path / "r"))
    try:
        ours = {"id": "c1", "podref": "ns/a", "ifname": "net1", "attrs": "node=n1;poduid=u1"}
        judged = parse_allocations({"7": ours})[7]
        other = {"id": "c2", "podref": "ns/b", "ifname": "net1", "attrs": "node=n1;poduid=u2"}
        cases: list[tuple[str, dict[str, Any], bool]] = [
            ("the lease as judged", {"7": ours}, True),
            ("another container at that offset", {"7": other}, False),
            ("the same attachment, attrs in another order", {"7": {**ours, "attrs": "poduid=u1;node=n1"}}, False),
            ("the same container for another pod", {"7": {**ours, "podref": "ns/a2"}}, False),
            ("a previous version's separate fields", {"7": {**ours, "attrs": "", "node": "n1", "poduid": "u1"}}, False),
            ("an extra attrs entry", {"7": {**ours, "attrs": "node=n1;poduid=u1;zz=1"}}, False),
            ("no ifname", {"7": {k: v for k, v in ours.items() if k != "ifname"}}, False),
            ("the offset spelt 07", {"07": ours}, False),
        ]  # fmt: skip
        for what, allocations, removed in cases:
            _put_pool(real_kube, {**allocations, "9": other})
            before = _raw(real_kube)
            assert store.remove_leases(POOL, {7: judged, 9: parse_allocations({"9": other})[9]}) is removed, (
                what
            )
            after = _raw(real_kube)
            assert after == ({} if removed else before), what  # all or nothing
        # a Whereabouts-made lease (no attrs) is removed when it is exactly the one judged
        plain = {"id": "c3", "podref": "ns/c", "ifname": "eth0"}
        _put_pool(real_kube, {"3": plain})
        assert store.remove_leases(POOL, parse_allocations({"3": plain})) is True
        assert _raw(real_kube) == {}
        # the pool deleted meanwhile: nothing written, no pool made
        real_kube.request(
            "DELETE",
            f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{real_kube.namespace}/ippools/{POOL}",
        )
        assert store.remove_leases(POOL, {7: judged}) is False
        assert _raw(real_kube) == {}
    finally:
        store.close()


# -- the IPPool cache's incremental parse equals a whole parse, over any sequence of events -----------

_KEYS = st.sampled_from(["7", "07", "007", "8", "9", "x", ""])
_TEXT = st.sampled_from(["", "a", "b", "n1"])
_LEASE = st.one_of(
    st.fixed_dictionaries(
        {"id": _TEXT, "podref": st.sampled_from(["", "ns/a", "ns/b"])},
        optional={
            "ifname": _TEXT,
            "attrs": st.sampled_from(["", "node=n1", "node=n1;poduid=u", "poduid=u;node=n1", "zz=1"]),
            "node": _TEXT,
            "poduid": _TEXT,
        },
    ),
    st.just("not a lease"),
    st.just({"id": 5}),
)
_EVENT = st.one_of(
    st.tuples(st.sampled_from(["ADDED", "MODIFIED"]), st.dictionaries(_KEYS, _LEASE, max_size=4)),
    st.tuples(st.just("DELETED"), st.just({})),
    st.tuples(st.just("RELIST"), st.dictionaries(_KEYS, _LEASE, max_size=4)),
)


def _whole(raw: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
    try:
        return {o: lease.to_json() for o, lease in parse_allocations(raw).items()}
    except ValueError:
        return None


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, min_size=1, max_size=8))
def test_the_pool_cache_parses_each_event_as_a_whole_parse_would(events: list[tuple[str, Any]]) -> None:
    pools = Pools("ns", lambda refs: None)
    for kind, raw in events:
        obj = {"metadata": {"name": "p", "resourceVersion": "1"}, "spec": {"range": "10.0.0.0/24"}}
        obj["spec"]["allocations"] = raw
        if kind == "RELIST":
            pools.replace([obj])
        else:
            pools.event(kind, obj)
        snap = pools.pools.get("p")
        want = None if kind == "DELETED" else _whole(raw)
        got = None if snap is None else {o: lease.to_json() for o, lease in snap.allocations.items()}
        assert got == want, (kind, raw)
        if snap is not None:
            assert snap.allocations == parse_allocations(raw)


# -- the reservation deleted at the watch copy's resourceVersion: never another holder's ------------


@pytest.mark.apiserver
def test_a_stale_watch_copy_of_a_reservation_never_deletes_another_holders(
    real_kube: RealKube, tmp_path: Path
) -> None:
    controller = KubernetesStore.connect(real_kube.identity_kubeconfig("controller"), str(tmp_path / "c"))
    store = KubernetesStore.connect(real_kube.plugin_kubeconfig(), str(tmp_path / "p"))  # the plugin's
    try:
        reconciler = quiet_reconciler(KubeSource(controller))
        view = PoolView(PoolSnapshot(POOL, "10.63.0.0/24", {}, "1"), "", "", 254)
        address = "10.63.0.7"

        def holding(lease: Lease) -> Holding:
            return Holding(view, 7, address, lease, True)

        def current() -> dict[str, Any] | None:
            found = [
                o
                for o in real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace)
                if o["metadata"]["name"] == holding(first).reservation
            ]
            return found[0] if found else None

        first = Lease("c1", "ns/a", "net1")
        name = holding(first).reservation
        assert store.reserve(name, first, address) is None
        copy = current()
        assert copy is not None
        stale = Reservation.from_object(copy)
        # released by a DEL meanwhile, and the address reserved by another pod
        store.delete_reservation(name, stale.version)
        other = Lease("c2", "ns/b", "net1")
        assert store.reserve(name, other, address) is None
        reconciler.release_reservation(holding(first), Summary(), stale)
        now = current()
        assert now is not None and now["spec"]["containerid"] == "c2"
        # the same pod's new container took it over in place (an update: a new resourceVersion)
        copy2 = Reservation.from_object(now)
        again = Lease("c3", "ns/b", "net1")
        assert store.reserve(name, again, address) is None
        reconciler.release_reservation(holding(other), Summary(), copy2)
        now = current()
        assert now is not None and now["spec"]["containerid"] == "c3"
        # the copy current and naming the released container: deleted
        reconciler.release_reservation(holding(again), Summary(), Reservation.from_object(now))
        assert current() is None
    finally:
        store.close()
        controller.close()


# -- a lost answer to the release patch: nothing released twice, nothing else touched ---------------


def test_a_release_patch_whose_answer_is_lost_releases_nothing_else(
    kube: KubeHandle, test_engine: Engine
) -> None:
    ns = kube.namespace
    kube.api.put_pod(ns, "live")
    add(test_engine, ns, "gone")
    add(test_engine, ns, "live")
    kube.api.set_faults(
        methods=frozenset({"PATCH"}), resources=frozenset({"ippools"}), drop_after_rate=1.0, max_hits=1
    )
    out = io.StringIO()
    reconcile_main(["--kubeconfig", kube.reconciler_kubeconfig(), "--grace", "0"], out=out)
    assert pool_leases(kube.api, ns) == {2: "live"}, out.getvalue()
    # The released lease's reservation stays (its write's answer was lost, the loop found the lease
    # gone and cannot tell its own write from a DEL's): the address is skipped until the next pass's
    # orphan sweep, as it was with the conditional PUT. That pass leaves every live lease alone.
    kube.api.put_pod(ns, "new")
    assert add(test_engine, ns, "new") == "10.63.0.3"
    out = io.StringIO()
    assert reconcile_main(["--kubeconfig", kube.reconciler_kubeconfig(), "--grace", "0"], out=out) == 0
    assert pool_leases(kube.api, ns) == {2: "live", 3: "new"}, out.getvalue()
    assert "delete reservation=10.63.0.1 podref=kube-system/gone reason=orphaned" in out.getvalue()


# -- a Terminating pod on a node NotReady: released once the node has been NotReady long enough ------


@pytest.mark.apiserver
def test_a_terminating_pod_is_released_when_its_node_crosses_the_not_ready_threshold_later(
    real_kube: RealKube, real_engine: Engine, tmp_path: Path
) -> None:
    """The node turned NotReady just now; its pod is then deleted (the taint manager's eviction) and
    stays Terminating (no kubelet). With --release-after-not-ready 3, its lease goes once the node has
    been NotReady 3 s, though no event comes then: a dead kubelet posts nothing more."""
    api, ns = real_kube.api, real_kube.namespace
    name = f"nr-{ns[-6:]}"
    made = real_kube.request(
        "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
    )
    try:
        pod = api.put_pod(ns, "evicted", node=name)
        request = Request("ctr-evicted", "net1", f"{ns}/evicted", poduid=pod["metadata"]["uid"], node=name)
        real_engine.add([SPEC], request)
        with running(real_kube, tmp_path, not_ready_after=3.0) as controller:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            made["status"] = {
                "conditions": [
                    {"type": "Ready", "status": "Unknown", "lastTransitionTime": stamp,
                     "lastHeartbeatTime": stamp, "reason": "NodeStatusUnknown", "message": "Kubelet stopped."}
                ]
            }  # fmt: skip
            real_kube.request("PUT", f"/api/v1/nodes/{name}/status", made)
            api.put_pod(ns, "evicted", node=name, deleting=True)
            time.sleep(0.5)
            assert pool_leases(api, ns) == {1: "evicted"}  # NotReady for less than 3 s: kept
            wait_for("released once NotReady for 3 s", lambda: pool_leases(api, ns) == {}, 7)
            assert dict(controller.reclaimer.released) == {"node-not-ready": 1}
    finally:
        with contextlib.suppress(ApiError):
            real_kube.request("DELETE", f"/api/v1/nodes/{name}")
