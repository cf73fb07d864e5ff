"""Requested (`runtimeConfig.ips`), static (Whereabouts' `addresses`, CNI_ARGS `IP=`/`GATEWAY=`) and
sticky addresses through `ipam.cni.run` on the file datastore (the pure rules: test_allocator and
test_audit; the real API server: test_sticky_real)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import errors
from ipam.allocator import Lease
from ipam.cni import run

AGENT_OFF = "/nonexistent/agent.sock"


class Node:
    """One node running the plugin in-process on a file datastore under `tmp`."""

    def __init__(self, tmp: Path, ipam: dict[str, Any], version: str = "1.0.0") -> None:
        self.tmp = tmp
        self.ipam = {"type": "whereabouts-py", "datastore": "file", "data_dir": str(tmp / "data"), **ipam}
        self.version = version

    def call(
        self, command: str, container: str, pod: str, ifname: str = "net1", args: str = "", **runtime: Any
    ) -> tuple[int, dict[str, Any] | None]:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container,
            "CNI_IFNAME": ifname,
            "CNI_NETNS": "/var/run/netns/x",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={pod}" + (f";{args}" if args else ""),
            "WHEREABOUTS_PY_AGENT_SOCKET": AGENT_OFF,
        }
        doc: dict[str, Any] = {"cniVersion": self.version, "name": "net", "type": "ipvlan", "ipam": self.ipam}
        if runtime:
            doc["runtimeConfig"] = runtime
        out = io.StringIO()
        code = run(env, json.dumps(doc).encode(), out)
        text = out.getvalue()
        return code, (json.loads(text) if text else None)

    def add(self, container: str, pod: str, **kw: Any) -> dict[str, Any]:
        code, result = self.call("ADD", container, pod, **kw)
        assert code == 0, result
        assert result is not None
        return result

    def refused(self, container: str, pod: str, **kw: Any) -> dict[str, Any]:
        code, result = self.call("ADD", container, pod, **kw)
        assert code == 1 and result is not None, result
        return result

    def leases(self, pool: str) -> dict[str, Lease]:
        path = next((self.tmp / "data").rglob(f"{pool}.json"))
        raw = json.loads(path.read_text())
        allocations = raw.get("spec", raw).get("allocations", raw.get("allocations", {}))
        return {k: Lease.from_json(v) for k, v in allocations.items()}


def addrs(result: dict[str, Any]) -> list[str]:
    return [ip["address"] for ip in result["ips"]]


# -- requested -------------------------------------------------------------------------------------


def test_requested_address_is_given_and_recorded(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "192.168.2.224/28"})
    assert addrs(node.add("c1", "a", ips=["192.168.2.230/28"])) == ["192.168.2.230/28"]
    assert addrs(node.add("c2", "b")) == ["192.168.2.225/28"]  # lowest free, the requested one skipped
    leases = node.leases("192.168.2.224-28")
    assert leases["6"].podref == "ns/a" and leases["6"].kind == "requested"
    assert leases["1"].podref == "ns/b" and leases["1"].kind == ""
    # a repeated ADD is idempotent: same address, no second lease
    assert addrs(node.add("c1", "a", ips=["192.168.2.230/28"])) == ["192.168.2.230/28"]
    assert len(node.leases("192.168.2.224-28")) == 2


def test_requested_address_held_by_another_pod_is_refused_naming_it(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "192.168.2.224/28"})
    node.add("c1", "a", ips=["192.168.2.230"])
    error = node.refused("c2", "b", ips=["192.168.2.230"])
    assert error["code"] == errors.ADDRESS_TAKEN
    assert "192.168.2.230" in error["msg"] and "ns/a" in error["msg"]
    assert set(node.leases("192.168.2.224-28")) == {"6"}  # the refused ADD left nothing


@pytest.mark.parametrize(
    ("wanted", "reason"),
    [
        ("192.168.2.225", "gateway"),
        ("192.168.2.228", "excluded"),
        ("192.168.2.238", "range_start..range_end"),
        ("192.168.2.239", "broadcast"),
        ("10.9.9.9", "outside every range"),
        ("fd00::5", "outside every range"),
    ],
)
def test_requested_address_the_range_may_not_give_is_refused(
    tmp_path: Path, wanted: str, reason: str
) -> None:
    node = Node(
        tmp_path,
        {
            "range": "192.168.2.224/28",
            "range_end": "192.168.2.237",
            "gateway": "192.168.2.225",
            "exclude": ["192.168.2.228/31"],
        },
    )
    error = node.refused("c1", "a", ips=[wanted])
    assert error["code"] == errors.INVALID_CONFIG
    assert wanted in error["msg"] and reason in error["msg"] and "runtimeConfig.ips[0]" in error["msg"]


def test_dual_stack_with_only_the_ipv4_side_requested(tmp_path: Path) -> None:
    node = Node(tmp_path, {"ipRanges": [{"range": "10.1.0.0/24"}, {"range": "fd00:1::/120"}]})
    node.add("c0", "first")  # takes the lowest of both
    assert addrs(node.add("c1", "a", ips=["10.1.0.50/24"])) == ["10.1.0.50/24", "fd00:1::2/120"]


def test_a_new_request_moves_the_attachment_to_it(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.1.0.0/24"})
    node.add("c1", "a")
    assert addrs(node.add("c1", "a", ips=["10.1.0.9"])) == ["10.1.0.9/24"]
    assert set(node.leases("10.1.0.0-24")) == {"9"}


# -- Whereabouts' static addresses ------------------------------------------------------------------


def test_static_addresses_follow_whereabouts_result_and_are_recorded(tmp_path: Path) -> None:
    node = Node(
        tmp_path,
        {
            "range": "10.2.0.0/24",
            "gateway": "10.2.0.254",
            "addresses": [{"address": "10.2.0.1/24", "gateway": "10.2.0.254"}, {"address": "172.16.5.5/16"}],
        },
        version="0.3.1",
    )
    result = node.add("c1", "a", args="IP=10.2.0.7/24,fd00:9::9/64;GATEWAY=fd00:9::1")
    # Whereabouts: the ranges' addresses first, then ipam.addresses, then IP=, each with its own prefix;
    # GATEWAY= goes to every one whose network holds it
    assert result["ips"] == [
        {"address": "10.2.0.2/24", "version": "4", "gateway": "10.2.0.254"},
        {"address": "10.2.0.1/24", "version": "4", "gateway": "10.2.0.254"},
        {"address": "172.16.5.5/16", "version": "4"},
        {"address": "10.2.0.7/24", "version": "4"},
        {"address": "fd00:9::9/64", "version": "6", "gateway": "fd00:9::1"},
    ]
    leases = node.leases("10.2.0.0-24")
    assert {k: (v.podref, v.kind) for k, v in leases.items()} == {
        "1": ("ns/a", "static"),
        "2": ("ns/a", ""),
        "7": ("ns/a", "static"),
    }
    # a pod of another network on that range is not given them
    other = Node(tmp_path, {"range": "10.2.0.0/24"})
    assert addrs(other.add("c2", "b")) == ["10.2.0.3/24"]
    # a second pod given the same static address is refused naming the holder (Whereabouts gives it)
    error = other.refused("c3", "c", args="IP=10.2.0.7/24")
    assert error["code"] == errors.ADDRESS_TAKEN
    assert "static address 10.2.0.7" in error["msg"] and "ns/a" in error["msg"]
    error = node.refused("c4", "d")  # its NAD's own addresses: each pod of it would get them
    assert error["code"] == errors.ADDRESS_TAKEN and "10.2.0.1" in error["msg"]
    assert set(node.leases("10.2.0.0-24")) == {"1", "2", "3", "7"}  # the refused ADDs left nothing
    # idempotent; DEL gives every one back
    assert node.add("c1", "a", args="IP=10.2.0.7/24,fd00:9::9/64;GATEWAY=fd00:9::1") == result
    assert node.call("DEL", "c1", "a")[0] == 0
    assert set(node.leases("10.2.0.0-24")) == {"3"}


def test_static_address_outside_every_range_is_only_in_the_result(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.2.0.0/24"})
    assert addrs(node.add("c1", "a", args="IP=192.0.2.9/24")) == ["10.2.0.1/24", "192.0.2.9/24"]
    assert addrs(node.add("c2", "b", args="IP=192.0.2.9/24")) == ["10.2.0.2/24", "192.0.2.9/24"]
    assert set(node.leases("10.2.0.0-24")) == {"1", "2"}


def test_bad_static_addresses_are_refused_naming_them(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.2.0.0/24", "addresses": [{"address": "10.2.0.1"}]})
    error = node.refused("c1", "a")
    assert error["code"] == errors.INVALID_CONFIG and "ipam.addresses[0].address" in error["msg"]
    node = Node(tmp_path, {"range": "10.2.0.0/24"})
    error = node.refused("c1", "a", args="IP=nonsense")
    assert error["code"] == errors.INVALID_ENV and "IP" in error["msg"]


# -- sticky ---------------------------------------------------------------------------------------


def test_sticky_seconds_keeps_the_address_for_the_pod_name(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.3.0.0/24", "sticky_seconds": 600})
    assert addrs(node.add("c1", "web")) == ["10.3.0.1/24"]
    assert node.call("DEL", "c1", "web")[0] == 0
    [retained] = node.leases("10.3.0.0-24").values()
    assert retained.retained and retained.until and retained.podref == "ns/web"
    assert node.call("DEL", "c1", "web")[0] == 0  # a repeated DEL keeps it retained
    assert addrs(node.add("c2", "other")) == ["10.3.0.2/24"]  # counts as used
    assert addrs(node.add("c3", "web")) == ["10.3.0.1/24"]  # the same name takes it back
    back = node.leases("10.3.0.0-24")["1"]
    assert back.id == "c3" and not back.retained and not back.until


def test_sticky_statefulset_keeps_only_ordinal_names(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.4.0.0/24", "sticky": "statefulset"})
    node.add("c1", "db-0")
    node.add("c2", "web-abcde")
    node.call("DEL", "c1", "db-0")
    node.call("DEL", "c2", "web-abcde")
    leases = node.leases("10.4.0.0-24")
    assert set(leases) == {"1"} and leases["1"].sticky == "statefulset" and leases["1"].retained


def test_sticky_is_refused_with_node_slices(tmp_path: Path) -> None:
    node = Node(tmp_path, {"range": "10.5.0.0/16", "node_slice_size": "/24", "sticky": "statefulset"})
    error = node.refused("c1", "a")
    assert error["code"] == errors.INVALID_CONFIG and "ipam.sticky" in error["msg"]


def test_requested_address_with_node_slices_only_in_a_slice_of_this_node(tmp_path: Path) -> None:
    from ipam import nodeslices

    nodeslices.forget_cache()
    sliced = {"range": "10.0.0.0/28", "node_slice_size": "/30"}
    n1 = Node(tmp_path, {**sliced, "node_name": "n1"})
    n2 = Node(tmp_path, {**sliced, "node_name": "n2"})
    assert addrs(n1.add("c1", "a")) == ["10.0.0.1/28"]  # n1 claims 10.0.0.0/30
    assert addrs(n2.add("c2", "b")) == ["10.0.0.5/28"]  # n2 claims 10.0.0.4/30
    # in n1's own slice: given, in that slice's pool
    assert addrs(n1.add("c3", "c", ips=["10.0.0.3"])) == ["10.0.0.3/28"]
    assert {k: v.podref for k, v in n1.leases("n1-10.0.0.0-30").items()} == {"1": "ns/a", "3": "ns/c"}
    # in n2's slice, free there: refused on n1 naming the slice and its node; n2 gives it
    error = n1.refused("c4", "d", ips=["10.0.0.6"])
    assert (
        error["code"] == errors.ADDRESS_TAKEN and "10.0.0.4/30" in error["msg"] and "node n2" in error["msg"]
    )
    assert addrs(n2.add("c4", "d", ips=["10.0.0.6"])) == ["10.0.0.6/28"]
    # in a slice no node holds yet
    error = n1.refused("c5", "e", ips=["10.0.0.9"])
    assert error["code"] == errors.ADDRESS_TAKEN and "no node holds" in error["msg"]
    # held in its slice: refused naming the holder
    error = n2.refused("c6", "f", ips=["10.0.0.6"])
    assert error["code"] == errors.ADDRESS_TAKEN and "ns/d" in error["msg"]


def test_failed_request_in_a_later_range_rolls_the_whole_add_back(tmp_path: Path) -> None:
    node = Node(tmp_path, {"ipRanges": [{"range": "10.1.0.0/24"}, {"range": "fd00:1::/120"}]})
    node.add("c0", "first", ips=["fd00:1::9"])
    error = node.refused("c1", "a", ips=["10.1.0.7", "fd00:1::9"])
    assert error["code"] == errors.ADDRESS_TAKEN and "ns/first" in error["msg"]
    assert set(node.leases("10.1.0.0-24")) == {"1"}  # the IPv4 lease of the refused ADD is gone
    error = node.refused("c1", "a", ips=["10.1.0.7", "10.1.0.8"])
    assert error["code"] == errors.INVALID_CONFIG and "one address per range" in error["msg"]


@pytest.mark.parametrize(
    ("entry", "key"),
    [
        ({"address": "10.2.0.1"}, "ipam.addresses[0].address"),
        ({"address": "10.2.0.1/33"}, "ipam.addresses[0].address"),
        ({"address": "10.2.0.1/24", "gateway": "x"}, "ipam.addresses[0].gateway"),
    ],
)
def test_bad_static_address_is_a_config_error_naming_the_key(entry: dict[str, str], key: str) -> None:
    from ipam.config import load_config

    doc = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {"type": "whereabouts-py", "range": "10.2.0.0/24", "addresses": [entry]},
    }
    with pytest.raises(errors.CNIError) as info:
        load_config(json.dumps(doc).encode())
    assert info.value.code == errors.INVALID_CONFIG and key in info.value.msg
