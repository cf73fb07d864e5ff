"""Adversarial tests of three later changes to the release path: no GET for a UID whose DELETED event
the pod watch delivered (Reclaimer.judge), the PUT of the last release's answer
(KubernetesStore.remove_leases) and the reservation deletes deferred until the pool writes are done
(Reclaimer._unreserve). On the real kube-apiserver wherever its behaviour decides."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease, Request, dump_allocations, parse_allocations
from ipam.audit import Holding, PoolView, Reservation
from ipam.controller import reclaim
from ipam.controller.cache import Finished, Nodes, Pods, Pools
from ipam.controller.reclaim import Reclaimer
from ipam.controller.rules import Release
from ipam.engine import Engine, RetryPolicy
from ipam.errors import CNIError
from ipam.ranges import build_range
from ipam.reconcile import Summary
from ipam.slices import RETIRED_ANNOTATION
from ipam.store.base import PoolSnapshot
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import RealKube
from tests.test_controller import running, wait_for
from tests.test_controller_release import pool_writes, requests_of

SPEC = build_range("ipam", "10.64.0.0/24")
POOL = "10.64.0.0-24"
TINY = build_range("ipam", "10.65.0.0/30")  # two usable addresses
TINY_POOL = "10.65.0.0-30"


@pytest.fixture
def store(real_kube: RealKube, tmp_path: Path) -> Iterator[KubernetesStore]:
    """The controller's store (its ServiceAccount may patch IPPools; the plugin's may not)."""
    s = KubernetesStore.connect(real_kube.identity_kubeconfig("controller"), str(tmp_path / "locks"))
    yield s
    s.close()


@pytest.fixture
def engine(real_kube: RealKube, tmp_path: Path) -> Iterator[Engine]:
    s = KubernetesStore.connect(real_kube.plugin_kubeconfig(), str(tmp_path / "plugin-locks"))
    yield Engine(s, RetryPolicy(deadline_seconds=30))
    s.close()


def add(engine: Engine, ns: str, pod: str, uid: str = "", spec: Any = SPEC) -> str:
    request = Request(f"ctr-{pod}-{uid[:6]}", "net1", f"{ns}/{pod}", poduid=uid, node="node-a")
    return str(engine.add([spec], request)[0].address)


def leases(kube: RealKube, pool: str = POOL) -> dict[int, Lease]:
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == pool]
    return parse_allocations(found[0]["spec"]["allocations"]) if found else {}


def pool_object(kube: RealKube, pool: str = POOL) -> dict[str, Any] | None:
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == pool]
    return found[0] if found else None


def uid_of(kube: RealKube) -> str:
    obj = pool_object(kube)
    assert obj is not None
    return str(obj["metadata"]["uid"])


def of(kube: RealKube, pod: str, pool: str = POOL) -> dict[int, Lease]:
    return {o: lease for o, lease in leases(kube, pool).items() if lease.podref == f"{kube.namespace}/{pod}"}


# -- 2. the PUT of the last release's answer -------------------------------------------------------


@pytest.mark.apiserver
def test_a_kept_answer_put_after_the_pool_was_retired_fails_and_the_retirement_stays(
    real_kube: RealKube, engine: Engine, store: KubernetesStore
) -> None:
    ns = real_kube.namespace
    for pod in ("a", "b", "c"):
        add(engine, ns, pod)
    assert store.remove_leases(POOL, of(real_kube, "a"))  # the patch; its answer is kept
    path = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{ns}/ippools/{POOL}"
    obj = real_kube.request("GET", path)
    obj["metadata"].setdefault("annotations", {})[RETIRED_ANNOTATION] = "reclaim"
    real_kube.request("PUT", path, obj)
    with requests_of(store.client) as seen:
        assert store.remove_leases(POOL, of(real_kube, "b"))  # the kept copy's PUT is refused: the patch
    assert pool_writes(seen) == [("PUT", 409), ("PATCH", 200)]
    after = pool_object(real_kube)
    assert after is not None
    assert RETIRED_ANNOTATION in (after["metadata"].get("annotations") or {})
    assert {lease.podref for lease in leases(real_kube).values()} == {f"{ns}/c"}


@pytest.mark.apiserver
def test_a_kept_answer_put_after_the_pool_was_deleted_or_remade_resurrects_nothing(
    real_kube: RealKube, engine: Engine, store: KubernetesStore
) -> None:
    ns = real_kube.namespace
    for pod in ("a", "b"):
        add(engine, ns, pod)
    b = of(real_kube, "b")
    assert store.remove_leases(POOL, of(real_kube, "a"))
    path = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{ns}/ippools/{POOL}"
    real_kube.request("DELETE", path)
    with requests_of(store.client) as seen:
        assert not store.remove_leases(POOL, b)  # gone: nothing written, nothing made again
    assert pool_writes(seen) == [("PUT", 404)]
    assert pool_object(real_kube) is None

    add(engine, ns, "x")
    add(engine, ns, "w")
    w = of(real_kube, "w")
    assert store.remove_leases(POOL, of(real_kube, "x"))  # a kept answer of the new pool, holding w
    real_kube.request("DELETE", path)
    add(engine, ns, "y")  # the pool made again under the name, within BASE_SECONDS
    add(engine, ns, "z")
    y_uid = uid_of(real_kube)
    with requests_of(store.client) as seen:
        # w is in the kept copy exactly as given: its PUT (old uid, old resourceVersion) is sent and
        # must be refused, not bring w back nor drop y and z; then the patch's test fails
        assert not store.remove_leases(POOL, w)
    assert pool_writes(seen) == [("PUT", 409), ("PATCH", 422)], seen
    assert {lease.podref for lease in leases(real_kube).values()} == {f"{ns}/y", f"{ns}/z"}
    assert uid_of(real_kube) == y_uid


@pytest.mark.apiserver
def test_two_threads_releasing_in_one_pool_through_one_store_remove_exactly_their_leases(
    real_kube: RealKube, engine: Engine, store: KubernetesStore
) -> None:
    ns = real_kube.namespace
    names = [f"p{i}" for i in range(12)]
    for pod in names:
        add(engine, ns, pod)
    assert store.remove_leases(POOL, of(real_kube, "p0"))  # a kept answer for both threads to race on
    errors: list[BaseException] = []

    def release(pods: list[str]) -> None:
        try:
            for pod in pods:
                for _ in range(5):
                    if store.remove_leases(POOL, of(real_kube, pod)):
                        break
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=release, args=(names[i:11:2],)) for i in (1, 2)]
    with requests_of(store.client) as seen:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors
    assert ("PUT", 200) in pool_writes(seen), seen  # the kept answers were used, side by side with patches
    assert {lease.podref for lease in leases(real_kube).values()} == {f"{ns}/p11"}


# -- 3. reservation deletes deferred for the pool writes ----------------------------------------------


class _Releaser:
    def __init__(self) -> None:
        self.deleted: dict[str, float] = {}
        self.lock = threading.Lock()

    def release_leases(self, held: Sequence[Holding], summary: Summary | None = None) -> list[int]:
        return [h.offset for h in held]

    def release_reservation(
        self, h: Holding, summary: Summary | None = None, cached: Reservation | None = None
    ) -> None:
        with self.lock:
            self.deleted[h.reservation] = time.monotonic()


def test_reservation_deletes_under_a_steady_stream_of_pool_writes_wait_at_most_defer_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DEFER_SECONDS bounds how long a released lease's reservation waits for the pool writes. Each
    waits in one of PARALLEL threads: while writes never stop, the waits queue behind each other and
    the 40th reservation is deleted 5 x DEFER_SECONDS after its release, not DEFER_SECONDS: under a
    steady stream the freed addresses stay reserved (an ADD of another pod cannot take them) for
    ever longer, as the queue grows without bound."""
    monkeypatch.setattr(reclaim, "DEFER_SECONDS", 0.4)
    noop = lambda _refs: None  # noqa: E731
    pools = Pools("ns", noop)
    releaser = _Releaser()
    r = Reclaimer(
        Pods(noop), Finished(noop), Nodes(lambda: None), pools, lambda _ref: None, releaser, lambda: True
    )
    try:
        with r._idle:
            r._writing.add("another-pool")  # a steady stream: some pool is always being written
        snap = PoolSnapshot(POOL, "10.64.0.0/24", {}, "1")
        view = PoolView(snap, "", "", 254)
        group = [
            Release(
                Holding(view, i, str(SPEC.address_at(i)), Lease(f"c{i}", "net1", f"ns/p{i}"), True),
                "pod-gone",
            )
            for i in range(1, 41)
        ]
        released = time.monotonic()
        r.release(group)
        wait_for("every reservation deleted", lambda: len(releaser.deleted) == 40, 10)
        latest = max(releaser.deleted.values()) - released
        assert latest < 2 * reclaim.DEFER_SECONDS, f"the last reservation waited {latest:.1f}s"
    finally:
        r.stop()


