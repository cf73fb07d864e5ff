"""Black-box CNI tests: exec the installed `whereabouts-py` (and `bin/whereabouts-py`) with env + stdin.

Every call is checked for the protocol's framing: stdout is empty or exactly one JSON document, no
Python traceback anywhere, errors are `{cniVersion, code, msg}` with a non-zero exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = Path(sys.executable).parent / "whereabouts-py"
BIN = ROOT / "bin" / "whereabouts-py"
VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
POOL = "10.0.0.0-24"


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def doc(self) -> dict[str, Any]:
        doc = json.loads(self.stdout)  # strict: exactly one JSON document (plus whitespace)
        assert isinstance(doc, dict)
        return doc

    def error(self, code: int) -> dict[str, Any]:
        """Assert this is a CNI error with `code`; return the error document."""
        assert self.code != 0, self
        doc = self.doc
        assert doc["code"] == code, doc
        assert isinstance(doc["msg"], str) and doc["msg"]
        assert doc["cniVersion"] in VERSIONS
        return doc


class Plugin:
    """Runs the executable for one test's data dir."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data_dir = tmp / "data"
        self.log_file = tmp / "plugin.log"

    def conf(self, version: str = "1.0.0", **ipam: Any) -> dict[str, Any]:
        block: dict[str, Any] = {
            "type": "whereabouts-py",
            "datastore": "file",
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "range": "10.0.0.0/24",
        }
        block.update(ipam)
        return {"cniVersion": version, "name": "testnet", "type": "macvlan", "ipam": block}

    def env(
        self,
        command: str | None,
        container: str = "c1",
        ifname: str = "net1",
        pod: str | None = "p1",
        netns: bool = True,
        node: str = "node-a",
        **extra: str,
    ) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CNI_CONTAINERID": container,
            "CNI_IFNAME": ifname,
            "CNI_PATH": "/opt/cni/bin",
            "NODENAME": node,
            # never reach a node agent that might run on this host: this tests direct mode
            "WHEREABOUTS_PY_AGENT_SOCKET": str(self.tmp / "no-agent.sock"),
            # the suite's single-tenant flat file (tests/cni_exec.py)
            "WHEREABOUTS_PY_FLAT_FILE": os.environ["WHEREABOUTS_PY_FLAT_FILE"],
        }
        if command is not None:
            env["CNI_COMMAND"] = command
        if netns:
            env["CNI_NETNS"] = f"/var/run/netns/{container}"
        if pod is not None:
            env["CNI_ARGS"] = f"IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod};K8S_POD_UID=uid-{pod}"
        env.update(extra)
        return env

    def run(self, env: dict[str, str], stdin: bytes | dict[str, Any], exe: Path = INSTALLED) -> Result:
        data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
        proc = subprocess.run([str(exe)], env=env, input=data, capture_output=True, timeout=60)
        res = Result(proc.returncode, proc.stdout.decode(), proc.stderr.decode())
        assert "Traceback" not in res.stdout and "Traceback" not in res.stderr, res
        if res.stdout.strip():
            res.doc  # noqa: B018 - parses strictly: one JSON document, nothing else
            assert res.stdout.count("\n") == 1 and res.stdout.endswith("\n"), res.stdout
        # every stderr line is a structured log record
        for line in res.stderr.splitlines():
            assert isinstance(json.loads(line), dict), line
        return res

    def call(self, command: str | None, conf: dict[str, Any] | bytes | None = None, **env: Any) -> Result:
        return self.run(self.env(command, **env), self.conf() if conf is None else conf)

    def add(self, conf: dict[str, Any] | None = None, **env: Any) -> Result:
        res = self.call("ADD", conf, **env)
        assert res.code == 0, res
        return res

    def pool(self, name: str = POOL) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.data_dir / "pools" / f"{name}.json").read_text())
        return doc

    def leases(self, name: str = POOL) -> dict[str, dict[str, Any]]:
        allocations: dict[str, dict[str, Any]] = self.pool(name)["spec"]["allocations"]
        return allocations

    def log_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_file.read_text().splitlines()]


@pytest.fixture
def plugin(tmp_path: Path) -> Plugin:
    return Plugin(tmp_path)


def addresses(res: Result) -> list[str]:
    return [ip["address"] for ip in res.doc["ips"]]


