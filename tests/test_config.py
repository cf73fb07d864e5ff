"""Config parsing: the accepted forms, the flat-file merge and every error path (code, key and value)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from netaddr import IPAddress, IPNetwork

from ipam import errors
from ipam.config import Config, load_config
from ipam.errors import CNIError


def netconf(ipam: dict[str, Any] | None, version: str = "1.0.0", **top: Any) -> bytes:
    doc: dict[str, Any] = {"cniVersion": version, "name": "net", "type": "macvlan", **top}
    if ipam is not None:
        doc["ipam"] = ipam
    return json.dumps(doc).encode()


def load(ipam: dict[str, Any] | None, version: str = "1.0.0", **top: Any) -> Config:
    return load_config(netconf(ipam, version, **top), flat_search=[])


def fail(stdin: bytes, flat_search: list[str] | None = None) -> CNIError:
    with pytest.raises(CNIError) as info:
        load_config(stdin, flat_search=flat_search or [])
    return info.value


def ip(text: str) -> int:
    return int(IPAddress(text))


# -- accepted forms ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ipam", "network", "start", "end"),
    [
        ({"range": "10.1.0.0/24"}, "10.1.0.0/24", "10.1.0.1", "10.1.0.254"),
        # host bits name the network
        ({"range": "192.168.2.225/28"}, "192.168.2.224/28", "192.168.2.225", "192.168.2.238"),
        # Whereabouts' A-B/prefix form
        ({"range": "192.168.2.225-192.168.2.230/28"}, "192.168.2.224/28", "192.168.2.225", "192.168.2.230"),
        ({"range": "fd00::10-fd00::20/64"}, "fd00::/64", "fd00::10", "fd00::20"),
        # range_start equal to the network address means the first usable one
        (
            {"range": "192.168.2.225/28", "range_start": "192.168.2.224"},
            "192.168.2.224/28",
            "192.168.2.225",
            "192.168.2.238",
        ),
        # range_end on the broadcast address means the last usable one
        ({"range": "10.2.0.0/29", "range_end": "10.2.0.7"}, "10.2.0.0/29", "10.2.0.1", "10.2.0.6"),
        (
            {"range": "10.3.0.0/24", "range_start": "10.3.0.100", "range_end": "10.3.0.110"},
            "10.3.0.0/24",
            "10.3.0.100",
            "10.3.0.110",
        ),
        # explicit range_start overrides the A of A-B/prefix
        (
            {"range": "192.168.2.225-192.168.2.230/28", "range_start": "192.168.2.227"},
            "192.168.2.224/28",
            "192.168.2.227",
            "192.168.2.230",
        ),
        ({"range": "10.4.0.0/31"}, "10.4.0.0/31", "10.4.0.0", "10.4.0.1"),
        ({"range": "10.5.0.7/32"}, "10.5.0.7/32", "10.5.0.7", "10.5.0.7"),
        ({"range": "fd00::/127"}, "fd00::/127", "fd00::", "fd00::1"),
        ({"range": "fd00::9/128"}, "fd00::9/128", "fd00::9", "fd00::9"),
    ],
)
def test_range_forms(ipam: dict[str, Any], network: str, start: str, end: str) -> None:
    cfg = load(ipam)
    (spec,) = cfg.ranges
    assert spec.network == IPNetwork(network)
    assert (spec.start, spec.end) == (ip(start), ip(end))
    assert spec.describe() == f"{network} ({start}-{end})"


def test_defaults_and_unknown_keys_ignored() -> None:
    cfg = load(
        {"type": "whereabouts-py", "range": "10.0.0.0/24", "somethingNew": {"x": 1}, "leader_elect": True},
        prevResult={"ips": []},
        runtimeConfig={"ips": ["10.0.0.9"]},
        unknownTop=3,
    )
    assert cfg.cni_version == "1.0.0"
    assert cfg.network == "net"
    assert cfg.ipam.datastore == "kubernetes"
    assert cfg.ipam.data_dir == "/var/lib/cni/whereabouts-py"
    assert cfg.ipam.enable_overlapping_ranges is True
    assert cfg.ipam.network_name == ""
    assert cfg.prev_result == {"ips": []}
    assert cfg.runtime_config == {"ips": ["10.0.0.9"]}
    assert cfg.flat_file is None
    assert not hasattr(cfg.ipam, "somethingNew")


def test_ip_ranges_dual_stack_with_gateway_per_family() -> None:
    cfg = load(
        {
            "range": "10.0.0.0/24",
            "exclude": ["10.0.0.0/28"],
            "gateway": "10.0.0.1",
            "ipRanges": [{"range": "fd00::/64", "range_end": "fd00::ff", "exclude": ["fd00::1"]}],
        }
    )
    v4, v6 = cfg.ranges
    assert (v4.version, v6.version) == (4, 6)
    assert v4.gateway == IPAddress("10.0.0.1")
    assert v6.gateway is None  # a gateway of the other family does not apply
    assert v4.intervals[0][0] == ip("10.0.0.16")
    assert v6.intervals == ((ip("fd00::2"), ip("fd00::ff")),)


def test_routes_and_dns_are_kept() -> None:
    cfg = load(
        {
            "range": "10.0.0.0/24",
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "192.168.0.0/16", "gw": "10.0.0.1"}],
            "dns": {"nameservers": ["10.0.0.53"], "domain": "cluster.local"},
        }
    )
    assert [r.dst for r in cfg.ipam.routes] == ["0.0.0.0/0", "192.168.0.0/16"]
    assert cfg.ipam.routes[1].gw == "10.0.0.1"
    assert cfg.ipam.dns is not None and cfg.ipam.dns.nameservers == ["10.0.0.53"]


@pytest.mark.parametrize("name", ["blue", "net-1", "a", "net.v2", "0"])
def test_network_name_accepted(name: str) -> None:
    assert load({"range": "10.0.0.0/24", "network_name": name}).ipam.network_name == name


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_supported_versions(version: str) -> None:
    assert load({"range": "10.0.0.0/24"}, version).cni_version == version


# -- error paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ipam", "key", "value"),
    [
        ({"range": "10.0.0.0/33"}, "ipam.range", "10.0.0.0/33"),
        ({"range": "fd00::/129"}, "ipam.range", "fd00::/129"),
        ({"range": "10.0.0.300/24"}, "ipam.range", "10.0.0.300/24"),
        ({"range": "10.0/8"}, "ipam.range", "10.0/8"),  # netaddr shorthand is not a CIDR
        ({"range": "10.0.0.0/x"}, "ipam.range", "10.0.0.0/x"),
        ({"range": "10.0.0.5"}, "ipam.range", "10.0.0.5"),  # no prefix
        ({"range": "not-a-range"}, "ipam.range", "not-a-range"),
        ({"range": 5}, "ipam.range", "5"),
        ({"range": ["10.0.0.0/24"]}, "ipam.range", "10.0.0.0/24"),
        ({"range": "10.0.0.0/24", "range_start": "10.0.1.5"}, "ipam.range_start", "10.0.1.5"),
        ({"range": "10.0.0.0/24", "range_end": "10.0.1.5"}, "ipam.range_end", "10.0.1.5"),
        ({"range": "10.0.0.0/24", "range_start": "fd00::1"}, "ipam.range_start", "fd00::1"),
        ({"range": "10.0.0.0/24", "range_start": "10.0.0.x"}, "ipam.range_start", "10.0.0.x"),
        ({"range": "10.0.0.0/24", "range_end": "10.0.0.0/25"}, "ipam.range_end", "10.0.0.0/25"),
        (
            {"range": "10.0.0.0/24", "range_start": "10.0.0.50", "range_end": "10.0.0.10"},
            "ipam.range_start",
            "10.0.0.50",
        ),
        ({"range_start": "10.0.0.1"}, "ipam.range_start", "10.0.0.1"),
        ({"range": "10.0.0.0/24", "exclude": ["bogus"]}, "ipam.exclude[0]", "bogus"),
        (
            {"range": "10.0.0.0/24", "exclude": ["10.0.0.0/24", "10.0.0.1/40"]},
            "ipam.exclude[1]",
            "10.0.0.1/40",
        ),
        ({"range": "10.0.0.0/24", "exclude": ["fd00::/64"]}, "ipam.exclude[0]", "fd00::/64"),
        ({"range": "10.0.0.0/24", "exclude": "x"}, "ipam.exclude", "x"),
        ({"range": "10.0.0.0/24", "exclude": [7]}, "ipam.exclude[0]", "7"),
        # mixed families in one A-B/prefix range
        ({"range": "10.0.0.1-fd00::5/64"}, "ipam.range", "10.0.0.1-fd00::5/64"),
        ({"range": "fd00::1-10.0.0.5/24"}, "ipam.range", "fd00::1-10.0.0.5/24"),
        # A-B/prefix whose A lies outside B/prefix, or after B
        ({"range": "192.168.2.225-192.168.3.230/28"}, "ipam.range", "192.168.2.225-192.168.3.230/28"),
        ({"range": "192.168.2.230-192.168.2.225/28"}, "ipam.range", "192.168.2.230-192.168.2.225/28"),
        ({"range": "10.0.0.1-10.0.0.9"}, "ipam.range", "10.0.0.1-10.0.0.9"),
        ({"range": "10.0.0.0/24", "gateway": "10.0.0.300"}, "ipam.gateway", "10.0.0.300"),
        ({"range": "10.0.0.0/24", "gateway": "10.0.0.1/24"}, "ipam.gateway", "10.0.0.1/24"),
        ({"range": "10.0.0.0/24", "gateway": 1}, "ipam.gateway", "1"),
        ({"range": "10.0.0.0/24", "routes": [{"dst": "nope"}]}, "ipam.routes[0].dst", "nope"),
        ({"range": "10.0.0.0/24", "routes": [{"dst": "10.9.0.0/99"}]}, "ipam.routes[0].dst", "10.9.0.0/99"),
        ({"range": "10.0.0.0/24", "routes": [{"dst": "0.0.0.0/0", "gw": "zz"}]}, "ipam.routes[0].gw", "zz"),
        ({"range": "10.0.0.0/24", "routes": [{"gw": "10.0.0.1"}]}, "ipam.routes[0].dst", "None"),
        ({"range": "10.0.0.0/24", "routes": "x"}, "ipam.routes", "x"),
        ({}, "ipam.range", "None"),
        ({"ipRanges": []}, "ipam.range", "None"),
        ({"ipRanges": 5}, "ipam.ipRanges", "5"),
        ({"ipRanges": [{"range": "x"}]}, "ipam.ipRanges[0].range", "x"),
        ({"ipRanges": [{"range_start": "10.0.0.1"}]}, "ipam.ipRanges[0].range", "None"),
        (
            {"range": "10.0.0.0/24", "ipRanges": [{"range": "10.1.0.0/24", "range_end": "10.2.0.1"}]},
            "ipam.ipRanges[0].range_end",
            "10.2.0.1",
        ),
        (
            {"ipRanges": [{"range": "10.0.0.0/24"}, {"range": "10.0.0.0/24"}]},
            "ipam.ipRanges[1].range",
            "10.0.0.0/24",
        ),
        # two ranges of one network share one pool, which holds one lease per attachment
        (
            {
                "range": "10.0.0.0/24",
                "range_start": "10.0.0.10",
                "range_end": "10.0.0.20",
                "ipRanges": [{"range": "10.0.0.0/24", "range_start": "10.0.0.100"}],
            },
            "ipam.ipRanges[0].range",
            "10.0.0.0/24",
        ),
        (
            {"ipRanges": [{"range": "fd00::/64"}, {"range": "10.0.0.0/24"}, {"range": "fd00::5/64"}]},
            "ipam.ipRanges[2].range",
            "fd00::5/64",
        ),
        ({"range": "10.0.0.0/24", "log_level": "loud"}, "ipam.log_level", "loud"),
        ({"range": "10.0.0.0/24", "datastore": "etcd"}, "ipam.datastore", "etcd"),
        (
            {"range": "10.0.0.0/24", "enable_overlapping_ranges": "maybe"},
            "ipam.enable_overlapping_ranges",
            "maybe",
        ),
        ({"range": "10.0.0.0/24", "network_name": 5}, "ipam.network_name", "5"),
        # it becomes part of pool file and object names: no path separators, Kubernetes name rules
        ({"range": "10.0.0.0/24", "network_name": "../../etc/x"}, "ipam.network_name", "../../etc/x"),
        ({"range": "10.0.0.0/24", "network_name": "a/b"}, "ipam.network_name", "a/b"),
        ({"range": "10.0.0.0/24", "network_name": "Blue"}, "ipam.network_name", "Blue"),
        ({"range": "10.0.0.0/24", "network_name": "-x"}, "ipam.network_name", "-x"),
        ({"range": "10.0.0.0/24", "network_name": "a b"}, "ipam.network_name", "a b"),
        ({"range": "10.0.0.0/24", "dns": "x"}, "ipam.dns", "x"),
        ({"range": "10.0.0.0/24", "kubernetes": "kc"}, "ipam.kubernetes", "kc"),
        ({"range": "10.0.0.0/24", "retry_deadline_seconds": 0}, "ipam.retry_deadline_seconds", "0"),
        ({"range": "10.0.0.0/24", "retry_deadline_seconds": 500}, "ipam.retry_deadline_seconds", "500"),
    ],
)
def test_invalid_config_names_key_and_value(ipam: dict[str, Any], key: str, value: str) -> None:
    err = fail(netconf(ipam))
    assert err.code == errors.INVALID_CONFIG
    assert f"{key}:" in err.msg, err.msg
    assert value in err.msg, err.msg


def test_ipam_missing_is_code_7() -> None:
    err = fail(netconf(None))
    assert err.code == errors.INVALID_CONFIG
    assert "ipam" in err.msg and "missing" in err.msg


@pytest.mark.parametrize("ipam", ["10.0.0.0/24", 5, ["x"]])
def test_ipam_not_an_object_is_code_7(ipam: Any) -> None:
    err = fail(json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": ipam}).encode())
    assert err.code == errors.INVALID_CONFIG
    assert "ipam" in err.msg


@pytest.mark.parametrize("version", ["0.2.0", "0.1.0", "2.0.0", "1.0", "banana"])
def test_unsupported_version_is_code_1(version: str) -> None:
    err = fail(netconf({"range": "10.0.0.0/24"}, version))
    assert err.code == errors.INCOMPATIBLE_VERSION
    assert version in err.msg
    assert "1.1.0" in err.details  # lists what is supported


def test_unsupported_version_wins_over_missing_ipam() -> None:
    assert fail(netconf(None, "9.9.9")).code == errors.INCOMPATIBLE_VERSION


@pytest.mark.parametrize("stdin", [b"{", b"not json", b"\xff\xfe\x00garbage", b'{"cniVersion": "1.0.0",}'])
def test_undecodable_stdin_is_code_6(stdin: bytes) -> None:
    err = fail(stdin)
    assert err.code == errors.DECODE_FAILURE


@pytest.mark.parametrize("stdin", [b"[]", b"5", b'"x"', b"null"])
def test_stdin_not_an_object_is_code_7(stdin: bytes) -> None:
    assert fail(stdin).code == errors.INVALID_CONFIG


def test_wrong_top_level_type_names_key() -> None:
    err = fail(json.dumps({"cniVersion": 1, "ipam": {"range": "10.0.0.0/24"}}).encode())
    assert err.code == errors.INVALID_CONFIG
    assert "cniVersion" in err.msg and "1" in err.msg


# -- flat file -------------------------------------------------------------------------------------


def write_json(path: Path, doc: dict[str, Any]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def test_flat_file_supplies_missing_keys(tmp_path: Path) -> None:
    flat = write_json(
        tmp_path / "whereabouts.conf",
        {"datastore": "file", "data_dir": "/flat/data", "kubernetes": {"kubeconfig": "/flat/kc"}},
    )
    cfg = load_config(netconf({"range": "10.0.0.0/24"}), flat_search=[flat])
    assert cfg.flat_file == flat
    assert cfg.ipam.datastore == "file"
    assert cfg.ipam.data_dir == "/flat/data"
    assert cfg.ipam.kubernetes.kubeconfig == "/flat/kc"


def test_configuration_path_never_chooses_the_flat_file(tmp_path: Path) -> None:
    first = write_json(tmp_path / "a" / "whereabouts.conf", {"data_dir": "/from-search-1"})
    second = write_json(tmp_path / "b" / "whereabouts.conf", {"data_dir": "/from-search-2"})
    chosen = write_json(tmp_path / "c" / "custom.conf", {"data_dir": "/from-configuration-path"})
    # the first existing search path is the node's flat file
    cfg = load_config(netconf({"range": "10.0.0.0/24"}), flat_search=[str(tmp_path / "nope"), second, first])
    assert (cfg.flat_file, cfg.ipam.data_dir) == (second, "/from-search-2")
    # a network config naming another file is refused, naming the key, and that file is not read
    err = fail(netconf({"range": "10.0.0.0/24", "configuration_path": chosen}), flat_search=[first, second])
    assert err.code == errors.INVALID_CONFIG
    assert "ipam.configuration_path" in err.msg and "flat file" in err.msg
    assert "/from-configuration-path" not in err.msg + (err.details or "")
    # repeating the node's own path is accepted (Whereabouts NADs often carry it)
    cfg = load_config(netconf({"range": "10.0.0.0/24", "configuration_path": first}), flat_search=[first])
    assert (cfg.flat_file, cfg.ipam.data_dir) == (first, "/from-search-1")
    # even with the opt-in, the network config does not pick the flat file
    opt_in = write_json(tmp_path / "d" / "whereabouts.conf", {"allow_nad_overrides": True, "data_dir": "/d"})
    cfg = load_config(netconf({"range": "10.0.0.0/24", "configuration_path": chosen}), flat_search=[opt_in])
    assert (cfg.flat_file, cfg.ipam.data_dir) == (opt_in, "/d")


@pytest.mark.parametrize("value", [["/etc/passwd"], {"a": 1}, 7, True])
def test_configuration_path_not_a_string_is_code_7(tmp_path: Path, value: Any) -> None:
    opt_in = write_json(tmp_path / "whereabouts.conf", {"allow_nad_overrides": True})
    for search in ([], [opt_in]):
        err = fail(netconf({"range": "10.0.0.0/24", "configuration_path": value}), flat_search=search)
        assert err.code == errors.INVALID_CONFIG
        assert "ipam.configuration_path" in err.msg


def test_with_the_opt_in_nad_keys_win_and_nested_kubernetes_merges_key_wise(tmp_path: Path) -> None:
    flat = write_json(
        tmp_path / "whereabouts.conf",
        {
            "allow_nad_overrides": True,
            "datastore": "file",
            "data_dir": "/flat",
            "log_level": "debug",
            "range": "10.99.0.0/16",
            "kubernetes": {"kubeconfig": "/flat/kc", "other": "kept"},
            "unknown_flat_key": [1, 2],
        },
    )
    stdin = netconf(
        {"range": "10.0.0.0/24", "data_dir": "/nad", "kubernetes": {"extra": "from-nad"}, "node_name": "n1"}
    )
    cfg = load_config(stdin, flat_search=[flat])
    assert cfg.ipam.range == "10.0.0.0/24"
    assert cfg.ranges[0].cidr == "10.0.0.0/24"
    assert cfg.ipam.data_dir == "/nad"
    assert cfg.ipam.datastore == "file"
    assert cfg.ipam.log_level == "debug"
    assert cfg.ipam.node_name == "n1"
    # the NAD's kubernetes block did not replace the flat file's: kubeconfig still comes through
    assert cfg.ipam.kubernetes.kubeconfig == "/flat/kc"
    stdin = netconf({"range": "10.0.0.0/24", "kubernetes": {"kubeconfig": "/nad/kc"}})
    assert load_config(stdin, flat_search=[flat]).ipam.kubernetes.kubeconfig == "/nad/kc"


def test_flat_file_can_supply_the_range(tmp_path: Path) -> None:
    flat = write_json(tmp_path / "w.conf", {"range": "10.7.0.0/24", "exclude": ["10.7.0.0/30"]})
    cfg = load_config(netconf({"type": "whereabouts-py"}), flat_search=[flat])
    assert cfg.ranges[0].cidr == "10.7.0.0/24"
    assert cfg.ranges[0].intervals[0][0] == ip("10.7.0.4")


def test_flat_file_value_errors_name_the_key(tmp_path: Path) -> None:
    flat = write_json(tmp_path / "w.conf", {"datastore": "zookeeper"})
    err = fail(netconf({"range": "10.0.0.0/24"}), flat_search=[flat])
    assert err.code == errors.INVALID_CONFIG
    assert "ipam.datastore" in err.msg and "zookeeper" in err.msg


@pytest.mark.parametrize("content", ["{", "[1, 2]"])
def test_bad_flat_file_is_code_7_naming_the_path(tmp_path: Path, content: str) -> None:
    flat = tmp_path / "w.conf"
    flat.write_text(content)
    err = fail(netconf({"range": "10.0.0.0/24"}), flat_search=[str(flat)])
    assert err.code == errors.INVALID_CONFIG
    assert "configuration_path" in err.msg and str(flat) in err.msg