@pytest.mark.apiserver
@pytest.mark.parametrize("taker", ["other-pod", "same-name"])
def test_an_add_of_the_freed_address_while_its_reservation_delete_waits(
    real_kube: RealKube, engine: Engine, tmp_path: Path, taker: str
) -> None:
    """b is deleted; the controller frees its lease but its reservation delete waits for the pool
    writes. An ADD that can only get b's address (a /30, a holds the other) runs meanwhile: it must
    not be given the address twice, and the deferred delete must leave its new holder's reservation."""
    api, ns = real_kube.api, real_kube.namespace
    pod_a, pod_b = api.put_pod(ns, "a"), api.put_pod(ns, "b")
    add(engine, ns, "a", pod_a["metadata"]["uid"], TINY)
    freed = add(engine, ns, "b", pod_b["metadata"]["uid"], TINY)
    with running(real_kube, tmp_path) as controller:
        reclaimer = controller.reclaimer
        with reclaimer._idle:
            reclaimer._writing.add("held-open")  # another pool's write going on: the delete waits
        api.delete_pod(ns, "b")
        wait_for("b's lease is freed", lambda: not of(real_kube, "b", TINY_POOL), 10)
        name = "c" if taker == "other-pod" else "b"
        new = api.put_pod(ns, name)
        uid = new["metadata"]["uid"]
        try:
            got = add(engine, ns, name, uid, TINY)
        except CNIError as exc:  # the old reservation still stands: refused, never a duplicate
            assert taker == "other-pod", exc
            # and said so: not a bare "no free address" for a range with a free address
            assert "reserved" in f"{exc.msg} {exc.details}", (exc.msg, exc.details)
            got = ""
        with reclaimer._idle:
            reclaimer._writing.discard("held-open")
            reclaimer._idle.notify_all()
        time.sleep(2)  # the deferred delete has run
        if not got:  # refused while the old reservation stood: the retry gets it now
            got = add(engine, ns, name, uid, TINY)
        assert got == freed
        held = {o: lease.podref for o, lease in leases(real_kube, TINY_POOL).items()}
        assert sorted(held.values()) == sorted([f"{ns}/a", f"{ns}/{name}"])
        time.sleep(1)
        rsv = [
            o
            for o in api.objects("overlappingrangeipreservations", ns)
            if o["spec"]["podref"] == f"{ns}/{name}"
        ]
        assert len(rsv) == 1 and rsv[0]["spec"]["containerid"] == f"ctr-{name}-{uid[:6]}"


