"""The `kubernetes` datastore: leases in IPPool custom resources, written with optimistic concurrency.

Pools and reservations use Whereabouts' group, version, names and field layout, so a cluster can
move between Whereabouts and whereabouts-py without renumbering pods. Every pool write is a PUT at
the resourceVersion that was read; the API server's 409 Conflict sends the engine back to re-read.
Requests go through `kubeclient` (standard library HTTP): the `kubernetes` package costs ~0.4 s to
import, which every direct-mode CNI call would pay.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NoReturn, cast

from .. import errors
from ..allocator import Allocations, Lease, dump_allocations, parse_allocations
from ..errors import CNIError, ConflictError, PoolRetiredError, TransientStoreError
from ..slices import RETIRED_ANNOTATION, NodeSlices, SliceEntry, parse_time, slice_marks
from ..slices import from_object as node_slices_from_object
from ..slices import to_status as slice_status
from .base import (
    ADDRESS_ANNOTATION,
    PoolSnapshot,
    StandingTurn,
    Turn,
    TurnsUnavailable,
    check_range,
    name_taken,
    recorded_address,
    turn_name,
)
from .kubeclient import (
    ApiError,
    CredentialPluginError,
    Credentials,
    KubeClient,
    KubeconfigError,
    in_cluster,
    load_kubeconfig,
    load_with_plugins,
    path_quote,
)
from .locks import pool_generation, pool_lock
from .slicestore import SlicePoolView

if TYPE_CHECKING:
    from ..config import Config

GROUP = "whereabouts.cni.cncf.io"
VERSION = "v1alpha1"
POOLS = "ippools"
RESERVATIONS = "overlappingrangeipreservations"
NODE_SLICES = "nodeslicepools"
DEFAULT_NAMESPACE = "kube-system"
TURNS = "writerturns"
# an object's metadata alone, else (a server that cannot) the whole object
JSON_PATCH = "application/json-patch+json"
BASE_SECONDS = 10.0  # a release's answer is the next release's starting point for this long
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"
REQUEST_TIMEOUT = (5.0, 15.0)  # connect, read: one slow request must not eat the whole deadline
# A kube-apiserver that has just (re)started answers 403 to every ServiceAccount until its RBAC cache
# has synced ("clusterrole ... not found"), seen for ~1 s on the real server: a refusal is retried for
# this long after the first one, then reported as final (bad credentials or RBAC).
AUTH_SETTLE_SECONDS = 10.0
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}


# etcd refuses a write larger than its request limit (--max-request-bytes, 1.5 MiB by default): the
# API server answers 500 with etcd's words, or 413 above its own 3 MiB body limit. Never transient.
_TOO_LARGE = ("request is too large", "trying to send message larger than max")


def _too_large(status: int, exc: ApiError) -> bool:
    return status == 413 or (status == 500 and any(t in str(exc.body or "") for t in _TOO_LARGE))


def _raise_api(exc: ApiError, what: str) -> NoReturn:
    """Map an API error to the engine's vocabulary: conflict, transient, or a final CNI error."""
    status = int(exc.status or 0)
    if status == 409:
        raise ConflictError(f"{what}: {exc.reason}")
    if _too_large(status, exc):
        raise CNIError(
            errors.DATASTORE_ERROR,
            f"{what}: the object is too large for the API server's storage (etcd's request-size limit, "
            "~1.5 MiB: about 7,000 leases as whereabouts-py writes them, 10,000 in Whereabouts' layout), so "
            "this pool cannot grow; split the range into smaller ranges or use node slices "
            "(node_slice_size) so that no one IPPool holds every lease",
            str(exc.body or exc.reason),
        )
    if status in _TRANSIENT_STATUS or status == 0:
        raise TransientStoreError(f"{what}: HTTP {status} {exc.reason}", exc.retry_after())
    if status in (401, 403):
        raise CNIError(
            errors.DATASTORE_ERROR,
            f"{what}: the API server refused the plugin's credentials (HTTP {status}); check the kubeconfig and RBAC",
            str(exc.body or exc.reason),
        )
    raise CNIError(errors.DATASTORE_ERROR, f"{what}: HTTP {status} {exc.reason}", str(exc.body or ""))


