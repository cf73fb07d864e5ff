"""What a tenant's config may cost the node (issue 22, items 6 and 8): sizes past the documented limits
are code 7 naming the key and the limit, the agent's range caches stay within a byte budget whatever
configs pass through one process, and every config value that names an object or a file is checked."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from ipam import errors, ranges, slices
from ipam.bytecache import ByteLRU
from ipam.config import LIMITS, MAX_EXCLUDES, load_config
from ipam.errors import CNIError
from tests.test_config import fail, load, netconf


def _excludes(count: int, seed: int) -> list[str]:
    """`count` distinct /32s inside 10.0.0.0/8, none adjacent (each splits the range: as many
    intervals as excludes); `seed` makes each config's list its own."""
    return [f"10.{seed}.{i // 125}.{2 * (i % 125) + 1}/32" for i in range(count)]


@pytest.mark.parametrize(
    ("ipam", "key", "limit"),
    [
        ({"range": "10.0.0.0/8", "exclude": _excludes(LIMITS["exclude"] + 1, 1)}, "ipam.exclude", 4096),
        (
            {"ipRanges": [{"range": "10.0.0.0/8", "exclude": _excludes(LIMITS["exclude"] + 1, 2)}]},
            "ipam.ipRanges[0].exclude",
            4096,
        ),
        (
            {"ipRanges": [{"range": f"10.{i}.0.0/16"} for i in range(LIMITS["ipRanges"] + 1)]},
            "ipam.ipRanges",
            64,
        ),
        (
            {"range": "10.0.0.0/8", "routes": [{"dst": "0.0.0.0/0"}] * (LIMITS["routes"] + 1)},
            "ipam.routes",
            1024,
        ),
        (
            {"range": "10.0.0.0/8", "addresses": [{"address": f"10.0.0.{i}/8"} for i in range(1, 66)]},
            "ipam.addresses",
            64,
        ),
        (
            {
                "range": "10.0.0.0/8",
                "exclude": _excludes(4000, 3),
                "ipRanges": [{"range": f"10.{i}.0.0/16", "exclude": _excludes(4000, i)} for i in (5, 6)],
            },
            "ipam.ipRanges[1].exclude",
            MAX_EXCLUDES,
        ),
    ],
)
def test_a_config_past_a_limit_is_code_7_naming_the_key_and_the_limit(
    ipam: dict[str, Any], key: str, limit: int
) -> None:
    err = fail(netconf(ipam))
    assert err.code == errors.INVALID_CONFIG
    assert f"{key}: " in err.msg and f"limit of {limit}" in err.msg
    assert len(err.msg) < 300  # the list is not echoed


def test_a_config_at_the_limits_is_accepted() -> None:
    cfg = load(
        {
            "range": "10.0.0.0/8",
            "exclude": _excludes(LIMITS["exclude"], 1),
            "routes": [{"dst": f"10.{i // 256}.{i % 256}.0/24"} for i in range(LIMITS["routes"])],
        }
    )
    assert cfg.ranges[0].size() == (1 << 24) - 2 - LIMITS["exclude"]


def test_a_network_name_longer_than_a_lease_may_record_is_code_7() -> None:
    err = fail(netconf({"range": "10.0.0.0/8"}, name="n" * 1025))
    assert (
        err.code == errors.INVALID_CONFIG
        and err.msg.startswith("invalid config: name: ")
        and "1024" in err.msg
    )
    assert load({"range": "10.0.0.0/8"}, name="n" * 1024).network == "n" * 1024


def test_a_long_bad_value_is_cut_in_the_error() -> None:
    err = fail(netconf({"range": "10.0.0.0/8", "gateway": "x" * 100_000}))
    assert err.code == errors.INVALID_CONFIG and "ipam.gateway" in err.msg and len(err.msg) < 500


def _through_config(n: int, _: Path) -> None:
    cfg = load({"range": "10.0.0.0/8", "exclude": _excludes(LIMITS["exclude"], n), "node_slice_size": "/12"})
    for s in slices.cut(cfg.ranges[0].network, 12):
        slices.slice_spec(cfg.ranges[0], str(s))


def _through_the_plugin(n: int, tmp_path: Path) -> None:
    """An ADD on the file datastore with node slices, in this process (as the agent runs each call)."""
    import io

    from ipam.cni import run

    doc = {"cniVersion": "1.0.0", "name": f"net{n}", "type": "macvlan",
           "ipam": {"type": "whereabouts-py", "range": "10.0.0.0/8", "exclude": _excludes(LIMITS["exclude"], n),
                    "node_slice_size": "/12", "network_name": f"net{n}"}}  # fmt: skip
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": f"c{n}", "CNI_IFNAME": "net1", "CNI_NETNS": "/var/run/netns/x",
           "WHEREABOUTS_PY_AGENT_SOCKET": "/nonexistent/agent.sock"}  # fmt: skip
    out = io.StringIO()
    assert run(env, json.dumps(doc).encode(), out) == 0, out.getvalue()


