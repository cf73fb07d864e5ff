"""`ipam-controller`: the watches, the reclaim worker, leader election, metrics and probes, wired."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote

from netaddr import AddrFormatError, IPNetwork

from ..audit import PoolView, Reservation, SlicePool
from ..errors import CNIError, TransientStoreError
from ..log import log
from ..ranges import usable_bounds
from ..reconcile import KubeSource, connection_arguments
from ..store.kubeclient import ApiError
from ..store.kubernetes import GROUP, NODE_SLICES, POOLS, RESERVATIONS, VERSION, KubernetesStore
from . import cache
from .admission import Webhook, webhook_arguments
from .events import Recorder
from .metrics import Collector, metrics_route, registry, serve
from .reclaim import Reclaimer, quiet_reconciler
from .rules import Release
from .watch import Handler, Informer

FINISHED_SELECTOR = "status.phase!=Pending,status.phase!=Running,status.phase!=Unknown"
REQUIRED = ("pods", "finished-pods", "nodes", "ippools")  # listed once before the first sweep


class _PoolsWithUsage:
    """The IPPools' handler: into the cache, then the 95% Warning (leader only)."""

    def __init__(self, pools: cache.Pools, recorder: Recorder, leading: Callable[[], bool]) -> None:
        self.pools, self.recorder, self.leading = pools, recorder, leading

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.pools.replace(items)

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        self.pools.event(kind, obj)
        name = str((obj.get("metadata") or {}).get("name", ""))
        snap = self.pools.pools.get(name)
        if kind == "DELETED" or snap is None or not self.leading():
            return
        try:
            first, last = usable_bounds(IPNetwork(snap.cidr))
        except (AddrFormatError, ValueError, TypeError):
            return
        view = PoolView(snap, "", "", last - first + 1)
        self.recorder.pool_usage(self.pools.namespace, name, view.used(), view.size)


