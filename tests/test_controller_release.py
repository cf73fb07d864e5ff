"""ipam-controller's release path on the real API server: one JSON patch per pool write that tests each
lease (no read first, the read-and-write loop when one changed), each lease released once however
often its pod is pointed at, a failed write tried again, a Terminating pod on a healthy node not
looked up, and a released lease's reservation deleted at the watch copy's resourceVersion (never
one that changed hands). The pool cache's partial parse is checked in tests/test_break_release.py."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease, Request, parse_allocations
from ipam.audit import Reservation
from ipam.controller import reclaim
from ipam.engine import Engine
from ipam.reconcile import Summary
from ipam.store.kubeclient import ApiError as KubeApiError
from ipam.store.kubeclient import KubeClient
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.real import RealKube
from tests.test_controller import POOL, SPEC, add, engine, holders, reservations, running, wait_for

__all__ = ["engine"]  # the fixture, shared with tests/test_controller.py

pytestmark = pytest.mark.apiserver


@contextlib.contextmanager
def requests_of(client: KubeClient) -> Iterator[list[tuple[str, str, int]]]:
    """(method, path, HTTP status) of every request `client` makes (its watches aside) while inside."""
    seen: list[tuple[str, str, int]] = []
    original = client.request

    def request(method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        try:
            out = original(method, path, *args, **kwargs)
        except KubeApiError as exc:
            seen.append((method, path, exc.status))
            raise
        seen.append((method, path, 200))
        return out

    client.request = request  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        client.request = original  # type: ignore[method-assign]


def pool_writes(seen: list[tuple[str, str, int]]) -> list[tuple[str, int]]:
    """(method, status) of the IPPool writes among `seen`."""
    return [(m, status) for m, p, status in seen if m in ("PUT", "PATCH") and "/ippools/" in p]


@contextlib.contextmanager
def node(kube: RealKube) -> Iterator[str]:
    """A Node of this test's own (no conditions: Ready as far as the controller can tell)."""
    name = f"node-{kube.namespace[-6:]}"
    kube.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}})
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            kube.request("DELETE", f"/api/v1/nodes/{name}")


def pool_object(kube: RealKube, name: str = POOL) -> dict[str, Any]:
    found = [o for o in kube.api.objects("ippools", kube.namespace) if o["metadata"]["name"] == name]
    assert found, name
    return found[0]


# -- the store's patch ------------------------------------------------------------------------------


