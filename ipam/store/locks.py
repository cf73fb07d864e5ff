"""Node-local per-pool locks (filelock), shared by every datastore.

The lock directory is opened without following symlinks (safepath) and the lock file is named
through that descriptor (`/proc/self/fd/N/NAME.lock`), so a directory swapped for a symlink cannot
send root's lock file elsewhere; filelock >= 3.20.3 opens the file itself with O_NOFOLLOW.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from filelock import FileLock, Timeout

from .. import errors
from ..errors import CNIError
from ..safepath import UnsafePathError, open_dir

# flock is polled while another process holds it; short polls keep a queue of pods moving.
POLL_SECONDS = 0.003


@contextmanager
def pool_lock(lock_dir: str, name: str, timeout: float) -> Iterator[None]:
    path = os.path.join(lock_dir, f"{name}.lock")
    try:
        dir_fd = open_dir(os.path.abspath(lock_dir), create=True)
    except UnsafePathError as exc:
        raise CNIError(
            errors.IO_FAILURE, f"lock directory {lock_dir}: {exc.filename} {exc.strerror}; symlinks are not followed"
        ) from None
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot create lock directory {lock_dir}", str(exc)) from None
    try:
        lock = FileLock(f"/proc/self/fd/{dir_fd}/{name}.lock")
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
    finally:
        os.close(dir_fd)
