"""Faults on the real kube-apiserver + etcd: an API server restart in the middle of a burst of ADDs,
an etcd outage during ADDs, and an IPPool too large for etcd to store.

Every test asserts the same invariants: no address handed out twice, no acknowledged lease lost,
and every ADD answered either with an address or with code 11 (try again later). These tests restart
shared processes, so they run on a cluster of their own (`fault_cluster`), never the session's.
The CNI calls are the real executable with the plugin's own ServiceAccount (deploy/rbac.yaml).
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam import errors
from tests.cni_exec import Call, cni_env, finish, run, start
from tests.kubeapi.fixtures import running_cluster
from tests.kubeapi.real import RealCluster, RealKube

CIDR = "10.90.0.0/24"
POOL = "10.90.0.0-24"
ETCD_REQUEST_LIMIT = 1572864  # etcd's default --max-request-bytes (1.5 MiB)

pytestmark = pytest.mark.apiserver  # deselected with the rest of the real tier without KUBEBUILDER_ASSETS


@pytest.fixture(scope="module")
def fault_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """An etcd + kube-apiserver for this module only: its tests stop and restart them."""
    yield from running_cluster(tmp_path_factory.mktemp("fault-apiserver"))


@pytest.fixture
def fault_kube(fault_cluster: RealCluster, tmp_path: Path) -> RealKube:
    """A fresh namespace on the module's own cluster."""
    return RealKube(fault_cluster, f"f-{uuid.uuid4().hex[:10]}", tmp_path)


def netconf(kube: RealKube, tmp: Path, node: str, deadline: float = 120) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "faults",
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": CIDR,
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": kube.plugin_kubeconfig()},
            "data_dir": str(tmp / node),  # each simulated node has its own lock directory
            "log_file": str(tmp / "ipam.log"),
            "log_level": "debug",
            "retry_deadline_seconds": deadline,
        },
    }


def start_burst(kube: RealKube, tmp: Path, count: int, nodes: int = 4) -> list[subprocess.Popen[str]]:
    confs = [netconf(kube, tmp, f"node-{n}") for n in range(nodes)]
    return [
        start(confs[i % nodes], cni_env("ADD", f"ctr{i:03d}", NODENAME=f"node-{i % nodes}"))
        for i in range(count)
    ]


def leases(kube: RealKube) -> dict[str, str]:
    """{container id: address} of the pool (read as admin)."""
    pools = [p for p in kube.api.objects("ippools", kube.namespace) if p["metadata"]["name"] == POOL]
    allocations = pools[0]["spec"]["allocations"] if pools else {}
    base = ipaddress.ip_address(CIDR.split("/")[0])
    return {v["id"]: str(base + int(k)) for k, v in allocations.items()}


def wait_for(what: str, ok: Callable[[], bool], polls: int = 1200, every: float = 0.05) -> None:
    """Poll `ok` a bounded number of times (an event, not a duration, ends the wait)."""
    for _ in range(polls):
        if ok():
            return
        time.sleep(every)
    pytest.fail(f"never happened: {what}")


