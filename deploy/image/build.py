#!/usr/bin/env python3
"""make image: the whereabouts-py image from Debian's packages and pinned wheels, no base image pulled.

    python3 deploy/image/build.py [--out dist] [--cache DIR] [--no-cache] [--check] [--update-lock]

Writes OUT/whereabouts-py-<version>.oci.tar (an OCI archive: `skopeo copy oci-archive:...`, `podman
load -i ...`) and OUT/whereabouts-py-<version>.oci.digest (the image's manifest digest). Needs root,
mmdebstrap and the network to deb.debian.org and PyPI (downloads are cached in the cache directory).

The same recipe as deploy/Dockerfile, from other sources:
1. mmdebstrap installs exactly the Debian bookworm packages of debian.lock (Python 3.11 among them);
2. Debian's interpreter and standard library are moved to /usr/local, where python:3.11-slim has its
   own, so /usr/local is the bundle in both images;
3. the files the Dockerfile COPYs (its COPY lines, read here) go to /opt/whereabouts-py, our wheel is
   built from them, and the wheels of requirements.txt are downloaded (hash-checked);
4. finish.py runs inside the new root, as the Dockerfile's RUN step runs it;
5. logs, caches and device nodes are removed and the tree is packed by oci.py.

Reproducible: the same commit gives the same digest. Every date is SOURCE_DATE_EPOCH (default: the
time of the last commit that changed an input), package versions are pinned (a version Debian no longer serves fails the build: run
--update-lock), bytecode is hash-based and the archive is sorted. --check builds twice, uncached, and
fails unless both digests agree. A build is cached under a key of all its inputs, so an unchanged tree
is not built again (tests/test_image.py shares the cache).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

import oci

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DOCKERFILE = os.path.join(REPO, "deploy", "Dockerfile")
LOCK = os.path.join(HERE, "debian.lock")
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
SUITE = "bookworm"
MIRRORS = [
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
]
#: What --update-lock starts from: Debian's essential set plus the interpreter and standard library.
SEED = ["python3.11-minimal", "libpython3.11-stdlib"]
DPKG_EXCLUDE = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*"]
PY = "python3.11"
APP = "/opt/whereabouts-py"
DEFAULT_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "whereabouts-py", "image"
)


def say(message: str) -> None:
    print(f"build.py: {message}", file=sys.stderr, flush=True)


def run(*argv: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload,no-any-return]


def version() -> str:
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        match = re.search(r'^version = "([^"]+)"$', f.read(), re.M)
    if not match:
        raise SystemExit("build.py: no version in pyproject.toml")
    return match.group(1)


def source_date_epoch() -> int:
    """$SOURCE_DATE_EPOCH, else the time of the last commit that changed an input of the image (so a
    commit touching only tests or docs outside it keeps the digest and the cached build)."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    inputs = sorted({source for source, _ in dockerfile_copies()} | {"deploy"})
    out = subprocess.run(
        ["git", "-C", REPO, "log", "-1", "--format=%ct", "--", *inputs], capture_output=True, text=True
    )
    return int(out.stdout.strip()) if out.returncode == 0 and out.stdout.strip() else 0


# -- what the Dockerfile copies ------------------------------------------------------------------------


def dockerfile_copies(path: str = DOCKERFILE) -> list[tuple[str, str]]:
    """(source in the repository, destination in the image) of each COPY line, WORKDIR applied."""
    workdir, out = "/", []
    with open(path) as f:
        for line in f:
            words = line.split()
            if words[:1] == ["WORKDIR"]:
                workdir = words[1]
            elif words[:1] == ["COPY"]:
                *sources, dest = words[1:]
                dest = os.path.join(workdir, dest)
                for source in sources:
                    name = os.path.basename(source.rstrip("/"))
                    out.append(
                        (
                            source.rstrip("/"),
                            dest if source.endswith("/") or not dest.endswith("/") else dest + name,
                        )
                    )
    return out


def ignored(rel: str) -> bool:
    """Dockerfile.dockerignore's **/ patterns (the only kind it has besides its allow-list)."""
    with open(DOCKERFILE + ".dockerignore") as f:
        patterns = [line.strip()[3:] for line in f if line.strip().startswith("**/")]
    return any(fnmatch.fnmatch(part, p) for part in rel.split("/") for p in patterns)


def repo_files(source: str) -> list[str]:
    """Files under `source` (a repository path) as a fresh clone has them: tracked by git."""
    out = run("git", "-C", REPO, "ls-files", "-z", "--", source, capture_output=True).stdout
    return sorted(rel for rel in out.split("\0") if rel and not ignored(rel))


