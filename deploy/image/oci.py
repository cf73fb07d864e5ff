"""A root filesystem directory packed as a one-layer OCI image archive, byte for byte reproducible.

Every entry is sorted by path, owned by its numeric uid/gid with no user or group names, dated
`epoch` (SOURCE_DATE_EPOCH), and the layer is gzip-compressed with no name or date in its header; the
config and manifest are JSON with sorted keys. So the same tree and epoch give the same digest.
`skopeo` reads the archive as oci-archive:PATH and `podman load -i PATH` loads it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def walk(root: str, rel: str = "") -> Iterator[str]:
    """Relative paths under `root`, sorted, parents before children; symlinks are not followed."""
    with os.scandir(os.path.join(root, rel)) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        child = os.path.join(rel, name) if rel else name
        yield child
        if os.path.isdir(os.path.join(root, child)) and not os.path.islink(os.path.join(root, child)):
            yield from walk(root, child)


def write_tar(out: BinaryIO, entries: Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]) -> None:
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, data)


def layer_entries(root: str, epoch: int) -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
    seen: dict[tuple[int, int], str] = {}  # hard links: (dev, inode) -> first path
    for rel in walk(root):
        path = os.path.join(root, rel)
        st = os.lstat(path)
        info = tarfile.TarInfo(rel)
        info.mode, info.uid, info.gid, info.mtime = st.st_mode & 0o7777, st.st_uid, st.st_gid, epoch
        info.uname = info.gname = ""
        key = (st.st_dev, st.st_ino)
        if os.path.islink(path):
            info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
            yield info, None
        elif os.path.isdir(path):
            info.type = tarfile.DIRTYPE
            yield info, None
        elif not os.path.isfile(path):
            raise ValueError(f"{path}: only files, directories and symlinks go into the image")
        elif st.st_nlink > 1 and key in seen:
            info.type, info.linkname = tarfile.LNKTYPE, seen[key]
            yield info, None
        else:
            seen[key] = rel
            info.size = st.st_size
            with open(path, "rb") as f:
                yield info, f


@dataclass(frozen=True)
class Blob:
    data: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **extra}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pack(root: str, out_path: str, epoch: int, ref: str, config: dict[str, Any]) -> str:
    """Write `root` as an OCI archive named `ref` (name:tag) to `out_path`; the manifest's digest."""
    raw = io.BytesIO()
    write_tar(raw, layer_entries(root, epoch))
    compressed = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, mtime=0, compresslevel=6) as gz:
        gz.write(raw.getvalue())
    layer = Blob(compressed.getvalue(), LAYER_TYPE)
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    image_config = {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()]},
        "history": [{"created": created, "created_by": "deploy/image/build.py (make image)"}],
    }
    config_blob = Blob(dumps(image_config), CONFIG_TYPE)
    manifest = Blob(
        dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_TYPE,
                "config": config_blob.descriptor(),
                "layers": [layer.descriptor()],
            }
        ),
        MANIFEST_TYPE,
    )
    index = {
        "schemaVersion": 2,
        "manifests": [manifest.descriptor(annotations={"org.opencontainers.image.ref.name": ref})],
    }
    files = {"oci-layout": dumps({"imageLayoutVersion": "1.0.0"}), "index.json": dumps(index)}
    for blob in (layer, config_blob, manifest):
        files["blobs/sha256/" + blob.digest.split(":")[1]] = blob.data

    def archive() -> Iterator[tuple[tarfile.TarInfo, BinaryIO | None]]:
        for directory in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
            yield info, None
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, epoch
            yield info, io.BytesIO(files[name])

    temp = out_path + ".tmp"
    with open(temp, "wb") as out:
        write_tar(out, archive())
    os.replace(temp, out_path)
    return manifest.digest
