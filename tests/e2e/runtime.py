"""A tiny container runtime for the end-to-end suite: network namespaces, CNI calls, cleanup.

Layout (nothing here touches the real host's links, addresses or routes):

    node netns  "<prefix>node-N"   made by the test; every main plugin runs inside it
                                    (`ip netns exec NODE plugin`), so the bridge the bridge plugin
                                    makes and the parent links macvlan/ipvlan need live there
    pod netns   "<prefix>pod-N"    made by the test; CNI_NETNS points at /var/run/netns/<name>

A parent link for macvlan/ipvlan is one end of a veth pair whose both ends stay in the node netns
(the kernel this runs on may lack the `dummy` driver; veth is always there). Deleting a netns
deletes every link in it, so cleanup is: DEL every attachment still held (like a runtime tearing
down a sandbox), then delete the pod namespaces, then the node namespace.

The plugins run inside the node netns, whose loopback is not the test process's: LoopbackForwarder
makes a port of the test process (the Kubernetes API test server) answer on the same address inside
the node netns, so a kubeconfig works unchanged there.

Namespace names carry the pid of the pytest process (`wpye2e-<pid>-...`), so a session sweep can
remove leftovers of a run that died without touching those of a run still going.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/var/run/netns")
SYSTEM_CNI_DIR = Path("/usr/lib/cni")
REPO_ROOT = Path(__file__).resolve().parents[2]
OUR_PLUGIN = REPO_ROOT / "bin" / "whereabouts-py"
OUR_TYPE = "whereabouts-py"
NAME_PREFIX = "wpye2e-"
RUN_PREFIX = f"{NAME_PREFIX}{os.getpid()}-"
PLUGIN_TIMEOUT = 60.0

_counter = itertools.count()
_counter_lock = threading.Lock()


def unique(tag: str) -> str:
    with _counter_lock:
        n = next(_counter)
    return f"{RUN_PREFIX}{tag}-{n}"


def version_at_least(version: str, minimum: tuple[int, int, int]) -> bool:
    parts = tuple(int(p) for p in version.split("."))
    return parts >= minimum


def run(argv: list[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    """`ip -n NETNS -j ARGS...` parsed (an empty list when ip prints nothing)."""
    out = run(["ip", "-n", netns, "-j", *args]).stdout.strip()
    doc: list[dict[str, Any]] = json.loads(out) if out else []
    return doc


def list_netns() -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())


def delete_netns(name: str) -> None:
    if (NETNS_DIR / name).exists():
        run(["ip", "netns", "del", name], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_netns() -> list[str]:
    """Delete namespaces left by earlier test runs whose pytest process is gone; returns their names."""
    removed = []
    pattern = re.compile(rf"^{re.escape(NAME_PREFIX)}(\d+)-")
    for name in list_netns():
        m = pattern.match(name)
        if m and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            delete_netns(name)
            removed.append(name)
    return removed


def sweep_own_netns() -> list[str]:
    """Delete every namespace this pytest process made and did not already delete."""
    left = [n for n in list_netns() if n.startswith(RUN_PREFIX)]
    for name in left:
        delete_netns(name)
    return left


def make_cni_bin_dir(directory: Path, ipam_plugin: Path = OUR_PLUGIN) -> Path:
    """A CNI_PATH directory: links to Debian's plugins plus our IPAM executable."""
    directory.mkdir(parents=True, exist_ok=True)
    for plugin in SYSTEM_CNI_DIR.iterdir():
        if plugin.is_file() and os.access(plugin, os.X_OK):
            (directory / plugin.name).symlink_to(plugin)
    (directory / OUR_TYPE).symlink_to(ipam_plugin)
    return directory


@dataclass
class CniCall:
    """One plugin execution: what went in and what came out."""

    command: str
    plugin: str
    container_id: str
    ifname: str
    conf: dict[str, Any]
    code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc

    def describe(self) -> str:
        return (
            f"{self.command} {self.plugin} container={self.container_id} ifname={self.ifname} "
            f"exit={self.code}\nstdin: {json.dumps(self.conf)}\nstdout: {self.stdout.strip()}\n"
            f"stderr: {self.stderr.strip()}"
        )


class CniFailed(AssertionError):
    def __init__(self, call: CniCall) -> None:
        super().__init__(f"CNI call failed:\n{call.describe()}")
        self.call = call


