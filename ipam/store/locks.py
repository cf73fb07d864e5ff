"""Node-local per-pool locks (flock on a file in the lock directory), shared by every datastore.

A waiter sleeps in the kernel until the holder releases: with 200 CNI processes queued on one node,
polling (filelock's non-blocking retries every few ms) burned the CPU the holder needed to finish, and
158 of them timed out. The wait is bounded by a SIGALRM timer in a process's main thread (every CNI
exec); other threads (the node agent's pool workers) poll with a growing interval instead.

The lock directory is opened without following symlinks (safepath) and the lock file is opened through
that descriptor with O_NOFOLLOW, so neither a directory swapped for a symlink nor a symlinked lock file
can send root's lock file elsewhere (nothing is ever truncated or written: flock only).
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .. import errors
from ..errors import CNIError
from ..safepath import UnsafePathError, open_dir

POLL_FIRST, POLL_MAX = 0.001, 0.05  # seconds between attempts where no timer can be used


class _TimedOut(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _TimedOut


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise


def _wait_blocking(fd: int, timeout: float) -> bool:
    """flock(LOCK_EX) in the kernel's queue, interrupted by SIGALRM after `timeout` (main thread only)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return True
        except _TimedOut:
            return False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def _wait_polling(fd: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    interval = POLL_FIRST
    while True:
        if _try_lock(fd):
            return True
        left = end - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))
        interval = min(interval * 2, POLL_MAX)


def _acquire(fd: int, timeout: float) -> bool:
    if _try_lock(fd):
        return True
    if timeout <= 0:
        return False
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0):  # no timer of someone else's running
        return _wait_blocking(fd, timeout)
    return _wait_polling(fd, timeout)


@contextmanager
def pool_lock(lock_dir: str, name: str, timeout: float) -> Iterator[None]:
    path = os.path.join(lock_dir, f"{name}.lock")
    try:
        dir_fd = open_dir(os.path.abspath(lock_dir), create=True)
    except UnsafePathError as exc:
        raise CNIError(
            errors.IO_FAILURE,
            f"lock directory {lock_dir}: {exc.filename} {exc.strerror}; symlinks are not followed",
        ) from None
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot create lock directory {lock_dir}", str(exc)) from None
    try:
        fd = os.open(
            f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
        )
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot open lock file {path}", str(exc)) from None
    finally:
        os.close(dir_fd)
    try:
        try:
            locked = _acquire(fd, max(timeout, 0.0))
        except _TimedOut:  # the timer fired just as the lock was granted: closing the fd gives it back
            locked = False
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot lock {path}", str(exc)) from None
        if not locked:
            raise CNIError(
                errors.TRY_AGAIN_LATER, f"timed out waiting for the node lock of pool {name}", path
            )
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _lock_dir_fd(lock_dir: str) -> int:
    try:
        return open_dir(os.path.abspath(lock_dir), create=True)
    except UnsafePathError as exc:
        raise CNIError(
            errors.IO_FAILURE,
            f"lock directory {lock_dir}: {exc.filename} {exc.strerror}; symlinks are not followed",
        ) from None
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot create lock directory {lock_dir}", str(exc)) from None


def bump_stamp(lock_dir: str, name: str) -> None:
    """Record a change made under the node lock `name` (one byte appended to `name`.stamp), so the
    node's other processes see it (`stamp`) without asking the datastore. Call it holding the lock."""
    dir_fd = _lock_dir_fd(lock_dir)
    try:
        fd = os.open(
            f"{name}.stamp",
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
            dir_fd=dir_fd,
        )
        try:
            os.write(fd, b".")
        finally:
            os.close(fd)
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot write {lock_dir}/{name}.stamp", str(exc)) from None
    finally:
        os.close(dir_fd)


def stamp(lock_dir: str, name: str) -> int:
    """How many changes were recorded under the node lock `name` (0 before the first)."""
    dir_fd = _lock_dir_fd(lock_dir)
    try:
        return os.stat(f"{name}.stamp", dir_fd=dir_fd, follow_symlinks=False).st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot read {lock_dir}/{name}.stamp", str(exc)) from None
    finally:
        os.close(dir_fd)
