"""make bench: ADD latency (file, kubernetes; direct and agent mode; host-local and a bare interpreter
start as same-run references), a burst of concurrent ADDs from simulated nodes into one pool, ADD cost
as a pool fills, concurrent direct-mode ADDs, and what the IPPool CRD's allocations schema costs a write.

The server: a real kube-apiserver + etcd started here (etcd with fsync on, as in production) when
KUBEBUILDER_ASSETS names their directory (tests/kubeapi/real.py, the suite's fixture); --kubeconfig for
a cluster of your own; else, said loudly, the suite's Python API test server with injected latency.
On the real server the plugin runs as its own ServiceAccount (deploy/ RBAC). Every whereabouts-py
call is the CNI executable as a host runs it: bin/whereabouts-py under /usr/bin/python3 -S.
Prints a report and appends it, with date, commit, machine, server and command, to bench/RESULTS.md;
saves every timed ADD of part a and each burst's completion times in docs/figures/bench.json and draws
them (bench/charts.py, matplotlib: the `bench` extra, checked before anything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import charts  # noqa: E402
from bench.agents import AGENT, agent_running  # noqa: E402
from tests.cni_exec import cni_env as exec_env  # noqa: E402  (the runtime's env, shared with the suite)
from tests.cni_exec import use_opt_in_flat_file  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PLUGIN = str(VENV_BIN / "whereabouts-py")  # the installed console script: direct mode when no agent answers
# The CNI executable as a host runs it: bin/whereabouts-py under the system interpreter with -S (standard
# library only; direct mode hands the call to the venv's interpreter). Never a pyenv shim on PATH.
SYSTEM_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
SHIM = [SYSTEM_PYTHON, "-S", str(ROOT / "bin" / "whereabouts-py")]
HOST_LOCAL = "/usr/lib/cni/host-local"
RESULTS = ROOT / "bench" / "RESULTS.md"
NO_AGENT = "/nonexistent/whereabouts-py-agent.sock"
FALLBACKS: list[str] = []  # calls meant for an agent that ran in direct mode instead
LATENCIES: dict[str, list[float]] = {}  # case -> every timed ADD (ms), for the charts (bench/charts.py)


def cni_env(command: str, container: str, sock: str = NO_AGENT, node: str = "node-0") -> dict[str, str]:
    extra = (
        {"WHEREABOUTS_PY_AGENT_WAIT": "0"} if sock == NO_AGENT else {}
    )  # direct mode: no agent to wait for
    return exec_env(
        command, container, namespace="bench", NODENAME=node, WHEREABOUTS_PY_AGENT_SOCKET=sock, **extra
    )


def exec_plugin(binary: str | list[str], conf: dict[str, Any], env: dict[str, str]) -> tuple[float, int, str]:
    argv = [binary] if isinstance(binary, str) else binary
    started = time.perf_counter()
    proc = subprocess.run(argv, input=json.dumps(conf).encode(), env=env, capture_output=True, check=False)
    if b"agent.unavailable" in proc.stderr and env.get("WHEREABOUTS_PY_AGENT_SOCKET") != NO_AGENT:
        FALLBACKS.append(env["CNI_CONTAINERID"])
    return time.perf_counter() - started, proc.returncode, proc.stdout.decode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


class Cluster:
    """The server under test: a real kube-apiserver started here, a cluster's kubeconfig, or the API
    test server. `kubeconfig` is the plugin's; `admin_kubeconfig` seeds and reads pools."""

    def __init__(self, kubeconfig: str | None, latency_ms: float, workdir: Path, server: str) -> None:
        self.server: Any = None
        self.api: Any = None
        self.real: Any = None  # tests.kubeapi.real.RealCluster when started here
        if kubeconfig:
            self.kubeconfig = self.admin_kubeconfig = kubeconfig
            self.label = f"a cluster of your own (--kubeconfig {kubeconfig})"
        elif server == "apiserver":
            from tests.kubeapi.real import RealCluster, RealKube, assets_dir

            assets = assets_dir()
            assert assets is not None
            # fsync on: a benchmark measures etcd as production runs it (never --unsafe-no-fsync)
            self.real = RealCluster(assets, workdir / "apiserver", fsync=True).start()
            kube = RealKube(self.real, "bench", workdir)
            self.kubeconfig = kube.plugin_kubeconfig()  # the plugin's own ServiceAccount
            self.admin_kubeconfig = kube.kubeconfig_path
            version = self.real.request("GET", "/version")["gitVersion"]
            etcd = subprocess.run(
                [str(assets / "etcd"), "--version"], capture_output=True, text=True, check=False
            ).stdout.split("\n")[0]
            self.label = (
                f"the real kube-apiserver {version} + {etcd.replace('Version: ', '')} (fsync on) from "
                f"KUBEBUILDER_ASSETS={assets}, the plugin as its own ServiceAccount"
            )
        else:
            from tests.kubeapi.server import APIServer, KubeAPI, write_kubeconfig

            self.api = KubeAPI()
            self.api.set_faults(latency=latency_ms / 1000)
            self.server = APIServer(self.api).start()
            self.kubeconfig = self.admin_kubeconfig = str(
                write_kubeconfig(workdir / "kubeconfig", self.server.url)
            )
            self.label = (
                f"the Python API test server, {latency_ms:g} ms injected per request (not a real server)"
            )

    def conf(self, cidr: str, data_dir: Path, network: str) -> dict[str, Any]:
        return {
            "cniVersion": "1.0.0",
            "name": network,
            "type": "ipvlan",
            "ipam": {
                "type": "whereabouts-py",
                "range": cidr,
                "datastore": "kubernetes",
                "network_name": network,
                "kubernetes": {"kubeconfig": self.kubeconfig},
                "data_dir": str(data_dir),
                "retry_deadline_seconds": 180,
            },
        }

    def counts(self) -> dict[str, int]:
        if self.api is None:
            return {}
        return {
            k: self.api.count(*k.split(":"))
            for k in (
                "get:ippools",
                "update:ippools",
                "conflict:ippools",
                "create:overlappingrangeipreservations",
            )
        }

    def seed(self, network: str, cidr: str, leases: int) -> None:
        from kubernetes import client, config

        from ipam.ranges import pool_name

        api = client.CustomObjectsApi(config.new_client_from_config(config_file=self.admin_kubeconfig))
        allocations = {
            str(i + 1): {"id": f"seed{i}", "podref": f"bench/seed{i}", "ifname": "net1"}
            for i in range(leases)
        }
        body = {
            "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
            "kind": "IPPool",
            "metadata": {"name": pool_name(cidr, network)},
            "spec": {"range": cidr, "allocations": allocations},
        }
        ns = self.namespace()
        api.create_namespaced_custom_object("whereabouts.cni.cncf.io", "v1alpha1", ns, "ippools", body)

    def namespace(self) -> str:
        from kubernetes import config

        _, active = config.list_kube_config_contexts(config_file=self.admin_kubeconfig)
        return str((active or {}).get("context", {}).get("namespace") or "kube-system")

    def pool_leases(self, network: str, cidr: str) -> dict[str, dict[str, str]]:
        from kubernetes import client, config

        from ipam.ranges import pool_name

        api = client.CustomObjectsApi(config.new_client_from_config(config_file=self.admin_kubeconfig))
        obj: Any = api.get_namespaced_custom_object(
            "whereabouts.cni.cncf.io", "v1alpha1", self.namespace(), "ippools", pool_name(cidr, network)
        )
        return dict(obj["spec"]["allocations"])

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        if self.real is not None:
            self.real.stop()


