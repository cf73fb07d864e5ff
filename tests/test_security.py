"""A NetworkAttachmentDefinition must not reach the host (issue 16).

The plugin runs as root; the NAD's `ipam` block is written by tenants. Each row of the security
review is reproduced here against the installed executable or the code it runs, with temp
directories and harmless marker files only: node-only keys from a NAD are refused before any file is
touched, a kubeconfig cannot run a command or read a file, log and data paths never follow symlinks
(even with the single-tenant opt-in), one agent call's log settings never reach another call, and an
internal error's text stays in our log.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ipam import cni, errors
from ipam.agent import Agent, Coalescer, Metrics, StoreCache, bind
from ipam.allocator import Lease
from ipam.config import load_config
from ipam.kubeconfig import KubeCredentials, load_node_kubeconfig
from ipam.log import Logger, append_record
from ipam.store import file as file_store
from ipam.store.file import FileStore
from ipam.store.locks import pool_lock
from tests.cni_exec import FLAT_FILE_ENV, Call, cni_env, run

CIDR = "10.216.0.0/24"


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with its type (and a symlink's target): 'nothing touched' checks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            kind = "link:" + os.readlink(path) if stat.S_ISLNK(st.st_mode) else oct(st.st_mode)
            size = "" if stat.S_ISDIR(st.st_mode) else f":{st.st_size}"
            out[str(path.relative_to(root))] = kind + size
    return out


class Node:
    """A node: its flat file (root-owned, 0644) and the tenant-reachable area beside it."""

    def __init__(self, tmp: Path, **flat: Any) -> None:
        self.tmp = tmp
        self.etc = tmp / "etc"
        self.etc.mkdir()
        self.data_dir = tmp / "node-data"
        self.log_file = tmp / "node.log"
        self.tenant = tmp / "tenant"  # what a tenant's emptyDir would be, as seen from the host
        self.tenant.mkdir()
        self.flat_file = self.etc / "whereabouts.conf"
        doc = {
            "datastore": "file",
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "node_name": "node-a",
            **flat,
        }
        self.flat_file.write_text(json.dumps(doc))
        self.flat_file.chmod(0o644)

    def env(self, command: str, container: str = "c1", **extra: str) -> dict[str, str]:
        return cni_env(
            command,
            container,
            **{
                FLAT_FILE_ENV: str(self.flat_file),
                "WHEREABOUTS_PY_AGENT_SOCKET": str(self.tmp / "no-agent.sock"),
                "NODENAME": "node-a",
                **extra,
            },
        )

    def conf(self, **ipam: Any) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": "tenant-net",
            "type": "macvlan",
            "ipam": {"type": "whereabouts-py", "range": CIDR, **ipam},
        }

    def call(self, command: str, container: str = "c1", **ipam: Any) -> Call:
        return run(self.conf(**ipam), self.env(command, container))


def error_of(call: Call, code: int) -> dict[str, Any]:
    assert call.code == 1, call
    doc = call.result
    assert doc["code"] == code, doc
    return doc


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@pytest.fixture
def opt_in_node(tmp_path: Path) -> Node:
    return Node(tmp_path, allow_nad_overrides=True)


def exec_kubeconfig(path: Path, marker: Path) -> Path:
    """A kubeconfig whose user runs a command at load time; the command only creates `marker`."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
        "users": [
            {
                "name": "u",
                "user": {
                    "exec": {
                        "apiVersion": "client.authentication.k8s.io/v1",
                        "command": "/bin/sh",
                        "args": ["-c", f"touch {marker}; echo '{{}}'"],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


def kubeconfig_with(path: Path, user: dict[str, Any], cluster: dict[str, Any] | None = None) -> Path:
    doc = {
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1", **(cluster or {})}}],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "pools"}}],
        "current-context": "x",
    }
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    return path


# -- node-only keys --------------------------------------------------------------------------------


def test_each_node_only_key_from_a_nad_is_code_7_and_touches_nothing(node: Node) -> None:
    marker = node.tenant / "exec-ran"
    kubeconfig = exec_kubeconfig(node.tenant / "kubeconfig", marker)
    (node.tenant / "tenant.conf").write_text(json.dumps({"allow_nad_overrides": True, "data_dir": "/x"}))
    attempts: dict[str, Any] = {
        "kubernetes": {"kubeconfig": str(kubeconfig)},
        "log_file": str(node.tenant / "victim.log"),
        "data_dir": str(node.tenant / "data"),
        "datastore": "kubernetes",
        "configuration_path": str(node.tenant / "tenant.conf"),
        "agent_socket": str(node.tenant / "agent.sock"),
        "node_name": "node-b",
        "allow_nad_overrides": True,
    }
    before = tree(node.tmp)
    for key, value in attempts.items():
        for command in ("ADD", "DEL", "GC", "STATUS"):
            conf = node.conf(**{key: value})
            if command in ("GC", "STATUS"):
                conf["cniVersion"] = "1.1.0"
                conf["cni.dev/valid-attachments"] = []
            doc = error_of(run(conf, node.env(command)), errors.INVALID_CONFIG)
            name = "ipam.kubernetes.kubeconfig" if key == "kubernetes" else f"ipam.{key}"
            assert name in doc["msg"] and "flat file" in doc["msg"], doc
            # the node's own values are not echoed to the tenant
            assert str(node.data_dir) not in json.dumps(doc) and "node-a" not in json.dumps(doc)
    assert tree(node.tmp) == before  # no lease, no log line, no lock, no marker, nothing created
    assert not marker.exists()


def test_configuration_path_is_no_oracle_for_host_files(node: Node) -> None:
    """The same answer whether the named file exists, is a flat file, or is missing."""
    (node.tenant / "probe.conf").write_text(json.dumps({"data_dir": "/leak"}))
    answers = []
    for path in (str(node.tenant / "probe.conf"), "/etc/passwd", str(node.tenant / "missing")):
        doc = error_of(node.call("ADD", configuration_path=path), errors.INVALID_CONFIG)
        answers.append(doc["msg"].replace(repr(path), "PATH"))
        assert "/leak" not in json.dumps(doc)
    assert len(set(answers)) == 1, answers


def test_a_nad_may_repeat_the_node_values(node: Node) -> None:
    same = {
        "datastore": "file",
        "data_dir": str(node.data_dir) + "/",
        "log_file": str(node.log_file),
        "node_name": "node-a",
        "configuration_path": str(node.flat_file),
        "kubernetes": {},
        "agent_socket": str(node.tmp / "no-agent.sock"),  # the runtime's WHEREABOUTS_PY_AGENT_SOCKET
    }
    added = node.call("ADD", **same)
    assert added.code == 0, added
    assert added.result["ips"][0]["address"] == "10.216.0.1/24"
    assert (node.data_dir / "pools" / "10.216.0.0-24.json").exists()
    assert "cni.error" not in node.log_file.read_text()


def test_node_values_come_from_the_flat_file_not_the_nad(node: Node) -> None:
    cfg = load_config(
        json.dumps(node.conf()).encode(), environ={FLAT_FILE_ENV: str(node.flat_file), "NODENAME": "n"}
    )
    assert (cfg.ipam.datastore, cfg.ipam.data_dir, cfg.ipam.log_file) == (
        "file",
        str(node.data_dir),
        str(node.log_file),
    )
    assert cni.node_name(cfg) == "node-a"
    assert cfg.flat_file == str(node.flat_file)


def test_without_a_flat_file_a_nad_path_is_refused(tmp_path: Path) -> None:
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": {"range": CIDR, "data_dir": "/tmp/x"}})
    with pytest.raises(errors.CNIError) as info:
        load_config(stdin.encode(), flat_search=[str(tmp_path / "missing.conf")], environ={})
    assert info.value.code == errors.INVALID_CONFIG and "ipam.data_dir" in info.value.msg
    # the default itself may be repeated
    stdin = json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "n",
            "ipam": {"range": CIDR, "data_dir": "/var/lib/cni/whereabouts-py"},
        }
    )
    assert (
        load_config(stdin.encode(), flat_search=[], environ={}).ipam.data_dir == "/var/lib/cni/whereabouts-py"
    )


@pytest.mark.parametrize(
    "mode_or_owner", [0o666, 0o620, "uid-1000"], ids=["world-writable", "group-writable", "not-root"]
)
def test_a_flat_file_others_can_write_is_not_trusted(node: Node, mode_or_owner: int | str) -> None:
    if isinstance(mode_or_owner, int):
        node.flat_file.chmod(mode_or_owner)
    else:
        os.chown(node.flat_file, 1000, 1000)
    doc = error_of(node.call("ADD"), errors.INVALID_CONFIG)
    assert "flat configuration file" in doc["msg"] and str(node.flat_file) in doc["msg"]
    assert not node.data_dir.exists()


def test_the_opt_in_is_read_only_from_the_flat_file(node: Node) -> None:
    doc = error_of(
        node.call("ADD", allow_nad_overrides=True, data_dir=str(node.tenant)), errors.INVALID_CONFIG
    )
    assert "ipam.data_dir" in doc["msg"] or "ipam.allow_nad_overrides" in doc["msg"]
    assert tree(node.tenant) == {}


def test_opt_in_restores_nad_overrides(opt_in_node: Node) -> None:
    node = opt_in_node
    data = node.tmp / "nad-data"
    added = node.call("ADD", data_dir=str(data), node_name="node-z")
    assert added.code == 0, added
    pool = json.loads((data / "pools" / "10.216.0.0-24.json").read_text())
    assert [Lease.from_json(a).node for a in pool["spec"]["allocations"].values()] == ["node-z"]


def test_the_shim_never_connects_to_a_nad_agent_socket(node: Node) -> None:
    """A tenant's socket must not answer for the root shim: its forged reply would be the result."""
    path = str(node.tenant / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.2)
    forged = json.dumps(
        {"code": 0, "stdout": json.dumps({"cniVersion": "1.0.0", "ips": [{"address": "6.6.6.6/32"}]})}
    )
    accepted: list[bool] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            accepted.append(True)
            with conn:
                conn.recv(65536)
                conn.sendall(forged.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    flat = json.loads(node.flat_file.read_text())
    node.flat_file.write_text(json.dumps({**flat, "agent_socket": str(node.tmp / "no-agent.sock")}))
    try:
        env = node.env("ADD")
        del env["WHEREABOUTS_PY_AGENT_SOCKET"]  # the runtime did not name one: the flat file does
        call = run(node.conf(agent_socket=path), env)
    finally:
        stop.set()
        thread.join(timeout=10)
        server.close()
    assert accepted == []
    assert "6.6.6.6" not in call.stdout
    assert error_of(call, errors.INVALID_CONFIG)["msg"].startswith("invalid config: ipam.agent_socket")


def test_the_flat_file_may_name_the_agent_socket(node: Node, tmp_path: Path) -> None:
    from ipam.shim import DEFAULT_SOCKET, socket_path

    assert socket_path({FLAT_FILE_ENV: str(node.flat_file)}) == DEFAULT_SOCKET
    flat = json.loads(node.flat_file.read_text())
    node.flat_file.write_text(json.dumps({**flat, "agent_socket": "/run/other/agent.sock"}))
    assert socket_path({FLAT_FILE_ENV: str(node.flat_file)}) == "/run/other/agent.sock"
    env = {FLAT_FILE_ENV: str(node.flat_file), "WHEREABOUTS_PY_AGENT_SOCKET": "/run/env.sock"}
    assert socket_path(env, json.dumps(node.conf(agent_socket="/tenant.sock")).encode()) == "/run/env.sock"


# -- kubeconfig ------------------------------------------------------------------------------------


def test_an_exec_kubeconfig_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "exec-ran"
    kubeconfig = exec_kubeconfig(tmp_path / "node.kubeconfig", marker)
    # even the node's own flat file naming it: the CNI path takes inline credentials only
    node = Node(tmp_path, datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    for command in ("ADD", "DEL"):
        doc = error_of(node.call(command), errors.INVALID_CONFIG)
        assert "ipam.kubernetes.kubeconfig" in doc["msg"] and "exec" in doc["msg"], doc
    assert not marker.exists()


def test_an_exec_kubeconfig_never_runs_with_the_opt_in(opt_in_node: Node) -> None:
    node = opt_in_node
    marker = node.tenant / "exec-ran"
    kubeconfig = exec_kubeconfig(node.tenant / "kubeconfig", marker)
    doc = error_of(
        node.call("ADD", datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)}),
        errors.INVALID_CONFIG,
    )
    assert "exec" in doc["msg"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("user", "cluster", "field"),
    [
        ({"tokenFile": "SECRET"}, {}, "tokenFile"),
        ({"client-certificate": "SECRET", "client-key": "SECRET"}, {}, "client-certificate"),
        ({"client-key": "SECRET", "token": "t"}, {}, "client-key"),
        ({"token": "t"}, {"certificate-authority": "SECRET"}, "certificate-authority"),
        ({"auth-provider": {"name": "oidc", "config": {"id-token": "x"}}}, {}, "auth-provider"),
    ],
)
def test_credential_files_in_a_kubeconfig_are_refused_and_never_read(
    tmp_path: Path, user: dict[str, Any], cluster: dict[str, Any], field: str
) -> None:
    secret = tmp_path / "host-secret"
    secret.write_text("HOST-SECRET-CONTENT\n")

    def fill(value: Any) -> Any:
        return str(secret) if value == "SECRET" else value

    kubeconfig = kubeconfig_with(
        tmp_path / "kc", {k: fill(v) for k, v in user.items()}, {k: fill(v) for k, v in cluster.items()}
    )
    node = Node(tmp_path, datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    call = node.call("ADD")
    doc = error_of(call, errors.INVALID_CONFIG)
    assert field in doc["msg"] and "ipam.kubernetes.kubeconfig" in doc["msg"]
    assert "HOST-SECRET-CONTENT" not in call.stdout + call.stderr + node.log_file.read_text()
    # never even opened: as a FIFO without a writer, any read of it would hang the call
    secret.unlink()
    os.mkfifo(secret)
    doc = error_of(node.call("DEL"), errors.INVALID_CONFIG)
    assert field in doc["msg"]


def test_token_file_content_never_reaches_the_runtime_with_the_opt_in(opt_in_node: Node) -> None:
    node = opt_in_node
    secret = node.tmp / "admin-token"
    secret.write_text("CLUSTER-ADMIN-TOKEN")
    kubeconfig = kubeconfig_with(node.tenant / "kc", {"tokenFile": str(secret)})
    call = node.call("ADD", datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    error_of(call, errors.INVALID_CONFIG)
    assert "CLUSTER-ADMIN-TOKEN" not in call.stdout + call.stderr + node.log_file.read_text()


@pytest.mark.parametrize("change", ["group-writable", "other-writable", "not-root", "symlink-to-fifo"])
def test_node_kubeconfig_must_be_root_owned_and_private(tmp_path: Path, change: str) -> None:
    kubeconfig = kubeconfig_with(tmp_path / "kc", {"token": "t"})
    if change == "group-writable":
        kubeconfig.chmod(0o620)
    elif change == "other-writable":
        kubeconfig.chmod(0o602)
    elif change == "not-root":
        os.chown(kubeconfig, 1000, 1000)
    else:
        kubeconfig.unlink()
        os.mkfifo(tmp_path / "fifo")
        kubeconfig.symlink_to(tmp_path / "fifo")  # no writer: a blocking open would hang the call
    with pytest.raises(errors.CNIError) as info:
        load_node_kubeconfig(str(kubeconfig))
    assert info.value.code == errors.INVALID_CONFIG and "ipam.kubernetes.kubeconfig" in info.value.msg


@pytest.mark.parametrize(
    "content", [b"{{{ not: yaml: [", b"\x00\xff\xfe", b"- a\n- b\n", b"plain words", b""]
)
def test_a_kubeconfig_that_is_not_yaml_is_code_7_naming_the_key(tmp_path: Path, content: bytes) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_bytes(content)
    node = Node(tmp_path, datastore="kubernetes", kubernetes={"kubeconfig": str(kubeconfig)})
    doc = error_of(node.call("ADD"), errors.INVALID_CONFIG)
    assert "ipam.kubernetes.kubeconfig" in doc["msg"]


def test_inline_kubeconfig_gives_credentials(tmp_path: Path) -> None:
    import base64

    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    data = base64.b64encode(pem).decode()
    kubeconfig = kubeconfig_with(
        tmp_path / "kc", {"token": "abc"}, {"certificate-authority-data": data, "server": "https://k:6443/"}
    )
    creds = load_node_kubeconfig(str(kubeconfig))
    assert creds == KubeCredentials(server="https://k:6443", namespace="pools", ca_data=pem, token="abc")
    assert "abc" not in repr(creds)


# -- log file --------------------------------------------------------------------------------------


@pytest.mark.parametrize("nad", [False, True], ids=["flat-file", "nad-with-opt-in"])
def test_a_log_file_symlink_is_not_followed(tmp_path: Path, nad: bool) -> None:
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL\n")
    link = tmp_path / "link.log"
    link.symlink_to(victim)
    if nad:
        node = Node(tmp_path, allow_nad_overrides=True)
        call = node.call("ADD", log_file=str(link), log_level="debug")
    else:
        node = Node(tmp_path, log_file=str(link), log_level="debug")
        call = node.call("ADD")
    assert call.code == 0, call  # the lease is served; only the log line is dropped
    assert victim.read_text() == "ORIGINAL\n"
    assert link.is_symlink()


def test_a_symlinked_directory_in_the_log_path_is_not_followed(opt_in_node: Node) -> None:
    """O_NOFOLLOW guards only the last component: a tenant's directory swapped for a symlink to a host
    directory must not make root create a log file there (found trying to break this change)."""
    node = opt_in_node
    target = node.tmp / "host-dir"
    target.mkdir()
    (node.tenant / "logs").symlink_to(target)
    call = node.call("ADD", log_file=str(node.tenant / "logs" / "x.log"), log_level="debug")
    assert call.code == 0, call
    assert tree(target) == {}


def test_any_other_kubernetes_key_from_a_nad_is_refused(node: Node) -> None:
    doc = error_of(
        node.call("ADD", kubernetes={"k8s_api_root": "https://tenant.example"}), errors.INVALID_CONFIG
    )
    assert "ipam.kubernetes.k8s_api_root" in doc["msg"]
    doc = error_of(node.call("ADD", kubernetes="/tenant/kubeconfig"), errors.INVALID_CONFIG)
    assert "ipam.kubernetes" in doc["msg"]


def test_path_tricks_do_not_pass_for_the_node_value(node: Node) -> None:
    escaped = str(node.data_dir) + "/../tenant/data"
    doc = error_of(node.call("ADD", data_dir=escaped), errors.INVALID_CONFIG)
    assert "ipam.data_dir" in doc["msg"]
    assert not (node.tenant / "data").exists()
    same = f"{node.data_dir.parent}/./{node.data_dir.name}//"  # the node's path, spelled differently
    assert node.call("ADD", data_dir=same).code == 0


def test_a_fifo_or_directory_log_file_is_skipped_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.log"
    os.mkfifo(fifo)
    node = Node(tmp_path, log_file=str(fifo), log_level="debug")
    call = node.call("ADD")  # a blocking open of a FIFO with no reader would hang here
    assert call.code == 0, call
    assert append_record(str(tmp_path), "x\n") is False
    assert append_record(str(fifo), "x\n") is False


def test_a_hard_linked_log_file_is_not_written(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("ORIGINAL\n")
    os.link(victim, tmp_path / "x.log")
    assert append_record(str(tmp_path / "x.log"), "line\n") is False
    assert victim.read_text() == "ORIGINAL\n"


def test_a_new_log_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "new.log"
    old = os.umask(0)
    try:
        assert append_record(str(path), "line\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize("key", ["log_file", "data_dir"])
@pytest.mark.parametrize("opt_in", [False, True])
def test_a_nul_in_a_path_is_code_7_before_any_write(tmp_path: Path, key: str, opt_in: bool) -> None:
    node = Node(tmp_path, allow_nad_overrides=opt_in)
    before = tree(tmp_path)
    doc = error_of(node.call("ADD", **{key: str(tmp_path / "a\0b")}), errors.INVALID_CONFIG)
    assert f"ipam.{key}" in doc["msg"]
    assert tree(tmp_path) == before


def test_a_relative_path_is_code_7(opt_in_node: Node) -> None:
    doc = error_of(opt_in_node.call("ADD", data_dir="relative/data"), errors.INVALID_CONFIG)
    assert "ipam.data_dir" in doc["msg"] and "absolute" in doc["msg"]


def test_a_log_file_pointing_at_the_flat_file_cannot_break_the_node(opt_in_node: Node) -> None:
    """The review broke every later call by appending to the flat file; with node-only keys only the
    node's administrator can name it, and with the opt-in the tenant is trusted by definition. What
    must hold: the flat file is never written through a symlink planted beside it."""
    node = opt_in_node
    link = node.tenant / "to-flat"
    link.symlink_to(node.flat_file)
    before = node.flat_file.read_bytes()
    assert node.call("ADD", log_file=str(link)).code == 0
    assert node.flat_file.read_bytes() == before
    assert node.call("ADD", container="c2").code == 0


# -- data_dir --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data_dir", "pools", "reservations", "locks", "ancestor", "pool-file"])
def test_data_dir_symlinks_are_not_followed_even_with_the_opt_in(opt_in_node: Node, where: str) -> None:
    node = opt_in_node
    target = node.tmp / "elsewhere"  # stands for /etc or any host directory
    target.mkdir()
    (target / "keep").write_text("host file\n")
    data = node.tenant / "data"
    if where == "data_dir":
        data.symlink_to(target)
    elif where == "ancestor":
        (node.tenant / "up").symlink_to(target)
        data = node.tenant / "up" / "data"
    elif where == "pool-file":
        (data / "pools").mkdir(parents=True)
        (data / "pools" / "10.216.0.0-24.json").symlink_to(target / "keep")
    else:
        data.mkdir()
        (data / where).symlink_to(target)
    before = tree(target)
    call = node.call("ADD", data_dir=str(data))
    assert call.code == 1, call
    assert call.result["code"] in (errors.IO_FAILURE, errors.DATASTORE_ERROR), call.result
    assert "Traceback" not in call.stderr
    assert tree(target) == before
    assert (target / "keep").read_text() == "host file\n"


def test_a_directory_swapped_for_a_symlink_mid_write_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: pools/ is checked, then replaced by a symlink before the file is written. Writes go
    through the directory descriptor opened first, so they land in the real directory."""
    store = FileStore(str(tmp_path / "data"))
    store._ensure_dirs()
    target = tmp_path / "elsewhere"
    target.mkdir()
    real_opened_dir = file_store.opened_dir

    @contextmanager
    def swapping(path: str, create: bool = False) -> Iterator[int]:
        with real_opened_dir(path, create) as fd:
            if path == str(store.pools):
                os.rename(store.pools, tmp_path / "moved-pools")
                os.symlink(target, store.pools)
            yield fd

    monkeypatch.setattr(file_store, "opened_dir", swapping)
    file_store._atomic_write(store.pools / "p.json", b"{}")
    assert tree(target) == {}
    assert (tmp_path / "moved-pools" / "p.json").read_bytes() == b"{}"


def test_a_symlinked_lock_file_does_not_truncate_its_target(tmp_path: Path) -> None:
    """CVE-2025-68146: filelock < 3.20.1 truncated the target of a symlinked lock file."""
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "p.lock").symlink_to(victim)
    with pytest.raises(errors.CNIError) as info, pool_lock(str(locks), "p", 0.5):
        pass
    assert info.value.code in (errors.IO_FAILURE, errors.TRY_AGAIN_LATER)
    assert victim.read_text() == "host file\n"


def test_the_lock_directory_swapped_for_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    locks = tmp_path / "locks"
    locks.mkdir()
    with pool_lock(str(locks), "p", 1.0):
        pass
    os.rename(locks, tmp_path / "old-locks")
    locks.symlink_to(target)
    with pytest.raises(errors.CNIError) as info, pool_lock(str(locks), "p", 1.0):
        pass
    assert info.value.code == errors.IO_FAILURE and "symlink" in info.value.msg
    assert tree(target) == {}


# -- agent -----------------------------------------------------------------------------------------


def test_one_agent_call_log_file_never_receives_another_calls_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = Node(tmp_path, allow_nad_overrides=True)
    monkeypatch.setenv(FLAT_FILE_ENV, str(node.flat_file))
    agent = Agent()
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    conf_a = node.conf(log_file=str(a_log), log_level="debug")
    conf_b = node.conf(log_file=str(b_log), log_level="debug")
    conf_none = node.conf(log_level="debug")
    conf_none["ipam"]["log_file"] = ""  # the flat file's log_file is replaced by "none" for this call

    def serve(conf: dict[str, Any], container: str) -> None:
        reply = agent.serve_call({"env": node.env("ADD", container), "stdin": json.dumps(conf)})
        assert reply["code"] == 0, reply

    serve(conf_a, "from-a")
    serve(conf_none, "from-none")
    serve(conf_b, "from-b")
    threads = [
        threading.Thread(target=serve, args=(c, f"{n}{i}"))
        for i in range(6)
        for c, n in ((conf_a, "pa"), (conf_b, "pb"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.close()
    a_text, b_text = a_log.read_text(), b_log.read_text()
    assert "from-a" in a_text and "from-b" in b_text
    assert "from-none" not in a_text + b_text and "from-b" not in a_text and "from-a" not in b_text
    assert '"pb' not in a_text and '"pa' not in b_text
    for line in a_text.splitlines():
        assert json.loads(line).get("container", "").startswith(("from-a", "pa")), line


def test_call_settings_end_with_the_call() -> None:
    logger = Logger()
    logger.stderr = io.StringIO()
    logger.begin_call(level="debug", path="/nonexistent/x.log", container="c1")
    logger.end_call()
    logger.debug("after")  # the process default (info) applies again
    logger.info("after-info")
    assert "after-info" in logger.stderr.getvalue() and '"after"' not in logger.stderr.getvalue()
    assert "c1" not in logger.stderr.getvalue()


def test_an_internal_error_text_stays_in_our_log(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FLAT_FILE_ENV, str(node.flat_file))

    def boom(cfg: Any, env: Any, engines: Any) -> Any:
        raise RuntimeError("content of /etc/shadow: root:$6$SECRET")

    monkeypatch.setattr(cni, "cmd_add", boom)
    out = io.StringIO()
    assert cni.run(node.env("ADD"), json.dumps(node.conf()).encode(), out) == 1
    doc = json.loads(out.getvalue())
    assert doc["code"] == errors.DATASTORE_ERROR and "SECRET" not in out.getvalue()
    assert "SECRET" in node.log_file.read_text()


def test_store_cache_is_bounded_and_closes_evicted_stores_after_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[str] = []

    class Recorder(FileStore):
        def close(self) -> None:
            closed.append(str(self.root))

    monkeypatch.setattr("ipam.agent.open_store", lambda cfg: Recorder(cfg.ipam.data_dir))
    node = Node(tmp_path, allow_nad_overrides=True)
    monkeypatch.setenv(FLAT_FILE_ENV, str(node.flat_file))
    cache = StoreCache(limit=2)

    def cfg(name: str) -> Any:
        return load_config(json.dumps(node.conf(data_dir=str(tmp_path / name))).encode())

    with cache.use(cfg("d0")):
        for name in ("d1", "d2", "d3"):
            with cache.use(cfg(name)):
                pass
        assert len(cache.stores) == 2
        assert str(tmp_path / "d0") not in closed  # evicted while in use: still open
        assert str(tmp_path / "d1") in closed
    assert str(tmp_path / "d0") in closed
    cache.close()
    assert sorted(closed) == sorted(str(tmp_path / n) for n in ("d0", "d1", "d2", "d3"))


def test_an_idle_pool_worker_retires_and_a_new_call_gets_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coalescer = Coalescer(Metrics(), idle_seconds=0.01)
    import queue

    q: queue.SimpleQueue[Any] = queue.SimpleQueue()
    coalescer.queues[(1, "", True, "p")] = q
    assert coalescer._next(q) is None  # idle: retired, its queue dropped
    assert coalescer.queues == {}
    # through the agent: the worker of a served pool ends, later calls start a new one
    node = Node(tmp_path, allow_nad_overrides=True)
    monkeypatch.setenv(FLAT_FILE_ENV, str(node.flat_file))
    agent = Agent()
    agent.coalescer.idle_seconds = 0.01
    for i in range(3):
        before = set(threading.enumerate())
        reply = agent.serve_call({"env": node.env("ADD", f"c{i}"), "stdin": json.dumps(node.conf())})
        assert reply["code"] == 0, reply
        workers = [t for t in threading.enumerate() if t not in before and t.name.startswith("pool-")]
        assert len(workers) == 1
        workers[0].join(60)  # a bound for a broken reaper only: it retires after 0.01 s idle
        assert not workers[0].is_alive()
        assert agent.coalescer.queues == {}
    agent.close()


@pytest.fixture
def agent_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Node, Any]]:
    monkeypatch.setattr("ipam.agent._CallHandler.timeout", 0.3)
    node = Node(tmp_path, allow_nad_overrides=True)
    monkeypatch.setenv(FLAT_FILE_ENV, str(node.flat_file))
    path = str(tmp_path / "run" / "agent.sock")
    agent = Agent()
    server = bind(path, agent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield path, node, server
    server.shutdown()
    server.server_close()
    agent.close()


def test_agent_ends_a_connection_that_sends_nothing(agent_server: tuple[str, Node, Any]) -> None:
    from ipam.shim import forward

    path, node, _ = agent_server
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(path)
    silent.settimeout(60)  # only a bound for a broken agent: its read timeout (0.3 s) closes first
    assert silent.recv(1) == b""
    silent.close()
    answered = forward(node.env("ADD"), json.dumps(node.conf()).encode(), path, 30)
    assert answered is not None and answered[0] == 0, answered


def test_agent_caps_concurrent_connections(
    agent_server: tuple[str, Node, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ipam.shim import forward

    path, node, server = agent_server
    server.connections.limit = 1
    entered, release = threading.Event(), threading.Event()
    serve_call = server.agent.serve_call

    def held(request: dict[str, Any]) -> dict[str, Any]:
        entered.set()
        release.wait(60)
        return serve_call(request)

    monkeypatch.setattr(server.agent, "serve_call", held)
    stdin = json.dumps(node.conf()).encode()
    first: list[Any] = []
    thread = threading.Thread(target=lambda: first.append(forward(node.env("ADD", "c1"), stdin, path, 60)))
    thread.start()
    assert entered.wait(60)
    # the only slot is taken: this connection is closed unanswered (that shim runs in direct mode)
    assert forward(node.env("ADD", "c2"), stdin, path, 60) is None
    release.set()
    thread.join(60)
    assert first and first[0] is not None and first[0][0] == 0, first


# -- on the real API server ------------------------------------------------------------------------


@pytest.mark.parametrize("credential", ["client-certificate", "token"])
def test_node_kubeconfig_with_inline_credentials_serves_on_the_real_server(
    tmp_path: Path, real_kube: Any, credential: str
) -> None:
    """The node setup as the installer writes it: the flat file names an inline kubeconfig."""
    if credential == "token":
        kubeconfig = real_kube.token_kubeconfig("whereabouts-py", real_kube.namespace)
        rules = [
            {
                "apiGroups": ["whereabouts.cni.cncf.io"],
                "resources": ["ippools", "overlappingrangeipreservations"],
                "verbs": ["get", "list", "create", "update", "delete"],
            }
        ]
        real_kube.apply(
            [
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "Role",
                    "metadata": {"name": "plugin"},
                    "rules": rules,
                },
                {
                    "apiVersion": "rbac.authorization.k8s.io/v1",
                    "kind": "RoleBinding",
                    "metadata": {"name": "plugin"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "plugin"},
                    "subjects": [
                        {"kind": "ServiceAccount", "name": "whereabouts-py", "namespace": real_kube.namespace}
                    ],
                },
            ]
        )
    else:
        kubeconfig = real_kube.kubeconfig_path
    node = Node(tmp_path, datastore="kubernetes", kubernetes={"kubeconfig": kubeconfig})
    added = node.call("ADD", kubernetes={"kubeconfig": kubeconfig})  # repeating the node's value is fine
    assert added.code == 0, added
    assert added.result["ips"][0]["address"] == "10.216.0.1/24"
    pools = real_kube.api.objects("ippools", real_kube.namespace)
    assert [p["metadata"]["name"] for p in pools] == ["10.216.0.0-24"]


@pytest.mark.parametrize(
    ("cidr", "network_name", "pool", "reservation"),
    [("::/120", "", "0---120", "0--1"), ("::/120", "n" * 128, "n" * 128 + "----120", "n" * 128 + "---1")],
)
def test_an_ipv6_range_from_double_colon_gets_names_the_real_server_accepts(
    tmp_path: Path, real_kube: Any, cidr: str, network_name: str, pool: str, reservation: str
) -> None:
    node = Node(tmp_path, datastore="kubernetes", kubernetes={"kubeconfig": real_kube.kubeconfig_path})
    conf = node.conf()
    conf["ipam"].update(range=cidr, network_name=network_name)
    added = run(conf, node.env("ADD"))
    assert added.code == 0, added
    assert added.result["ips"][0]["address"] == "::1/120"
    assert [p["metadata"]["name"] for p in real_kube.api.objects("ippools", real_kube.namespace)] == [pool]
    reservations = real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace)
    assert [r["metadata"]["name"] for r in reservations] == [reservation]
    deleted = run(conf, node.env("DEL"))
    assert deleted.code == 0, deleted
    assert real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace) == []


def test_the_installers_kubeconfig_passes_the_cni_path_policy(tmp_path: Path) -> None:
    """What deploy/install.py writes on a node is what the CNI path accepts: inline data only."""
    from tests.test_deploy import inst

    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    cluster = inst.Cluster(server="https://10.96.0.1:443", ca=pem, namespace="kube-system", token_file="")
    path = tmp_path / "whereabouts.kubeconfig"
    path.write_bytes(inst.kubeconfig(cluster, "tok"))  # "tok": the token the installer minted
    path.chmod(0o600)
    assert load_node_kubeconfig(str(path)) == KubeCredentials(
        server="https://10.96.0.1:443", namespace="kube-system", ca_data=pem, token="tok"
    )