@pytest.mark.parametrize("call", [_through_config, _through_the_plugin])
def test_many_distinct_large_configs_keep_the_range_caches_within_their_byte_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, call: Any
) -> None:
    """One process (the agent) sees 24 NADs of 4,096 excludes each (~0.5 MB of intervals apiece) and
    node slices: the caches' own accounting stays within the budget, and so does what they hold."""
    from tests.cni_exec import FLAT_FILE_ENV

    flat = tmp_path / "whereabouts.conf"
    flat.write_text(json.dumps({"datastore": "file", "data_dir": str(tmp_path / "d"), "node_name": "n1"}))
    flat.chmod(0o600)
    monkeypatch.setenv(FLAT_FILE_ENV, str(flat))
    budget = 2 << 20
    for module, name in ((ranges, "_INTERVALS"), (slices, "_SLICE_SPECS"), (slices, "_FREE")):
        monkeypatch.setattr(module, name, ByteLRU(budget))
    call(0, tmp_path)  # what every call loads once (modules, the file store's directories)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(1, 25):
            call(n, tmp_path)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert all(0 < c.used <= budget for c in (ranges._INTERVALS, slices._SLICE_SPECS))
    assert held < 3 * budget + (1 << 20), f"{held} bytes held after 24 configs"


def test_a_gateway_at_address_zero_is_its_own_cache_entry() -> None:
    from netaddr import IPAddress

    assert ranges.allocatable_intervals(4, 0, 1, [], None) == ((0, 1),)
    assert ranges.allocatable_intervals(4, 0, 1, [], IPAddress("0.0.0.0")) == ((1, 1),)


def test_the_byte_cache_evicts_least_recently_used_and_refuses_a_value_past_the_budget() -> None:
    cache: ByteLRU[str] = ByteLRU(1000)
    cache.put("a", "A", 300)
    cache.put("b", "B", 300)
    assert cache.get("a") == "A"
    cache.put("c", "C", 300)  # 3 x (300 + overhead) > 1000: b, least recently used, goes
    assert cache.get("b") is None and cache.get("a") == "A" and cache.get("c") == "C"
    cache.put("big", "X", 5000)
    assert cache.get("big") is None and cache.used <= 1000


# -- item 8: values that name an object or a file ----------------------------------------------

BAD_NAMES = ["../x", "/etc/x", "a/b", "a\0b", "x" * 300, "UPPER", "-x", ".", ".."]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_the_networks_name_naming_the_nodeslicepool_must_be_an_object_name(name: str) -> None:
    err = fail(netconf({"range": "10.0.0.0/16", "node_slice_size": "/24"}, name=name))
    assert err.code == errors.INVALID_CONFIG and err.msg.startswith("invalid config: name: ")


@pytest.mark.parametrize("name", BAD_NAMES)
def test_network_name_must_be_an_object_name(name: str) -> None:
    err = fail(netconf({"range": "10.0.0.0/16", "network_name": name}))
    assert err.code == errors.INVALID_CONFIG and "ipam.network_name" in err.msg


def test_the_networks_name_without_node_slices_is_only_recorded() -> None:
    # CNI allows upper case and '_' in a network name; it names no object unless it names the NodeSlicePool
    assert load({"range": "10.0.0.0/16"}, name="My_Net").network == "My_Net"
    assert load({"range": "10.0.0.0/16", "network_name": "blue", "node_slice_size": "/24"}, name="My_Net")


@pytest.mark.parametrize("node", [*BAD_NAMES[:5], "UPPER"])
def test_node_name_naming_slice_pools_must_be_an_object_name(tmp_path: Path, node: str) -> None:
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(json.dumps({"node_name": node, "datastore": "file", "data_dir": str(tmp_path / "d")}))
    with pytest.raises(CNIError) as info:
        load_config(netconf({"range": "10.0.0.0/16", "node_slice_size": "/24"}), flat_search=[str(flat)])
    assert info.value.code == errors.INVALID_CONFIG and "ipam.node_name" in info.value.msg