def image_files() -> dict[str, str]:
    """{path in the image: repository path} for everything the Dockerfile's COPY lines bring in."""
    files = {}
    for source, dest in dockerfile_copies():
        for rel in repo_files(source):
            files[os.path.normpath(os.path.join(dest, os.path.relpath(rel, source)))] = rel
    return files


def cache_key(epoch: int) -> str:
    digest = hashlib.sha256(f"{epoch}\n{version()}\n".encode())
    inputs = sorted(
        set(image_files().values())
        | {os.path.relpath(p, REPO) for p in (DOCKERFILE, DOCKERFILE + ".dockerignore")}
    )
    for rel in inputs + [
        os.path.join("deploy/image", n) for n in sorted(os.listdir(HERE)) if not n.startswith((".", "__"))
    ]:
        with open(os.path.join(REPO, rel), "rb") as f:
            digest.update(f"{rel}\0".encode() + hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:20]


# -- the build -----------------------------------------------------------------------------------------


def locked() -> list[str]:
    with open(LOCK) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def debootstrap(root: str, cache: str, update_lock: bool) -> None:
    debs = os.path.join(cache, "debs")
    os.makedirs(debs, exist_ok=True)
    variant, include = ("essential", SEED) if update_lock else ("custom", locked())
    argv = [
        "mmdebstrap",
        "--mode=root",
        "--format=directory",
        f"--variant={variant}",
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--include=" + ",".join(include),
        *[f"--dpkgopt=path-exclude={p}" for p in DPKG_EXCLUDE],
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives && cp -p {debs}/*.deb "$1"/var/cache/apt/archives/ 2>/dev/null || true',
        f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
        "--quiet",
        SUITE,
        root,
        *MIRRORS,
    ]
    if shutil.which("mmdebstrap") is None:
        raise SystemExit("build.py: mmdebstrap is missing (apt-get install mmdebstrap)")
    run(*argv)
    installed = run(
        "chroot", root, "dpkg-query", "-W", "-f", "${Package}=${Version}\\n", capture_output=True
    ).stdout
    got = sorted(installed.split())
    if update_lock:
        with open(LOCK) as f:
            header = [line for line in f if line.startswith("#")]
        with open(LOCK, "w") as f:
            f.writelines(header + [p + "\n" for p in got])
        say(f"wrote {len(got)} packages to {LOCK}")
    elif got != sorted(locked()):
        extra, missing = sorted(set(got) - set(locked())), sorted(set(locked()) - set(got))
        raise SystemExit(f"build.py: the root has {extra} beyond debian.lock and lacks {missing}")


def relocate_python(root: str) -> None:
    """Debian's interpreter and standard library into /usr/local, where the Dockerfile's base has its own."""
    local = os.path.join(root, "usr/local")
    os.makedirs(os.path.join(local, "bin"), exist_ok=True)
    os.makedirs(os.path.join(local, "lib"), exist_ok=True)
    stub = os.path.join(local, "lib", PY)  # Debian's empty /usr/local/lib/python3.11/dist-packages
    if os.path.isdir(stub):
        if any(files for _, _, files in os.walk(stub)):
            raise SystemExit(f"build.py: {stub} is not empty")
        shutil.rmtree(stub)
    os.rename(os.path.join(root, "usr/lib", PY), os.path.join(local, "lib", PY))
    os.rename(os.path.join(root, "usr/bin", PY), os.path.join(local, "bin", PY))
    os.symlink(PY, os.path.join(local, "bin/python3"))
    os.symlink("python3", os.path.join(local, "bin/python"))
    for debian_only in ("lib/python3.11/sitecustomize.py",):  # a link to /etc/python3.11, Debian's hook
        os.unlink(os.path.join(local, debian_only))
    os.makedirs(os.path.join(local, "lib", PY, "site-packages"))


def stage_app(root: str, wheels: str, cache: str) -> None:
    app = os.path.join(root, APP.lstrip("/"))
    for dest, rel in image_files().items():
        target = os.path.join(root, dest.lstrip("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), target)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run(
        *pip,
        "wheel",
        "--no-deps",
        "-w",
        wheels,
        app,
        env={**os.environ, "PIP_CACHE_DIR": os.path.join(cache, "pip")},
    )
    shutil.rmtree(os.path.join(app, "build"), ignore_errors=True)
    for name in os.listdir(app):
        if name.endswith(".egg-info"):
            shutil.rmtree(os.path.join(app, name))
    run(
        *pip,
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--require-hashes",
        "-r",
        REQUIREMENTS,
        "-d",
        wheels,
        env={**os.environ, "PIP_CACHE_DIR": os.path.join(cache, "pip")},
    )


def clean(root: str) -> None:
    """What a container runtime provides or a build leaves behind with dates in it."""
    for rel in ("dev", "proc", "sys", "run", "tmp", "var/log", "var/cache", "var/lib/apt/lists", "var/tmp"):
        path = os.path.join(root, rel)
        for name in os.listdir(path) if os.path.isdir(path) else ():
            child = os.path.join(path, name)
            if os.path.isdir(child) and not os.path.islink(child):
                shutil.rmtree(child)
            else:
                os.unlink(child)
    for rel in ("var/lib/dpkg/status-old", "var/lib/dpkg/diversions-old", "etc/machine-id", "etc/hostname"):
        if os.path.lexists(os.path.join(root, rel)):
            os.unlink(os.path.join(root, rel))


def image_config() -> dict[str, object]:
    return {
        "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"],
        "Cmd": ["python3", f"{APP}/deploy/install.py", "--help"],
        "WorkingDir": APP,
        "Labels": {
            "org.opencontainers.image.version": version(),
            "org.opencontainers.image.title": "whereabouts-py",
        },
    }


def build(out_tar: str, epoch: int, cache: str, update_lock: bool = False) -> str:
    """One build into `out_tar`; its digest."""
    with tempfile.TemporaryDirectory(prefix="whereabouts-py-image.") as work:
        root, wheels = os.path.join(work, "root"), os.path.join(work, "wheels")
        os.environ["SOURCE_DATE_EPOCH"] = str(epoch)
        debootstrap(root, cache, update_lock)
        relocate_python(root)
        stage_app(root, wheels, cache)
        inside = os.path.join(root, "tmp/wheels")
        shutil.copytree(wheels, inside)
        run("chroot", root, "/usr/local/bin/python3", "-I", f"{APP}/deploy/image/finish.py", "/tmp/wheels")
        clean(root)
        digest = oci.pack(root, out_tar, epoch, f"whereabouts-py:{version()}", image_config())
    say(f"{out_tar}: {digest}, {os.path.getsize(out_tar) / 1e6:.1f} MB")
    return digest


def cached_build(out_dir: str, cache: str, use_cache: bool = True) -> tuple[str, str]:
    """(archive path, digest) in `out_dir`, built or taken from the cache entry of the inputs' key."""
    epoch = source_date_epoch()
    name = f"whereabouts-py-{version()}.oci"
    entry = os.path.join(cache, cache_key(epoch))
    tar, digest_file = os.path.join(entry, name + ".tar"), os.path.join(entry, name + ".digest")
    if not (use_cache and os.path.exists(digest_file)):
        os.makedirs(entry, exist_ok=True)
        with open(digest_file + ".tmp", "w") as f:
            f.write(build(tar, epoch, cache) + "\n")
        os.replace(digest_file + ".tmp", digest_file)
        for other in os.listdir(cache):  # one cached image: the newest inputs'
            if len(other) == 20 and other != os.path.basename(entry):
                shutil.rmtree(os.path.join(cache, other), ignore_errors=True)
    with open(digest_file) as f:
        digest = f.read().strip()
    os.makedirs(out_dir, exist_ok=True)
    if os.path.abspath(out_dir) != entry:
        shutil.copyfile(tar, os.path.join(out_dir, name + ".tar"))
        shutil.copyfile(digest_file, os.path.join(out_dir, name + ".digest"))
    return os.path.join(out_dir, name + ".tar"), digest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "dist"))
    parser.add_argument("--cache", default=DEFAULT_CACHE)
    parser.add_argument("--no-cache", action="store_true", help="build even when the cache has these inputs")
    parser.add_argument(
        "--check", action="store_true", help="build twice, uncached; fail unless the digests agree"
    )
    parser.add_argument(
        "--update-lock", action="store_true", help="rewrite debian.lock from Debian's newest versions"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("build.py: must run as root (mmdebstrap --mode=root, chroot)")
    os.makedirs(args.cache, exist_ok=True)
    if args.update_lock:
        with tempfile.TemporaryDirectory() as scratch:
            build(os.path.join(scratch, "x.tar"), source_date_epoch(), args.cache, update_lock=True)
        return 0
    if args.check:  # one build into a scratch file, the other into the cache (and --out)
        with tempfile.TemporaryDirectory() as scratch:
            first = build(os.path.join(scratch, "first.tar"), source_date_epoch(), args.cache)
        tar, digest = cached_build(args.out, args.cache, use_cache=False)
        if digest != first:
            raise SystemExit(f"build.py: not reproducible: {first} then {digest}")
        say(f"reproducible: both builds {digest}")
        print(f"{tar} {digest}")
        return 0
    tar, digest = cached_build(args.out, args.cache, use_cache=not args.no_cache)
    print(f"{tar} {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
