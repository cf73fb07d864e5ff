"""ipamctl delete-nodeslicepool (README's remedy for a changed cut): returns every slice, deletes the
NodeSlicePool with a precondition on its uid and version, refuses while a slice holds a lease; on the
real kube-apiserver and on the file datastore. Its races with ADDs in flight are in
tests/test_nodeslices_break.py."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from ipam import nodeslices
from ipam.ctl import main as ctl_main
from ipam.errors import ConflictError
from ipam.store.file import FileStore
from tests.kubeapi.real import RealKube
from tests.test_nodeslices import call as file_call
from tests.test_nodeslices_isolation import conf, direct, nsp_path


@pytest.fixture(autouse=True)
def _cold_cache() -> None:
    nodeslices.forget_cache()


def ctl(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl_main(args, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _pools(kube: RealKube) -> dict[str, dict[str, Any]]:
    return {
        p["metadata"]["name"]: p["spec"].get("allocations") or {}
        for p in kube.api.objects("ippools", kube.namespace)
    }


def test_delete_nodeslicepool_on_the_api_server(real_kube: RealKube, tmp_path: Path) -> None:
    kubeconfig = ["--kubeconfig", real_kube.kubeconfig_path]
    n1, n2 = conf(real_kube, tmp_path, "n1"), conf(real_kube, tmp_path, "n2")
    assert direct(real_kube, "ADD", "a0", n1)[0] == 0
    assert direct(real_kube, "ADD", "b0", n2)[0] == 0
    assert direct(real_kube, "DEL", "a0", n1)[0] == 0

    # b0 still holds 10.0.0.65 in n2's slice: refused, nothing changed (not even n1's empty slice)
    code, out, err = ctl([*kubeconfig, "delete-nodeslicepool", "net1"])
    assert code == 1 and out == "", (out, err)
    assert err.strip() == (
        "ipamctl: refused: NodeSlicePool net1 is not deleted: slice 10.0.0.64/26 of node n2 holds 1 "
        f"lease(s): 10.0.0.65 ({real_kube.namespace}/b0, pool n2-10.0.0.64-26)"
    )
    held = {
        e["sliceRange"]: e["nodeName"]
        for e in real_kube.request("GET", nsp_path(real_kube, "net1"))["status"]["allocations"]
    }
    assert (held["10.0.0.0/26"], held["10.0.0.64/26"]) == ("n1", "n2")

    assert direct(real_kube, "DEL", "b0", n2)[0] == 0
    code, out, err = ctl([*kubeconfig, "delete-nodeslicepool", "net1", "--dry-run"])
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "would-return nodeslicepool=net1 slice=10.0.0.0/26 node=n1 reason=delete",
        "would-return nodeslicepool=net1 slice=10.0.0.64/26 node=n2 reason=delete",
        "would-delete nodeslicepool=net1",
    ]
    assert set(_pools(real_kube)) == {"n1-10.0.0.0-26", "n2-10.0.0.64-26"}  # a dry run changes nothing

    code, out, err = ctl([*kubeconfig, "-o", "json", "delete-nodeslicepool", "net1"])
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (
        doc["deleted"] is True
        and doc["refused"] == []
        and doc["lines"]
        == [
            "return nodeslicepool=net1 slice=10.0.0.0/26 node=n1 reason=delete",
            "return nodeslicepool=net1 slice=10.0.0.64/26 node=n2 reason=delete",
            "delete nodeslicepool=net1",
        ]
    )
    assert real_kube.api.objects("nodeslicepools", real_kube.namespace) == []
    assert _pools(real_kube) == {}  # the returned slices' pools (and their fences) are gone

    code, out, err = ctl([*kubeconfig, "delete-nodeslicepool", "net1"])
    assert code == 2 and "NodeSlicePool net1 does not exist" in err
    # a new cut starts from a clean slate
    code, doc = direct(real_kube, "ADD", "c0", conf(real_kube, tmp_path, "n1", node_slice_size="/25"))
    assert code == 0 and doc["ips"][0]["address"] == "10.0.0.1/24", doc


def test_delete_nodeslicepool_on_the_file_datastore(tmp_path: Path) -> None:
    data = ["--datastore", "file", "--data-dir", str(tmp_path)]
    assert file_call(tmp_path, "ADD", "a0", "node-a")[0] == 0
    code, out, err = ctl([*data, "delete-nodeslicepool", "net1"])
    assert (
        code == 1
        and "slice 10.0.0.0/30 of node node-a holds 1 lease(s): 10.0.0.1 (ns/a0, pool node-a-10.0.0.0-30)"
        in err
    )
    assert file_call(tmp_path, "DEL", "a0", "node-a")[0] == 0
    code, out, err = ctl([*data, "delete-nodeslicepool", "net1"])
    assert code == 0, err
    assert out.splitlines()[-1] == "delete nodeslicepool=net1"
    assert not list((tmp_path / "nodeslicepools").glob("*.json")) and not list(
        (tmp_path / "pools").glob("*.json")
    )


def test_the_file_stores_delete_is_conditional_on_the_document_read(tmp_path: Path) -> None:
    """A file has no uid and its version restarts when it is made again: the delete compares the
    whole document with the one read, under the NodeSlicePool's lock."""
    assert file_call(tmp_path, "ADD", "a0", "node-a")[0] == 0
    store = FileStore(str(tmp_path))
    read = store.read_node_slices("net1")
    assert read is not None
    assert file_call(tmp_path, "ADD", "b0", "node-b")[0] == 0  # node-b claims: the document changed
    with pytest.raises(ConflictError):
        store.delete_node_slices(read)
    assert store.read_node_slices("net1") is not None
    current = store.read_node_slices("net1")
    assert current is not None
    store.delete_node_slices(current)
    assert store.read_node_slices("net1") is None
    store.delete_node_slices(current)  # gone already is fine
