"""The node agent as every benchmark starts it: the venv's ipam-agent on a socket, metrics off."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

AGENT = str(Path(sys.executable).parent / "ipam-agent")


@contextmanager
def agent_running(
    sock: str, env: Mapping[str, str] | None = None, tries: int = 400, command: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ipam-agent on `sock` (or `command`, given `--socket sock`), wait (`tries` x 25 ms) until
    it listens, SIGTERM it at the end."""
    proc = subprocess.Popen(
        [*(command or [AGENT, "--metrics-port", "0"]), "--socket", sock],
        env=dict(env) if env is not None else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(tries):
            if os.path.exists(sock):
                break
            time.sleep(0.025)
        else:
            raise RuntimeError("ipam-agent did not start")
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
