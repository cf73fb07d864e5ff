"""The reconciler's judgement of one lease, without any API server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from ipam.allocator import Lease
from ipam.reconcile import PodInfo, network_prefix, pod_index, verdict
from ipam.store.base import PoolSnapshot

NOW = datetime(2026, 11, 29, 12, 0, 0, tzinfo=UTC)
OLD = (NOW - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
FRESH = (NOW - timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
GRACE = 300.0


def pod(
    phase: str = "Running",
    uid: str = "u1",
    ips: frozenset[str] | None = None,
    created: str = OLD,
    deleting: bool = False,
) -> PodInfo:
    return PodInfo(uid, phase, deleting, datetime.fromisoformat(created.replace("Z", "+00:00")), ips)


LEASE = Lease("ctr1", "ns/p", "net1", node="n1", poduid="u1", created=OLD)


@pytest.mark.parametrize(
    ("lease", "info", "expected"),
    [
        (LEASE, None, "pod-gone"),
        (LEASE, pod(uid="u2"), "pod-replaced"),
        (Lease("ctr1", "ns/p", "net1"), pod(uid="u2"), None),  # no uid recorded: cannot tell
        (LEASE, pod(phase="Succeeded"), "pod-succeeded"),
        (LEASE, pod(phase="Failed"), "pod-failed"),
        (LEASE, pod(ips=frozenset({"10.0.0.1"})), None),  # listed in network-status
        (LEASE, pod(ips=frozenset({"10.0.0.9"})), "not-in-network-status"),
        (LEASE, pod(ips=None), None),  # no annotation: nothing to compare
        (
            Lease("ctr1", "ns/p", "net1", poduid="u1", created=FRESH),
            pod(ips=frozenset()),
            None,
        ),  # young lease
        (LEASE, pod(ips=frozenset(), created=FRESH), None),  # young pod
        (Lease("ctr1", "ns/p", "net1", poduid="u1"), pod(ips=frozenset()), None),  # lease age unknown
        (LEASE, pod(phase="Pending", ips=frozenset()), None),  # still being created
        (LEASE, pod(ips=frozenset(), deleting=True), None),
        (Lease("ctr1", "", "net1"), None, None),  # no pod reference: never judged
    ],
)
def test_verdict(lease: Lease, info: PodInfo | None, expected: str | None) -> None:
    assert verdict(lease, "10.0.0.1", info, NOW, GRACE) == expected


def test_pod_index_reads_network_status_and_metadata() -> None:
    status = [{"name": "ns/public", "interface": "net1", "ips": ["10.0.0.1", "fd00::1"]}, {"name": "cluster"}]
    pods = [
        {
            "metadata": {
                "namespace": "ns",
                "name": "p",
                "uid": "u1",
                "creationTimestamp": OLD,
                "annotations": {"k8s.v1.cni.cncf.io/network-status": json.dumps(status)},
            },
            "status": {"phase": "Running"},
        },
        {
            "metadata": {
                "namespace": "ns",
                "name": "q",
                "uid": "u2",
                "deletionTimestamp": OLD,
                "annotations": {"k8s.v1.cni.cncf.io/network-status": "{not json"},
            },
            "status": {"phase": "Running"},
        },
    ]
    index = pod_index(pods)
    assert index["ns/p"].ips == frozenset({"10.0.0.1", "fd00::1"})
    assert index["ns/p"].uid == "u1" and not index["ns/p"].deleting
    assert index["ns/q"].ips is None and index["ns/q"].deleting


@pytest.mark.parametrize(
    ("name", "cidr", "prefix"),
    [
        ("10.0.0.0-24", "10.0.0.0/24", ""),
        ("public-10.0.0.0-24", "10.0.0.0/24", "public"),
        ("my-net-fd00---64", "fd00::/64", "my-net"),
    ],
)
def test_network_prefix_recovered_from_pool_name(name: str, cidr: str, prefix: str) -> None:
    assert network_prefix(PoolSnapshot(name, cidr, {}, "1")) == prefix
