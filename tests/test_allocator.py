"""The pure allocator: lowest free first, idempotent re-ADD, release, GC, the lease wire format."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from netaddr import IPAddress

from ipam.allocator import (
    LEASE_FIELD_LIMITS,
    Allocations,
    Lease,
    Request,
    allocate,
    dump_allocations,
    find_container,
    find_owner,
    lowest_free,
    parse_allocations,
    release,
    release_stale,
)
from ipam.ranges import RangeSpec, build_range


def spec_of(cidr: str, **kw: object) -> RangeSpec:
    return build_range("ipam", cidr, **kw)  # type: ignore[arg-type]


def req(n: int | str, ifname: str = "net1", pod: str | None = None, node: str = "") -> Request:
    return Request(container_id=f"c{n}", ifname=ifname, podref=f"ns/{pod or f'p{n}'}", node=node)


def fill(spec: RangeSpec, count: int, start: int = 0) -> Allocations:
    """Allocate `count` addresses for pods start..start+count-1; asserts each ADD succeeds."""
    leases: Allocations = {}
    for i in range(start, start + count):
        decision = allocate(spec, leases, req(i))
        assert decision is not None
        leases = decision.allocations
    return leases


def addr(spec: RangeSpec, offset: int) -> str:
    return str(spec.address_at(offset))


def drain(spec: RangeSpec) -> list[str]:
    """Allocate until exhausted; returns the addresses in order."""
    leases: Allocations = {}
    out: list[str] = []
    for i in range(10_000):
        decision = allocate(spec, leases, req(i))
        if decision is None:
            return out
        leases = decision.allocations
        out.append(addr(spec, decision.offset))
    raise AssertionError("range never exhausted")


# -- lowest free first -------------------------------------------------------------------------


def test_lowest_first_and_offsets_from_network() -> None:
    spec = spec_of("10.0.0.0/24")
    d = allocate(spec, {}, req(1))
    assert d is not None and d.offset == 1 and d.changed and not d.reused
    assert d.allocations == {1: Lease("c1", "ns/p1", "net1")}
    d2 = allocate(spec, d.allocations, req(2))
    assert d2 is not None and d2.offset == 2
    assert set(d2.allocations) == {1, 2}


def test_fills_holes_first() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 5)
    leases, gone = release(leases, "c2", "net1")
    assert gone == [3]
    d = allocate(spec, leases, req(9))
    assert d is not None and d.offset == 3


def test_excluded_edges_never_handed_out() -> None:
    spec = spec_of("10.0.0.0/29", exclude=["10.0.0.1", "10.0.0.6"])
    assert drain(spec) == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]


def test_range_start_end() -> None:
    spec = spec_of("10.0.0.0/24", range_start="10.0.0.250", range_end="10.0.0.252")
    assert drain(spec) == ["10.0.0.250", "10.0.0.251", "10.0.0.252"]


def test_range_start_end_with_excludes_at_their_edges() -> None:
    spec = spec_of(
        "10.0.0.0/24", range_start="10.0.0.10", range_end="10.0.0.14", exclude=["10.0.0.10", "10.0.0.14"]
    )
    assert drain(spec) == ["10.0.0.11", "10.0.0.12", "10.0.0.13"]


def test_network_broadcast_and_gateway_never_handed_out() -> None:
    spec = spec_of("10.0.0.0/29", gateway=IPAddress("10.0.0.1"))
    got = drain(spec)
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    assert "10.0.0.0" not in got and "10.0.0.7" not in got


def test_slash_31_and_32() -> None:
    assert drain(spec_of("10.0.0.0/31")) == ["10.0.0.0", "10.0.0.1"]
    assert drain(spec_of("10.0.0.9/32")) == ["10.0.0.9"]


def test_slash_127_and_128() -> None:
    assert drain(spec_of("fd00::/127")) == ["fd00::", "fd00::1"]
    assert drain(spec_of("fd00::7/128")) == ["fd00::7"]


def test_ipv6_slash_120() -> None:
    spec = spec_of("fd00::/120", exclude=["fd00::1"], gateway=IPAddress("fd00::2"))
    got = drain(spec)
    assert got[:2] == ["fd00::3", "fd00::4"]
    assert got[-1] == "fd00::fe"
    assert len(got) == 0xFE - 3 + 1
    assert "fd00::ff" not in got and "fd00::" not in got


def test_ipv6_slash_64() -> None:
    spec = spec_of("fd00::/64", exclude=["fd00::/120"])
    leases = fill(spec, 3)
    assert [addr(spec, o) for o in sorted(leases)] == ["fd00::100", "fd00::101", "fd00::102"]
    assert sorted(leases) == [0x100, 0x101, 0x102]


def test_exhaustion_returns_none_and_frees_make_room() -> None:
    spec = spec_of("10.0.0.0/30")
    leases = fill(spec, 2)
    assert allocate(spec, leases, req(99)) is None
    leases, _ = release(leases, "c0", "net1")
    d = allocate(spec, leases, req(99))
    assert d is not None and addr(spec, d.offset) == "10.0.0.1"


def test_exhausted_by_excludes_alone() -> None:
    spec = spec_of("10.0.0.0/29", exclude=["10.0.0.0/29"])
    assert allocate(spec, {}, req(1)) is None


def test_skip_offsets_are_passed_over() -> None:
    spec = spec_of("10.0.0.0/29")
    d = allocate(spec, {}, req(1), skip={1, 2})
    assert d is not None and d.offset == 3
    assert allocate(spec, {}, req(1), skip=set(range(8))) is None


def test_foreign_leases_outside_the_range_do_not_block() -> None:
    """Leases at offsets this config does not allocate (another range_start) are kept, not reused."""
    spec = spec_of("10.0.0.0/24", range_start="10.0.0.100")
    leases: Allocations = {5: Lease("old", "ns/old", "eth0")}
    d = allocate(spec, leases, req(1))
    assert d is not None and d.offset == 100
    assert d.allocations[5] == Lease("old", "ns/old", "eth0")


# -- performance shape (correctness on sizes that walking could not finish) ---------------------


def test_lowest_free_skips_a_huge_excluded_block() -> None:
    spec = spec_of("10.0.0.0/8", exclude=["10.0.0.0/9"])
    assert lowest_free(spec, []) == int(IPAddress("10.128.0.0")) - int(IPAddress("10.0.0.0"))
    d = allocate(spec, {}, req(1))
    assert d is not None and addr(spec, d.offset) == "10.128.0.0"


def test_lowest_free_on_slash_8_with_ten_leases_then_exclude() -> None:
    # first ten usable addresses leased, then an exclude block of 2^22 addresses follows
    spec = spec_of("10.0.0.0/8", exclude=["10.0.0.11", "10.0.0.12/30", "10.0.0.16/28", "10.0.0.32/27", "10.0.0.64/26", "10.0.0.128/25", "10.0.1.0/24", "10.0.2.0/23", "10.0.4.0/22", "10.0.8.0/21", "10.0.16.0/20", "10.0.32.0/19", "10.0.64.0/18", "10.0.128.0/17", "10.1.0.0/16", "10.2.0.0/15", "10.4.0.0/14", "10.8.0.0/13", "10.16.0.0/12", "10.32.0.0/11", "10.64.0.0/10"])  # fmt: skip
    leases = fill(spec, 10)
    assert [addr(spec, o) for o in sorted(leases)] == [f"10.0.0.{i}" for i in range(1, 11)]
    d = allocate(spec, leases, req(10))
    assert d is not None and addr(spec, d.offset) == "10.128.0.0"


def test_lowest_free_ignores_taken_outside_intervals_and_skips_leased_runs() -> None:
    spec = spec_of("fd00::/64", exclude=["fd00::/65"])
    base = int(spec.network.first)
    boundary = int(IPAddress("fd00::8000:0:0:0")) - base
    taken = [*range(boundary, boundary + 1000), 5, 7, 2**70]
    assert lowest_free(spec, taken) == boundary + 1000


# -- idempotent re-ADD ---------------------------------------------------------------------------


def test_re_add_same_pod_and_ifname_returns_same_address() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 3)
    d = allocate(spec, leases, req(1))
    assert d is not None and d.offset == 2 and d.reused and not d.changed
    assert d.allocations is leases


def test_re_add_with_new_container_id_updates_the_lease() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 3)
    again = Request(container_id="c1-restarted", ifname="net1", podref="ns/p1", node="n2")
    d = allocate(spec, leases, again)
    assert d is not None and d.offset == 2 and d.reused and d.changed
    assert d.allocations[2].id == "c1-restarted"
    assert d.allocations[2].node == "n2"
    assert len(d.allocations) == 3
    assert leases[2].id == "c1"  # the input was not mutated


def test_re_add_keeps_created_and_extra_fields() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = {1: Lease("c1", "ns/p1", "net1", created="2020-01-01T00:00:00Z", extra={"team": "x"})}
    d = allocate(spec, leases, Request("c1b", "net1", "ns/p1", created="2030-01-01T00:00:00Z"))
    assert d is not None and d.offset == 1
    assert d.allocations[1].created == "2020-01-01T00:00:00Z"
    assert d.allocations[1].to_json()["team"] == "x"


def test_same_pod_other_ifname_gets_another_address() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 1)
    d = allocate(spec, leases, req(0, ifname="net2"))
    assert d is not None and d.offset == 2 and not d.reused


def test_without_podref_container_id_identifies_the_attachment() -> None:
    spec = spec_of("10.0.0.0/24")
    r = Request(container_id="abc", ifname="eth0")
    d1 = allocate(spec, {}, r)
    assert d1 is not None
    d2 = allocate(spec, d1.allocations, r)
    assert d2 is not None and d2.offset == d1.offset and d2.reused
    d3 = allocate(spec, d1.allocations, Request(container_id="other", ifname="eth0"))
    assert d3 is not None and d3.offset != d1.offset


def test_re_add_moves_a_lease_that_the_config_no_longer_allows() -> None:
    spec = spec_of("10.0.0.0/24", exclude=["10.0.0.1"])
    leases = {1: Lease("c1", "ns/p1", "net1")}
    d = allocate(spec, leases, req(1))
    assert d is not None and d.offset == 2 and not d.reused
    assert set(d.allocations) == {2}  # the old lease was dropped, not duplicated


def test_find_owner_and_find_container() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 3)
    assert find_owner(leases, req(2)) == 3
    assert find_owner(leases, req(7)) is None
    assert find_container(leases, "c2", "net1") == [3]
    assert find_container(leases, "c2", "") == [3]
    assert find_container(leases, "c2", "net9") == []


# -- release ----------------------------------------------------------------------------------------


def test_release_by_container_and_ifname() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 3)
    d = allocate(spec, leases, req(1, ifname="net2"))
    assert d is not None
    leases = d.allocations
    remaining, gone = release(leases, "c1", "net2")
    assert gone == [4]
    assert set(remaining) == {1, 2, 3}
    assert 4 in leases  # input untouched


def test_release_of_unknown_is_a_no_op() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = fill(spec, 2)
    remaining, gone = release(leases, "nobody", "net1")
    assert gone == [] and remaining == leases
    remaining, gone = release(leases, "c1", "eth7")
    assert gone == [] and remaining == leases
    assert release({}, "c1", "net1") == ({}, [])


def test_release_lease_without_ifname_matches_any_interface() -> None:
    leases = {4: Lease("c1", "ns/p1", "")}
    assert release(leases, "c1", "net1") == ({}, [4])


# -- GC ------------------------------------------------------------------------------------------------


def test_release_stale_only_for_the_given_node_and_never_without_node() -> None:
    leases: Allocations = {
        1: Lease("keep", "ns/a", "net1", node="n1", network="a"),
        2: Lease("stale", "ns/b", "net1", node="n1", network="a"),
        3: Lease("stale-other-node", "ns/c", "net1", node="n2", network="a"),
        4: Lease("no-node", "ns/d", "net1", network="a"),
        5: Lease("keep", "ns/a", "net2", node="n1", network="a"),  # same container, other ifname
    }
    remaining, gone = release_stale(leases, {("keep", "net1")}, "n1", "a")
    assert gone == [2, 5]
    assert set(remaining) == {1, 3, 4}
    remaining, gone = release_stale(leases, set(), "n2", "a")
    assert gone == [3]
    # an empty node name never matches the leases that have none
    remaining, gone = release_stale(leases, set(), "", "a")
    assert gone == [] and remaining == leases


def test_release_stale_touches_only_its_own_networks_leases() -> None:
    """Two network configs sharing a pool: one's valid attachments never judge the other's leases;
    a lease without a recorded network (older version, pruned) is never GC'd."""
    leases: Allocations = {
        1: Lease("a1", "ns/a", "net1", node="n1", network="net-a"),
        2: Lease("b1", "ns/b", "net2", node="n1", network="net-b"),
        3: Lease("old", "ns/c", "net1", node="n1"),
    }
    remaining, gone = release_stale(leases, set(), "n1", "net-a")
    assert gone == [1] and set(remaining) == {2, 3}
    remaining, gone = release_stale(leases, {("a1", "net1")}, "n1", "net-b")
    assert gone == [2] and set(remaining) == {1, 3}
    assert release_stale(leases, set(), "n1", "")[1] == []


