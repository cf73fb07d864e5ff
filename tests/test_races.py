"""Races that could lose an acknowledged lease or give one address to two pods (issue 15, items 1-8).

Each test pins the interleaving with a hook (a runner, a store method that pauses or acts between
a read and the write it decides), or injects the fault (a lost answer, a failing reservation), so it
fails the same way every run without the fix. Kubernetes items run on the API test server where a
fault is needed, and on the real kube-apiserver (`real_kube`) for the behaviour.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from ipam import errors
from ipam.agent import Agent, Coalescer, Metrics
from ipam.allocator import Allocations, Lease, Request
from ipam.cni import run as cni_run
from ipam.config import IPAMConfig, load_config
from ipam.engine import Engine, RetryPolicy
from ipam.errors import CNIError, TransientStoreError
from ipam.ranges import RangeSpec, build_range, pool_name
from ipam.reconcile import FileSource, PodInfo, Reconciler, verdict
from ipam.reconcile import main as reconcile_main
from ipam.shim import DEFAULT_TIMEOUT, WORK_MARGIN, forward
from ipam.store.base import PoolSnapshot
from ipam.store.file import FileStore
from ipam.store.kubernetes import REQUEST_TIMEOUT, KubernetesStore
from tests.cni_exec import opt_in_flat_file
from tests.kubeapi.fixtures import KubeHandle
from tests.kubeapi.real import RealKube
from tests.kubeapi.schema import whereabouts_crds
from tests.test_engine import FakeClock, FlakyStore, addresses, engine_for, leases, req

OLD = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def store(tmp_path: Path) -> FlakyStore:
    return FlakyStore(str(tmp_path / "data"))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- 1. agent rollback vs direct-mode fallback ----------------------------------------------------


def test_agent_rollback_spares_the_lease_its_direct_mode_fallback_confirmed(
    store: FlakyStore, clock: FakeClock
) -> None:
    """The agent wrote range 1 and is stuck on range 2; the shim gives up and direct mode runs the
    whole ADD (finding range 1's lease) and answers; then the agent hits its deadline and rolls back.
    The rollback must leave the lease direct mode reported."""
    first, second = build_range("ipam", "10.0.0.0/24"), build_range("ipam", "fd00::/120")
    direct = engine_for(store, clock)
    agent = engine_for(store, clock)
    answered: list[str] = []

    def agent_runner(engine: Engine, name: str, cidr: str, ops: list[Any], deadline: float) -> None:
        if name == pool_name(second.cidr) and not answered:
            answered.extend(addresses(direct.add([first, second], req(1))))  # the fallback, meanwhile
            raise CNIError(errors.TRY_AGAIN_LATER, "agent: gave up on range 2")
        Engine.apply_batch(engine, name, cidr, ops, deadline)

    agent.runner = agent_runner
    with pytest.raises(CNIError):
        agent.add([first, second], req(1))
    assert answered == ["10.0.0.1", "fd00::1"]
    assert [lease.id for lease in leases(store, first).values()] == ["c1"]
    assert [lease.id for lease in leases(store, second).values()] == ["c1"]
    assert store.reservation_names() == ["10.0.0.1", "fd00--1"]
    # so the next pod does not get the address direct mode handed out
    assert addresses(direct.add([first, second], req(2))) == ["10.0.0.2", "fd00::2"]


class Stalling:
    """The agent's node lock for one pool waits until `release` is set, then times out (its deadline)."""

    stall_pool = ""
    stalled: threading.Event
    release: threading.Event

    def stall(self, pool: str) -> None:
        self.stall_pool, self.stalled, self.release = pool, threading.Event(), threading.Event()

    def pool_lock(self, name: str, timeout: float) -> Any:
        if name == self.stall_pool and not self.stalled.is_set():
            self.stalled.set()
            assert self.release.wait(10)
            raise CNIError(errors.TRY_AGAIN_LATER, f"timed out waiting for the node lock of pool {name}")
        return super().pool_lock(name, timeout)  # type: ignore[misc]


class StallingFileStore(Stalling, FileStore):
    pass


class StallingKubernetesStore(Stalling, KubernetesStore):
    pass


V4_65, V6_65 = "10.65.0.0/24", "fd00:65::/120"


def _agent_and_fallback(ipam: dict[str, Any], store: Any, key: tuple[str, str, str]) -> None:
    """The same ADD through the agent (stalled on range 2, then failing) and in-process (the shim's
    fallback, answered meanwhile): the addresses the fallback answered with stay leased."""
    ipam = {**ipam, "type": "whereabouts-py", "ipRanges": [{"range": V4_65}, {"range": V6_65}]}
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": ipam})
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "net1",
           "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p1", "NODENAME": "n1"}  # fmt: skip
    agent = Agent()
    store.stall(pool_name(V6_65))
    agent.cache.stores[key] = store
    replies: list[dict[str, Any]] = []
    agent_call = threading.Thread(
        target=lambda: replies.append(agent.serve_call({"env": env, "stdin": stdin}))
    )
    agent_call.start()
    assert store.stalled.wait(10)  # the agent wrote range 1 and waits for range 2's lock
    out = io.StringIO()
    assert cni_run(env, stdin.encode(), out) == 0, out.getvalue()  # direct mode: the shim gave up
    answered = [ip["address"] for ip in json.loads(out.getvalue())["ips"]]
    store.release.set()
    agent_call.join(20)
    assert replies[0]["code"] != 0  # the agent failed and rolled back what it still owned: nothing
    assert answered == ["10.65.0.1/24", "fd00:65::1/120"]
    for cidr in (V4_65, V6_65):
        assert [lease.id for lease in store.read_pool(pool_name(cidr), cidr).allocations.values()] == ["c1"]
    assert sorted(r["metadata"]["name"] for r in store.list_reservations()) == ["10.65.0.1", "fd00-65--1"]
    agent.close()


