"""The CNI executable's fast path: forward the call to the node agent over its unix socket.

Standard library only, so a call answered by the agent costs a bare interpreter start. Returns
None whenever the agent cannot answer (no socket, refused, died mid-call, timed out); the caller then
runs the call in-process (direct mode). That fallback cannot double-allocate: an ADD is idempotent
by pod reference + interface, so a repeat finds the lease the agent may already have written.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping

from .log import log

DEFAULT_SOCKET = "/run/whereabouts-py/agent.sock"
# The shim's wait must outlast everything the agent may still do for the call, or its direct-mode
# fallback runs while the agent works on (and may roll back) the same ADD. So: the largest
# retry_deadline_seconds the config accepts, plus the rollback's own budget, plus one API request in
# flight at the deadline; still below kubelet's 4 minutes. The agent is also told this wait and
# shortens its deadline to fit inside it (ipam.agent), so a lower WHEREABOUTS_PY_AGENT_TIMEOUT holds too.
MAX_DEADLINE = 200.0  # config.IPAMConfig.retry_deadline_seconds (le=200)
ROLLBACK_SECONDS = 10.0  # engine.RetryPolicy.rollback_seconds
WORK_MARGIN = 20.0  # one API request in flight at the deadline (connect 5 s + read 15 s)
DEFAULT_TIMEOUT = MAX_DEADLINE + ROLLBACK_SECONDS + WORK_MARGIN
MAX_REPLY = 16 << 20
FORWARDED = ("CNI_", "K8S_", "NODENAME")


def socket_path(env: Mapping[str, str], stdin: bytes = b"") -> str:
    """$WHEREABOUTS_PY_AGENT_SOCKET, else the node flat file's `agent_socket`, else the default.

    Never the network config's `ipam.agent_socket`: a tenant's socket would answer for the root shim
    (and its forged reply become the CNI result). `stdin` is unused, kept for callers."""
    if env.get("WHEREABOUTS_PY_AGENT_SOCKET"):
        return env["WHEREABOUTS_PY_AGENT_SOCKET"]
    from .flatfile import agent_socket

    return agent_socket(env) or DEFAULT_SOCKET


def forward(env: Mapping[str, str], stdin: bytes, path: str, timeout: float) -> tuple[int, str] | None:
    """(exit code, stdout) from the agent, or None when it could not answer."""
    if not path or not os.path.exists(path):
        return None
    request = {
        "env": {k: v for k, v in env.items() if k.startswith(FORWARDED)},
        "stdin": stdin.decode("utf-8", errors="surrogateescape"),
        "timeout": timeout,  # the agent fits its work for this call inside the shim's wait
    }
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_REPLY:
                    raise ValueError("agent reply too large")
        reply = json.loads(b"".join(chunks))
        code, stdout = reply["code"], reply["stdout"]
        if not isinstance(code, int) or not isinstance(stdout, str):
            raise ValueError("malformed agent reply")
        return code, stdout
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.info(
            "agent.unavailable", socket=path, error=f"{type(exc).__name__}: {exc}", fallback="direct mode"
        )
        return None


def try_agent(env: Mapping[str, str], stdin: bytes) -> tuple[int, str] | None:
    if env.get("CNI_COMMAND", "") in ("", "VERSION") or env.get("WHEREABOUTS_PY_DIRECT"):
        return None  # answered locally (or direct mode asked for): no agent round trip
    try:
        timeout = float(env.get("WHEREABOUTS_PY_AGENT_TIMEOUT") or DEFAULT_TIMEOUT)
    except ValueError:
        timeout = DEFAULT_TIMEOUT
    return forward(env, stdin, socket_path(env, stdin), timeout)