# -- per-call tokens, pod UIDs, networks, moved leases ------------------------------------------------


def test_a_lease_carrying_the_calls_token_is_its_own_creation_not_a_reuse() -> None:
    """A retried write whose first answer was lost finds the lease it made: not reused, unchanged."""
    spec = spec_of("10.0.0.0/24")
    mine = Request("c1", "net1", "ns/p1", token="t1")
    d1 = allocate(spec, {}, mine)
    assert d1 is not None and d1.allocations[1].token == "t1" and not d1.reused
    d2 = allocate(spec, d1.allocations, mine)
    assert d2 is not None and d2.offset == 1 and not d2.reused and not d2.changed


def test_confirming_another_calls_lease_clears_its_token() -> None:
    """A second call (the direct-mode fallback of the same ADD) confirms the lease: the creator's
    rollback, which removes only leases with its token, can no longer take it."""
    spec = spec_of("10.0.0.0/24")
    leases = {1: Lease("c1", "ns/p1", "net1", token="agent-call")}
    d = allocate(spec, leases, Request("c1", "net1", "ns/p1", token="direct-call"))
    assert d is not None and d.reused and d.changed and d.allocations[1].token == "~direct-call"
    assert release(d.allocations, "c1", "net1", token="agent-call") == (d.allocations, [])
    assert release(d.allocations, "c1", "net1", "agent-call", untokened=True) == (d.allocations, [])
    assert release(leases, "c1", "net1", token="agent-call") == ({}, [1])
    # the confirming call's own retry (its answer lost) still sees a reuse, and writes nothing more
    again = allocate(spec, d.allocations, Request("c1", "net1", "ns/p1", token="direct-call"))
    assert again is not None and again.reused and not again.changed


