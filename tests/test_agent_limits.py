"""Nothing on the node wedges the agent: its metrics port (any local user may connect) serves a bounded
number of connections and closes silent ones, and the unix socket the shims use (root only) is bounded
too, with timeouts that never cut a call however long it takes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam import agent as agentmod
from ipam import shim
from tests.cni_exec import cni_env, run
from tests.kubeapi.real import free_port
from tests.test_agent import file_conf
from tests.test_realapi_faults import wait_for as poll

AGENT = str(Path(sys.executable).parent / "ipam-agent")
BOUND = 16  # --metrics-connections for these tests (the default is larger)


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def get(port: int, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
        return int(answer.status), bytes(answer.read())


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, int]]:
    sock, port = str(tmp_path / "run" / "agent.sock"), free_port()
    argv = [AGENT, "--socket", sock, "--metrics-port", str(port), "--metrics-connections", str(BOUND)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        poll("the agent listens", lambda: os.path.exists(sock), polls=1200)
        poll("/healthz answers", lambda: _answers(port))
        yield proc, sock, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz") == (200, b"ok\n")
    except OSError:
        return False


def test_idle_metrics_connections_are_bounded_and_the_agent_recovers(
    tmp_path: Path, agent: tuple[subprocess.Popen[bytes], str, int]
) -> None:
    """Three times the bound of idle connections: the agent's threads stay within the bound, /healthz
    and an ADD are still answered, and the threads go once the connections close."""
    proc, sock, port = agent
    conf = file_conf(tmp_path)
    env = {
        "WHEREABOUTS_PY_AGENT_SOCKET": sock,
        "WHEREABOUTS_PY_AGENT_WAIT": "0",
    }  # no agent: direct mode at once
    assert run(conf, cni_env("ADD", "warm", **env)).code == 0  # the pool's worker thread runs now
    base = threads(proc.pid)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3 * BOUND)]
    try:
        # accepted after all of them (one listen queue, served in order), yet answered
        assert get(port, "/healthz") == (200, b"ok\n")
        assert threads(proc.pid) <= base + BOUND
        call = run(conf, cni_env("ADD", "meanwhile", **env))
        assert call.code == 0 and "agent.unavailable" not in call.stderr, call  # the agent answered it
        assert call.result["ips"][0]["address"] == "10.70.0.2/24"
        assert threads(proc.pid) <= base + BOUND
    finally:
        for conn in idle:
            conn.close()
    poll("the connections' threads end", lambda: threads(proc.pid) <= base)
    assert get(port, "/healthz") == (200, b"ok\n")


def test_sigterm_stops_the_agent_while_connections_are_held(
    agent: tuple[subprocess.Popen[bytes], str, int],
) -> None:
    proc, sock, port = agent
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3 * BOUND)]
    try:
        assert get(port, "/healthz") == (200, b"ok\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not os.path.exists(sock)
    finally:
        for conn in idle:
            conn.close()


def test_silent_metrics_connections_are_closed(agent: tuple[subprocess.Popen[bytes], str, int]) -> None:
    _, _, port = agent
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        for conn in held:  # never sends: the agent closes it after HEALTH_TIMEOUT
            conn.settimeout(agentmod.HEALTH_TIMEOUT * 6)
            assert conn.recv(1) == b""
    finally:
        for conn in held:
            conn.close()


# -- the call socket, in process ---------------------------------------------------------------------


class FakeAgent:
    """Stands in for Agent.serve_call: answers once `release` is set (or at once)."""

    def __init__(self, release: threading.Event | None = None, seconds: float = 0.0) -> None:
        self.release = release
        self.seconds = seconds
        self.started = threading.Semaphore(0)

    def serve_call(self, request: dict[str, Any]) -> dict[str, Any]:
        self.started.release()
        if self.release is not None:
            self.release.wait(60)
        time.sleep(self.seconds)
        return {"code": 0, "stdout": f"{request['stdin']}\n"}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """serve(fake, max_connections) -> (server, socket path), served on a thread until the test ends."""
    servers: list[agentmod._SocketServer] = []

    def start(
        fake: FakeAgent, max_connections: int = agentmod.MAX_CONNECTIONS
    ) -> tuple[agentmod._SocketServer, str]:
        path = str(tmp_path / f"agent{len(servers)}.sock")
        server = agentmod._SocketServer(path, fake, max_connections)  # type: ignore[arg-type]
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server, path

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def request(stdin: str) -> bytes:
    return json.dumps({"env": {"CNI_COMMAND": "ADD"}, "stdin": stdin}).encode()


def test_call_socket_timeout_never_cuts_a_long_call(serve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read timeout is for a client that does not send: a call that runs ten times longer than it
    is answered, and a silent connection is closed."""
    monkeypatch.setattr(agentmod._CallHandler, "timeout", 0.1)
    _, path = serve(FakeAgent(seconds=1.0))
    assert shim.exchange(path, request("slow"), timeout=60) == (0, "slow\n")
    silent = socket.socket(socket.AF_UNIX)
    silent.settimeout(30)
    silent.connect(path)
    with silent:
        assert silent.recv(1) == b""