def test_agent_call_and_its_direct_mode_fallback_through_cni(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    _agent_and_fallback({"datastore": "file", "data_dir": data}, StallingFileStore(data), ("file", "", data))


def test_agent_call_and_its_direct_mode_fallback_on_the_real_server(
    real_kube: RealKube, tmp_path: Path
) -> None:
    data, kubeconfig = str(tmp_path / "node"), real_kube.kubeconfig_path
    ipam = {"datastore": "kubernetes", "kubernetes": {"kubeconfig": kubeconfig}, "data_dir": data}
    store = StallingKubernetesStore.connect(kubeconfig, str(tmp_path / "node" / "locks"))
    _agent_and_fallback(ipam, store, ("kubernetes", kubeconfig, data))


def test_shim_waits_longer_than_any_agent_call_can_take() -> None:
    limit = next(m.le for m in IPAMConfig.model_fields["retry_deadline_seconds"].metadata if hasattr(m, "le"))
    assert sum(REQUEST_TIMEOUT) <= WORK_MARGIN
    assert limit + RetryPolicy().rollback_seconds + WORK_MARGIN <= DEFAULT_TIMEOUT
    assert DEFAULT_TIMEOUT < 240  # kubelet's sandbox timeout


def test_agent_fits_its_deadline_inside_the_wait_the_shim_announces(tmp_path: Path) -> None:
    ipam = {
        "range": "10.0.0.0/24",
        "datastore": "file",
        "data_dir": str(tmp_path),
        "retry_deadline_seconds": 200,
    }
    stdin = json.dumps({"cniVersion": "1.0.0", "name": "n", "ipam": ipam}).encode()
    cfg = load_config(stdin, flat_search=[opt_in_flat_file()])
    agent = Agent()
    with agent.engines(cfg, 60.0) as engine:
        assert engine.policy.deadline_seconds + engine.policy.rollback_seconds + WORK_MARGIN <= 60.0
    with agent.engines(cfg, DEFAULT_TIMEOUT) as engine:
        assert engine.policy.deadline_seconds == 200
    agent.close()


def test_shim_tells_the_agent_how_long_it_waits(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    seen: list[dict[str, Any]] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(json.loads(conn.makefile("rb").readline()))
            conn.sendall(json.dumps({"code": 0, "stdout": ""}).encode())

    thread = threading.Thread(target=serve)
    thread.start()
    assert forward({"CNI_COMMAND": "ADD"}, b"{}", path, 42.0) == (0, "")
    thread.join(10)
    server.close()
    assert seen[0]["timeout"] == 42.0


# -- 2. a re-ADD without K8S_POD_UID vs the reconciler ---------------------------------------------


def test_re_add_without_pod_uid_leaves_no_uid_to_judge_by(store: FlakyStore, clock: FakeClock) -> None:
    spec = build_range("ipam", "10.0.0.0/24")
    engine = engine_for(store, clock)
    engine.add([spec], Request("c1", "net1", "ns/web-0", poduid="uid-old", node="n1", created=OLD))
    engine.add([spec], Request("c2", "net1", "ns/web-0", node="n1"))  # recreated pod, runtime sent no UID
    [lease] = leases(store, spec).values()
    assert lease.poduid == ""
    live = PodInfo(uid="uid-new", phase="Pending", deleting=False, created=None, ips=None)
    assert verdict(lease, "10.0.0.1", live, datetime.now(UTC), 300.0) is None


def test_reconciler_keeps_a_recreated_pods_lease_re_added_without_uid(
    real_kube: RealKube, tmp_path: Path
) -> None:
    ns = real_kube.namespace
    store = KubernetesStore.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=30))
    spec = build_range("ipam", "10.60.0.0/24")
    old = real_kube.api.put_pod(ns, "web-0")
    engine.add([spec], Request("ctr-1", "net1", f"{ns}/web-0", poduid=old["metadata"]["uid"], created=OLD))
    real_kube.api.delete_pod(ns, "web-0")
    new = real_kube.api.put_pod(ns, "web-0", phase="Pending")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    engine.add([spec], Request("ctr-2", "net1", f"{ns}/web-0", created=OLD))  # no K8S_POD_UID
    out = io.StringIO()
    assert reconcile_main(["--kubeconfig", real_kube.kubeconfig_path, "--grace", "0"], out=out) == 0
    assert "release " not in out.getvalue(), out.getvalue()
    [lease] = store.read_pool(pool_name(spec.cidr), spec.cidr).allocations.values()
    assert lease.id == "ctr-2" and lease.poduid == ""
    store.close()


