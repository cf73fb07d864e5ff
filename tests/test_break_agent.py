"""Adversarial review of issue 22 items 5-11 (the node agent's limits): each test is a break found by
trying to wedge or slow the agent as a tenant writing NADs or as a local unprivileged user."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest

from ipam import agent as agentmod
from ipam import shim
from tests.test_agent_limits import BOUND, agent, get  # noqa: F401 - agent: the fixture
from tests.test_agent_restart import Sleeps, touch
from tests.test_realapi_faults import wait_for as poll


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


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def answered_or_closed(conn: socket.socket) -> bool:
    conn.setblocking(False)
    try:
        return conn.recv(1) is not None  # an answer, or b"" (closed)
    except BlockingIOError:
        return False
    except OSError:  # reset: closed too
        return True


def test_metrics_connections_cannot_make_the_agent_hold_their_headers(
    agent: tuple[subprocess.Popen[bytes], str, int],  # noqa: F811 - the fixture
) -> None:
    """A local user's connections on the metrics port, each sending 99 headers of 64 KiB and then an
    unfinished one (a byte every few seconds keeps it open): http.server kept 6.5 MiB per connection,
    ~100 MiB for the 16 of this test (200 MiB at the default 32) for as long as the user liked. The
    agent reads a few KiB of a request head, answers and closes."""
    proc, _, port = agent
    before = rss_kib(proc.pid)
    line = b"X-" + b"a" * (65536 - 8) + b": b\r\n"
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(BOUND)]
    try:
        for conn in held:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        for _ in range(99):  # round robin: every connection gets its headers read together
            for conn in held:
                with suppress(OSError):  # the agent answered and closed it
                    conn.sendall(line)
        for conn in held:
            with suppress(OSError):
                conn.sendall(b"X-last: ")
        grown = lambda: rss_kib(proc.pid) - before > 32 << 10  # noqa: E731
        poll(
            "every connection is answered or the agent grew",
            lambda: grown() or all(map(answered_or_closed, held)),
        )
        assert not grown(), f"the agent grew by {(rss_kib(proc.pid) - before) >> 10} MiB"
    finally:
        for conn in held:
            conn.close()
    assert get(port, "/healthz") == (200, b"ok\n")


# -- names: a trailing newline passed the `$` of the name patterns ----------------------------------


@pytest.mark.parametrize("key", ["network_name", "name"])
def test_a_name_with_a_trailing_newline_is_not_an_object_name(key: str) -> None:
    """`re.match("^...$")` lets one trailing "\\n" through: network_name "blue\\n" made the file store
    write a pool file named "blue\\n-10.0.0.0-16.json" (and an object name Kubernetes refuses)."""
    from tests.test_config import fail, netconf

    ipam: dict[str, Any] = {"range": "10.0.0.0/16", "node_slice_size": "/24"}
    if key == "network_name":
        ipam["network_name"] = "blue\n"
        err = fail(netconf(ipam))
    else:
        err = fail(netconf(ipam, name="blue\n"))
    assert err.code == 7 and err.msg.startswith(
        f"invalid config: {'ipam.' if key == 'network_name' else ''}{key}: "
    )


def test_a_container_id_with_a_trailing_newline_is_refused() -> None:
    from ipam.cni import container_identity
    from ipam.errors import CNIError

    env = {"CNI_CONTAINERID": "c1\n", "CNI_IFNAME": "net1", "CNI_NETNS": "/proc/1/ns/net"}
    with pytest.raises(CNIError) as info:
        container_identity(env, need_netns=True)
    assert info.value.code == 4 and "CNI_CONTAINERID" in info.value.msg


# -- a tenant's value echoed whole into the error ---------------------------------------------------

BIG = "k" * (1 << 20)
NET = {
    "cniVersion": "1.0.0",
    "name": "n",
    "type": "ipvlan",
    "ipam": {"type": "whereabouts-py", "range": "10.0.0.0/24"},
}
ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0", "CNI_NETNS": "/proc/1/ns/net"}


@pytest.mark.parametrize(
    ("label", "top", "env"),
    [
        ("cniVersion", {"cniVersion": BIG}, {}),
        ("runtimeConfig.ips entry", {"runtimeConfig": {"ips": [BIG]}}, {}),
        ("runtimeConfig.ips not a list", {"runtimeConfig": {"ips": BIG}}, {}),
        ("CNI_ARGS IP", {}, {"CNI_ARGS": "IP=" + BIG[:100000]}),
        ("CNI_ARGS pair", {}, {"CNI_ARGS": BIG[:100000]}),
        ("CNI_IFNAME", {}, {"CNI_IFNAME": BIG[:100000]}),
        ("CNI_COMMAND", {}, {"CNI_COMMAND": BIG[:100000]}),
    ],
)
def test_a_huge_value_is_cut_in_the_error(label: str, top: dict[str, Any], env: dict[str, str]) -> None:
    """A 1 MiB cniVersion or runtimeConfig.ips entry (a NAD, a pod's annotation) came back whole in the
    error JSON (and the node's log line), where every other key's value is cut at 256 characters."""
    import io

    from ipam import cni

    out = io.StringIO()
    assert cni.run({**ENV, **env}, json.dumps({**NET, **top}).encode(), out) == 1
    answer = json.loads(out.getvalue())
    assert answer["code"] in (1, 4, 7) and len(out.getvalue()) < 1024, (label, out.getvalue()[:300])


# -- names that pass one by one but not together ----------------------------------------------------

LONG_NODE = "b" * 63 + "." + "b" * 60  # a valid node name of 124 characters


def test_a_node_and_network_name_too_long_together_are_code_7_naming_both(tmp_path: Path) -> None:
    """network_name (at most 128) and the node's name (at most 253) each pass, but the slice pools and
    their lock files join them: every ADD on that node failed at the store with "invalid name
    'nodeslicepool-aaa...-bbb...': not a file name of the datastore", naming no key to change."""
    from ipam.config import load_config
    from ipam.errors import CNIError
    from tests.test_config import netconf

    flat = tmp_path / "whereabouts.conf"
    flat.write_text(json.dumps({"node_name": LONG_NODE}))
    ipam = {
        "range": "fd00:1234:5678:9abc:def0:1234:5678:0/112",
        "node_slice_size": "/120",
        "network_name": "a" * 128,
    }
    with pytest.raises(CNIError) as info:
        load_config(netconf(ipam), flat_search=[str(flat)])
    assert (
        info.value.code == 7 and "ipam.node_name" in info.value.msg and "ipam.network_name" in info.value.msg
    )
    ipam["network_name"] = "a" * 60  # short enough together: accepted
    assert load_config(netconf(ipam), flat_search=[str(flat)]).ipam.network_name == "a" * 60


def test_the_longest_accepted_names_fit_the_file_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound the config applies is one the stores can hold: an ADD with the longest names it
    accepts gets an address (file datastore; its file names are the tighter bound)."""
    import io

    from ipam import cni, nodeslices

    nodeslices.forget_cache()
    flat = tmp_path / "whereabouts.conf"
    monkeypatch.setenv("WHEREABOUTS_PY_FLAT_FILE", str(flat))
    flat.write_text(
        json.dumps({"datastore": "file", "data_dir": str(tmp_path / "d"), "node_name": LONG_NODE})
    )
    ipam = {
        "type": "whereabouts-py",
        "range": "fd00:1234:5678:9abc:def0:1234:5678:0/112",
        "node_slice_size": "/120",
    }
    for length in range(128, 0, -1):  # the longest network_name this node accepts
        ipam["network_name"] = "a" * length
        doc = {"cniVersion": "1.0.0", "name": "n", "type": "ipvlan", "ipam": ipam}
        out = io.StringIO()
        code = cni.run(ENV, json.dumps(doc).encode(), out)
        answer = json.loads(out.getvalue())
        if code == 0 or "ipam.network_name" not in answer.get("msg", ""):
            break
    assert code == 0 and answer["ips"], answer


@pytest.mark.parametrize("length", [233, 240])
def test_a_name_the_file_store_accepts_is_one_it_can_write(tmp_path: Path, length: int) -> None:
    """safepath.checked_name let names up to 240 bytes through, but a pool is written through a
    temp file `.<name>.json.<12 hex>.tmp` (23 more): names of 233-240 bytes passed the guard and failed
    the write with code 5 (ENAMETOOLONG). They are refused up front (code 7), and 232 is written."""
    from ipam.allocator import Lease
    from ipam.errors import CNIError
    from ipam.store.file import FileStore

    store = FileStore(str(tmp_path / "d"))
    lease = Lease("c1", "ns/p", "eth0")
    store.write_pool(store.read_pool("p" * 232, "10.0.0.0/24"), {1: lease})
    assert store.read_pool("p" * 232, "10.0.0.0/24").allocations
    with pytest.raises(CNIError) as info:
        store.write_pool(store.read_pool("p" * length, "10.0.0.0/24"), {1: lease})
    assert info.value.code == 7


# -- a second agent on the same socket --------------------------------------------------------------


def test_an_agent_whose_socket_was_taken_and_removed_stops_claiming_to_serve(tmp_path: Path) -> None:
    """A second agent started on the node's socket path (by hand, for a look, or a second DaemonSet)
    replaces the socket file, and removes it when it stops. The first agent went on touching its
    heartbeat, unreachable: every CNI call on the node waited the shim's full 15 s for it, then ran in
    direct mode, for as long as the first agent lived (its /healthz said ok). Now its /healthz fails
    (the kubelet restarts it, and it binds again) and its heartbeat stops, so shims do not wait."""
    import signal
    import time
    import urllib.error

    from tests.kubeapi.real import free_port
    from tests.test_agent_limits import AGENT, _answers

    sock, port = str(tmp_path / "run" / "agent.sock"), free_port()
    first = subprocess.Popen(
        [AGENT, "--socket", sock, "--metrics-port", str(port)], stderr=subprocess.DEVNULL
    )
    try:
        poll("the first agent listens", lambda: os.path.exists(sock))
        poll("/healthz answers", lambda: _answers(port))
        inode = os.stat(sock).st_ino
        second = subprocess.Popen([AGENT, "--socket", sock, "--metrics-port", "0"], stderr=subprocess.DEVNULL)
        poll("the second agent's socket", lambda: os.path.exists(sock) and os.stat(sock).st_ino != inode)
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
        assert not os.path.exists(sock)

        def unhealthy() -> bool:
            try:
                get(port, "/healthz")
            except urllib.error.HTTPError as exc:
                return exc.code == 503
            return False

        poll("the first agent's /healthz fails", unhealthy)
        marker = shim.heartbeat_path(sock)
        old = time.time() - 60
        os.utime(marker, (old, old))
        beats = 3 * agentmod.HEARTBEAT_SECONDS / 0.05
        with pytest.raises(pytest.fail.Exception):  # the heartbeat is not touched again
            poll("the heartbeat is touched", lambda: os.stat(marker).st_mtime > old + 1, polls=int(beats))
        assert shim.forward({"CNI_COMMAND": "ADD"}, b"{}", sock, timeout=60, wait=15) is None
    finally:
        first.terminate()
        first.wait(timeout=60)


# -- CRD bounds against what Whereabouts writes -----------------------------------------------------


@pytest.mark.apiserver
def test_a_whereabouts_nodeslicepool_that_etcd_holds_is_accepted(real_kube: Any) -> None:
    """Go Whereabouts cuts any range: 10.0.0.0/14 in /29 slices is 32,768 status entries, ~1.5 MB with
    a few nodes holding slices, under etcd's 1.5 MiB. The CRD's maxItems of 16,384 refused it, so
    Whereabouts' controller could no longer update it once these CRDs were installed. The bound is
    now what etcd can hold at all (65,536 entries are over 2.6 MB)."""
    import ipaddress

    from tests.test_crd_limits import create

    cut = ipaddress.ip_network("10.0.0.0/14").subnets(new_prefix=29)
    entries = [
        {"nodeName": f"worker-{i:03d}" if i < 50 else "", "sliceRange": str(s)} for i, s in enumerate(cut)
    ]
    assert len(entries) == 32768
    slices = {"apiVersion": "whereabouts.cni.cncf.io/v1alpha1", "kind": "NodeSlicePool", "metadata": {"name": "wb"},
              "spec": {"range": "10.0.0.0/14", "sliceSize": "/29"}, "status": {"allocations": entries}}  # fmt: skip
    created = create(real_kube, "nodeslicepools", slices)
    assert len(created["status"]["allocations"]) == 32768


# -- ipam.addresses had no limit --------------------------------------------------------------------


def test_static_addresses_past_the_limit_are_code_7_naming_the_key_and_the_limit() -> None:
    """Every static address inside a range is its own read-modify-write of the pool (a growing pool:
    quadratic): a 30 KB NAD with 1,000 `addresses` took one ADD 18.7 s of CPU in direct mode, 20,000 ran
    for hours (and through the agent, its core). Bounded like `ipRanges`, far above real configs."""
    from ipam.config import LIMITS
    from tests.test_config import fail, load, netconf

    limit = LIMITS["addresses"]
    addresses = [{"address": f"10.0.{i // 256}.{i % 256}/16"} for i in range(2, limit + 3)]
    err = fail(netconf({"range": "10.0.0.0/16", "addresses": addresses}))
    assert (
        err.code == 7
        and err.msg.startswith("invalid config: ipam.addresses: ")
        and f"limit of {limit}" in err.msg
    )
    assert len(load({"range": "10.0.0.0/16", "addresses": addresses[:limit]}).ipam.addresses) == limit
