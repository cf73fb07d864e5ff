"""Many processes, one file-datastore pool: concurrent ADDs, and SIGKILL in the middle of an ADD/DEL loop.

After every kill the pool file must be a whole JSON pool, hold exactly the leases of the operations
that completed (plus, at most, the one that was in flight), have a reservation for every lease, and
the next ADD must go through (no stale lock, no torn file).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam.allocator import parse_allocations
from tests.cni_exec import cni_env as exec_env

pytestmark = pytest.mark.slow

INSTALLED = Path(sys.executable).parent / "whereabouts-py"
POOL = "10.20.0.0-22"
CIDR = "10.20.0.0/22"


def conf(data_dir: Path, **ipam: Any) -> dict[str, Any]:
    block = {"type": "whereabouts-py", "datastore": "file", "data_dir": str(data_dir), "range": CIDR}
    block.update(ipam)
    return {"cniVersion": "1.0.0", "name": "mp", "type": "macvlan", "ipam": block}


def cni_env(tmp: Path, command: str, container: str) -> dict[str, str]:
    return exec_env(
        command,
        container,
        namespace="mp",
        NODENAME="node-mp",
        WHEREABOUTS_PY_AGENT_SOCKET=str(tmp / "no-agent.sock"),
    )


def scratch(tmp_path: Path) -> Path:
    """A data dir on tmpfs when there is one (fsync-heavy), else under tmp_path."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return Path(tempfile.mkdtemp(prefix="wpy-mp-", dir="/dev/shm"))
    return tmp_path / "data"