# -- 3. CNI GC across networks sharing a pool --------------------------------------------------------


def test_gc_of_one_network_keeps_another_networks_leases_in_the_shared_pool(
    store: FlakyStore, clock: FakeClock
) -> None:
    spec = build_range("ipam", "10.0.0.0/24")
    net_a = engine_for(store, clock, network="net-a")
    net_b = engine_for(store, clock, network="net-b")
    net_a.add([spec], Request("a1", "net1", "ns/a1", node="n1"))
    net_b.add([spec], Request("b1", "net2", "ns/b1", node="n1"))
    net_a.add([spec], Request("a2", "net1", "ns/a2", node="n1"))
    gone = net_a.gc([spec], {("a1", "net1")}, "n1")  # net-a's runtime lists only net-a's attachments
    assert addresses(gone) == ["10.0.0.3"]
    assert sorted(lease.id for lease in leases(store, spec).values()) == ["a1", "b1"]
    assert store.reservation_names() == ["10.0.0.1", "10.0.0.2"]


def test_cni_gc_records_and_honours_the_config_name(tmp_path: Path) -> None:
    def conf(name: str, extra: dict[str, Any] | None = None) -> bytes:
        ipam = {
            "type": "whereabouts-py",
            "range": "10.0.0.0/24",
            "datastore": "file",
            "data_dir": str(tmp_path),
        }
        return json.dumps({"cniVersion": "1.1.0", "name": name, "ipam": ipam, **(extra or {})}).encode()

    def call(command: str, container: str, stdin: bytes) -> str:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": "/x", "CNI_IFNAME": container,
               "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={container}", "NODENAME": "n1"}  # fmt: skip
        out = io.StringIO()
        assert cni_run(env, stdin, out) == 0, out.getvalue()
        return out.getvalue()

    call("ADD", "a1", conf("storage-a"))
    call("ADD", "b1", conf("storage-b"))
    call("GC", "unused", conf("storage-a", {"cni.dev/valid-attachments": []}))
    pool = FileStore(str(tmp_path)).read_pool(pool_name("10.0.0.0/24"), "10.0.0.0/24").allocations
    assert [(lease.id, lease.network) for lease in pool.values()] == [("b1", "storage-b")]


