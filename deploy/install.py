#!/usr/bin/env python3
"""Install whereabouts-py onto a node; runs in the DaemonSet's container with the host under --host-root.

Standard library only: it runs with the image's interpreter before anything else is set up.

What it writes (host paths; inside the container they sit under --host-root):

  /opt/cni/whereabouts-py/bundle-<stamp>/    a copy of --bundle-src (the image's Python prefix)
  /opt/cni/whereabouts-py/current            symlink to the bundle in use (swapped atomically)
  /opt/cni/bin/whereabouts-py                the CNI executable: a sh wrapper exec'ing the bundle's python
  /etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig   service-account token + CA (mode 0600)
  /etc/cni/net.d/whereabouts.d/whereabouts.conf         the flat file: datastore, kubeconfig, node_name
  /var/lib/cni/whereabouts-py/               data_dir (node-local locks), created if missing

Every file is written to a temp file in its directory and renamed over the old one, so the runtime
never execs or reads half a file. A directory cannot be renamed over a non-empty one, and the bundle
directory is a mount point in the DaemonSet, so the bundle is swapped through the `current` symlink
instead: a new bundle is copied to a temp sibling, renamed to `bundle-<stamp>`, then `current` is
replaced by rename. The previous bundle is kept (a plugin process started from it may still import
modules lazily); older ones are removed. Installing the same source again changes nothing.

With --watch it keeps running: every --interval seconds it re-reads the token and CA (the kubelet
rotates projected tokens) and rewrites whatever differs from what it should be. SIGTERM/SIGINT stop
it cleanly (exit 0); nothing is removed from the host, so pods keep getting addresses while the
DaemonSet rolls.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

PROG = "install.py"

# Host paths (absolute on the node; joined under --host-root inside the container).
CNI_BIN_DIR = "/opt/cni/bin"
PLUGIN_PATH = "/opt/cni/bin/whereabouts-py"
BUNDLE_DIR = "/opt/cni/whereabouts-py"
BUNDLE_LINK = BUNDLE_DIR + "/current"
CONF_DIR = "/etc/cni/net.d/whereabouts.d"
KUBECONFIG_PATH = CONF_DIR + "/whereabouts.kubeconfig"
FLAT_FILE_PATH = CONF_DIR + "/whereabouts.conf"
DATA_DIR = "/var/lib/cni/whereabouts-py"
LOG_FILE = "/var/log/whereabouts-py.log"
#: Host directories the installer writes into; the DaemonSet must mount each of them under --host-root.
HOST_DIRS = (CNI_BIN_DIR, BUNDLE_DIR, CONF_DIR, DATA_DIR)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_READY_FILE = "/tmp/whereabouts-py-ready"
BUNDLE_PREFIX = "bundle-"
TEMP_PREFIX = ".tmp-"

# The plugin's fast path (ipam.shim.main): it imports nothing heavy until the node agent declined.
# Without site, the bundle's site-packages (beside bin/python3) is put on sys.path by hand.
SHIM_CODE = (
    "import sys; sys.path.append(sys.executable.rsplit('/', 2)[0] + '/lib/python%d.%d/site-packages'"
    " % sys.version_info[:2]); from ipam.shim import main; sys.exit(main())"
)
WRAPPER = f"""#!/bin/sh
# whereabouts-py CNI plugin. Written by whereabouts-py's deploy/install.py; it is replaced on every
# install, so do not edit. Runs the plugin with the Python bundle installed next to it (-S: no site,
# which the shim loads only for direct mode; -I: ignore PYTHON* variables, user site and the working
# directory; -B: never write bytecode into the bundle, whose bytecode the image compiled).
LD_LIBRARY_PATH={BUNDLE_LINK}/lib
export LD_LIBRARY_PATH
exec {BUNDLE_LINK}/bin/python3 -S -I -B -c "{SHIM_CODE}" "$@"
"""


class InstallError(Exception):
    """A problem the operator can fix; printed as one line, exit status 1."""


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def host_path(host_root: str, path: str) -> str:
    return os.path.join(host_root, path.lstrip("/"))


# -- atomic writes -------------------------------------------------------------------------------------


def write_atomic(path: str, data: bytes, mode: int) -> bool:
    """Write `data` to `path` via a temp file + rename; False (and no write) when it already holds it."""
    try:
        with open(path, "rb") as current:
            if current.read() == data and stat.S_IMODE(os.fstat(current.fileno()).st_mode) == mode:
                return False
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise InstallError(f"cannot read {path}: {exc.strerror or exc}") from None
    directory = os.path.dirname(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    except OSError as exc:
        raise InstallError(f"cannot write into {directory}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise InstallError(f"cannot write {path}: {exc.strerror or exc}") from None
    return True


def fsync_dir(path: str) -> None:
    """Make a rename in `path` survive a crash of the node."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise InstallError(f"cannot create directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InstallError(f"directory {path} is not writable")


