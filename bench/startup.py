"""make bench-startup: what one CNI exec costs, split, against the real kube-apiserver (issue 11).

    KUBEBUILDER_ASSETS=/work/k8s-assets .venv/bin/python -m bench.startup [--runs 40]

Every figure is measured with the interpreter a host runs: /usr/bin/python3, never a version-manager
shim. The plugin runs as deploy/install.py installs it: its sh wrapper exec'ing a bundle's python with
-S -I -B. The bundle here is a venv of /usr/bin/python3 holding the package's CNI-path dependencies
(netaddr, pydantic, PyYAML; not filelock, not the kubernetes package) and a compiled copy of ipam/.
The node agent runs from the project's .venv. Reported, each with its ratio to the same run's bare
interpreter start:

  bare           /usr/bin/python3 -S -I -c pass, p50
  agent ADD      the wrapper with the agent answering, p50
  agent's own    the agent's time for the same ADD (a client in this process, no exec), p50
  direct ADD     the wrapper with no agent (direct mode), p50
  100 direct     100 concurrent direct-mode ADDs from 10 simulated nodes into one pool: wall time
  200 one node   200 concurrent direct-mode ADDs on one node: wall time, failures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import deploy.install as install  # noqa: E402
from bench import agents  # noqa: E402
from tests.cni_exec import cni_env, use_opt_in_flat_file  # noqa: E402

HOST_PYTHON = "/usr/bin/python3"
BUNDLE = ROOT / ".venv-host"  # the stand-in for /opt/cni/whereabouts-py/current
BUNDLE_DEPS = ("netaddr>=1.2", "pydantic>=2.5,<3", "PyYAML>=6")
RESULTS = ROOT / "bench" / "RESULTS.md"
NO_AGENT = "/nonexistent/whereabouts-py-agent.sock"
TARGETS = "agent ADD <= bare + agent's own + 3 ms; direct ADD <= 400 ms; 100 direct <= 30 s; 200 on one node: all succeed"


def p50(values: list[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- set-up: the host bundle, the wrapper, the cluster, the agent ---------------------------------------


def build_bundle() -> Path:
    """A venv of the host interpreter with the CNI path's dependencies and a compiled copy of ipam/."""
    if not (BUNDLE / "bin" / "python3").exists():
        subprocess.run([HOST_PYTHON, "-m", "venv", str(BUNDLE)], check=True)
    python = str(BUNDLE / "bin" / "python3")
    have = subprocess.run([python, "-c", "import netaddr, pydantic, yaml"], capture_output=True)
    if have.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "--quiet", *BUNDLE_DEPS], check=True)
    version = subprocess.run(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = BUNDLE / "lib" / f"python{version}" / "site-packages" / "ipam"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(ROOT / "ipam", target, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [python, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash", str(target)], check=True
    )
    return BUNDLE


def write_wrapper(bundle: Path, work: Path) -> str:
    """deploy/install.py's wrapper, pointed at the bundle instead of /opt/cni/whereabouts-py/current."""
    path = work / "whereabouts-py"
    path.write_text(install.WRAPPER.replace(install.BUNDLE_LINK, str(bundle)))
    path.chmod(0o755)
    return str(path)


@contextmanager
def real_cluster(work: Path) -> Iterator[Any]:
    from tests.kubeapi.real import RealCluster, RealKube, assets_dir

    assets = assets_dir()
    if assets is None:
        raise SystemExit(
            "KUBEBUILDER_ASSETS is not set: this benchmark needs the real kube-apiserver (see README)"
        )
    cluster = RealCluster(assets, work / "apiserver", fsync=True)  # fsync as in production
    try:
        cluster.start()
        yield RealKube(cluster, "bench-startup", work)
    finally:
        cluster.stop()


@contextmanager
def agent_running(sock: str) -> Iterator[subprocess.Popen[bytes]]:
    with agents.agent_running(sock, tries=1200) as proc:  # the slow first start of a loaded machine
        yield proc


def conf(kubeconfig: str, cidr: str, network: str, data_dir: Path) -> dict[str, Any]:
    """The NAD as a user writes it: default retry deadline (90 s) and everything else default."""
    return {
        "cniVersion": "1.0.0",
        "name": network,
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": cidr,
            "datastore": "kubernetes",
            "network_name": network,
            "kubernetes": {"kubeconfig": kubeconfig},
            "data_dir": str(data_dir),
        },
    }


def env_for(command: str, container: str, sock: str, node: str = "node-0") -> dict[str, str]:
    return cni_env(command, container, namespace="bench", NODENAME=node, WHEREABOUTS_PY_AGENT_SOCKET=sock)


class Exec:
    """One exec: wall time, CPU time (user + system, the process and its children), exit code, output."""

    def __init__(self, argv: list[str], stdin: bytes, env: dict[str, str] | None = None) -> None:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err, env=env)
            assert proc.stdin is not None
            with proc.stdin:
                proc.stdin.write(stdin)
            _, status, usage = os.wait4(proc.pid, 0)  # reaped here, with its resource usage
            self.wall = time.perf_counter() - started
            proc.returncode = self.code = os.waitstatus_to_exitcode(status)
            self.cpu = usage.ru_utime + usage.ru_stime
            out.seek(0)
            err.seek(0)
            self.stdout, self.stderr = out.read().decode(), err.read().decode()