def test_re_add_without_pod_uid_clears_the_recorded_uid() -> None:
    """The pod may have been recreated under the same name: a UID this ADD did not vouch for must
    not stay on the lease (the reconciler would release the live pod's lease as pod-replaced)."""
    spec = spec_of("10.0.0.0/24")
    leases = {1: Lease("c1", "ns/p1", "net1", poduid="old-uid")}
    d = allocate(spec, leases, Request("c2", "net1", "ns/p1"))
    assert d is not None and d.offset == 1 and d.allocations[1].poduid == ""
    d = allocate(spec, leases, Request("c2", "net1", "ns/p1", poduid="new-uid"))
    assert d is not None and d.allocations[1].poduid == "new-uid"


def test_lease_records_the_network_that_made_it() -> None:
    spec = spec_of("10.0.0.0/24")
    d = allocate(spec, {}, Request("c1", "net1", "ns/p1", network="net-a"))
    assert d is not None and d.allocations[1].network == "net-a"
    assert dump_allocations(d.allocations)["1"]["attrs"] == "network=net-a"
    assert Lease.from_json(dump_allocations(d.allocations)["1"]).network == "net-a"


def test_a_moved_lease_is_reported_so_its_reservation_can_go() -> None:
    spec = spec_of("10.0.0.0/24", exclude=["10.0.0.1"])
    old = Lease("c0", "ns/p1", "net1")
    d = allocate(spec, {1: old}, req(1))
    assert d is not None and d.moved == (1, old)