@contextlib.contextmanager
def install_lock(directory: str) -> Iterator[None]:
    """Serialise installers on one node (e.g. a pod and its replacement overlapping during a roll)."""
    path = os.path.join(directory, ".install.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise InstallError(f"cannot create lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the bundle ----------------------------------------------------------------------------------------


def walk_tree(root: str, rel: str = "") -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under `root`, sorted, parents before their children."""
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        child = os.path.join(rel, entry.name) if rel else entry.name
        st = entry.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk_tree(root, child)


def bundle_stamp(src: str) -> str:
    """Fingerprint of the source tree from each entry's path, type, mode, size, mtime and link target.

    A new image brings new files (new mtimes); the same image gives the same stamp, so a restarted
    installer skips the copy. Cheap enough to run at every start (no file contents are read).
    """
    digest = hashlib.sha256()
    for rel, st in walk_tree(src):
        target = os.readlink(os.path.join(src, rel)) if stat.S_ISLNK(st.st_mode) else ""
        digest.update(f"{rel}\0{st.st_mode:o}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode())
    return digest.hexdigest()[:16]


def copy_tree(src: str, dst: str) -> None:
    """Copy `src` to the new directory `dst`, keeping modes, mtimes and symlinks.

    An absolute symlink pointing inside `src` (e.g. /usr/local/bin/x -> /usr/local/lib/y) is made
    relative, so it points into the copy on the host, not at the host's own /usr/local.
    """
    os.mkdir(dst, 0o755)
    src_prefix = src.rstrip("/") + "/"
    directories: list[str] = []
    for rel, st in walk_tree(src):
        source, target = os.path.join(src, rel), os.path.join(dst, rel)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o755)
            directories.append(rel)
        elif stat.S_ISLNK(st.st_mode):
            link = os.readlink(source)
            if link.startswith(src_prefix):
                link = os.path.relpath(link, os.path.dirname(source))
            os.symlink(link, target)
        elif stat.S_ISREG(st.st_mode):
            shutil.copy2(source, target, follow_symlinks=False)
        # sockets, fifos and devices are not part of a Python prefix: skipped
    for rel in reversed(directories):  # after their contents, so a read-only mode cannot block the copy
        shutil.copystat(os.path.join(src, rel), os.path.join(dst, rel))
    os.chmod(dst, 0o755)


def remove_tree(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        # Without CAP_DAC_OVERRIDE even root needs write permission on a directory to empty it.
        for directory, _, _ in os.walk(path):
            os.chmod(directory, 0o755)
        shutil.rmtree(path)


def install_bundle(src: str, host_root: str) -> bool:
    """Make BUNDLE_LINK point at a complete copy of `src`; True when something changed."""
    if not os.path.isdir(src):
        raise InstallError(f"bundle source {src} is not a directory")
    if not os.access(os.path.join(src, "bin", "python3"), os.X_OK):
        raise InstallError(f"bundle source {src} has no executable bin/python3")
    root = host_path(host_root, BUNDLE_DIR)
    link = host_path(host_root, BUNDLE_LINK)
    ensure_dir(root)
    try:
        stamp = bundle_stamp(src)
    except OSError as exc:
        raise InstallError(f"cannot read bundle source {src}: {exc}") from None
    name = BUNDLE_PREFIX + stamp
    final = os.path.join(root, name)
    previous = os.readlink(link) if os.path.islink(link) else None
    if previous == name and os.path.isdir(final):
        return False
    try:
        with install_lock(root):
            for entry in os.listdir(root):  # leftovers of an installer killed mid-copy
                if entry.startswith(TEMP_PREFIX):
                    remove_tree(os.path.join(root, entry))
            if not os.path.isdir(final):
                temp = os.path.join(root, f"{TEMP_PREFIX}{name}.{os.getpid()}")
                copy_tree(src, temp)
                os.sync()  # the copy's data is on disk before its name says it is complete
                os.rename(temp, final)
            temp_link = os.path.join(root, f"{TEMP_PREFIX}current.{os.getpid()}")
            os.symlink(name, temp_link)
            os.replace(temp_link, link)
            fsync_dir(root)
            for entry in os.listdir(root):
                if entry.startswith(BUNDLE_PREFIX) and entry not in (name, previous):
                    remove_tree(os.path.join(root, entry))
    except OSError as exc:
        raise InstallError(f"cannot install the bundle into {root}: {exc.strerror or exc}") from None
    say(f"installed bundle {name} from {src} into {BUNDLE_DIR}")
    return True


# -- credentials, kubeconfig, flat file ----------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    server: str
    token: str
    ca: bytes
    namespace: str


def read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise InstallError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def api_server(env: Mapping[str, str], override: str | None) -> str:
    if override:
        return override.rstrip("/")
    host = env.get("KUBERNETES_SERVICE_HOST", "")
    port = env.get("KUBERNETES_SERVICE_PORT", "")
    if not host or not port:
        raise InstallError(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (not running in a pod?); "
            "pass --server https://HOST:PORT"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"https://{host}:{port}"


def read_credentials(args: argparse.Namespace) -> Credentials:
    token = read_file(args.token_file, "service-account token").decode(errors="replace").strip()
    if not token:
        raise InstallError(f"service-account token {args.token_file} is empty")
    ca = read_file(args.ca_file, "service-account CA certificate")
    if not ca.strip():
        raise InstallError(f"service-account CA certificate {args.ca_file} is empty")
    namespace = read_file(args.namespace_file, "service-account namespace").decode(errors="replace").strip()
    if not namespace:
        raise InstallError(f"service-account namespace file {args.namespace_file} is empty")
    return Credentials(api_server(os.environ, args.server), token, ca, namespace)


def kubeconfig(creds: Credentials) -> bytes:
    """The plugin's kubeconfig. JSON is YAML, so every kubeconfig reader takes it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": creds.server,
                    "certificate-authority-data": base64.b64encode(creds.ca).decode(),
                },
            }
        ],
        "users": [{"name": "whereabouts-py", "user": {"token": creds.token}}],
        "contexts": [
            {
                "name": "whereabouts-py",
                "context": {"cluster": "local", "user": "whereabouts-py", "namespace": creds.namespace},
            }
        ],
        "current-context": "whereabouts-py",
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def flat_file(node_name: str) -> bytes:
    config = {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": KUBECONFIG_PATH},
        "data_dir": DATA_DIR,
        "log_file": LOG_FILE,
        "node_name": node_name,
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def write_config(args: argparse.Namespace) -> list[str]:
    """Write the wrapper, kubeconfig and flat file as they should be now; the host paths it rewrote."""
    creds = read_credentials(args)
    root = args.host_root
    for directory in (CNI_BIN_DIR, CONF_DIR, DATA_DIR):
        ensure_dir(host_path(root, directory))
    wanted = (
        (PLUGIN_PATH, WRAPPER.encode(), 0o755),
        (KUBECONFIG_PATH, kubeconfig(creds), 0o600),
        (FLAT_FILE_PATH, flat_file(args.node_name), 0o644),
    )
    return [path for path, data, mode in wanted if write_atomic(host_path(root, path), data, mode)]


# -- the run -------------------------------------------------------------------------------------------


def install(args: argparse.Namespace) -> None:
    install_bundle(args.bundle_src, args.host_root)
    for path in write_config(args):
        say(f"wrote {path}")


def bundle_intact(host_root: str) -> bool:
    return os.path.lexists(host_path(host_root, BUNDLE_LINK + "/bin/python3"))


def watch(args: argparse.Namespace, stop: threading.Event) -> None:
    """Keep the host's files as they should be until `stop` is set; errors are reported and retried."""
    failing = False
    while not stop.wait(args.interval):
        try:
            if not bundle_intact(args.host_root):
                install_bundle(args.bundle_src, args.host_root)
            for path in write_config(args):
                say(f"rewrote {path}")
        except InstallError as exc:
            if not failing:
                print(
                    f"{PROG}: error: {exc} (retrying every {args.interval:g}s)", file=sys.stderr, flush=True
                )
            failing = True
            set_ready(args.ready_file, False)
            continue
        if failing:
            say("recovered")
            failing = False
            set_ready(args.ready_file, True)


def set_ready(path: str, ready: bool) -> None:
    if not path:
        return
    try:
        if ready:
            with open(path, "w") as f:
                f.write("ready\n")
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    except OSError as exc:
        raise InstallError(f"cannot update ready file {path}: {exc.strerror or exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Install the whereabouts-py CNI plugin, its Python bundle, kubeconfig and flat file "
        "onto the node mounted at --host-root.",
    )
    parser.add_argument("--host-root", required=True, help="where the node's filesystem is mounted")
    parser.add_argument(
        "--bundle-src", default="/usr/local", help="Python prefix to copy to the node (default: /usr/local)"
    )
    parser.add_argument(
        "--watch", action="store_true", help="keep running; rewrite the kubeconfig on token rotation"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between checks with --watch")
    parser.add_argument("--token-file", default=SA_DIR + "/token")
    parser.add_argument("--ca-file", default=SA_DIR + "/ca.crt")
    parser.add_argument("--namespace-file", default=SA_DIR + "/namespace")
    parser.add_argument("--server", help="API server URL (default: https://$KUBERNETES_SERVICE_HOST:PORT)")
    parser.add_argument(
        "--node-name",
        default=os.environ.get("NODENAME", ""),
        help="node recorded on leases (default: $NODENAME)",
    )
    parser.add_argument(
        "--ready-file",
        default=DEFAULT_READY_FILE,
        help="touched after the first full install, for the readiness probe ('' for none)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interval <= 0:
        print(f"{PROG}: error: --interval must be > 0", file=sys.stderr)
        return 2
    if not args.node_name:
        print(
            f"{PROG}: error: no node name: set NODENAME (downward API spec.nodeName) or --node-name",
            file=sys.stderr,
        )
        return 1
    stop = threading.Event()
    if args.watch:  # a signal during the first install takes effect once it is complete

        def on_signal(signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        install(args)
        set_ready(args.ready_file, True)
        say(f"installed on node {args.node_name}")
        if args.watch:
            watch(args, stop)
            set_ready(args.ready_file, False)
            say("stopping; the plugin stays installed")
    except InstallError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback in the pod's log: one line an operator can act on
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
