"""The same datastore contract, run against the file and the Kubernetes datastores.

Both must give the engine identical semantics: conditional writes, create races, reservations,
Whereabouts-format leases and unknown lease fields kept on rewrite.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import Lease, Request
from ipam.engine import Engine, RetryPolicy
from ipam.errors import CNIError, ConflictError
from ipam.ranges import build_range, pool_name
from ipam.store.base import Store
from ipam.store.file import FileStore

GROUP, VERSION = "whereabouts.cni.cncf.io", "v1alpha1"


class Backend:
    """A datastore under test plus a way to plant raw pool objects the way another writer would."""

    def __init__(self, kind: str, store: Store, seed: Callable[[str, str, dict[str, Any]], None]) -> None:
        self.kind = kind
        self.store = store
        self.seed = seed


@pytest.fixture(
    params=["file", "kubernetes", pytest.param("kubernetes-apiserver", marks=pytest.mark.apiserver)]
)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        fstore = FileStore(str(tmp_path / "data"))

        def seed_file(name: str, cidr: str, allocations: dict[str, Any]) -> None:
            fstore.pools.mkdir(parents=True, exist_ok=True)
            doc = {
                "metadata": {"name": name, "resourceVersion": "7"},
                "spec": {"range": cidr, "allocations": allocations},
            }
            (fstore.pools / f"{name}.json").write_text(json.dumps(doc))

        yield Backend("file", fstore, seed_file)
        return
    # the test server, or the real kube-apiserver with the plugin's own ServiceAccount (deploy/rbac.yaml)
    kube = request.getfixturevalue("kube" if request.param == "kubernetes" else "real_kube")
    from kubernetes import client, config

    from ipam.store.kubernetes import KubernetesStore

    kstore = KubernetesStore.connect(kube.plugin_kubeconfig(), str(tmp_path / "locks"))
    assert kstore.namespace == kube.namespace
    api_client = config.new_client_from_config(config_file=kube.kubeconfig_path)  # admin: plants pools
    api = client.CustomObjectsApi(api_client)

    def seed_kube(name: str, cidr: str, allocations: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "IPPool",
            "metadata": {"name": name, "namespace": kstore.namespace},
            "spec": {"range": cidr, "allocations": allocations},
        }
        api.create_namespaced_custom_object(GROUP, VERSION, kstore.namespace, "ippools", body)

    yield Backend("kubernetes", kstore, seed_kube)
    kstore.close()
    api_client.close()


def engine_for(backend: Backend, network_name: str = "") -> Engine:
    return Engine(backend.store, RetryPolicy(deadline_seconds=10), network_name=network_name, network="net")


def req(n: int, ifname: str = "net1", node: str = "node-a") -> Request:
    return Request(container_id=f"ctr{n}", ifname=ifname, podref=f"default/pod{n}", node=node)


SPEC = build_range("ipam", "10.40.0.0/29", exclude=["10.40.0.2"])


def test_first_add_creates_the_pool_and_takes_the_first_usable(backend: Backend) -> None:
    engine = engine_for(backend)
    [assigned] = engine.add([SPEC], req(1))
    assert str(assigned.address) == "10.40.0.1"
    snapshot = backend.store.read_pool(pool_name(SPEC.cidr), SPEC.cidr)
    assert snapshot.version is not None
    assert snapshot.cidr == "10.40.0.0/29"
    assert snapshot.allocations[1].podref == "default/pod1"
    assert snapshot.allocations[1].node == "node-a"


def test_lowest_free_skips_exclude_and_refills_released(backend: Backend) -> None:
    engine = engine_for(backend)
    got = [str(engine.add([SPEC], req(n))[0].address) for n in range(1, 4)]
    assert got == ["10.40.0.1", "10.40.0.3", "10.40.0.4"]
    released = engine.release([SPEC], "ctr2", "net1")
    assert [str(a.address) for a in released] == ["10.40.0.3"]
    assert str(engine.add([SPEC], req(9))[0].address) == "10.40.0.3"


def test_repeat_add_is_idempotent_and_updates_container_id(backend: Backend) -> None:
    engine = engine_for(backend)
    first = engine.add([SPEC], req(1))[0].address
    again = engine.add([SPEC], Request("ctr1-new", "net1", "default/pod1", node="node-a"))[0].address
    assert again == first
    snapshot = backend.store.read_pool(pool_name(SPEC.cidr), SPEC.cidr)
    assert len(snapshot.allocations) == 1
    assert snapshot.allocations[1].id == "ctr1-new"


def test_release_of_unknown_changes_nothing(backend: Backend) -> None:
    engine = engine_for(backend)
    engine.add([SPEC], req(1))
    before = backend.store.read_pool(pool_name(SPEC.cidr), SPEC.cidr)
    assert engine.release([SPEC], "nope", "net1") == []
    assert engine.release([build_range("ipam", "10.41.0.0/24")], "nope", "net1") == []  # no pool at all
    after = backend.store.read_pool(pool_name(SPEC.cidr), SPEC.cidr)
    assert after.version == before.version and after.allocations == before.allocations


def test_stale_write_is_a_conflict(backend: Backend) -> None:
    engine = engine_for(backend)
    engine.add([SPEC], req(1))
    name = pool_name(SPEC.cidr)
    stale = backend.store.read_pool(name, SPEC.cidr)
    fresh = backend.store.read_pool(name, SPEC.cidr)
    backend.store.write_pool(fresh, {**fresh.allocations, 3: Lease("ctr3", "default/pod3", "net1")})
    with pytest.raises(ConflictError):
        backend.store.write_pool(stale, {**stale.allocations, 4: Lease("ctr4", "default/pod4", "net1")})
    final = backend.store.read_pool(name, SPEC.cidr)
    assert sorted(final.allocations) == [1, 3]


def test_losing_create_race_is_a_conflict(backend: Backend) -> None:
    name = pool_name("10.42.0.0/24")
    a = backend.store.read_pool(name, "10.42.0.0/24")
    b = backend.store.read_pool(name, "10.42.0.0/24")
    assert a.version is None and b.version is None
    backend.store.write_pool(a, {1: Lease("ctrA", "default/a", "net1")})
    with pytest.raises(ConflictError):
        backend.store.write_pool(b, {1: Lease("ctrB", "default/b", "net1")})
    assert backend.store.read_pool(name, "10.42.0.0/24").allocations[1].id == "ctrA"


def test_reservations_belong_to_one_attachment(backend: Backend) -> None:
    store = backend.store
    mine = Lease("ctr1", "default/pod1", "net1")
    assert store.reserve("10.43.0.5", mine) is None
    assert store.reserve("10.43.0.5", mine) is None  # repeat by the same attachment
    holder = store.reserve("10.43.0.5", Lease("ctr2", "default/pod2", "net1"))
    assert holder is not None and holder.podref == "default/pod1"
    # the same pod recreated (new container id) takes its reservation over
    assert store.reserve("10.43.0.5", Lease("ctr1b", "default/pod1", "net1")) is None
    store.unreserve("10.43.0.5", "ctr1", "net1")  # old container: not the holder any more
    holder = store.reserve("10.43.0.5", Lease("ctr2", "default/pod2", "net1"))
    assert holder is not None and holder.id == "ctr1b"
    store.unreserve("10.43.0.5", "ctr1b", "net1")
    assert store.reserve("10.43.0.5", Lease("ctr2", "default/pod2", "net1")) is None
    store.unreserve("10.43.0.99", "ctrX", "net1")  # unknown: fine


def test_overlapping_pools_never_share_an_address(backend: Backend) -> None:
    engine = engine_for(backend)
    wide = build_range("ipam", "10.44.0.0/24")
    narrow = build_range("ipam", "10.44.0.0/28")
    a = engine.add([wide], req(1))[0].address
    b = engine.add([narrow], req(2))[0].address
    c = engine.add([wide], req(3))[0].address
    assert len({a, b, c}) == 3
    engine.release([wide], "ctr1", "net1")
    assert engine.add([narrow], req(4))[0].address == a  # its reservation went with the DEL


def test_network_name_is_a_separate_address_space(backend: Backend) -> None:
    spec = build_range("ipam", "10.45.0.0/24")
    a = engine_for(backend, "public").add([spec], req(1))[0].address
    b = engine_for(backend, "cluster").add([spec], req(2))[0].address
    assert a == b
    names = {p.name for p in backend.store.list_pools()}
    assert {"public-10.45.0.0-24", "cluster-10.45.0.0-24"} <= names


def test_whereabouts_format_leases_are_honoured(backend: Backend) -> None:
    # written by Whereabouts: offsets from the network address, no node/created, an unknown field
    name = pool_name("10.46.0.0/24")
    backend.seed(
        name,
        "10.46.0.0/24",
        {
            "1": {"id": "wb-ctr1", "podref": "rook-ceph/osd-0", "ifname": "net1"},
            "2": {"id": "wb-ctr2", "podref": "rook-ceph/osd-1", "ifname": "net1", "futureField": "x"},
        },
    )
    engine = engine_for(backend)
    spec = build_range("ipam", "10.46.0.0/24")
    assert str(engine.add([spec], req(1))[0].address) == "10.46.0.3"
    # an existing Whereabouts pod re-adding gets its old address
    same = engine.add([spec], Request("wb-ctr1-again", "net1", "rook-ceph/osd-0"))[0]
    assert str(same.address) == "10.46.0.1"
    # GC never releases leases without a node
    assert engine.gc([spec], valid=set(), node="node-a") != []  # ours (pod1, node-a) goes
    left = backend.store.read_pool(name, "10.46.0.0/24").allocations
    assert sorted(left) == [1, 2]
    if backend.kind == "file":  # both API servers prune fields the CRD does not declare
        assert left[2].extra.get("futureField") == "x"


def test_exhaustion_is_code_100_naming_the_range(backend: Backend) -> None:
    engine = engine_for(backend)
    tiny = build_range("ipam", "10.47.0.0/30")
    engine.add([tiny], req(1))
    engine.add([tiny], req(2))
    with pytest.raises(CNIError) as info:
        engine.add([tiny], req(3))
    assert info.value.code == 100 and "10.47.0.0/30" in info.value.msg
    assert len(backend.store.read_pool(pool_name(tiny.cidr), tiny.cidr).allocations) == 2
