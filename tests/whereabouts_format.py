"""Objects as Go Whereabouts writes them, built from its own code's rules (k8snetworkplumbingwg/whereabouts:
pkg/storage/kubernetes/ipam.go IPPoolName/normalizeRange/NormalizeIP, toAllocationMap;
pkg/api/whereabouts.cni.cncf.io/v1alpha1 types; pkg/node-controller getSliceName), independently of
whereabouts-py's own naming code, so a test compares the two."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import yaml

from tests.kubeapi.real import ApiError, RealKube

GROUP = "whereabouts.cni.cncf.io/v1alpha1"
NAD_CRD = Path(__file__).resolve().parent / "third_party" / "multus-nad-crd.yaml"


def normalize_range(text: str) -> str:
    """normalizeRange: a trailing ':' gets a '0', then ':' and '/' become '-'."""
    if text.endswith(":"):
        text += "0"
    return text.replace(":", "-").replace("/", "-")


def ippool_name(cidr: str, network_name: str = "", node: str = "") -> str:
    """IPPoolName(PoolIdentifier{IpRange, NetworkName, NodeName})."""
    parts = [p for p in (network_name, node) if p]
    return "-".join([*parts, normalize_range(cidr)])


def normalize_ip(ip: str, network_name: str = "") -> str:
    """NormalizeIP: Go's net.IP String(), a trailing ':' gets a '0', ':' become '-'."""
    text = str(ipaddress.ip_address(ip))  # Go's net.IP.String() writes the same canonical text
    if text.endswith(":"):
        text += "0"
    text = text.replace(":", "-")
    return f"{network_name}-{text}" if network_name else text


def ippool(
    cidr: str, allocations: dict[int, tuple[str, str, str]], network_name: str = "", node: str = ""
) -> dict[str, Any]:
    """An IPPool: spec.range as the config normalised it (ipNet.String()), allocations keyed by the
    decimal offset from the range's network address (toAllocationMap), {id, podref, ifname}."""
    network = str(ipaddress.ip_network(cidr, strict=False))
    return {
        "apiVersion": GROUP,
        "kind": "IPPool",
        "metadata": {"name": ippool_name(network, network_name, node)},
        "spec": {
            "range": network,
            "allocations": {
                str(offset): {"id": ctr, "podref": podref, "ifname": ifname}
                for offset, (ctr, podref, ifname) in allocations.items()
            },
        },
    }


def reservation(
    ip: str, ctr: str, podref: str, ifname: str = "net1", network_name: str = ""
) -> dict[str, Any]:
    return {
        "apiVersion": GROUP,
        "kind": "OverlappingRangeIPReservation",
        "metadata": {"name": normalize_ip(ip, network_name)},
        "spec": {"containerid": ctr, "podref": podref, "ifname": ifname},
    }


def node_slice_pool(name: str, cidr: str, slice_size: str, nodes: dict[str, str]) -> dict[str, Any]:
    """A NodeSlicePool as Whereabouts' node controller makes it: every slice listed, free ones with an
    empty nodeName (named after network_name, else the NAD's network name: getSliceName)."""
    prefix = int(slice_size.lstrip("/"))
    slices = [str(s) for s in ipaddress.ip_network(cidr).subnets(new_prefix=prefix)]
    owner = {v: k for k, v in nodes.items()}
    return {
        "apiVersion": GROUP,
        "kind": "NodeSlicePool",
        "metadata": {"name": name},
        "spec": {"range": cidr, "sliceSize": slice_size},
        "status": {"allocations": [{"nodeName": owner.get(s, ""), "sliceRange": s} for s in slices]},
    }


def nad(namespace: str, name: str, ipam: dict[str, Any], network: str | None = None) -> dict[str, Any]:
    conf = {"cniVersion": "0.3.1", "name": network or name, "type": "macvlan", "master": "eth0", "ipam": ipam}
    return {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"config": json.dumps(conf)},
    }


def install_nad_crd(kube: RealKube) -> None:
    """Multus' NetworkAttachmentDefinition CRD (once per server)."""
    for doc in yaml.safe_load_all(NAD_CRD.read_text()):
        try:
            kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
        except ApiError as exc:
            if exc.status != 409:  # an earlier test of this session made it
                raise
        kube.cluster.wait_established(doc["metadata"]["name"])


def create(kube: RealKube, objs: list[dict[str, Any]]) -> None:
    """Create the objects on the real server; a NodeSlicePool's status goes through its subresource
    when the CRD declares one, as the node controller's UpdateStatus does."""
    for obj in objs:
        ns = obj["metadata"].get("namespace") or kube.namespace
        body = {**obj, "metadata": {**obj["metadata"], "namespace": ns}}
        [made] = kube.apply(body, namespace=ns)
        if obj["kind"] == "NodeSlicePool" and made.get("status") != obj["status"]:
            path = f"/apis/{GROUP}/namespaces/{ns}/nodeslicepools/{obj['metadata']['name']}/status"
            kube.request("PUT", path, {**made, "status": obj["status"]})