# -- wire format -----------------------------------------------------------------------------------


def test_lease_json_round_trip_keeps_unknown_fields() -> None:
    raw = {
        "1": {"id": "c1", "podref": "ns/p1", "ifname": "net1", "node": "n1", "foo": {"bar": [1]}},
        "10": {"id": "c2", "podref": "ns/p2"},  # Whereabouts' shape: no ifname
        "2": {"id": "c3", "podref": "", "ifname": "eth0", "attrs": "poduid=u;created=t", "x": 1},
    }
    leases = parse_allocations(raw)
    assert leases[1] == Lease("c1", "ns/p1", "net1", node="n1")
    assert (leases[2].poduid, leases[2].created) == ("u", "t")
    assert leases[10].ifname == ""
    dumped = dump_allocations(leases)
    assert list(dumped) == ["1", "2", "10"]  # ordered by offset
    assert dumped["1"]["foo"] == {"bar": [1]}
    assert dumped["2"] == raw["2"]
    assert dumped["10"] == {"id": "c2", "podref": "ns/p2"}
    assert parse_allocations(json.loads(json.dumps(dumped))) == leases
    assert json.loads(json.dumps(dumped)) == {k: dumped[k] for k in dumped}


FULL = Lease(
    "c1", "ns/p1", "net1", node="n1", poduid="u1", created="2026-11-29T15:00:00Z", network="net-a", token="t1"
)


