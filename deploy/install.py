#!/usr/bin/env python3
"""Install whereabouts-py onto a node; runs in the DaemonSet's container with the host under --host-root.

Standard library only: it runs with the image's interpreter before anything else is set up.

What it writes (host paths; inside the container they sit under --host-root; BIN and CONF are
--cni-bin-dir and --cni-conf-dir, /opt/cni/bin and /etc/cni/net.d by default):

  /opt/cni/whereabouts-py/bundle-<stamp>/    a copy of --bundle-src (the image's Python prefix)
  /opt/cni/whereabouts-py/current            symlink to the bundle in use (swapped atomically)
  BIN/whereabouts-py                         the CNI executable: a sh wrapper exec'ing the bundle's python
  CONF/whereabouts.d/whereabouts.kubeconfig  the plugin's own token + CA, inline (mode 0600, root's)
  CONF/whereabouts.d/whereabouts.conf        the flat file: datastore, kubeconfig, node_name
  /var/lib/cni/whereabouts-py/               data_dir (node-local locks), created if missing

The plugin's credentials: the installer's own identity (this pod's ServiceAccount token) is used for
one thing only, the TokenRequest API: it mints a token for the plugin's ServiceAccount
(--plugin-service-account) that is bound to no pod and lives --token-lifetime seconds (24 h by
default), and writes it inline into the kubeconfig. So the node keeps working while this pod is
replaced, evicted or down, until that token expires. With --watch the token is renewed when a third
of its lifetime is left; every mint is logged with its expiry.

Before writing anything it refuses a node whose glibc is older than the one the image was built
against (nodebundle.glibc_refusal: the image's record against the node's dynamic loader).

Every file is written to a temp file in its directory and renamed over the old one, so the runtime
never execs or reads half a file. Nothing on the host is followed through a symlink: existing files
are inspected with lstat/O_NOFOLLOW (a planted symlink is replaced, never read or written through),
directories are created 0755 whatever the umask and checked to be real directories no one else may
write. A directory cannot be renamed over a non-empty one, and the bundle directory is a mount point
in the DaemonSet, so the bundle is swapped through the `current` symlink instead: a new bundle is
copied to a temp sibling, renamed to `bundle-<stamp>`, then `current` is replaced by rename. The
previous bundle is kept (a plugin process started from it may still import modules lazily); older
ones are removed. Installing the same source again changes nothing (a kubeconfig whose token still
has more than a third of its lifetime left is kept).

With --watch it keeps running: every --interval seconds it rewrites whatever differs from what it
should be and renews the token when due. SIGTERM/SIGINT stop it cleanly (exit 0); nothing is removed
from the host, so pods keep getting addresses while the DaemonSet rolls.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import errno
import fcntl
import json
import os
import signal
import ssl
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # nodebundle.py beside it, even under -I
from nodebundle import bundle_stamp, copy_tree, glibc_refusal, is_real_dir, remove_tree

PROG = "install.py"

# Host paths (absolute on the node; joined under --host-root inside the container).
DEFAULT_CNI_BIN_DIR = "/opt/cni/bin"
DEFAULT_CNI_CONF_DIR = "/etc/cni/net.d"
#: The CNI configuration directories under which the plugin looks for whereabouts.d/whereabouts.conf
#: (ipam.config.DEFAULT_FLAT_FILES); --cni-conf-dir must be one of them.
FLAT_FILE_CONF_DIRS = ("/etc/kubernetes/cni/net.d", "/etc/cni/net.d")
CONF_SUBDIR = "whereabouts.d"
PLUGIN_NAME = "whereabouts-py"
BUNDLE_DIR = "/opt/cni/whereabouts-py"
BUNDLE_LINK = BUNDLE_DIR + "/current"
DATA_DIR = "/var/lib/cni/whereabouts-py"
LOG_FILE = "/var/log/whereabouts-py.log"
# The defaults, spelled out (README and tests name them).
CNI_BIN_DIR = DEFAULT_CNI_BIN_DIR
PLUGIN_PATH = DEFAULT_CNI_BIN_DIR + "/" + PLUGIN_NAME
CONF_DIR = DEFAULT_CNI_CONF_DIR + "/" + CONF_SUBDIR
KUBECONFIG_PATH = CONF_DIR + "/whereabouts.kubeconfig"
FLAT_FILE_PATH = CONF_DIR + "/whereabouts.conf"

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_READY_FILE = "/tmp/whereabouts-py-ready"
DEFAULT_PLUGIN_SERVICE_ACCOUNT = "whereabouts-py"
DEFAULT_TOKEN_LIFETIME = 24 * 3600
#: The API server refuses a TokenRequest for less (TokenRequest validation: at least 10 minutes).
MIN_TOKEN_LIFETIME = 600
#: Renew when this share of the token's lifetime is left.
RENEW_WHEN_LEFT = 1 / 3
BUNDLE_PREFIX = "bundle-"
TEMP_PREFIX = ".tmp-"
DIR_MODE = 0o755
REQUEST_TIMEOUT = 30.0

# The plugin's fast path (ipam.plugin.main): it imports nothing heavy until the node agent declined.
# Without site, the bundle's site-packages (beside bin/python3) is put on sys.path by hand.
SHIM_CODE = (
    "import sys; sys.path.append(sys.executable.rsplit('/', 2)[0] + '/lib/python%d.%d/site-packages'"
    " % sys.version_info[:2]); from ipam.plugin import main; sys.exit(main())"
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

#: The clock every token decision reads (tests replace it to reach a renewal without waiting).
now: Callable[[], float] = time.time


class InstallError(Exception):
    """A problem the operator can fix; printed as one line, exit status 1."""


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def host_path(host_root: str, path: str) -> str:
    return os.path.join(host_root, path.lstrip("/"))


@dataclass(frozen=True)
class Paths:
    """Where things go on the node, from --cni-bin-dir and --cni-conf-dir."""

    cni_bin_dir: str = DEFAULT_CNI_BIN_DIR
    cni_conf_dir: str = DEFAULT_CNI_CONF_DIR

    @property
    def plugin(self) -> str:
        return self.cni_bin_dir + "/" + PLUGIN_NAME

    @property
    def conf_dir(self) -> str:
        return self.cni_conf_dir + "/" + CONF_SUBDIR

    @property
    def kubeconfig(self) -> str:
        return self.conf_dir + "/whereabouts.kubeconfig"

    @property
    def flat_file(self) -> str:
        return self.conf_dir + "/whereabouts.conf"

    @property
    def host_dirs(self) -> tuple[str, ...]:
        """Host directories the installer writes into; the DaemonSet must mount each under --host-root."""
        return (self.cni_bin_dir, BUNDLE_DIR, self.conf_dir, DATA_DIR)


#: Host directories the installer writes into with the default paths.
HOST_DIRS = Paths().host_dirs


def paths_of(args: argparse.Namespace) -> Paths:
    return Paths(args.cni_bin_dir, args.cni_conf_dir)


# -- safe host files -----------------------------------------------------------------------------------


def _os_error(what: str, path: str, exc: OSError) -> InstallError:
    return InstallError(f"{what} {path}: {exc.strerror or exc}")


def ensure_dir(path: str, host_root: str | None = None) -> None:
    """Make `path` a real directory, mode 0755 when created (whatever the umask), and check every
    component below `host_root` (or `path` alone) is a directory, not a symlink, that only its owner
    (root, or whoever runs this) may write."""
    base = os.path.normpath(host_root) if host_root else None
    path = os.path.normpath(path)
    if base and path != base and not path.startswith(base.rstrip("/") + "/"):
        raise InstallError(f"{path} is not under {base}")
    components = [path]
    if base:
        rel = os.path.relpath(path, base)
        parts = [] if rel == "." else rel.split(os.sep)
        components = [os.path.join(base, *parts[: i + 1]) for i in range(len(parts))]
    for component in components:
        if not os.path.lexists(component):  # above the mount points the container's root is read-only
            try:
                os.mkdir(component, DIR_MODE)
                os.chmod(component, DIR_MODE)  # the umask may have taken bits; lstat-checked below
            except FileExistsError:
                pass
            except OSError as exc:
                raise _os_error("cannot create directory", component, exc) from None
        check_dir(component, writable=component == components[-1])


def check_dir(path: str, writable: bool = True) -> None:
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise _os_error("cannot inspect", path, exc) from None
    if stat.S_ISLNK(st.st_mode):
        raise InstallError(f"{path} is a symlink; the installer writes only into real directories")
    if not stat.S_ISDIR(st.st_mode):
        raise InstallError(f"{path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise InstallError(f"directory {path} is owned by uid {st.st_uid}, not root")
    if st.st_mode & 0o022:
        raise InstallError(
            f"directory {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "chmod go-w it"
        )
    if writable and not os.access(path, os.W_OK | os.X_OK):
        raise InstallError(f"directory {path} is not writable")


def read_regular(path: str) -> tuple[bytes, os.stat_result] | None:
    """The content and stat of `path` if it is a regular file; None when it is absent, a symlink or
    anything else (never followed, never opened when it is a fifo or device)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None
        raise _os_error("cannot read", path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), st
    except OSError as exc:
        raise _os_error("cannot read", path, exc) from None
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int) -> bool:
    """Write `data` to `path` via a temp file + rename; False (and no write) when it already holds it.

    Only a regular file owned by us with exactly `data` and `mode` counts as holding it: a symlink
    (even to an identical copy), fifo or foreign-owned file is replaced by rename, which replaces the
    link itself, never its target.
    """
    current = read_regular(path)
    if current is not None:
        content, st = current
        if content == data and stat.S_IMODE(st.st_mode) == mode and st.st_uid == os.geteuid():
            return False
    directory = os.path.dirname(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=TEMP_PREFIX + os.path.basename(path) + ".", dir=directory)
    except OSError as exc:
        raise _os_error("cannot write into", directory, exc) from None
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
        raise _os_error("cannot write", path, exc) from None
    return True


