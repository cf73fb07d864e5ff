"""Node-local per-pool locks (flock on a file in the lock directory), shared by every datastore.

A waiter sleeps in the kernel until the holder releases: with 200 CNI processes queued on one node,
polling (filelock's non-blocking retries every few ms) burned the CPU the holder needed to finish, and
158 of them timed out. The wait is bounded by a SIGALRM timer in a process's main thread (every CNI
exec); other threads (the node agent's pool workers) poll with a growing interval instead.

The lock directory is opened without following symlinks (safepath) and the lock file is opened through
that descriptor with O_NOFOLLOW, so neither a directory swapped for a symlink nor a symlinked lock file
can send root's lock file elsewhere (nothing is truncated; the only bytes written are the counter below).

Every holder adds one to a counter in the lock file's first 8 bytes (its *generation*) while it holds
the lock: a process that remembers a pool as it wrote it under generation G knows, from a read of the
counter, whether any other process of this node has taken the pool's lock since (`pool_generation`).
A counter that starts again (a new lock file) starts at a random number, never at one it had.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from .. import errors
from ..errors import CNIError
from ..safepath import UnsafePathError, open_dir
from ..safepath import checked_name as _checked

POLL_FIRST, POLL_MAX = 0.001, 0.05  # seconds between attempts where no timer can be used


class _TimedOut(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise _TimedOut


def _try_lock(fd: int, shared: bool = False) -> bool:
    """The lock (exclusive, or shared), at once or not at all (released when `fd` is closed)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
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


def _counter(fd: int) -> int | None:
    """The counter, or None when the file holds no counter (new, or emptied by an older version)."""
    raw = os.pread(fd, 8, 0)
    return int.from_bytes(raw, "little") if len(raw) == 8 else None


def _agreed_counter(fd: int) -> int | None:
    """_counter read without the lock: repeated until two reads in a row agree (pool_generation)."""
    last = _counter(fd)
    while True:
        now = _counter(fd)
        if now == last:
            return now
        last = now


def _next(counter: int | None) -> int:
    """The next holder's generation. A counter that starts again (a lock file or directory made anew,
    a file an older version truncated) starts at a random number: from 0 it would count up to the very
    generation some process remembers, which would then take another process's writes for none."""
    if counter is None:
        return int.from_bytes(os.urandom(8), "little") >> 2
    return (counter + 1) % 2**64


# Lock directories this process has opened (the node agent takes a lock per batch and reads counters
# on every ADD): walking the path from / without symlinks is a dozen system calls, so a descriptor is
# kept and used while the path still names that same directory (one stat); else the walk is redone.
_DIRS: dict[str, int] = {}
_DIRS_LOCK = threading.Lock()


def _open_lock_dir(lock_dir: str, create: bool) -> int:
    """A new descriptor of the lock directory (the caller closes it)."""
    path = os.path.abspath(lock_dir)
    with _DIRS_LOCK:
        kept = _DIRS.get(path)
        if kept is not None:
            try:
                now, held = os.stat(path, follow_symlinks=False), os.fstat(kept)
                if stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    return os.dup(kept)
            except OSError:
                pass
            del _DIRS[path]
            os.close(kept)
    fd = _walk_lock_dir(lock_dir, create)
    with _DIRS_LOCK:
        if path not in _DIRS:
            _DIRS[path] = os.dup(fd)
    return fd


def _walk_lock_dir(lock_dir: str, create: bool) -> int:
    try:
        return open_dir(os.path.abspath(lock_dir), create=create)
    except UnsafePathError as exc:
        raise CNIError(
            errors.IO_FAILURE,
            f"lock directory {lock_dir}: {exc.filename} {exc.strerror}; symlinks are not followed",
        ) from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot create lock directory {lock_dir}", str(exc)) from None


def pool_generation(lock_dir: str, name: str, settled: bool = False) -> int | None:
    """The lock's generation now (None when nobody has taken it yet, or no counter is in the file).
    Read without the lock: a racing read gives the value just before or just after a holder's bump.
    Read twice until two reads agree: a torn read (bytes of the old and the new value, not seen on
    Linux for 8 aligned bytes, but not promised either) across a carry could show a value some
    holders back, which might be one a process remembers; two equal torn reads in a row would need
    two bumps torn alike.

    `settled`: None also while the lock is held (by anyone, this process included). A holder bumps
    the counter when it takes the lock and writes afterwards: a read of the datastore made now, noted
    at this generation, may miss that holder's write yet pass for made after it."""
    _checked(name)
    try:
        dir_fd = _open_lock_dir(lock_dir, create=False)
    except FileNotFoundError:
        return None
    try:
        # O_NONBLOCK: a FIFO in the lock file's place would block an O_RDONLY open until a writer came
        fd = os.open(
            f"{name}.lock", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CNIError(
            errors.IO_FAILURE, f"cannot open lock file {os.path.join(lock_dir, name)}.lock", str(exc)
        ) from None
    finally:
        os.close(dir_fd)
    try:
        if settled and not _try_lock(fd, shared=True):
            return None
        return _counter(fd) if settled else _agreed_counter(fd)  # a shared lock keeps writers out
    except OSError:
        return None
    finally:
        os.close(fd)


@contextmanager
def pool_lock(lock_dir: str, name: str, timeout: float) -> Iterator[int]:
    """Hold the node lock of `name`; yields this holder's generation (see the module's docstring)."""
    _checked(name)
    path = os.path.join(lock_dir, f"{name}.lock")
    dir_fd = _open_lock_dir(lock_dir, create=True)
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
        try:
            generation = _next(_counter(fd))
            os.pwrite(fd, generation.to_bytes(8, "little"), 0)
        except OSError as exc:
            raise CNIError(errors.IO_FAILURE, f"cannot count in lock file {path}", str(exc)) from None
        yield generation
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