def test_lease_extras_are_packed_into_one_attrs_field() -> None:
    """The API server's cost of a pool write grows with the fields per lease: the five extras travel
    as one string, in a fixed order, and none of them as a separate field."""
    assert FULL.to_json() == {
        "id": "c1",
        "podref": "ns/p1",
        "ifname": "net1",
        "attrs": "node=n1;poduid=u1;created=2026-11-29T15:00:00Z;network=net-a;token=t1",
    }
    assert Lease.from_json(FULL.to_json()) == FULL
    assert Lease("c1", "ns/p1", "net1", network="b", node="a").to_json()["attrs"] == "node=a;network=b"
    assert Lease("c1", "ns/p1", "net1").to_json() == {"id": "c1", "podref": "ns/p1", "ifname": "net1"}


def test_attrs_values_with_separators_and_percent_round_trip() -> None:
    odd = Lease("c", "ns/p", "net1", node="a;b=c", poduid="100%", created="%3B", network="=;%", token="%%25")
    raw = odd.to_json()
    assert raw["attrs"] == "node=a%3Bb%3Dc;poduid=100%25;created=%253B;network=%3D%3B%25;token=%25%2525"
    assert Lease.from_json(json.loads(json.dumps(raw))) == odd


@given(st.lists(st.text(alphabet=st.sampled_from("a;=%3BDd2 5\u00e9"), max_size=8), min_size=5, max_size=5))
def test_any_extra_values_round_trip_through_attrs(values: list[str]) -> None:
    lease = Lease("c", "ns/p", "net1", *values)
    assert Lease.from_json(json.loads(json.dumps(lease.to_json()))) == lease


@given(
    st.lists(st.text(alphabet=st.sampled_from("a;=%3BDd2 5\u00e9"), max_size=6), min_size=5, max_size=5),
    st.dictionaries(
        st.sampled_from(["zone", "future", "x-y"]), st.text(max_size=4) | st.integers(), max_size=2
    ),
    st.lists(
        st.sampled_from(["zone=eu", "flag", "rack=r%3B1", "poduid=u9", "token=t9"]), max_size=3, unique=True
    ),
)
def test_a_pool_written_and_read_back_is_the_same_leases_in_every_field(
    values: list[str], unknown: dict[str, object], packed_unknown: list[str]
) -> None:
    """What KubernetesStore.write_pool relies on when the server stores what was sent: decoding the
    leases sent gives back exactly the leases written, unknown fields and attrs entries included.
    A repeat of one of our extras in `attrs_extra` is kept only behind that extra's own value: with the
    extra empty it would be read back as the extra (see the test below)."""
    lease = Lease("c", "ns/p", "net1", *values, extra=unknown, attrs_extra=tuple(packed_unknown))
    back = parse_allocations(json.loads(json.dumps(dump_allocations({7: lease}))))[7]
    kept = tuple(e for e in packed_unknown if getattr(lease, e.partition("=")[0], "x"))
    assert back == lease and back.extra == lease.extra and back.attrs_extra == kept
    assert Lease.from_json(back.to_json()).attrs_extra == kept


