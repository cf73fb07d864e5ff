"""The node's flat file: where it lives, and how files that steer root are read.

The flat file is the node's own configuration (written by the installer); it is the only source of
node-only keys (host paths, identities). Its location is fixed, or set by the runtime's environment
(`WHEREABOUTS_PY_FLAT_FILE`), never by the network config, which tenants write.

Standard library only: the CNI shim reads `agent_socket` from here before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: this module is on the shim's import-light path
    from collections.abc import Mapping, Sequence

FLAT_FILE_ENV = "WHEREABOUTS_PY_FLAT_FILE"
DEFAULT_FLAT_FILES = (
    "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf",
    "/etc/cni/net.d/whereabouts.d/whereabouts.conf",
)
MAX_NODE_FILE = 1 << 20


class NodeFileError(Exception):
    """A node file that cannot be trusted or read; `reason` says why (no file content in it)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason


def flat_file_candidates(environ: Mapping[str, str]) -> tuple[str, ...]:
    """`$WHEREABOUTS_PY_FLAT_FILE` alone when the runtime sets it, else the fixed locations."""
    override = environ.get(FLAT_FILE_ENV, "")
    return (override,) if override else DEFAULT_FLAT_FILES


def find_flat_file(candidates: Sequence[str]) -> str | None:
    for path in candidates:
        if "\0" not in path and os.path.isfile(path):
            return path
    return None


def read_node_file(path: str, max_bytes: int = MAX_NODE_FILE) -> bytes:
    """Read a file whose content decides what root does (the flat file, the node kubeconfig).

    It must be a regular file owned by our effective uid (root on a node) and writable by nobody
    else; otherwise someone other than the node's administrator could steer the plugin.
    """
    if "\0" in path:
        raise NodeFileError(path.replace("\0", "\\0"), "contains a NUL character")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise NodeFileError(path, f"cannot be opened: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NodeFileError(path, "is not a regular file")
        if st.st_uid != os.geteuid():
            raise NodeFileError(path, f"is owned by uid {st.st_uid}, not by uid {os.geteuid()}")
        if st.st_mode & 0o022:
            raise NodeFileError(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})")
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise NodeFileError(path, f"is larger than {max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise NodeFileError(path, f"cannot be read: {exc.strerror}") from None
    finally:
        os.close(fd)


def agent_socket(environ: Mapping[str, str]) -> str | None:
    """The flat file's `agent_socket`, for the shim; None when unset or the file is unusable
    (the full config load reports an unusable flat file with its reason)."""
    path = find_flat_file(flat_file_candidates(environ))
    if path is None:
        return None
    try:
        doc = json.loads(read_node_file(path))
    except (NodeFileError, ValueError):
        return None
    value = doc.get("agent_socket") if isinstance(doc, dict) else None
    return value if isinstance(value, str) and value and "\0" not in value else None
