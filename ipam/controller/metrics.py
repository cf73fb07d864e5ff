"""Prometheus metrics, computed from the watch caches when scraped (no polling of the API server).

Per pool, labelled as `ipamctl show` lists pools (`network`, and `range`: the IPPool's range, a node's
slice for node slices), so the figures equal its USED/FREE columns.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .. import audit
from .cache import Finished, Pods, Pools
from .watch import WatchHealth

PREFIX = "whereabouts_py_"


def pool_figures(pools: Pools, pods: Pods, finished: Finished) -> list[tuple[str, str, int, int, int, int]]:
    """(network, range, size, allocated, retained, pending) per pool, as the caches see it. Of the
    leases whose pod is not live (gone, replaced by a new UID, finished): `retained` are kept on
    purpose (sticky retention marks them `retained`), `pending` are leaks not released yet."""
    out = []
    for v in pools.views():
        retained = pending = 0
        for lease in v.snapshot.allocations.values():
            if not lease.podref:
                continue
            meta = pods.get(lease.podref)
            live = (
                meta is not None
                and not (lease.poduid and meta.uid and lease.poduid != meta.uid)
                and not finished.has(lease.podref, meta.uid)
            )
            if live:
                continue
            if getattr(lease, "retained", ""):  # sticky retention (issue 23), once merged
                retained += 1
            else:
                pending += 1
        out.append((v.network, v.snapshot.cidr, v.size, v.used(), retained, pending))
    return out


class Collector:
    """A prometheus_client collector over the caches; `leader`, `released` and `watches` are read live."""

    def __init__(
        self,
        pools: Pools,
        pods: Pods,
        finished: Finished,
        watches: Mapping[str, WatchHealth],
        leader: Callable[[], bool],
        released: Callable[[], Mapping[str, int]],
        events: Callable[[], Mapping[str, int]],
    ) -> None:
        self.pools, self.pods, self.finished, self.watches = pools, pods, finished, watches
        self.leader, self.released, self.events = leader, released, events
        self._orphans: tuple[int, int] = (-1, 0)  # (cache generation, count): the audit is not free
        self._lock = threading.Lock()

    def orphan_reservations(self) -> int:
        with self._lock:
            generation = self.pools.generation
            if self._orphans[0] != generation:
                problems = audit.audit(self.pools.inventory(), datetime.now(UTC), float("inf"))
                self._orphans = (generation, sum(1 for p in problems if p.kind == audit.ORPHAN))
            return self._orphans[1]

    def collect(self) -> Iterator[Metric]:
        labels = ["network", "range"]
        size = GaugeMetricFamily(
            PREFIX + "pool_size_addresses", "Usable addresses of the pool's range.", labels=labels
        )
        allocated = GaugeMetricFamily(
            PREFIX + "pool_allocated_addresses", "Addresses leased in the pool.", labels=labels
        )
        retained = GaugeMetricFamily(
            PREFIX + "pool_retained_addresses",
            "Leases kept on purpose for a pod that is gone (sticky retention).",
            labels=labels,
        )
        free = GaugeMetricFamily(
            PREFIX + "pool_free_addresses", "Addresses of the pool not leased.", labels=labels
        )
        leaks = 0
        for network, cidr, n, used, kept, pending in pool_figures(self.pools, self.pods, self.finished):
            leaks += pending
            key = (network, cidr)
            size.add_metric(list(key), n)
            allocated.add_metric(list(key), used)
            retained.add_metric(list(key), kept)
            free.add_metric(list(key), max(0, n - used))
        yield from (size, allocated, retained, free)
        yield GaugeMetricFamily(
            PREFIX + "leaks_pending",
            "Leases whose pod is gone, replaced or finished, not retained and not released yet.",
            value=leaks,
        )

        slices = GaugeMetricFamily(PREFIX + "node_slices", "Node slices held, per node.", labels=["node"])
        held: Counter[str] = Counter()
        with self.pools.lock:
            for sp in self.pools.slice_pools.values():
                for sl in sp.slices:
                    if sl.node:
                        held[sl.node] += 1
        for node, count in sorted(held.items()):
            slices.add_metric([node], count)
        yield slices

        released = CounterMetricFamily(
            PREFIX + "leases_released", "Leases the controller released, by reason.", labels=["reason"]
        )
        for reason, count in sorted(self.released().items()):
            released.add_metric([reason], count)
        yield released
        events = CounterMetricFamily(
            PREFIX + "events",
            "Kubernetes Events the controller emitted or dropped (rate limit).",
            labels=["result"],
        )
        for result, count in sorted(self.events().items()):
            events.add_metric([result], count)
        yield events

        yield GaugeMetricFamily(
            PREFIX + "orphan_reservations", "Reservations no lease backs.", value=self.orphan_reservations()
        )
        yield GaugeMetricFamily(
            PREFIX + "pods_cached", "Pods in the controller's metadata cache.", value=len(self.pods)
        )

        up = GaugeMetricFamily(
            PREFIX + "watch_healthy", "1 while the watch is listed and connected.", labels=["resource"]
        )
        restarts = CounterMetricFamily(
            PREFIX + "watch_restarts", "Watches that ended in an error and were resumed.", labels=["resource"]
        )
        relists = CounterMetricFamily(
            PREFIX + "watch_relists", "Full LISTs (start, 410 Gone).", labels=["resource"]
        )
        last = GaugeMetricFamily(
            PREFIX + "watch_last_event_timestamp_seconds",
            "When the watch last delivered an event or bookmark.",
            labels=["resource"],
        )
        for name, h in sorted(self.watches.items()):
            up.add_metric([name], 1 if h.synced and h.connected else 0)
            restarts.add_metric([name], h.restarts)
            relists.add_metric([name], h.relists)
            last.add_metric([name], h.last_event)
        yield from (up, restarts, relists, last)
        yield GaugeMetricFamily(
            PREFIX + "controller_is_leader",
            "1 while this replica holds the leader Lease.",
            value=int(self.leader()),
        )


def registry(collector: Collector) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def serve(address: str, routes: Mapping[str, Callable[[], tuple[int, str, bytes]]]) -> ThreadingHTTPServer:
    """An HTTP server on `host:port` answering GET for `routes` (path -> (status, content type, body))."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            status, ctype, body = route() if route else (404, "text/plain", b"not found\n")
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes and probes are not logged

    server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{address}", daemon=True).start()
    return server


def metrics_route(reg: CollectorRegistry) -> Callable[[], tuple[int, str, bytes]]:
    return lambda: (200, CONTENT_TYPE_LATEST, generate_latest(reg))