def test_cni_gc_across_networks_on_the_real_server(real_kube: RealKube, tmp_path: Path) -> None:
    """The CRD declares `attrs` (holding `network`), so the API server keeps it and GC can tell the networks apart."""

    def conf(name: str, extra: dict[str, Any] | None = None) -> bytes:
        ipam = {"type": "whereabouts-py", "range": "10.64.0.0/24", "datastore": "kubernetes",
                "kubernetes": {"kubeconfig": real_kube.kubeconfig_path}, "data_dir": str(tmp_path)}  # fmt: skip
        return json.dumps({"cniVersion": "1.1.0", "name": name, "ipam": ipam, **(extra or {})}).encode()

    def call(command: str, container: str, stdin: bytes) -> None:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": "/x", "CNI_IFNAME": container,
               "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={container}", "NODENAME": "n1"}  # fmt: skip
        out = io.StringIO()
        assert cni_run(env, stdin, out) == 0, out.getvalue()

    call("ADD", "a1", conf("storage-a"))
    call("ADD", "b1", conf("storage-b"))
    call("GC", "unused", conf("storage-a", {"cni.dev/valid-attachments": []}))
    [pool] = real_kube.api.objects("ippools", real_kube.namespace)
    leases = [Lease.from_json(v) for v in pool["spec"]["allocations"].values()]
    assert [(lease.id, lease.network) for lease in leases] == [("b1", "storage-b")]
    names = [
        r["metadata"]["name"]
        for r in real_kube.api.objects("overlappingrangeipreservations", real_kube.namespace)
    ]
    assert names == ["10.64.0.2"]


# -- 4. file datastore: reservation ownership changes are atomic -----------------------------------


class PausingFileStore(FileStore):
    """Pauses one chosen thread right after it read a reservation's holder."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.pause_thread: threading.Thread | None = None
        self.paused = threading.Event()
        self.resume = threading.Event()
        self.locking: threading.Event | None = None

    def _read_reservation(self, path: Path) -> Lease | None:
        holder = super()._read_reservation(path)
        if threading.current_thread() is self.pause_thread:
            self.pause_thread = None
            self.paused.set()
            assert self.resume.wait(10)
        return holder

    def _reservation_lock(self, name: str) -> Any:
        if self.locking is not None:  # the takeover reached the lock (and will wait there)
            self.locking.set()
        return super()._reservation_lock(name)


def test_del_of_the_old_container_cannot_delete_the_new_containers_reservation(tmp_path: Path) -> None:
    """c1's DEL reads the holder (c1); pod p's new container c2 takes the address over; c1's DEL must
    not then delete c2's reservation (an overlapping pool would hand the address out again)."""
    store = PausingFileStore(str(tmp_path / "data"))
    name = "10.9.0.1"
    assert store.reserve(name, Lease("c1", "ns/p", "net1")) is None
    takeover_progress = threading.Event()
    store.locking = takeover_progress
    deleting = threading.Thread(target=store.unreserve, args=(name, "c1", "net1"))
    store.pause_thread = deleting
    deleting.start()
    assert store.paused.wait(10)
    results: list[Lease | None] = []

    def take_over() -> None:
        results.append(store.reserve(name, Lease("c2", "ns/p", "net1")))
        takeover_progress.set()

    taking = threading.Thread(target=take_over)
    taking.start()
    assert takeover_progress.wait(10)  # the takeover is done, or waits for the lock c1's DEL holds
    store.resume.set()
    deleting.join(10)
    taking.join(10)
    assert results == [None]
    assert store._read_reservation(store._reservation_path(name)) == Lease("c2", "ns/p", "net1")
    # an overlapping pool therefore does not get 10.9.0.1
    engine = Engine(store, RetryPolicy(deadline_seconds=5))
    assert addresses(engine.add([build_range("ipam", "10.9.0.0/30")], req(9))) == ["10.9.0.2"]


def test_file_reservations_list_and_delete_by_version(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "data"))
    store.reserve("10.9.0.1", Lease("c1", "ns/p", "net1"))
    [listed] = store.list_reservations()
    assert listed["metadata"]["name"] == "10.9.0.1" and listed["spec"]["containerid"] == "c1"
    version = listed["metadata"]["resourceVersion"]
    store.reserve("10.9.0.1", Lease("c2", "ns/p", "net1"))  # taken over since it was listed
    from ipam.errors import ConflictError

    with pytest.raises(ConflictError):
        store.delete_reservation("10.9.0.1", version)
    [again] = store.list_reservations()
    store.delete_reservation("10.9.0.1", again["metadata"]["resourceVersion"])
    assert store.list_reservations() == []
    store.delete_reservation("10.9.0.1", "1")  # gone already: fine


