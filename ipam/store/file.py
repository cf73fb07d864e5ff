"""The embedded `file` datastore: one JSON document per pool under `data_dir`, for a single machine.

Each pool file has the shape of an IPPool object (`spec.range`, `spec.allocations`) with a version
counter in `metadata.resourceVersion`. Writes go to a temp file, are fsync'd and renamed over the old
one, so a crash leaves the old pool or the new one, never a torn file. A file that does not parse is
reported with its path and never replaced by an empty pool.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import errors
from ..allocator import Allocations, Lease, dump_allocations, parse_allocations
from ..errors import CNIError, ConflictError, PoolRetiredError
from ..safepath import UnsafePathError, open_dir, opened_dir, read_file_at
from ..safepath import checked_name as _checked
from ..slices import RETIRED_ANNOTATION, NodeSlices, SliceEntry, slice_marks
from ..slices import from_object as node_slices_from_object
from ..slices import to_status as slice_status
from .base import ADDRESS_ANNOTATION, PoolSnapshot, check_range, name_taken, recorded_address
from .locks import pool_generation, pool_lock
from .slicestore import SlicePoolView

API_VERSION = "whereabouts.cni.cncf.io/v1alpha1"
# every change of a reservation's holder happens under its node lock; holders keep it for microseconds
RESERVATION_LOCK_SECONDS = 10.0


def _atomic_write(path: Path, payload: bytes, exclusive: bool = False) -> None:
    """Write `payload` to `path` via a fsync'd temp file; with `exclusive`, fail if `path` exists.

    Every step is relative to the directory's descriptor (no symlink followed, see safepath)."""
    with opened_dir(str(path.parent), create=True) as dir_fd:
        tmp = f".{path.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd
        )
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                os.link(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dir_fd)  # atomic create-if-absent with the full content
            else:
                os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
        os.fsync(dir_fd)