def _turn(obj: dict[str, Any]) -> Turn:
    """A WriterTurn object as the Turn that names exactly it (a delete's preconditions)."""
    meta = obj["metadata"]
    return Turn(str(meta["name"]), str(meta["uid"]), str(meta["resourceVersion"]))


class KubernetesStore:
    def __init__(self, client: KubeClient, namespace: str, lock_dir: str) -> None:
        self.client = client
        self.namespace = namespace
        self.lock_dir = lock_dir
        self.auth_settle_seconds = AUTH_SETTLE_SECONDS
        self._refusals: tuple[float, float] | None = None  # (first, last) 401/403 of the current run
        self._bases: dict[str, tuple[float, dict[str, Any]]] = {}  # pool -> (when, as a release wrote it)
        self._bases_lock = threading.Lock()  # the controller's writers release in several pools at once

    @classmethod
    def from_config(cls, cfg: Config) -> KubernetesStore:
        """The CNI path (direct mode and the node agent): the node kubeconfig, inline credentials only."""
        lock_dir = os.path.join(cfg.ipam.data_dir, "locks")
        store = cls.connect(cfg.ipam.kubernetes.kubeconfig, lock_dir, inline_only=True)
        # TCP + TLS now, so a node lock taken later is held for the requests alone; a server that is not
        # there is reported by the first request (and retried by the engine)
        with contextlib.suppress(OSError, http.client.HTTPException):
            store.client.warm()
        return store

    @classmethod
    def connect(
        cls,
        kubeconfig: str | None,
        lock_dir: str,
        namespace: str | None = None,
        *,
        inline_only: bool = False,
    ) -> KubernetesStore:
        """Client from `kubeconfig` (in-cluster service account when None); pools in `namespace`,
        else the current context's namespace, else kube-system (Whereabouts' rule).

        With `inline_only` (the CNI path) the kubeconfig goes through `ipam.kubeconfig`'s policy: a
        root-owned file with inline credentials, never exec, auth-provider or credential file paths.
        Tools run by an administrator (the reconciler) load any kubeconfig: credential files, tokenFile,
        and exec/auth-provider plugins (those through the `kubernetes` package, imported only then)."""
        creds: Credentials
        try:
            if kubeconfig and inline_only:
                from ..kubeconfig import load_node_kubeconfig

                node = load_node_kubeconfig(kubeconfig)  # its own code 7 errors, naming the key
                creds, context_ns = node, node.namespace
            elif kubeconfig:
                try:
                    loaded = load_kubeconfig(kubeconfig)
                except CredentialPluginError:
                    loaded = load_with_plugins(kubeconfig)
                creds, context_ns = loaded, loaded.namespace
            else:
                creds = in_cluster()
                context_ns = os.environ.get("WHEREABOUTS_NAMESPACE")
            client = KubeClient(creds, timeout=REQUEST_TIMEOUT)
            if kubeconfig:  # the installer renews the node's token by replacing the kubeconfig
                from .renewal import KubeconfigToken

                read = (lambda path: load_node_kubeconfig(path).token) if inline_only else None
                client.kubeconfig_token = KubeconfigToken(kubeconfig, read)
        except (KubeconfigError, OSError, ValueError, TypeError) as exc:
            key = "ipam.kubernetes.kubeconfig"
            raise CNIError(
                errors.INVALID_CONFIG, f"invalid config: {key}: {kubeconfig!r} cannot be loaded", str(exc)
            ) from None
        return cls(client, namespace or context_ns or DEFAULT_NAMESPACE, lock_dir)

    def _path(self, plural: str, name: str | None = None) -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{path_quote(self.namespace)}/{plural}"
        return base if name is None else f"{base}/{path_quote(name)}"

    # -- pools ----------------------------------------------------------------------------------

    def _call(
        self,
        what: str,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        missing_ok: bool = False,
        accept: str | None = None,
    ) -> Any:
        """One API request, its JSON answer decoded. 404 gives None when `missing_ok`; every other
        failure is mapped by `_raise_api`, connection errors are transient. `accept`: another Accept
        header than plain JSON."""
        try:
            if accept is not None:
                return self.client.request(method, path, body, params, accept=accept)
            return self.client.request(method, path, body, params)
        except ApiError as exc:
            if exc.status == 404 and missing_ok:
                return None
            self._raise(exc, what)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise TransientStoreError(f"{what}: {type(exc).__name__}: {exc}") from None

    def _raise(self, exc: ApiError, what: str) -> NoReturn:
        """`_raise_api`, except that 401/403 are retried for `auth_settle_seconds` after the first of a
        run of refusals (a run ends when none came for that long): a just-started API server's RBAC."""
        if exc.status in (401, 403):
            now = time.monotonic()
            first = now
            if self._refusals is not None and now - self._refusals[1] < self.auth_settle_seconds:
                first = self._refusals[0]
            self._refusals = (first, now)
            if now - first < self.auth_settle_seconds:
                raise TransientStoreError(
                    f"{what}: HTTP {exc.status} (retried: the API server may be starting)"
                )
        _raise_api(exc, what)

    def _snapshot(self, obj: dict[str, Any], name: str, cidr: str) -> PoolSnapshot:
        spec = obj.get("spec") or {}
        try:
            allocations = parse_allocations(spec.get("allocations") or {})
        except ValueError as exc:
            raise CNIError(
                errors.DATASTORE_CORRUPT,
                f"IPPool {self.namespace}/{name} has unreadable allocations",
                str(exc),
            ) from None
        version = str(obj.get("metadata", {}).get("resourceVersion", ""))
        return PoolSnapshot(name, str(spec.get("range") or cidr), allocations, version, token=obj)

    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        obj = self._call(f"get IPPool {name}", "GET", self._path(POOLS, name), missing_ok=True)
        if obj is None:
            return PoolSnapshot(name, cidr, {}, None)
        if RETIRED_ANNOTATION in ((obj.get("metadata") or {}).get("annotations") or {}):
            raise PoolRetiredError(name)  # node slices: reclaim is returning this pool's slice
        snapshot = self._snapshot(obj, name, cidr)
        check_range(name, snapshot.cidr, cidr)
        return snapshot

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> PoolSnapshot | None:
        check_range(
            snapshot.name, str(((snapshot.token or {}).get("spec") or {}).get("range") or ""), snapshot.cidr
        )
        sent = dump_allocations(allocations)
        spec: dict[str, Any] = {"range": snapshot.cidr, "allocations": sent}
        if snapshot.version is None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IPPool",
                "metadata": {"name": snapshot.name, "namespace": self.namespace},
                "spec": spec,
            }
            created = self._call(f"create IPPool {snapshot.name}", "POST", self._path(POOLS), body)
            return self._written(created, snapshot, sent, allocations)
        old: dict[str, Any] = snapshot.token or {}
        body = {
            **old,
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IPPool",
            # managedFields (as large as the leases on a big pool) stay the server's: omitted, they are kept
            "metadata": {
                **{k: v for k, v in old.get("metadata", {}).items() if k != "managedFields"},
                "resourceVersion": snapshot.version,
            },
            "spec": {**old.get("spec", {}), **spec},
        }
        replaced = self._call(
            f"update IPPool {snapshot.name}", "PUT", self._path(POOLS, snapshot.name), body, missing_ok=True
        )
        if replaced is None:  # deleted since we read it: start over from an absent pool
            raise ConflictError(f"IPPool {snapshot.name} was deleted")
        return self._written(replaced, snapshot, sent, allocations)

    def _written(
        self, obj: Any, snapshot: PoolSnapshot, sent: dict[str, Any], allocations: Allocations
    ) -> PoolSnapshot | None:
        """The pool as the server stored it (pruned by its schema, at its new version), from the
        write's answer; None when the answer cannot be read as a pool. When the stored leases are the
        ones sent (no schema pruned anything), they are not decoded again: `allocations` is what they
        decode to (every agent batch's write answers a whole pool)."""
        if not isinstance(obj, dict) or not (obj.get("metadata") or {}).get("resourceVersion"):
            return None
        spec = obj.get("spec")
        if isinstance(spec, dict) and spec.get("allocations", {}) == sent:
            version = str(obj["metadata"]["resourceVersion"])
            cidr = str(spec.get("range") or snapshot.cidr)
            return PoolSnapshot(snapshot.name, cidr, dict(allocations), version, token=obj)
        try:
            return self._snapshot(obj, snapshot.name, snapshot.cidr)
        except CNIError:
            return None

    def remove_leases(self, name: str, leases: Mapping[int, Lease]) -> bool:
        """Remove `leases` (offset -> lease) from IPPool `name`, each only if it is still exactly as
        given. True: all removed; False: nothing written, because one lease is no longer there
        exactly as given or the pool is gone.

        The first time, one JSON patch that tests each lease before removing it: the API server
        applies it to the pool as stored at that moment, atomically, so neither a read first nor a
        resourceVersion is needed. Its answer (the pool as written) is kept for BASE_SECONDS: the next
        release in that pool is a PUT of that copy without the leases, at its resourceVersion (each
        lease tested against the copy here), which costs the API server about 0.6x the patch (it
        applies no patch); when anyone wrote the pool since (409), the patch as the first time."""
        what = f"release leases in IPPool {name}"
        with self._bases_lock:
            base = self._bases.pop(name, None)
        try:
            if base is not None and time.monotonic() - base[0] < BASE_SECONDS:
                written = self._put_without(base[1], leases)
                if written is not None:
                    self._keep_base(name, written)
                    return True
            ops: list[dict[str, Any]] = []
            for offset, lease in sorted(leases.items()):
                path = f"/spec/allocations/{offset}"
                ops += [
                    {"op": "test", "path": path, "value": lease.to_json()},
                    {"op": "remove", "path": path},
                ]
            patched = self.client.request("PATCH", self._path(POOLS, name), ops, content_type=JSON_PATCH)
        except ApiError as exc:
            if exc.status in (404, 409, 422):  # 409 is not expected (no resourceVersion): read and decide
                return False
            self._raise(exc, what)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise TransientStoreError(f"{what}: {type(exc).__name__}: {exc}") from None
        self._keep_base(name, patched)
        return True

    def _put_without(self, base: dict[str, Any], leases: Mapping[int, Lease]) -> dict[str, Any] | None:
        """PUT `base` (a pool as the server last answered) without `leases`, at its resourceVersion;
        the pool as written, or None when a lease is not in `base` exactly as given or the pool changed
        since (409): the caller patches instead. Other errors are raised (ApiError, OSError, ...)."""
        spec = base.get("spec") or {}
        allocations = spec.get("allocations")
        if not isinstance(allocations, dict):
            return None
        keys = {str(offset) for offset in leases}
        if any(allocations.get(str(offset)) != lease.to_json() for offset, lease in leases.items()):
            return None
        meta = {k: v for k, v in (base.get("metadata") or {}).items() if k != "managedFields"}
        body = {
            **base,
            "metadata": meta,
            "spec": {**spec, "allocations": {k: v for k, v in allocations.items() if k not in keys}},
        }
        try:
            written = self.client.request("PUT", self._path(POOLS, str(meta.get("name", ""))), body)
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise
        return written if isinstance(written, dict) else None

    def _keep_base(self, name: str, obj: Any) -> None:
        """Keep a pool as a release's write answered it (the next release's PUT starts from it);
        copies older than BASE_SECONDS are dropped."""
        now = time.monotonic()
        with self._bases_lock:
            for stale in [k for k, (at, _) in self._bases.items() if now - at >= BASE_SECONDS]:
                del self._bases[stale]
            if isinstance(obj, dict) and (obj.get("metadata") or {}).get("resourceVersion"):
                self._bases[name] = (now, obj)

    def list_pools(self) -> list[PoolSnapshot]:
        items = self._list_all("list IPPools", self._path(POOLS))
        return [self._snapshot(obj, obj.get("metadata", {}).get("name", ""), "") for obj in items]

    # -- overlapping-range reservations ---------------------------------------------------------

    def _reservation_body(
        self, name: str, lease: Lease, address: str, version: str | None = None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": name, "namespace": self.namespace}
        if address:
            metadata["annotations"] = {ADDRESS_ANNOTATION: address}
        if version:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OverlappingRangeIPReservation",
            "metadata": metadata,
            "spec": lease.reservation_spec(),
        }

    def _get_reservation(self, name: str) -> dict[str, Any] | None:
        obj = self._call(f"get reservation {name}", "GET", self._path(RESERVATIONS, name), missing_ok=True)
        return cast(dict[str, Any] | None, obj)

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        try:
            self._call(
                f"create reservation {name}",
                "POST",
                self._path(RESERVATIONS),
                self._reservation_body(name, lease, address),
            )
            return None
        except ConflictError:
            pass  # AlreadyExists: whose is it?
        existing = self._get_reservation(name)
        if existing is None:
            raise ConflictError(f"reservation {name} vanished while being claimed")
        recorded = recorded_address(existing)
        if address and recorded and recorded != address:
            raise name_taken(name, recorded, address)
        holder = Lease.from_reservation(existing.get("spec") or {})
        if not holder.owned_by(lease.podref, lease.ifname, lease.id):
            return holder
        if holder.id != lease.id:  # the same pod, recreated: the reservation follows its new container
            version = str(existing.get("metadata", {}).get("resourceVersion", ""))
            replaced = self._call(
                f"update reservation {name}",
                "PUT",
                self._path(RESERVATIONS, name),
                self._reservation_body(name, lease, address or recorded, version),
                missing_ok=True,
            )
            if replaced is None:  # the old holder's DEL removed it meanwhile: re-read and create
                raise ConflictError(f"reservation {name} was deleted while being taken over")
        return None

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        existing = self._get_reservation(name)
        if existing is None:
            return
        holder = Lease.from_reservation(existing.get("spec") or {})
        if not holder.held_by_container(container_id, ifname):
            return
        self.delete_reservation(name, str(existing.get("metadata", {}).get("resourceVersion", "")))

    # -- what the reconciler reads ---------------------------------------------------------------

    def _list_all(self, what: str, path: str, missing_ok: bool = False) -> list[dict[str, Any]]:
        """Every item of a paged LIST (limit/continue); none when `missing_ok` and the resource is
        not served (404: its CRD is not installed)."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if token:
                params["continue"] = token
            page = self._call(what, "GET", path, params=params, missing_ok=missing_ok)
            if page is None:
                return items
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items

    def list_reservations(self) -> list[dict[str, Any]]:
        return self._list_all("list reservations", self._path(RESERVATIONS))

    def list_objects(self, plural: str) -> list[dict[str, Any]]:
        """Every object of one of Whereabouts' resources in this namespace, as the server lists it
        (none when its CRD is not installed): `ipamctl check --whereabouts-compat` judges them raw."""
        return self._list_all(f"list {plural}", self._path(plural), missing_ok=True)

    def list_network_attachments(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Multus' NetworkAttachmentDefinitions of every namespace, or of one (none without the CRD)."""
        where = f"/namespaces/{path_quote(namespace)}" if namespace else ""
        path = f"/apis/k8s.cni.cncf.io/v1{where}/network-attachment-definitions"
        return self._list_all("list NetworkAttachmentDefinitions", path, missing_ok=True)

    def delete_reservation(self, name: str, resource_version: str) -> None:
        """Delete a reservation if it is still at `resource_version` (409 otherwise); gone already is fine."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"resourceVersion": resource_version},
        }
        self._call(
            f"delete reservation {name}", "DELETE", self._path(RESERVATIONS, name), body, missing_ok=True
        )

    def list_pods(self) -> list[dict[str, Any]]:
        return self._list_all("list pods", "/api/v1/pods")

    def list_statefulsets(self) -> list[dict[str, Any]]:
        """Every StatefulSet (sticky retention: `audit.statefulset_index`)."""
        return self._list_all("list statefulsets", "/apis/apps/v1/statefulsets")

    # -- node slices: NodeSlicePool objects, and the fence reclaim puts on a slice pool ----------

    def _put(self, what: str, plural: str, name: str, body: dict[str, Any], status: bool = False) -> Any:
        path = self._path(plural, name) + ("/status" if status else "")
        done = self._call(what, "PUT", path, body, missing_ok=True)
        if done is None:  # deleted since it was read: start over
            raise ConflictError(f"{what}: gone")
        return done

    def read_node_slices(self, name: str) -> NodeSlices | None:
        obj = self._call(f"get NodeSlicePool {name}", "GET", self._path(NODE_SLICES, name), missing_ok=True)
        return None if obj is None else node_slices_from_object(obj, name)

    def node_slices_version(self, name: str) -> tuple[str, str] | None:
        """The NodeSlicePool's (uid, resourceVersion) as of now, None when absent: a GET of its metadata
        alone (the API server does not send the entries back; one that cannot answers the whole object)."""
        what = f"get NodeSlicePool {name} metadata"
        obj = self._call(what, "GET", self._path(NODE_SLICES, name), missing_ok=True, accept=METADATA_ONLY)
        if obj is None:
            return None
        meta = obj.get("metadata") or {}
        return str(meta.get("uid") or ""), str(meta.get("resourceVersion", ""))

    def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        status = slice_status(entries)
        what = f"write NodeSlicePool {pool.name}"
        if pool.version is None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "NodeSlicePool",
                "metadata": {"name": pool.name, "namespace": self.namespace, **slice_marks(pool)},
                "spec": {"range": pool.range, "sliceSize": pool.slice_size},
                "status": status,
            }
            done = self._call(what, "POST", self._path(NODE_SLICES), body)
        else:
            old: dict[str, Any] = dict(pool.token or {})
            meta = {k: v for k, v in (old.get("metadata") or {}).items() if k != "managedFields"}
            body = {**old, "metadata": {**meta, "resourceVersion": pool.version}, "status": status}
            done = self._put(what, NODE_SLICES, pool.name, body)
        if done.get("status") != status:
            # the CRD declares a status subresource (the main resource ignored status): write it there,
            # still conditional on the version the first write left
            self._put(what + "/status", NODE_SLICES, pool.name, {**done, "status": status}, status=True)

    def delete_node_slices(self, pool: NodeSlices) -> None:
        """Delete the NodeSlicePool if it is still exactly `pool` (uid and resourceVersion, as
        DeleteOptions preconditions): ConflictError otherwise; gone already is fine."""
        exact = {"resourceVersion": pool.version, **({"uid": pool.uid} if pool.uid else {})}
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": exact}
        self._call(
            f"delete NodeSlicePool {pool.name}",
            "DELETE",
            self._path(NODE_SLICES, pool.name),
            body,
            missing_ok=True,
        )

    def list_node_slices(self) -> list[NodeSlices]:
        probe = self._call(
            "list NodeSlicePools", "GET", self._path(NODE_SLICES), params={"limit": 1}, missing_ok=True
        )
        if not probe or not probe.get("items"):  # none, or the CRD is not installed
            return []
        items = self._list_all("list NodeSlicePools", self._path(NODE_SLICES))
        return [node_slices_from_object(obj, (obj.get("metadata") or {}).get("name", "")) for obj in items]

    def list_nodes(self) -> set[str]:
        return {
            (n.get("metadata") or {}).get("name", "") for n in self._list_all("list nodes", "/api/v1/nodes")
        }

    def inspect_pool(self, name: str, cidr: str) -> SlicePoolView:
        obj = self._call(f"get IPPool {name}", "GET", self._path(POOLS, name), missing_ok=True)
        if obj is None:
            return SlicePoolView(PoolSnapshot(name, cidr, {}, None), False, None)
        meta = obj.get("metadata") or {}
        stamps = [parse_time(f.get("time")) for f in meta.get("managedFields") or [] if isinstance(f, dict)]
        stamps.append(parse_time(meta.get("creationTimestamp")))
        known = [t for t in stamps if t is not None]
        retired = RETIRED_ANNOTATION in (meta.get("annotations") or {})
        return SlicePoolView(self._snapshot(obj, name, cidr), retired, max(known) if known else None)

    def retire_pool(self, view: SlicePoolView) -> None:
        snap = view.snapshot
        mark = {RETIRED_ANNOTATION: "true"}
        if snap.version is None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "IPPool",
                "metadata": {"name": snap.name, "namespace": self.namespace, "annotations": mark},
                "spec": {"range": snap.cidr, "allocations": {}},
            }
            self._call(f"retire IPPool {snap.name}", "POST", self._path(POOLS), body)
            return
        old: dict[str, Any] = dict(snap.token or {})
        meta = {k: v for k, v in (old.get("metadata") or {}).items() if k != "managedFields"}
        annotations = {**(meta.get("annotations") or {}), **mark}
        body = {**old, "metadata": {**meta, "annotations": annotations, "resourceVersion": snap.version}}
        self._put(f"retire IPPool {snap.name}", POOLS, snap.name, body)

    def delete_pool(self, name: str, version: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": {"resourceVersion": version}}
        self._call(f"delete IPPool {name}", "DELETE", self._path(POOLS, name), body, missing_ok=True)

    # -- writer turns (ipam.turns) --------------------------------------------------------------

    def _turn_call(self, what: str, method: str, path: str, body: Any = None) -> Any:
        """A writer-turn request: 401/403, and 404 to a create (no WriterTurn CRD, or no RBAC for
        it), are TurnsUnavailable, so the caller writes without turns; a 404 to a read or delete
        is None (that turn is gone: the turn was just handed on, the common case under contention);
        anything else as `_raise_api` maps it, without touching the credential-refusal bookkeeping of
        the pool requests."""
        try:
            return self.client.request(method, path, body)
        except ApiError as exc:
            if exc.status in (401, 403) or (exc.status == 404 and method == "POST"):
                raise TurnsUnavailable(f"{what}: HTTP {exc.status} {exc.reason}") from None
            if exc.status == 404:
                return None
            _raise_api(exc, what)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise TransientStoreError(f"{what}: {type(exc).__name__}: {exc}") from None

    def take_turn(self, pool: str, holder: str, seconds: int) -> Turn | None:
        """Create pool `pool`'s WriterTurn; None while another writer holds it."""
        name = turn_name(pool)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "WriterTurn",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "whereabouts-py"}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds},
        }
        try:
            made = self._turn_call(f"take writer turn {name}", "POST", self._path(TURNS), body)
        except ConflictError:  # AlreadyExists: another writer's turn
            return None
        return _turn(made)

    def current_turn(self, pool: str) -> Turn | None:
        """The WriterTurn of `pool` as it stands (None when there is none)."""
        name = turn_name(pool)
        got = self._turn_call(f"read writer turn {name}", "GET", self._path(TURNS, name))
        return None if got is None else _turn(got)

    def list_turns(self) -> list[StandingTurn]:
        """Every writer turn standing in the namespace (the reconciler's; a cluster without the
        WriterTurn CRD has none)."""
        return [
            StandingTurn(
                _turn(obj),
                str((obj.get("spec") or {}).get("holderIdentity", "")),
                parse_time(obj["metadata"].get("creationTimestamp")),
            )
            for obj in self._list_all("list writer turns", self._path(TURNS), missing_ok=True)
        ]

    def end_turn(self, turn: Turn) -> None:
        """Delete `turn` if it is still that very object (uid and resourceVersion): a turn another
        writer has since taken is never removed; one already gone is fine."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "preconditions": {"uid": turn.uid, "resourceVersion": turn.version},
        }
        with contextlib.suppress(ConflictError):  # no longer that object: not ours to delete
            self._turn_call(f"end writer turn {turn.name}", "DELETE", self._path(TURNS, turn.name), body)

    # -- node lock, health ----------------------------------------------------------------------

    def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[int | None]:
        return pool_lock(self.lock_dir, name, timeout)

    def pool_generation(self, name: str, settled: bool = False) -> int | None:
        return pool_generation(self.lock_dir, name, settled)

    def check_reachable(self) -> None:
        try:
            self._call("list IPPools", "GET", self._path(POOLS), params={"limit": 1})
        except (TransientStoreError, CNIError, ConflictError) as exc:
            raise CNIError(errors.PLUGIN_NOT_AVAILABLE, "Kubernetes API not reachable", str(exc)) from None

    def close(self) -> None:
        self.client.close()