def exec_cni(argv: list[str], doc: dict[str, Any], env: dict[str, str]) -> Exec:
    return Exec(argv, json.dumps(doc).encode(), env)


# -- the scenarios (each its own function; bench/__main__.py may call them) -----------------------------


def bare_start(runs: int) -> tuple[float, float]:
    """p50 wall and CPU time of /usr/bin/python3 -S -I -c pass: the floor every exec pays."""
    done = [Exec([HOST_PYTHON, "-S", "-I", "-c", "pass"], b"") for _ in range(runs)]
    return p50([d.wall for d in done]), p50([d.cpu for d in done])


def sequential_adds(
    wrapper: str, doc: dict[str, Any], runs: int, sock: str, tag: str
) -> tuple[float, float, int]:
    """p50 wall and CPU of ADD execs (a DEL after each, untimed, keeps the pool small); fallbacks."""
    walls, cpus, fallbacks = [], [], 0
    for i in range(runs):
        done = exec_cni([wrapper], doc, env_for("ADD", f"{tag}-{i}", sock))
        if done.code != 0:
            raise RuntimeError(f"{tag}: ADD failed: {done.stdout} {done.stderr[-500:]}")
        fallbacks += "agent.unavailable" in done.stderr
        walls.append(done.wall)
        cpus.append(done.cpu)
        exec_cni([wrapper], doc, env_for("DEL", f"{tag}-{i}", sock))
    return p50(walls), p50(cpus), fallbacks