@dataclass
class Attachment:
    """A successful ADD the runtime remembers (like libcni's result cache) for CHECK and DEL."""

    pod: Pod
    ifname: str
    conf: dict[str, Any]
    result: dict[str, Any]
    deleted: bool = False

    @property
    def version(self) -> str:
        return str(self.conf["cniVersion"])

    def addresses(self) -> list[str]:
        """The CIDR addresses of the result, e.g. ['10.213.1.2/24']."""
        return [str(ip["address"]) for ip in self.result.get("ips", [])]


@dataclass
class Pod:
    """A sandbox: one network namespace and the identity the runtime passes in CNI_ARGS."""

    netns: str
    container_id: str
    namespace: str
    name: str
    uid: str
    attachments: list[Attachment] = field(default_factory=list)
    kubernetes: bool = True  # False: a plain runtime (podman, cnitool) that sends no K8S_* args

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)

    @property
    def cni_args(self) -> str:
        if not self.kubernetes:
            return "IgnoreUnknown=1"
        return (
            f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.namespace};K8S_POD_NAME={self.name};"
            f"K8S_POD_INFRA_CONTAINER_ID={self.container_id};K8S_POD_UID={self.uid}"
        )

    @property
    def podref(self) -> str:
        return f"{self.namespace}/{self.name}"


