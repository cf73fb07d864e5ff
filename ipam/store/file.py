"""The embedded `file` datastore: one JSON document per pool under `data_dir`, for a single machine.

Each pool file has the shape of an IPPool object (`spec.range`, `spec.allocations`) with a version
counter in `metadata.resourceVersion`. Writes go to a temp file, are fsync'd and renamed over the old
one, so a crash leaves the old pool or the new one, never a torn file. A file that does not parse is
reported with its path and never replaced by an empty pool.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import AbstractContextManager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import errors
from ..allocator import Allocations, Lease, dump_allocations, parse_allocations
from ..errors import CNIError, ConflictError
from .base import PoolSnapshot
from .locks import pool_lock

API_VERSION = "whereabouts.cni.cncf.io/v1alpha1"


def _atomic_write(path: Path, payload: bytes, exclusive: bool = False) -> None:
    """Write `payload` to `path` via a fsync'd temp file; with `exclusive`, fail if `path` exists."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic create-if-absent with the full content
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class FileStore:
    def __init__(self, data_dir: str) -> None:
        self.root = Path(data_dir)
        self.pools = self.root / "pools"
        self.reservations = self.root / "reservations"
        self.locks = str(self.root / "locks")

    def _ensure_dirs(self) -> None:
        try:
            for directory in (self.pools, self.reservations):
                directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot create data_dir {self.root}", str(exc)) from None

    def _pool_path(self, name: str) -> Path:
        return self.pools / f"{name}.json"

    def _load(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = path.read_bytes()
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
        return self._snapshot(path, name, cidr, doc)

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> None:
        self._ensure_dirs()
        path = self._pool_path(snapshot.name)
        current = self._load(path)
        current_version = (
            None if current is None else self._snapshot(path, snapshot.name, "", current).version
        )
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

    def list_pools(self) -> list[PoolSnapshot]:
        if not self.pools.is_dir():
            return []
        out = []
        for path in sorted(self.pools.glob("*.json")):
            doc = self._load(path)
            if doc is not None:
                out.append(self._snapshot(path, path.stem, "", doc))
        return out

    def _reservation_path(self, name: str) -> Path:
        return self.reservations / f"{name}.json"

    def _read_reservation(self, path: Path) -> Lease | None:
        doc = self._load(path)
        if doc is None:
            return None
        return Lease.from_reservation(doc["spec"])

    def reserve(self, name: str, lease: Lease) -> Lease | None:
        self._ensure_dirs()
        path = self._reservation_path(name)
        doc = {
            "apiVersion": API_VERSION,
            "kind": "OverlappingRangeIPReservation",
            "metadata": {"name": name},
            "spec": lease.reservation_spec(),
        }
        payload = json.dumps(doc, sort_keys=True).encode()
        try:
            _atomic_write(path, payload, exclusive=True)
            return None
        except FileExistsError:
            pass
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot write reservation {path}", str(exc)) from None
        holder = self._read_reservation(path)
        if holder is None:  # deleted in between: try once more, else report it as taken by nobody
            return self.reserve(name, lease)
        if holder.owned_by(lease.podref, lease.ifname, lease.id):
            if holder.id != lease.id:
                _atomic_write(path, payload)
            return None
        return holder

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        path = self._reservation_path(name)
        holder = self._read_reservation(path)
        if holder is not None and holder.held_by_container(container_id, ifname):
            with suppress(FileNotFoundError):
                path.unlink()

    def reservation_objects(self) -> list[dict[str, Any]]:
        """Every reservation file, read-only, in the API's layout (for ipamctl and the orphan sweep):
        `metadata.creationTimestamp` is the file's modification time, `metadata.resourceVersion` its
        mtime in nanoseconds."""
        if not self.reservations.is_dir():
            return []
        out = []
        for path in sorted(self.reservations.glob("*.json")):
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            doc = self._load(path)
            if doc is None:
                continue
            made = datetime.fromtimestamp(mtime / 1e9, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta = {**(doc.get("metadata") or {}), "name": path.stem}
            meta.update(creationTimestamp=made, resourceVersion=str(mtime))
            out.append({**doc, "metadata": meta})
        return out

    def pool_lock(self, name: str, timeout: float) -> AbstractContextManager[None]:
        return pool_lock(self.locks, name, timeout)

    def check_reachable(self) -> None:
        self._ensure_dirs()
        if not os.access(self.pools, os.W_OK):
            raise CNIError(errors.PLUGIN_NOT_AVAILABLE, f"data_dir {self.root} is not writable")

    def close(self) -> None:
        return None
