"""ipam-controller across a kube-apiserver restart (etcd keeps running): while the API server it
watches is down, pods are deleted through a second API server on the same etcd (an HA control plane's
other member); nothing live is released, and the deletions are released once its watches are back.
Runs on a cluster of its own: it stops and restarts the API server."""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipam.engine import Engine, RetryPolicy
from ipam.store.kubernetes import KubernetesStore
from tests.kubeapi.fixtures import running_cluster
from tests.kubeapi.real import RealAPI, RealCluster, RealKube, free_port
from tests.test_controller import add, holders, start_controller, wait_for

pytestmark = pytest.mark.apiserver


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    yield from running_cluster(tmp_path_factory.mktemp("controller-restart"))


def second_apiserver(cluster: RealCluster) -> RealCluster:
    """Another kube-apiserver on the same etcd, certificates and keys, on a port of its own."""
    peer = copy.copy(cluster)
    peer.port = free_port()
    peer.url = f"https://127.0.0.1:{peer.port}"
    peer.apiserver = None
    peer.start_apiserver()
    peer.wait_crs_served()
    return peer


def test_an_api_server_restart_releases_nothing_live_and_the_deletions_made_meanwhile_after(
    own_cluster: RealCluster, tmp_path: Path
) -> None:
    kube = RealKube(own_cluster, f"r-{uuid.uuid4().hex[:10]}", tmp_path)
    api, ns = kube.api, kube.namespace
    store = KubernetesStore.connect(kube.plugin_kubeconfig(), str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=30))
    pods = {name: api.put_pod(ns, name) for name in ("live1", "live2", "gone1", "gone2")}
    for pod in pods.values():
        add(engine, kube, pod)
    store.close()
    peer = second_apiserver(own_cluster)
    controller = start_controller(kube, tmp_path)
    try:
        time.sleep(1)
        assert set(holders(kube)) == set(pods)

        own_cluster.stop_apiserver()
        through_peer = RealAPI(peer, ns)
        for name in ("gone1", "gone2"):
            through_peer.delete_pod(ns, name)
        time.sleep(3)  # the controller retries its watches meanwhile; it can judge nothing
        assert set(pod["metadata"]["name"] for pod in through_peer.objects("pods", ns)) == {"live1", "live2"}
        seen_by_peer = copy.copy(kube)
        seen_by_peer.api = through_peer
        assert set(holders(seen_by_peer)) == set(pods)  # the controller released nothing meanwhile

        own_cluster.start_apiserver()
        own_cluster.wait_crs_served()
        wait_for(
            "the deletions made during the outage are released",
            lambda: set(holders(kube)) == {"live1", "live2"},
            30,
        )
        time.sleep(1)
        assert set(holders(kube)) == {"live1", "live2"}
        assert dict(controller.reclaimer.released) == {"pod-gone": 2}
        assert controller.informers["pods"].health.restarts >= 1
    finally:
        controller.stop()
        controller.store.close()
        peer.stop_apiserver()