def sequential(
    label: str, binary: str | list[str], conf: dict[str, Any], runs: int, sock: str = NO_AGENT
) -> dict[str, Any]:
    times = []
    tag = "".join(ch if ch.isalnum() else "-" for ch in label)
    for i in range(runs):
        seconds, code, out = exec_plugin(binary, conf, cni_env("ADD", f"{tag}-{i}", sock))
        if code != 0:
            raise RuntimeError(f"{label}: ADD failed: {out}")
        times.append(seconds)
        exec_plugin(binary, conf, cni_env("DEL", f"{tag}-{i}", sock))  # keep the pool at a constant size
    LATENCIES[label] = [round(t * 1000, 1) for t in times]
    return {
        "case": label,
        "runs": runs,
        "p50_ms": ms(statistics.median(times)),
        "p95_ms": ms(pct(times, 0.95)),
    }


PYTHON_START = "bare interpreter start (reference)"
HOST_LOCAL_CASE = "host-local (reference floor)"


def python_start(runs: int) -> dict[str, Any]:
    """The floor of any Python CNI executable: `/usr/bin/python3 -S -I -c pass`."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([SYSTEM_PYTHON, "-S", "-I", "-c", "pass"], check=True)
        times.append(time.perf_counter() - started)
    LATENCIES[PYTHON_START] = [round(t * 1000, 1) for t in times]
    return {
        "case": PYTHON_START,
        "runs": runs,
        "p50_ms": ms(statistics.median(times)),
        "p95_ms": ms(pct(times, 0.95)),
    }


def part_a(cluster: Cluster, work: Path, runs: int) -> list[dict[str, Any]]:
    rows = []
    hl_conf = {
        "cniVersion": "1.0.0",
        "name": "hl",
        "type": "ipvlan",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.201.0.0/16"}]],
            "dataDir": str(work / "hl"),
        },
    }
    rows.append(python_start(runs))
    if os.access(HOST_LOCAL, os.X_OK):
        rows.append(sequential(HOST_LOCAL_CASE, HOST_LOCAL, hl_conf, runs))
    file_conf = {
        "cniVersion": "1.0.0",
        "name": "f",
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": "10.202.0.0/16",
            "datastore": "file",
            "data_dir": str(work / "file"),
        },
    }
    rows.append(sequential("file, direct", SHIM, file_conf, runs))
    kube_conf = cluster.conf("10.203.0.0/16", work / "node-a", "seq")
    rows.append(sequential("kubernetes, direct", SHIM, kube_conf, runs))
    sock = str(work / "agent-a.sock")
    with agent_running(sock):
        rows.append(sequential("file, agent (shim)", SHIM, file_conf, runs, sock))
        rows.append(sequential("kubernetes, agent (shim)", SHIM, kube_conf, runs, sock))
    return rows


def part_b(cluster: Cluster, work: Path, pods: int, nodes: int, per_node: int) -> dict[str, Any]:
    cidr, network = "10.204.0.0/20", "burst"
    socks = [str(work / f"burst-node{n}.sock") for n in range(nodes)]
    before = cluster.counts()
    FALLBACKS.clear()
    with contextlib_exit_stack() as stack:
        for sock in socks:
            stack.enter_context(agent_running(sock))

        def one(i: int) -> tuple[int, str, float]:
            node = i % nodes
            conf = cluster.conf(cidr, work / f"burst-node{node}", network)
            _, code, out = exec_plugin(SHIM, conf, cni_env("ADD", f"burst-{i}", socks[node], f"node-{node}"))
            return code, out, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=nodes * per_node) as pool:
            done = list(pool.map(one, range(pods)))
        wall = time.perf_counter() - started
    results = [(code, out) for code, out, _ in done]
    failures = [out for code, out in results if code != 0]
    addresses = [json.loads(out)["ips"][0]["address"] for code, out in results if code == 0]
    leases = cluster.pool_leases(network, cidr)
    completions = [round(t, 3) for code, _, t in done if code == 0]
    after = cluster.counts()
    delta = {k: after[k] - before.get(k, 0) for k in after}
    return {
        "pods": pods,
        "nodes": nodes,
        "concurrent_per_node": per_node,
        "wall_s": f"{wall:.2f}",
        "adds_per_s": f"{len(addresses) / wall:.1f}",
        "failures": len(failures),
        "duplicates": len(addresses) - len(set(addresses)),
        "leases_in_pool": len(leases),
        "direct_fallbacks": len(FALLBACKS),
        "pool_GETs": delta.get("get:ippools", "n/a"),
        "pool_PUTs": delta.get("update:ippools", "n/a"),
        "conflicts_409": delta.get("conflict:ippools", "n/a"),
        "first_failure": failures[0][:200] if failures else "",
        "completions_s": completions,
    }


@contextmanager
def contextlib_exit_stack() -> Iterator[Any]:
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield stack


def part_c(cluster: Cluster, work: Path, runs: int, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    sock = str(work / "agent-c.sock")
    with agent_running(sock):
        for size in sizes:
            network = f"fill{size}"
            cidr = "10.208.0.0/16"
            cluster.seed(network, cidr, size)
            conf = cluster.conf(cidr, work / "node-c", network)
            for mode, binary, s in (("direct", SHIM, NO_AGENT), ("agent", SHIM, sock)):
                row = sequential(f"{size} leases, {mode}", binary, conf, runs, s)
                rows.append(row)
    return rows


def part_d(cluster: Cluster, work: Path, pods: int, nodes: int) -> dict[str, Any]:
    """`pods` direct-mode ADDs (no agent) started at once from `nodes` simulated nodes, one pool."""
    cidr, network = "10.209.0.0/20", "direct-burst"

    def one(i: int) -> tuple[float, int, str]:
        node = i % nodes
        conf = cluster.conf(cidr, work / f"direct-node{node}", network)
        seconds, code, out = exec_plugin(SHIM, conf, cni_env("ADD", f"direct-{i}", NO_AGENT, f"node-{node}"))
        ended[i] = time.perf_counter() - started
        return seconds, code, out

    ended: dict[int, float] = {}

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=pods) as pool:
        results = list(pool.map(one, range(pods)))
    wall = time.perf_counter() - started
    addresses = [json.loads(out)["ips"][0]["address"] for _, code, out in results if code == 0]
    failures = [out for _, code, out in results if code != 0]
    return {
        "pods": pods,
        "nodes": nodes,
        "wall_s": f"{wall:.2f}",
        "call_p50_ms": ms(statistics.median(t for t, _, _ in results)),
        "call_max_ms": ms(max(t for t, _, _ in results)),
        "failures": len(failures),
        "duplicates": len(addresses) - len(set(addresses)),
        "leases_in_pool": len(cluster.pool_leases(network, cidr)),
        "first_failure": failures[0][:200] if failures else "",
        "completions_s": [round(ended[i], 3) for i, (_, code, _) in enumerate(results) if code == 0],
    }


def part_e(cluster: Cluster, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    """What the IPPool CRD's schema of spec.allocations costs a write (real server only): the same PUT
    (one lease added to an N-lease pool, admin, at its resourceVersion) with the previous declaration
    (a schema per lease) granular and `x-kubernetes-map-type: atomic`, and the repo's (atomic, opaque:
    preserve-unknown-fields, no per-lease schema); the API server's CPU per PUT and the stored object's
    size. The repo's CRD is restored after. bench/poolwrite.py measures the last two more closely."""
    from bench import cpu_seconds
    from bench.poolwrite import PREVIOUS_ALLOCATIONS, our_lease
    from tests.kubeapi.real import ApiError

    real = cluster.real
    crd_url = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ippools.whereabouts.cni.cncf.io"
    rows = []
    original = real.request("GET", crd_url)
    for variant in ("granular, per-lease schema", "atomic, per-lease schema", "atomic, opaque"):
        crd = json.loads(json.dumps(original))
        crd["metadata"]["resourceVersion"] = real.request("GET", crd_url)["metadata"]["resourceVersion"]
        properties = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]
        if "per-lease schema" in variant:
            properties["allocations"] = json.loads(json.dumps(PREVIOUS_ALLOCATIONS))
        if variant.startswith("granular"):
            properties["allocations"].pop("x-kubernetes-map-type", None)
        real.request("PUT", crd_url, crd)
        real.wait_established("ippools.whereabouts.cni.cncf.io")
        real.wait_crs_served()
        namespace = "crd-" + variant.replace(",", "").replace(" ", "-")
        real.ensure_namespace(namespace)
        base = f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{namespace}/ippools"
        for size in sizes:
            name = f"p{size}"
            try:
                real.request(
                    "POST",
                    base,
                    {
                        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
                        "kind": "IPPool",
                        "metadata": {"name": name},
                        "spec": {
                            "range": "10.0.0.0/16",
                            "allocations": {str(i): our_lease(i) for i in range(1, size + 1)},
                        },
                    },
                )
            except ApiError as exc:  # e.g. etcd's request limit: that finding is the row
                rows.append({"allocations": variant, "leases": size, "reps": 0, "GET_p50_ms": "-",
                             "PUT_p50_ms": f"refused: HTTP {exc.status} {str(exc).split(': ', 2)[-1][:90]}",
                             "PUT_apiserver_cpu_ms": "-",
                             "object_kB": "-", "managedFields_kB": "-"})  # fmt: skip
                continue
            gets, puts, cpu = [], [], 0.0
            for rep in range(reps):
                started = time.perf_counter()
                obj = real.request("GET", f"{base}/{name}")
                gets.append(time.perf_counter() - started)
                obj["metadata"].pop("managedFields", None)  # as the plugin sends it
                obj["spec"]["allocations"][str(size + 1 + rep)] = our_lease(size + 1 + rep)
                before = cpu_seconds(real.apiserver.pid)
                started = time.perf_counter()
                real.request("PUT", f"{base}/{name}", obj)
                puts.append(time.perf_counter() - started)
                cpu += cpu_seconds(real.apiserver.pid) - before
            stored = real.request("GET", f"{base}/{name}")
            rows.append(
                {
                    "allocations": variant,
                    "leases": size,
                    "reps": reps,
                    "GET_p50_ms": ms(statistics.median(gets)),
                    "PUT_p50_ms": ms(statistics.median(puts)),
                    "PUT_apiserver_cpu_ms": f"{cpu * 1000 / reps:.0f}",
                    "object_kB": f"{len(json.dumps(stored, separators=(',', ':'))) / 1000:.0f}",
                    "managedFields_kB": f"{len(json.dumps(stored['metadata'].get('managedFields'))) / 1000:.1f}",
                }
            )
    original["metadata"]["resourceVersion"] = real.request("GET", crd_url)["metadata"]["resourceVersion"]
    real.request("PUT", crd_url, original)
    real.wait_established("ippools.whereabouts.cni.cncf.io")
    real.wait_crs_served()
    return rows