class Runtime:
    """Plays containerd + Multus for one test: owns a node netns, pods, and their attachments."""

    def __init__(self, cni_bin: Path) -> None:
        self.cni_bin = cni_bin
        self.node = unique("node")
        self.pods: list[Pod] = []
        self.after_dels: list[Callable[[], None]] = []  # run once every DEL is done, before netns go
        self._lock = threading.Lock()
        run(["ip", "netns", "add", self.node])
        run(["ip", "-n", self.node, "link", "set", "lo", "up"])

    # ---- namespaces and links -------------------------------------------------------------------

    def new_pod(self, name: str, namespace: str = "rook-ceph") -> Pod:
        netns = unique("pod")
        run(["ip", "netns", "add", netns])
        pod = Pod(
            netns=netns,
            container_id=secrets.token_hex(32),
            namespace=namespace,
            name=name,
            uid=f"{secrets.token_hex(4)}-{secrets.token_hex(2)}-{secrets.token_hex(2)}-{secrets.token_hex(6)}",
        )
        with self._lock:
            self.pods.append(pod)
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        return pod

    def add_parent_link(self, name: str) -> str:
        """An up link named `name` in the node netns for macvlan/ipvlan to sit on (a veth end)."""
        peer = f"{name}p"
        run(["ip", "-n", self.node, "link", "add", name, "type", "veth", "peer", "name", peer])
        for link in (name, peer):
            run(["ip", "-n", self.node, "link", "set", link, "up"])
        return name

    # ---- CNI calls ------------------------------------------------------------------------------

    def exec_plugin(
        self,
        command: str,
        conf: Mapping[str, Any],
        pod: Pod,
        ifname: str,
        *,
        netns: str | None = None,
        env: Mapping[str, str] | None = None,
        plugin: str | None = None,
    ) -> CniCall:
        """Exec the plugin named by conf["type"] (or `plugin`) inside the node netns, as libcni would."""
        plugin = plugin or str(conf["type"])
        cni_env = {
            **os.environ,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.container_id,
            "CNI_NETNS": pod.netns_path if netns is None else netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": pod.cni_args,
            "CNI_PATH": str(self.cni_bin),
            **(env or {}),
        }
        argv = ["ip", "netns", "exec", self.node, str(self.cni_bin / plugin)]
        proc = subprocess.run(
            argv,
            input=json.dumps(conf),
            env=cni_env,
            capture_output=True,
            text=True,
            timeout=PLUGIN_TIMEOUT,
            check=False,
        )
        return CniCall(
            command, plugin, pod.container_id, ifname, dict(conf), proc.returncode, proc.stdout, proc.stderr
        )

    @staticmethod
    def delegate_conf(conf: Mapping[str, Any], selection: Mapping[str, Any] | None) -> dict[str, Any]:
        """The config Multus hands the main plugin for a network selection element
        (`k8s.v1.cni.cncf.io/networks: [{"name": ..., "ips": [...]}]`): its `ips` go in as
        `runtimeConfig.ips` when the NAD declares `"capabilities": {"ips": true}`, as libcni
        injects capability args; the main plugin passes that config on to IPAM."""
        out = dict(conf)
        ips = (selection or {}).get("ips")
        if ips and (conf.get("capabilities") or {}).get("ips"):
            out["runtimeConfig"] = {**(conf.get("runtimeConfig") or {}), "ips": list(ips)}
        return out

    def try_add(
        self, pod: Pod, conf: Mapping[str, Any], ifname: str, selection: Mapping[str, Any] | None = None
    ) -> tuple[CniCall, Attachment | None]:
        """ADD without raising; a success is remembered for CHECK and DEL like a runtime does.
        `selection`: the pod's network selection element for this network (Multus)."""
        conf = self.delegate_conf(conf, selection)
        call = self.exec_plugin("ADD", conf, pod, ifname)
        if not call.ok:
            return call, None
        att = Attachment(pod=pod, ifname=ifname, conf=dict(conf), result=call.json())
        with self._lock:
            pod.attachments.append(att)
        return call, att

    def add(
        self, pod: Pod, conf: Mapping[str, Any], ifname: str, selection: Mapping[str, Any] | None = None
    ) -> Attachment:
        call, att = self.try_add(pod, conf, ifname, selection)
        if att is None:
            raise CniFailed(call)
        return att

    @staticmethod
    def with_prev_result(att: Attachment) -> dict[str, Any]:
        return {**att.conf, "prevResult": att.result}

    def try_check(self, att: Attachment) -> CniCall:
        return self.exec_plugin("CHECK", self.with_prev_result(att), att.pod, att.ifname)

    def check(self, att: Attachment) -> None:
        """CHECK as libcni does it: only for cniVersion >= 0.4.0, always with prevResult."""
        if not version_at_least(att.version, (0, 4, 0)):
            raise AssertionError(
                f"CHECK is not defined for cniVersion {att.version}; the runtime never sends it"
            )
        call = self.try_check(att)
        if not call.ok:
            raise CniFailed(call)

    def delete_conf(self, att: Attachment) -> dict[str, Any]:
        """libcni hands DEL the cached result as prevResult from 0.4.0 on, and nothing before."""
        if version_at_least(att.version, (0, 4, 0)):
            return self.with_prev_result(att)
        return dict(att.conf)

    def delete(self, att: Attachment) -> None:
        call = self.exec_plugin("DEL", self.delete_conf(att), att.pod, att.ifname)
        if not call.ok:
            raise CniFailed(call)
        att.deleted = True

    def delete_unknown(self, pod: Pod, conf: Mapping[str, Any], ifname: str) -> CniCall:
        """DEL for an attachment that has no cached result (e.g. its ADD failed)."""
        return self.exec_plugin("DEL", conf, pod, ifname)

    # ---- cleanup --------------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """DEL every live attachment (last first), then delete every namespace; returns DEL failures."""
        failures = []
        try:
            for pod in reversed(self.pods):
                for att in reversed(pod.attachments):
                    if att.deleted:
                        continue
                    try:
                        self.delete(att)
                    except (CniFailed, subprocess.TimeoutExpired) as exc:
                        failures.append(str(exc))
            for hook in self.after_dels:
                hook()
        finally:
            for pod in self.pods:
                delete_netns(pod.netns)
            delete_netns(self.node)
        return failures


# ---- inspection helpers ---------------------------------------------------------------------------


def netns_addresses(netns: str, ifname: str) -> list[str]:
    """Global-scope addresses on `ifname` in `netns` as CIDRs."""
    out = []
    for link in ip_json(netns, "addr", "show", "dev", ifname):
        for info in link.get("addr_info", []):
            if info.get("scope") == "global":
                out.append(f"{info['local']}/{info['prefixlen']}")
    return out


def netns_routes(netns: str, family: str = "-4") -> list[dict[str, Any]]:
    return ip_json(netns, family, "route", "show")


def netns_links(netns: str) -> list[str]:
    return [str(link["ifname"]) for link in ip_json(netns, "link", "show")]


def ping(netns: str, address: str, count: int = 2) -> subprocess.CompletedProcess[str]:
    """A few pings from inside `netns` with short timeouts (never leaves the test namespaces)."""
    return run(
        ["ip", "netns", "exec", netns, "ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-w", "5", address],
        check=False,
        timeout=15,
    )