# -- 5. orphaned reservations on the file datastore -------------------------------------------------


class CrashingUnreserve(FlakyStore):
    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.crash = False

    def unreserve(self, name: str, container_id: str, ifname: str) -> None:
        if self.crash:
            self.crash = False
            raise KeyboardInterrupt("killed after the pool write")
        super().unreserve(name, container_id, ifname)


def test_a_del_retried_after_dying_past_its_pool_write_still_unreserves(
    tmp_path: Path, clock: FakeClock
) -> None:
    store = CrashingUnreserve(str(tmp_path / "data"))
    spec = build_range("ipam", "10.9.0.0/24")
    engine = engine_for(store, clock)
    engine.add([spec], req(1))
    store.crash = True
    with pytest.raises(KeyboardInterrupt):
        engine.release([spec], "c1", "net1")
    assert leases(store, spec) == {} and store.reservation_names() == ["10.9.0.1"]
    assert engine.release([spec], "c1", "net1") == []  # the runtime's retry: nothing left in the pool
    assert store.reservation_names() == []
    other = engine_for(store, clock)
    assert addresses(other.add([build_range("ipam", "10.9.0.0/30")], req(2))) == ["10.9.0.1"]


def test_del_by_holder_leaves_other_holders_and_networks_alone(store: FlakyStore, clock: FakeClock) -> None:
    spec = build_range("ipam", "10.9.0.0/24")
    engine_for(store, clock).add([spec], req(1))
    engine_for(store, clock, network_name="blue").add([spec], Request("c9", "net1", "ns/p9"))
    store.reserve("10.9.0.9", Lease("c9", "ns/p9", "net1"))  # the same holder outside this DEL's range
    store.reserve("10.9.0.5", Lease("c9", "ns/p9", "net1"))  # ...and an orphan inside it
    engine = engine_for(store, clock)
    assert engine.release([build_range("ipam", "10.9.0.0/29")], "c9", "net1") == []
    assert store.reservation_names() == ["10.9.0.1", "10.9.0.9", "blue-10.9.0.1"]


def test_a_re_add_that_moves_a_lease_gives_back_its_old_reservation(
    store: FlakyStore, clock: FakeClock
) -> None:
    engine = engine_for(store, clock)
    assert addresses(engine.add([build_range("ipam", "10.9.0.0/24")], req(1))) == ["10.9.0.1"]
    moved = build_range("ipam", "10.9.0.0/24", exclude=["10.9.0.1"])
    assert addresses(engine.add([moved], req(1))) == ["10.9.0.2"]
    assert store.reservation_names() == ["10.9.0.2"]


def test_the_orphan_sweep_runs_on_the_file_datastore(tmp_path: Path, clock: FakeClock) -> None:
    store = FileStore(str(tmp_path / "data"))
    spec = build_range("ipam", "10.9.0.0/24")
    engine_for(store, clock).add([spec], req(1))
    store.reserve("10.9.0.5", Lease("gone", "ns/gone", "net1", created=OLD))  # backed by no lease
    summary = Reconciler(FileSource(store), grace=60.0, dry_run=False, out=io.StringIO()).run_once()
    assert summary.reservations_deleted == 1 and summary.errors == 0
    assert [r["metadata"]["name"] for r in store.list_reservations()] == ["10.9.0.1"]


# -- 6. agent batches: each op its own outcome -----------------------------------------------------


