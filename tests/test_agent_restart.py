"""Agent restarts are not outages: the shim waits a bounded time for a restarted agent (heartbeat
file beside the socket), and does not wait on a node that never ran one."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ipam import shim
from ipam.agent import heartbeat
from tests.cni_exec import cni_env, finish, kube_netconf, run, start
from tests.kubeapi.real import ApiError, RealKube, free_port

AGENT = str(Path(sys.executable).parent / "ipam-agent")
REPLY = {"code": 0, "stdout": "answer\n"}


class Sleeps:
    """Stands in for the shim's sleep: counts the waits and runs `on_sleep` at each."""

    def __init__(self, on_sleep: Any = None) -> None:
        self.count = 0
        self.on_sleep = on_sleep

    def __call__(self, seconds: float) -> None:
        self.count += 1
        if self.on_sleep is not None:
            self.on_sleep(self.count)


def serve_once(path: str, answer: bool) -> threading.Thread:
    """Listen on `path`; the first connection gets REPLY (or is closed unanswered when not `answer`)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            if answer:
                conn.sendall(json.dumps(REPLY).encode())
        server.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def touch(path: str, age: float = 0.0) -> None:
    Path(path).touch()
    now = time.time()
    os.utime(path, (now - age, now - age))


def test_no_agent_ever_means_no_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps = Sleeps()
    monkeypatch.setattr(shim, "_sleep", sleeps)
    sock = str(tmp_path / "agent.sock")
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=60) is None
    assert sleeps.count == 0  # no heartbeat file: this node never ran an agent


def test_stale_heartbeat_means_no_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An agent gone for longer than the wait budget (removed from the node) is not waited for."""
    sleeps = Sleeps()
    monkeypatch.setattr(shim, "_sleep", sleeps)
    sock = str(tmp_path / "agent.sock")
    touch(shim.heartbeat_path(sock), age=61)
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=60) is None
    assert sleeps.count == 0
    touch(shim.heartbeat_path(sock), age=1)  # the same, seen a second ago, with no wait configured
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=0) is None
    assert sleeps.count == 0


def test_restarting_agent_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Socket missing while the heartbeat is fresh: the shim retries until the new agent listens."""
    sock = str(tmp_path / "agent.sock")
    touch(shim.heartbeat_path(sock))
    served: list[threading.Thread] = []

    def on_sleep(n: int) -> None:
        if n == 3:  # the new agent comes up during the third pause
            served.append(serve_once(sock, answer=True))

    sleeps = Sleeps(on_sleep)
    monkeypatch.setattr(shim, "_sleep", sleeps)
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=60) == (0, "answer\n")
    assert sleeps.count == 3


def test_call_dropped_by_a_stopping_agent_is_repeated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(tmp_path / "agent.sock")
    touch(shim.heartbeat_path(sock))
    first = serve_once(sock, answer=False)  # accepts, reads, closes without an answer

    def on_sleep(n: int) -> None:
        first.join(5)
        os.unlink(sock)
        serve_once(sock, answer=True)

    monkeypatch.setattr(shim, "_sleep", Sleeps(on_sleep))
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=60) == (0, "answer\n")


def test_wait_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A heartbeat that stays fresh (agent stuck starting) still ends the wait after `wait` seconds."""
    sock = str(tmp_path / "agent.sock")
    touch(shim.heartbeat_path(sock))
    clock = [100.0]
    monkeypatch.setattr(shim, "_now", lambda: clock[0])

    def on_sleep(n: int) -> None:
        clock[0] += 1.0
        touch(shim.heartbeat_path(sock))

    sleeps = Sleeps(on_sleep)
    monkeypatch.setattr(shim, "_sleep", sleeps)
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=5, wait=10) is None
    assert sleeps.count == 10