def figures(a: list[dict[str, Any]], b: dict[str, Any], c: list[dict[str, Any]], d: dict[str, Any]) -> str:
    """Issue 9's four figures, each beside its ratio to this run's references."""
    by_case = {row["case"]: float(row["p50_ms"]) for row in a + c}
    py = by_case.get(PYTHON_START)
    hl = by_case.get(HOST_LOCAL_CASE)
    fill = max((row for row in c if row["case"].endswith(", agent")), key=lambda r: int(r["case"].split()[0]))
    rows = [
        (f"{b['pods']} ADDs from {b['nodes']} nodes (agents) into one pool", f"{b['wall_s']} s",
         float(b["wall_s"]) * 1000 / b["pods"], "179 s (5.6/s)"),
        (f"agent ADD p50, pool of {fill['case'].split()[0]} leases", f"{fill['p50_ms']} ms",
         float(fill["p50_ms"]), "2,780 ms"),
        ("direct-mode ADD p50 (kubernetes)", f"{by_case['kubernetes, direct']} ms",
         by_case["kubernetes, direct"], "820-1,080 ms"),
        (f"{d['pods']} concurrent direct-mode ADDs", f"{d['wall_s']} s",
         float(d["wall_s"]) * 1000 / d["pods"], "108.6 s"),
    ]  # fmt: skip
    lines = [
        "| figure | this run | per ADD (ms) | x bare python start | x host-local ADD | issue 9 (real server) |",
        "|---|---|---|---|---|---|",
    ]
    for name, value, per_add, issue in rows:
        ratio_py = f"{per_add / py:.1f}" if py else "n/a"
        ratio_hl = f"{per_add / hl:.0f}" if hl else "n/a"
        lines.append(f"| {name} | {value} | {per_add:.1f} | {ratio_py} | {ratio_hl} | {issue} |")
    lines += [
        "",
        f"References, same run: bare `{SYSTEM_PYTHON} -S -I -c pass` p50 {py} ms; host-local ADD p50 {hl} ms.",
    ]
    return "\n".join(lines)


