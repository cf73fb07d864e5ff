"""ipam-controller on a real kube-apiserver at the issue's size: 10,000 pods (20 namespaces), 20,000
leases (two per pod, `net1` and `net2`) in 80 node slices' IPPools of one NodeSlicePool, each lease with
its reservation. Measures, each next to a same-run reference:

- a full `ipam-reconcile` pass, against the bare paged LISTs that any full scan must make (pods,
  IPPools, reservations, as raw JSON);
- the controller's memory (RSS once listed and scraped, and its peak), against the same interpreter
  with the same imports and nothing listed; plus what the `kubernetes` client holds for the same pods
  as full V1Pod objects (what a whole-object informer, or kopf, receives) and as metadata-only dicts;
- deletion -> release latency at 50 pod deletions a second, against deletion -> the DELETED event on a
  pod watch of our own (the floor of any watch-driven release).

    python -m bench.controller [--pods 10000] [--deletions 500] [--rate 50]

Starts etcd + kube-apiserver from $KUBEBUILDER_ASSETS (tests/kubeapi/real.py). `make bench-controller`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import http.client
import io
import json
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import cpu_seconds, publish, start_cluster, stop_cluster  # noqa: E402
from ipam.allocator import Lease, dump_allocations  # noqa: E402
from ipam.ranges import pool_name, reservation_name  # noqa: E402
from ipam.reconcile import main as reconcile_main  # noqa: E402
from ipam.slices import NodeSlices, SliceEntry  # noqa: E402
from ipam.store.kubeclient import KubeClient, load_kubeconfig  # noqa: E402
from ipam.store.kubernetes import KubernetesStore  # noqa: E402
from tests.kubeapi.real import free_port  # noqa: E402

from .apiprof import cpu_profile, summarize  # noqa: E402

# what a release costs kube-apiserver, by the code its CPU samples are in
FOCUS = (
    "apiextensions-apiserver/pkg/apiserver/schema",  # structural schema: pruning, defaulting
    "kube-openapi/pkg/validation",  # OpenAPI schema validation of the object
    "apiserver/pkg/cel",  # CEL rules
    "fieldmanager",  # managedFields
    "storage/cacher",  # the watch cache and its watchers
    "storage/etcd3",  # reads and writes to etcd
    "encoding/json",
    "sigs.k8s.io/json",
    "runtime.gcBgMarkWorker",
    "crypto/tls",
)

NS = "whereabouts"
NETWORK = "storage"
POOLS = 80
OLD = "2026-01-01T00:00:00Z"
VENV_BIN = Path(sys.executable).parent


def pod_body(name: str, j: int) -> dict[str, Any]:
    """A pod of ordinary size (labels, a Multus network-status, two containers with env and mounts)."""
    status = json.dumps(
        [{"name": f"{NS}/{NETWORK}", "interface": f"net{k}", "ips": [f"10.128.{j % 80}.{k}"]} for k in (1, 2)]
    )
    env = [{"name": f"VAR_{k}", "value": f"value-{k}-{j}"} for k in range(10)]
    container = {
        "name": "app",
        "image": "registry.example.com/app:1.2.3",
        "env": env,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {"app": f"app-{j % 50}", "tier": "storage", "release": "r1", "shard": str(j % 7)},
            "annotations": {
                "k8s.v1.cni.cncf.io/networks": f"{NETWORK},{NETWORK}",
                "k8s.v1.cni.cncf.io/network-status": status,
            },
        },
        "spec": {
            "containers": [container, {**container, "name": "sidecar"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def slice_cidr(i: int) -> str:
    return f"10.128.{i}.0/24"


def populate(client: KubeClient, store: KubernetesStore, pods: int) -> dict[str, str]:
    """Pods, one NodeSlicePool with 80 slices, 80 IPPools holding two leases per pod, reservations;
    returns {podref: uid}."""
    namespaces = [f"apps-{k}" for k in range(20)]
    for ns in [NS, *namespaces]:
        client.request("POST", "/api/v1/namespaces", {"metadata": {"name": ns}})

    def make(j: int) -> tuple[str, str]:
        ns = namespaces[j % 20]
        pod = client.request("POST", f"/api/v1/namespaces/{ns}/pods", pod_body(f"pod-{j}", j))
        return f"{ns}/pod-{j}", str(pod["metadata"]["uid"])

    for i in range(POOLS):
        client.request(
            "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{i}"}}
        )
    with ThreadPoolExecutor(16) as pool:
        uids = dict(pool.map(make, range(pods)))
    refs = list(uids)
    store.write_node_slices(
        NodeSlices(NETWORK, "10.128.0.0/16", "24", (), None),
        [SliceEntry(f"node-{i}", slice_cidr(i)) for i in range(POOLS)],
    )
    allocations: list[dict[int, Lease]] = [{} for _ in range(POOLS)]
    reservations = []
    import netaddr

    for j, ref in enumerate(refs):
        for k, (p, base) in enumerate(((j % POOLS, 0), ((j + POOLS // 2) % POOLS, pods // POOLS))):
            offset = base + j // POOLS + 1
            lease = Lease(f"ctr-{j}", ref, f"net{k + 1}", node=f"node-{p}", poduid=uids[ref], created=OLD)
            allocations[p][offset] = lease
            address = netaddr.IPAddress(int(netaddr.IPNetwork(slice_cidr(p)).first) + offset)
            reservations.append((reservation_name(address, NETWORK), lease))
    for p in range(POOLS):
        name = pool_name(slice_cidr(p), f"{NETWORK}-node-{p}")
        body = {
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"range": slice_cidr(p), "allocations": dump_allocations(allocations[p])},
        }
        client.request("POST", f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{NS}/ippools", body)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda r: store.reserve(r[0], r[1]), reservations))
    return uids


def list_all(client: KubeClient, path: str, accept: str = "application/json") -> list[Any]:
    items: list[Any] = []
    token = None
    while True:
        params = {"limit": "500", **({"continue": token} if token else {})}
        page = client.request("GET", path, params=params, accept=accept)
        items += page["items"]
        token = page["metadata"].get("continue")
        if not token:
            return items


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rss(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def child_rss(code: str, kubeconfig: str) -> tuple[float, float]:
    """RSS of a fresh interpreter running `code` (which holds what it built), measured by the child."""
    script = (
        code
        + "\nimport pathlib\ns = dict(l.split(':', 1) for l in pathlib.Path('/proc/self/status').read_text().splitlines())\n"
    )
    script += "print(int(s['VmRSS'].split()[0]) / 1024, int(s['VmHWM'].split()[0]) / 1024)\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True,
        env={**os.environ, "KUBECONFIG_PATH": kubeconfig, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    a, b = out.stdout.split()[-2:]
    return float(a), float(b)


IMPORTS = "import ipam.controller.main, ipam.controller.leader, kubernetes.client, prometheus_client\n"
K8S_FULL = IMPORTS + (
    "import os\nfrom kubernetes import client, config\nconfig.load_kube_config(os.environ['KUBECONFIG_PATH'])\n"
    "held = client.CoreV1Api().list_pod_for_all_namespaces(limit=100000).items\nassert len(held) > 0\n"
)
K8S_META = IMPORTS + (
    "import os, json\nfrom kubernetes import client, config\nconfig.load_kube_config(os.environ['KUBECONFIG_PATH'])\n"
    "r = client.CoreV1Api().list_pod_for_all_namespaces(limit=100000, _preload_content=False, _headers="
    "{'Accept': 'application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1'})\n"
    "held = json.loads(r.data)['items']\nassert len(held) > 0\n"
)


def wait_http(url: str, seconds: float = 600) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def gone_from(held: dict[str, set[str]], name: str, allocations: dict[str, Any]) -> list[str]:
    """The pods of `held` (podref -> pools still holding one of its leases, updated here) whose last
    lease `allocations`, pool `name` as just written, no longer holds. The podrefs as written, not
    parsed: this harness shares the 2 cores with what it measures."""
    present = {v.get("podref") for v in allocations.values() if isinstance(v, dict)}
    out = []
    for ref, pools in list(held.items()):
        if name in pools and ref not in present:
            pools.discard(name)
            if not pools:
                del held[ref]
                out.append(ref)
    return out


class ReleaseWatch(threading.Thread):
    """Watches IPPools (and pods, the reference) through the API server as admin; reports when each
    deleted pod's last lease left the pools, and when its DELETED event came."""

    def __init__(self, client: KubeClient, held: dict[str, set[str]], report: Any) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.held = held  # podref -> pool names holding its leases
        self.report = report  # called with (kind, podref or watch, time.monotonic())

    def run(self) -> None:
        threading.Thread(target=self._pods, daemon=True).start()
        path = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{NS}/ippools"
        rv = self.client.request("GET", path, params={"limit": "1"})["metadata"]["resourceVersion"]
        while True:  # a watch the server ends (or an ERROR event) is resumed where it was
            conn, resp = self.client.stream(
                path, {"watch": "1", "resourceVersion": rv}, "application/json", 600
            )
            self.report(("ready", "ippools", time.monotonic()))
            while line := resp.readline():
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    print(f"bench: IPPool watch error {obj.get('message')}; resuming", file=sys.stderr)
                    break
                now = time.monotonic()
                rv = obj["metadata"]["resourceVersion"]
                name, allocations = obj["metadata"]["name"], obj["spec"].get("allocations") or {}
                for ref in gone_from(self.held, name, allocations):
                    self.report(("released", ref, now))
            else:
                print("bench: the IPPool watch ended; resuming", file=sys.stderr)
            conn.close()

    def _pods(self) -> None:
        rv = self.client.request("GET", "/api/v1/pods", params={"limit": "1"})["metadata"]["resourceVersion"]
        accept = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
        conn, resp = self.client.stream("/api/v1/pods", {"watch": "1", "resourceVersion": rv}, accept, 600)
        self.report(("ready", "pods", time.monotonic()))
        while line := resp.readline():
            event = json.loads(line)
            if event["type"] == "DELETED":
                meta = event["object"]["metadata"]
                self.report(("deleted", f"{meta['namespace']}/{meta['name']}", time.monotonic()))
        conn.close()