def test_a_repeated_extra_in_attrs_does_not_come_back_once_the_extra_is_emptied() -> None:
    """`attrs` holding one of our extras twice (not written by us: by hand or a foreign writer) keeps
    the repeat behind the first. When the extra itself becomes empty, the repeat must not be written
    where the first stood: read back first, it would revive a value that was dropped on purpose, and
    the leases written would not be the leases the agent remembers (KubernetesStore.write_pool's
    answer). Two ways an extra is emptied: a call without a pod UID confirms the lease (a stale UID
    would let the reconciler release the live pod's lease as pod-replaced), and an older version's
    separate fields take precedence over a stale `attrs` (its token would let that creator's rollback
    remove the lease)."""
    raw = {"id": "c1", "podref": "ns/p1", "ifname": "net1", "attrs": "node=n1;poduid=u1;token=t1;poduid=u0"}
    d = allocate(
        spec_of("10.0.0.0/24"), parse_allocations({"1": raw}), Request("c2", "net1", "ns/p1", token="t2")
    )
    assert d is not None and d.allocations[1].poduid == "" and d.allocations[1].token == "~t2"
    written = parse_allocations(json.loads(json.dumps(dump_allocations(d.allocations))))
    assert written[1] == d.allocations[1] and written[1].poduid == ""
    assert written[1].attrs_extra == d.allocations[1].attrs_extra == ()

    old = {"id": "c1", "podref": "ns/p1", "node": "n1", "attrs": "node=n1;token=t1;token=t0;zone=eu"}
    lease = Lease.from_json(old)
    assert (lease.node, lease.token, lease.attrs_extra) == ("n1", "", ("zone=eu",))
    assert Lease.from_json(lease.to_json()) == lease and lease.to_json()["attrs"] == "node=n1;zone=eu"


def test_an_old_format_lease_is_read_and_rewritten_packed_without_loss() -> None:
    """Leases of the previous version (extras as separate fields) exist in clusters."""
    old = {
        "id": "c1",
        "podref": "ns/p1",
        "ifname": "net1",
        "node": "n1",
        "poduid": "u1",
        "created": "2026-11-29T15:00:00Z",
        "network": "net-a",
        "token": "t1",
        "future": {"x": 1},
    }
    lease = Lease.from_json(old)
    assert lease == FULL and lease.extra == {"future": {"x": 1}}
    assert lease.to_json() == {**FULL.to_json(), "future": {"x": 1}}  # packed; separate fields gone
    # a pool rewritten by an unrelated allocation keeps the old lease's every extra
    d = allocate(spec_of("10.0.0.0/24"), parse_allocations({"1": old}), req(2))
    assert d is not None and Lease.from_json(dump_allocations(d.allocations)["1"]) == FULL


def test_a_lease_an_older_version_confirmed_after_we_packed_it_takes_its_separate_fields() -> None:
    """Upgrade, roll back, upgrade: the older version kept our `attrs` as an unknown field, did not
    read it, and confirmed the lease for a recreated pod with separate fields. Those are its newer
    word on every extra: the stale pod UID in `attrs` would make the reconciler release the live
    pod's lease as pod-replaced, the stale token would let the first creator's rollback remove it."""
    packed = FULL.to_json()["attrs"]  # node=n1;poduid=u1;...;token=t1
    confirmed = {"id": "c2", "podref": "ns/p1", "attrs": packed + ";zone=eu", "node": "n1", "poduid": "u2"}
    lease = Lease.from_json(confirmed)
    assert (lease.node, lease.poduid, lease.token, lease.created, lease.network) == ("n1", "u2", "", "", "")
    assert lease.to_json() == {"id": "c2", "podref": "ns/p1", "attrs": "node=n1;poduid=u2;zone=eu"}
    assert release({1: lease}, "c2", "", token="t1") == ({1: lease}, [])


