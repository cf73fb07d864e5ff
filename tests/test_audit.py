"""ipam.audit: what counts as leaked, duplicate, orphaned... and which fix is safe, without any I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ipam import audit
from ipam.allocator import Lease
from ipam.audit import Inventory, PodInfo, Reservation, Slice, SlicePool
from ipam.store.base import PoolSnapshot

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
OLD_DT = NOW - timedelta(hours=1)
OLD = OLD_DT.strftime("%Y-%m-%dT%H:%M:%SZ")
FRESH_DT = NOW - timedelta(seconds=30)
FRESH = FRESH_DT.strftime("%Y-%m-%dT%H:%M:%SZ")
GRACE = 300.0


def lease(pod: str, uid: str = "", created: str = OLD, node: str = "n1", ctr: str = "") -> Lease:
    return Lease(ctr or f"c-{pod}", f"ns/{pod}", "net1", node=node, poduid=uid, created=created)


def live(uid: str = "") -> PodInfo:
    return PodInfo(uid, "Running", False, OLD_DT, None)


def res(name: str, holder: Lease, made: datetime = OLD_DT) -> Reservation:
    return Reservation(name, Lease(holder.id, holder.podref, holder.ifname), made, "7")


def pool(name: str, cidr: str, leases: dict[int, Lease]) -> PoolSnapshot:
    return PoolSnapshot(name, cidr, leases, "1")


def kinds(problems: list[audit.Problem]) -> list[tuple[str, str, str, str | None]]:
    return [(p.kind, p.pool, p.address, p.fix) for p in problems]


def test_a_healthy_inventory_has_no_problem() -> None:
    a = lease("a", uid="u1")
    inv = Inventory(
        [pool("10.0.0.0-24", "10.0.0.0/24", {1: a})],
        [res("10.0.0.1", a)],
        pods={"ns/a": live("u1")},
    )
    assert audit.audit(inv, NOW, GRACE) == []


def test_each_kind_is_found_with_its_safe_fix() -> None:
    gone, replaced, young = lease("gone"), lease("repl", uid="old"), lease("young", created=FRESH)
    ok, unreserved, mism, dup1, dup2 = (
        lease("ok"),
        lease("unres"),
        lease("mism"),
        lease("dup1"),
        lease("dup2"),
    )
    far = lease("far")
    pools = [
        pool(
            "10.0.0.0-24",
            "10.0.0.0/24",
            {1: gone, 2: replaced, 3: young, 4: ok, 5: unreserved, 6: mism, 9: dup1},
        ),
        pool("10.0.0.0-25", "10.0.0.0/25", {9: dup2, 200: far}),  # overlapping range, no reservations
    ]
    reservations = [
        res("10.0.0.1", gone),
        res("10.0.0.2", replaced),
        res("10.0.0.3", young),
        res("10.0.0.4", ok),
        res("10.0.0.6", lease("someone-else")),
        res("10.0.0.9", dup1),
        res("10.0.0.77", lease("crashed")),  # orphan, old
        res("10.0.0.78", lease("inflight"), made=FRESH_DT),  # orphan, young
    ]
    pods = {f"ns/{p}": live() for p in ("ok", "unres", "mism", "dup1", "dup2", "far")}
    pods["ns/repl"] = live("new")
    problems = audit.audit(Inventory(pools, reservations, pods=pods), NOW, GRACE)
    assert kinds(problems) == [
        ("leaked", "10.0.0.0-24", "10.0.0.1", "release"),
        ("leaked", "10.0.0.0-24", "10.0.0.2", "release"),
        ("leaked", "10.0.0.0-24", "10.0.0.3", None),  # younger than the grace
        ("duplicate", "10.0.0.0-24", "10.0.0.9", None),
        ("duplicate", "10.0.0.0-25", "10.0.0.9", None),
        ("reservation-mismatch", "10.0.0.0-24", "10.0.0.6", None),
        ("reservation-mismatch", "10.0.0.0-25", "10.0.0.9", None),
        ("orphan-reservation", "", "10.0.0.77", "delete-reservation"),
        ("orphan-reservation", "", "10.0.0.78", None),
        ("missing-reservation", "10.0.0.0-24", "10.0.0.5", "create-reservation"),
        ("out-of-range", "10.0.0.0-25", "10.0.0.200", None),
    ]
    by_addr = {(p.kind, p.address): p for p in problems}
    assert by_addr[("leaked", "10.0.0.1")].detail == "pod-gone"
    assert by_addr[("leaked", "10.0.0.2")].detail == "pod-replaced"
    assert by_addr[("leaked", "10.0.0.3")].detail == "pod-gone (lease younger than 300s)"
    assert by_addr[("duplicate", "10.0.0.9")].podref in {"ns/dup1", "ns/dup2"}
    assert audit.summary(problems) == {
        "leaked": 3,
        "duplicate": 2,
        "reservation-mismatch": 2,
        "orphan-reservation": 2,
        "missing-reservation": 1,
        "out-of-range": 1,
    }
    assert [p.warning for p in problems if p.kind == "missing-reservation"] == [True]


def test_without_pods_nothing_is_judged_leaked() -> None:
    inv = Inventory(
        [pool("10.0.0.0-24", "10.0.0.0/24", {1: lease("gone")})], [res("10.0.0.1", lease("gone"))]
    )
    assert audit.audit(inv, NOW, GRACE) == []


def test_missing_reservation_is_left_alone_where_a_network_uses_none() -> None:
    """enable_overlapping_ranges: false makes no reservation at all: warn, but do not create one."""
    inv = Inventory([pool("10.0.0.0-24", "10.0.0.0/24", {1: lease("a")})], [], pods={"ns/a": live()})
    [problem] = audit.audit(inv, NOW, GRACE)
    assert (problem.kind, problem.fix, problem.warning) == ("missing-reservation", None, True)


def test_a_leaked_lease_gets_no_reservation_and_a_young_one_waits() -> None:
    a, b = lease("gone"), lease("new", created=FRESH)
    inv = Inventory(
        [pool("10.0.0.0-24", "10.0.0.0/24", {1: a, 2: b, 3: lease("c")})],
        [res("10.0.0.3", lease("c"))],
        pods={"ns/new": live(), "ns/c": live()},
    )
    got = [(p.kind, p.address, p.fix) for p in audit.audit(inv, NOW, GRACE)]
    assert got == [
        ("leaked", "10.0.0.1", "release"),
        ("missing-reservation", "10.0.0.1", None),
        ("missing-reservation", "10.0.0.2", None),
    ]


def test_network_names_keep_address_spaces_apart() -> None:
    a, b = lease("a"), lease("b")
    inv = Inventory(
        [
            pool("public-10.0.0.0-24", "10.0.0.0/24", {1: a}),
            pool("cluster-10.0.0.0-24", "10.0.0.0/24", {1: b}),
        ],
        [res("public-10.0.0.1", a), res("cluster-10.0.0.1", b)],
        pods={"ns/a": live(), "ns/b": live()},
    )
    assert audit.audit(inv, NOW, GRACE) == []


def test_ipv6_reservation_names_and_orphans() -> None:
    a = lease("a")
    inv = Inventory(
        [pool("net-fd00---64", "fd00::/64", {1: a})],
        [res("net-fd00--1", a), res("net-fd00--2", lease("x"))],
        pods={"ns/a": live()},
    )
    [orphan] = audit.audit(inv, NOW, GRACE)
    assert (orphan.kind, orphan.address, orphan.fix) == (
        "orphan-reservation",
        "fd00::2",
        "delete-reservation",
    )


def slice_pool(*slices: tuple[str, str]) -> SlicePool:
    return SlicePool("storage", "10.9.0.0/16", "/28", tuple(Slice(n, r) for n, r in slices), "5")


def test_slices_of_gone_nodes_are_reported() -> None:
    sp = slice_pool(
        ("node-a", "10.9.0.0/28"),
        ("node-b", "10.9.0.16/28"),
        ("node-c", "10.9.0.32/28"),
        ("", "10.9.0.48/28"),
    )
    a, c = lease("a", node="node-a"), lease("c", node="node-c")
    inv = Inventory(
        [
            pool("storage-node-a-10.9.0.0-28", "10.9.0.0/28", {1: a}),
            pool("storage-node-b-10.9.0.16-28", "10.9.0.16/28", {}),
            pool("storage-node-c-10.9.0.32-28", "10.9.0.32/28", {1: c}),
        ],
        [res("storage-10.9.0.1", a), res("storage-10.9.0.33", c)],
        [sp],
        pods={"ns/c": live()},  # a's pod is gone with its node
        nodes=frozenset({"node-c"}),
    )
    views = {v.name: (v.network, v.node) for v in audit.pool_views(inv)}
    assert views["storage-node-a-10.9.0.0-28"] == ("storage", "node-a")
    got = [(p.kind, p.pool, p.address, p.fix) for p in audit.audit(inv, NOW, GRACE)]
    assert got == [
        ("leaked", "storage-node-a-10.9.0.0-28", "10.9.0.1", "release"),
        ("slice-of-gone-node", "storage", "10.9.0.0/28", None),  # returned by node slices' reclaim
        ("slice-of-gone-node", "storage", "10.9.0.16/28", None),
    ]


def test_a_gone_nodes_slice_with_a_lease_that_stays_is_only_reported() -> None:
    sp = slice_pool(("node-a", "10.9.0.0/28"))
    a = lease("a", node="node-a", created=FRESH)
    inv = Inventory(
        [pool("node-a-10.9.0.0-28", "10.9.0.0/28", {1: a})],  # NAD without network_name: no prefix
        [res("10.9.0.1", a)],
        [sp],
        pods={},
        nodes=frozenset(),
    )
    problems = audit.audit(inv, NOW, GRACE)
    assert [(p.kind, p.fix) for p in problems] == [("leaked", None), ("slice-of-gone-node", None)]
    assert problems[1].detail == "node node-a no longer exists; its slice pool holds 1 lease(s) that stay"


@pytest.mark.parametrize(
    ("name", "networks", "expected"),
    [
        ("10.0.0.1", set(), ("", "10.0.0.1")),
        ("public-10.0.0.1", {"public"}, ("public", "10.0.0.1")),
        ("my-net-fd00--5", {"my-net"}, ("my-net", "fd00::5")),
        ("other-net-10.1.2.3", set(), ("other-net", "10.1.2.3")),
        ("junk", set(), ("", "")),
    ],
)
def test_reservation_names_map_back_to_addresses(
    name: str, networks: set[str], expected: tuple[str, str]
) -> None:
    assert audit.reservation_address(name, networks) == expected


def test_usage_counts_only_usable_addresses() -> None:
    view = audit.pool_views(Inventory([pool("p", "10.0.0.0/29", {1: lease("a"), 2: lease("b", node="")})]))[0]
    assert (view.size, view.used(), view.free(), view.nodes()) == (6, 2, 4, {"": 1, "n1": 1})


def test_a_slice_pool_left_behind_by_its_node_still_belongs_to_its_network() -> None:
    """The slice was returned (or taken by another node); the old node's pool is read by its name, so its
    reservations are looked up under the network name, not under `network-node`."""
    sp = slice_pool(("", "10.9.0.0/28"), ("node-b", "10.9.0.16/28"))
    a = lease("a", node="node-a")
    inv = Inventory(
        [pool("storage-node-a-10.9.0.0-28", "10.9.0.0/28", {1: a})],
        [res("storage-10.9.0.1", a)],
        [sp],
        pods={"ns/a": live()},
        nodes=frozenset({"node-b"}),
    )
    [view] = audit.pool_views(inv)
    assert (view.network, view.node) == ("storage", "node-a")
    assert audit.audit(inv, NOW, GRACE) == []


# -- sticky: retained leases ------------------------------------------------------------------------


def retained(pod: str, sticky: str = "", until: str = "") -> Lease:
    return Lease(
        f"c-{pod}", f"ns/{pod}", "net1", node="n1", created=OLD, retained=OLD, sticky=sticky, until=until
    )


LATER = (NOW + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("held", "pod", "statefulsets", "expected"),
    [
        (retained("db-1", "statefulset"), None, {"ns/db": range(2)}, None),
        (retained("db-1", "statefulset"), None, {"ns/db": range(1)}, "statefulset-scaled-down"),
        (retained("db-1", "statefulset"), None, {}, "statefulset-gone"),
        (retained("db-1", "statefulset"), None, {"other/db": range(3)}, "statefulset-gone"),
        (retained("db-1", "statefulset"), None, None, None),  # StatefulSets unknown: kept
        (retained("web", "statefulset"), None, {"ns/web": 1}, "not-a-statefulset-pod"),
        (retained("db-01", "statefulset"), None, {"ns/db": range(5)}, "not-a-statefulset-pod"),
        (retained("web", until=LATER), None, None, None),
        (retained("web", until=OLD), None, None, "sticky-expired"),
        (retained("web", until="garbage"), None, None, "sticky-expired"),
        (retained("web", until=OLD), live("new-uid"), None, None),  # re-created: its ADD takes it back
        (retained("db-1", "statefulset", until=LATER), None, {}, None),  # either rule keeps it
        (retained("db-1", "statefulset", until=OLD), None, {"ns/db": range(2)}, None),
        (lease("web"), None, {}, None),  # not retained: the ordinary verdict's business
    ],
)
def test_retention_verdict(
    held: Lease, pod: PodInfo | None, statefulsets: dict[str, range] | None, expected: str | None
) -> None:
    assert audit.retention_verdict(held, pod, statefulsets, NOW) == expected


def test_retained_leases_are_judged_by_retention_not_by_the_missing_pod() -> None:
    leases = {
        1: retained("db-0", "statefulset"),
        2: retained("db-1", "statefulset"),
        3: retained("x", until=OLD),
    }
    inv = Inventory([pool("p", "10.0.0.0/24", leases)], pods={}, statefulsets={"ns/db": range(1)})
    found = [
        (p.kind, p.address, p.detail, p.fix) for p in audit.audit(inv, NOW, GRACE) if p.kind == audit.LEAKED
    ]
    assert found == [
        ("leaked", "10.0.0.2", "statefulset-scaled-down", audit.RELEASE),
        ("leaked", "10.0.0.3", "sticky-expired", audit.RELEASE),
    ]
    # the file datastore (no pod list): expiry is still judged
    inv = Inventory([pool("p", "10.0.0.0/24", leases)])
    found = [(p.address, p.detail) for p in audit.audit(inv, NOW, GRACE) if p.kind == audit.LEAKED]
    assert found == [("10.0.0.3", "sticky-expired")]


def test_statefulset_index_reads_replicas_and_skips_ones_being_deleted() -> None:
    objs = [
        {"metadata": {"namespace": "a", "name": "db"}, "spec": {"replicas": 3}},
        {"metadata": {"namespace": "a", "name": "one"}, "spec": {}},
        {"metadata": {"namespace": "a", "name": "going", "deletionTimestamp": OLD}, "spec": {"replicas": 2}},
    ]
    assert audit.statefulset_index(objs) == {"a/db": range(3), "a/one": range(1)}


def test_statefulset_index_covers_the_ordinals_from_the_start_ordinal() -> None:
    objs = [{"metadata": {"namespace": "a", "name": "db"}, "spec": {"replicas": 2, "ordinals": {"start": 5}}}]
    covered = audit.statefulset_index(objs)
    assert covered == {"a/db": range(5, 7)}
    assert (
        audit.retention_verdict(retained("db-5", "statefulset"), None, {"ns/db": covered["a/db"]}, NOW)
        is None
    )
    assert audit.retention_verdict(
        retained("db-7", "statefulset"), None, {"ns/db": covered["a/db"]}, NOW
    ) == ("statefulset-scaled-down")
    assert audit.retention_verdict(
        retained("db-1", "statefulset"), None, {"ns/db": covered["a/db"]}, NOW
    ) == ("statefulset-scaled-down")
