"""Node-slice burst: N ADDs from M nodes (one ipam-agent each, the shim exec'd under `python3 -S` as a
host does) into one range with `node_slice_size`, against a real kube-apiserver; and, in the same run,
the floor (as many bare `python3 -S -c pass` spawns from the same thread pool), the same burst
through two reference agents (bench.refagent: one answering at once, one making only the
reservation POST that every ADD makes by design) and the same burst without slices. Each burst is
reported as a ratio to the floor, with API requests and 409s per ADD taken from the API server's own
`apiserver_request_total` (writer-turn requests, mostly waiters' refused creates, counted apart).

    python -m bench.slices [--kubeconfig K] [--pods 1000] [--nodes 10] [--per-node 20]

Without --kubeconfig it starts etcd + kube-apiserver from $KUBEBUILDER_ASSETS (tests/kubeapi/real.py).
`make bench-slices` runs it; `make bench` (bench/__main__.py) measures the rest. The bursts' completion
times go to docs/figures/slices.json and the burst chart (bench/charts.py; matplotlib, the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench import charts, cpu_seconds  # noqa: E402
from bench.agents import agent_running  # noqa: E402
from tests.cni_exec import cni_env, use_opt_in_flat_file  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
SHIM = [PYTHON, "-S", str(ROOT / "bin" / "whereabouts-py")]
REFERENCE_CASES = {
    "noop": "reference: shim + agent answering at once",
    "reserve": "reference: shim + agent making only the reservation POST",
}
_METRIC = re.compile(r"^apiserver_request_total\{([^}]*)\} (\S+)$")


@contextmanager
def agent(sock: str, node: str, reference: str | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """ipam-agent for simulated node `node` on `sock` (its process, for CPU accounting); with
    `reference` ("noop" or "reserve") bench.refagent in that mode instead."""
    command = None if reference is None else [sys.executable, "-m", "bench.refagent", "--mode", reference]
    with agent_running(
        sock, {**os.environ, "NODENAME": node, "PYTHONPATH": str(ROOT)}, command=command
    ) as proc:
        yield proc


def requests_by_resource(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(requests, 409s) per whereabouts resource from the API server's /metrics."""
    out: dict[str, list[float]] = {}
    for line in metrics_text.splitlines():
        m = _METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in re.findall(r'(\w+="[^"]*")', m.group(1)))
        if labels.get("group") != '"whereabouts.cni.cncf.io"':
            continue
        res = labels.get("resource", "").strip('"')
        slot = out.setdefault(res, [0.0, 0.0])
        slot[0] += float(m.group(2))
        if labels.get("code") == '"409"':
            slot[1] += float(m.group(2))
    return {k: (v[0], v[1]) for k, v in out.items()}


def children_cpu() -> float:
    """CPU of every reaped child of this process so far (the shims, and agents once stopped)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_pool(
    jobs: int, threads: int, one: Callable[[int], Any], ended: list[tuple[float, Any]] | None = None
) -> tuple[float, list[Any]]:
    """Wall time and results of `jobs` calls of `one` on `threads` threads; `ended` gets each call's
    (completion time in seconds from the start, result): bench/charts.py's burst chart."""
    started = time.perf_counter()

    def timed(i: int) -> Any:
        result = one(i)
        if ended is not None:
            ended.append((time.perf_counter() - started, result))
        return result

    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(timed, range(jobs)))
    return time.perf_counter() - started, results


def floor(jobs: int, threads: int) -> tuple[float, float]:
    """Wall time and CPU per spawn (s) of `jobs` bare interpreters spawned the way the burst spawns the shim."""
    before = children_cpu()
    wall = timed_pool(jobs, threads, lambda _i: subprocess.run([PYTHON, "-S", "-c", "pass"], check=True))[0]
    return wall, (children_cpu() - before) / max(1, jobs)


