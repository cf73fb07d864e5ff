"""Structured logging: one JSON object per line, to the configured log file and to stderr.

Never to stdout, which carries the CNI result. Kept dependency-free and cheap to import.

Settings have two levels: the process's (`configure`: the agent's own level, a tool's log file) and
one CNI call's (`begin_call`/`end_call`: its level, log file and context fields), kept per thread, so
in the node agent one call's settings never apply to another call. The log file is opened per record
without following symlinks (in its directory path too) and must be a regular file: a planted
symlink, FIFO or device is never written to.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import threading
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "verbose": 15, "info": 20, "warning": 30, "error": 40, "panic": 50}
LOG_FILE_MODE = 0o640
_OPEN_FLAGS = (
    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
)


def append_record(path: str, line: str) -> bool:
    """Append `line` to the regular file `path` (created 0640); False when that is not possible.

    The directory is reached without following any symlink (safepath.open_dir) and the file is opened
    relative to it with O_NOFOLLOW; O_NONBLOCK keeps a FIFO from blocking the call, and anything but a
    regular file is left alone. Never raises (a NUL byte included).
    """
    from .safepath import open_dir  # only when a record is written to a file (not on the shim's path)

    try:
        directory, name = os.path.split(os.path.abspath(path))
        dir_fd = open_dir(directory)
    except (OSError, ValueError, TypeError):
        return False
    try:
        fd = os.open(name, _OPEN_FLAGS, LOG_FILE_MODE, dir_fd=dir_fd)
    except (OSError, ValueError):
        return False
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link could name any file
            return False
        os.write(fd, line.encode("utf-8", errors="replace"))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _Call(threading.local):
    def __init__(self) -> None:
        self.active = False
        self.threshold = _LEVELS["info"]
        self.path: str | None = None
        self.context: dict[str, Any] = {}


class Logger:
    def __init__(self) -> None:
        self.threshold = _LEVELS["info"]  # the process's: outside a call, and the agent's own records
        self.path: str | None = None
        self._call = _Call()
        self.stderr: TextIO = sys.stderr

    @property
    def context(self) -> dict[str, Any]:
        return self._call.context

    def configure(self, level: str | None = None, path: str | None = None) -> None:
        """The process's settings (not one call's)."""
        if level:
            self.threshold = _LEVELS.get(level, self.threshold)
        if path:
            self.path = path

    def begin_call(self, level: str | None = None, path: str | None = None, **context: Any) -> None:
        """Settings of the CNI call this thread serves, until `end_call`."""
        call = self._call
        call.active = True
        call.threshold = _LEVELS.get(level or "", self.threshold)
        call.path = path or None
        call.context = {k: v for k, v in context.items() if v}

    def end_call(self) -> None:
        call = self._call
        call.active, call.path, call.context = False, None, {}

    def log(self, level: str, event: str, **fields: Any) -> None:
        call = self._call
        threshold, path = (call.threshold, call.path) if call.active else (self.threshold, self.path)
        if _LEVELS.get(level, 20) < threshold:
            return
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "level": level,
            "event": event,
            "pid": os.getpid(),
            **call.context,
            **fields,
        }
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        try:
            self.stderr.write(line)
            self.stderr.flush()
        except (OSError, ValueError):
            pass
        if path:
            append_record(path, line)

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


log = Logger()
