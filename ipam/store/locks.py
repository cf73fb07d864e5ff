"""Node-local per-pool locks (filelock), shared by every datastore."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from .. import errors
from ..errors import CNIError

# flock is polled while another process holds it; short polls keep a queue of pods moving.
POLL_SECONDS = 0.003


@contextmanager
def pool_lock(lock_dir: str, name: str, timeout: float) -> Iterator[None]:
    path = os.path.join(lock_dir, f"{name}.lock")
    try:
        os.makedirs(lock_dir, exist_ok=True)
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot create lock directory {lock_dir}", str(exc)) from None
    lock = FileLock(path)
    try:
        lock.acquire(timeout=max(timeout, 0.0), poll_interval=POLL_SECONDS)
    except Timeout:
        raise CNIError(
            errors.TRY_AGAIN_LATER, f"timed out waiting for the node lock of pool {name}", path
        ) from None
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot open lock file {path}", str(exc)) from None
    try:
        yield
    finally:
        lock.release()
