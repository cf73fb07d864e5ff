"""What the IPPool CRD's declaration of `spec.allocations` costs kube-apiserver per pool write.

Two copies of the IPPool CRD, under two API groups of their own, on one real kube-apiserver: the
previous declaration (a schema per lease: id, podref, ifname, ipamclaimref, attrs and the old separate
extras, each a string with a maxLength; PREVIOUS_ALLOCATIONS below, as crds/ held it at 42d9aa7) and
the repo's (`allocations` opaque: preserve-unknown-fields, no per-lease schema). One pool of 250
leases as whereabouts-py writes them in each. In rounds, alternating which copy goes first, a batch of
PUTs (the plugin's write: one lease added, or removed again, at the pool's resourceVersion, without
managedFields) and a batch of GETs of the same pool (the same-run reference) on each; the API server's
CPU per request is its /proc/PID/stat time spent during the batch's requests, divided by their number.

    python -m bench.poolwrite [--leases 250] [--rounds 30] [--batch 10]

Starts etcd + kube-apiserver from $KUBEBUILDER_ASSETS (tests/kubeapi/real.py). `make bench-poolwrite`.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cpu_seconds, publish, start_cluster, stop_cluster  # noqa: E402
from tests.kubeapi.real import RealCluster  # noqa: E402

IPPOOL_CRD = ROOT / "crds" / "whereabouts.cni.cncf.io_ippools.yaml"
# spec.allocations as crds/whereabouts.cni.cncf.io_ippools.yaml declared it before it became opaque
PREVIOUS_ALLOCATIONS: dict[str, Any] = yaml.safe_load("""
description: Leases keyed by the address's offset from the range's network address, as a decimal string.
type: object
x-kubernetes-map-type: atomic
maxProperties: 16384
additionalProperties:
  description: Who holds the address.
  type: object
  required: [id, podref]
  properties:
    id: {description: Container id of the attachment., type: string, maxLength: 256}
    podref: {description: The pod as namespace/name., type: string, maxLength: 320}
    ifname: {description: Interface name inside the pod., type: string, maxLength: 64}
    ipamclaimref:
      description: namespace/name of an IPAMClaim owning the lease (Whereabouts; kept as written).
      type: string
      maxLength: 320
    attrs:
      description: >-
        whereabouts-py - the lease's extras packed into one string (a pool write costs the API server
        per field): key=value entries joined by ';', keys node, poduid, created, network, token
        (meanings as the separate fields below), '%', ';' and '=' in a value escaped as %25, %3B, %3D.
        Entries with other keys are kept.
      type: string
      maxLength: 4096
    node:
      description: whereabouts-py (previous versions; now in attrs) - node that made the lease; CNI GC only releases its own node's leases.
      type: string
      maxLength: 253
    poduid:
      description: whereabouts-py (previous versions; now in attrs) - UID of the pod, so a recreated pod of the same name is told apart.
      type: string
      maxLength: 128
    created:
      description: whereabouts-py (previous versions; now in attrs) - RFC 3339 time the lease was made.
      type: string
      maxLength: 64
    network:
      description: whereabouts-py (previous versions; now in attrs) - name of the CNI network config that made the lease; CNI GC only releases its own network's leases.
      type: string
      maxLength: 1024
    token:
      description: whereabouts-py (previous versions; now in attrs) - id of the ADD call that created the lease, cleared when another call confirms it; a failed ADD's rollback removes only leases carrying its own id.
      type: string
      maxLength: 256
""")
VARIANTS = {"previous": "per-lease schema (previous CRD)", "opaque": "opaque allocations (this CRD)"}
NS = "bench"


def our_lease(i: int) -> dict[str, Any]:
    """A lease as whereabouts-py writes it: Whereabouts' fields, our extras packed in `attrs`."""
    from ipam.allocator import Lease

    return Lease(
        f"{i:064x}",
        f"bench/pod-{i:06d}",
        "net1",
        node=f"node-{i % 10}",
        poduid=f"{i:08x}-0000-4000-8000-000000000000",
        created="2026-11-29T00:00:00Z",
        network="bench",
        token=f"{i:016x}",
    ).to_json()


def ippool_crd(group: str, allocations: dict[str, Any] | None) -> dict[str, Any]:
    """The repo's IPPool CRD under another group; `allocations` replaces its declaration when given."""
    crd: dict[str, Any] = yaml.safe_load(IPPOOL_CRD.read_text())
    crd["metadata"]["name"] = f"ippools.{group}"
    crd["spec"]["group"] = group
    if allocations is not None:
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["allocations"] = copy.deepcopy(allocations)
    return crd