def _out_of_the_collectors_sight() -> None:
    """What the LISTs filled the caches with lives until the next LIST: frozen, the cyclic
    collector's full passes no longer walk it. At 10,000 pods each pass took 0.1-0.2 s with every
    thread stopped, about every 10 s under a burst of releases, holding each release in flight;
    frozen, 15-60 ms (bench.controller). Before freezing, one full pass (once per LIST, which is
    rare) frees what the last freeze kept that has since become cyclic garbage."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Controller:
    def __init__(
        self,
        store: KubernetesStore,
        leading: Callable[[], bool],
        instance: str,
        not_ready_after: float | None = None,
    ) -> None:
        self.store = store
        self.client = store.client
        self.namespace = store.namespace
        self.leading = leading
        self.recorder = Recorder(self.client, instance)
        self.pods = cache.Pods(self._notify)
        self.finished = cache.Finished(self._notify)
        self.nodes = cache.Nodes(self._nodes_changed)
        self.pools = cache.Pools(self.namespace, self._notify)
        self.reclaimer = Reclaimer(
            self.pods,
            self.finished,
            self.nodes,
            self.pools,
            self.get_pod,
            quiet_reconciler(KubeSource(store)),
            leading,
            not_ready_after,
            self._released,
        )
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(self.namespace, safe='')}"
        usage = _PoolsWithUsage(self.pools, self.recorder, leading)
        specs: list[tuple[str, str, Handler, dict[str, str] | None, bool]] = [
            ("pods", "/api/v1/pods", self.pods, None, True),
            ("finished-pods", "/api/v1/pods", self.finished, {"fieldSelector": FINISHED_SELECTOR}, True),
            ("nodes", "/api/v1/nodes", self.nodes, None, False),  # taints, Ready: not metadata
            ("ippools", f"{base}/{POOLS}", usage, None, False),
            (
                "nodeslicepools",
                f"{base}/{NODE_SLICES}",
                cache.Into(self.pools, "slice_pools", SlicePool.from_object),
                None,
                False,
            ),
            (
                "reservations",
                f"{base}/{RESERVATIONS}",
                cache.Into(self.pools, "reservations", Reservation.from_object),
                None,
                False,
            ),
        ]
        self.informers = {
            name: Informer(
                self.client, name, path, handler, params, metadata_only=meta, on_synced=self._synced
            )
            for name, path, handler, params, meta in specs
        }
        self._synced_once: set[str] = set()
        self._lock = threading.Lock()

    # -- wiring -----------------------------------------------------------------------------------

    def _notify(self, refs: Any) -> None:
        self.reclaimer.notify(refs)

    def _nodes_changed(self) -> None:
        self.reclaimer.nodes_changed()

    def _synced(self, resource: str) -> None:
        with self._lock:
            self._synced_once.add(resource)
            ready = all(r in self._synced_once for r in REQUIRED)
        if ready:
            _out_of_the_collectors_sight()
            self.reclaimer.sweep()  # the first time, and after every later (re-)LIST

    def ready(self) -> bool:
        return all(self.informers[r].health.synced for r in REQUIRED)

    def became_leader(self) -> None:
        if self.ready():
            self.reclaimer.sweep()

    def _released(self, release: Release) -> None:
        h = release.holding
        self.recorder.released(h.lease.podref, h.lease.poduid, h.address, h.pool.name, release.reason)

    def get_pod(self, ref: str) -> dict[str, Any] | None:
        """The pod as etcd has it now (a GET without resourceVersion is a consistent read)."""
        namespace, _, name = ref.partition("/")
        path = f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
        try:
            pod: dict[str, Any] = self.client.request("GET", path)
            return pod
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise TransientStoreError(f"get pod {ref}: HTTP {exc.status} {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise TransientStoreError(f"get pod {ref}: {exc}") from None

    def start(self) -> None:
        self.reclaimer.start()
        for informer in self.informers.values():
            informer.start()

    def stop(self) -> None:
        for informer in self.informers.values():
            informer.stop()
        self.reclaimer.stop()
        for informer in self.informers.values():
            informer.join(timeout=5)

    def collector(self) -> Collector:
        return Collector(
            self.pools,
            self.pods,
            self.finished,
            {name: i.health for name, i in self.informers.items()},
            self.leading,
            lambda: dict(self.reclaimer.released),
            lambda: dict(self.recorder.counts),
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ipam-controller",
        description="Release whereabouts-py leases of deleted pods within seconds (watch-driven), export "
        "pool usage to Prometheus, and record Events. ipam-reconcile (the CronJob) stays the full-scan "
        "safety net.",
    )
    connection_arguments(parser)
    parser.add_argument(
        "--metrics-bind-address", default=":8080", help="host:port of /metrics ('0' disables it)"
    )
    parser.add_argument(
        "--health-probe-bind-address",
        default=":8081",
        help="host:port of /healthz and /readyz ('0' disables)",
    )
    parser.add_argument(
        "--leader-elect",
        action="store_true",
        help="take the coordination.k8s.io Lease whereabouts-py-controller in --namespace before writing",
    )
    parser.add_argument(
        "--release-after-not-ready",
        type=float,
        metavar="SECONDS",
        help="also release the leases of a Terminating pod whose node has been NotReady this long "
        "(off by default: a partitioned node may still use the address)",
    )
    webhook_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.release_after_not_ready is not None and args.release_after_not_ready < 0:
        sys.stderr.write("error: --release-after-not-ready must be >= 0\n")
        return 2
    try:
        store = KubernetesStore.connect(
            args.kubeconfig, tempfile.gettempdir() + "/whereabouts-py-controller", args.namespace
        )
    except CNIError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    instance = os.environ.get("POD_NAME") or os.uname().nodename
    from .leader import Elector, configure_client

    elector: Elector | None = None

    def leading() -> bool:
        return elector.leading() if elector is not None else True  # alone: always the leader

    controller = Controller(store, leading, instance, args.release_after_not_ready)
    if args.leader_elect:
        elector = Elector(configure_client(args.kubeconfig), store.namespace, controller.became_leader)
    if args.metrics_bind_address != "0":
        serve(args.metrics_bind_address, {"/metrics": metrics_route(registry(controller.collector()))})
    if args.health_probe_bind_address != "0":
        c = controller
        serve(
            args.health_probe_bind_address,
            {
                "/healthz": lambda: (200, "text/plain", b"ok\n"),
                "/readyz": lambda: (
                    (200, "text/plain", b"ok\n") if c.ready() else (503, "text/plain", b"syncing\n")
                ),
            },
        )
    webhook: Webhook | None = None
    if args.webhook_bind_address:
        from ..webhook_certs import CertError

        try:
            webhook = Webhook(args, store)
        except (CertError, OSError, ValueError) as exc:
            sys.stderr.write(f"error: --webhook-bind-address: {exc}\n")
            store.close()
            return 1
    controller.start()
    if elector is not None:
        elector.start()
    log.info(
        "controller.started",
        namespace=store.namespace,
        leader_elect=args.leader_elect,
        webhook=args.webhook_bind_address or "off",
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if webhook is not None:
            webhook.stop()
        if elector is not None:
            elector.stop()
        controller.stop()
        store.close()
    return 0