def check_burst(kube: RealKube, tmp: Path, calls: list[Call]) -> None:
    """Every ADD got an address or code 11; distinct addresses; every acknowledged lease is stored;
    after DEL of the failed ones and a retry, the pool holds exactly the acknowledged leases."""
    acked: dict[str, str] = {}
    retry_later: list[str] = []
    for i, call in enumerate(calls):
        cid = f"ctr{i:03d}"
        assert call.stdout, f"{cid}: no answer on stdout (exit {call.code}): {call.stderr[-2000:]}"
        if call.code == 0:
            acked[cid] = call.result["ips"][0]["address"].split("/")[0]
        else:
            assert call.result["code"] == errors.TRY_AGAIN_LATER, (cid, call.stdout)
            retry_later.append(cid)
    assert len(set(acked.values())) == len(acked), sorted(acked.values())
    stored = leases(kube)
    for cid, address in acked.items():
        assert stored.get(cid) == address, (cid, address, stored.get(cid))
    # what a runtime does after a failed ADD: DEL, then ADD again
    for cid in retry_later:
        node = f"node-{int(cid[3:]) % 4}"
        assert run(netconf(kube, tmp, node), cni_env("DEL", cid, NODENAME=node)).code == 0
        again = run(netconf(kube, tmp, node), cni_env("ADD", cid, NODENAME=node))
        assert again.code == 0, again.stdout
        acked[cid] = again.result["ips"][0]["address"].split("/")[0]
    assert leases(kube) == acked
    assert len(set(acked.values())) == len(calls)
    reservations = {
        o["metadata"]["name"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }
    assert reservations == set(acked.values())


@pytest.mark.slow
def test_apiserver_restart_in_the_middle_of_40_concurrent_adds(
    fault_kube: RealKube, fault_cluster: RealCluster, tmp_path: Path
) -> None:
    procs = start_burst(fault_kube, tmp_path, 40)
    wait_for("5 leases written", lambda: len(leases(fault_kube)) >= 5, polls=6000)
    assert any(p.poll() is None for p in procs), "the burst finished before the restart"
    fault_cluster.restart_apiserver()  # stop (etcd keeps every object), start, wait for /readyz
    calls = [finish(p, timeout=600) for p in procs]
    check_burst(fault_kube, tmp_path, calls)


@pytest.mark.slow
def test_etcd_outage_during_adds(fault_kube: RealKube, fault_cluster: RealCluster, tmp_path: Path) -> None:
    log = tmp_path / "ipam.log"
    procs = start_burst(fault_kube, tmp_path, 20)
    wait_for("3 leases written", lambda: len(leases(fault_kube)) >= 3, polls=6000)
    assert any(p.poll() is None for p in procs), "the burst finished before the outage"
    offset = log.stat().st_size
    fault_cluster.stop_etcd()
    try:
        # storage stays down until a plugin has seen a failed request and gone back to retry
        def retried() -> bool:
            with log.open() as fh:
                fh.seek(offset)
                return any(json.loads(line).get("event") == "retry" for line in fh if line.endswith("\n"))

        wait_for("an ADD retrying against the storage outage", retried, polls=1200, every=0.05)
    finally:
        fault_cluster.start_etcd()
    fault_cluster.wait_crs_served()
    calls = [finish(p, timeout=600) for p in procs]
    check_burst(fault_kube, tmp_path, calls)


def whereabouts_pool(count: int) -> dict[str, Any]:
    """A pool as Whereabouts writes it (id, podref, ifname; no node: GC leaves these alone)."""
    allocations = {
        str(i): {"id": f"{i:064x}", "podref": f"tenant-{i % 50}/app-{i:08d}", "ifname": "net1"}
        for i in range(1, count + 1)
    }
    return {
        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
        "kind": "IPPool",
        "metadata": {"name": "10.91.0.0-16"},
        "spec": {"range": "10.91.0.0/16", "allocations": allocations},
    }


def test_pool_too_large_for_etcd_is_a_clear_error_not_a_retry(fault_kube: RealKube, tmp_path: Path) -> None:
    """A pool seeded ~1 kB below etcd's request limit: the ADDs that still fit succeed,
    the first that does not gets a final error naming the pool and what to do, and changes nothing."""
    kube = fault_kube
    base = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{kube.namespace}/ippools"
    kube.request("POST", base, whereabouts_pool(10_000))
    stored = kube.request("GET", f"{base}/10.91.0.0-16")
    # more Whereabouts leases whose podrefs (at most 320 bytes, as the CRD bounds them) fill the object
    # to ~1,000 bytes below the limit
    fillers = 0
    while (room := ETCD_REQUEST_LIMIT - 1000 - len(json.dumps(stored, separators=(",", ":")))) > 0:
        podref = "tenant-0/" + "f" * max(1, min(300, room - 60))
        stored["spec"]["allocations"][str(60000 + fillers)] = {
            "id": "filler",
            "podref": podref,
            "ifname": "net1",
        }
        fillers += 1
    stored = kube.request("PUT", f"{base}/10.91.0.0-16", stored)
    conf = netconf(kube, tmp_path, "node-a", deadline=60)
    conf["ipam"]["range"] = "10.91.0.0/16"
    answers = []
    for i in range(10):  # each of our leases adds ~300 bytes: by the fourth or so one cannot fit
        call = run(conf, cni_env("ADD", f"big{i}", NODENAME="node-a"))
        answers.append(call)
        if call.code != 0:
            break
    failed = answers[-1]
    assert failed.code != 0 and 1 <= len(answers) - 1 <= 8, [a.stdout for a in answers]
    result = failed.result
    assert result["code"] == errors.DATASTORE_ERROR, result
    assert "10.91.0.0-16" in result["msg"] and "too large" in result["msg"], result
    assert "node slices" in result["msg"], result
    # nothing half-done: the pool holds exactly the acknowledged leases, no reservation for the refused one
    after = kube.request("GET", f"{base}/10.91.0.0-16")["spec"]["allocations"]
    ours = {v["id"] for v in after.values() if v["id"].startswith("big")}
    assert ours == {f"big{i}" for i in range(len(answers) - 1)}
    assert len(after) == 10_000 + fillers + len(ours)
    reserved = {
        o["spec"]["containerid"] for o in kube.api.objects("overlappingrangeipreservations", kube.namespace)
    }
    assert f"big{len(answers) - 1}" not in reserved