# -- 1. no GET for a UID the pod watch saw deleted ---------------------------------------------------


def _judging(allocations: dict[int, Lease]) -> tuple[Reclaimer, Pods, list[str]]:
    noop = lambda _refs: None  # noqa: E731
    pods, pools, looked = Pods(noop), Pools("ns", noop), []
    pools.replace(
        [
            {
                "metadata": {"name": POOL, "namespace": "ns", "resourceVersion": "1"},
                "spec": {"range": "10.64.0.0/24", "allocations": dump_allocations(allocations)},
            }
        ]
    )

    def get_pod(ref: str) -> None:
        looked.append(ref)

    r = Reclaimer(pods, Finished(noop), Nodes(lambda: None), pools, get_pod, _Releaser(), lambda: True)
    return r, pods, looked


def _deleted(pods: Pods, ns: str, name: str, uid: str) -> None:
    pods.event("DELETED", {"metadata": {"namespace": ns, "name": name, "uid": uid}})


@pytest.mark.parametrize(
    ("other", "ns"),
    [
        (Lease("c2", "ns/r", "net2", poduid=""), "ns"),  # a lease recording no UID: it may be the new pod's
        (Lease("c2", "ns/r", "net2", poduid="u2"), "ns"),  # the new pod's lease
        (None, "other"),  # the same name deleted in another namespace
    ],
)
def test_a_deleted_uid_skips_the_get_only_when_every_lease_of_that_podref_names_it(
    other: Lease | None, ns: str
) -> None:
    allocations = {1: Lease("c1", "ns/r", "net1", poduid="u1")}
    if other is not None:
        allocations[2] = other
    r, pods, looked = _judging(allocations)
    _deleted(pods, ns, "r", "u1")
    r.judge("ns/r")
    assert looked == ["ns/r"]
    r.stop()


