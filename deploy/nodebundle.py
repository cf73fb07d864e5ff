"""The bundle's tree (stamp, copy, removal) and the node's glibc floor, for deploy/install.py.

Standard library only, like install.py: it runs with the image's interpreter before anything is set up.

The glibc floor: the bundle's interpreter and extension modules are linked against the glibc of the
image they were built in, and on the node they run with the node's own glibc, through the dynamic
loader their ELF headers name. A node with an older glibc fails on the first pod with a loader error
("version `GLIBC_2.34' not found"), so the installer refuses it first. The image records the glibc it
was built against and the loader's path in share/whereabouts-py/glibc.json (deploy/image/finish.py);
the node's version is read from that loader (the DaemonSet mounts it read-only under --host-root): glibc's
loader carries "release version X.Y" in its text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
from collections.abc import Iterator

GLIBC_RECORD = "share/whereabouts-py/glibc.json"
#: what the image's prefix holds for ipam-controller only (deploy/image/finish.py CONTROLLER_SITE):
#: the nodes never import it, so it is neither copied nor part of the stamp
NOT_FOR_NODES = ("lib/whereabouts-py-controller",)
_RELEASE = re.compile(rb"release version (\d+)\.(\d+)")


def walk_tree(root: str, rel: str = "", skip: tuple[str, ...] = ()) -> Iterator[tuple[str, os.stat_result]]:
    """(relative path, lstat) of everything under `root` but `skip` (relative paths), sorted, parents
    before their children."""
    with os.scandir(os.path.join(root, rel) if rel else root) as it:
        entries = sorted(it, key=lambda entry: entry.name)
    for entry in entries:
        child = os.path.join(rel, entry.name) if rel else entry.name
        if child in skip:
            continue
        st = entry.stat(follow_symlinks=False)
        yield child, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk_tree(root, child, skip)


def bundle_stamp(src: str) -> str:
    """Fingerprint of the source tree from each entry's path, type, mode, size, mtime and link target.

    A new image brings new files (new mtimes); the same image gives the same stamp, so a restarted
    installer skips the copy. Cheap enough to run at every start (no file contents are read).
    """
    digest = hashlib.sha256()
    for rel, st in walk_tree(src, skip=NOT_FOR_NODES):
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
    for rel, st in walk_tree(src, skip=NOT_FOR_NODES):
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


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


def glibc_refusal(bundle_src: str, host_root: str) -> str | None:
    """Why this node cannot run the bundle (its glibc is older than the image's, or unknown); None
    when it can."""
    record_path = os.path.join(bundle_src, GLIBC_RECORD)
    try:
        with open(record_path) as f:
            record = json.load(f)
        floor, loader = _version(str(record["glibc"])), str(record["loader"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"the bundle records no glibc floor ({record_path}: {exc}); build the image with make image or deploy/Dockerfile"
    node_loader = os.path.join(host_root, loader.lstrip("/"))
    try:
        with open(node_loader, "rb") as f:
            found = _RELEASE.search(f.read())
    except OSError as exc:
        return (
            f"cannot read the node's dynamic loader {loader} at {node_loader} ({exc.strerror or exc}): the "
            "bundle needs a glibc node; the DaemonSet mounts the loader (volume node-loader)"
        )
    if found is None:
        return f"the node's {loader} is not glibc's loader (a musl node?): the bundle needs glibc {record['glibc']} or newer"
    node = (int(found.group(1)), int(found.group(2)))
    if node < floor:
        return (
            f"the node's glibc is {node[0]}.{node[1]}, older than {floor[0]}.{floor[1]}, the glibc this image was "
            "built against: its Python would not start on this node. Use an image built on an older base "
            "(docs/operating.md, Install) or upgrade the node"
        )
    return None
