"""Directories the plugin writes as root (data_dir, locks, the log file's), opened without following symlinks.

`data_dir` and everything under it are reached one path component at a time from `/`, each opened
with O_NOFOLLOW | O_DIRECTORY relative to its parent's descriptor, and files inside are opened,
created, renamed and removed relative to the final directory's descriptor. A symlink anywhere in the
path is refused, and swapping a directory for a symlink after we opened it changes nothing: the
descriptor still names the directory we checked.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from . import errors
from .errors import CNIError

DIR_MODE = 0o755
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class UnsafePathError(OSError):
    """A path with a symlink, a non-directory or a NUL where a real directory must be."""


MAX_FILE_NAME = 232  # 255 on Linux, less the longest affixes: a temp file `.<name>.json.<12 hex>.tmp`


def checked_name(name: str) -> str:
    """`name` if it can only name a file inside its directory (a pool, reservation or lock name):
    not empty, no `/` or NUL, not starting with `.`, at most MAX_FILE_NAME bytes; else code 7. The
    config checks every value that goes into one (config.check_object_name); this is the stores' guard."""
    if not name or "/" in name or "\0" in name or name.startswith(".") or len(name.encode()) > MAX_FILE_NAME:
        shown = repr(name[:300])
        raise CNIError(errors.INVALID_CONFIG, f"invalid name {shown}: not a file name of the datastore")
    return name


def open_dir(path: str, create: bool = False) -> int:
    """A descriptor of directory `path` (absolute), with no symlink in any component.

    With `create`, missing components are made (mode 0755). Raises UnsafePathError for a symlink or a
    non-directory component, FileNotFoundError when a component is missing and not `create`.
    """
    if "\0" in path or not os.path.isabs(path):
        raise UnsafePathError(errno.EINVAL, "not an absolute path without NUL", path.replace("\0", "\\0"))
    fd = os.open("/", _DIR_FLAGS)
    walked = ""
    try:
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                raise UnsafePathError(errno.EINVAL, "'..' in the path", path)
            walked += "/" + part
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                with suppress(FileExistsError):
                    os.mkdir(part, DIR_MODE, dir_fd=fd)
                child = _open_child(part, fd, walked)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(exc.errno, "is a symlink or not a directory", walked) from None
                raise
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _open_child(part: str, parent: int, walked: str) -> int:
    try:
        return os.open(part, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePathError(exc.errno, "is a symlink or not a directory", walked) from None
        raise


@contextmanager
def opened_dir(path: str, create: bool = False) -> Iterator[int]:
    fd = open_dir(path, create)
    try:
        yield fd
    finally:
        os.close(fd)


def read_file_at(dir_fd: int, name: str) -> bytes:
    """The content of regular file `name` in `dir_fd` (a symlink, FIFO or device is refused)."""
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePathError(errno.EINVAL, "is not a regular file", name)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
