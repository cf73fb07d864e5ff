"""List-then-watch of one resource (an informer), on the project's standard-library client.

A paged LIST gives every object and a resourceVersion; a WATCH from that version gives every change
after it, with bookmarks (`allowWatchBookmarks`) so a quiet resource's version still moves on. A
dropped connection (API server restart) is resumed from the last version seen; 410 Gone (the version
was compacted away) means a fresh LIST, whose result replaces the cache (`replace`). Pods are read as
metadata only (`PartialObjectMetadata`): the controller never holds pod specs.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..log import log
from ..store.kubeclient import ApiError, KubeClient

JSON = "application/json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
WATCH_SECONDS = 300  # the server ends a watch after about this long; it is resumed at once
PAGE = 500


def _without_managed_fields(items: list[Any]) -> list[Any]:
    """`items` with each object's `metadata.managedFields` dropped: no cache reads them, and a LIST
    holds every page until its last one. An ordinary pod's managedFields (every field path of its
    spec, per manager) are most of its metadata: at 10,000 pods they made most of the controller's
    memory peak during its first LIST."""
    for item in items:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if isinstance(meta, dict):
            meta.pop("managedFields", None)
    return items


class Handler(Protocol):
    def replace(self, items: list[dict[str, Any]]) -> None:
        """Every object, after a (re-)LIST: the cache becomes exactly these."""

    def event(self, kind: str, obj: dict[str, Any]) -> None:
        """ADDED, MODIFIED or DELETED."""


class Gone(Exception):
    """410: the resourceVersion asked for is older than the server keeps."""


@dataclass
class WatchHealth:
    """What the metrics tell about one watch."""

    synced: bool = False  # a LIST succeeded and the watch is (or was last) connected
    connected: bool = False
    restarts: int = 0  # watches that ended in an error (not the server's normal timeout)
    relists: int = 0
    last_event: float = 0.0  # wall-clock time of the last event or bookmark


class Informer(threading.Thread):
    """One resource's LIST + WATCH loop on a daemon thread; `handler` gets every change in order."""

    def __init__(
        self,
        client: KubeClient,
        name: str,
        path: str,
        handler: Handler,
        params: dict[str, str] | None = None,
        metadata_only: bool = False,
        on_synced: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(name=f"watch-{name}", daemon=True)
        self.client = client
        self.resource = name
        self.path = path
        self.handler = handler
        self.params = dict(params or {})
        self.accept_list = METADATA_LIST if metadata_only else JSON
        self.accept_watch = METADATA if metadata_only else JSON
        self.on_synced = on_synced
        self.health = WatchHealth()
        self.stopping = threading.Event()
        self._conn: http.client.HTTPConnection | None = None

    def stop(self) -> None:
        self.stopping.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked read

    def run(self) -> None:
        version: str | None = None
        backoff = 0.2
        while not self.stopping.is_set():
            try:
                if version is None:
                    version = self._list()
                    self.health.synced = True
                    if self.on_synced is not None:
                        self.on_synced(self.resource)
                version = self._watch(version)
                backoff = 0.2
            except Gone:
                log.info("controller.watch.gone", resource=self.resource)
                version = None
            except (ApiError, OSError, http.client.HTTPException, ValueError, AttributeError) as exc:
                # AttributeError: http.client reading a response whose connection was shut
                self.health.connected = False
                if self.stopping.is_set():
                    return
                self.health.restarts += 1
                log.warning("controller.watch.error", resource=self.resource, error=str(exc))
                if isinstance(exc, ApiError) and exc.status == 410:
                    version = None
                self.stopping.wait(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 5.0)

    def _list(self) -> str:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params = {**self.params, "limit": str(PAGE)}
            if token:
                params["continue"] = token
            try:
                page = self.client.request("GET", self.path, params=params, accept=self.accept_list)
            except ApiError as exc:
                if exc.status == 410:  # the continue token expired: list again from the start
                    items, token = [], None
                    continue
                raise
            items += _without_managed_fields(page.get("items") or [])
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                self.health.relists += 1
                self.handler.replace(items)
                return str(meta.get("resourceVersion", ""))

    def _watch(self, version: str) -> str:
        """Follow changes from `version` until the server ends the watch; the last version seen."""
        params = {
            **self.params,
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        conn, response = self.client.stream(self.path, params, self.accept_watch, WATCH_SECONDS + 30)
        self._conn = conn
        self.health.connected = True
        try:
            while not self.stopping.is_set():
                line = response.readline()
                if not line:
                    return version  # the server's timeout: resume from here
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise Gone()
                    raise ValueError(f"watch error: {obj.get('message', obj)}")
                version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
                self.health.last_event = time.time()
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.handler.event(str(kind), _without_managed_fields([obj])[0])
            return version
        finally:
            self.health.connected = False
            self._conn = None
            conn.close()
