"""The controller's informers hand their caches objects without `metadata.managedFields`: no cache
reads them, and an ordinary pod's (every field path of its spec, per manager) were most of the
controller's memory peak while its first LIST held every page (bench.controller). On the real
kube-apiserver, which writes managedFields on every object."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import quote

from ipam.controller.watch import Informer
from ipam.store.kubeclient import KubeClient, load_kubeconfig
from tests.kubeapi.real import RealKube
from tests.test_controller import wait_for


class Recorder:
    def __init__(self) -> None:
        self.listed: list[dict[str, Any]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()

    def replace(self, items: list[dict[str, Any]]) -> None:
        with self.lock:
            self.listed = items

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.events.append((kind, obj))


def test_listed_and_watched_objects_come_without_managed_fields(real_kube: RealKube) -> None:
    api, ns = real_kube.api, real_kube.namespace
    api.put_pod(ns, "before")
    stored = real_kube.cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/before")
    assert stored["metadata"].get("managedFields"), "the server keeps managedFields: the test means it"
    client = KubeClient(load_kubeconfig(real_kube.kubeconfig_path))
    recorder = Recorder()
    synced = threading.Event()
    informer = Informer(
        client,
        "pods",
        f"/api/v1/namespaces/{quote(ns)}/pods",
        recorder,
        metadata_only=True,
        on_synced=lambda _r: synced.set(),
    )
    informer.start()
    try:
        assert synced.wait(30)
        assert [o["metadata"]["name"] for o in recorder.listed] == ["before"]
        api.put_pod(ns, "after")
        wait_for(
            "the new pod's events", lambda: any(o["metadata"]["name"] == "after" for _, o in recorder.events)
        )
        seen = [o for o in recorder.listed] + [o for _, o in recorder.events]
        assert all("managedFields" not in o["metadata"] for o in seen)
        # what the caches do read is still there
        assert all(o["metadata"]["uid"] and o["metadata"]["name"] for o in seen)
    finally:
        informer.stop()
        informer.join(10)
        client.close()