def test_remove_leases_tests_each_lease_and_writes_nothing_when_one_changed(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    pods = {n: real_kube.api.put_pod(real_kube.namespace, n) for n in ("a", "b", "c")}
    for pod in pods.values():
        add(engine, real_kube, pod)
    store = KubernetesStore.connect(real_kube.identity_kubeconfig("controller"), str(tmp_path / "locks"))
    try:
        before = pool_object(real_kube)
        leases = parse_allocations(before["spec"]["allocations"])
        by_pod = {lease.podref.split("/")[1]: (offset, lease) for offset, lease in leases.items()}
        a_offset, a_lease = by_pod["a"]
        b_offset, b_lease = by_pod["b"]
        # one of the two is not the lease the pool holds (another container): nothing is written
        other = Lease("another-container", b_lease.podref, b_lease.ifname, node=b_lease.node)
        assert not store.remove_leases(POOL, {a_offset: a_lease, b_offset: other})
        after = pool_object(real_kube)
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
        # both as held: both go, the third stays
        assert store.remove_leases(POOL, {a_offset: a_lease, b_offset: b_lease})
        assert set(holders(real_kube)) == {"c"}
        # again: they are gone, so the test fails and nothing is written; a missing pool is no error
        assert not store.remove_leases(POOL, {a_offset: a_lease})
        assert not store.remove_leases("no-such-pool", {a_offset: a_lease})
        assert set(holders(real_kube)) == {"c"}
    finally:
        store.close()


def test_the_next_release_in_a_pool_is_a_put_of_the_last_answer_and_a_patch_when_it_changed(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    pods = {n: real_kube.api.put_pod(real_kube.namespace, n) for n in ("a", "b", "c", "d")}
    for n in ("a", "b", "c"):
        add(engine, real_kube, pods[n])
    store = KubernetesStore.connect(real_kube.identity_kubeconfig("controller"), str(tmp_path / "locks"))
    try:
        leases = parse_allocations(pool_object(real_kube)["spec"]["allocations"])
        by_pod = {lease.podref.split("/")[1]: {offset: lease} for offset, lease in leases.items()}
        with requests_of(store.client) as seen:
            assert store.remove_leases(POOL, by_pod["a"])
            assert store.remove_leases(POOL, by_pod["b"])
        assert [(m, status) for m, _, status in seen] == [
            ("PATCH", 200),
            ("PUT", 200),
        ]  # no read: the patch's answer was the base
        add(engine, real_kube, pods["d"])  # another writer: the kept copy is stale now
        with requests_of(store.client) as seen:
            assert store.remove_leases(POOL, by_pod["c"])
        assert [(m, status) for m, _, status in seen] == [("PUT", 409), ("PATCH", 200)]
        assert set(holders(real_kube)) == {"d"}
        # a lease no longer as given: nothing written, from the copy or by the patch
        with requests_of(store.client) as seen:
            assert not store.remove_leases(POOL, by_pod["a"])
        assert [(m, status) for m, _, status in seen] == [("PATCH", 422)]
        assert set(holders(real_kube)) == {"d"}
    finally:
        store.close()


# -- the controller ---------------------------------------------------------------------------------


def test_a_deleted_pods_lease_is_released_by_one_patch_with_no_read_of_the_pool_or_reservation(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns = real_kube.api, real_kube.namespace
    with node(real_kube) as name_of_node:  # the leases name a node that is there: healthy
        for name in ("keep", "gone"):
            meta = api.put_pod(ns, name, node=name_of_node)["metadata"]
            request = Request(f"ctr-{name}", "net1", f"{ns}/{name}", poduid=meta["uid"], node=name_of_node)
            engine.add([SPEC], request)
        released_with_one_patch(real_kube, tmp_path)


def released_with_one_patch(real_kube: RealKube, tmp_path: Path) -> None:
    api, ns = real_kube.api, real_kube.namespace
    with running(real_kube, tmp_path) as controller:
        time.sleep(1)  # the first sweep has looked at both: live
        wait_for(
            "the reservations are in the watch cache",
            lambda: len(controller.pools.reservations) == 2,
        )
        with requests_of(controller.client) as seen:
            api.delete_pod(ns, "gone")
            wait_for("released", lambda: set(holders(real_kube)) == {"keep"})
            wait_for("its reservation deleted", lambda: len(reservations(real_kube)) == 1)
            time.sleep(0.3)
    assert [m for m, p, _ in seen if p.endswith("/pods/gone")] == []  # its DELETED event named the UID
    writes = [(m, p) for m, p, _ in seen if "/ippools" in p or "/overlappingrangeipreservations" in p]
    assert [m for m, p in writes if "/ippools/" in p] == ["PATCH"]  # no GET, no PUT of the pool
    assert [m for m, p in writes if "/overlappingrangeipreservations/" in p] == ["DELETE"]
    wait_for("counted", lambda: dict(controller.reclaimer.released) == {"pod-gone": 1})


def test_a_deleted_uid_spares_the_get_only_for_leases_that_name_it(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    """The pod watch's DELETED event names the UID that is gone: leases recording exactly that UID
    are judged without a GET; once the name holds a lease of a new pod (same name, new UID), the pod
    is read, and only the old pod's lease goes."""
    api, ns = real_kube.api, real_kube.namespace
    ref = f"{ns}/web"
    old = api.put_pod(ns, "web")
    add(engine, real_kube, old)
    with running(real_kube, tmp_path, leading=lambda: False) as controller:
        r = controller.reclaimer
        api.delete_pod(ns, "web")
        wait_for("the DELETED event", lambda: controller.pods.deleted_uid(ref) == old["metadata"]["uid"])
        with requests_of(controller.client) as seen:
            (alone,) = r.judge(ref)
        assert alone.reason == "pod-gone" and seen == []
        new = api.put_pod(ns, "web")
        uid = new["metadata"]["uid"]  # another interface: a lease of its own beside the old pod's
        engine.add([SPEC], Request(f"ctr-{uid[:6]}", "net2", ref, poduid=uid, node="node-a"))
        wait_for("both leases cached", lambda: len(controller.pools.poduids(ref)) == 2)
        with requests_of(controller.client) as seen:
            (judged,) = r.judge(ref)
        assert [m for m, p, _ in seen if p.endswith("/pods/web")] == ["GET"]
        assert judged.reason == "pod-replaced"
        assert judged.holding.lease.poduid == old["metadata"]["uid"]


def test_a_pod_pointed_at_again_while_its_pool_is_written_is_released_once(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    api, ns = real_kube.api, real_kube.namespace
    add(engine, real_kube, api.put_pod(ns, "gone"))
    with running(real_kube, tmp_path, leading=lambda: False) as controller:
        r = controller.reclaimer
        gate, entered = threading.Event(), threading.Event()
        original = r.releaser.release_leases

        def held_up(held: Any, summary: Summary | None = None) -> list[int]:
            entered.set()
            assert gate.wait(10)
            return original(held, summary)

        r.releaser.release_leases = held_up  # type: ignore[method-assign]
        r.is_leader = lambda: True
        api.delete_pod(ns, "gone")
        ref = f"{ns}/gone"
        wait_for("the controller saw the deletion", lambda: controller.pods.get(ref) is None)
        r.work([ref])  # judged; its pool's writer waits at the gate
        assert entered.wait(5)
        r.work([ref])  # judged again while the lease is being written: not queued twice
        r.work([ref])
        gate.set()
        r.flush(10)
        time.sleep(0.3)
        assert set(holders(real_kube)) == set()
        assert dict(r.released) == {"pod-gone": 1}
        wait_for("its reservation deleted", lambda: reservations(real_kube) == {})
        r.work([ref])  # and a look after the write finds nothing to release
        r.flush(10)
        assert dict(r.released) == {"pod-gone": 1}


def test_a_failed_pool_write_is_tried_again(
    real_kube: RealKube, engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reclaim, "RETRY_SECONDS", 0.3)
    api, ns = real_kube.api, real_kube.namespace
    add(engine, real_kube, api.put_pod(ns, "gone"))
    with running(real_kube, tmp_path) as controller:
        r = controller.reclaimer
        original = r.releaser.release_leases
        failures = [1]

        def flaky(held: Any, summary: Summary | None = None) -> list[int]:
            if failures and summary is not None:
                failures.pop()
                summary.errors += 1  # as release_leases reports a store error it caught
                return []
            return original(held, summary)

        r.releaser.release_leases = flaky  # type: ignore[method-assign]
        api.delete_pod(ns, "gone")
        wait_for("released on the second try", lambda: holders(real_kube) == {})
        wait_for("counted once", lambda: dict(r.released) == {"pod-gone": 1})
        assert not failures and r.errors == 1


def test_a_terminating_pod_is_looked_up_only_when_its_node_is_dead(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    with node(real_kube) as name_of_node:
        stuck_on_a_node(real_kube, engine, tmp_path, name_of_node)


def stuck_on_a_node(real_kube: RealKube, engine: Engine, tmp_path: Path, node_name: str) -> None:
    api, ns = real_kube.api, real_kube.namespace
    pod = api.put_pod(ns, "stuck", node=node_name)
    meta = pod["metadata"]
    engine.add(
        [SPEC],
        Request(f"ctr-{meta['uid'][:6]}", "net1", f"{ns}/stuck", poduid=meta["uid"], node=node_name),
    )
    with running(real_kube, tmp_path) as controller:
        time.sleep(1)
        with requests_of(controller.client) as seen:
            api.put_pod(ns, "stuck", node=node_name, deleting=True)  # Terminating: no kubelet
            wait_for("the controller saw it Terminating", lambda: bool(controller.pods.terminating()))
            time.sleep(1)
            assert [p for m, p, _ in seen if p.endswith("/pods/stuck")] == []  # healthy node: no GET
            assert set(holders(real_kube)) == {"stuck"}
            taint = {"key": "node.kubernetes.io/out-of-service", "effect": "NoExecute"}
            real_kube.request("PATCH", f"/api/v1/nodes/{node_name}", {"spec": {"taints": [taint]}})
            wait_for("released once its node is out of service", lambda: holders(real_kube) == {})
        r = controller.reclaimer
        wait_for("counted", lambda: dict(r.released) == {"node-out-of-service": 1})
        assert [m for m, p, _ in seen if p.endswith("/pods/stuck")] == ["GET"]


def test_a_reservation_that_changed_hands_since_the_watch_copy_is_not_deleted(
    real_kube: RealKube, engine: Engine, tmp_path: Path
) -> None:
    """The copy names the released container at an older resourceVersion; the reservation now names
    another pod (taken over for the address): the DELETE at the copy's version is refused (409) and
    the fresh read keeps it."""
    api, ns = real_kube.api, real_kube.namespace
    add(engine, real_kube, api.put_pod(ns, "gone"))
    with running(real_kube, tmp_path, leading=lambda: False) as controller:
        r = controller.reclaimer
        ref = f"{ns}/gone"
        wait_for("the reservation is cached", lambda: len(controller.pools.reservations) == 1)
        ((name, copy),) = controller.pools.reservations.items()
        api.delete_pod(ns, "gone")
        wait_for("the controller saw the deletion", lambda: controller.pods.get(ref) is None)
        (judged,) = r.judge(ref)
        # the address changes hands: another pod's container now holds the reservation
        current = reservations(real_kube)[name]
        current["spec"] = {**current["spec"], "containerid": "ctr-newcomer", "podref": f"{ns}/newcomer"}
        real_kube.request(
            "PUT",
            f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{ns}/overlappingrangeipreservations/{name}",
            current,
        )
        wait_for(
            "the watch has the new holder",
            lambda: controller.pools.reservations[name].holder.id == "ctr-newcomer",
        )
        with controller.pools.lock:  # as if the watch had not caught up: the old copy
            controller.pools.reservations[name] = copy
        with requests_of(controller.client) as seen:
            r._unreserve(judged.holding)
        assert reservations(real_kube)[name]["spec"]["containerid"] == "ctr-newcomer"
        assert [m for m, p, _ in seen if name in p] == ["DELETE", "GET"]  # refused, then read: kept
        # a copy at the current version naming the released container is deleted without a read
        fresh = reservations(real_kube)[name]
        fresh["spec"] = {**fresh["spec"], "containerid": judged.holding.lease.id, "podref": ref}
        written = real_kube.request(
            "PUT",
            f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{ns}/overlappingrangeipreservations/{name}",
            fresh,
        )
        version = written["metadata"]["resourceVersion"]
        wait_for("the watch has it", lambda: controller.pools.reservations[name].version == version)
        assert controller.pools.reservations[name] == Reservation.from_object(written)
        with requests_of(controller.client) as seen:
            r._unreserve(judged.holding)
        assert name not in reservations(real_kube)
        assert [m for m, p, _ in seen if name in p] == ["DELETE"]