def fsync_dir(path: str) -> None:
    """Make a rename in `path` survive a crash of the node."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_lock(path: str) -> int:
    """Open (creating) the lock file `path` without following a symlink; a planted symlink or other
    non-file is removed and a fresh file made."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                raise _os_error("cannot create lock file", path, exc) from None
        else:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                return fd
            os.close(fd)
        try:
            remove_tree(path)
        except OSError as exc:
            raise _os_error("cannot remove", path, exc) from None
    raise InstallError(f"cannot create lock file {path}: it keeps being replaced")


@contextlib.contextmanager
def install_lock(directory: str) -> Iterator[None]:
    """Serialise installers on one node (e.g. a pod and its replacement overlapping during a roll)."""
    fd = open_lock(os.path.join(directory, ".install.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# -- the bundle ----------------------------------------------------------------------------------------


def install_bundle(src: str, host_root: str) -> bool:
    """Make BUNDLE_LINK point at a complete copy of `src`; True when something changed."""
    if not os.path.isdir(src):
        raise InstallError(f"bundle source {src} is not a directory")
    if not os.access(os.path.join(src, "bin", "python3"), os.X_OK):
        raise InstallError(f"bundle source {src} has no executable bin/python3")
    root = host_path(host_root, BUNDLE_DIR)
    link = host_path(host_root, BUNDLE_LINK)
    ensure_dir(root, host_root)
    try:
        stamp = bundle_stamp(src)
    except OSError as exc:
        raise InstallError(f"cannot read bundle source {src}: {exc}") from None
    name = BUNDLE_PREFIX + stamp
    final = os.path.join(root, name)
    previous = os.readlink(link) if os.path.islink(link) else None
    if previous == name and is_real_dir(final):
        return False
    try:
        with install_lock(root):
            for entry in os.listdir(root):  # leftovers of an installer killed mid-copy
                if entry.startswith(TEMP_PREFIX):
                    remove_tree(os.path.join(root, entry))
            if os.path.lexists(final) and not is_real_dir(final):
                remove_tree(final)  # a symlink or file planted under the bundle's name
            if os.path.lexists(link) and not os.path.islink(link):
                remove_tree(link)
            if not os.path.lexists(final):
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


# -- the installer's identity and the plugin's token -------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """The API server as this pod sees it, and the installer's own identity (its pod's token)."""

    server: str
    ca: bytes
    namespace: str  # this pod's namespace: where the plugin's ServiceAccount and the pools live
    token_file: str  # re-read at every use: the kubelet rotates the projected token


@dataclass(frozen=True)
class PluginToken:
    token: str
    expires: float  # epoch seconds
    issued: float  # epoch seconds, by our clock

    @property
    def renew_at(self) -> float:
        return self.expires - (self.expires - self.issued) * RENEW_WHEN_LEFT

    def due(self) -> bool:
        return now() >= self.renew_at


def read_file(path: str, what: str) -> bytes:
    """A file of the container (the service-account volume: its files are symlinks by design)."""
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


def own_token(cluster: Cluster) -> str:
    token = read_file(cluster.token_file, "service-account token").decode(errors="replace").strip()
    if not token:
        raise InstallError(f"service-account token {cluster.token_file} is empty")
    return token


def read_cluster(args: argparse.Namespace) -> Cluster:
    ca = read_file(args.ca_file, "service-account CA certificate")
    if not ca.strip():
        raise InstallError(f"service-account CA certificate {args.ca_file} is empty")
    namespace = read_file(args.namespace_file, "service-account namespace").decode(errors="replace").strip()
    if not namespace:
        raise InstallError(f"service-account namespace file {args.namespace_file} is empty")
    server = api_server(os.environ, args.server)
    if not server.startswith("https://"):
        raise InstallError(f"--server {server}: only https:// is supported (the token travels in it)")
    cluster = Cluster(server, ca, namespace, args.token_file)
    own_token(cluster)  # fail early, naming the file, when this pod has no token
    return cluster


def parse_time(value: str) -> float:
    """An RFC 3339 UTC timestamp as the API server writes it (2026-01-02T03:04:05Z)."""
    import calendar

    return float(calendar.timegm(time.strptime(value, "%Y-%m-%dT%H:%M:%SZ")))


def format_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def mint_token(cluster: Cluster, service_account: str, lifetime: int) -> PluginToken:
    """TokenRequest (create on serviceaccounts/token) for `service_account` in the pod's namespace,
    bound to no object: it stays valid for its lifetime whatever happens to this pod."""
    path = "/api/v1/namespaces/{}/serviceaccounts/{}/token".format(
        urllib.parse.quote(cluster.namespace, safe=""), urllib.parse.quote(service_account, safe="")
    )
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"expirationSeconds": lifetime},  # no audiences: the API server's own
    }
    request = urllib.request.Request(
        cluster.server + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Authorization": "Bearer " + own_token(cluster),
            "Content-Type": "application/json",
            "Accept": "application/json",
        },
    )
    issued = now()
    what = f"TokenRequest for ServiceAccount {cluster.namespace}/{service_account}"
    try:
        context = ssl.create_default_context(cadata=cluster.ca.decode(errors="replace"))
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = ""
        with contextlib.suppress(Exception):
            detail = str(json.loads(exc.read()).get("message", ""))
        hint = {
            401: "the installer's own token was refused",
            403: "the installer's ServiceAccount lacks create on serviceaccounts/token for "
            f"resourceNames [{service_account}] (deploy/base/rbac.yaml)",
            404: f"ServiceAccount {cluster.namespace}/{service_account} does not exist",
        }.get(exc.code, "")
        raise InstallError(
            f"{what}: HTTP {exc.code}" + (f": {hint}" if hint else "") + (f" ({detail})" if detail else "")
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InstallError(f"{what}: cannot reach {cluster.server}: {reason}") from None
    status: dict[str, object] = answer.get("status") or {} if isinstance(answer, dict) else {}
    try:
        token = str(status["token"])
        expires = parse_time(str(status["expirationTimestamp"]))
    except (TypeError, KeyError, ValueError):
        raise InstallError(f"{what}: the API server's answer has no token or expirationTimestamp") from None
    if not token or expires <= issued:
        raise InstallError(f"{what}: the API server returned an empty or expired token")
    return PluginToken(token, expires, issued)


def token_works(cluster: Cluster, token: str) -> bool | None:
    """Whether the API server accepts `token`: a SelfSubjectReview (allowed to every authenticated
    identity) made with it. True/False; None when the answer says nothing about the token (the server
    is unreachable or has no such API), which keeps the token."""
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    request = urllib.request.Request(
        cluster.server + "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"},
    )
    try:
        context = ssl.create_default_context(cadata=cluster.ca.decode(errors="replace"))
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT, context=context):
            return True
    except urllib.error.HTTPError as exc:
        return False if exc.code == 401 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None