def agent_own_time(sock: str, doc: dict[str, Any], runs: int) -> float:
    """p50 of the agent's answer to an ADD, asked from this process (no exec, no imports)."""

    def ask(command: str, container: str) -> float:
        request = {"env": env_for(command, container, sock), "stdin": json.dumps(doc)}
        started = time.perf_counter()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(sock)
            s.sendall(json.dumps(request).encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        seconds = time.perf_counter() - started
        if json.loads(reply)["code"] != 0:
            raise RuntimeError(f"agent {command} failed: {reply[:300]!r}")
        return seconds

    times = []
    for i in range(runs):
        times.append(ask("ADD", f"own-{i}"))
        ask("DEL", f"own-{i}")
    return p50(times)


def burst(
    wrapper: str, kube: Any, work: Path, pods: int, nodes: int, cidr: str, network: str
) -> dict[str, Any]:
    """`pods` direct-mode ADDs started at once, spread over `nodes` simulated nodes (own lock dirs)."""
    import resource

    procs = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    for i in range(pods):
        node = i % nodes
        doc = conf(kube.kubeconfig_path, cidr, network, work / f"{network}-node{node}")
        env = env_for("ADD", f"{network}-{i}", NO_AGENT, f"node-{node}")
        proc = subprocess.Popen(
            [wrapper], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(doc).encode())
        proc.stdin.close()
        proc.stdin = None
        procs.append(proc)
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        results.append((proc.returncode, out.decode()))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    failures = [out for code, out in results if code != 0]
    addresses = [json.loads(out)["ips"][0]["address"] for code, out in results if code == 0]
    from ipam.ranges import pool_name

    pool = kube.request(
        "GET",
        f"/apis/whereabouts.cni.cncf.io/v1alpha1/namespaces/{kube.namespace}/ippools/{pool_name(cidr, network)}",
    )
    return {
        "wall": wall,
        "cpu": cpu,
        "failures": len(failures),
        "duplicates": len(addresses) - len(set(addresses)),
        "leases": len(pool["spec"]["allocations"]),
        "first_failure": failures[0][:200] if failures else "",
    }


# -- the report -----------------------------------------------------------------------------------------


def report(
    rows: list[tuple[str, str, float | None, str]], bare: float, args: argparse.Namespace, notes: list[str]
) -> str:
    from bench.__main__ import machine

    lines = [
        f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: start-up split (issue 11)",
        "",
        f"Command: `KUBEBUILDER_ASSETS=... make bench-startup` (`python -m bench.startup {' '.join(sys.argv[1:])}`). "
        "Against the real kube-apiserver + etcd (fsync on), admin client-certificate kubeconfig; the plugin as "
        "deploy/install.py installs it (sh wrapper, bundle python -S -I -B), the bundle a venv of /usr/bin/python3.",
        f"Machine: {machine()}; load average before: {args.load}.",
        f"Targets: {TARGETS}.",
        "",
        "| figure | value | x bare start | notes |",
        "|---|---|---|---|",
    ]
    for name, value, seconds, note in rows:
        ratio = f"{seconds / bare:.1f}" if seconds is not None else ""
        lines.append(f"| {name} | {value} | {ratio} | {note} |")
    lines += ["", *notes, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="sequential execs per latency figure")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; do not append to bench/RESULTS.md"
    )
    args = parser.parse_args()
    args.load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if not os.access(HOST_PYTHON, os.X_OK) or not os.access(agents.AGENT, os.X_OK):
        print(f"needs {HOST_PYTHON} and ipam-agent next to {sys.executable} (make venv)", file=sys.stderr)
        return 1
    # The NADs here name kubeconfig and data_dir per simulated node: a single-tenant node that opted in
    # (its flat file, via WHEREABOUTS_PY_FLAT_FILE, reaches the agent and every exec).
    use_opt_in_flat_file()
    work = Path(tempfile.mkdtemp(prefix="whereabouts-py-startup."))
    rows: list[tuple[str, str, float | None, str]] = []
    notes: list[str] = []
    try:
        wrapper = write_wrapper(build_bundle(), work)
        with real_cluster(work) as kube:
            say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
            say("bare interpreter start ...")
            bare, bare_cpu = bare_start(args.runs)
            rows.append(
                (
                    "bare `/usr/bin/python3 -S -I -c pass` p50",
                    ms(bare),
                    bare,
                    f"the reference; CPU {ms(bare_cpu)}",
                )
            )
            sock = str(work / "agent.sock")
            doc = conf(kube.kubeconfig_path, "10.90.0.0/16", "seq", work / "node-a")
            with agent_running(sock):
                say("agent's own time ...")
                warmup = agent_own_time(sock, doc, 3)
                own = agent_own_time(sock, doc, args.runs)
                say("agent-mode ADD ...")
                agent_add, agent_cpu, fell_back = sequential_adds(wrapper, doc, args.runs, sock, "agent")
            overhead = agent_add - bare - own
            rows.append(
                (
                    "agent-mode ADD p50 (wrapper → agent)",
                    ms(agent_add),
                    agent_add,
                    f"{fell_back} fell back to direct mode; CPU {ms(agent_cpu)} (bare + {ms(agent_cpu - bare_cpu)})",
                )
            )
            rows.append(
                ("agent's own time p50 (same ADD, no exec)", ms(own), own, f"warm-up p50 {ms(warmup)}")
            )
            rows.append(
                (
                    "agent ADD - bare - agent's own",
                    ms(overhead),
                    overhead,
                    f"target ≤ 3 ms: {'met' if overhead <= 0.003 else 'missed'} (wall; the shim's CPU over bare is above)",
                )
            )
            say("direct-mode ADD ...")
            direct, direct_cpu, _ = sequential_adds(wrapper, doc, args.runs, NO_AGENT, "direct")
            rows.append(
                (
                    "direct-mode ADD p50",
                    ms(direct),
                    direct,
                    f"CPU {ms(direct_cpu)}; target ≤ 400 ms: {'met' if direct <= 0.4 else 'missed'}",
                )
            )
            say("100 concurrent direct-mode ADDs on 10 nodes ...")
            b100 = burst(wrapper, kube, work, 100, 10, "10.91.0.0/20", "burst100")
            rows.append(
                (
                    "100 concurrent direct-mode ADDs (10 nodes)",
                    f"{b100['wall']:.1f} s",
                    b100["wall"],
                    f"{b100['failures']} failed, {b100['duplicates']} duplicates, {b100['leases']} leases; "
                    f"plugin CPU {b100['cpu']:.1f} s; "
                    f"target ≤ 30 s: {'met' if b100['wall'] <= 30 and not b100['failures'] else 'missed'}",
                )
            )
            say("200 concurrent direct-mode ADDs on one node ...")
            b200 = burst(wrapper, kube, work, 200, 1, "10.92.0.0/20", "burst200")
            rows.append(
                (
                    "200 concurrent direct-mode ADDs (one node)",
                    f"{b200['wall']:.1f} s",
                    b200["wall"],
                    f"{b200['failures']} failed, {b200['duplicates']} duplicates, {b200['leases']} leases; "
                    f"plugin CPU {b200['cpu']:.1f} s; "
                    f"target all succeed: {'met' if not b200['failures'] else 'missed'}",
                )
            )
            for name, b in (("100", b100), ("200", b200)):
                if b["first_failure"]:
                    notes.append(f"First failure of the {name}: `{b['first_failure']}`")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(rows, bare, args, notes)
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