@pytest.mark.parametrize("name", ["../x", "/etc/x", "a/b", "a\0b", "x" * 300, ".hidden", ""])
def test_the_file_store_and_its_locks_refuse_a_name_that_leaves_their_directory(
    tmp_path: Path, name: str
) -> None:
    """The store's own guard behind the config's checks: `/etc/x` would read `/etc/x.json` as root,
    `../x` would create a lock file outside `data_dir`."""
    from ipam.allocator import Lease
    from ipam.store.file import FileStore
    from ipam.store.locks import pool_generation, pool_lock

    store = FileStore(str(tmp_path / "d"))
    outside = tmp_path / "x.json"
    outside.write_text(json.dumps({"spec": {"range": "10.0.0.0/24", "allocations": {}}}))
    calls = [
        lambda: store.read_pool(name, "10.0.0.0/24"),
        lambda: store.read_node_slices(name),
        lambda: store.reserve(name, Lease("c1", "ns/p", "eth0")),
        lambda: pool_generation(str(tmp_path / "d" / "locks"), name),
        lambda: pool_lock(str(tmp_path / "d" / "locks"), name, 1.0).__enter__(),
    ]
    for call in calls:
        with pytest.raises(CNIError) as info:
            call()
        assert info.value.code == errors.INVALID_CONFIG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "x.json"]
    assert not list((tmp_path / "d").rglob("*.lock"))


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CNI_CONTAINERID", v) for v in ("../x", "/etc/x", "a/b", "a\0b", "c" * 257, ".", "..")]
    + [("CNI_IFNAME", v) for v in ("../x", "/etc/x", "a/b", "a\0b", "e" * 16, ".", "..")],
)
def test_the_runtimes_container_id_and_ifname_cannot_name_a_path(variable: str, value: str) -> None:
    """Neither reaches a file name (pools, reservations and locks are named after ranges, addresses,
    network_name and the node); they are checked anyway, and bounded as the CRDs bound them."""
    from ipam.cni import container_identity

    env = {"CNI_CONTAINERID": "c" * 64, "CNI_IFNAME": "net1", "CNI_NETNS": "/proc/1/ns/net", variable: value}
    with pytest.raises(CNIError) as info:
        container_identity(env, need_netns=True)
    assert info.value.code == errors.INVALID_ENV and variable in info.value.msg and len(info.value.msg) < 400


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_an_absolute_network_name_reads_nothing_outside_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """The issue's reproduction, through the plugin's entry point: file datastore, node slices, and a
    network `name` naming a JSON file elsewhere; the call is code 7 and nothing of that file shows."""
    import io

    from ipam.cni import run
    from tests.cni_exec import FLAT_FILE_ENV

    secret = tmp_path / "secret.json"
    secret.write_text(
        json.dumps({"metadata": {"name": "TOPSECRET"}, "spec": {"range": "TOPSECRET", "sliceSize": "/24"}})
    )
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(json.dumps({"datastore": "file", "data_dir": str(tmp_path / "d"), "node_name": "n1"}))
    flat.chmod(0o600)
    monkeypatch.setenv(FLAT_FILE_ENV, str(flat))
    doc = {"cniVersion": "1.0.0", "name": str(tmp_path / "secret"), "type": "macvlan",
           "ipam": {"type": "whereabouts-py", "range": "10.0.0.0/16", "node_slice_size": "/24"}}  # fmt: skip
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_IFNAME": "net1", "CNI_NETNS": "/var/run/netns/x",
           "WHEREABOUTS_PY_AGENT_SOCKET": "/nonexistent/agent.sock"}  # fmt: skip
    out = io.StringIO()
    assert run(env, json.dumps(doc).encode(), out) == 1
    answer = json.loads(out.getvalue())
    assert answer["code"] == errors.INVALID_CONFIG and answer["msg"].startswith("invalid config: name: ")
    assert "TOPSECRET" not in out.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.json", "whereabouts.conf"] + (
        ["d"] if (tmp_path / "d").exists() else []
    )


def test_more_static_addresses_in_cni_args_than_the_limit_is_code_4() -> None:
    """Each static address is one reservation write: CNI_ARGS `IP=` is held to ipam.addresses' limit."""
    from ipam.requested import MAX_IP_ARGS, statics

    listed = ",".join(f"10.0.{i // 250}.{i % 250 + 1}/8" for i in range(MAX_IP_ARGS + 1))
    with pytest.raises(CNIError) as caught:
        statics([], {"IP": listed})
    assert caught.value.code == errors.INVALID_ENV and f"limit of {MAX_IP_ARGS}" in caught.value.msg
    assert len(statics([], {"IP": listed.rsplit(",", 1)[0]})) == MAX_IP_ARGS
