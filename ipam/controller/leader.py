"""Leader election through one coordination.k8s.io Lease in the controller's namespace, done by the
`kubernetes` package's `leaderelection` (LeaseLock), as client-go does it: 15 s lease, renewed every
2 s, leadership given up when a renewal has not succeeded for 10 s (before another replica may take the
Lease). Only the leader writes; the others keep their caches warm (metrics) and wait.

The Lease is shipped with the manifests (deploy/base/controller.yaml), so the controller's RBAC names
it by `resourceNames` (get, update) and needs no `create` on Leases at all.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from ..log import log

LEASE_NAME = "whereabouts-py-controller"
LEASE_SECONDS = 15
RENEW_DEADLINE = 10
RETRY_PERIOD = 2


def identity() -> str:
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"


def configure_client(kubeconfig: str | None) -> Any:
    """The `kubernetes` package's ApiClient, from the same kubeconfig (or the in-cluster account)."""
    from kubernetes import client
    from kubernetes import config as untyped_config

    config: Any = untyped_config  # untyped functions
    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        config.load_incluster_config(client_configuration=configuration)
    return client.ApiClient(configuration)


class Elector:
    """Campaigns for the Lease forever on a daemon thread; `leading` is True only while this replica
    holds it (as renewed within the renew deadline)."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        on_started: Callable[[], None],
        name: str = LEASE_NAME,
        lease_seconds: int = LEASE_SECONDS,
        renew_deadline: int = RENEW_DEADLINE,
        retry_period: int = RETRY_PERIOD,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.name = name
        self.identity = identity()
        self.on_started = on_started
        self.timing = (lease_seconds, renew_deadline, retry_period)
        self._leading = threading.Event()
        self.stopping = threading.Event()
        logging.getLogger("leaderelection").setLevel(logging.WARNING)  # it logs every renewal at INFO

    def stop(self) -> None:
        self.stopping.set()
        self._leading.clear()

    def leading(self) -> bool:
        return self._leading.is_set()

    def start(self) -> None:
        threading.Thread(target=self._campaign, name="leader-election", daemon=True).start()

    def _started(self) -> None:
        self._leading.set()
        log.info("controller.leader.started", identity=self.identity, lease=f"{self.namespace}/{self.name}")
        self.on_started()

    def _stopped(self) -> None:
        self._leading.clear()
        log.warning("controller.leader.stopped", identity=self.identity)

    def _campaign(self) -> None:
        from kubernetes import client
        from kubernetes.leaderelection import electionconfig as untyped_cfg
        from kubernetes.leaderelection import leaderelection as untyped_le
        from kubernetes.leaderelection.resourcelock import leaselock

        electionconfig: Any = untyped_cfg
        leaderelection: Any = untyped_le
        LeaseLock: Any = leaselock.LeaseLock

        stopping = self.stopping

        class Lock(LeaseLock):  # type: ignore[misc]
            """Once stopping, every read and write of the Lease fails: leadership ends within the renew
            deadline and is never taken again (the package's loops have no stop of their own)."""

            def get(self, name: str, namespace: str) -> Any:
                if stopping.is_set():
                    return False, None
                return super().get(name, namespace)

            def update(self, name: str, namespace: str, record: Any) -> bool:
                return not stopping.is_set() and bool(super().update(name, namespace, record))

        while not self.stopping.is_set():
            lock = Lock(self.name, self.namespace, self.identity)
            lock.api_instance = client.CoordinationV1Api(self.api_client)
            lease, renew, retry = self.timing
            cfg = electionconfig.Config(lock, lease, renew, retry, self._started, self._stopped)
            try:
                leaderelection.LeaderElection(cfg).run()  # returns when leadership is lost
            except Exception as exc:  # the package raises whatever its client raised
                log.warning("controller.leader.error", error=str(exc))
            self._stopped()
            time.sleep(retry)