# -- VERSION ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stdin", [b"", b'{"cniVersion": "0.4.0"}'])
def test_version(plugin: Plugin, stdin: bytes) -> None:
    res = plugin.run({"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}, stdin)
    assert res.code == 0
    assert res.doc["supportedVersions"] == VERSIONS
    assert res.doc["cniVersion"] == ("0.4.0" if stdin else "1.1.0")


def test_bin_script_smoke(plugin: Plugin) -> None:
    """The copyable bin/whereabouts-py finds its interpreter and speaks the same protocol."""
    res = plugin.run({"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}, b"", exe=BIN)
    assert res.code == 0 and res.doc["supportedVersions"] == VERSIONS
    res = plugin.run(plugin.env("ADD"), plugin.conf(), exe=BIN)
    assert res.code == 0 and addresses(res) == ["10.0.0.1/24"]
    res = plugin.run(plugin.env("ADD", container="c2", pod="p2"), plugin.conf(), exe=BIN)
    assert addresses(res) == ["10.0.0.2/24"]
    res = plugin.run(plugin.env("DEL"), plugin.conf(), exe=BIN)
    assert (res.code, res.stdout) == (0, "")
    assert list(plugin.leases()) == ["2"]
    res = plugin.run(plugin.env("ADD"), b"{", exe=BIN)
    res.error(6)


# -- ADD in each version -------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_add_result_per_version(plugin: Plugin, version: str) -> None:
    conf = plugin.conf(
        version,
        gateway="10.0.0.1",
        ipRanges=[{"range": "fd00::/64"}],
        routes=[{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}],
        dns={"nameservers": ["10.0.0.53"], "search": ["svc.local"]},
    )
    doc = plugin.add(conf).doc
    assert doc["cniVersion"] == version
    expected_ips: list[dict[str, Any]] = [
        {"address": "10.0.0.2/24", "gateway": "10.0.0.1"},
        {"address": "fd00::1/64"},
    ]
    if version < "1.0.0":
        expected_ips[0]["version"] = "4"
        expected_ips[1]["version"] = "6"
    assert doc["ips"] == expected_ips
    assert doc["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.254"}]
    assert doc["dns"] == {"nameservers": ["10.0.0.53"], "search": ["svc.local"]}
    raw = plugin.leases()["2"]
    assert "node" not in raw and "poduid" not in raw  # packed into `attrs`
    lease = Lease.from_json(raw)
    assert (lease.id, lease.podref, lease.ifname, lease.node) == ("c1", "ns/p1", "net1", "node-a")
    assert lease.poduid == "uid-p1"
    check = plugin.call("CHECK", conf)
    if version < "0.4.0":
        assert "CHECK" in check.error(1)["msg"]
    else:
        assert (check.code, check.stdout) == (0, "")
    res = plugin.call("DEL", conf, netns=version in ("0.3.1", "1.0.0"))  # CNI_NETNS unset on the others
    assert (res.code, res.stdout) == (0, "")
    assert plugin.leases() == {}
    assert plugin.leases("fd00---64") == {}


def test_add_is_idempotent_and_addresses_are_distinct(plugin: Plugin) -> None:
    assert addresses(plugin.add()) == ["10.0.0.1/24"]
    assert addresses(plugin.add(container="c2", pod="p2")) == ["10.0.0.2/24"]
    # same pod and interface again (a sandbox restart with a new container id): same address
    assert addresses(plugin.add(container="c1-restarted", pod="p1")) == ["10.0.0.1/24"]
    assert plugin.leases()["1"]["id"] == "c1-restarted"
    assert len(plugin.leases()) == 2
    # another interface of the same pod: another address
    assert addresses(plugin.add(ifname="net2")) == ["10.0.0.3/24"]


def test_add_without_pod_args_keys_by_container(plugin: Plugin) -> None:
    assert addresses(plugin.add(pod=None)) == ["10.0.0.1/24"]
    assert addresses(plugin.add(pod=None)) == ["10.0.0.1/24"]
    assert addresses(plugin.add(pod=None, container="other")) == ["10.0.0.2/24"]
    assert plugin.leases()["1"]["podref"] == ""


# -- DEL ---------------------------------------------------------------------------------------------


def test_del_releases_and_the_address_is_reused(plugin: Plugin) -> None:
    plugin.add()
    plugin.add(container="c2", pod="p2")
    res = plugin.call("DEL")
    assert (res.code, res.stdout) == (0, "")
    assert list(plugin.leases()) == ["2"]
    assert addresses(plugin.add(container="c3", pod="p3")) == ["10.0.0.1/24"]


def test_del_of_unknown_succeeds_with_empty_stdout(plugin: Plugin) -> None:
    res = plugin.call("DEL", container="never-added")  # no pool file at all yet
    assert (res.code, res.stdout) == (0, "")
    plugin.add()
    res = plugin.call("DEL", container="never-added")
    assert (res.code, res.stdout) == (0, "")
    res = plugin.call("DEL", ifname="eth9")
    assert (res.code, res.stdout) == (0, "")
    assert list(plugin.leases()) == ["1"]


# -- CHECK ----------------------------------------------------------------------------------------------


def test_check(plugin: Plugin) -> None:
    version = "1.1.0"
    conf = plugin.conf(version)
    res = plugin.call("CHECK", conf)
    assert "10.0.0.0/24" in res.error(102)["msg"]
    plugin.add(conf)
    res = plugin.call("CHECK", conf)
    assert (res.code, res.stdout) == (0, "")
    ok = {**conf, "prevResult": {"cniVersion": version, "ips": [{"address": "10.0.0.1/24"}]}}
    assert plugin.call("CHECK", ok).code == 0
    wrong = {**conf, "prevResult": {"cniVersion": version, "ips": [{"address": "10.0.0.9/24"}]}}
    assert "10.0.0.1" in plugin.call("CHECK", wrong).error(102)["msg"]
    assert "c9" in plugin.call("CHECK", conf, container="c9").error(102)["msg"]


@pytest.mark.parametrize(("command", "versions"), [("CHECK", ["0.3.1"]), ("GC", ["0.4.0", "1.0.0"]), ("STATUS", ["0.3.0", "1.0.0"])])  # fmt: skip
def test_command_below_its_minimum_version_is_code_1(
    plugin: Plugin, command: str, versions: list[str]
) -> None:
    for version in versions:
        doc = plugin.call(command, plugin.conf(version)).error(1)
        assert command in doc["msg"] and version in doc["msg"]
        assert doc["cniVersion"] == version


# -- GC ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_releases_exactly_the_unlisted(plugin: Plugin, key: str) -> None:
    conf = plugin.conf("1.1.0")
    for n in range(1, 5):
        plugin.add(conf, container=f"c{n}", pod=f"p{n}")
    plugin.add(conf, container="c5", pod="p5", node="node-b")  # another node's lease: not ours to GC
    gc = {**conf, key: [{"containerID": "c1", "ifname": "net1"}, {"containerID": "c3", "ifname": "net1"}]}
    res = plugin.call("GC", gc)
    assert (res.code, res.stdout) == (0, "")
    assert {k: v["id"] for k, v in plugin.leases().items()} == {"1": "c1", "3": "c3", "5": "c5"}
    gc_records = [r for r in plugin.log_records() if r["event"] == "lease.gc"]
    assert sorted(r["address"] for r in gc_records) == ["10.0.0.2", "10.0.0.4"]


def test_gc_keeps_leases_without_node(plugin: Plugin) -> None:
    conf = plugin.conf("1.1.0")
    plugin.add(conf)
    pool_file = plugin.data_dir / "pools" / f"{POOL}.json"
    doc = plugin.pool()
    lease = Lease.from_json(doc["spec"]["allocations"]["1"])
    assert lease.node and lease.network  # GC would release it with its node
    doc["spec"]["allocations"]["1"] = replace(lease, node="").to_json()  # as an older writer left it
    pool_file.write_text(json.dumps(doc))
    res = plugin.call("GC", {**conf, "cni.dev/valid-attachments": []})
    assert res.code == 0
    assert list(plugin.leases()) == ["1"]


def test_gc_with_a_bad_attachment_list_is_code_7(plugin: Plugin) -> None:
    conf = plugin.conf("1.1.0")
    plugin.add(conf)
    plugin.call("GC", {**conf, "cni.dev/valid-attachments": "c1"}).error(7)
    plugin.call("GC", {**conf, "cni.dev/valid-attachments": [{"ifname": "net1"}]}).error(7)
    missing = plugin.call("GC", conf).error(7)  # no list at all: not "nothing is valid"
    assert "cni.dev/valid-attachments" in missing["msg"]
    assert list(plugin.leases()) == ["1"]


# -- STATUS ----------------------------------------------------------------------------------------------


def test_status(plugin: Plugin) -> None:
    conf = plugin.conf("1.1.0", range="10.0.0.0/30")
    res = plugin.call("STATUS", conf)
    assert (res.code, res.stdout) == (0, "")
    plugin.add(conf, container="c1", pod="p1")
    assert plugin.call("STATUS", conf).code == 0
    plugin.add(conf, container="c2", pod="p2")
    doc = plugin.call("STATUS", conf).error(50)
    assert "10.0.0.0/30" in doc["msg"]
    plugin.call("DEL", conf, container="c2")
    assert plugin.call("STATUS", conf).code == 0


# -- error codes -----------------------------------------------------------------------------------------


def test_unsupported_version_is_code_1(plugin: Plugin) -> None:
    doc = plugin.call("ADD", plugin.conf("0.2.0")).error(1)
    assert "0.2.0" in doc["msg"]
    assert not plugin.data_dir.exists()


@pytest.mark.parametrize(
    ("command", "drop", "named"),
    [
        ("ADD", "CNI_COMMAND", "CNI_COMMAND"),
        ("ADD", "CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("ADD", "CNI_IFNAME", "CNI_IFNAME"),
        ("ADD", "CNI_NETNS", "CNI_NETNS"),
        ("CHECK", "CNI_NETNS", "CNI_NETNS"),
        ("DEL", "CNI_CONTAINERID", "CNI_CONTAINERID"),
        ("DEL", "CNI_IFNAME", "CNI_IFNAME"),
    ],
)
def test_missing_env_is_code_4(plugin: Plugin, command: str, drop: str, named: str) -> None:
    env = plugin.env(command)
    del env[drop]
    doc = plugin.run(env, plugin.conf()).error(4)
    assert named in doc["msg"]
    assert not (plugin.data_dir / "pools").exists() or plugin.leases() == {}


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"CNI_COMMAND": "FROB"}, "FROB"),
        ({"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME"}, "K8S_POD_NAME"),
        ({"CNI_CONTAINERID": "../../etc"}, "../../etc"),
        ({"CNI_IFNAME": "a/b"}, "a/b"),
        ({"CNI_IFNAME": "x" * 16}, "x" * 16),
        # bounded as a lease's podref and poduid are (the pool's reader refuses longer ones)
        ({"CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={'p' * 318}"}, "K8S_POD_NAME is 321 characters"),
        ({"CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p;K8S_POD_UID={'u' * 129}"}, "K8S_POD_UID is 129"),
    ],
)
def test_invalid_env_is_code_4(plugin: Plugin, extra: dict[str, str], named: str) -> None:
    env = plugin.env("ADD")
    env.update(extra)
    doc = plugin.run(env, plugin.conf()).error(4)
    assert named in doc["msg"]
    assert not (plugin.data_dir / "pools").exists()