class EtcdWatch(threading.Thread):
    """The same two observations read from etcd itself, beside the API server: when each deleted pod's
    last lease left the pools in storage ("committed": from then on any read, and so any ADD, finds
    the address free), and when the pod's own deletion was committed (the reference). An API watch
    adds its own delivery to that: the API server decodes each 250-lease IPPool and sends it to every
    watcher, which under this load lags the commit by seconds."""

    def __init__(self, port: int, held: dict[str, set[str]], report: Any) -> None:
        super().__init__(daemon=True)
        self.port, self.held, self.report = port, held, report

    def _stream(self, prefix: bytes) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        end = prefix[:-1] + bytes([prefix[-1] + 1])
        create = {"key": base64.b64encode(prefix).decode(), "range_end": base64.b64encode(end).decode()}
        conn.request(
            "POST", "/v3/watch", json.dumps({"create_request": create}), {"Content-Type": "application/json"}
        )
        return conn.getresponse()

    def run(self) -> None:
        threading.Thread(target=self._pods, daemon=True).start()
        pools = self._stream(f"/registry/whereabouts.cni.cncf.io/ippools/{NS}/".encode())
        pools.readline()  # "created"
        self.report(("ready", "etcd-ippools", time.monotonic()))
        while line := pools.readline():
            now = time.monotonic()
            for event in json.loads(line).get("result", {}).get("events", []):
                kv = event["kv"]
                if event.get("type") == "DELETE":
                    continue
                name = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
                obj = json.loads(base64.b64decode(kv["value"]))
                for ref in gone_from(self.held, name, obj["spec"]["allocations"]):
                    self.report(("committed", ref, now))

    def _pods(self) -> None:
        pods = self._stream(b"/registry/pods/")
        pods.readline()
        self.report(("ready", "etcd-pods", time.monotonic()))
        while line := pods.readline():
            now = time.monotonic()
            for event in json.loads(line).get("result", {}).get("events", []):
                if event.get("type") == "DELETE":
                    key = base64.b64decode(event["kv"]["key"]).decode()
                    self.report(("deleted-etcd", "/".join(key.split("/")[-2:]), now))