def test_unknown_attrs_entries_survive_a_rewrite() -> None:
    """A newer version's packed data is kept verbatim, after ours, through allocate and re-ADD."""
    raw = {"id": "c1", "podref": "ns/p1", "ifname": "net1", "attrs": "zone=eu%3Bw;node=n1;flag;token=t1"}
    lease = Lease.from_json(raw)
    assert (lease.node, lease.token, lease.attrs_extra) == ("n1", "t1", ("zone=eu%3Bw", "flag"))
    assert lease.to_json()["attrs"] == "node=n1;token=t1;zone=eu%3Bw;flag"
    spec = spec_of("10.0.0.0/24")
    d = allocate(spec, {1: lease}, Request("c2", "net1", "ns/p1", poduid="u2", token="t2"))  # re-ADD
    assert d is not None and d.reused and d.changed
    assert d.allocations[1].to_json()["attrs"] == "node=n1;poduid=u2;token=~t2;zone=eu%3Bw;flag"


@pytest.mark.parametrize(
    ("attrs", "expected", "written"),
    [
        (7, Lease("c", "p"), None),  # not a string: ignored (dropped on a rewrite)
        ({"node": "x"}, Lease("c", "p"), None),
        (None, Lease("c", "p"), None),
        ("", Lease("c", "p"), None),
        ("garbage", Lease("c", "p"), "garbage"),  # no `=`: kept verbatim
        ("node;poduid=u", Lease("c", "p", poduid="u"), "poduid=u;node"),
        (";;node=n1;;", Lease("c", "p", node="n1"), "node=n1"),  # empty entries carry nothing
        ("node=;node=n1", Lease("c", "p", node="n1"), "node=n1"),  # an empty extra is no extra
        ("node=n1;node=n2", Lease("c", "p", node="n1"), "node=n1;node=n2"),  # first wins, rest kept
        ("node=a%zz%3", Lease("c", "p", node="a%zz%3"), "node=a%25zz%253"),  # a stray `%` is literal
        ("=x;Node=y", Lease("c", "p"), "=x;Node=y"),
    ],
)
def test_malformed_attrs_never_raise(attrs: object, expected: Lease, written: str | None) -> None:
    lease = Lease.from_json({"id": "c", "podref": "p", "attrs": attrs})
    assert lease == expected
    assert lease.to_json().get("attrs") == written
    assert Lease.from_json(lease.to_json()) == lease  # stable from here on
    assert Lease.from_json(lease.to_json()).to_json() == lease.to_json()


def test_a_malformed_attrs_beside_old_fields_keeps_the_old_fields() -> None:
    for attrs in (7, None, "garbage", "node"):
        lease = Lease.from_json({"id": "c", "podref": "p", "node": "n0", "network": "a", "attrs": attrs})
        assert (lease.node, lease.network) == ("n0", "a")


def test_extra_fields_survive_an_allocation() -> None:
    spec = spec_of("10.0.0.0/24")
    leases = parse_allocations({"1": {"id": "w", "podref": "ns/w", "ifname": "net1", "future": "v"}})
    d = allocate(spec, leases, req(2))
    assert d is not None
    assert dump_allocations(d.allocations)["1"]["future"] == "v"


