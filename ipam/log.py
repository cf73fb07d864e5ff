"""Structured logging: one JSON object per line, to the configured log file and to stderr.

Never to stdout, which carries the CNI result. Kept dependency-free and cheap to import.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "verbose": 15, "info": 20, "warning": 30, "error": 40, "panic": 50}


class Logger:
    def __init__(self) -> None:
        self.threshold = _LEVELS["info"]
        self.path: str | None = None
        self._local = threading.local()  # per-thread call context: the node agent serves calls in threads
        self.stderr: TextIO = sys.stderr

    @property
    def context(self) -> dict[str, Any]:
        ctx: dict[str, Any] | None = getattr(self._local, "context", None)
        if ctx is None:
            ctx = self._local.context = {}
        return ctx

    def configure(self, level: str | None = None, path: str | None = None, **context: Any) -> None:
        if level:
            self.threshold = _LEVELS.get(level, self.threshold)
        if path:
            self.path = path
        self._local.context = {k: v for k, v in context.items() if v}

    def log(self, level: str, event: str, **fields: Any) -> None:
        if _LEVELS.get(level, 20) < self.threshold:
            return
        record = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            + f".{int(time.time() * 1000) % 1000:03d}Z",
            "level": level,
            "event": event,
            "pid": os.getpid(),
            **self.context,
            **fields,
        }
        line = json.dumps(record, default=str, separators=(",", ":")) + "\n"
        try:
            self.stderr.write(line)
            self.stderr.flush()
        except (OSError, ValueError):
            pass
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(line)
            except OSError:
                pass

    def debug(self, event: str, **fields: Any) -> None:
        self.log("debug", event, **fields)

    def info(self, event: str, **fields: Any) -> None:
        self.log("info", event, **fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.log("warning", event, **fields)

    def error(self, event: str, **fields: Any) -> None:
        self.log("error", event, **fields)


log = Logger()
