"""Which addresses a range hands out: bounds per prefix length, range_start/end, excludes, gateway, names."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netaddr import IPAddress, IPNetwork

from ipam.ranges import (
    RangeConfigError,
    RangeSpec,
    build_range,
    parse_cidr,
    parse_ip,
    pool_name,
    reservation_name,
    usable_bounds,
)


def ip(text: str) -> int:
    return int(IPAddress(text))


def addresses(spec: RangeSpec) -> list[str]:
    """Every allocatable address, spelled out (only for small ranges)."""
    return [str(IPAddress(v, spec.version)) for lo, hi in spec.intervals for v in range(lo, hi + 1)]


@pytest.mark.parametrize(
    ("cidr", "first", "last"),
    [
        ("10.0.0.0/24", "10.0.0.1", "10.0.0.254"),
        ("10.0.0.0/30", "10.0.0.1", "10.0.0.2"),
        ("10.0.0.0/31", "10.0.0.0", "10.0.0.1"),  # RFC 3021: both addresses are hosts
        ("10.0.0.9/32", "10.0.0.9", "10.0.0.9"),
        ("fd00::/64", "fd00::1", "fd00::ffff:ffff:ffff:fffe"),
        ("fd00::/120", "fd00::1", "fd00::fe"),
        ("fd00::/126", "fd00::1", "fd00::2"),
        ("fd00::/127", "fd00::", "fd00::1"),  # RFC 6164
        ("fd00::5/128", "fd00::5", "fd00::5"),
    ],
)
def test_usable_bounds(cidr: str, first: str, last: str) -> None:
    assert usable_bounds(IPNetwork(cidr)) == (ip(first), ip(last))
    spec = build_range("ipam", cidr)
    assert spec.intervals == ((ip(first), ip(last)),)
    assert spec.size() == ip(last) - ip(first) + 1


def test_small_ipv4_ranges_spelled_out() -> None:
    assert addresses(build_range("ipam", "10.0.0.0/30")) == ["10.0.0.1", "10.0.0.2"]
    assert addresses(build_range("ipam", "10.0.0.0/31")) == ["10.0.0.0", "10.0.0.1"]
    assert addresses(build_range("ipam", "10.0.0.4/32")) == ["10.0.0.4"]
    assert addresses(build_range("ipam", "10.0.0.0/29")) == [f"10.0.0.{i}" for i in range(1, 7)]


def test_network_and_broadcast_never_allocatable_below_31() -> None:
    for plen in range(24, 31):
        spec = build_range(
            "ipam",
            f"10.0.0.0/{plen}",
            range_start="10.0.0.0",
            range_end=str(IPNetwork(f"10.0.0.0/{plen}").broadcast),
        )
        assert not spec.contains(int(spec.network.first))
        assert not spec.contains(int(spec.network.last))
        assert spec.size() == spec.network.size - 2


def test_exclusions_at_both_edges() -> None:
    spec = build_range("ipam", "10.0.0.0/29", exclude=["10.0.0.1", "10.0.0.6/32"])
    assert addresses(spec) == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]


def test_exclusions_in_the_middle_split_the_range() -> None:
    spec = build_range("ipam", "10.0.0.0/28", exclude=["10.0.0.4/30", "10.0.0.9"])
    assert spec.intervals == (
        (ip("10.0.0.1"), ip("10.0.0.3")),
        (ip("10.0.0.8"), ip("10.0.0.8")),
        (ip("10.0.0.10"), ip("10.0.0.14")),
    )
    assert spec.contains(ip("10.0.0.3")) and not spec.contains(ip("10.0.0.4"))
    assert not spec.contains(ip("10.0.0.9")) and spec.contains(ip("10.0.0.10"))


def test_exclude_outside_the_range_changes_nothing() -> None:
    plain = build_range("ipam", "10.0.0.0/29")
    spec = build_range("ipam", "10.0.0.0/29", exclude=["10.0.1.0/24", "192.168.0.1"])
    assert spec.intervals == plain.intervals


def test_exclude_covering_everything_leaves_nothing() -> None:
    spec = build_range("ipam", "10.0.0.0/29", exclude=["10.0.0.0/29"])
    assert spec.intervals == () and spec.size() == 0


def test_exclude_with_host_bits_names_its_network() -> None:
    spec = build_range("ipam", "10.0.0.0/28", exclude=["10.0.0.5/30"])
    assert not any(spec.contains(ip(f"10.0.0.{i}")) for i in range(4, 8))
    assert spec.contains(ip("10.0.0.3")) and spec.contains(ip("10.0.0.8"))


def test_range_start_and_end() -> None:
    spec = build_range("ipam", "10.0.0.0/24", range_start="10.0.0.100", range_end="10.0.0.103")
    assert addresses(spec) == ["10.0.0.100", "10.0.0.101", "10.0.0.102", "10.0.0.103"]
    assert (spec.start, spec.end) == (ip("10.0.0.100"), ip("10.0.0.103"))


def test_range_start_and_end_with_edge_excludes() -> None:
    spec = build_range(
        "ipam",
        "10.0.0.0/24",
        range_start="10.0.0.100",
        range_end="10.0.0.104",
        exclude=["10.0.0.100", "10.0.0.104"],
    )
    assert addresses(spec) == ["10.0.0.101", "10.0.0.102", "10.0.0.103"]


def test_start_equal_to_end_is_one_address() -> None:
    spec = build_range("ipam", "10.0.0.0/24", range_start="10.0.0.7", range_end="10.0.0.7")
    assert addresses(spec) == ["10.0.0.7"]


def test_gateway_is_never_allocatable() -> None:
    spec = build_range("ipam", "10.0.0.0/29", gateway=IPAddress("10.0.0.1"))
    assert addresses(spec) == [f"10.0.0.{i}" for i in range(2, 7)]
    mid = build_range("ipam", "10.0.0.0/29", gateway=IPAddress("10.0.0.4"))
    assert "10.0.0.4" not in addresses(mid) and len(addresses(mid)) == 5
    v6 = build_range("ipam", "fd00::/125", gateway=IPAddress("fd00::1"))
    assert addresses(v6) == [f"fd00::{i}" for i in range(2, 7)]


def test_gateway_outside_or_other_family_changes_nothing() -> None:
    plain = build_range("ipam", "10.0.0.0/29")
    assert build_range("ipam", "10.0.0.0/29", gateway=IPAddress("10.9.9.9")).intervals == plain.intervals
    assert build_range("ipam", "10.0.0.0/29", gateway=IPAddress("fd00::1")).intervals == plain.intervals


def test_ipv6_range_with_excludes() -> None:
    spec = build_range(
        "ipam", "fd00::/120", exclude=["fd00::1", "fd00::f0/124"], gateway=IPAddress("fd00::2")
    )
    assert spec.intervals == ((ip("fd00::3"), ip("fd00::ef")),)
    assert spec.size() == 0xEF - 3 + 1
    big = build_range("ipam", "fd00::/64", range_start="fd00::ffff:ffff:ffff:0")
    assert big.intervals == ((ip("fd00::ffff:ffff:ffff:0"), ip("fd00::ffff:ffff:ffff:fffe")),)


def test_big_ranges_are_intervals_not_lists() -> None:
    spec = build_range("ipam", "10.0.0.0/8", exclude=["10.0.0.0/9"])
    assert spec.intervals == ((ip("10.128.0.0"), ip("10.255.255.254")),)
    assert spec.size() == 2**23 - 1
    v6 = build_range("ipam", "fd00::/48", exclude=["fd00::/49"])
    assert len(v6.intervals) == 1 and v6.size() == 2**79 - 1


def test_offsets_and_describe() -> None:
    spec = build_range("ipam", "10.0.0.0/24", range_start="10.0.0.10")
    assert spec.offset_of(ip("10.0.0.10")) == 10
    assert spec.address_at(10) == IPAddress("10.0.0.10")
    assert spec.describe() == "10.0.0.0/24 (10.0.0.10-10.0.0.254)"
    v6 = build_range("ipam", "fd00::/64")
    assert v6.address_at(0x1234) == IPAddress("fd00::1234")
    assert (v6.version, v6.prefixlen, v6.cidr) == (6, 64, "fd00::/64")


@pytest.mark.parametrize(
    ("cidr", "network_name", "name"),
    [
        ("10.0.0.0/24", "", "10.0.0.0-24"),
        ("10.0.0.0/24", "blue", "blue-10.0.0.0-24"),
        ("fd00::/64", "", "fd00---64"),
        ("fd00:1::/120", "", "fd00-1---120"),
        ("fd00::/64", "red", "red-fd00---64"),
        ("fd00::1:0/112", "", "fd00--1-0-112"),
        # from '::': Whereabouts' '---64' is refused by the API server; '::' is written '0::' there
        ("::/64", "", "0---64"),
        ("::1:0/112", "", "0--1-0-112"),
        ("::/64", "red", "red----64"),  # valid already, and Whereabouts' name: unchanged
    ],
)
def test_pool_name(cidr: str, network_name: str, name: str) -> None:
    assert pool_name(cidr, network_name) == name


@pytest.mark.parametrize(
    ("address", "network_name", "name"),
    [
        ("10.0.0.5", "", "10.0.0.5"),
        ("10.0.0.5", "blue", "blue-10.0.0.5"),
        ("fd00::5", "", "fd00--5"),
        ("fd00::", "", "fd00--0"),  # a trailing '-' would not be a valid object name
        ("fd00::1:0", "red", "red-fd00--1-0"),
        ("::5", "", "0--5"),
        ("::", "", "0--0"),
        ("::ffff:10.0.0.1", "", "0--ffff-10.0.0.1"),
        ("::5", "red", "red---5"),
    ],
)
def test_reservation_name(address: str, network_name: str, name: str) -> None:
    assert reservation_name(IPAddress(address), network_name) == name


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.0/33",
        "10.0/8",
        "x/24",
        "10.0.0.0/",
        "",
        "  ",
        "10.0.0.0/24/1",
        "10.0.0.0/+24",
        "10.0.0.0/\u0662\u0664",
    ],
)
def test_parse_cidr_rejects(text: str) -> None:
    with pytest.raises(RangeConfigError) as info:
        parse_cidr("k", text)
    assert info.value.key == "k" and info.value.value == text


@pytest.mark.parametrize("text", ["10.0.0.256", "10.0.0.1/32", "", "fd00:::1", "host"])
def test_parse_ip_rejects(text: str) -> None:
    with pytest.raises(RangeConfigError) as info:
        parse_ip("k", text)
    assert info.value.key == "k" and info.value.value == text


def test_parse_cidr_accepts_single_addresses() -> None:
    assert parse_cidr("k", "10.0.0.1") == IPNetwork("10.0.0.1/32")
    assert parse_cidr("k", "fd00::1") == IPNetwork("fd00::1/128")


@given(
    plen=st.integers(min_value=24, max_value=32),
    bounds=st.tuples(st.integers(0, 255), st.integers(0, 255)),
    excludes=st.lists(st.tuples(st.integers(0, 255), st.integers(26, 32)), max_size=4),
    gateway=st.one_of(st.none(), st.integers(0, 255)),
)
def test_intervals_match_brute_force(
    plen: int, bounds: tuple[int, int], excludes: list[tuple[int, int]], gateway: int | None
) -> None:
    """The interval arithmetic agrees with checking every address of a small IPv4 range one by one."""
    network = IPNetwork(f"10.0.0.0/{plen}")
    size = network.size
    lo_off, hi_off = sorted(b % size for b in bounds)
    start, end = f"10.0.0.{lo_off}", f"10.0.0.{hi_off}"
    ex_texts = [f"10.0.0.{o}/{p}" for o, p in excludes]
    gw = IPAddress(f"10.0.0.{gateway}") if gateway is not None else None
    first, last = usable_bounds(network)
    if max(ip(start), first) > min(ip(end), last):
        with pytest.raises(RangeConfigError):
            build_range("ipam", str(network), start, end, ex_texts, gw)
        return
    spec = build_range("ipam", str(network), start, end, ex_texts, gw)
    excluded = [IPNetwork(t).cidr for t in ex_texts]
    expected = [
        v
        for v in range(int(network.first), int(network.last) + 1)
        if max(ip(start), first) <= v <= min(ip(end), last)
        and not any(v in range(int(e.first), int(e.last) + 1) for e in excluded)
        and (gw is None or v != int(gw))
    ]
    got = [v for lo, hi in spec.intervals for v in range(lo, hi + 1)]
    assert got == expected
    assert spec.size() == len(expected)
    for v in range(int(network.first), int(network.last) + 1):
        assert spec.contains(v) == (v in expected)


@given(
    value=st.integers(0, 2**128 - 1),
    prefix=st.integers(0, 128),
    network_name=st.sampled_from(["", "a", "net.1", "x" * 128]),
)
def test_every_ipv6_pool_and_reservation_name_is_a_kubernetes_object_name(
    value: int, prefix: int, network_name: str
) -> None:
    import re

    rfc1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    network = IPNetwork((value, prefix), version=6).cidr
    for name in (pool_name(str(network), network_name), reservation_name(IPAddress(value, 6), network_name)):
        assert rfc1123.match(name) and len(name) <= 253, name


def test_cached_intervals_follow_every_input() -> None:
    """The allocatable runs are cached per (family, bounds, excludes, gateway): each input still counts."""
    plain = build_range("ipam", "10.0.0.0/29")
    assert plain.intervals == ((int(IPAddress("10.0.0.1")), int(IPAddress("10.0.0.6"))),)
    with_gateway = build_range("ipam", "10.0.0.0/29", gateway=IPAddress("10.0.0.1"))
    assert with_gateway.intervals == ((int(IPAddress("10.0.0.2")), int(IPAddress("10.0.0.6"))),)
    excluded = build_range("ipam", "10.0.0.0/29", exclude=["10.0.0.4/31"])
    assert excluded.intervals == (
        (int(IPAddress("10.0.0.1")), int(IPAddress("10.0.0.3"))),
        (int(IPAddress("10.0.0.6")), int(IPAddress("10.0.0.6"))),
    )
    assert build_range("ipam", "10.0.0.0/29").intervals == plain.intervals


# IPv4, IPv4-compatible IPv6 (the same integers as the IPv4 addresses) and IPv4-mapped IPv6 forms of one
# /28: equal-looking keys of the interval cache that must never stand for one another
_FORMS = {"v4": (4, 0x0A000000), "v6-compat": (6, 0x0A000000), "v6-mapped": (6, 0xFFFF0A000000)}


@st.composite
def _interval_queries(draw: st.DrawFn) -> tuple[int, int, int, tuple[IPNetwork, ...], IPAddress | None]:
    version, base = _FORMS[draw(st.sampled_from(sorted(_FORMS)))]
    lo, hi = sorted(draw(st.lists(st.integers(0, 15), min_size=2, max_size=2)))
    excludes = []
    for _ in range(draw(st.integers(0, 2))):
        ex_version, ex_base = _FORMS[draw(st.sampled_from(sorted(_FORMS)))]
        ex_bits = 32 if ex_version == 4 else 128
        host, plen = draw(st.integers(0, 15)), draw(st.integers(ex_bits - 4, ex_bits))
        excludes.append(IPNetwork((ex_base + host, plen), ex_version))  # host bits left set: non-canonical
    gateway = None
    if draw(st.booleans()):
        gw_version, gw_base = _FORMS[draw(st.sampled_from(sorted(_FORMS)))]
        gateway = IPAddress(gw_base + draw(st.integers(0, 15)), gw_version)
    return version, base + lo, base + hi, tuple(excludes), gateway


@given(st.lists(_interval_queries(), min_size=1, max_size=12))
def test_cached_intervals_equal_the_uncached_arithmetic_for_look_alike_inputs(
    queries: list[tuple[int, int, int, tuple[IPNetwork, ...], IPAddress | None]],
) -> None:
    """The interval cache is keyed by a digest of netaddr objects: an IPv4 address and its
    IPv4-compatible or IPv4-mapped IPv6 forms, and an exclude written with host bits, must each get
    their own answer (the one the set arithmetic gives), whatever was asked before."""
    from ipam.ranges import allocatable_intervals
    from ipam.ranges import compute_intervals as uncached

    for version, start, end, exclude, gateway in queries:
        assert allocatable_intervals(version, start, end, list(exclude), gateway) == uncached(
            version, start, end, exclude, gateway
        )


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ("10.0.0.0/24", "::ffff:10.0.0.0/120"),
        ("10.0.0.0/24", "::10.0.0.0/120"),
        ("fd00::/120", "fd00:0:0::1/120"),
    ],
)
def test_cached_free_slices_are_those_of_the_range_asked(one: str, other: str) -> None:
    """The free slices of a range are cut once per (range, size): look-alike ranges of the other family
    (or a non-canonical spelling of the same one) get the slices of the range asked for."""
    from ipam.slices import SliceEntry, cut, fresh

    for text in (one, other, one):
        spec = build_range("ipam", text)
        prefix = spec.prefixlen + 2
        assert fresh("p", spec, f"/{prefix}", prefix).entries == tuple(
            SliceEntry("", s) for s in cut(IPNetwork(text), prefix)
        )