class GatedStore(FileStore):
    """The next pool read waits for `gate`; reservations for container `refuse` fail."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.gate: threading.Event | None = None
        self.waiting = threading.Event()
        self.refuse = ""

    def read_pool(self, name: str, cidr: str) -> PoolSnapshot:
        gate, self.gate = self.gate, None
        if gate is not None:
            self.waiting.set()
            assert gate.wait(10)
        return super().read_pool(name, cidr)

    def reserve(self, name: str, lease: Lease, address: str = "") -> Lease | None:
        if lease.id == self.refuse:
            raise CNIError(errors.DATASTORE_ERROR, f"injected: reservation {name} refused")
        return super().reserve(name, lease, address)


def test_one_ops_reservation_failure_is_that_ops_alone(tmp_path: Path) -> None:
    store = GatedStore(str(tmp_path / "data"))
    spec = build_range("ipam", "10.9.0.0/24")
    coalescer = Coalescer(Metrics())
    engine = Engine(store, RetryPolicy(deadline_seconds=20), runner=coalescer.run)
    engine.add([spec], req(0))  # the DEL's lease
    gate = threading.Event()
    store.gate, store.refuse = gate, "bad"
    outcome: dict[str, Any] = {}

    def call(key: str, fn: Any, *args: Any) -> None:
        try:
            outcome[key] = fn(*args)
        except CNIError as exc:
            outcome[key] = exc

    first = threading.Thread(target=call, args=("first", engine.add, [spec], req(1)))
    first.start()
    assert store.waiting.wait(10)  # the first batch is in flight: the next three queue up as one batch
    batch = [
        threading.Thread(target=call, args=("good", engine.add, [spec], req(2))),
        threading.Thread(target=call, args=("bad", engine.add, [spec], Request("bad", "net1", "ns/bad"))),
        threading.Thread(target=call, args=("del", engine.release, [spec], "c0", "net1")),
    ]
    for t in batch:
        t.start()
    [q] = coalescer.queues.values()
    for _ in range(1000):  # bounded: until the three tickets are queued behind the first batch
        if q.qsize() == 3:
            break
        time.sleep(0.005)
    assert q.qsize() == 3
    gate.set()
    for t in [first, *batch]:
        t.join(20)
    assert isinstance(outcome["bad"], CNIError) and "injected" in outcome["bad"].msg
    assert not isinstance(outcome["first"], CNIError) and not isinstance(outcome["good"], CNIError)
    assert addresses(outcome["del"]) == ["10.9.0.1"]
    held = {lease.id: str(spec.address_at(o)) for o, lease in leases(store, spec).items()}
    assert held == {"c1": addresses(outcome["first"])[0], "c2": addresses(outcome["good"])[0]}
    assert sorted(r["metadata"]["name"] for r in store.list_reservations()) == sorted(held.values())


# -- 7. Kubernetes reservation takeover racing the old holder's delete --------------------------------


class TakeoverRacingStore(KubernetesStore):
    """Between reading a reservation and replacing it, the old holder's DEL deletes it (once)."""

    race = False

    def _get_reservation(self, name: str) -> dict[str, Any] | None:
        obj = super()._get_reservation(name)
        if self.race and obj is not None:
            self.race = False
            self.delete_reservation(name, str(obj["metadata"]["resourceVersion"]))
        return obj


def _takeover_racing_delete(kubeconfig: str, lock_dir: Path) -> tuple[KubernetesStore, list[dict[str, Any]]]:
    store = TakeoverRacingStore.connect(kubeconfig, str(lock_dir))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    spec = build_range("ipam", "10.61.0.0/24")
    assert addresses(engine.add([spec], Request("old-ctr", "net1", "apps/p"))) == ["10.61.0.1"]
    store.race = True
    assert addresses(engine.add([spec], Request("new-ctr", "net1", "apps/p"))) == ["10.61.0.1"]
    assert not store.race  # the interleaving happened
    return store, store.list_reservations()


def test_takeover_racing_the_old_holders_delete_retries_on_the_test_server(
    kube: KubeHandle, tmp_path: Path
) -> None:
    store, reservations = _takeover_racing_delete(kube.kubeconfig_path, tmp_path / "locks")
    assert [(r["metadata"]["name"], r["spec"]["containerid"]) for r in reservations] == [
        ("10.61.0.1", "new-ctr")
    ]
    store.close()


def test_takeover_racing_the_old_holders_delete_retries(real_kube: RealKube, tmp_path: Path) -> None:
    store, reservations = _takeover_racing_delete(real_kube.kubeconfig_path, tmp_path / "locks")
    assert [(r["metadata"]["name"], r["spec"]["containerid"]) for r in reservations] == [
        ("10.61.0.1", "new-ctr")
    ]
    store.close()


# -- 8. a lost write response --------------------------------------------------------------------------


R1 = build_range("ipam", "10.62.0.0/24")
R2 = build_range("ipam", "10.63.0.0/32")  # one address


def _kube_pool(store: KubernetesStore, spec: RangeSpec) -> Allocations:
    return store.read_pool(pool_name(spec.cidr), spec.cidr).allocations


def _reservation_names(store: KubernetesStore) -> list[str]:
    return sorted(r["metadata"]["name"] for r in store.list_reservations())