def test_a_retained_lease_of_a_deleted_uid_is_not_released_without_a_get() -> None:
    retained = Lease(
        "c1", "ns/r", "net1", poduid="u1", retained="2020-01-01T00:00:00Z", until="2999-01-01T00:00:00Z"
    )
    r, pods, looked = _judging({1: retained, 2: Lease("c9", "ns/r", "net9", poduid="u1")})
    _deleted(pods, "ns", "r", "u1")
    judged = r.judge("ns/r")
    assert looked == []  # no GET: both leases name the deleted UID
    assert [j.holding.offset for j in judged] == [2]  # the retained lease stays (ipam-reconcile's)
    r.stop()


@pytest.mark.apiserver
def test_a_statefulset_pod_made_again_while_its_old_uid_is_judged_gone_without_a_get_keeps_its_lease(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    """s-0 (UID u1) is deleted and made again at once (u2). The controller judges u1's lease from its
    DELETED event alone (no GET); before its write, s-0's new ADD takes that very lease back (same
    name and interface: `find_owner`). The write must not free the live pod's lease nor its
    reservation."""
    api, ns = real_kube.api, real_kube.namespace
    old = api.put_pod(ns, "s-0")
    address = add(engine, ns, "s-0", old["metadata"]["uid"])
    with running(real_kube, tmp_path) as controller:
        reclaimer = controller.reclaimer
        real_judge, real_get = reclaimer.judge, reclaimer.get_pod
        judged, gate, gets = threading.Event(), threading.Event(), []

        def get_pod(ref: str) -> Any:
            gets.append(ref)
            return real_get(ref)

        def judge(ref: str) -> Any:
            if ref == f"{ns}/s-0":  # a MODIFIED (Terminating) event may come first: judged after DELETED
                wait_for("the DELETED event", lambda: bool(controller.pods.deleted_uid(ref)), 10)
            out = real_judge(ref)
            if ref == f"{ns}/s-0" and out:
                judged.set()
                assert gate.wait(20)
            return out

        reclaimer.judge = judge  # type: ignore[method-assign]
        reclaimer.get_pod = get_pod
        api.delete_pod(ns, "s-0")
        wait_for("the controller judged u1 gone", judged.is_set, 10)
        assert gets == []  # on the DELETED event's word
        new = api.put_pod(ns, "s-0")
        uid = new["metadata"]["uid"]
        assert add(engine, ns, "s-0", uid) == address  # the same lease, confirmed for u2
        gate.set()
        reclaimer.flush()
        time.sleep(1.5)
        (lease,) = of(real_kube, "s-0").values()
        assert lease.poduid == uid
        rsv = [
            o for o in api.objects("overlappingrangeipreservations", ns) if o["spec"]["podref"] == f"{ns}/s-0"
        ]
        assert [r["spec"]["containerid"] for r in rsv] == [f"ctr-s-0-{uid[:6]}"]
