"""The shim's import diet: a call the node agent answers imports nothing beyond a bare interpreter
start but the shim itself and two C modules (every exec pays every import; see ipam/shim.py).

Runs the host's interpreter (/usr/bin/python3, as a node runs the plugin) under `-X importtime`
against a fake agent on a unix socket and compares the modules imported with those of `-c pass`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import deploy.install as inst
from tests.cni_exec import cni_env

ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "bin" / "whereabouts-py"
HOST_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
# Beyond a bare `python3 -S -c pass`: our package and the C halves of socket and json; not even os
# (~1.3 ms of an exec under -S, where nothing else has imported it). `socket` and `json` themselves are
# not allowed: they pull in enum, selectors, collections and re (~10 ms per exec on a 2-core host).
SHIM_ONLY = {
    "ipam",
    "ipam.plugin",  # the installed wrapper's entry point (bin/whereabouts-py uses ipam.shim directly)
    "ipam.shim",
    "_socket",
    "_json",
}  # what bin/whereabouts-py and the installed wrapper may import
ALLOWED = SHIM_ONLY
REPLY = {"code": 0, "stdout": '{"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.7/24"}]}\n'}
CONF = {
    "cniVersion": "1.0.0",
    "name": "n",
    "type": "ipvlan",
    "ipam": {"type": "whereabouts-py", "range": "10.9.0.0/24"},
}


class FakeAgent:
    """Answers every call on a unix socket with REPLY and keeps the requests it got."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.requests: list[dict[str, Any]] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.requests.append(json.loads(data))
                conn.sendall(json.dumps(REPLY).encode())

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[FakeAgent]:
    agent = FakeAgent(str(tmp_path / "agent.sock"))
    yield agent
    agent.close()


def imported(stderr: str) -> list[str]:
    """Module names from `-X importtime` output, in import order."""
    names = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    return names


def baseline() -> set[str]:
    done = subprocess.run(
        [HOST_PYTHON, "-S", "-X", "importtime", "-c", "pass"], capture_output=True, text=True, check=True
    )
    return set(imported(done.stderr))


def run_shim(argv: list[str], sock: str, stdin: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin,
        env=cni_env("ADD", "c1", WHEREABOUTS_PY_AGENT_SOCKET=sock, **env),
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )


def test_agent_answered_call_imports_only_the_shim(fake_agent: FakeAgent) -> None:
    stdin = json.dumps(CONF)
    done = run_shim([HOST_PYTHON, "-S", "-X", "importtime", str(SHIM)], fake_agent.path, stdin)
    assert (done.returncode, done.stdout) == (0, REPLY["stdout"]), done.stderr
    [request] = fake_agent.requests
    assert request["stdin"] == stdin and request["env"]["CNI_COMMAND"] == "ADD"
    assert "PATH" not in request["env"]  # only the CNI variables are forwarded
    modules = imported(done.stderr)
    assert "ipam.shim" in modules  # the measurement sees the shim's own imports
    extra = set(modules) - baseline() - ALLOWED
    assert not extra, f"imported before the agent answered: {sorted(extra)}"