def test_wait_comes_from_the_environment_only(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    monkeypatch.setattr(shim, "forward", lambda env, stdin, path, timeout, wait=0.0: seen.append(wait))
    conf = json.dumps({"ipam": {"agent_wait": 999}}).encode()
    shim.try_agent(cni_env("ADD", "c"), conf)
    shim.try_agent(cni_env("ADD", "c", WHEREABOUTS_PY_AGENT_WAIT="3"), conf)
    shim.try_agent(cni_env("ADD", "c", WHEREABOUTS_PY_AGENT_WAIT="9999"), conf)
    shim.try_agent(cni_env("ADD", "c", WHEREABOUTS_PY_AGENT_WAIT="junk"), conf)
    assert seen == [shim.DEFAULT_WAIT, 3.0, shim.MAX_WAIT, shim.DEFAULT_WAIT]


def test_heartbeat_is_touched_until_stopped(tmp_path: Path) -> None:
    sock = str(tmp_path / "agent.sock")
    stop = threading.Event()
    thread = heartbeat(sock, stop, interval=0.01)
    marker = Path(shim.heartbeat_path(sock))
    for _ in range(500):
        if marker.exists():
            break
        time.sleep(0.01)
    assert (marker.stat().st_mode & 0o777) == 0o600
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and marker.exists()  # left behind: a restart is expected


def start_agent(
    sock: str, *args: str, metrics_port: int = 0, stderr: Any = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    argv = [AGENT, "--socket", sock, "--metrics-port", str(metrics_port), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)
    for _ in range(600):
        if os.path.exists(sock):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("agent did not start")


def objects(real_kube: RealKube, plural: str) -> list[dict[str, Any]]:
    """The test namespace's objects; a server still (re)initializing its storage (429, e.g. after another
    test restarted it) is asked again."""
    for _ in range(300):
        try:
            return real_kube.api.objects(plural, real_kube.namespace)
        except ApiError as exc:
            if exc.status != 429:
                raise
            time.sleep(0.1)
    raise AssertionError("the API server stayed unavailable")


def leases(real_kube: RealKube) -> dict[str, str]:
    """container id -> address of every lease in the test's one pool (empty before it exists)."""
    pools = objects(real_kube, "ippools")
    if not pools:
        return {}
    [pool] = pools
    return {v["id"]: f"10.76.0.{k}/24" for k, v in (pool["spec"].get("allocations") or {}).items()}


def read_until(proc: subprocess.Popen[str], marker: str, lines: list[str]) -> None:
    """Read `proc`'s stderr lines into `lines` until one contains `marker` (bounded by a timeout)."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], 120)
    while ready:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if marker in line:
            return
        ready, _, _ = select.select([proc.stderr], [], [], 120)
    pytest.fail(f"no {marker} from the shim: {lines[-3:]}")


class GatedProxy:
    """A TCP relay to the API server whose answers can be held back: while `gate` is clear, calls the
    agent has taken stay in flight (TLS passes through untouched; the server's certificate names
    127.0.0.1, whatever the port)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("https://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.listener.getsockname()[1]}"
        self.gate = threading.Event()
        self.gate.set()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(self.target)
            except OSError:
                return
            self.conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, gated: bool) -> None:
        try:
            while data := src.recv(65536):
                if gated:
                    self.gate.wait()
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kubeconfig(self, original: str, path: Path) -> str:
        doc = json.loads(Path(original).read_text())
        doc["clusters"][0]["cluster"]["server"] = self.url
        path.write_text(json.dumps(doc))
        path.chmod(0o600)
        return str(path)

    def close(self) -> None:
        self.gate.set()
        for conn in [self.listener, *self.conns]:
            conn.close()


def metric(port: int, name: str) -> float | None:
    """The agent's metric `name`, None while its metrics port does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    [value] = [line.split()[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


@pytest.mark.slow
def test_daemonset_roll_during_50_concurrent_adds(real_kube: RealKube, tmp_path: Path) -> None:
    """Agent A holds 25 ADDs in flight (their API answers held back) when it gets SIGTERM; 25 more
    start while it drains and wait for agent B, which starts on the same socket path while A still
    drains. A answers every call it had taken before it exits; B serves the rest; each ADD gets its
    own address, and every lease and reservation belongs to an answered ADD."""
    sock = str(tmp_path / "run" / "agent.sock")
    proxy = GatedProxy(real_kube.url)
    kubeconfig = proxy.kubeconfig(real_kube.kubeconfig_path, tmp_path / "proxied.kubeconfig")
    conf = kube_netconf(kubeconfig, tmp_path, "10.76.0.0/24")
    port = free_port()
    a_log = (tmp_path / "agent-a.log").open("w")
    env = {"WHEREABOUTS_PY_AGENT_SOCKET": sock, "WHEREABOUTS_PY_AGENT_WAIT": "60"}
    agent_a = start_agent(sock, "--drain-seconds", "150", metrics_port=port, stderr=a_log)
    agent_b: subprocess.Popen[bytes] | None = None
    lines: dict[int, list[str]] = {}
    try:
        warm = run(conf, cni_env("ADD", "warm", **env))  # A's API connection is open before the gate closes
        assert warm.code == 0, warm
        proxy.gate.clear()
        procs = [start(conf, cni_env("ADD", f"c{i}", **env)) for i in range(25)]
        for _ in range(2400):  # until A serves all 25 (bounded poll)
            if metric(port, "whereabouts_py_calls_in_flight") == 25:
                break
            time.sleep(0.05)
        else:
            pytest.fail("agent A never had the 25 ADDs in flight")
        agent_a.send_signal(signal.SIGTERM)  # the DaemonSet rolls: A stops accepting ...
        for _ in range(600):
            if not os.path.exists(sock):
                break
            time.sleep(0.05)
        else:
            pytest.fail("agent A kept its socket after SIGTERM")
        late = [start(conf, cni_env("ADD", f"c{i}", **env)) for i in range(25, 50)]
        for i, proc in enumerate(late, start=25):  # each finds no agent and waits for the next one
            read_until(proc, "agent.waiting", lines.setdefault(i, []))
        procs += late
        agent_b = start_agent(sock)  # ... and B starts on the same path while A still drains
        assert agent_a.poll() is None
        proxy.gate.set()
        calls = [finish(p) for p in procs]
        assert agent_a.wait(timeout=150) == 0
        after = run(conf, cni_env("ADD", "after", **env))  # B's socket outlived A
    finally:
        proxy.close()
        for agent in (agent_a, agent_b):
            if agent is not None and agent.poll() is None:
                agent.terminate()
                agent.wait(timeout=60)
        a_log.close()
    assert [c.code for c in calls] == [0] * 50, [c.stdout for c in calls if c.code]
    assert after.code == 0 and "agent." not in after.stderr, after
    got = {f"c{i}": c.result["ips"][0]["address"] for i, c in enumerate(calls)}
    got |= {"warm": warm.result["ips"][0]["address"], "after": after.result["ips"][0]["address"]}
    assert len(set(got.values())) == 52
    assert leases(real_kube) == got  # every answer is the lease written for it, nothing extra
    reservations = objects(real_kube, "overlappingrangeipreservations")
    assert sorted(r["spec"]["containerid"] for r in reservations) == sorted(got)
    stderr = ["".join(lines.get(i, [])) + c.stderr for i, c in enumerate(calls)]
    assert not [e for e in stderr[:25] if "agent.waiting" in e or "agent.unavailable" in e]  # A answered them
    assert all("agent.back" in e and "agent.unavailable" not in e for e in stderr[25:])  # B answered them
    drained = [
        json.loads(line)
        for line in (tmp_path / "agent-a.log").read_text().splitlines()
        if "agent.drain" in line
    ]
    assert [(r["event"], r.get("calls"), r.get("calls_cut")) for r in drained] == [
        ("agent.draining", 25, None),
        ("agent.drained", None, 0),
    ]


def test_a_slow_agent_is_not_asked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A timeout means the agent is there and still working: repeating the call would only stack a
    second one behind it, so the shim falls back (races' timeout rules apply), heartbeat or not."""
    sock = str(tmp_path / "agent.sock")
    touch(shim.heartbeat_path(sock))
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(sock)
    server.listen(4)
    held: list[socket.socket] = []
    thread = threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True)
    thread.start()  # accepts and never answers
    sleeps = Sleeps()
    monkeypatch.setattr(shim, "_sleep", sleeps)
    assert shim.forward(cni_env("ADD", "c"), b"{}", sock, timeout=0.2, wait=60) is None
    assert sleeps.count == 0
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()
