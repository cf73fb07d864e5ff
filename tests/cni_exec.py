"""Run the installed `whereabouts-py` executable the way a container runtime does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLUGIN = str(Path(sys.executable).parent / "whereabouts-py")


@dataclass
class Call:
    code: int
    stdout: str
    stderr: str

    @property
    def result(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc


def cni_env(
    command: str,
    container: str,
    ifname: str = "net1",
    pod: str | None = None,
    namespace: str = "default",
    **extra: str,
) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/var/run/netns/{container}",
        "CNI_IFNAME": ifname,
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod or container}",
    }
    env.update(extra)
    return env


def start(conf: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [PLUGIN], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(conf))
    proc.stdin.close()
    proc.stdin = None  # written in full; communicate() must not touch it again
    return proc


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> Call:
    stdout, stderr = proc.communicate(timeout=timeout)
    return Call(proc.returncode, stdout, stderr)


def run(conf: dict[str, Any], env: dict[str, str]) -> Call:
    return finish(start(conf, env))