def _watch_in_child(kubeconfig: str, etcd_port: int, held: dict[str, set[str]], queue: Any) -> None:
    EtcdWatch(etcd_port, copy.deepcopy(held), queue.put).start()
    watch = ReleaseWatch(KubeClient(load_kubeconfig(kubeconfig), timeout=(5.0, 120.0)), held, queue.put)
    watch.run()


class ReleaseWatchProcess:
    """ReleaseWatch and EtcdWatch in a process of their own, so that their clock readings never wait
    for this one's threads (the deleters) to hand over the GIL; the times come back through a queue
    (CLOCK_MONOTONIC is the same in every process)."""

    WATCHES = frozenset({"ippools", "pods", "etcd-ippools", "etcd-pods"})

    def __init__(self, kubeconfig: str, etcd_port: int, held: dict[str, set[str]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.queue: Any = ctx.Queue()
        self.process = ctx.Process(
            target=_watch_in_child, args=(kubeconfig, etcd_port, held, self.queue), daemon=True
        )
        # kind ("released", "deleted": API watches; "committed", "deleted-etcd": etcd) -> podref -> time
        self.times: dict[str, dict[str, float]] = defaultdict(dict)

    def start(self) -> None:
        """Once every watch is open in the child."""
        self.process.start()
        ready: set[str] = set()
        while ready != self.WATCHES:
            kind, what, _ = self.queue.get(timeout=120)
            if kind == "ready":  # every later "ready" (a watch resumed) is ignored
                ready.add(what)
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while True:
            kind, ref, when = self.queue.get()
            self.times[kind][ref] = when

    def close(self) -> None:
        self.process.terminate()
        self.process.join(10)


def api_requests(client: KubeClient) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]]]:
    """kube-apiserver's apiserver_request_total so far, by (verb, resource), and the seconds those
    requests took it (apiserver_request_duration_seconds_sum: from their arrival to their answer)."""
    conn, resp = client.stream("/metrics", {}, "text/plain", 60)
    try:
        text = resp.read().decode()
    finally:
        conn.close()
    count: Counter[tuple[str, str]] = Counter()
    seconds: Counter[tuple[str, str]] = Counter()
    for line in text.splitlines():
        for prefix, out in (
            ("apiserver_request_total{", count),
            ("apiserver_request_duration_seconds_sum{", seconds),
        ):
            if line.startswith(prefix):
                labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
                out[(labels.get("verb", ""), labels.get("resource", ""))] += float(line.rsplit(" ", 1)[1])
    return count, seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.controller")
    parser.add_argument("--pods", type=int, default=10000)
    parser.add_argument("--deletions", type=int, default=500)
    parser.add_argument("--rate", type=float, default=50.0, help="pod deletions a second")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument(
        "--profile", metavar="FILE", help="also write kube-apiserver's CPU profile of the deletions to FILE"
    )
    args = parser.parse_args(argv)
    cluster = start_cluster("bench.controller")
    work = cluster.work
    controller: subprocess.Popen[bytes] | None = None
    rows: list[tuple[str, str, str, str]] = []
    try:
        creds = load_kubeconfig(cluster.admin_kubeconfig)
        client = KubeClient(creds, timeout=(5.0, 120.0))
        store = KubernetesStore(client, NS, str(work / "locks"))
        t0 = time.perf_counter()
        uids = populate(client, store, args.pods)
        print(
            f"populated {len(uids)} pods, {2 * len(uids)} leases in {time.perf_counter() - t0:.0f}s",
            file=sys.stderr,
        )

        # -- the full ipam-reconcile pass --------------------------------------------------------
        base = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{NS}"
        lists = timed(
            lambda: [
                list_all(client, p)
                for p in ("/api/v1/pods", f"{base}/ippools", f"{base}/overlappingrangeipreservations")
            ]
        )
        out = io.StringIO()
        reconcile = timed(
            lambda: reconcile_main(
                ["--kubeconfig", cluster.admin_kubeconfig, "--namespace", NS, "--grace", "300"], out=out
            )
        )
        summary = out.getvalue().strip().splitlines()[-1]
        rows.append(
            (
                "full ipam-reconcile pass",
                f"{reconcile:.2f} s",
                f"{reconcile / lists:.2f}x",
                f"bare paged LISTs of pods, IPPools, reservations: {lists:.2f} s ({summary})",
            )
        )

        # -- the controller's memory -----------------------------------------------------------
        metrics, probes = free_port(), free_port()
        command = [
            str(VENV_BIN / "ipam-controller"), "--leader-elect", "--kubeconfig", cluster.admin_kubeconfig, "--namespace", NS,
            "--metrics-bind-address", f"127.0.0.1:{metrics}", "--health-probe-bind-address", f"127.0.0.1:{probes}",
        ]  # fmt: skip
        controller = subprocess.Popen(command, stderr=open(work / "controller.log", "wb"))  # noqa: SIM115
        wait_http(f"http://127.0.0.1:{probes}/readyz")
        time.sleep(3)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=120) as r:
            scraped = r.read().decode()
        allocated = sum(
            float(line.rsplit(" ", 1)[1])
            for line in scraped.splitlines()
            if line.startswith("whereabouts_py_pool_allocated_addresses{")
        )
        now_rss, peak = rss(controller.pid)
        floor, _ = child_rss(IMPORTS, cluster.admin_kubeconfig)
        full, full_peak = child_rss(K8S_FULL, cluster.admin_kubeconfig)
        meta, meta_peak = child_rss(K8S_META, cluster.admin_kubeconfig)
        rows.append(
            (
                "controller RSS, listed + scraped",
                f"{now_rss:.0f} MB (peak {peak:.0f})",
                f"{now_rss / floor:.2f}x",
                f"same imports, nothing listed: {floor:.0f} MB; metrics saw {allocated:.0f} leases",
            )
        )
        rows.append(
            (
                "kubernetes client holding the pods as V1Pod",
                f"{full:.0f} MB (peak {full_peak:.0f})",
                f"{full / floor:.2f}x",
                "what a whole-object informer (kopf's watch too) receives",
            )
        )
        rows.append(
            (
                "kubernetes client holding the pods as metadata dicts",
                f"{meta:.0f} MB (peak {meta_peak:.0f})",
                f"{meta / floor:.2f}x",
                "PartialObjectMetadataList, raw JSON",
            )
        )

        # -- deletion -> release at --rate deletions a second ----------------------------------------
        victims = list(uids)[: args.deletions]
        watcher = ReleaseWatchProcess(
            cluster.admin_kubeconfig,
            cluster.etcd_port,
            {
                ref: {
                    pool_name(slice_cidr(j % POOLS), f"{NETWORK}-node-{j % POOLS}"),
                    pool_name(
                        slice_cidr((j + POOLS // 2) % POOLS), f"{NETWORK}-node-{(j + POOLS // 2) % POOLS}"
                    ),
                }
                for j, ref in enumerate(victims)
            },
        )
        watcher.start()
        time.sleep(1)
        sent: dict[str, float] = {}
        start = time.monotonic()

        def delete(i: int) -> None:
            ref = victims[i]
            ns, name = ref.split("/")
            delay = start + i / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            sent[ref] = time.monotonic()
            client.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", {"gracePeriodSeconds": 0})

        requests_before = api_requests(client)
        # every process on the 2 cores: what the API server competes with for them
        cpus = {
            "controller": controller.pid,
            "kube-apiserver": cluster.apiserver.pid if cluster.apiserver else 0,
            "etcd": cluster.etcd.pid if cluster.etcd else 0,
            "the bench's watches": watcher.process.pid or 0,
            "the bench's deleters": os.getpid(),
        }
        cpu_before = {k: cpu_seconds(pid) for k, pid in cpus.items() if pid}
        profiler = None
        if args.profile:
            seconds = int(len(victims) / args.rate) + 10
            profiler = ThreadPoolExecutor(1).submit(cpu_profile, client, seconds)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(delete, range(len(victims))))
        end = time.monotonic() + 60
        while min(len(watcher.times["released"]), len(watcher.times["committed"])) < len(victims):
            if time.monotonic() > end:
                break
            time.sleep(0.2)
        drained = time.monotonic() - start
        cpu = {k: cpu_seconds(cpus[k]) - before for k, before in cpu_before.items()}
        after = api_requests(client)
        requests, took = after[0] - requests_before[0], after[1] - requests_before[1]
        watcher.close()
        if profiler is not None:
            Path(args.profile).write_bytes(profiler.result())
            print(summarize(profiler.result(), focus=FOCUS), file=sys.stderr)

        def since(kind: str) -> list[float]:
            return [watcher.times[kind][r] - sent[r] for r in victims if r in watcher.times[kind]]

        lat, ref_lat = since("committed"), since("deleted-etcd")
        seen, ref_seen = since("released"), since("deleted")
        p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
        r50, r99 = percentile(ref_lat, 0.5), percentile(ref_lat, 0.99)
        missing = len(victims) - len(lat)
        rows.append(
            (
                f"deletion -> release committed, {args.rate:g}/s, {len(victims)} pods, p50",
                f"{p50 * 1000:.0f} ms",
                f"{p50 / r50:.1f}x",
                f"deletion -> the pod's deletion committed (both read from etcd's own watch): p50 {r50 * 1000:.0f} ms",
            )
        )
        rows.append(
            (
                f"deletion -> release committed, {args.rate:g}/s, {len(victims)} pods, p99",
                f"{p99 * 1000:.0f} ms",
                f"{p99 / r99:.1f}x",
                f"p99 {r99 * 1000:.0f} ms; not released within 60 s: {missing}; mean {statistics.mean(lat) * 1000:.0f} ms",
            )
        )
        s50, s99, q50, q99 = (
            percentile(v, q) for v, q in ((seen, 0.5), (seen, 0.99), (ref_seen, 0.5), (ref_seen, 0.99))
        )
        rows.append(
            (
                "deletion -> release seen on an IPPool watch of the API server, p50 / p99",
                f"{s50 * 1000:.0f} / {s99 * 1000:.0f} ms",
                f"{s50 / q50:.1f}x / {s99 / q99:.1f}x",
                f"deletion -> DELETED on a pod watch of the API server: {q50 * 1000:.0f} / {q99 * 1000:.0f} ms; "
                f"not seen within 60 s: {len(victims) - len(seen)}",
            )
        )
        rows.append(
            (
                "CPU from the first deletion to the last release",
                f"controller {cpu.get('controller', 0.0):.1f} s",
                "",
                ", ".join(f"{k} {v:.1f} s" for k, v in cpu.items() if k != "controller")
                + f", over {drained:.1f} s of wall on {os.cpu_count()} cores",
            )
        )
        released = len(lat)
        rows.append(
            (
                "API requests from the first deletion to the last release",
                f"{sum(requests.values()) / max(1, released):.1f} per pod released",
                "",
                ", ".join(f"{verb} {resource} {n:.0f}" for (verb, resource), n in requests.most_common(8)),
            )
        )
        rows.append(
            (
                "mean time in kube-apiserver per request, same window",
                ", ".join(
                    f"{verb} {resource} {1000 * took[(verb, resource)] / n:.0f} ms"
                    for (verb, resource), n in requests.most_common(4)
                ),
                "",
                "apiserver_request_duration_seconds: from the request's arrival to its answer",
            )
        )
    finally:
        if controller is not None:
            controller.terminate()
            controller.wait(timeout=20)
        stop_cluster(cluster)

    load = os.getloadavg()[0]
    publish(
        args.results,
        f"ipam-controller at {args.pods} pods, {2 * args.pods} leases, {POOLS} slice pools",
        "bench-controller",
        f"Command: `python -m bench.controller --pods {args.pods} --deletions {args.deletions} --rate {args.rate:g}`. "
        "Server: real kube-apiserver + etcd (fsync on) from $KUBEBUILDER_ASSETS; the releases are timed by "
        f"watches in a process of their own; load average at the end {load:.1f} (the machine is shared).",
        rows,
    )
    return 0


if __name__ == "__main__":
    http.client.HTTPConnection.debuglevel = 0
    sys.exit(main())
