"""ipamctl check --whereabouts-compat: a Go Whereabouts cluster (objects built as Whereabouts writes them,
tests/whereabouts_format.py) reports nothing when whereabouts-py reads it the same, and each kind of
difference when it would not: the judgement alone (ipam/compat.py), then on the real kube-apiserver."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from ipam import compat
from ipam.ctl import main as ctl_main
from ipam.ranges import pool_name, reservation_name
from tests import whereabouts_format as wf
from tests.kubeapi.real import RealKube

NS = "tenant-a"


def clean_cluster(ns: str = NS) -> dict[str, list[dict[str, Any]]]:
    """A Whereabouts cluster whereabouts-py reads exactly as Whereabouts does: an IPv4 network, a
    named IPv6 one, a node-sliced one, their pools, leases and reservations."""
    return {
        "nads": [
            wf.nad(
                ns,
                "storage",
                {"type": "whereabouts", "range": "192.168.2.224/28", "gateway": "192.168.2.225"},
            ),
            wf.nad(
                ns,
                "v6",
                {
                    "type": "whereabouts",
                    "range": "fd00:10::/120",
                    "network_name": "blue",
                    "log_level": "debug",
                },
            ),
            wf.nad(
                ns,
                "sliced",
                {
                    "type": "whereabouts",
                    "range": "10.40.0.0/22",
                    "node_slice_size": "/24",
                    "network_name": "big",
                },
            ),
            wf.nad(ns, "other", {"type": "host-local", "subnet": "10.9.0.0/24"}),
        ],
        "pools": [
            wf.ippool(
                "192.168.2.224/28", {2: ("c1", f"{ns}/web-0", "net1"), 3: ("c2", f"{ns}/web-1", "net1")}
            ),
            wf.ippool("fd00:10::/120", {1: ("c3", f"{ns}/v6-0", "net1")}, network_name="blue"),
            wf.ippool("10.40.1.0/24", {1: ("c4", f"{ns}/big-0", "net1")}, network_name="big", node="node-a"),
        ],
        "reservations": [
            wf.reservation("192.168.2.226", "c1", f"{ns}/web-0"),
            wf.reservation("192.168.2.227", "c2", f"{ns}/web-1"),
            wf.reservation("fd00:10::1", "c3", f"{ns}/v6-0", network_name="blue"),
            wf.reservation("10.40.1.1", "c4", f"{ns}/big-0", network_name="big"),
        ],
        "node_slices": [wf.node_slice_pool("big", "10.40.0.0/22", "/24", {"node-a": "10.40.1.0/24"})],
    }


def differing_cluster(ns: str = NS) -> dict[str, list[dict[str, Any]]]:
    """The clean cluster plus one instance of every kind of difference."""
    c = clean_cluster(ns)
    c["nads"] += [
        wf.nad(
            ns,
            "old-style",
            {
                "type": "whereabouts",
                "range": "192.168.3.0/24",
                "range_start": "192.168.4.10",
                "kubernetes": {"kubeconfig": "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
                "leader_lease_duration": 1500,
                "reconciler_cron_expression": "30 4 * * *",
                "addresses": [{"address": "192.168.3.5/24"}],
            },
        ),
        wf.nad(ns, "loud", {"type": "whereabouts", "range": "192.168.5.0/24", "log_level": "trace"}),
        # network_name "fd00" + 650::/120 and fd00:650::/120 both name IPPool fd00-650---120
        wf.nad(ns, "collide-a", {"type": "whereabouts", "range": "650::/120", "network_name": "fd00"}),
        wf.nad(ns, "collide-b", {"type": "whereabouts", "range": "fd00:650::/120"}),
        wf.nad(
            ns,
            "resliced",
            {
                "type": "whereabouts",
                "range": "10.50.0.0/22",
                "node_slice_size": "/25",
                "network_name": "wide",
            },
        ),
    ]
    c["pools"] += [
        wf.ippool("192.168.6.0/28", {0: ("c5", f"{ns}/edge", "net1"), 4: ("c6", "", "net1")}),
    ]
    c["reservations"] += [
        wf.reservation("192.168.6.4", "c6", f"{ns}/x") | {"metadata": {"name": "not-an-address"}}
    ]
    c["node_slices"] += [wf.node_slice_pool("wide", "10.50.0.0/22", "/24", {})]
    return c


def judge(c: dict[str, list[dict[str, Any]]]) -> list[compat.Finding]:
    return compat.judge(compat.Cluster(c["nads"], c["pools"], c["reservations"], c["node_slices"]))


def test_whereabouts_names_are_ours() -> None:
    """The format builders follow Whereabouts' own rules, which are whereabouts-py's names."""
    from netaddr import IPAddress

    for cidr, nn in (
        ("192.168.2.224/28", ""),
        ("fd00:10::/120", "blue"),
        ("fd00::/64", ""),
        ("650::/120", "fd00"),
    ):
        assert wf.ippool_name(cidr, nn) == pool_name(cidr, nn)
    for ip, nn in (("192.168.2.226", ""), ("fd00::", "x"), ("fd00:10::1", "blue")):
        assert wf.normalize_ip(ip, nn) == reservation_name(IPAddress(ip), nn)


def test_a_clean_whereabouts_cluster_reports_nothing() -> None:
    assert judge(clean_cluster()) == []


def test_each_kind_of_difference_is_reported_once_where_it_is() -> None:
    found = judge(differing_cluster())
    got = {(f.kind, f.subject) for f in found}
    nad = f"NetworkAttachmentDefinition {NS}/"
    assert got == {
        (compat.NODE_ONLY, nad + "old-style"),
        (compat.IGNORED, nad + "old-style"),
        (compat.STATIC, nad + "old-style"),
        (compat.BOUNDS, nad + "old-style"),
        (compat.REFUSED, nad + "loud"),
        (compat.AMBIGUOUS, "IPPool fd00-650---120"),
        (compat.LEASE_OUT, "IPPool 192.168.6.0-28"),
        (compat.NO_PODREF, "IPPool 192.168.6.0-28"),
        (compat.BAD_RESERVATION, "OverlappingRangeIPReservation not-an-address"),
        (compat.SLICES_DIFFER, "NodeSlicePool wide"),
    }, found
    assert {f.kind for f in found} == set(compat.KINDS) - {compat.UNREADABLE_POOL}
    details = {f.kind: f.detail for f in found if f.subject == nad + "old-style" and f.kind != compat.IGNORED}
    assert "ipam.kubernetes is a node setting" in details[compat.NODE_ONLY]
    assert "ipam.range_start 192.168.4.10 is outside range 192.168.3.0/24" in details[compat.BOUNDS]
    ignored = sorted(f.detail.split()[0] for f in found if f.kind == compat.IGNORED)
    assert ignored == ["ipam.leader_lease_duration", "ipam.reconciler_cron_expression"]
    [refused] = [f for f in found if f.kind == compat.REFUSED]
    assert refused.detail.startswith(
        "whereabouts-py refuses it (code 7): invalid config: ipam.log_level: 'trace'"
    )
    [ambiguous] = [f for f in found if f.kind == compat.AMBIGUOUS]
    assert "network_name 'fd00' with range 650::/120" in ambiguous.detail
    assert "network_name '' with range fd00:650::/120" in ambiguous.detail


def test_the_bound_whereabouts_ignores_is_not_also_reported_as_refused() -> None:
    """Without the bound the config is valid: only the bound is reported; with another fault too, both."""
    one = wf.nad(NS, "n", {"type": "whereabouts", "range": "10.1.0.0/24", "range_end": "10.2.0.9"})
    assert [f.kind for f in judge({**clean_cluster(), "nads": [one]})] == [compat.BOUNDS]
    two = wf.nad(
        NS, "n", {"type": "whereabouts", "range": "10.1.0.0/24", "range_end": "10.2.0.9", "gateway": "x"}
    )
    assert [f.kind for f in judge({**clean_cluster(), "nads": [two]})] == [compat.REFUSED, compat.BOUNDS]


def test_a_pool_recording_another_range_than_its_name_and_the_nads_reading() -> None:
    c = clean_cluster()
    c["pools"][0]["spec"]["range"] = "192.168.2.240/28"  # name 192.168.2.224-28
    subjects = [(f.kind, f.subject) for f in judge(c)]
    assert subjects == [(compat.AMBIGUOUS, "IPPool 192.168.2.224-28")] * 2


def test_a_reservation_name_two_networks_read_as_their_address() -> None:
    """network_name fd00 with 650::/64 and none with fd00:650::/120: pool names differ, but fd00:650::5
    and 650::5 of the other network are both reservation fd00-650--5."""
    nads = [
        wf.nad(NS, "a", {"type": "whereabouts", "range": "650::/64", "network_name": "fd00"}),
        wf.nad(NS, "b", {"type": "whereabouts", "range": "fd00:650::/120"}),
    ]
    taken = wf.reservation("fd00:650::5", "c1", f"{NS}/p")
    assert taken["metadata"]["name"] == wf.normalize_ip("650::5", "fd00") == "fd00-650--5"
    found = judge({"nads": nads, "pools": [], "reservations": [taken], "node_slices": []})
    assert [(f.kind, f.subject) for f in found] == [
        (compat.AMBIGUOUS, "OverlappingRangeIPReservation fd00-650--5")
    ]
    assert "650::5 of network_name 'fd00'; fd00:650::5 of network_name ''" in found[0].detail
    alone = judge({"nads": nads[1:], "pools": [], "reservations": [taken], "node_slices": []})
    assert alone == []


def test_unreadable_pools_are_reported() -> None:
    c = clean_cluster()
    c["pools"][0]["spec"]["allocations"]["x1"] = {"id": "c9", "podref": "a/b"}
    c["pools"][1]["spec"]["range"] = "not-a-range"
    found = judge(c)
    assert [(f.kind, f.subject) for f in found] == [
        (compat.UNREADABLE_POOL, "IPPool 192.168.2.224-28"),
        (compat.UNREADABLE_POOL, "IPPool blue-fd00-10---120"),
    ]
    assert "allocation key 'x1' is not a decimal offset" in found[0].detail


def test_conflists_and_other_ipam_types() -> None:
    conflist = {
        "cniVersion": "1.0.0",
        "name": "chained",
        "plugins": [
            {
                "type": "macvlan",
                "ipam": {"type": "whereabouts", "range": "10.7.0.0/24", "log_file": "/tmp/x"},
            },
            {"type": "tuning"},
        ],
    }
    obj = {"metadata": {"namespace": NS, "name": "chained"}, "spec": {"config": json.dumps(conflist)}}
    found = judge({**clean_cluster(), "nads": [obj]})
    assert [(f.kind, f.subject) for f in found] == [
        (compat.NODE_ONLY, f"NetworkAttachmentDefinition {NS}/chained")
    ]
    bad = {"metadata": {"namespace": NS, "name": "b"}, "spec": {"config": "{not json"}}
    assert judge({**clean_cluster(), "nads": [bad]}) == []


# ---- on the real kube-apiserver ------------------------------------------------------------------


def run_ctl(kube: RealKube, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(["--kubeconfig", kube.kubeconfig_path, *args], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def plant(kube: RealKube, c: dict[str, list[dict[str, Any]]]) -> None:
    wf.install_nad_crd(kube)
    wf.create(kube, [o for objs in c.values() for o in objs])


def compat_json(kube: RealKube) -> tuple[int, dict[str, Any]]:
    code, out, err = run_ctl(
        kube, "check", "--whereabouts-compat", "--nad-namespace", kube.namespace, "--json"
    )
    assert out, err
    return code, json.loads(out)


def test_real_server_clean_whereabouts_cluster_reports_nothing(real_kube: RealKube) -> None:
    plant(real_kube, clean_cluster(real_kube.namespace))
    code, doc = compat_json(real_kube)
    assert (code, doc["findings"], doc["summary"]) == (0, [], {})
    assert doc["checked"] == {
        "network_attachment_definitions": 4,
        "whereabouts_networks": 3,
        "ippools": 3,
        "reservations": 4,
        "node_slice_pools": 1,
    }
    code, out, _ = run_ctl(real_kube, "check", "--whereabouts-compat", "--nad-namespace", real_kube.namespace)
    assert code == 0
    assert out.strip().endswith(f"in {real_kube.namespace}: nothing whereabouts-py reads differently")


def test_real_server_reports_each_kind_of_difference(real_kube: RealKube) -> None:
    ns = real_kube.namespace
    c = differing_cluster(ns)
    plant(real_kube, c)
    code, doc = compat_json(real_kube)
    assert code == 1
    expected = judge(c)
    assert doc["findings"] == [f.to_json() for f in expected]
    assert set(doc["summary"]) == set(compat.KINDS) - {compat.UNREADABLE_POOL}
    code, out, _ = run_ctl(real_kube, "check", "--whereabouts-compat", "--nad-namespace", ns)
    assert code == 1
    lines = out.splitlines()
    pairs = [(lines[i].split(None, 1), lines[i + 1]) for i in range(0, 2 * len(expected), 2)]
    assert pairs == [([f.kind, f.subject], f"  {f.detail}") for f in expected]
    assert lines[2 * len(expected)] == ""
    assert lines[-1].endswith(f"in {ns}: " + " ".join(f"{k}={n}" for k, n in doc["summary"].items()))


def test_real_server_every_namespaces_nads_are_read_by_default(real_kube: RealKube) -> None:
    other = real_kube.namespace + "-apps"
    real_kube.cluster.ensure_namespace(other)
    wf.install_nad_crd(real_kube)
    bad = wf.nad(other, "legacy", {"type": "whereabouts", "range": "10.8.0.0/24", "log_file": "/tmp/w.log"})
    wf.create(real_kube, [bad])
    code, out, _ = run_ctl(real_kube, "check", "--whereabouts-compat", "--json")
    subjects = [f["subject"] for f in json.loads(out)["findings"]]
    assert code == 1 and f"NetworkAttachmentDefinition {other}/legacy" in subjects
    code, out, _ = run_ctl(real_kube, "check", "--whereabouts-compat", "--nad-namespace", real_kube.namespace)
    assert code == 0, out


def test_file_datastore_is_refused_clearly(tmp_path: Any) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(
        ["--datastore", "file", "--data-dir", str(tmp_path), "check", "--whereabouts-compat"], out, err
    )
    assert code == 2
    assert "--whereabouts-compat reads a Kubernetes cluster" in err.getvalue()


@pytest.mark.parametrize("kind", compat.KINDS)
def test_every_kind_is_named_in_the_migration_guide(kind: str) -> None:
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "migrate-from-whereabouts.md").read_text()
    assert f"| `{kind}` |" in guide