def test_lost_answer_to_an_add_write_is_still_rolled_back(kube: KubeHandle, tmp_path: Path) -> None:
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    engine.add([R1], Request("other", "net1", "apps/other"))  # the pool exists: the next write is a PUT
    engine.add([R2], Request("filler", "net1", "apps/filler"))  # range 2 is full
    kube.api.set_faults(drop_after_rate=1.0, methods={"PUT"}, resources={"ippools"}, max_hits=1)
    with pytest.raises(CNIError) as info:
        engine.add([R1, R2], Request("x", "net1", "apps/x"))
    assert info.value.code == errors.POOL_EXHAUSTED
    assert kube.api.fault_hits >= 1  # the answer of range 1's write was lost
    assert [lease.id for lease in _kube_pool(store, R1).values()] == ["other"]
    assert _reservation_names(store) == ["10.62.0.1", "10.63.0.0"]
    store.close()


def test_lost_answer_to_a_del_write_still_unreserves(kube: KubeHandle, tmp_path: Path) -> None:
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    engine.add([R1], Request("y", "net1", "apps/y"))
    kube.api.set_faults(drop_after_rate=1.0, methods={"PUT"}, resources={"ippools"}, max_hits=1)
    gone = engine.release([R1], "y", "net1")
    assert addresses(gone) == ["10.62.0.1"]
    assert _kube_pool(store, R1) == {}
    assert _reservation_names(store) == []
    store.close()


def test_rollback_stays_all_or_nothing_when_a_foreign_crd_prunes_the_token(
    kube: KubeHandle, tmp_path: Path
) -> None:
    """Whereabouts' CRD applied over ours drops `token`: a failed ADD still removes what it created."""
    kube.api.use_crds(whereabouts_crds())
    store = KubernetesStore.connect(kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    engine.add([R1], Request("other", "net1", "apps/other"))
    engine.add([R2], Request("filler", "net1", "apps/filler"))
    with pytest.raises(CNIError):
        engine.add([R1, R2], Request("x", "net1", "apps/x"))
    assert [lease.id for lease in _kube_pool(store, R1).values()] == ["other"]
    assert _reservation_names(store) == ["10.62.0.1", "10.63.0.0"]
    store.close()


class LosingAnswers(KubernetesStore):
    """The next pool write is carried out, then its answer is lost (a dropped connection)."""

    lose = False

    def write_pool(self, snapshot: PoolSnapshot, allocations: Allocations) -> None:
        super().write_pool(snapshot, allocations)
        if self.lose:
            self.lose = False
            raise TransientStoreError("update IPPool: ProtocolError: Connection aborted")


def test_lost_answers_on_the_real_server(real_kube: RealKube, tmp_path: Path) -> None:
    store = LosingAnswers.connect(real_kube.kubeconfig_path, str(tmp_path / "locks"))
    engine = Engine(store, RetryPolicy(deadline_seconds=20))
    engine.add([R1], Request("other", "net1", "apps/other"))
    engine.add([R2], Request("filler", "net1", "apps/filler"))
    store.lose = True
    with pytest.raises(CNIError):
        engine.add([R1, R2], Request("x", "net1", "apps/x"))
    assert [lease.id for lease in _kube_pool(store, R1).values()] == ["other"]
    assert _reservation_names(store) == ["10.62.0.1", "10.63.0.0"]
    store.lose = True
    assert addresses(engine.release([R1], "other", "net1")) == ["10.62.0.1"]
    assert _reservation_names(store) == ["10.63.0.0"]
    store.close()


def test_lost_answers_on_the_file_datastore(store: FlakyStore, clock: FakeClock) -> None:
    engine = engine_for(store, clock)
    original = store.write_pool
    lose = [True]

    def write(snapshot: PoolSnapshot, allocations: Allocations) -> None:
        original(snapshot, allocations)
        if lose and lose.pop():
            raise TransientStoreError("answer lost")

    store.write_pool = write  # type: ignore[method-assign]
    assert addresses(engine.add([R1], req(1))) == ["10.62.0.1"]
    assert not lose and store.reservation_names() == ["10.62.0.1"]
    lose[:] = [True]
    assert addresses(engine.release([R1], "c1", "net1")) == ["10.62.0.1"]
    assert not lose and leases(store, R1) == {}
    assert store.reservation_names() == []
