"""Node-slice burst: N ADDs from M nodes (one ipam-agent each, the shim exec'd under `python3 -S` as a
host does) into one range with `node_slice_size`, against a real kube-apiserver; and, in the same run,
the floor (as many bare `python3 -S -c pass` spawns from the same thread pool) and the same burst
without slices. Each burst is reported as a ratio to the floor, with API requests and 409s per ADD
taken from the API server's own `apiserver_request_total`.

    python -m bench.slices [--kubeconfig K] [--pods 1000] [--nodes 10] [--per-node 10]

Without --kubeconfig it starts etcd + kube-apiserver from $KUBEBUILDER_ASSETS (tests/kubeapi/real.py).
`node_slice_burst()` is the scenario for bench/__main__.py to call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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
from tests.cni_exec import cni_env  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
SHIM = [PYTHON, "-S", str(ROOT / "bin" / "whereabouts-py")]
AGENT = str(VENV_BIN / "ipam-agent")
_METRIC = re.compile(r'^apiserver_request_total\{([^}]*)\} (\S+)$')


@contextmanager
def agent(sock: str, node: str) -> Iterator[None]:
    env = {**os.environ, "NODENAME": node}
    proc = subprocess.Popen(
        [AGENT, "--socket", sock, "--metrics-port", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        for _ in range(400):
            if os.path.exists(sock):
                break
            time.sleep(0.025)
        else:
            raise RuntimeError("ipam-agent did not start")
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


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


def timed_pool(jobs: int, threads: int, one: Callable[[int], Any]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(one, range(jobs)))
    return time.perf_counter() - started, results


def floor(jobs: int, threads: int) -> float:
    """Wall time of spawning `jobs` bare interpreters the way the burst spawns the shim."""
    return timed_pool(jobs, threads, lambda _i: subprocess.run([PYTHON, "-S", "-c", "pass"], check=True))[0]


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
) -> dict[str, Any]:
    """One burst; `slice_size` None runs the same burst into one pool (today's default mode)."""
    socks = [str(work / f"{network}-n{n}.sock") for n in range(nodes)]
    before = requests_by_resource(metrics())
    with ExitStack() as stack:
        for n, sock in enumerate(socks):
            stack.enter_context(agent(sock, f"{network}-node-{n}"))

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
            env = cni_env("ADD", f"{network}-{i}", namespace="bench", NODENAME=f"{network}-node-{n}",
                          WHEREABOUTS_PY_AGENT_SOCKET=socks[n])
            proc = subprocess.run(SHIM, input=json.dumps(conf).encode(), env=env, capture_output=True, check=False)
            return proc.returncode, proc.stdout.decode()

        wall, results = timed_pool(pods, nodes * per_node, one)
    after = requests_by_resource(metrics())
    addresses = [json.loads(out)["ips"][0]["address"] for code, out in results if code == 0]
    failures = [out for code, out in results if code != 0]
    reqs = sum(after[k][0] - before.get(k, (0.0, 0.0))[0] for k in after)
    conflicts = sum(after[k][1] - before.get(k, (0.0, 0.0))[1] for k in after)
    return {
        "case": f"node_slice_size {slice_size}" if slice_size else "one pool (no slices)",
        "pods": pods,
        "nodes": nodes,
        "wall_s": round(wall, 2),
        "failures": len(failures),
        "duplicates": len(addresses) - len(set(addresses)),
        "api_requests_per_add": round(reqs / max(1, pods), 2),
        "409_per_add": round(conflicts / max(1, pods), 2),
        "first_failure": failures[0][:200] if failures else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slices", description=__doc__)
    parser.add_argument("--kubeconfig", help="a real cluster (default: start one from $KUBEBUILDER_ASSETS)")
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--per-node", type=int, default=10)
    parser.add_argument("--slice-size", default="/26")
    parser.add_argument("--no-baseline", action="store_true", help="skip the burst without slices")
    args = parser.parse_args()
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
            cluster = RealCluster(assets, work / "cluster").start()
            cluster.ensure_namespace("bench")
            kubeconfig = str(cluster.kubeconfig(work / "kubeconfig", "bench"))

            def metrics() -> str:
                return _raw(cluster, "/metrics")

        threads = args.nodes * args.per_node
        rows = [{"case": "floor: python3 -S spawns", "pods": args.pods, "nodes": args.nodes,
                 "wall_s": round(floor(args.pods, threads), 2)}]
        rows.append(node_slice_burst(kubeconfig, metrics, work, args.pods, args.nodes, args.per_node,
                                     args.slice_size, "10.210.0.0/16", "slices"))
        if not args.no_baseline:
            rows.append(node_slice_burst(kubeconfig, metrics, work, args.pods, args.nodes, args.per_node,
                                         None, "10.211.0.0/22", "onepool"))
        base = float(rows[0]["wall_s"])
        for row in rows:
            row["x_floor"] = round(float(row["wall_s"]) / base, 2)
        keys = ["case", "pods", "nodes", "wall_s", "x_floor", "failures", "duplicates", "api_requests_per_add", "409_per_add"]
        print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
        for row in rows:
            print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
        for row in rows:
            if row.get("first_failure"):
                print(f"first failure ({row['case']}): {row['first_failure']}")
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _raw(cluster: Any, path: str) -> str:
    import urllib.request

    req = urllib.request.Request(cluster.url + path)
    with urllib.request.urlopen(req, timeout=60, context=cluster._ssl) as r:
        return str(r.read().decode())


if __name__ == "__main__":
    sys.exit(main())
