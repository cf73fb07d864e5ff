"""Properties of ipam.audit over random inventories: repair never takes a live pod's lease, and what it
fixes stays fixed (two passes leave nothing fixable)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from ipam import audit
from ipam.allocator import Lease
from ipam.audit import Inventory, PodInfo, Reservation
from ipam.store.base import PoolSnapshot

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
STAMPS = [
    "",
    (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    (NOW - timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ"),
]
PODS = [f"ns/p{i}" for i in range(5)]
POOLS = [("10.0.0.0-28", "10.0.0.0/28"), ("10.0.0.0-29", "10.0.0.0/29"), ("net-10.0.0.0-28", "10.0.0.0/28")]
GRACE = 300.0

leases = st.builds(
    Lease,
    id=st.sampled_from(["c0", "c1", "c2", "c3"]),
    podref=st.sampled_from([*PODS, ""]),
    ifname=st.sampled_from(["net1", "net2"]),
    poduid=st.sampled_from(["", "u0", "u1"]),
    created=st.sampled_from(STAMPS),
)
pools = st.tuples(*[st.dictionaries(st.integers(0, 18), leases, max_size=6) for _ in POOLS])
pods = st.dictionaries(
    st.sampled_from(PODS),
    st.builds(
        PodInfo,
        uid=st.sampled_from(["", "u0", "u1"]),
        phase=st.sampled_from(["Running", "Pending", "Succeeded"]),
        deleting=st.booleans(),
        created=st.just(NOW - timedelta(hours=2)),
        ips=st.none(),
    ),
)
reservations = st.lists(
    st.builds(
        Reservation,
        name=st.sampled_from([f"{p}10.0.0.{i}" for p in ("", "net-") for i in range(12)]),
        holder=leases.map(lambda lease: Lease(lease.id, lease.podref, lease.ifname)),
        created=st.sampled_from([None, NOW - timedelta(hours=1), NOW - timedelta(seconds=5)]),
        version=st.just("1"),
    ),
    max_size=8,
    unique_by=lambda r: r.name,
)


def apply_fixes(inv: Inventory, problems: list[audit.Problem]) -> Inventory:
    """What the repair pass writes, applied to the inventory."""
    allocations = {p.name: dict(p.allocations) for p in inv.pools}
    held = {r.name: r for r in inv.reservations}
    for p in problems:
        if p.fix == audit.RELEASE:
            assert p.holding is not None
            h = p.holding
            del allocations[h.pool.name][h.offset]
            r = held.get(h.reservation)
            if r is not None and r.holder.held_by_container(h.lease.id, h.lease.ifname):
                del held[h.reservation]
        elif p.fix == audit.DELETE_RESERVATION:
            assert p.reservation is not None
            held.pop(p.reservation.name, None)
        elif p.fix == audit.CREATE_RESERVATION:
            assert p.holding is not None
            lease = p.holding.lease
            held[p.holding.reservation] = Reservation(
                p.holding.reservation, Lease(lease.id, lease.podref, lease.ifname), NOW, "2"
            )
    snapshots = [PoolSnapshot(p.name, p.cidr, allocations[p.name], "1") for p in inv.pools]
    return Inventory(snapshots, list(held.values()), inv.slice_pools, inv.pods, inv.nodes)


@settings(max_examples=300, deadline=None)
@given(pools=pools, pods=pods, reservations=reservations)
def test_repair_never_takes_a_live_lease_and_converges(
    pools: tuple[dict[int, Lease], ...], pods: dict[str, PodInfo], reservations: list[Reservation]
) -> None:
    inv = Inventory(
        [PoolSnapshot(name, cidr, leases, "1") for (name, cidr), leases in zip(POOLS, pools, strict=True)],
        reservations,
        pods=pods,
    )
    for _ in range(2):
        problems = audit.audit(inv, NOW, GRACE)
        for p in problems:
            assert p.kind in audit.KINDS
            if p.fix == audit.RELEASE:
                assert p.holding is not None
                lease, pod = p.holding.lease, pods.get(p.holding.lease.podref)
                live = (
                    audit.holder_is_live(lease, pod)
                    and pod is not None
                    and pod.phase not in audit.TERMINAL_PHASES
                )
                assert not live, (lease, pod)
                assert lease.created != STAMPS[2]  # younger than the grace: never released
            if p.fix == audit.DELETE_RESERVATION:
                assert p.reservation is not None and p.reservation.created == NOW - timedelta(hours=1)
        inv = apply_fixes(inv, problems)
    assert [p for p in audit.audit(inv, NOW, GRACE) if p.fix] == []
