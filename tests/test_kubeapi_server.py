"""The Kubernetes API test server, driven by the official `kubernetes` client through a kubeconfig.

What the rest of the suite relies on: kube-apiserver's status codes and Status bodies, one global
resourceVersion, pruning by the CRDs in crds/, paging and selectors, and faults on demand.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from tests.kubeapi.fixtures import K8s, KubeHandle
from tests.kubeapi.schema import crd_documents, prune, structural_errors, whereabouts_crds

GROUP, VERSION, NS = "whereabouts.cni.cncf.io", "v1alpha1", "kube-system"
POOLS = "ippools"
ROOT = Path(__file__).resolve().parents[1]
CONFLICT_MESSAGE = (
    'Operation cannot be fulfilled on ippools.whereabouts.cni.cncf.io "{name}": the object has been '
    "modified; please apply your changes to the latest version and try again"
)


@pytest.fixture
def api_client(kube: KubeHandle) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    config.load_kube_config(config_file=kube.kubeconfig_path, client_configuration=configuration)
    with client.ApiClient(configuration) as api:
        yield api


@pytest.fixture
def crs(api_client: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api_client)


@pytest.fixture
def core(api_client: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api_client)


def pool(name: str, allocations: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "IPPool",
        "metadata": {"name": name, **meta},
        "spec": {"range": "10.0.0.0/24", "allocations": allocations or {}},
    }


def lease(container: str, pod: str = "apps/web-0", **extra: str) -> dict[str, str]:
    return {"id": container, "podref": pod, "ifname": "net1", **extra}


def status_of(exc: ApiException) -> dict[str, Any]:
    return json.loads(exc.body)


def create_pool(crs: client.CustomObjectsApi, name: str, **kw: Any) -> dict[str, Any]:
    return crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, pool(name, **kw))


# -- CRDs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((ROOT / "crds").glob("*.yaml")), ids=lambda p: p.name)
def test_crd_is_a_valid_structural_customresourcedefinition(path: Path) -> None:
    [doc] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    kubernetes_validate.validate(doc, "1.37.0", strict=True)  # raises on any schema violation
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1"
    assert doc["spec"]["group"] == GROUP and doc["spec"]["scope"] == "Namespaced"
    assert doc["metadata"]["name"] == f"{doc['spec']['names']['plural']}.{GROUP}"
    [version] = doc["spec"]["versions"]
    assert version["name"] == VERSION and version["served"] and version["storage"]
    assert structural_errors(version["schema"]["openAPIV3Schema"]) == []


def test_crds_declare_whereabouts_fields_and_ours() -> None:
    schemas = {
        d["spec"]["names"]["kind"]: d["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for d in crd_documents()
    }
    assert set(schemas) == {"IPPool", "OverlappingRangeIPReservation", "NodeSlicePool", "WriterTurn"}
    spec = schemas["IPPool"]["properties"]["spec"]
    assert set(spec["required"]) == {"range", "allocations"}
    # opaque to the API server: an object of at most 16,384 leases, one managedFields entry, each lease
    # kept as written (no schema per lease to prune, default or validate: a write costs half the CPU)
    allocations = spec["properties"]["allocations"]
    assert allocations["type"] == "object" and allocations["maxProperties"] == 16384
    assert allocations["x-kubernetes-map-type"] == "atomic"
    assert allocations["x-kubernetes-preserve-unknown-fields"] is True
    assert "additionalProperties" not in allocations and "properties" not in allocations
    # the lease fields are described instead, the previous version's separate ones too
    words = set(re.findall(r"[a-z]+", allocations["description"]))
    assert {
        "id",
        "podref",
        "ifname",
        "ipamclaimref",
        "attrs",
        "node",
        "poduid",
        "created",
        "network",
        "token",
    } <= words
    reservation = schemas["OverlappingRangeIPReservation"]["properties"]["spec"]
    assert reservation["required"] == ["podref"]
    assert {"containerid", "podref", "ifname", "ipamclaimref", "node", "created"} <= set(
        reservation["properties"]
    )
    slices = schemas["NodeSlicePool"]["properties"]
    assert set(slices["spec"]["properties"]) == {"range", "sliceSize"}
    item = slices["status"]["properties"]["allocations"]["items"]
    assert set(item["properties"]) == {"nodeName", "sliceRange"}
    turn = schemas["WriterTurn"]["properties"]["spec"]
    assert set(turn["required"]) == set(turn["properties"]) == {"holderIdentity", "leaseDurationSeconds"}


def test_a_non_structural_crd_is_refused(kube: KubeHandle) -> None:
    [doc] = [d for d in crd_documents() if d["spec"]["names"]["plural"] == POOLS]
    del doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["type"]
    with pytest.raises(ValueError, match="not structural"):
        kube.api.use_crds([doc])


# -- discovery ---------------------------------------------------------------------------------------


def test_discovery_lists_the_group_and_its_resources(api_client: client.ApiClient) -> None:
    assert client.VersionApi(api_client).get_code().major == "1"
    groups = client.ApisApi(api_client).get_api_versions().groups
    assert [g.preferred_version.group_version for g in groups if g.name == GROUP] == [f"{GROUP}/{VERSION}"]
    resources = client.CustomObjectsApi(api_client).get_api_resources(GROUP, VERSION).resources
    assert {r.name: (r.kind, r.namespaced) for r in resources} == {
        "ippools": ("IPPool", True),
        "overlappingrangeipreservations": ("OverlappingRangeIPReservation", True),
        "nodeslicepools": ("NodeSlicePool", True),
        "writerturns": ("WriterTurn", True),
    }
    core = client.CoreV1Api(api_client).get_api_resources().resources
    assert {"pods", "pods/status", "namespaces"} <= {r.name for r in core}


# -- CRUD and metadata ------------------------------------------------------------------------------


def test_create_get_list_replace_patch_delete(crs: client.CustomObjectsApi) -> None:
    created = create_pool(crs, "10.0.0.0-24", allocations={"1": lease("c1")}, labels={"net": "a"})
    meta = created["metadata"]
    assert created["kind"] == "IPPool" and created["apiVersion"] == f"{GROUP}/{VERSION}"
    assert meta["namespace"] == NS and meta["generation"] == 1
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}", meta["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert meta["resourceVersion"].isdigit()

    got = crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "10.0.0.0-24")
    assert got == created

    listed = crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS)
    assert listed["kind"] == "IPPoolList" and listed["apiVersion"] == f"{GROUP}/{VERSION}"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["10.0.0.0-24"]
    assert int(listed["metadata"]["resourceVersion"]) >= int(meta["resourceVersion"])

    got["spec"]["allocations"]["2"] = lease("c2", "apps/web-1")
    replaced = crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "10.0.0.0-24", got)
    assert int(replaced["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    assert replaced["metadata"]["generation"] == 2
    assert replaced["metadata"]["uid"] == meta["uid"]
    assert replaced["metadata"]["labels"] == {"net": "a"}
    assert set(replaced["spec"]["allocations"]) == {"1", "2"}

    # a write that changes nothing is not written: the resourceVersion stays
    same = crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "10.0.0.0-24", replaced)
    assert same["metadata"]["resourceVersion"] == replaced["metadata"]["resourceVersion"]

    merged = crs.patch_namespaced_custom_object(
        GROUP, VERSION, NS, POOLS, "10.0.0.0-24", {"spec": {"allocations": {"1": None}}}
    )
    assert set(merged["spec"]["allocations"]) == {"2"}
    rv = merged["metadata"]["resourceVersion"]
    patched = crs.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        POOLS,
        "10.0.0.0-24",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/spec/allocations/3", "value": lease("c3")},
        ],
        _content_type="application/json-patch+json",
    )
    assert set(patched["spec"]["allocations"]) == {"2", "3"}
    assert int(patched["metadata"]["resourceVersion"]) > int(rv)

    gone = crs.delete_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "10.0.0.0-24")
    assert gone == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": "10.0.0.0-24", "group": GROUP, "kind": POOLS, "uid": meta["uid"]},
    }
    with pytest.raises(ApiException) as info:
        crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "10.0.0.0-24")
    assert info.value.status == 404


def test_managed_fields_name_the_writer(crs: client.CustomObjectsApi) -> None:
    made = create_pool(crs, "p", allocations={"1": lease("c1")}, labels={"net": "a"})
    [entry] = made["metadata"]["managedFields"]
    assert entry["manager"] == "OpenAPI-Generator"  # the Python client's User-Agent, up to its first '/'
    assert (entry["operation"], entry["apiVersion"], entry["fieldsType"]) == (
        "Update",
        f"{GROUP}/{VERSION}",
        "FieldsV1",
    )
    assert entry["fieldsV1"] == {
        "f:metadata": {".": {}, "f:labels": {".": {}, "f:net": {}}},
        "f:spec": {
            ".": {},
            "f:allocations": {".": {}, "f:1": {".": {}, "f:id": {}, "f:ifname": {}, "f:podref": {}}},
            "f:range": {},
        },
    }
    made["metadata"]["managedFields"] = []  # what a body says about managedFields is not taken here
    made["spec"]["allocations"]["2"] = lease("c2")
    replaced = crs.replace_namespaced_custom_object(
        GROUP, VERSION, NS, POOLS, "p", made, field_manager="ipam"
    )
    assert [e["manager"] for e in replaced["metadata"]["managedFields"]] == ["OpenAPI-Generator", "ipam"]


def test_resource_versions_come_from_one_counter_across_kinds(
    crs: client.CustomObjectsApi, core: client.CoreV1Api
) -> None:
    versions = [int(create_pool(crs, f"p{i}")["metadata"]["resourceVersion"]) for i in range(3)]
    pod = core.create_namespaced_pod(NS, {"metadata": {"name": "x"}, "spec": {"containers": []}})
    versions.append(int(pod.metadata.resource_version))
    assert versions == sorted(versions) and len(set(versions)) == 4


def test_generate_name(crs: client.CustomObjectsApi) -> None:
    body = pool("")
    body["metadata"] = {"generateName": "pool-"}
    made = crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, body)
    assert re.fullmatch(r"pool-[bcdfghjklmnpqrstvwxz2456789]{5}", made["metadata"]["name"])


# -- errors: exact Status bodies ---------------------------------------------------------------------


def test_stale_resource_version_is_a_409_conflict(crs: client.CustomObjectsApi) -> None:
    old = create_pool(crs, "p")
    fresh = crs.patch_namespaced_custom_object(
        GROUP, VERSION, NS, POOLS, "p", {"spec": {"allocations": {"4": lease("c4")}}}
    )
    old["spec"]["allocations"]["5"] = lease("c5")
    with pytest.raises(ApiException) as info:
        crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", old)
    assert info.value.status == 409
    assert status_of(info.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": CONFLICT_MESSAGE.format(name="p"),
        "reason": "Conflict",
        "details": {"name": "p", "group": GROUP, "kind": POOLS},
        "code": 409,
    }
    # a merge patch naming a stale resourceVersion is refused the same way
    with pytest.raises(ApiException) as info:
        crs.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            POOLS,
            "p",
            {"metadata": {"resourceVersion": old["metadata"]["resourceVersion"]}},
        )
    assert status_of(info.value)["reason"] == "Conflict"
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p") == fresh


def test_put_without_resource_version_is_invalid_for_custom_resources(crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    with pytest.raises(ApiException) as info:
        crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", pool("p"))
    assert info.value.status == 422
    body = status_of(info.value)
    assert body["message"] == (
        'ippools.whereabouts.cni.cncf.io "p" is invalid: metadata.resourceVersion: '
        "Invalid value: 0x0: must be specified for an update"
    )
    assert body["details"]["kind"] == POOLS
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "message": "Invalid value: 0x0: must be specified for an update",
            "field": "metadata.resourceVersion",
        }
    ]


def test_duplicate_create_is_409_already_exists(crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    with pytest.raises(ApiException) as info:
        create_pool(crs, "p")
    assert info.value.status == 409
    assert status_of(info.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'ippools.whereabouts.cni.cncf.io "p" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "p", "group": GROUP, "kind": POOLS},
        "code": 409,
    }


def test_create_with_a_resource_version_is_refused(crs: client.CustomObjectsApi) -> None:
    """A body copied from a read object still carries its resourceVersion: etcd refuses to create it."""
    with pytest.raises(ApiException) as info:
        crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, pool("p", resourceVersion="5"))
    assert info.value.status == 500
    assert status_of(info.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "resourceVersion should not be set on objects to be created",
        "code": 500,
    }


def test_missing_objects_are_404_not_found(crs: client.CustomObjectsApi) -> None:
    for call in (
        lambda: crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "nope"),
        lambda: crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "nope", pool("nope")),
        lambda: crs.patch_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "nope", {"spec": {}}),
        lambda: crs.delete_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "nope"),
    ):
        with pytest.raises(ApiException) as info:
            call()
        assert info.value.status == 404
        assert status_of(info.value) == {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": 'ippools.whereabouts.cni.cncf.io "nope" not found',
            "reason": "NotFound",
            "details": {"name": "nope", "group": GROUP, "kind": POOLS},
            "code": 404,
        }


def test_create_in_a_missing_namespace_is_404_for_the_namespace(crs: client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as info:
        crs.create_namespaced_custom_object(GROUP, VERSION, "nowhere", POOLS, pool("p"))
    assert info.value.status == 404
    assert status_of(info.value)["message"] == 'namespaces "nowhere" not found'


def test_failed_json_patch_test_is_422_and_changes_nothing(crs: client.CustomObjectsApi) -> None:
    made = create_pool(crs, "p")
    with pytest.raises(ApiException) as info:
        crs.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            POOLS,
            "p",
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                {"op": "add", "path": "/spec/allocations/1", "value": lease("c1")},
            ],
            _content_type="application/json-patch+json",
        )
    assert info.value.status == 422
    assert status_of(info.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "the server rejected our request due to an error in our request",
        "reason": "Invalid",
        "details": {},
        "code": 422,
    }
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p") == made


def test_strategic_merge_patch_is_415_for_custom_resources(crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    with pytest.raises(ApiException) as info:
        crs.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            POOLS,
            "p",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert info.value.status == 415
    assert status_of(info.value)["reason"] == "UnsupportedMediaType"


def test_schema_violations_are_422_invalid_with_causes(crs: client.CustomObjectsApi) -> None:
    bad = pool("p")
    del bad["spec"]["range"], bad["spec"]["allocations"]
    with pytest.raises(ApiException) as info:
        crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, bad)
    assert info.value.status == 422
    body = status_of(info.value)
    assert body["reason"] == "Invalid"
    assert body["details"]["kind"] == "IPPool" and body["details"]["group"] == GROUP
    assert {(c["reason"], c["field"]) for c in body["details"]["causes"]} == {
        ("FieldValueRequired", "spec.range"),
        ("FieldValueRequired", "spec.allocations"),
    }
    assert body["message"].startswith('IPPool.whereabouts.cni.cncf.io "p" is invalid: [')

    typed = pool("p")
    typed["spec"]["range"] = 24
    with pytest.raises(ApiException) as info:
        crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, typed)
    assert status_of(info.value)["details"]["causes"] == [
        {
            "reason": "FieldValueTypeInvalid",
            "message": 'Invalid value: "integer": spec.range in body must be of type string: "integer"',
            "field": "spec.range",
        }
    ]
    assert crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS)["items"] == []


def test_names_must_be_rfc1123_subdomains(crs: client.CustomObjectsApi) -> None:
    with pytest.raises(ApiException) as info:
        create_pool(crs, "fd00-1--")  # an IPv6 name ending in "::" would end in "-"
    assert info.value.status == 422
    [cause] = status_of(info.value)["details"]["causes"]
    assert cause["field"] == "metadata.name" and "RFC 1123 subdomain" in cause["message"]


# -- pruning ------------------------------------------------------------------------------------------


def test_undeclared_fields_are_pruned_declared_ones_and_leases_kept(crs: client.CustomObjectsApi) -> None:
    """Outside `allocations` the schema prunes; inside it (preserve-unknown-fields) nothing is pruned,
    nulls included, as kube-apiserver does (test_a_lease_is_kept_as_written_and_the_plugin_reads_it)."""
    body = pool(
        "p",
        allocations={
            "7": lease("c7", node="node-a", poduid="u7", created="2026-01-01T00:00:00Z"),
            "8": lease("c8", attrs="node=node-a;token=t8"),
            "9": {"id": "c9", "podref": None, "deep": {"n": None, "l": [1, None]}},
        },
    )
    body["spec"]["allocations"]["7"]["bogus"] = "x"
    body["spec"]["extra"] = {"a": 1}
    body["status"] = {"anything": True}
    body["topLevel"] = 1
    made = crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, body)
    assert set(made) == {"apiVersion", "kind", "metadata", "spec"}
    assert made["spec"] == {
        "range": "10.0.0.0/24",
        "allocations": {
            "7": {
                "id": "c7",
                "podref": "apps/web-0",
                "ifname": "net1",
                "node": "node-a",
                "poduid": "u7",
                "created": "2026-01-01T00:00:00Z",
                "bogus": "x",
            },
            "8": {"id": "c8", "podref": "apps/web-0", "ifname": "net1", "attrs": "node=node-a;token=t8"},
            "9": {"id": "c9", "podref": None, "deep": {"n": None, "l": [1, None]}},
        },
    }
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p") == made


def test_prune_honours_maps_preserved_subtrees_and_nulls() -> None:
    schema = {
        "type": "object",
        "properties": {
            "keep": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "map": {
                "type": "object",
                "additionalProperties": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
            "list": {"type": "array", "items": {"type": "object", "properties": {"b": {"type": "string"}}}},
            "s": {"type": "string"},
            "n": {"type": "string", "nullable": True},
        },
    }
    value = {
        "keep": {"x": {"y": 1, "z": None}, "n": None},
        "map": {"k": {"a": "1", "z": 2}},
        "list": [{"b": "2", "c": 3}],
        "s": None,
        "n": None,
        "gone": 1,
    }
    assert prune(value, schema) == {
        "keep": {"x": {"y": 1, "z": None}, "n": None},  # nulls too, as kube-apiserver keeps them
        "map": {"k": {"a": "1"}},
        "list": [{"b": "2"}],
        "n": None,
    }


def test_whereabouts_crd_applied_over_ours_prunes_our_fields(
    kube: KubeHandle, crs: client.CustomObjectsApi
) -> None:
    kube.api.use_crds(whereabouts_crds(others_too=True))
    made = create_pool(
        crs,
        "p",
        allocations={"1": lease("c1", node="node-a", poduid="u1"), "2": lease("c2", attrs="node=node-a")},
    )
    assert made["spec"]["allocations"]["1"] == {"id": "c1", "podref": "apps/web-0", "ifname": "net1"}
    assert made["spec"]["allocations"]["2"] == {"id": "c2", "podref": "apps/web-0", "ifname": "net1"}
    reservation = crs.create_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        "overlappingrangeipreservations",
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OverlappingRangeIPReservation",
            "metadata": {"name": "10.0.0.1"},
            "spec": {"containerid": "c1", "podref": "apps/web-0", "ifname": "net1", "node": "node-a"},
        },
    )
    assert reservation["spec"] == {"containerid": "c1", "podref": "apps/web-0", "ifname": "net1"}
    kube.reset()  # ours again
    assert (
        create_pool(crs, "q", allocations={"1": lease("c1", node="n")})["spec"]["allocations"]["1"]["node"]
        == "n"
    )


def test_a_lease_is_kept_as_written_and_the_plugin_reads_it(k8s: K8s, tmp_path: Path) -> None:
    """Our CRD leaves `spec.allocations` opaque. On kube-apiserver (and the test server, which must
    agree) a lease of the previous version (the extras as separate fields) and one with fields nobody
    declares (nulls among them) come back exactly as written, on create and on read; the plugin
    reads the separate extras as the lease's own, and its next write packs them into `attrs` and keeps
    the unknown fields as they were."""
    from ipam.allocator import Lease
    from ipam.store.kubernetes import KubernetesStore

    configuration = client.Configuration()
    config.load_kube_config(config_file=k8s.kubeconfig_path, client_configuration=configuration)
    legacy = lease(
        "c1", node="node-a", poduid="u1", created="2026-01-01T00:00:00Z", network="net", token="t1"
    )
    unknown = {**lease("c2", "apps/web-1", attrs="node=node-a;zone=eu", ipamclaimref="apps/claim")}
    unknown["future"] = {"nested": [1, None], "flag": True, "gone": None}
    sent = {"1": legacy, "2": unknown}
    with client.ApiClient(configuration) as api:
        crs = client.CustomObjectsApi(api)
        made = crs.create_namespaced_custom_object(
            GROUP, VERSION, k8s.namespace, POOLS, pool("10.0.0.0-24", sent)
        )
        assert made["spec"]["allocations"] == sent
        assert crs.get_namespaced_custom_object(GROUP, VERSION, k8s.namespace, POOLS, "10.0.0.0-24") == made
        store = KubernetesStore.connect(k8s.kubeconfig_path, str(tmp_path / "locks"))
        try:
            read = store.read_pool("10.0.0.0-24", "10.0.0.0/24")
            assert read.allocations[1] == Lease(
                "c1", "apps/web-0", "net1", "node-a", "u1", "2026-01-01T00:00:00Z", "net", "t1"
            )
            assert read.allocations[2] == Lease("c2", "apps/web-1", "net1", node="node-a")
            assert read.allocations[2].extra == {"ipamclaimref": "apps/claim", "future": unknown["future"]}
            third = Lease("c3", "apps/web-2", "net1", node="node-b")
            written = store.write_pool(read, {**read.allocations, 3: third})
        finally:
            store.close()
        stored = crs.get_namespaced_custom_object(GROUP, VERSION, k8s.namespace, POOLS, "10.0.0.0-24")
    assert written is not None and written.allocations == {**read.allocations, 3: third}
    assert stored["spec"]["allocations"] == {
        "1": lease("c1", attrs="node=node-a;poduid=u1;created=2026-01-01T00:00:00Z;network=net;token=t1"),
        "2": unknown,
        "3": lease("c3", "apps/web-2", attrs="node=node-b"),
    }


def test_status_subresource_when_the_crd_declares_one(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    slices = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "NodeSlicePool",
        "metadata": {"name": "net"},
        "spec": {"range": "10.0.0.0/16", "sliceSize": "/24"},
        "status": {"allocations": [{"nodeName": "a", "sliceRange": "10.0.0.0/24"}]},
    }
    # ours, like Whereabouts', has no status subresource: status is an ordinary field, /status is 404
    made = crs.create_namespaced_custom_object(GROUP, VERSION, NS, "nodeslicepools", slices)
    assert made["status"] == slices["status"]
    with pytest.raises(ApiException) as info:
        crs.replace_namespaced_custom_object_status(GROUP, VERSION, NS, "nodeslicepools", "net", made)
    assert info.value.status == 404

    docs = crd_documents()
    for doc in docs:
        if doc["spec"]["names"]["plural"] == "nodeslicepools":
            doc["spec"]["versions"][0]["subresources"] = {"status": {}}
    kube.reset()
    kube.api.use_crds(docs)
    made = crs.create_namespaced_custom_object(GROUP, VERSION, NS, "nodeslicepools", slices)
    assert "status" not in made  # status is written through /status only
    made["status"] = slices["status"]
    made["spec"]["sliceSize"] = "/26"
    with_status = crs.replace_namespaced_custom_object_status(
        GROUP, VERSION, NS, "nodeslicepools", "net", made
    )
    assert with_status["status"] == slices["status"] and with_status["spec"]["sliceSize"] == "/24"
    with_status["status"] = {"allocations": []}
    with_status["spec"]["sliceSize"] = "/26"
    main = crs.replace_namespaced_custom_object(GROUP, VERSION, NS, "nodeslicepools", "net", with_status)
    assert main["status"] == slices["status"] and main["spec"]["sliceSize"] == "/26"
    assert main["metadata"]["generation"] == 2


# -- lists: paging, selectors, all namespaces ----------------------------------------------------------


def test_list_paging_with_limit_and_continue(crs: client.CustomObjectsApi) -> None:
    names = [f"p{i}" for i in range(7)]
    for name in names:
        create_pool(crs, name)
    seen: list[str] = []
    versions: set[str] = set()
    token: str | None = None
    pages = 0
    while True:
        kwargs: dict[str, Any] = {"limit": 3}
        if token:
            kwargs["_continue"] = token
        page = crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, **kwargs)
        pages += 1
        seen += [i["metadata"]["name"] for i in page["items"]]
        versions.add(page["metadata"]["resourceVersion"])
        token = page["metadata"].get("continue")
        if not token:
            break
        assert page["metadata"]["remainingItemCount"] == len(names) - len(seen)
    assert seen == names and pages == 3
    assert len(versions) == 1  # every page reports the first page's resourceVersion

    with pytest.raises(ApiException) as info:
        crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, _continue="garbage!")
    assert info.value.status == 400


def test_list_resource_version_newer_than_now_is_504(crs: client.CustomObjectsApi) -> None:
    rv = int(create_pool(crs, "p")["metadata"]["resourceVersion"])
    assert (
        len(crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, resource_version="0")["items"]) == 1
    )
    assert (
        len(crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, resource_version=str(rv))["items"])
        == 1
    )
    with pytest.raises(ApiException) as info:
        crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, resource_version=str(rv + 100))
    assert info.value.status == 504
    assert status_of(info.value)["message"] == f"Too large resource version: {rv + 100}, current: {rv}"


def test_label_selectors(crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "a", labels={"net": "blue", "tier": "1"})
    create_pool(crs, "b", labels={"net": "red"})
    create_pool(crs, "c", labels={"net": "green", "tier": "2"})
    create_pool(crs, "d")

    def names(selector: str) -> list[str]:
        page = crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS, label_selector=selector)
        return [i["metadata"]["name"] for i in page["items"]]

    assert names("net=blue") == ["a"]
    assert names("net==red") == ["b"]
    assert names("net!=blue") == ["b", "c", "d"]
    assert names("net in (blue, green)") == ["a", "c"]
    assert names("net notin (blue,green)") == ["b", "d"]
    assert names("tier") == ["a", "c"]
    assert names("!tier") == ["b", "d"]
    assert names("net in (blue,green),tier=2") == ["c"]


def test_list_across_namespaces(crs: client.CustomObjectsApi, core: client.CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "other"}})
    create_pool(crs, "p")
    crs.create_namespaced_custom_object(GROUP, VERSION, "other", POOLS, pool("p"))
    everywhere = crs.list_cluster_custom_object(GROUP, VERSION, POOLS)
    assert sorted((i["metadata"]["namespace"], i["metadata"]["name"]) for i in everywhere["items"]) == [
        (NS, "p"),
        ("other", "p"),
    ]
    assert [
        i["metadata"]["name"]
        for i in crs.list_namespaced_custom_object(GROUP, VERSION, "other", POOLS)["items"]
    ] == ["p"]


# -- delete preconditions -------------------------------------------------------------------------------


def test_delete_preconditions(crs: client.CustomObjectsApi) -> None:
    made = create_pool(crs, "p")
    uid, rv = made["metadata"]["uid"], made["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as info:
        crs.delete_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            POOLS,
            "p",
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid="x")),
        )
    assert info.value.status == 409
    assert status_of(info.value)["message"] == (
        'Operation cannot be fulfilled on ippools.whereabouts.cni.cncf.io "p": StorageError: invalid object, '
        f"Code: 4, Key: /registry/{GROUP}/ippools/{NS}/p, ResourceVersion: 0, "
        f"AdditionalErrorMsg: Precondition failed: UID in precondition: x, UID in object meta: {uid}"
    )
    with pytest.raises(ApiException) as info:
        crs.delete_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            POOLS,
            "p",
            body=client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version="1")),
        )
    assert info.value.status == 409 and status_of(info.value)["reason"] == "Conflict"
    crs.delete_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        POOLS,
        "p",
        body=client.V1DeleteOptions(preconditions=client.V1Preconditions(uid=uid, resource_version=rv)),
    )
    assert crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS)["items"] == []


# -- concurrency ----------------------------------------------------------------------------------------


def test_concurrent_read_modify_write_loses_no_update(kube: KubeHandle) -> None:
    """Eight clients add leases to one pool with GET + PUT at the read resourceVersion, retrying on 409."""
    configuration = client.Configuration()
    config.load_kube_config(config_file=kube.kubeconfig_path, client_configuration=configuration)
    setup = client.ApiClient(configuration)
    client.CustomObjectsApi(setup).create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, pool("p"))
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        with client.ApiClient(configuration) as api_client:
            crs = client.CustomObjectsApi(api_client)
            try:
                for k in range(5):
                    while True:
                        obj = crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")
                        obj["spec"]["allocations"][str(n * 10 + k)] = lease(f"c{n}-{k}")
                        try:
                            crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", obj)
                            break
                        except ApiException as exc:
                            if exc.status != 409:
                                raise
            except BaseException as exc:  # reported below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = client.CustomObjectsApi(setup).get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")
    assert len(final["spec"]["allocations"]) == 40
    assert kube.api.count("update", POOLS) == 40 + kube.api.count("conflict", POOLS)
    setup.close()


# -- faults ---------------------------------------------------------------------------------------------


def outcomes(crs: client.CustomObjectsApi, n: int) -> list[int]:
    out = []
    for _ in range(n):
        try:
            crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")
            out.append(200)
        except ApiException as exc:
            out.append(exc.status)
    return out


def test_error_share_is_seeded_and_scoped(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    kube.api.set_faults(seed=11, error_rate=0.5, error_codes=(500,))
    first = outcomes(crs, 30)
    assert set(first) == {200, 500}
    kube.api.set_faults(seed=11, error_rate=0.5, error_codes=(500,))
    assert outcomes(crs, 30) == first  # the same seed hits the same requests

    kube.api.set_faults(seed=1, error_rate=1.0, error_codes=(500,))
    with pytest.raises(ApiException) as info:
        crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")
    assert status_of(info.value) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "Internal error occurred: injected fault",
        "reason": "InternalError",
        "details": {"causes": [{"message": "injected fault"}]},
        "code": 500,
    }

    kube.api.set_faults(error_rate=1.0, error_codes=(503,), methods={"PUT"})
    obj = crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")  # reads are untouched
    with pytest.raises(ApiException) as info:
        crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", obj)
    assert info.value.status == 503 and status_of(info.value)["reason"] == "ServiceUnavailable"

    kube.api.set_faults(error_rate=1.0, resources={"overlappingrangeipreservations"})
    assert outcomes(crs, 3) == [200, 200, 200]  # only another resource is hit


def test_throttling_answers_429_with_retry_after(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    # API Priority and Fairness rejects before any handler runs: plain text, not a Status
    kube.api.set_faults(throttle_rate=1.0, retry_after=7, methods={"POST"})
    with pytest.raises(ApiException) as info:
        create_pool(crs, "p")
    assert info.value.status == 429
    assert info.value.headers["Retry-After"] == "7"
    assert info.value.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert info.value.body == "Too many requests, please try again later.\n"

    kube.api.set_faults(throttle_rate=1.0, retry_after=3, methods={"POST"}, throttle_format="status")
    with pytest.raises(ApiException) as info:
        create_pool(crs, "p")
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "3"
    body = status_of(info.value)
    assert body["reason"] == "TooManyRequests" and body["details"] == {"retryAfterSeconds": 3}
    kube.api.clear_faults()
    assert crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS)["items"] == []


def test_urllib3_retries_idempotent_requests_on_429_by_itself(
    kube: KubeHandle, crs: client.CustomObjectsApi
) -> None:
    """The client's default urllib3 Retry(3) honours Retry-After for GET/PUT/DELETE: code above it
    sees such a 429 only after four answers in a row."""
    create_pool(crs, "p")
    kube.api.set_faults(seed=2, throttle_rate=0.5, retry_after=0, methods={"GET"})
    kube.api.reset_counts()
    for _ in range(5):
        assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")["metadata"]["name"] == "p"
    assert kube.api.count("get", POOLS) > 5  # some answers were 429s, retried unseen


def test_latency_delays_every_answer(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    kube.api.set_faults(latency=0.5, methods={"GET"})
    with pytest.raises(urllib3.exceptions.MaxRetryError) as info:  # urllib3 retries a GET 3 times
        crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", _request_timeout=(1, 0.05))
    assert isinstance(info.value.reason, urllib3.exceptions.ReadTimeoutError)
    kube.api.clear_faults()
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")["metadata"]["name"] == "p"


def test_dropped_connections(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    create_pool(crs, "p")
    kube.api.set_faults(drop_rate=1.0)
    with pytest.raises(urllib3.exceptions.ProtocolError):  # POST: urllib3 does not retry it
        create_pool(crs, "q")
    kube.api.reset_counts()
    with pytest.raises(urllib3.exceptions.MaxRetryError):  # GET: urllib3 retries 3 times, then gives up
        crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")
    assert kube.api.count("get", POOLS) == 4
    kube.api.clear_faults()
    assert [
        i["metadata"]["name"] for i in crs.list_namespaced_custom_object(GROUP, VERSION, NS, POOLS)["items"]
    ] == ["p"]


def test_answer_dropped_after_the_write_landed(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    kube.api.set_faults(drop_after_rate=1.0, methods={"POST"})
    with pytest.raises(urllib3.exceptions.ProtocolError):
        create_pool(crs, "p")
    kube.api.clear_faults()
    assert crs.get_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p")["metadata"]["name"] == "p"


def test_always_conflict_for_a_kind(kube: KubeHandle, crs: client.CustomObjectsApi) -> None:
    obj = create_pool(crs, "p")
    kube.api.set_faults(always_conflict={POOLS})
    for _ in range(3):
        with pytest.raises(ApiException) as info:
            crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", obj)
        assert status_of(info.value)["message"] == CONFLICT_MESSAGE.format(name="p")
    assert kube.api.count("update", POOLS) == 3 and kube.api.count("conflict", POOLS) == 3
    kube.api.reset_counts()
    assert kube.api.counts_snapshot() == {}
    kube.api.clear_faults()
    crs.replace_namespaced_custom_object(GROUP, VERSION, NS, POOLS, "p", obj)


# -- pods and namespaces ---------------------------------------------------------------------------------


def test_pods_across_namespaces(kube: KubeHandle, core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as info:
        core.create_namespaced_pod("apps", {"metadata": {"name": "web-0"}, "spec": {"containers": []}})
    assert info.value.status == 404 and status_of(info.value)["message"] == 'namespaces "apps" not found'
    core.create_namespace({"metadata": {"name": "apps"}})
    made = core.create_namespaced_pod(
        "apps",
        {
            "metadata": {"name": "web-0", "labels": {"app": "web"}, "annotations": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "x"}], "nodeName": "node-a"},
        },
    )
    assert made.status.phase == "Pending" and made.metadata.uid and made.metadata.annotations == {"a": "b"}
    direct = kube.api.put_pod("db", "pg-0", phase="Running", uid="u-pg", annotations={"k": "v"})
    assert direct["metadata"]["uid"] == "u-pg"

    everywhere = core.list_pod_for_all_namespaces()
    assert sorted((p.metadata.namespace, p.metadata.name, p.status.phase) for p in everywhere.items) == [
        ("apps", "web-0", "Pending"),
        ("db", "pg-0", "Running"),
    ]
    assert [p.metadata.name for p in core.list_pod_for_all_namespaces(label_selector="app=web").items] == [
        "web-0"
    ]
    assert [p.metadata.name for p in core.list_namespaced_pod("db").items] == ["pg-0"]
    assert core.read_namespaced_pod("pg-0", "db").metadata.annotations == {"k": "v"}

    # a PUT of the pod keeps its status (status has its own endpoint)
    pod = core.read_namespaced_pod("web-0", "apps")
    pod.status.phase = "Succeeded"
    pod.metadata.labels["app"] = "web2"
    replaced = core.replace_namespaced_pod("web-0", "apps", pod)
    assert replaced.status.phase == "Pending" and replaced.metadata.labels == {"app": "web2"}
    pod = core.read_namespaced_pod("web-0", "apps")
    pod.status.phase = "Running"
    assert core.replace_namespaced_pod_status("web-0", "apps", pod).status.phase == "Running"
    patched = core.patch_namespaced_pod("web-0", "apps", {"metadata": {"annotations": {"x": "y"}}})
    assert patched.metadata.annotations == {"a": "b", "x": "y"}

    kube.api.put_pod("db", "pg-1", uid="u1", labels={"app": "pg"}, node="node-b", deleting=True)
    pg1 = core.read_namespaced_pod("pg-1", "db")
    assert (pg1.metadata.labels, pg1.spec.node_name, pg1.status.phase) == ({"app": "pg"}, "node-b", "Running")
    assert pg1.metadata.deletion_timestamp is not None
    kube.api.delete_pod("db", "pg-1")

    deleted = core.delete_namespaced_pod("web-0", "apps")  # a pod delete answers with the pod
    assert deleted.metadata.name == "web-0"
    kube.api.delete_pod("db", "pg-0")
    assert core.list_pod_for_all_namespaces().items == []


def test_deleting_a_namespace_deletes_what_is_in_it(
    crs: client.CustomObjectsApi, core: client.CoreV1Api
) -> None:
    core.create_namespace({"metadata": {"name": "gone"}})
    crs.create_namespaced_custom_object(GROUP, VERSION, "gone", POOLS, pool("p"))
    core.delete_namespace("gone")
    assert crs.list_cluster_custom_object(GROUP, VERSION, POOLS)["items"] == []
    assert "gone" not in {n.metadata.name for n in core.list_namespace().items}


# -- standalone ------------------------------------------------------------------------------------------


def test_runs_standalone(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.kubeapi.server", "--port", "0", "--kubeconfig", str(kubeconfig)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        api_client = config.new_client_from_config(config_file=str(kubeconfig))
        crs = client.CustomObjectsApi(api_client)
        assert (
            crs.create_namespaced_custom_object(GROUP, VERSION, NS, POOLS, pool("p"))["metadata"]["name"]
            == "p"
        )
        assert yaml.safe_load(kubeconfig.read_text())["contexts"][0]["context"]["namespace"] == NS
        api_client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
