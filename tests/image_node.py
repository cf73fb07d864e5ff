"""The image make image builds, unpacked, and a node made of this machine plus a scratch host.

- `built_image()`: the OCI archive from deploy/image/build.py, built once per set of inputs and kept in
  build.py's cache (~/.cache/whereabouts-py/image), so the suite builds it only when an input changed.
- `unpack()`: its root filesystem, as a container runtime would lay it out.
- `InstallerContainer`: the DaemonSet's install container: the image's root, read-only, in its own
  mount and PID namespaces (`unshare`), the scratch host bound at /host, a ServiceAccount volume and
  a /tmp the test can read (the ready file), running the image's installer with the DaemonSet's
  command and arguments.
- `NodeView`: this machine as the node: a mount namespace whose /opt, /etc, /var and /run are overlays
  with the scratch host's directories on top, so the wrapper, bundle, kubeconfig and flat file the
  installer wrote sit at their host paths; commands run in it through `nsenter`.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
IMAGE_DIR = ROOT / "deploy" / "image"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def load(name: str) -> ModuleType:
    if str(IMAGE_DIR) not in sys.path:
        sys.path.insert(0, str(IMAGE_DIR))  # build.py imports oci beside it
    spec = importlib.util.spec_from_file_location(name, IMAGE_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


build = load("build")
finish = load("finish")
oci = load("oci")


@dataclass(frozen=True)
class Image:
    archive: Path
    digest: str


def built_image(out_dir: Path) -> Image:
    archive, digest = build.cached_build(str(out_dir), build.DEFAULT_CACHE)
    return Image(Path(archive), digest)


def read_archive(archive: Path) -> tuple[dict[str, object], dict[str, object], bytes]:
    """(manifest, config, uncompressed layer) of a one-layer OCI archive."""
    with tarfile.open(archive) as tar:

        def blob(digest: str) -> bytes:
            member = tar.extractfile("blobs/sha256/" + digest.split(":")[1])
            assert member is not None
            return member.read()

        index = json.loads(blob_of(tar, "index.json"))
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        layer = gzip.decompress(blob(manifest["layers"][0]["digest"]))
    return manifest, config, layer


def blob_of(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    assert member is not None
    return member.read()


def unpack(image: Image, dest: Path) -> Path:
    _, _, layer = read_archive(image.archive)
    dest.mkdir()
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        tar.extractall(dest, numeric_owner=True, filter="fully_trusted")
    return dest


def layer_names(image: Image) -> set[str]:
    _, _, layer = read_archive(image.archive)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
        return {"/" + m.name for m in tar if not m.isdir()}


def snapshot(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every path under `root`: (inode, mode, size, mtime_ns): a rewrite or rename changes it."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(directory, name))
            out[os.path.relpath(os.path.join(directory, name), root)] = (
                st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns,
            )  # fmt: skip
    return out


class InstallerContainer:
    """The DaemonSet's install container, run from the unpacked image with its command and args."""

    def __init__(
        self, rootfs: Path, host: Path, sa: Path, tmp: Path, argv: list[str], env: dict[str, str]
    ) -> None:
        for rel in ("host", SA_DIR.replace("/var/run", "/run").lstrip("/")):  # var/run -> /run in Debian
            (rootfs / rel).mkdir(parents=True, exist_ok=True)
        r = shlex.quote(str(rootfs))
        setup = " && ".join(
            [
                f"mount --bind {r} {r}",
                f"mount --rbind /dev {r}/dev",
                f"mount -o remount,bind,ro {r}",  # readOnlyRootFilesystem: true
                f"mount --bind {shlex.quote(str(host))} {r}/host",
                f"mount --bind -o ro {shlex.quote(str(sa))} {r}/run/secrets/kubernetes.io/serviceaccount",
                f"mount --bind {shlex.quote(str(tmp))} {r}/tmp",
            ]
        )
        environment = " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        command = f"{setup} && exec chroot {r} /usr/bin/env -i {environment} {shlex.join(argv)}"
        self.ready = tmp / "whereabouts-py-ready"
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child=SIGTERM", "--", "sh", "-c", command],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self) -> None:
        for _ in range(600):  # bounded: 600 x 50 ms
            if self.ready.exists():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the installer never became ready: {self.stop()}")

    def stop(self) -> str:
        """SIGTERM (as the kubelet does), then its output; it must exit 0."""
        if self.proc.poll() is None:  # to the container's PID 1, as the kubelet (unshare ignores it)
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            for child in children:
                os.kill(int(child), signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
            out += "\n(the installer ignored SIGTERM for 60 s: killed)"
        return out

    def wait(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=120)
        return self.proc.returncode, out


class NodeView:
    """This machine with the scratch host's /opt, /etc, /var and /run laid over its own."""

    TOPS = ("opt", "etc", "var", "run")

    def __init__(self, host: Path, work: Path) -> None:
        mounts = []
        for top in self.TOPS:
            upper, scratch = host / top, work / f"overlay-work-{top}"
            upper.mkdir(exist_ok=True)
            scratch.mkdir()
            mounts.append(
                f"mount -t overlay overlay -o lowerdir=/{top},upperdir={shlex.quote(str(upper))},"
                f"workdir={shlex.quote(str(scratch))} /{top}"
            )
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             " && ".join(mounts) + " && echo up && exec sleep 900"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline()
        assert line.strip() == "up", self.holder.communicate(timeout=10)
        self.ns = f"/proc/{self.holder.pid}/ns/mnt"

    def argv(self, *command: str) -> list[str]:
        return ["nsenter", f"--mount={self.ns}", "--", *command]

    def run(
        self, command: list[str], env: dict[str, str], stdin: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*command), input=stdin, env=env, capture_output=True, text=True, timeout=120
        )

    def close(self) -> None:
        self.holder.kill()
        self.holder.communicate(timeout=10)