@pytest.mark.parametrize("stdin", [b"{", b"not json at all", b"\xff\xfe"])
def test_undecodable_stdin_is_code_6(plugin: Plugin, stdin: bytes) -> None:
    doc = plugin.call("ADD", stdin).error(6)
    assert doc["cniVersion"] == "1.1.0"


DEEP = b"[" * 100_000 + b"]" * 100_000  # nested deeper than Python's parser goes (RecursionError)


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC", "STATUS"])
@pytest.mark.parametrize("stdin", [DEEP, b'{"cniVersion": "1.0.0", "ipam": {"x": ' + DEEP + b"}}"])
def test_deeply_nested_stdin_is_code_6(plugin: Plugin, command: str, stdin: bytes) -> None:
    """A decoding failure like any other undecodable input: code 6, no traceback (Plugin.run checks)."""
    doc = plugin.call(command, stdin).error(6)
    assert "decode" in doc["msg"]
    res = plugin.run({"PATH": os.environ["PATH"], "CNI_COMMAND": "VERSION"}, stdin)
    assert res.code == 0 and res.doc["supportedVersions"] == VERSIONS  # as for any undecodable stdin


@pytest.mark.parametrize(
    ("ipam", "key", "value"),
    [
        ({"range": "10.0.0.0/33"}, "ipam.range", "10.0.0.0/33"),
        ({"range": "10.0.0.0/24", "range_start": "10.0.1.1"}, "ipam.range_start", "10.0.1.1"),
        ({"range": "10.0.0.0/24", "exclude": "x"}, "ipam.exclude", "x"),
        ({"range": 5}, "ipam.range", "5"),
    ],
)
def test_invalid_config_is_code_7_naming_key_and_value(
    plugin: Plugin, ipam: dict[str, Any], key: str, value: str
) -> None:
    doc = plugin.call("ADD", plugin.conf("0.4.0", **ipam)).error(7)
    assert key in doc["msg"] and value in doc["msg"]
    assert doc["cniVersion"] == "0.4.0"