def test_call_socket_is_bounded(serve: Any) -> None:
    """At the bound a new connection is closed unanswered (its shim repeats the call, ipam.shim); the
    calls being served are not disturbed."""
    release = threading.Event()
    fake = FakeAgent(release)
    _, path = serve(fake, 2)
    answers: list[tuple[int, str]] = []
    calls = [
        threading.Thread(target=lambda i=i: answers.append(shim.exchange(path, request(f"c{i}"), 60)))
        for i in range(2)
    ]
    for call in calls:
        call.start()
    for _ in calls:
        assert fake.started.acquire(timeout=30)
    with pytest.raises(shim.AgentUnavailable) as refused:  # closed unanswered, or mid-send
        shim.exchange(path, request("third"), 60)
    assert refused.value.retry
    release.set()
    for call in calls:
        call.join(30)
    assert sorted(answers) == [(0, "c0\n"), (0, "c1\n")]
    assert shim.exchange(path, request("after"), 60) == (0, "after\n")


# -- stopping: drain ---------------------------------------------------------------------------------


def test_drain_stops_accepting_and_finishes_calls_in_flight(serve: Any) -> None:
    release = threading.Event()
    fake = FakeAgent(release)
    server, path = serve(fake)
    answers: list[tuple[int, str]] = []
    call = threading.Thread(target=lambda: answers.append(shim.exchange(path, request("inflight"), 60)))
    call.start()
    assert fake.started.acquire(timeout=30)
    server.shutdown()  # what SIGTERM does (ipam.agent.main), then:
    left: list[int] = []
    draining = threading.Thread(target=lambda: left.append(server.drain(60)))
    draining.start()
    poll("the socket is gone", lambda: not os.path.exists(path))
    with pytest.raises(shim.AgentUnavailable) as refused:
        shim.exchange(path, request("late"), 60)
    assert refused.value.retry  # the shim waits for the next agent
    assert draining.is_alive()
    release.set()
    draining.join(30)
    call.join(30)
    assert answers == [(0, "inflight\n")] and left == [0]


def test_drain_is_bounded(serve: Any) -> None:
    release = threading.Event()
    fake = FakeAgent(release)
    server, path = serve(fake)
    failed: list[shim.AgentUnavailable] = []

    def call() -> None:
        try:
            shim.exchange(path, request("stuck"), 60)
        except shim.AgentUnavailable as exc:
            failed.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert fake.started.acquire(timeout=30)
    server.shutdown()
    assert server.drain(0.2) == 1  # still running: cut, unanswered
    caller.join(30)
    assert [exc.retry for exc in failed] == [True]  # its shim repeats it with the next agent
    release.set()


def test_drain_leaves_the_successors_socket(serve: Any) -> None:
    """A roll may start the next agent while this one drains: the new socket file stays."""
    old, path = serve(FakeAgent())
    new = agentmod.bind(path, FakeAgent())  # type: ignore[arg-type]
    threading.Thread(target=new.serve_forever, daemon=True).start()
    try:
        old.shutdown()
        assert old.drain(5) == 0
        assert shim.exchange(path, request("next"), 60) == (0, "next\n")
    finally:
        new.shutdown()
        new.drain(5)
    assert not os.path.exists(path)