def batch(cluster: RealCluster, requests: list[tuple[str, str, Any]]) -> tuple[float, list[float], Any]:
    """Run the requests in order: the API server's CPU over them, each one's wall time, the last answer."""
    pid = cluster.apiserver.pid if cluster.apiserver else 0
    walls, answer = [], None
    before = cpu_seconds(pid)
    for method, path, body in requests:
        started = time.perf_counter()
        answer = cluster.request(method, path, body)
        walls.append(time.perf_counter() - started)
    return cpu_seconds(pid) - before, walls, answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.poolwrite")
    parser.add_argument("--leases", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=10, help="requests per measured batch")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    args = parser.parse_args(argv)
    cluster = start_cluster("bench.poolwrite")
    paths, pools = {}, {}
    # per variant and method: the API server's CPU seconds per request, one batch's mean per round;
    # per variant: each PUT's wall time
    cpu: dict[tuple[str, str], list[float]] = {(v, m): [] for v in VARIANTS for m in ("PUT", "GET")}
    walls: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        cluster.ensure_namespace(NS)
        for variant in VARIANTS:
            group = f"{variant}.poolwrite.bench.example"
            crd = ippool_crd(group, PREVIOUS_ALLOCATIONS if variant == "previous" else None)
            cluster.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
            cluster.wait_established(crd["metadata"]["name"])
            base = f"/apis/{group}/v1alpha1/namespaces/{NS}/ippools"
            leases = {str(i): our_lease(i) for i in range(1, args.leases + 1)}
            body = {"apiVersion": f"{group}/v1alpha1", "kind": "IPPool", "metadata": {"name": "p"},
                    "spec": {"range": "10.0.0.0/16", "allocations": leases}}  # fmt: skip
            for _ in range(600):  # a CRD is Established a moment before its storage serves
                try:
                    pools[variant] = cluster.request("POST", base, body)
                    break
                except Exception:
                    time.sleep(0.05)
            else:
                raise RuntimeError(f"{group}: IPPools never served")
            paths[variant] = f"{base}/p"
        extra = str(args.leases + 1)
        for rnd in range(args.rounds + 1):  # round 0 warms both up and is not counted
            order = list(VARIANTS) if rnd % 2 else list(reversed(VARIANTS))
            for variant in order:
                path, obj, spent = paths[variant], pools[variant], 0.0
                for _ in range(args.batch):  # one at a time: each body is at the last answer's version
                    obj = copy.deepcopy(obj)
                    obj["metadata"].pop("managedFields", None)  # as the plugin sends it
                    allocations = obj["spec"]["allocations"]
                    if allocations.pop(extra, None) is None:  # an ADD's write, then a DEL's
                        allocations[extra] = our_lease(args.leases + 1)
                    used, wall, obj = batch(cluster, [("PUT", path, obj)])
                    spent += used
                    if rnd:
                        walls[variant] += wall
                pools[variant] = obj
                if rnd:
                    cpu[(variant, "PUT")].append(spent / args.batch)
                used, _, _ = batch(cluster, [("GET", path, None)] * args.batch)
                if rnd:
                    cpu[(variant, "GET")].append(used / args.batch)
    finally:
        stop_cluster(cluster)

    def per_request(variant: str, method: str) -> float:
        """Mean CPU seconds per request over every counted one (ticks are 10 ms: a mean, not a median)."""
        return statistics.mean(cpu[(variant, method)])

    def spread(variant: str, method: str) -> str:
        """The middle half of the rounds' figures (each a batch's mean), in ms."""
        q1, _, q3 = statistics.quantiles(cpu[(variant, method)], n=4)
        return f"{q1 * 1000:.1f}-{q3 * 1000:.1f}"

    rows = []
    for variant, label in VARIANTS.items():
        put, get = per_request(variant, "PUT"), per_request(variant, "GET")
        rows.append(
            (
                f"PUT of a {args.leases}-lease pool, {label}: API server CPU",
                f"{put * 1000:.1f} ms (rounds' middle half {spread(variant, 'PUT')})",
                f"{put / get:.1f}x",
                f"GET of the same pool: {get * 1000:.1f} ms CPU ({spread(variant, 'GET')}); PUT wall p50 "
                f"{statistics.median(walls[variant]) * 1000:.1f} ms",
            )
        )
    old, new = per_request("previous", "PUT"), per_request("opaque", "PUT")
    ratio = new / old
    rows.append(
        ("PUT CPU, this CRD against the previous", f"{(new - old) * 1000:+.1f} ms", f"{ratio:.2f}x", "")
    )
    counted = args.rounds * args.batch
    publish(
        args.results,
        "IPPool write cost: per-lease schema vs opaque `spec.allocations`",
        "bench-poolwrite",
        f"Command: `python -m bench.poolwrite --leases {args.leases} --rounds {args.rounds} --batch {args.batch}`. "
        f"Server: real kube-apiserver + etcd (with fsync, as in production) from "
        f"$KUBEBUILDER_ASSETS, both CRDs on it at once; {counted} PUTs "
        f"and {counted} GETs counted per CRD, interleaved; load average at the end {os.getloadavg()[0]:.1f}.",
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
