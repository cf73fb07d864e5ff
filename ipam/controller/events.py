"""Kubernetes Events (events.k8s.io/v1), rate-limited: a token bucket for all of them (5 a second,
bursts of 25), and one Warning per IPPool crossing 95% (again only after it fell below 90%).
Events are best effort: one that cannot be written, or is over the limit, is counted and dropped."""

from __future__ import annotations

import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from ..log import log
from ..store.kubeclient import ApiError, KubeClient

CONTROLLER = "whereabouts-py.cni.cncf.io/ipam-controller"
FULL = 0.95
CLEARED = 0.90


class Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens = float(burst)
        self.at = time.monotonic()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < 1:
                return False
            self.tokens -= 1
            return True


class Recorder:
    def __init__(self, client: KubeClient, instance: str, rate: float = 5.0, burst: int = 25) -> None:
        self.client = client
        self.instance = instance
        self.bucket = Bucket(rate, burst)
        self.counts: Counter[str] = Counter()  # emitted, dropped, failed
        self.full: set[str] = set()  # IPPools (namespace/name) warned about and not yet below CLEARED

    def emit(
        self, regarding: dict[str, str], reason: str, note: str, action: str, warning: bool = False
    ) -> None:
        if not self.bucket.take():
            self.counts["dropped"] += 1
            return
        now = datetime.now(UTC)
        namespace = regarding.get("namespace") or "default"
        body: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {
                "name": f"{regarding.get('name', 'ipam')}.{time.time_ns():x}",
                "namespace": namespace,
            },
            "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "reportingController": CONTROLLER,
            "reportingInstance": self.instance,
            "action": action,
            "reason": reason,
            "note": note[:1024],
            "type": "Warning" if warning else "Normal",
            "regarding": regarding,
        }
        try:
            self.client.request("POST", f"/apis/events.k8s.io/v1/namespaces/{namespace}/events", body)
        except (ApiError, OSError) as exc:
            self.counts["failed"] += 1
            log.warning(
                "controller.event.failed",
                reason=reason,
                error=str(exc),
                detail=getattr(exc, "body", "")[:300],
            )
            return
        self.counts["emitted"] += 1

    def released(self, podref: str, uid: str, address: str, pool: str, why: str) -> None:
        namespace, _, name = podref.partition("/")
        regarding = {"apiVersion": "v1", "kind": "Pod", "namespace": namespace, "name": name}
        if uid:
            regarding["uid"] = uid
        note = f"released {address} in IPPool {pool}: {why}"
        self.emit(regarding, "AddressReleased", note, "Release")

    def pool_usage(self, namespace: str, pool: str, used: int, size: int) -> None:
        """A Warning when the pool crosses FULL (once, until it falls below CLEARED)."""
        key = f"{namespace}/{pool}"
        share = used / size if size else 0.0
        if share < CLEARED:
            self.full.discard(key)
            return
        if share < FULL or key in self.full:
            return
        self.full.add(key)
        regarding = {
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "IPPool",
            "namespace": namespace,
            "name": pool,
        }
        note = f"IPPool {pool} is {round(share * 100)}% full: {used} of {size} addresses leased"
        self.emit(regarding, "PoolNearlyFull", note, "Allocate", warning=True)