def _unlink(path: Path) -> None:
    """Remove `path` (not what a symlink there points to); absent is fine."""
    try:
        with opened_dir(str(path.parent)) as dir_fd:
            os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class FileStore:
    def __init__(self, data_dir: str) -> None:
        # absolute and free of NUL (config validates it): resolved against / one component at a time
        self.root = Path(os.path.abspath(data_dir))
        self.pools = self.root / "pools"
        self.reservations = self.root / "reservations"
        self.locks = str(self.root / "locks")

    def _ensure_dirs(self) -> None:
        try:
            for directory in (self.pools, self.reservations):
                os.close(open_dir(str(directory), create=True))
        except UnsafePathError as exc:
            raise CNIError(
                errors.IO_FAILURE,
                f"data_dir {self.root}: {exc.filename} {exc.strerror}; symlinks are not followed",
            ) from None
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot create data_dir {self.root}", str(exc)) from None

    def _pool_path(self, name: str) -> Path:
        return self.pools / f"{_checked(name)}.json"

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            with opened_dir(str(path.parent)) as dir_fd:
                raw = read_file_at(dir_fd, path.name)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot read pool file {path}", str(exc)) from None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("spec"), dict):
                raise ValueError("no 'spec' object")
            return doc
        except ValueError as exc:
            raise CNIError(
                errors.DATASTORE_CORRUPT,
                f"pool file {path} is corrupt; fix or remove it by hand (leases are not reset)",
                str(exc),
            ) from None

    def _snapshot(self, path: Path, name: str, cidr: str, doc: dict[str, Any]) -> PoolSnapshot:
        try:
            allocations = parse_allocations(doc["spec"].get("allocations") or {})
            version = str(int(doc.get("metadata", {}).get("resourceVersion", "0")))
        except (ValueError, AttributeError, TypeError) as exc:
            raise CNIError(
                errors.DATASTORE_CORRUPT,
                f"pool file {path} is corrupt; fix or remove it by hand (leases are not reset)",
                str(exc),
            ) from None
        return PoolSnapshot(name, str(doc["spec"].get("range") or cidr), allocations, version)

    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        path = self._pool_path(name)
        doc = self._load(path)
        if doc is None:
            return PoolSnapshot(name, cidr, {}, None)
        if RETIRED_ANNOTATION in (doc.get("metadata") or {}).get("annotations", {}):
            raise PoolRetiredError(name)  # node slices: reclaim is returning this pool's slice
        snapshot = self._snapshot(path, name, cidr, doc)
        check_range(name, snapshot.cidr, cidr)
        return snapshot

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> PoolSnapshot | None:
        self._ensure_dirs()
        path = self._pool_path(snapshot.name)
        current = self._load(path)
        found = None if current is None else self._snapshot(path, snapshot.name, "", current)
        current_version = None if found is None else found.version
        if found is not None:
            check_range(snapshot.name, found.cidr, snapshot.cidr)
        if current_version != snapshot.version:
            raise ConflictError(
                f"pool {snapshot.name} is at version {current_version}, read {snapshot.version}"
            )
        doc = {
            "apiVersion": API_VERSION,
            "kind": "IPPool",
            "metadata": {"name": snapshot.name, "resourceVersion": str(int(snapshot.version or 0) + 1)},
            "spec": {"range": snapshot.cidr, "allocations": dump_allocations(allocations)},
        }
        payload = json.dumps(doc, indent=1, sort_keys=True).encode()
        try:
            _atomic_write(path, payload)
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot write pool file {path}", str(exc)) from None
        return None  # a read costs a file read here: nothing worth remembering

    def _json_files(self, directory: Path) -> list[Path]:
        """The `*.json` files of `directory`, listed through a descriptor opened without symlinks."""
        try:
            with opened_dir(str(directory)) as dir_fd:
                names = sorted(n for n in os.listdir(dir_fd) if n.endswith(".json") and not n.startswith("."))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot list {directory}", str(exc)) from None
        return [directory / n for n in names]

    def list_pools(self) -> list[PoolSnapshot]:
        out = []
        for path in self._json_files(self.pools):
            doc = self._load(path)
            if doc is not None:
                out.append(self._snapshot(path, path.stem, "", doc))
        return out

    def _reservation_path(self, name: str) -> Path:
        return self.reservations / f"{_checked(name)}.json"

    def _reservation_lock(self, name: str) -> AbstractContextManager[int]:
        """Every change of reservation `name` (create, takeover, delete) happens under this lock, so a
        holder read is still true when the change it decided is made (compare-and-swap by lock)."""
        return pool_lock(os.path.join(self.locks, "reservations"), name, RESERVATION_LOCK_SECONDS)

    def _read_reservation_doc(self, path: Path) -> dict[str, Any] | None:
        return self._load(path)

    def _read_reservation(self, path: Path) -> Lease | None:
        doc = self._read_reservation_doc(path)
        if doc is None:
            return None
        return Lease.from_reservation(doc["spec"])

    @staticmethod
    def _reservation_doc(name: str, lease: Lease, version: int, address: str) -> bytes:
        metadata: dict[str, Any] = {
            "name": name,
            "resourceVersion": str(version),
            "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if address:
            metadata["annotations"] = {ADDRESS_ANNOTATION: address}
        doc = {
            "apiVersion": API_VERSION,
            "kind": "OverlappingRangeIPReservation",
            "metadata": metadata,
            "spec": lease.reservation_spec(),
        }
        return json.dumps(doc, sort_keys=True).encode()

    @staticmethod
    def _version_of(doc: dict[str, Any]) -> int:
        try:
            return int((doc.get("metadata") or {}).get("resourceVersion", "0"))
        except (TypeError, ValueError):
            return 0

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        self._ensure_dirs()
        path = self._reservation_path(name)
        with self._reservation_lock(name):
            doc = self._read_reservation_doc(path)
            try:
                if doc is None:
                    _atomic_write(path, self._reservation_doc(name, lease, 1, address), exclusive=True)
                    return None
                recorded = recorded_address(doc)
                if address and recorded and recorded != address:
                    raise name_taken(name, recorded, address)
                holder = Lease.from_reservation(doc["spec"])
                if not holder.owned_by(lease.podref, lease.ifname, lease.id):
                    return holder
                if holder.id != lease.id:  # the same pod, recreated: it follows the new container
                    version = self._version_of(doc) + 1
                    _atomic_write(path, self._reservation_doc(name, lease, version, address or recorded))
                return None
            except FileExistsError:  # written by a writer that does not take the lock (an older version)
                raise ConflictError(f"reservation {name} appeared while being claimed") from None
            except OSError as exc:
                raise CNIError(errors.IO_FAILURE, f"cannot write reservation {path}", str(exc)) from None

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        path = self._reservation_path(name)
        if not path.exists():
            return
        with self._reservation_lock(name):
            holder = self._read_reservation(path)
            if holder is not None and holder.held_by_container(container_id, ifname):
                self._unlink(path)

    def _unlink(self, path: Path) -> None:
        try:
            _unlink(path)  # through the directory's descriptor, never a symlinked directory
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot delete reservation {path}", str(exc)) from None

    # -- what the orphan sweep reads (the same shapes as the Kubernetes store's) ----------------

    def list_reservations(self) -> list[dict[str, Any]]:
        """Every reservation as an OverlappingRangeIPReservation-shaped dict (metadata.name,
        metadata.resourceVersion, metadata.creationTimestamp, spec)."""
        out = []
        for path in self._json_files(self.reservations):
            doc = self._read_reservation_doc(path)
            if doc is not None:
                doc.setdefault("metadata", {})["name"] = path.stem
                doc["metadata"].setdefault("resourceVersion", "0")
                out.append(doc)
        return out

    def delete_reservation(self, name: str, resource_version: str) -> None:
        """Delete a reservation if it is still at `resource_version` (ConflictError otherwise); gone
        already is fine."""
        path = self._reservation_path(name)
        with self._reservation_lock(name):
            doc = self._read_reservation_doc(path)
            if doc is None:
                return
            if str(self._version_of(doc)) != str(int(resource_version or 0)):
                raise ConflictError(
                    f"reservation {name} is at version {self._version_of(doc)}, listed at {resource_version}"
                )
            self._unlink(path)

    def reservations_held_by(self, container_id: str, ifname: str) -> list[tuple[str, str]]:
        """(name, recorded address or "") of the reservations this container holds on `ifname` (DEL gives
        them back even when its pool write already happened in an earlier, interrupted call)."""
        out = []
        for path in self._json_files(self.reservations):
            try:
                doc = self._read_reservation_doc(path)
                holder = None if doc is None else Lease.from_reservation(doc["spec"])
            except (CNIError, KeyError, TypeError, AttributeError):
                continue  # a corrupt reservation is reported where it is used, not here
            if doc is not None and holder is not None and holder.held_by_container(container_id, ifname):
                out.append((path.stem, recorded_address(doc)))
        return out

    # -- node slices: NodeSlicePool documents, and the fence reclaim puts on a slice pool ---------

    def _slices_path(self, name: str) -> Path:
        return self.root / "nodeslicepools" / f"{_checked(name)}.json"

    def read_node_slices(self, name: str) -> NodeSlices | None:
        doc = self._load(self._slices_path(name))
        return None if doc is None else node_slices_from_object(doc, name)

    def _versioned_write(self, path: Path, version: str | None, doc: dict[str, Any]) -> None:
        """Write `doc` if the file is still at `version` (absent when None), under a node lock."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with pool_lock(self.locks, f"{path.parent.name}-{path.stem}", 10.0):
            current = self._load(path)
            found = (
                None if current is None else str((current.get("metadata") or {}).get("resourceVersion", "0"))
            )
            if found != version:
                raise ConflictError(f"{path} is at version {found}, read {version}")
            doc["metadata"] = {**(doc.get("metadata") or {}), "resourceVersion": str(int(version or 0) + 1)}
            _atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode())

    def write_node_slices(self, pool: NodeSlices, entries: Sequence[SliceEntry]) -> None:
        # as made: its creation time and marks are kept by every later write
        old = (pool.token.get("metadata") or {}) if isinstance(pool.token, dict) else {}
        made = old.get("creationTimestamp") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        marks = {k: v for k, v in old.items() if k == "annotations"} or slice_marks(pool)
        doc = {
            "apiVersion": API_VERSION,
            "kind": "NodeSlicePool",
            "metadata": {"name": pool.name, "creationTimestamp": made, **marks},
            "spec": {"range": pool.range, "sliceSize": pool.slice_size},
            "status": slice_status(entries),
        }
        self._versioned_write(self._slices_path(pool.name), pool.version, doc)

    def delete_node_slices(self, pool: NodeSlices) -> None:
        """Delete the NodeSlicePool if its document is still exactly the one `pool` was read from
        (a file has no uid, and its version restarts when it is made again); ConflictError otherwise."""
        path = self._slices_path(pool.name)
        with pool_lock(self.locks, f"{path.parent.name}-{path.stem}", 10.0):  # as _versioned_write
            current = self._load(path)
            if current is None:
                return
            if current != pool.token:
                raise ConflictError(f"{path} changed since it was read")
            with suppress(FileNotFoundError):
                path.unlink()

    def list_node_slices(self) -> list[NodeSlices]:
        folder = self.root / "nodeslicepools"
        found = (self.read_node_slices(p.stem) for p in sorted(folder.glob("*.json")))
        return [pool for pool in found if pool is not None]

    def inspect_pool(self, name: str, cidr: str) -> SlicePoolView:
        path = self._pool_path(name)
        doc = self._load(path)
        if doc is None:
            return SlicePoolView(PoolSnapshot(name, cidr, {}, None), False, None)
        retired = RETIRED_ANNOTATION in ((doc.get("metadata") or {}).get("annotations") or {})
        try:
            changed = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        except OSError:
            changed = None
        snap = self._snapshot(path, name, cidr, doc)
        return SlicePoolView(
            PoolSnapshot(name, snap.cidr, snap.allocations, snap.version, token=doc), retired, changed
        )

    def retire_pool(self, view: SlicePoolView) -> None:
        snap = view.snapshot
        self._ensure_dirs()
        doc: dict[str, Any] = dict(snap.token or {"apiVersion": API_VERSION, "kind": "IPPool"})
        doc["spec"] = {"range": snap.cidr, "allocations": dump_allocations(snap.allocations)}
        meta = dict(doc.get("metadata") or {"name": snap.name})
        meta["annotations"] = {**(meta.get("annotations") or {}), RETIRED_ANNOTATION: "true"}
        doc["metadata"] = meta
        with pool_lock(self.locks, snap.name, 10.0):  # the engine's writers of this pool hold it too
            current = self._load(self._pool_path(snap.name))
            found = (
                None
                if current is None
                else str(int((current.get("metadata") or {}).get("resourceVersion", "0")))
            )
            if found != snap.version:
                raise ConflictError(f"pool {snap.name} is at version {found}, read {snap.version}")
            meta["resourceVersion"] = str(int(snap.version or 0) + 1)
            _atomic_write(self._pool_path(snap.name), json.dumps(doc, indent=1, sort_keys=True).encode())

    def delete_pool(self, name: str, version: str) -> None:
        path = self._pool_path(name)
        with pool_lock(self.locks, name, 10.0):
            current = self._load(path)
            if current is None:
                return
            found = str(int((current.get("metadata") or {}).get("resourceVersion", "0")))
            if found != version:
                raise ConflictError(f"pool {name} is at version {found}, read {version}")
            with suppress(FileNotFoundError):
                path.unlink()

    def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[int | None]:
        return pool_lock(self.locks, name, timeout)

    def pool_generation(self, name: str, settled: bool = False) -> int | None:
        return pool_generation(self.locks, name, settled)

    def check_reachable(self) -> None:
        self._ensure_dirs()
        with opened_dir(str(self.pools)) as dir_fd:
            writable = os.access(".", os.W_OK, dir_fd=dir_fd)
        if not writable:
            raise CNIError(errors.PLUGIN_NOT_AVAILABLE, f"data_dir {self.root} is not writable")

    def close(self) -> None:
        return None