def _burst(row: dict[str, Any]) -> dict[str, Any]:
    return {"completions_s": row["completions_s"], "failures": row["failures"], "pods": row["pods"]}


def table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        or "unknown"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (
        f"commit {commit}{' (+uncommitted changes)' if dirty else ''}; {platform.machine()}, "
        f"{os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def main() -> int:
    from tests.kubeapi.real import ASSETS_ENV, assets_dir

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--kubeconfig", help="benchmark a cluster of your own instead of starting a server")
    parser.add_argument(
        "--server",
        choices=("apiserver", "testserver"),
        default="apiserver" if assets_dir() is not None else "testserver",
        help=f"without --kubeconfig: the real kube-apiserver from ${ASSETS_ENV} (default when it is set) "
        "or the Python API test server",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=5.0, help="latency injected per API request (test server)"
    )
    parser.add_argument("--runs", type=int, default=30, help="sequential ADDs per latency case")
    parser.add_argument("--pods", type=int, default=1000, help="ADDs in the burst")
    parser.add_argument("--nodes", type=int, default=10, help="simulated nodes (one agent each) in the burst")
    parser.add_argument("--per-node", type=int, default=10, help="concurrent ADDs per node in the burst")
    parser.add_argument("--fill", default="0,1000,10000", help="pool sizes for the fill test")
    parser.add_argument("--direct", type=int, default=100, help="concurrent direct-mode ADDs (no agent)")
    parser.add_argument(
        "--crd-sizes", default="1000,10000", help="pool sizes for the CRD schema cost (real server)"
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md"
    )
    parser.add_argument(
        "--figures",
        type=Path,
        default=charts.FIGURES,
        help="where the run's data (bench.json) and charts go (default: docs/figures)",
    )
    args = parser.parse_args()
    try:
        charts.pyplot()  # before the run, not after it: the charts are part of the result
    except charts.MissingMatplotlib as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if not os.access(PLUGIN, os.X_OK) or not os.access(AGENT, os.X_OK):
        print(
            f"whereabouts-py / ipam-agent not installed next to {sys.executable}; run 'make bench'",
            file=sys.stderr,
        )
        return 1
    if args.server == "apiserver" and not args.kubeconfig and assets_dir() is None:
        print(f"--server apiserver needs {ASSETS_ENV} (see README, 'Testing against a real kube-apiserver')",
              file=sys.stderr)  # fmt: skip
        return 1
    if args.server == "testserver" and not args.kubeconfig:
        print(
            f"bench: {'--server testserver' if assets_dir() else ASSETS_ENV + ' is unset'}: measuring the "
            "Python API test server, NOT a real kube-apiserver; "
            "its figures are not comparable with a cluster's",
            file=sys.stderr,
        )
    use_opt_in_flat_file()  # the bench's NADs carry data_dir/kubeconfig: a single-tenant node flat file
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="whereabouts-py-bench."))
    cluster = Cluster(args.kubeconfig, args.latency_ms, work, args.server)
    e: list[dict[str, Any]] = []
    try:
        print(f"server: {cluster.label}", file=sys.stderr)
        print("(a) sequential ADD latency ...", file=sys.stderr)
        a = part_a(cluster, work, args.runs)
        print(table(a), file=sys.stderr)
        print("(b) burst ...", file=sys.stderr)
        b = part_b(cluster, work, args.pods, args.nodes, args.per_node)
        print(table([{k: v for k, v in b.items() if k != "completions_s"}]), file=sys.stderr)
        print("(c) ADD as the pool fills ...", file=sys.stderr)
        c = part_c(cluster, work, max(5, args.runs // 3), [int(x) for x in args.fill.split(",") if x])
        print(table(c), file=sys.stderr)
        print("(d) concurrent direct-mode ADDs ...", file=sys.stderr)
        d = part_d(cluster, work, args.direct, args.nodes)
        print(table([{k: v for k, v in d.items() if k != "completions_s"}]), file=sys.stderr)
        if cluster.real is not None:
            print("(e) IPPool CRD allocations schema ...", file=sys.stderr)
            e = part_e(cluster, [int(x) for x in args.crd_sizes.split(",") if x], reps=5)
            print(table(e), file=sys.stderr)
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    report = "\n".join(
        [
            f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Command: `make bench` (`python -m bench {' '.join(sys.argv[1:])}`).",
            f"Server: {cluster.label}.",
            f"Machine: {machine()}; 1-minute load average {load_start:.1f} at the start, "
            f"{os.getloadavg()[0]:.1f} at the end (the references come from part a: compare ratios, not ms).",
            f"Every whereabouts-py call: `{' '.join(SHIM)}` (direct mode: no agent socket).",
            "",
            "Issue 9's figures, each beside its ratio to this run's references:",
            "",
            figures(a, b, c, d),
            "",
            "(a) Sequential ADD latency, each ADD a fresh exec of the plugin as a runtime does (DEL between, untimed):",
            "",
            table(a),
            "",
            f"(b) Burst: {b['pods']} ADDs from {b['nodes']} simulated nodes (one agent each), {b['concurrent_per_node']} "
            "concurrent per node, into one pool:",
            "",
            table([{k: v for k, v in b.items() if k not in ("first_failure", "completions_s")}]),
            *(["", f"First failure: `{b['first_failure']}`"] if b["first_failure"] else []),
            "",
            "(c) ADD latency as the pool fills (pool pre-seeded with N leases):",
            "",
            table(c),
            "",
            f"(d) {d['pods']} direct-mode ADDs (no agent) started at once from {d['nodes']} simulated nodes, one pool:",
            "",
            table([{k: v for k, v in d.items() if k not in ("first_failure", "completions_s")}]),
            *(["", f"First failure: `{d['first_failure']}`"] if d["first_failure"] else []),
            *(
                [
                    "",
                    "(e) IPPool CRD, `spec.allocations` with a schema per lease (the previous CRD) granular vs "
                    "`x-kubernetes-map-type: atomic`, vs atomic and opaque (preserve-unknown-fields, no per-lease "
                    "schema: the repo's CRD): one lease added to an N-lease pool by PUT at its resourceVersion "
                    "(admin; managedFields left out as the plugin does):",
                    "",
                    table(e),
                ]
                if e
                else []
            ),
            "",
        ]
    )
    print(report)
    data = charts.save_data(
        args.figures / "bench.json",
        {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": f"python -m bench {' '.join(sys.argv[1:])}",
            "server": cluster.label,
            "machine": machine(),
            "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)],
            "latency_ms": {row["case"]: LATENCIES[row["case"]] for row in a},
            "references": [PYTHON_START, HOST_LOCAL_CASE],
            "bursts": {
                f"one pool, {b['nodes']} nodes with agents": _burst(b),
                f"one pool, {d['pods']} direct-mode ADDs at once": _burst(d),
            },
        },
    )
    for path in charts.render(charts.default_data(args.figures), args.figures):
        print(f"chart: {path} (data: {data.name})", file=sys.stderr)
    if not args.no_write:
        if not RESULTS.exists():
            header = "# Benchmark results\n\nAppended by `make bench`; newest last.\n\n"
        else:  # a blank line before the new section's heading, whatever the file ends with
            header = "" if RESULTS.read_text().endswith("\n\n") else "\n"
        with RESULTS.open("a") as fh:
            fh.write(header + report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