@pytest.mark.parametrize(
    "raw",
    [
        {"x": {"id": "c"}},
        {"-1": {"id": "c"}},
        {"1.0": {"id": "c"}},
        {"0x1": {"id": "c"}},
        {" 1": {"id": "c"}},
        {"": {"id": "c"}},
        {"\u0661": {"id": "c"}},  # ARABIC-INDIC DIGIT ONE: str.isdigit() but not a decimal offset
        {"\u00b2": {"id": "c"}},  # SUPERSCRIPT TWO
        {"1": {"id": "a"}, "01": {"id": "b"}},  # two keys for one offset: one lease would vanish
        {"1": "not-an-object"},
        {"1": {"id": 5}},
        {"1": ["id"]},
    ],
)
def test_parse_allocations_rejects(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        parse_allocations(raw)


HUGE = "x" * (1 << 20)  # the API server keeps a lease as written, up to the object's ~1.5 MiB


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"1": None}, "allocation 1: the lease is null, not an object"),
        ({"1": 7}, "allocation 1: the lease is a number, not an object"),
        ({"1": ["c1", "ns/p"]}, "allocation 1: the lease is an array, not an object"),
        ({"1": HUGE}, "allocation 1: the lease is a string, not an object"),
        ({"2": {"id": "c", "podref": 5}}, "allocation 2: lease field 'podref' is a number, not a string"),
        ({"2": {"id": "c", "podref": ["ns/p"]}}, "lease field 'podref' is an array, not a string"),
        ({"2": {"id": True, "podref": "ns/p"}}, "lease field 'id' is a boolean, not a string"),
        ({"2": {"id": "c", "node": {"n": 1}}}, "lease field 'node' is an object, not a string"),
        ({"2": {"id": "c", "ipamclaimref": 1.5}}, "lease field 'ipamclaimref' is a number, not a string"),
        (
            {"3": {"id": "c", "podref": HUGE}},
            f"lease field 'podref' is {len(HUGE)} characters long, more than 320",
        ),
        ({"3": {"id": HUGE, "podref": "ns/p"}}, "lease field 'id' is 1048576 characters long, more than 256"),
        ({"3": {"id": "c", "attrs": HUGE}}, "lease field 'attrs' is 1048576 characters long, more than 4096"),
        ({"3": {"id": "c", "token": "t" * 257}}, "lease field 'token' is 257 characters long, more than 256"),
        ({HUGE: {"id": "c"}}, "is not a decimal offset"),
    ],
)
def test_a_malformed_lease_is_a_short_clear_error(raw: dict[str, object], message: str) -> None:
    """The API server validates nothing inside `spec.allocations` (our CRD keeps it opaque): the reader
    refuses a lease that is not an object, a text field of another JSON type, or one longer than the
    bound the CRD used to declare, naming the offset and the field, never echoing the value."""
    with pytest.raises(ValueError) as info:
        parse_allocations(raw)
    assert message in str(info.value) and len(str(info.value)) < 400


def test_allocations_that_are_not_an_object_are_refused() -> None:
    for raw in ([], [{"id": "c"}], "x", 7):
        with pytest.raises(ValueError, match=r"allocations is .*, not an object"):
            parse_allocations(raw)


def test_a_lease_at_every_bound_is_read() -> None:
    raw = {k: "x" * n for k, n in LEASE_FIELD_LIMITS.items() if k != "attrs"}
    lease = Lease.from_json(raw)
    assert (lease.id, lease.podref, lease.network) == ("x" * 256, "x" * 320, "x" * 1024)
    assert lease.extra == {"ipamclaimref": "x" * 320}
    assert Lease.from_json({"id": "c", "attrs": "node=" + "n" * 4091}).node == "n" * 4091


def test_missing_or_null_fields_read_as_empty_and_the_lease_still_holds_its_address() -> None:
    """Only a foreign writer makes such a lease now that the API server requires nothing in it: the
    address stays taken, no call matches it, and unknown fields (nulls too) are written back as they are."""
    leases = parse_allocations({"1": {}, "2": {"id": None, "podref": None, "ifname": None, "x": None}})
    assert leases[1] == leases[2] == Lease("")
    assert leases[2].to_json() == {"x": None, "id": "", "podref": ""}
    d = allocate(spec_of("10.0.0.0/29"), leases, req(3))
    assert d is not None and d.offset == 3 and {1, 2} <= set(d.allocations)
    assert not leases[1].owned_by("ns/p", "net1", "c") and not leases[1].held_by_container("c", "net1")


def test_retained_lease_survives_gc_and_only_its_pod_name_takes_it_back() -> None:
    from ipam.allocator import Retention, release, release_stale

    spec = build_range("range", "10.0.0.0/29")
    first = allocate(spec, {}, Request("c1", "net1", "ns/db-0", node="n1", network="net"))
    assert first is not None
    kept, gone = release(
        first.allocations, "c1", "net1", retention=Retention("2026-01-01T00:00:00Z", "statefulset")
    )
    assert gone == [] and kept[first.offset].retained == "2026-01-01T00:00:00Z"
    assert release_stale(kept, set(), "n1", "net") == (kept, [])  # GC: its container is gone by design
    other = allocate(spec, kept, Request("c2", "net1", "ns/db-1"))
    assert other is not None and other.offset != first.offset
    back = allocate(spec, kept, Request("c3", "net1", "ns/db-0"))
    assert back is not None and back.offset == first.offset and back.reused
    assert back.allocations[first.offset].retained == "" and back.allocations[first.offset].id == "c3"
    # without retention (sticky off) a DEL of a retained lease's container leaves it to the reconciler
    assert release(kept, "c1", "net1") == (kept, [])
