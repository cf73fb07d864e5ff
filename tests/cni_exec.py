"""Run the installed `whereabouts-py` executable the way a container runtime does."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PLUGIN = str(Path(sys.executable).parent / "whereabouts-py")
FLAT_FILE_ENV = "WHEREABOUTS_PY_FLAT_FILE"


def kube_netconf(kubeconfig: str, tmp: Path, cidr: str) -> dict[str, Any]:
    """An ipvlan network config on the kubernetes datastore (node-local locks under tmp/node)."""
    return {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "ipvlan",
        "ipam": {
            "type": "whereabouts-py",
            "range": cidr,
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": kubeconfig},
            "data_dir": str(tmp / "node"),
        },
    }


@functools.cache
def opt_in_flat_file() -> str:
    """A node flat file holding only `"allow_nad_overrides": true` (single-tenant mode).

    The suites put data_dir, datastore, kubeconfig and log_file in each test's network config; a real
    node keeps them in its flat file and refuses them from a NAD. The runtime's environment variable
    WHEREABOUTS_PY_FLAT_FILE (trusted: tenants cannot set it) points the plugin and the agent here.
    """
    directory = tempfile.mkdtemp(prefix="wpy-flat-")
    atexit.register(shutil.rmtree, directory, True)
    path = os.path.join(directory, "whereabouts.conf")
    with open(path, "w") as fh:
        json.dump({"allow_nad_overrides": True}, fh)
    os.chmod(path, 0o644)
    return path


def use_opt_in_flat_file() -> str:
    """Make this process and every child it starts (plugin, agent) use the opt-in flat file."""
    path = opt_in_flat_file()
    os.environ[FLAT_FILE_ENV] = path
    return path


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
    if os.environ.get(FLAT_FILE_ENV):
        env[FLAT_FILE_ENV] = os.environ[FLAT_FILE_ENV]
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
