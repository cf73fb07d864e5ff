"""Adversarial review of issue 22 items 5-11 (the node agent's limits): each test is a break found by
trying to wedge or slow the agent as a tenant writing NADs or as a local unprivileged user."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam import agent as agentmod
from ipam import shim
from tests.test_agent_restart import Sleeps, touch


class Counting:
    """Stands in for Agent.serve_call, counting the calls that reach it."""

    def __init__(self) -> None:
        self.calls = 0

    def serve_call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        return {"code": 0, "stdout": "answered\n"}


@pytest.fixture
def counted(tmp_path: Path) -> Iterator[tuple[agentmod._SocketServer, Counting, str]]:
    fake = Counting()
    path = str(tmp_path / "agent.sock")
    server = agentmod._SocketServer(path, fake)  # type: ignore[arg-type]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    touch(shim.heartbeat_path(path))  # a live agent: the shim would wait for it
    try:
        yield server, fake, path
    finally:
        server.shutdown()
        server.server_close()


def test_a_tenant_config_too_large_for_the_agent_goes_direct_at_once(
    counted: tuple[agentmod._SocketServer, Counting, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NAD at etcd's object size (1.5 MiB) written in emoji: the shim's ASCII request is 3x that,
    past the agent's 4 MiB request limit. The agent cut the request, closed the connection unanswered,
    and the shim repeated the 4.5 MiB request every 50 ms for its whole wait (15 s, ~300 requests the
    agent parses) before direct mode: every pod of that NAD paid 15 s, and the agent burnt a core.
    A request the agent cannot take is not sent: direct mode at once."""
    server, fake, path = counted
    accepted: list[int] = []
    admit = server.connections.admit

    def counting_admit(conn: Any, evict: bool) -> bool:
        accepted.append(1)
        return admit(conn, evict)

    monkeypatch.setattr(server.connections, "admit", counting_admit)
    sleeps = Sleeps()
    monkeypatch.setattr(shim, "_sleep", sleeps)
    nad = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "whereabouts-py", "range": "10.0.0.0/24"}}
    nad["description"] = "\U0001f600" * ((3 << 19) // 4 - 64)  # 1.5 MiB of UTF-8 in all
    stdin = json.dumps(nad, ensure_ascii=False).encode()
    assert len(stdin) <= 3 << 19
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c", "CNI_IFNAME": "eth0"}
    assert shim.forward(env, stdin, path, timeout=60, wait=5) is None  # direct mode
    assert (sleeps.count, len(accepted), fake.calls) == (0, 0, 0)
    # a call the agent can take is still forwarded
    assert shim.forward(env, b"{}", path, timeout=60, wait=5) == (0, "answered\n")


def test_agent_request_limit_is_the_shims() -> None:
    assert agentmod.MAX_REQUEST == shim.MAX_REQUEST
