"""The node agent and the shim: coalesced batches, fallback to direct mode, kill mid-batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ipam.agent import Agent
from tests.cni_exec import cni_env, finish, kube_netconf, run, start
from tests.kubeapi.fixtures import K8s, KubeHandle
from tests.kubeapi.real import RealKube


def file_conf(tmp: Path, cidr: str = "10.70.0.0/24") -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "ipvlan",
        "ipam": {"type": "whereabouts-py", "range": cidr, "datastore": "file", "data_dir": str(tmp / "data")},
    }


def kube_conf(kube: K8s, tmp: Path, cidr: str) -> dict[str, Any]:
    return kube_netconf(kube.plugin_kubeconfig(), tmp, cidr)


def call(agent: Agent, conf: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    reply = agent.serve_call({"env": env, "stdin": json.dumps(conf)})
    assert reply["code"] == 0, reply
    result: dict[str, Any] = json.loads(reply["stdout"])
    return result


def test_coalesced_batches_give_each_call_its_own_answer(k8s: K8s, tmp_path: Path) -> None:
    if isinstance(k8s, KubeHandle):  # writes take a while (the real server's do by themselves),
        k8s.api.set_faults(latency=0.02)  # so calls pile up behind them
    conf = kube_conf(k8s, tmp_path, "10.71.0.0/24")
    agent = Agent()
    results: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        ip = call(agent, conf, cni_env("ADD", f"c{i}"))["ips"][0]["address"]
        with lock:
            results[f"c{i}"] = ip

    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.close()
    assert len(results) == 30 and len(set(results.values())) == 30
    [pool] = k8s.api.objects("ippools", k8s.namespace)
    by_container = {v["id"]: f"10.71.0.{k}/24" for k, v in pool["spec"]["allocations"].items()}
    assert by_container == results  # every caller was told exactly the lease written for it
    batches = agent.metrics.batches.collect()[0].samples
    count = next(s.value for s in batches if s.name.endswith("_count"))
    assert count < 30  # fewer pool writes than calls: they were coalesced
    if isinstance(k8s, KubeHandle):
        assert k8s.api.count("update", "ippools") + k8s.api.count("create", "ippools") == count


def test_batch_mixes_adds_releases_and_errors(tmp_path: Path) -> None:
    """ADDs, a DEL and exhaustion queued together: each call gets its own, consistent answer."""
    agent = Agent()
    conf = file_conf(tmp_path, "10.72.0.0/30")  # two usable addresses
    assert call(agent, conf, cni_env("ADD", "a"))["ips"][0]["address"] == "10.72.0.1/30"
    replies: dict[str, dict[str, Any]] = {}

    def one(command: str, ctr: str) -> None:
        replies[f"{command}-{ctr}"] = agent.serve_call(
            {"env": cni_env(command, ctr), "stdin": json.dumps(conf)}
        )

    threads = [
        threading.Thread(target=one, args=args)
        for args in [("ADD", "b"), ("ADD", "c"), ("ADD", "d"), ("DEL", "a")]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.close()
    assert replies["DEL-a"]["code"] == 0 and replies["DEL-a"]["stdout"] == ""
    pool = json.loads(next((tmp_path / "data" / "pools").glob("*.json")).read_text())
    holders = {v["id"]: f"10.72.0.{k}/30" for k, v in pool["spec"]["allocations"].items()}
    assert "a" not in holders
    granted = {}
    for ctr in "bcd":
        reply = replies[f"ADD-{ctr}"]
        if reply["code"] == 0:
            granted[ctr] = json.loads(reply["stdout"])["ips"][0]["address"]
        else:  # the only way an ADD may fail here: both addresses held when its batch ran
            assert json.loads(reply["stdout"])["code"] == 100
    # which ADDs win depends on when the DEL lands, but every answer matches the pool exactly
    assert granted == holders
    assert 1 <= len(granted) <= 2


@pytest.fixture
def agent_proc(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    sock = str(tmp_path / "run" / "agent.sock")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ipam-agent"), "--socket", sock, "--metrics-port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(200):
        if os.path.exists(sock):
            break
        time.sleep(0.05)
    assert os.path.exists(sock), "agent did not start"
    assert (os.stat(sock).st_mode & 0o777) == 0o600
    yield proc, sock
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


def test_shim_uses_the_agent_and_falls_back_without_it(
    tmp_path: Path, agent_proc: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, sock = agent_proc
    conf = file_conf(tmp_path)
    via_agent = run(conf, cni_env("ADD", "a", WHEREABOUTS_PY_AGENT_SOCKET=sock))
    assert via_agent.code == 0 and "agent.unavailable" not in via_agent.stderr
    proc.terminate()
    proc.wait(timeout=10)
    assert not os.path.exists(sock)  # the agent removed its socket
    # WHEREABOUTS_PY_AGENT_WAIT=0: no waiting for a restarted agent (tests/test_agent_restart.py)
    direct = run(conf, cni_env("ADD", "b", WHEREABOUTS_PY_AGENT_SOCKET=sock, WHEREABOUTS_PY_AGENT_WAIT="0"))
    assert direct.code == 0
    assert [via_agent.result["ips"][0]["address"], direct.result["ips"][0]["address"]] == [
        "10.70.0.1/24",
        "10.70.0.2/24",
    ]
    # a stale socket file (agent died hard) is refused: logged, then direct mode
    Path(sock).parent.mkdir(exist_ok=True)
    import socket as socketlib

    stale = socketlib.socket(socketlib.AF_UNIX)
    stale.bind(sock)
    stale.close()
    third = run(conf, cni_env("ADD", "c", WHEREABOUTS_PY_AGENT_SOCKET=sock, WHEREABOUTS_PY_AGENT_WAIT="0"))
    assert third.code == 0 and "agent.unavailable" in third.stderr
    assert third.result["ips"][0]["address"] == "10.70.0.3/24"


def test_deeply_nested_stdin_is_answered_by_the_agent_with_code_6(
    tmp_path: Path, agent_proc: tuple[subprocess.Popen[bytes], str]
) -> None:
    """Not a dropped connection (the shim would repeat the call for its whole wait, then crash in
    direct mode): the agent answers code 6 at once and goes on serving."""
    proc, sock = agent_proc
    deep = "[" * 100_000 + "]" * 100_000
    env = cni_env("ADD", "deep", WHEREABOUTS_PY_AGENT_SOCKET=sock, WHEREABOUTS_PY_AGENT_WAIT="20")
    plugin = subprocess.run(
        [str(Path(sys.executable).parent / "whereabouts-py")], env=env, input=deep, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert plugin.returncode == 1 and json.loads(plugin.stdout)["code"] == 6, plugin
    assert "agent.waiting" not in plugin.stderr and "Traceback" not in plugin.stderr
    assert proc.poll() is None
    after = run(file_conf(tmp_path), cni_env("ADD", "a", WHEREABOUTS_PY_AGENT_SOCKET=sock))
    assert after.code == 0 and "agent." not in after.stderr


def test_agent_killed_mid_batch_loses_no_acknowledged_lease(
    kube: KubeHandle, tmp_path: Path, agent_proc: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, sock = agent_proc
    conf = kube_conf(kube, tmp_path, "10.73.0.0/24")
    acked = [run(conf, cni_env("ADD", f"acked{i}", WHEREABOUTS_PY_AGENT_SOCKET=sock)) for i in range(3)]
    assert all(c.code == 0 for c in acked)
    kube.api.set_faults(latency=0.5)  # the next batch is slow: kill the agent while it is in flight

    def pool_requests() -> int:
        return kube.api.count("get", "ippools") + kube.api.count("update", "ippools")

    before = pool_requests()
    no_wait = {
        "WHEREABOUTS_PY_AGENT_SOCKET": sock,
        "WHEREABOUTS_PY_AGENT_WAIT": "0",
    }  # straight to direct mode
    inflight = [start(conf, cni_env("ADD", f"late{i}", **no_wait)) for i in range(4)]
    for _ in range(3000):  # until the agent's next pool request is in flight (bounded poll)
        if pool_requests() > before:
            break
        time.sleep(0.01)
    else:
        pytest.fail("the in-flight ADDs never reached the API server")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    kube.api.clear_faults()
    late = [finish(p) for p in inflight]  # each shim saw the agent die and fell back to direct mode
    assert all(c.code == 0 for c in late), [c.stdout for c in late]
    [pool] = kube.api.objects("ippools", "kube-system")
    leases = {v["id"]: f"10.73.0.{k}/24" for k, v in pool["spec"]["allocations"].items()}
    for i, c in enumerate(acked):
        assert leases[f"acked{i}"] == c.result["ips"][0]["address"]
    for i, c in enumerate(late):
        assert leases[f"late{i}"] == c.result["ips"][0]["address"]
    assert len(leases) == 7 and len(set(leases.values())) == 7
    again = run(conf, cni_env("ADD", "late0", WHEREABOUTS_PY_AGENT_SOCKET=sock))
    assert again.result["ips"][0]["address"] == late[0].result["ips"][0]["address"]


@pytest.mark.slow
def test_shims_and_direct_processes_together_never_duplicate(
    real_kube: RealKube, tmp_path: Path, agent_proc: tuple[subprocess.Popen[bytes], str]
) -> None:
    """On the real server only (24 processes are the suite's costliest kind of test)."""
    k8s = real_kube
    _, sock = agent_proc
    conf = kube_conf(k8s, tmp_path, "10.74.0.0/24")
    procs = []
    for i in range(24):
        socket_env = sock if i % 2 == 0 else str(tmp_path / "no-agent.sock")
        procs.append(start(conf, cni_env("ADD", f"c{i}", WHEREABOUTS_PY_AGENT_SOCKET=socket_env)))
    calls = [finish(p) for p in procs]
    assert all(c.code == 0 for c in calls), [c.stdout for c in calls if c.code]
    got = [c.result["ips"][0]["address"] for c in calls]
    assert len(set(got)) == 24
    [pool] = k8s.api.objects("ippools", k8s.namespace)
    assert len(pool["spec"]["allocations"]) == 24


def test_batched_requests_for_one_address_give_it_once(k8s: K8s, tmp_path: Path) -> None:
    """Requested addresses (runtimeConfig.ips) through the agent's coalesced batches: of several pods
    asking for one address at once exactly one gets it, the others are refused naming that pod, and
    pods asking for nothing get other addresses; sticky DEL keeps it for the name."""
    if isinstance(k8s, KubeHandle):
        k8s.api.set_faults(latency=0.02)
    conf = kube_conf(k8s, tmp_path, "10.73.0.0/24")
    conf["ipam"]["sticky_seconds"] = 60
    wanted = {**conf, "runtimeConfig": {"ips": ["10.73.0.9/24"]}}
    agent = Agent()
    replies: dict[str, dict[str, Any]] = {}

    def one(ctr: str, doc: dict[str, Any]) -> None:
        replies[ctr] = agent.serve_call({"env": cni_env("ADD", ctr), "stdin": json.dumps(doc)})

    threads = [threading.Thread(target=one, args=(f"w{i}", wanted)) for i in range(4)]
    threads += [threading.Thread(target=one, args=(f"p{i}", conf)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [c for c in replies if c.startswith("w") and replies[c]["code"] == 0]
    assert len(winners) == 1, replies
    assert json.loads(replies[winners[0]]["stdout"])["ips"][0]["address"] == "10.73.0.9/24"
    for ctr in replies:
        if ctr.startswith("w") and ctr not in winners:
            error = json.loads(replies[ctr]["stdout"])
            assert error["code"] == 104 and f"default/{winners[0]}" in error["msg"], error
    plain = {json.loads(replies[f"p{i}"]["stdout"])["ips"][0]["address"] for i in range(4)}
    assert len(plain) == 4 and "10.73.0.9/24" not in plain
    assert agent.serve_call({"env": cni_env("DEL", winners[0]), "stdin": json.dumps(wanted)})["code"] == 0
    refused = agent.serve_call({"env": cni_env("ADD", "late"), "stdin": json.dumps(wanted)})
    assert json.loads(refused["stdout"])["code"] == 104 and "retained" in refused["stdout"]
    again = agent.serve_call(
        {"env": cni_env("ADD", "new-sandbox", pod=winners[0]), "stdin": json.dumps(conf)}
    )
    assert json.loads(again["stdout"])["ips"][0]["address"] == "10.73.0.9/24"
    agent.close()
    [pool] = k8s.api.objects("ippools", k8s.namespace)
    assert len(pool["spec"]["allocations"]) == 5