def node_slice_burst(
    kubeconfig: str,
    metrics: Callable[[], str],
    work: Path,
    pods: int,
    nodes: int,
    per_node: int,
    slice_size: str | None,
    cidr: str,
    network: str,
    server_pids: dict[str, int] | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """One burst; `slice_size` None runs the same burst into one pool (today's default mode);
    `reference` runs it through bench.refagent in that mode instead of the agents.

    CPU per ADD (ms) is reported for each side: the API server and etcd (`server_pids`, read from /proc
    around the burst), the agents (their CPU during the burst, after they have started and listen),
    and the shim execs (the CPU of the children reaped during the burst: the agents, still running,
    are not among them)."""
    socks = [str(work / f"{network}-n{n}.sock") for n in range(nodes)]
    before = requests_by_resource(metrics())
    pids = dict(server_pids or {})
    with ExitStack() as stack:
        agents = [
            stack.enter_context(agent(sock, f"{network}-node-{n}", reference)) for n, sock in enumerate(socks)
        ]
        cpu_before = {k: cpu_seconds(pid) for k, pid in pids.items()}
        agents_before = sum(cpu_seconds(a.pid) for a in agents)
        children_before = children_cpu()

        def one(i: int) -> tuple[int, str]:
            n = i % nodes
            ipam: dict[str, Any] = {
                "type": "whereabouts-py",
                "range": cidr,
                "network_name": network,
                "kubernetes": {"kubeconfig": kubeconfig},
                "data_dir": str(work / f"{network}-n{n}"),
                "retry_deadline_seconds": 180,
            }
            if slice_size:
                ipam["node_slice_size"] = slice_size
            conf = {"cniVersion": "1.0.0", "name": network, "type": "ipvlan", "ipam": ipam}
            env = cni_env(
                "ADD",
                f"{network}-{i}",
                namespace="bench",
                NODENAME=f"{network}-node-{n}",
                WHEREABOUTS_PY_AGENT_SOCKET=socks[n],
            )
            proc = subprocess.run(
                SHIM, input=json.dumps(conf).encode(), env=env, capture_output=True, check=False
            )
            return proc.returncode, proc.stdout.decode()

        ended: list[tuple[float, Any]] = []
        wall, results = timed_pool(pods, nodes * per_node, one, ended)
        cpu = {k: cpu_seconds(pid) - cpu_before[k] for k, pid in pids.items()}
        cpu["agents"] = sum(cpu_seconds(a.pid) for a in agents) - agents_before
        cpu["shims"] = children_cpu() - children_before
    after = requests_by_resource(metrics())
    addresses = [json.loads(out)["ips"][0]["address"] for code, out in results if code == 0]
    failures = [out for code, out in results if code != 0]
    # writer turns (ipam.turns) apart: a waiter's refused create is a cheap poll, not a refused write
    pools = [k for k in after if k != "writerturns"]
    reqs = sum(after[k][0] - before.get(k, (0.0, 0.0))[0] for k in pools)
    conflicts = sum(after[k][1] - before.get(k, (0.0, 0.0))[1] for k in pools)
    turns = after.get("writerturns", (0.0, 0.0))[0] - before.get("writerturns", (0.0, 0.0))[0]
    return {
        "case": REFERENCE_CASES[reference]
        if reference
        else (f"node_slice_size {slice_size}" if slice_size else "one pool (no slices)"),
        "pods": pods,
        "nodes": nodes,
        "wall_s": round(wall, 2),
        "failures": len(failures),
        "duplicates": ""
        if reference
        else len(addresses) - len(set(addresses)),  # references hand out no leases
        "api_requests_per_add": round(reqs / max(1, pods), 2),
        "409_per_add": round(conflicts / max(1, pods), 2),
        "turn_requests_per_add": round(turns / max(1, pods), 2),
        **{f"cpu_ms_per_add_{k}": round(v * 1000 / max(1, pods), 1) for k, v in cpu.items()},
        "first_failure": failures[0][:200] if failures else "",
        "completions_s": sorted(round(t, 3) for t, (code, _) in ended if code == 0),
    }


def filled_range_latency(
    kubeconfig: str, seed: Callable[[dict[str, Any]], None], work: Path, runs: int, nodes: int, per_node: int
) -> list[dict[str, Any]]:
    """ADD p50 on one node (agent + shim, DEL between, so its slice stays as it was) in an empty
    range, and in a range whose other `nodes` nodes' slices hold `per_node` leases each."""
    import statistics

    rows = []
    for label, cidr, network, fill in (
        ("empty range", "10.212.0.0/16", "empty", 0),
        (f"{nodes * per_node} leases in {nodes} other nodes' slices", "10.213.0.0/16", "filled", per_node),
    ):
        if fill:
            prefix = "10.213"
            seed(
                {
                    "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
                    "kind": "NodeSlicePool",
                    "metadata": {"name": network},
                    "spec": {"range": cidr, "sliceSize": "/24"},
                    "status": {
                        "allocations": [
                            {
                                "nodeName": f"{network}-other-{i}" if i < nodes else "",
                                "sliceRange": f"{prefix}.{i}.0/24",
                            }
                            for i in range(256)
                        ]
                    },
                }
            )
            for i in range(nodes):
                seed(
                    {
                        "apiVersion": "whereabouts.cni.cncf.io/v1alpha1",
                        "kind": "IPPool",
                        "metadata": {"name": f"{network}-{network}-other-{i}-{prefix}.{i}.0-24"},
                        "spec": {
                            "range": f"{prefix}.{i}.0/24",
                            "allocations": {
                                str(k + 1): {"id": f"s{i}-{k}", "podref": f"bench/s{i}-{k}", "ifname": "net1"}
                                for k in range(fill)
                            },
                        },
                    }
                )
        sock = str(work / f"{network}.sock")
        node = f"{network}-me"
        times = []
        with agent(sock, node):
            ipam = {
                "type": "whereabouts-py",
                "range": cidr,
                "network_name": network,
                "node_slice_size": "/24",
                "kubernetes": {"kubeconfig": kubeconfig},
                "data_dir": str(work / network),
            }
            conf = json.dumps(
                {"cniVersion": "1.0.0", "name": network, "type": "ipvlan", "ipam": ipam}
            ).encode()
            for i in range(runs + 1):
                for command in ("ADD", "DEL"):
                    env = cni_env(
                        command,
                        f"{network}-{i}",
                        namespace="bench",
                        NODENAME=node,
                        WHEREABOUTS_PY_AGENT_SOCKET=sock,
                    )
                    started = time.perf_counter()
                    proc = subprocess.run(SHIM, input=conf, env=env, capture_output=True, check=False)
                    if proc.returncode != 0:
                        raise RuntimeError(f"{label}: {command} failed: {proc.stdout.decode()}")
                    if command == "ADD" and i:  # the first claims the slice: not the steady state
                        times.append(time.perf_counter() - started)
        rows.append({"case": label, "runs": runs, "add_p50_ms": round(statistics.median(times) * 1000, 1)})
    rows[1]["x_empty"] = round(rows[1]["add_p50_ms"] / rows[0]["add_p50_ms"], 2)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slices", description=__doc__)
    parser.add_argument("--kubeconfig", help="a real cluster (default: start one from $KUBEBUILDER_ASSETS)")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10)
    # 20 per node: the 200-thread harness issue 10 states its floor for (fewer threads also cap how
    # many of a node's calls can share one pool write)
    parser.add_argument("--per-node", type=int, default=20)
    parser.add_argument("--slice-size", default="/26")
    parser.add_argument("--no-baseline", action="store_true", help="skip the burst without slices")
    parser.add_argument(
        "--fill-nodes", type=int, default=80, help="other nodes in the filled-range case (0: skip)"
    )
    parser.add_argument("--fill-per-node", type=int, default=250, help="leases in each of their slices")
    parser.add_argument("--runs", type=int, default=30, help="sequential ADDs per filled-range case")
    parser.add_argument("--no-burst", action="store_true", help="only the filled-range case")
    parser.add_argument(
        "--no-slices", action="store_true", help="only the floor and the burst without slices"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the reference agents' bursts")
    parser.add_argument(
        "--granular-crd",
        action="store_true",
        help="serve IPPools without `x-kubernetes-map-type: atomic` (per-lease managedFields), to compare",
    )
    parser.add_argument(
        "--figures",
        type=Path,
        default=charts.FIGURES,
        help="where the bursts' data (slices.json) and the charts go (default: docs/figures)",
    )
    args = parser.parse_args()
    try:
        charts.pyplot()  # before the run, not after it: the charts are part of the result
    except charts.MissingMatplotlib as exc:
        print(f"bench.slices: {exc}", file=sys.stderr)
        return 2
    use_opt_in_flat_file()  # the bench's NADs carry data_dir/kubeconfig: a single-tenant node flat file
    work = Path(tempfile.mkdtemp(prefix="whereabouts-py-bench-slices."))
    cluster: Any = None
    try:
        if args.kubeconfig:
            kubeconfig = args.kubeconfig

            def metrics() -> str:
                return ""
        else:
            from tests.kubeapi.real import RealCluster, assets_dir

            assets = assets_dir()
            if assets is None:
                print("KUBEBUILDER_ASSETS is unset: no API server to benchmark", file=sys.stderr)
                return 1
            cluster = RealCluster(assets, work / "cluster", fsync=True).start()
            cluster.ensure_namespace("bench")
            if args.granular_crd:
                _granular_ippools(cluster)
            kubeconfig = str(cluster.kubeconfig(work / "kubeconfig", "bench"))

            def metrics() -> str:
                return _raw(cluster, "/metrics")

        if not args.no_burst:
            threads = args.nodes * args.per_node
            floor_wall, floor_cpu = floor(args.pods, threads)
            rows = [
                {
                    "case": "floor: python3 -S spawns",
                    "pods": args.pods,
                    "nodes": args.nodes,
                    "wall_s": round(floor_wall, 2),
                    "cpu_ms_per_add_shims": round(floor_cpu * 1000, 1),
                }
            ]
            pids = {} if cluster is None else {"apiserver": cluster.apiserver.pid, "etcd": cluster.etcd.pid}

            def burst(
                slice_size: str | None, cidr: str, case: str, reference: str | None = None
            ) -> dict[str, Any]:
                return node_slice_burst(
                    kubeconfig, metrics, work, args.pods, args.nodes, args.per_node,
                    slice_size, cidr, case, pids, reference=reference,
                )  # fmt: skip

            if not args.no_reference and cluster is not None:
                for mode in REFERENCE_CASES:
                    rows.append(burst(None, "10.250.0.0/16", f"ref{mode}", reference=mode))
            if not args.no_slices:
                rows.append(burst(args.slice_size, "10.210.0.0/16", "slices"))
            if not args.no_baseline:
                rows.append(burst(None, "10.211.0.0/22", "onepool"))
            base = float(rows[0]["wall_s"])
            reserve = [r for r in rows if r["case"] == REFERENCE_CASES["reserve"]]
            for row in rows:
                row["x_floor"] = round(float(row["wall_s"]) / base, 2)
                if reserve and not row["case"].startswith(("floor", "reference")):
                    # against the least any ADD can cost here (exec + socket + its one reservation POST)
                    row["x_reserve_ref"] = round(float(row["wall_s"]) / float(reserve[0]["wall_s"]), 2)
            keys = [
                "case",
                "pods",
                "nodes",
                "wall_s",
                "x_floor",
                "x_reserve_ref",
                "failures",
                "duplicates",
                "api_requests_per_add",
                "409_per_add",
                "turn_requests_per_add",
            ]
            print(_table(rows, keys))
            print()
            cpu_keys = ["case", *[f"cpu_ms_per_add_{k}" for k in ("shims", "agents", "apiserver", "etcd")]]
            print("CPU per ADD (ms), by process:")
            print(_table(rows, cpu_keys))
            for row in rows:
                if row.get("first_failure"):
                    print(f"first failure ({row['case']}): {row['first_failure']}")
            save_bursts(
                args.figures, rows, "real kube-apiserver + etcd (started here)" if cluster else "--kubeconfig"
            )
        if args.fill_nodes and cluster is not None:
            fill = filled_range_latency(
                kubeconfig,
                lambda obj: cluster.apply(obj, namespace="bench"),
                work,
                args.runs,
                args.fill_nodes,
                args.fill_per_node,
            )
            print()
            print(_table(fill, ["case", "runs", "add_p50_ms", "x_empty"]))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def save_bursts(figures: Path, rows: list[dict[str, Any]], server: str) -> None:
    """The bursts' completion times (not the floor's, nor the references') as slices.json, and the charts."""
    bursts = {
        f"{row['case']}, {row['nodes']} nodes with agents": {
            "completions_s": row["completions_s"], "failures": row["failures"], "pods": row["pods"]}
        for row in rows if row.get("completions_s") and not row["case"].startswith(("floor", "reference"))
    }  # fmt: skip
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": f"python -m bench.slices {' '.join(sys.argv[1:])}",
        "server": server,
        "load_average": round(os.getloadavg()[0], 1),
        "bursts": bursts,
    }
    data = charts.save_data(figures / "slices.json", doc)
    for path in charts.render(charts.default_data(figures), figures):
        print(f"chart: {path} (data: {data.name})", file=sys.stderr)


def _granular_ippools(cluster: Any) -> None:
    path = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/ippools.whereabouts.cni.cncf.io"
    crd = cluster.request("GET", path)
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    props["allocations"].pop("x-kubernetes-map-type", None)
    cluster.request("PUT", path, crd)
    cluster.wait_established("ippools.whereabouts.cni.cncf.io")
    time.sleep(2)  # the new schema reaches the IPPool handler


def _table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows])


def _raw(cluster: Any, path: str) -> str:
    import urllib.request

    req = urllib.request.Request(cluster.url + path)
    with urllib.request.urlopen(req, timeout=60, context=cluster._ssl) as r:
        return str(r.read().decode())


if __name__ == "__main__":
    sys.exit(main())