# ---- the file datastore, read back -----------------------------------------------------------------


@dataclass
class StoreView:
    """What the file datastore holds under data_dir: pools (spec.allocations) and reservations."""

    pools: dict[str, dict[str, Any]]
    reservations: dict[str, dict[str, Any]]

    def leases_of(self, container_id: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(pool file, offset, lease) of every allocation held by `container_id`."""
        return [
            (path, offset, lease)
            for path, doc in self.pools.items()
            for offset, lease in doc["spec"].get("allocations", {}).items()
            if lease.get("id") == container_id
        ]

    def reservations_of(self, container_id: str) -> list[str]:
        return [
            path for path, doc in self.reservations.items() if doc["spec"].get("containerid") == container_id
        ]

    def held_by(self, container_id: str) -> list[str]:
        """Everything in the store that still names `container_id` (for failure messages)."""
        return [f"{p} offset {o}: {lease}" for p, o, lease in self.leases_of(container_id)] + [
            f"reservation {r}" for r in self.reservations_of(container_id)
        ]


def read_store(data_dir: Path) -> StoreView:
    """Every JSON document under data_dir: those with spec.allocations are pools, those with
    spec.containerid are overlapping-range reservations (file names are not relied on)."""
    pools: dict[str, dict[str, Any]] = {}
    reservations: dict[str, dict[str, Any]] = {}
    for path in sorted(data_dir.rglob("*.json")):
        with contextlib.suppress(FileNotFoundError):
            doc = json.loads(path.read_text())
            spec = doc.get("spec") if isinstance(doc, dict) else None
            if not isinstance(spec, dict):
                continue
            rel = str(path.relative_to(data_dir))
            if "range" in spec or "allocations" in spec:
                pools[rel] = doc
            elif "containerid" in spec:
                reservations[rel] = doc
    return StoreView(pools, reservations)


def tools_missing() -> list[str]:
    """What the suite needs from the machine and does not find."""
    missing = []
    if os.geteuid() != 0:
        missing.append(f"root (running as uid {os.geteuid()}; network namespaces need root)")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            missing.append(
                f"`{tool}` on PATH (apt-get install {'iproute2' if tool == 'ip' else 'iputils-ping'})"
            )
    for plugin in ("bridge", "macvlan", "ipvlan", "loopback"):
        path = SYSTEM_CNI_DIR / plugin
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (apt-get install containernetworking-plugins)")
    if not os.access(OUR_PLUGIN, os.X_OK):
        missing.append(f"{OUR_PLUGIN} (our CNI executable, executable bit set)")
    return missing


@contextlib.contextmanager
def probe_netns() -> Iterator[str]:
    name = unique("probe")
    run(["ip", "netns", "add", name])
    try:
        yield name
    finally:
        delete_netns(name)


def kernel_supports(link_kind: str) -> str | None:
    """None when the kernel can make a `link_kind` link on a veth parent, else ip's error text."""
    with probe_netns() as ns:
        run(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        args = ["ip", "-n", ns, "link", "add", "c0", "link", "p0", "type", link_kind]
        proc = run(args, check=False)
        return None if proc.returncode == 0 else (proc.stderr.strip() or f"exit {proc.returncode}")


# ---- a loopback port of this process, made reachable inside a netns ------------------------------

CLONE_NEWNET = 0x40000000


def _listen_in_netns(netns: str, port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:`port` that belongs to `netns`.

    A socket keeps the netns it was created in, and setns(2) moves only the calling thread, so a
    throwaway thread enters the netns, makes the socket and ends; the caller never leaves its own.
    """
    made: list[socket.socket | BaseException] = []

    def enter_and_listen() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
            made.append(sock)
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=enter_and_listen, name=f"listen-{netns}")
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


class LoopbackForwarder:
    """127.0.0.1:PORT inside `netns` relays to 127.0.0.1:PORT of the test process (e.g. the Kubernetes
    API test server), so a plugin exec'd inside the node netns reaches it with an unchanged kubeconfig."""

    def __init__(self, netns: str, port: int) -> None:
        self.port = port
        self.listener = _listen_in_netns(netns, port)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name=f"forward-{netns}", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                inner, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                outer = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                outer.settimeout(None)
            except OSError:
                inner.close()
                continue
            self.conns += [inner, outer]
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