def jwt_claims(token: str) -> dict[str, object]:
    """The (unverified) claims of a service-account JWT; {} when it is not one. Used only to decide
    whether a kubeconfig left by an earlier run still holds a fresh token of the right account."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):
        return {}
    return claims if isinstance(claims, dict) else {}


def reusable_token(
    host_root: str, paths: Paths, cluster: Cluster, service_account: str
) -> PluginToken | None:
    """The token in the node's kubeconfig when that file is ours (a regular file), for this server,
    CA and ServiceAccount, and the token is not yet due for renewal: an installer restart keeps it."""
    found = read_regular(host_path(host_root, paths.kubeconfig))
    if found is None:
        return None
    try:
        config = json.loads(found[0])
        cluster_entry = config["clusters"][0]["cluster"]
        token = str(config["users"][0]["user"]["token"])
        if cluster_entry["server"] != cluster.server:
            return None
        if base64.b64decode(cluster_entry["certificate-authority-data"]) != cluster.ca:
            return None
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None
    claims = jwt_claims(token)
    if claims.get("sub") != f"system:serviceaccount:{cluster.namespace}:{service_account}":
        return None
    exp, iat = claims.get("exp"), claims.get("iat")
    if not isinstance(exp, (int, float)) or not isinstance(iat, (int, float)) or exp <= iat:
        return None
    found_token = PluginToken(token, float(exp), float(iat))
    return None if found_token.due() else found_token


def describe(token: PluginToken) -> str:
    left = max(0.0, token.expires - now())
    return (
        f"expires {format_time(token.expires)} (in {left / 3600:.1f} h), "
        f"renewal after {format_time(token.renew_at)}"
    )


# -- kubeconfig, flat file -----------------------------------------------------------------------------


def kubeconfig(cluster: Cluster, token: str) -> bytes:
    """The plugin's kubeconfig, inline data only (no file paths, no exec): JSON is YAML, so every
    kubeconfig reader takes it."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority-data": base64.b64encode(cluster.ca).decode(),
                },
            }
        ],
        "users": [{"name": "whereabouts-py", "user": {"token": token}}],
        "contexts": [
            {
                "name": "whereabouts-py",
                "context": {"cluster": "local", "user": "whereabouts-py", "namespace": cluster.namespace},
            }
        ],
        "current-context": "whereabouts-py",
    }
    return (json.dumps(config, indent=2) + "\n").encode()


