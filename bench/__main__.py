"""make bench: ADD latency (file, kubernetes; direct and agent mode; host-local as the floor), a burst
of concurrent ADDs from simulated nodes into one pool, and ADD cost as a pool fills.

Runs against the suite's Kubernetes API test server (real HTTP on loopback, optional injected
latency per request) unless --kubeconfig names a real cluster. Prints a report and appends it,
with date, commit, machine and the command line, to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
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
from tests.cni_exec import cni_env as exec_env  # noqa: E402  (the runtime's env, shared with the suite)
from tests.cni_exec import use_opt_in_flat_file  # noqa: E402

VENV_BIN = Path(sys.executable).parent
PLUGIN = str(VENV_BIN / "whereabouts-py")  # the installed console script: direct mode when no agent answers
# The shim as a host runs it: bin/whereabouts-py under the system interpreter with -S (standard library only).
SHIM = [
    shutil.which("python3", path="/usr/bin:/bin") or sys.executable,
    "-S",
    str(ROOT / "bin" / "whereabouts-py"),
]
AGENT = str(VENV_BIN / "ipam-agent")
HOST_LOCAL = "/usr/lib/cni/host-local"
RESULTS = ROOT / "bench" / "RESULTS.md"
NO_AGENT = "/nonexistent/whereabouts-py-agent.sock"
FALLBACKS: list[str] = []  # calls meant for an agent that ran in direct mode instead


def cni_env(command: str, container: str, sock: str = NO_AGENT, node: str = "node-0") -> dict[str, str]:
    return exec_env(command, container, namespace="bench", NODENAME=node, WHEREABOUTS_PY_AGENT_SOCKET=sock)


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


@contextmanager
def agent_running(sock: str) -> Iterator[None]:
    proc = subprocess.Popen(
        [AGENT, "--socket", sock, "--metrics-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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


class Cluster:
    """The API test server (or a real cluster's kubeconfig) plus helpers to read pools."""

    def __init__(self, kubeconfig: str | None, latency_ms: float, workdir: Path) -> None:
        self.server: Any = None
        self.api: Any = None
        if kubeconfig:
            self.kubeconfig = kubeconfig
        else:
            from tests.kubeapi.server import APIServer, KubeAPI, write_kubeconfig

            self.api = KubeAPI()
            self.api.set_faults(latency=latency_ms / 1000)
            self.server = APIServer(self.api).start()
            self.kubeconfig = str(write_kubeconfig(workdir / "kubeconfig", self.server.url))

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

        api = client.CustomObjectsApi(config.new_client_from_config(config_file=self.kubeconfig))
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

        _, active = config.list_kube_config_contexts(config_file=self.kubeconfig)
        return str((active or {}).get("context", {}).get("namespace") or "kube-system")

    def pool_leases(self, network: str, cidr: str) -> dict[str, dict[str, str]]:
        from kubernetes import client, config

        from ipam.ranges import pool_name

        api = client.CustomObjectsApi(config.new_client_from_config(config_file=self.kubeconfig))
        obj: Any = api.get_namespaced_custom_object(
            "whereabouts.cni.cncf.io", "v1alpha1", self.namespace(), "ippools", pool_name(cidr, network)
        )
        return dict(obj["spec"]["allocations"])

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


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
    return {
        "case": label,
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
    if os.access(HOST_LOCAL, os.X_OK):
        rows.append(sequential("host-local (reference floor)", HOST_LOCAL, hl_conf, runs))
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
    rows.append(sequential("file, direct", PLUGIN, file_conf, runs))
    kube_conf = cluster.conf("10.203.0.0/16", work / "node-a", "seq")
    rows.append(sequential("kubernetes, direct", PLUGIN, kube_conf, runs))
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

        def one(i: int) -> tuple[int, str]:
            node = i % nodes
            conf = cluster.conf(cidr, work / f"burst-node{node}", network)
            _, code, out = exec_plugin(
                PLUGIN, conf, cni_env("ADD", f"burst-{i}", socks[node], f"node-{node}")
            )
            return code, out

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=nodes * per_node) as pool:
            results = list(pool.map(one, range(pods)))
        wall = time.perf_counter() - started
    failures = [out for code, out in results if code != 0]
    addresses = [json.loads(out)["ips"][0]["address"] for code, out in results if code == 0]
    leases = cluster.pool_leases(network, cidr)
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
            for mode, binary, s in (("direct", PLUGIN, NO_AGENT), ("agent", SHIM, sock)):
                row = sequential(f"{size} leases, {mode}", binary, conf, runs, s)
                rows.append(row)
    return rows


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--kubeconfig", help="benchmark a real cluster instead of the API test server")
    parser.add_argument(
        "--latency-ms", type=float, default=5.0, help="latency injected per API request (test server)"
    )
    parser.add_argument("--runs", type=int, default=30, help="sequential ADDs per latency case")
    parser.add_argument("--pods", type=int, default=1000, help="ADDs in the burst")
    parser.add_argument("--nodes", type=int, default=10, help="simulated nodes (one agent each) in the burst")
    parser.add_argument("--per-node", type=int, default=10, help="concurrent ADDs per node in the burst")
    parser.add_argument("--fill", default="0,1000,10000", help="pool sizes for the fill test")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md"
    )
    args = parser.parse_args()
    if not os.access(PLUGIN, os.X_OK) or not os.access(AGENT, os.X_OK):
        print(
            f"whereabouts-py / ipam-agent not installed next to {sys.executable}; run 'make bench'",
            file=sys.stderr,
        )
        return 1
    use_opt_in_flat_file()  # the bench's NADs carry data_dir/kubeconfig: a single-tenant node flat file
    work = Path(tempfile.mkdtemp(prefix="whereabouts-py-bench."))
    cluster = Cluster(args.kubeconfig, args.latency_ms, work)
    try:
        print("(a) sequential ADD latency ...", file=sys.stderr)
        a = part_a(cluster, work, args.runs)
        print(table(a), file=sys.stderr)
        print("(b) burst ...", file=sys.stderr)
        b = part_b(cluster, work, args.pods, args.nodes, args.per_node)
        print(table([b]), file=sys.stderr)
        print("(c) ADD as the pool fills ...", file=sys.stderr)
        c = part_c(cluster, work, max(5, args.runs // 3), [int(x) for x in args.fill.split(",") if x])
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    target = (
        "a real cluster (--kubeconfig)"
        if args.kubeconfig
        else f"the API test server, {args.latency_ms:g} ms injected per request"
    )
    report = "\n".join(
        [
            f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            "",
            f"Command: `make bench` (`python -m bench {' '.join(sys.argv[1:])}`). Against {target}.",
            f"Machine: {machine()}.",
            "",
            "(a) Sequential ADD latency, each ADD a fresh exec of the plugin as a runtime does (DEL between, untimed):",
            "",
            table(a),
            "",
            f"(b) Burst: {b['pods']} ADDs from {b['nodes']} simulated nodes (one agent each), {b['concurrent_per_node']} "
            "concurrent per node, into one pool:",
            "",
            table([{k: v for k, v in b.items() if k != "first_failure"}]),
            *(["", f"First failure: `{b['first_failure']}`"] if b["first_failure"] else []),
            "",
            "(c) ADD latency as the pool fills (pool pre-seeded with N leases):",
            "",
            table(c),
            "",
        ]
    )
    print(report)
    if not args.no_write:
        header = (
            "" if RESULTS.exists() else "# Benchmark results\n\nAppended by `make bench`; newest last.\n\n"
        )
        with RESULTS.open("a") as fh:
            fh.write(header + report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