def test_missing_ipam_is_code_7(plugin: Plugin) -> None:
    doc = plugin.call("ADD", {"cniVersion": "1.0.0", "name": "n", "type": "macvlan"}).error(7)
    assert "ipam" in doc["msg"]


def test_exhausted_is_code_100_naming_the_range(plugin: Plugin) -> None:
    conf = plugin.conf(range="10.0.0.0/30", ipRanges=[{"range": "fd00::/64"}])
    plugin.add(conf, container="c1", pod="p1")
    plugin.add(conf, container="c2", pod="p2")
    doc = plugin.call("ADD", conf, container="c3", pod="p3").error(100)
    assert "10.0.0.0/30" in doc["msg"]
    assert sorted(plugin.leases("10.0.0.0-30")) == ["1", "2"]
    assert sorted(plugin.leases("fd00---64")) == ["1", "2"]  # all or nothing: no v6 lease for c3


def test_exhausted_second_range_rolls_back_the_first(plugin: Plugin) -> None:
    conf = plugin.conf(range="10.0.0.0/24", ipRanges=[{"range": "10.1.0.0/32"}])
    plugin.add(conf)
    doc = plugin.call("ADD", conf, container="c2", pod="p2").error(100)
    assert "10.1.0.0/32" in doc["msg"]
    assert list(plugin.leases()) == ["1"]
    assert sorted(p.stem for p in (plugin.data_dir / "reservations").iterdir()) == ["10.0.0.1", "10.1.0.0"]