def read_pool(data_dir: Path, unreserved_ok: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """The pool's raw allocations, after checking the file is a whole, consistent pool.

    `unreserved_ok`: containers killed in the middle of an ADD, whose lease may have been written
    without its reservation yet (the pool is written first, as in Whereabouts; the ADD was never
    answered, and its retry or DEL settles it).
    """
    path = data_dir / "pools" / f"{POOL}.json"
    doc = json.loads(path.read_text())  # a torn file fails here
    assert doc["kind"] == "IPPool" and doc["spec"]["range"] == CIDR
    assert int(doc["metadata"]["resourceVersion"]) >= 1
    raw: dict[str, dict[str, Any]] = doc["spec"]["allocations"]
    leases = parse_allocations(raw)  # decimal keys, well-formed leases
    holders = [(lease.id, lease.ifname) for lease in leases.values()]
    assert len(holders) == len(set(holders)), "an attachment holds two addresses"
    assert all(1 <= off <= 1022 for off in leases), sorted(leases)
    # every answered lease has its reservation
    reservations = {p.stem for p in (data_dir / "reservations").glob("*.json")}
    for off, lease in leases.items():
        assert f"10.20.{off // 256}.{off % 256}" in reservations or lease.id in unreserved_ok, off
    return raw


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    path = scratch(tmp_path)
    yield path
    if str(path).startswith("/dev/shm/"):
        shutil.rmtree(path, ignore_errors=True)


def test_24_concurrent_adds_get_distinct_addresses(tmp_path: Path, data_dir: Path) -> None:
    n = 24
    stdin = json.dumps(conf(data_dir)).encode()
    procs = [
        subprocess.Popen(
            [str(INSTALLED)],
            env=cni_env(tmp_path, "ADD", f"pod{i}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(n)
    ]
    for proc in procs:  # all started before any is fed, so their ADDs overlap
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        proc.stdin.close()
        proc.stdin = None  # written in full; communicate() must not flush it again
    results = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (i, out, err)
        assert b"Traceback" not in err
        results.append((f"pod{i}", json.loads(out)["ips"][0]["address"]))
    addresses = [addr for _, addr in results]
    assert len(set(addresses)) == n, addresses
    assert all(a.startswith("10.20.0.") and a.endswith("/22") for a in addresses)
    raw = read_pool(data_dir)
    assert len(raw) == n
    # the pool holds exactly what each process was told
    stored = {lease["id"]: f"10.20.{int(off) // 256}.{int(off) % 256}/22" for off, lease in raw.items()}
    assert stored == dict(results)
    # lowest-free-first with no losses: the 24 lowest addresses
    assert sorted(int(off) for off in raw) == list(range(1, n + 1))


def test_concurrent_adds_into_overlapping_pools_never_share_an_address(
    tmp_path: Path, data_dir: Path
) -> None:
    """Two pools over the same addresses (different node locks): only the reservations keep them apart."""
    n = 24
    wide = json.dumps(conf(data_dir, range="10.30.0.0/24")).encode()
    narrow = json.dumps(conf(data_dir, range="10.30.0.0/26")).encode()
    procs = []
    for i in range(n):
        proc = subprocess.Popen(
            [str(INSTALLED)],
            env=cni_env(tmp_path, "ADD", f"ov{i}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
    for i, proc in enumerate(procs):
        assert proc.stdin is not None
        proc.stdin.write(wide if i % 2 else narrow)
        proc.stdin.close()
        proc.stdin = None
    got = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (i, out, err)
        got.append(json.loads(out)["ips"][0]["address"].split("/")[0])
    assert len(set(got)) == n, sorted(got)
    pools = data_dir / "pools"
    leased = []
    for name in ("10.30.0.0-24", "10.30.0.0-26"):
        doc = json.loads((pools / f"{name}.json").read_text())
        assert len(doc["spec"]["allocations"]) == n // 2, name
        leased += [f"10.30.0.{int(off)}" for off in doc["spec"]["allocations"]]
    assert sorted(leased) == sorted(got)
    assert {p.stem for p in (data_dir / "reservations").glob("*.json")} == set(got)


LOOP = r"""
import io, json, sys
from ipam.cni import run

stdin, prefix, tmp = sys.argv[1].encode(), sys.argv[2], sys.argv[3]
live = []
i = 0
while True:
    i += 1
    ops = [("ADD", f"{prefix}-{i}")]
    if i % 3 == 0:
        ops.append(("DEL", live[0]))
    for command, cid in ops:
        env = {
            "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": "/x", "CNI_IFNAME": "net1",
            "CNI_ARGS": f"K8S_POD_NAMESPACE=mp;K8S_POD_NAME={cid}", "NODENAME": "node-mp",
            "WHEREABOUTS_PY_AGENT_SOCKET": tmp + "/no-agent.sock",
        }
        print("BEGIN", command, cid, flush=True)
        out = io.StringIO()
        if run(env, stdin, out) != 0:
            print("FAIL", out.getvalue(), flush=True)
            sys.exit(3)
        print("END", command, cid, flush=True)
        if command == "ADD":
            live.append(cid)
        else:
            live.remove(cid)
"""


def test_sigkill_mid_loop_leaves_a_valid_pool(tmp_path: Path, data_dir: Path) -> None:
    rng = random.Random()
    seed = rng.randrange(2**32)
    rng.seed(seed)
    stdin = json.dumps(conf(data_dir, retry_deadline_seconds=20))
    done: dict[str, bool] = {}  # container id -> holds a lease after every completed op
    killed_adds: set[str] = set()  # ADDs killed in flight: their lease may lack its reservation
    mid_op_kills = 0
    for round_no in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", LOOP, stdin, f"k{round_no}", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        wanted_ops = rng.randint(3, 25)
        finished = 0
        lines: list[str] = []
        while finished < wanted_ops:
            line = proc.stdout.readline()
            assert line, f"loop died early (seed {seed}): {lines[-3:]}"
            lines.append(line)
            assert not line.startswith("FAIL"), (seed, line)
            finished += line.startswith("END")
        # let it run into its next operation(s), then kill it wherever it is
        time.sleep(rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # through the same buffer readline() used: nothing is skipped
        assert proc.wait(timeout=30) == -signal.SIGKILL
        lines += rest.splitlines(keepends=True)

        in_flight: tuple[str, str] | None = None
        for line in lines:
            parts = line.split()
            if len(parts) != 3 or not line.endswith("\n"):  # never seen: each print is one write
                continue
            word, command, cid = parts
            if word == "BEGIN":
                in_flight = (command, cid)
            elif word == "END":
                assert in_flight == (command, cid), (seed, lines)
                in_flight = None
                done[cid] = command == "ADD"
        expected = {cid for cid, held in done.items() if held}

        mid_op_kills += in_flight is not None
        if in_flight is not None and in_flight[0] == "ADD":
            killed_adds.add(in_flight[1])
        raw = read_pool(data_dir, frozenset(killed_adds))
        stored = {lease["id"] for lease in raw.values()}
        if in_flight is None or stored == expected:
            assert stored == expected, (seed, round_no)
        else:  # the operation in flight may have been written as a whole, never in part
            command, cid = in_flight
            assert stored == (expected | {cid} if command == "ADD" else expected - {cid}), (seed, in_flight)
            done[cid] = command == "ADD"

        # the next call works: no stale lock, no torn file
        probe = subprocess.run(
            [str(INSTALLED)],
            env=cni_env(tmp_path, "ADD", f"probe{round_no}"),
            input=stdin.encode(),
            capture_output=True,
            timeout=60,
        )
        assert probe.returncode == 0, (seed, probe.stdout, probe.stderr)
        address = json.loads(probe.stdout)["ips"][0]["address"]
        after = read_pool(data_dir, frozenset(killed_adds))
        assert len(after) == len(raw) + 1
        assert {lease["id"]: off for off, lease in after.items()}[f"probe{round_no}"] not in raw
        assert address.endswith("/22")
        done[f"probe{round_no}"] = True
    # the loop spends nearly all its time inside run(): the kills did land in the middle of operations
    assert mid_op_kills >= 1, seed