def flat_file(node_name: str, paths: Paths | None = None) -> bytes:
    config = {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": (paths or Paths()).kubeconfig},
        "data_dir": DATA_DIR,
        "log_file": LOG_FILE,
        "node_name": node_name,
    }
    return (json.dumps(config, indent=2) + "\n").encode()


class Installer:
    """One node's install, and what --watch keeps up to date: the files and the plugin's token."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.paths = paths_of(args)
        self.token: PluginToken | None = None
        self.checked_at = 0.0
        self.refused = False

    def plugin_token(self, cluster: Cluster) -> PluginToken:
        """The token to write: the current one until it is due, then a freshly minted one. A failed
        renewal keeps the old token (valid until it expires) and raises, so it is retried. A token
        kept from an earlier run, and every --token-check-interval the current one, is shown to the
        API server first: one it refuses (its ServiceAccount was deleted and recreated to revoke
        every node's access) is replaced at once."""
        refused = False
        if self.token is None:
            self.token = reusable_token(
                self.args.host_root, self.paths, cluster, self.args.plugin_service_account
            )
            if self.token is not None:
                self.checked_at = now()
                refused = token_works(cluster, self.token.token) is False
                if not refused:
                    say(f"kept the plugin's token from {self.paths.kubeconfig}: {describe(self.token)}")
        elif now() - self.checked_at >= self.args.token_check_interval:
            self.checked_at = now()
            refused = token_works(cluster, self.token.token) is False
        if refused:
            self.refused = True  # until a new token is minted, even if minting fails for a while
            print(
                f"{PROG}: error: the API server refuses the plugin's token (its ServiceAccount was "
                "recreated?); minting a new one",
                file=sys.stderr,
                flush=True,
            )
        if self.token is None or self.refused or self.token.due():
            if self.token is not None and now() >= self.token.expires:
                print(
                    f"{PROG}: error: the plugin's token expired at {format_time(self.token.expires)}",
                    file=sys.stderr,
                    flush=True,
                )
            self.token = mint_token(cluster, self.args.plugin_service_account, self.args.token_lifetime)
            self.checked_at = now()
            self.refused = False
            say(
                f"minted a token for ServiceAccount {cluster.namespace}/{self.args.plugin_service_account}: "
                f"{describe(self.token)}"
            )
        return self.token

    def write_config(self) -> list[str]:
        """Write the wrapper, kubeconfig and flat file as they should be now; the host paths it rewrote."""
        cluster = read_cluster(self.args)
        root = self.args.host_root
        for directory in (self.paths.cni_bin_dir, self.paths.conf_dir, DATA_DIR):
            ensure_dir(host_path(root, directory), root)
        token = self.plugin_token(cluster)
        wanted = (
            (self.paths.plugin, WRAPPER.encode(), 0o755),
            (self.paths.kubeconfig, kubeconfig(cluster, token.token), 0o600),
            (self.paths.flat_file, flat_file(self.args.node_name, self.paths), 0o644),
        )
        return [path for path, data, mode in wanted if write_atomic(host_path(root, path), data, mode)]

    def install(self) -> None:
        refusal = glibc_refusal(self.args.bundle_src, self.args.host_root)
        if refusal:
            raise InstallError(refusal)
        install_bundle(self.args.bundle_src, self.args.host_root)
        for path in self.write_config():
            say(f"wrote {path}")

    def watch(self, stop: threading.Event) -> None:
        """Keep the host's files as they should be until `stop` is set; errors are reported and retried."""
        args = self.args
        failing = False
        while not stop.wait(args.interval):
            try:
                if not bundle_intact(args.host_root):
                    install_bundle(args.bundle_src, args.host_root)
                for path in self.write_config():
                    say(f"rewrote {path}")
            except InstallError as exc:
                if not failing:
                    print(
                        f"{PROG}: error: {exc} (retrying every {args.interval:g}s)",
                        file=sys.stderr,
                        flush=True,
                    )
                failing = True
                set_ready(args.ready_file, False)
                continue
            if failing:
                say("recovered")
                failing = False
                set_ready(args.ready_file, True)


# -- the run -------------------------------------------------------------------------------------------


def bundle_intact(host_root: str) -> bool:
    return os.path.lexists(host_path(host_root, BUNDLE_LINK + "/bin/python3"))


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
        "--cni-bin-dir",
        default=DEFAULT_CNI_BIN_DIR,
        help="the node's CNI plugin directory, where the runtime (or Multus) looks for plugins "
        f"(default: {DEFAULT_CNI_BIN_DIR}; k3s: /var/lib/rancher/k3s/data/cni; OpenShift: /var/lib/cni/bin)",
    )
    parser.add_argument(
        "--cni-conf-dir",
        default=DEFAULT_CNI_CONF_DIR,
        choices=FLAT_FILE_CONF_DIRS,
        help="the CNI configuration directory whose whereabouts.d/ receives the kubeconfig and flat file; "
        f"one of those the plugin searches (default: {DEFAULT_CNI_CONF_DIR}; OpenShift: /etc/kubernetes/cni/net.d)",
    )
    parser.add_argument(
        "--watch", action="store_true", help="keep running; renew the plugin's token and repair the files"
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between checks with --watch")
    parser.add_argument(
        "--token-check-interval",
        type=float,
        default=300.0,
        help="seconds between showing the plugin's token to the API server with --watch, so a revoked "
        "one (ServiceAccount recreated) is replaced (default: 300)",
    )
    parser.add_argument(
        "--plugin-service-account",
        default=DEFAULT_PLUGIN_SERVICE_ACCOUNT,
        help="ServiceAccount (in this pod's namespace) whose token the plugin uses "
        f"(default: {DEFAULT_PLUGIN_SERVICE_ACCOUNT})",
    )
    parser.add_argument(
        "--token-lifetime",
        type=int,
        default=DEFAULT_TOKEN_LIFETIME,
        help="seconds the plugin's token is valid; renewed with a third left; a node whose installer "
        f"is gone keeps access this long at most (default: {DEFAULT_TOKEN_LIFETIME}, minimum {MIN_TOKEN_LIFETIME})",
    )
    parser.add_argument(
        "--token-file", default=SA_DIR + "/token", help="this pod's own token (for TokenRequest only)"
    )
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments; exits 2 with a usage message when they are wrong."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.interval <= 0:
        parser.error("--interval must be > 0")
    if args.token_lifetime < MIN_TOKEN_LIFETIME:
        parser.error(f"--token-lifetime must be at least {MIN_TOKEN_LIFETIME} (the API server's minimum)")
    bin_dir = args.cni_bin_dir.rstrip("/")
    if not os.path.isabs(bin_dir) or os.path.normpath(bin_dir) != bin_dir:
        parser.error("--cni-bin-dir must be an absolute, normalised path")
    args.cni_bin_dir = bin_dir
    return args


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    """Install, then with --watch keep it so until `stop` is set; the exit status."""
    if not args.node_name:
        print(
            f"{PROG}: error: no node name: set NODENAME (downward API spec.nodeName) or --node-name",
            file=sys.stderr,
        )
        return 1
    installer = Installer(args)
    try:
        installer.install()
        set_ready(args.ready_file, True)
        say(f"installed on node {args.node_name}")
        if args.watch:
            installer.watch(stop)
            set_ready(args.ready_file, False)
            say("stopping; the plugin stays installed")
    except InstallError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # never a traceback in the pod's log: one line an operator can act on
        print(f"{PROG}: error: unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    if args.watch:  # a signal during the first install takes effect once it is complete

        def on_signal(signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return run(args, stop)


if __name__ == "__main__":
    sys.exit(main())