@pytest.mark.parametrize(
    ("content", "command"),
    [
        (b"{not json", "ADD"),
        (b"", "ADD"),  # truncated to nothing
        (b'{"spec": {"allocations": {"1": {"id": "c1"', "ADD"),  # torn write
        (b'{"spec": {"allocations": {"x": {}}}}', "ADD"),  # parses, but not a pool
        (b'{"spec": {"allocations": {"1": {"id": "c1"', "DEL"),
        (b'{"spec": {"allocations": {"1": {"id": "c1", "podref": 5}}}}', "ADD"),  # a lease field's type
        (b'{"spec": {"allocations": {"1": ["c1", "ns/p1"]}}}', "DEL"),
        (b'{"spec": {"allocations": [{"id": "c1"}]}}', "ADD"),
    ],
)
def test_corrupt_pool_file_is_code_101_and_left_untouched(
    plugin: Plugin, content: bytes, command: str
) -> None:
    pools = plugin.data_dir / "pools"
    pools.mkdir(parents=True)
    path = pools / f"{POOL}.json"
    path.write_bytes(content)
    doc = plugin.call(command).error(101)
    assert str(path) in doc["msg"]
    assert path.read_bytes() == content
    assert [p.name for p in pools.iterdir()] == [path.name]  # no temp file left behind


def test_data_dir_that_is_a_file_is_code_5_naming_it(plugin: Plugin) -> None:
    not_a_dir = plugin.tmp / "regular-file"
    not_a_dir.write_text("x")
    for command in ("ADD", "DEL"):
        doc = plugin.call(command, plugin.conf(data_dir=str(not_a_dir))).error(5)
        assert str(not_a_dir) in doc["msg"]
    doc = plugin.call("STATUS", plugin.conf("1.1.0", data_dir=str(not_a_dir))).error(50)
    assert str(not_a_dir) in doc["details"]
    assert not_a_dir.read_text() == "x"


def test_network_name_cannot_escape_data_dir(plugin: Plugin) -> None:
    doc = plugin.call("ADD", plugin.conf(network_name="../../escaped")).error(7)
    assert "ipam.network_name" in doc["msg"] and "../../escaped" in doc["msg"]
    assert not (plugin.tmp / "escaped-10.0.0.0-24.json").exists()
    assert {p.name for p in plugin.tmp.iterdir()} <= {"plugin.log"}  # nothing created next to data_dir


def test_check_with_malformed_prev_result_is_code_7(plugin: Plugin) -> None:
    conf = plugin.conf("1.1.0")
    plugin.add(conf)
    doc = plugin.call("CHECK", {**conf, "prevResult": {"cniVersion": "1.1.0", "ips": 5}}).error(7)
    assert "prevResult.ips" in doc["msg"]


# -- logging -----------------------------------------------------------------------------------------------


def test_logs_go_to_log_file_and_stderr_not_stdout(plugin: Plugin) -> None:
    res = plugin.add()
    records = plugin.log_records()
    add = [r for r in records if r["event"] == "lease.add"]
    assert len(add) == 1
    assert add[0]["address"] == "10.0.0.1" and add[0]["container"] == "c1" and add[0]["command"] == "ADD"
    assert add[0]["level"] == "info"
    assert '"lease.add"' in res.stderr
    assert "lease.add" not in res.stdout
    plugin.add(plugin.conf(range="10.0.0.0/32"), container="c2", pod="p2")  # takes the only address
    err = plugin.call("ADD", plugin.conf(range="10.0.0.0/32"), container="c3", pod="p3").error(100)
    errors = [r for r in plugin.log_records() if r["event"] == "cni.error"]
    assert errors and errors[-1]["code"] == 100 and errors[-1]["msg"] == err["msg"]