def test_request_encoding_matches_json_dumps(fake_agent: FakeAgent) -> None:
    """The hand-built request is what json.dumps would send, escapes and all."""
    stdin = json.dumps({**CONF, "args": {"note": 'quote " backslash \\ tab \t ü \u2603'}})
    raw = stdin.encode() + b"\xff"  # not UTF-8: travels as a surrogate escape, as before
    done = subprocess.run(
        [HOST_PYTHON, "-S", str(SHIM)],
        input=raw,
        env=cni_env("ADD", "c1", WHEREABOUTS_PY_AGENT_SOCKET=fake_agent.path, K8S_X="é"),
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    [request] = fake_agent.requests
    assert request["stdin"] == raw.decode("utf-8", errors="surrogateescape")
    assert request["env"]["K8S_X"] == "é"


def test_installed_wrapper_keeps_the_fast_path(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """deploy/install.py's wrapper, run against a bundle laid out like the image's prefix."""
    bundle = tmp_path / "bundle"
    subprocess.run([HOST_PYTHON, "-m", "venv", "--without-pip", str(bundle)], check=True)
    version = subprocess.run(
        [str(bundle / "bin" / "python3"), "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site_packages = bundle / "lib" / f"python{version}" / "site-packages"
    shutil.copytree(ROOT / "ipam", site_packages / "ipam", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [str(bundle / "bin" / "python3"), "-m", "compileall", "-q", str(site_packages)], check=True
    )
    [exec_line] = [line for line in inst.WRAPPER.splitlines() if line.startswith("exec ")]
    assert " -S " in exec_line and " -B " in exec_line
    script = tmp_path / "wrapper.sh"
    # the same command, with -v -X importtime to see what it imports and from where
    script.write_text(
        inst.WRAPPER.replace(inst.BUNDLE_LINK, str(bundle)).replace(
            "/bin/python3 -S", "/bin/python3 -v -X importtime -S"
        )
    )
    script.chmod(0o755)
    done = run_shim([str(script)], fake_agent.path, json.dumps(CONF))
    assert (done.returncode, done.stdout) == (0, REPLY["stdout"]), done.stderr
    modules = imported(done.stderr)
    assert "ipam.shim" in modules
    extra = set(modules) - baseline() - SHIM_ONLY
    assert not extra, f"imported before the agent answered: {sorted(extra)}"  # not even os
    # the shim ran from the bundle's compiled bytecode (-B: the plugin never writes any itself)
    assert f"code object from '{site_packages}/ipam/__pycache__/shim." in done.stderr


def test_socket_from_the_flat_file_imports_no_more(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """A node whose runtime does not set WHEREABOUTS_PY_AGENT_SOCKET: the shim reads the flat file's
    agent_socket with posix and _json (ipam.flatfile would import json, os, stat and typing)."""
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(json.dumps({"agent_socket": fake_agent.path}))
    flat.chmod(0o644)
    env = cni_env("ADD", "c1", WHEREABOUTS_PY_FLAT_FILE=str(flat))
    done = subprocess.run(
        [HOST_PYTHON, "-S", "-X", "importtime", str(SHIM)],
        input=json.dumps(CONF),
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert (done.returncode, done.stdout) == (0, REPLY["stdout"]), done.stderr
    extra = set(imported(done.stderr)) - baseline() - ALLOWED
    assert not extra, f"imported before the agent answered: {sorted(extra)}"


def flat_file_cases(tmp_path: Path) -> list[tuple[str, Any]]:
    """(name, how to make the flat file at tmp_path/conf) for the shim/flatfile agreement test."""

    def write(doc: Any, mode: int = 0o644, uid: int | None = None) -> Any:
        def make(path: Path) -> None:
            path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
            path.chmod(mode)
            if uid is not None:
                os.chown(path, uid, -1)

        return make

    def symlink(path: Path) -> None:
        target = tmp_path / "target.conf"
        target.write_text(json.dumps({"agent_socket": "/run/via-link.sock"}))
        target.chmod(0o644)
        path.symlink_to(target)

    return [
        ("valid", write({"agent_socket": "/run/a.sock"})),
        ("group-writable", write({"agent_socket": "/run/a.sock"}, 0o664)),
        ("other-writable", write({"agent_socket": "/run/a.sock"}, 0o646)),
        ("other owner", write({"agent_socket": "/run/a.sock"}, 0o644, uid=65534)),
        ("not JSON", write("agent_socket: /run/a.sock")),
        ("not an object", write(["/run/a.sock"])),
        ("not a string", write({"agent_socket": 7})),
        ("empty", write({"agent_socket": ""})),
        ("NUL", write({"agent_socket": "/run/a\u0000.sock"})),
        ("no key", write({"datastore": "file"})),
        ("too large", write({"agent_socket": "/run/a.sock", "pad": "x" * (1 << 20)})),
        ("a directory", lambda path: path.mkdir()),
        ("missing", lambda path: None),
        ("symlink", symlink),
    ]


def test_shim_reads_the_flat_file_as_flatfile_does(tmp_path: Path) -> None:
    from ipam import flatfile, shim

    seen = {}
    for i, (name, make) in enumerate(flat_file_cases(tmp_path)):
        case = tmp_path / f"case{i}"
        case.mkdir()
        path = case / "conf"
        make(path)
        env = {shim.FLAT_FILE_ENV: str(path)}
        seen[name] = shim.flat_file_agent_socket(env)
        assert seen[name] == flatfile.agent_socket(env), name
    assert seen["valid"] == "/run/a.sock" and seen["symlink"] == "/run/via-link.sock"
    assert sum(value is None for value in seen.values()) == len(seen) - 2
    assert shim.FLAT_FILE_ENV == flatfile.FLAT_FILE_ENV
    assert shim.DEFAULT_FLAT_FILES == flatfile.DEFAULT_FLAT_FILES
    assert shim.MAX_NODE_FILE == flatfile.MAX_NODE_FILE
    assert shim.flat_file_agent_socket({}) == flatfile.agent_socket({})  # the fixed locations


@pytest.mark.parametrize(
    "layout",
    [
        "link",
        "relative link chain",
        "linked bin directory",
        "link to a linked bin directory",
        "bin//",
        "bin/./",
    ],
)
def test_the_script_finds_its_checkout_however_it_is_reached(
    fake_agent: FakeAgent, tmp_path: Path, layout: str
) -> None:
    """The CNI bin dir holds a link to bin/whereabouts-py, or is itself a link to the checkout's bin
    (os.path.realpath's cases, without os): the script must import the checkout's ipam (under -S no
    installed package is on the path)."""
    cni_bin = tmp_path / "opt" / "cni" / "bin"
    cni_bin.mkdir(parents=True)
    exe = cni_bin / "whereabouts-py"
    if layout == "link":
        exe.symlink_to(SHIM)
    elif layout == "relative link chain":
        (tmp_path / "opt" / "hop").symlink_to(os.path.relpath(SHIM, tmp_path / "opt"))
        exe.symlink_to("../../hop")
    elif layout == "linked bin directory":
        exe = tmp_path / "linked-bin" / "whereabouts-py"
        (tmp_path / "linked-bin").symlink_to(SHIM.parent)
    elif layout == "link to a linked bin directory":
        (tmp_path / "linked-bin").symlink_to(SHIM.parent)
        exe.symlink_to(tmp_path / "linked-bin" / "whereabouts-py")
    else:  # a link whose target was written with a doubled slash or a dot
        exe.symlink_to(f"{SHIM.parent}/{layout[4:]}{SHIM.name}")
    done = run_shim([HOST_PYTHON, "-S", str(exe)], fake_agent.path, json.dumps(CONF))
    assert (done.returncode, done.stdout) == (0, REPLY["stdout"]), done.stderr


def test_a_copy_of_the_script_finds_the_installed_package(fake_agent: FakeAgent, tmp_path: Path) -> None:
    """The script's docstring says copy (or link) it into the CNI bin dir: a copy has no checkout
    above it, and under -S the interpreter's site-packages (where the package is installed) are not
    on the path. The call must still reach the agent, not end in a traceback."""
    env_dir = tmp_path / "env"
    subprocess.run([HOST_PYTHON, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python3"
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    shutil.copytree(ROOT / "ipam", Path(site_packages) / "ipam", ignore=shutil.ignore_patterns("__pycache__"))
    cni_bin = tmp_path / "opt" / "cni" / "bin"
    cni_bin.mkdir(parents=True)
    shutil.copy(SHIM, cni_bin / "whereabouts-py")
    done = run_shim([str(python), "-S", str(cni_bin / "whereabouts-py")], fake_agent.path, json.dumps(CONF))
    assert (done.returncode, done.stdout) == (0, REPLY["stdout"]), done.stderr


def test_shim_and_cni_do_not_import_each_other() -> None:
    """The executable (ipam.plugin, bin/whereabouts-py) depends on both; the shim stays free of the CNI
    layer (and its imports), and the CNI layer never reaches back for the agent."""
    import ast

    def imports(module: str) -> set[str]:
        tree = ast.parse((ROOT / "ipam" / f"{module}.py").read_text())
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found |= {
                    node.module or "",
                    *(f"{node.module or ''}.{a.name}".strip(".") for a in node.names),
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        return found

    assert not {"cni", "ipam.cni"} & imports("shim")
    assert not {"shim", "ipam.shim"} & imports("cni")
    assert {"shim"} <= imports("plugin")
