#!/usr/bin/env python3
"""The last build step of both image recipes (make image and deploy/Dockerfile), run inside the image.

    python3 /opt/whereabouts-py/deploy/image/finish.py WHEEL_DIR

/usr/local is then the runtime bundle deploy/install.py copies to every node: an interpreter, its
standard library, site-packages and the shared libraries they need. One script in both recipes, so
the two images have the same layout (tests/test_image.py compares them):

1. installs every wheel in WHEEL_DIR (ipam's, and its pinned dependencies from requirements.txt) into
   /usr/local with PyPA's `installer`, imported from its wheel (it is not installed);
2. removes what no program of the image imports (LAYOUT["prune"]): pip and setuptools, the test suite,
   IDLE, tkinter, 2to3, headers, the static library; the bundle size before and after is printed;
3. copies the shared libraries the interpreter and extension modules need (OpenSSL, libffi, zlib, ...;
   never glibc) into /usr/local/lib, which the CNI wrapper puts on LD_LIBRARY_PATH;
4. compiles all bytecode, hash-based and unchecked: the plugin runs with -B from a read-only copy, and
   the build is reproducible (no mtimes in the .pyc files);
5. records the glibc it was built against and the dynamic loader the bundle's binaries name, in
   share/whereabouts-py/glibc.json: the installer refuses a node whose glibc is older;
6. checks the layout (LAYOUT["require"]) and that every console script's module imports.
"""

from __future__ import annotations

import compileall
import glob
import json
import os
import py_compile
import shutil
import struct
import subprocess
import sys

PREFIX = "/usr/local"
PY = "lib/python{}.{}".format(*sys.version_info[:2])
#: ipam-controller's own dependencies (leader election: kubernetes; the webhook's certificates:
#: cryptography; and what they import), installed into CONTROLLER_SITE below PREFIX, which
#: deploy/install.py leaves out of the node bundle (deploy/nodebundle.py NOT_FOR_NODES): the nodes
#: never import them, and they would double the bundle. Wheel names as in the wheels' file names.
CONTROLLER_SITE = "lib/whereabouts-py-controller"
CONTROLLER_ONLY = (
    "certifi",
    "cffi",
    "charset_normalizer",
    "cryptography",
    "durationpy",
    "idna",
    "kubernetes",
    "oauthlib",
    "python_dateutil",
    "requests",
    "requests_oauthlib",
    "urllib3",
    "websocket_client",
)
#: Paths below PREFIX (glob patterns): what must exist, and what is removed (tests/test_image.py reads both).
LAYOUT = {
    "require": [
        "bin/python3",
        "bin/whereabouts-py",
        "bin/ipam-agent",
        "bin/ipam-reconcile",
        "bin/ipamctl",
        f"{PY}/os.py",
        f"{PY}/lib-dynload/_ssl.*.so",
        f"{PY}/sitecustomize.py",
        f"{PY}/site-packages/ipam/shim.py",
        f"{PY}/site-packages/pydantic_core/_pydantic_core.*.so",
        "share/whereabouts-py/glibc.json",
        "bin/ipam-controller",
        f"{CONTROLLER_SITE}/kubernetes/leaderelection/leaderelection.py",
        f"{CONTROLLER_SITE}/cryptography/hazmat/bindings/_rust.abi3.so",
    ],
    "prune": [
        "bin/pip*",
        "bin/idle*",
        "bin/pydoc*",
        "bin/2to3*",
        "bin/python*-config",
        "bin/wheel",
        "include",
        "share/man",
        "lib/pkgconfig",
        "lib/*.a",
        f"{PY}/config-*",
        f"{PY}/site-packages/pip",
        f"{PY}/site-packages/pip-*",
        f"{PY}/site-packages/setuptools*",
        f"{PY}/site-packages/wheel",
        f"{PY}/site-packages/wheel-*",
        f"{PY}/site-packages/_distutils_hack",
        f"{PY}/site-packages/pkg_resources",
        f"{PY}/site-packages/*/tests",
        # the IEEE OUI/IAB registries: read only by netaddr's EUI(...).oui/.iab lookups, never by ipam
        f"{PY}/site-packages/netaddr/eui/*.txt",
        f"{PY}/site-packages/netaddr/eui/*.idx",
        f"{PY}/site-packages/distutils-precedence.pth",
        # kubernetes' asyncio client (half the package): it needs aiohttp, which is not installed
        f"{CONTROLLER_SITE}/kubernetes/aio",
        f"{PY}/test",
        f"{PY}/idlelib",
        f"{PY}/tkinter",
        f"{PY}/turtledemo",
        f"{PY}/turtle.py",
        f"{PY}/lib2to3",
        f"{PY}/ensurepip",
        f"{PY}/distutils",
        f"{PY}/pydoc_data",
        f"{PY}/venv",
        f"{PY}/sqlite3",
        f"{PY}/dbm",
        f"{PY}/curses",
        f"{PY}/lib-dynload/_test*",
        f"{PY}/lib-dynload/_ctypes_test*",
        f"{PY}/lib-dynload/xxlimited*",
        f"{PY}/lib-dynload/_xxtestfuzz*",
        f"{PY}/lib-dynload/_tkinter*",
        f"{PY}/lib-dynload/_curses*",
        f"{PY}/lib-dynload/_dbm*",
        f"{PY}/lib-dynload/_gdbm*",
        f"{PY}/lib-dynload/_sqlite3*",
        f"{PY}/lib-dynload/readline*",
        f"{PY}/lib-dynload/nis*",
        f"{PY}/lib-dynload/ossaudiodev*",
    ],
}
GLIBC_RECORD = "share/whereabouts-py/glibc.json"
# Debian's site module adds dist-packages, never PREFIX/lib/python3.X/site-packages; python.org's adds
# it already (addsitedir skips a directory that is on sys.path). The CNI shim, started with -S, appends
# it itself.
SITECUSTOMIZE = '''"""whereabouts-py image: site-packages beside the standard library is on sys.path (Debian's site
module adds only dist-packages); deploy/image/finish.py writes this file."""
import os
import site
import sys

site.addsitedir(os.path.join(sys.prefix, "lib", "python%d.%d" % sys.version_info[:2], "site-packages"))
# ipam-controller's own dependencies, in the image only (not copied to nodes)
if os.path.isdir(os.path.join(sys.prefix, "lib", "whereabouts-py-controller")):
    site.addsitedir(os.path.join(sys.prefix, "lib", "whereabouts-py-controller"))
'''
#: glibc's own libraries: the node provides them (the floor in GLIBC_RECORD), never the bundle.
GLIBC_LIBS = (
    "ld-linux",
    "libc.",
    "libm.",
    "libdl.",
    "libpthread.",
    "librt.",
    "libutil.",
    "libresolv.",
    "libanl.",
    "libmvec.",
)


def at(rel: str) -> str:
    return os.path.join(PREFIX, rel)


def size(path: str) -> int:
    """Bytes in the files under `path`, bytecode left out."""
    total = 0
    for directory, dirs, files in os.walk(path):
        if "__pycache__" in dirs:
            dirs.remove("__pycache__")
        for name in files:
            total += os.lstat(os.path.join(directory, name)).st_size
    return total


def install_wheels(wheel_dir: str) -> None:
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    (tool,) = [w for w in wheels if os.path.basename(w).startswith("installer-")]
    sys.path.insert(0, tool)
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    def destination(site_packages: str, scripts: str) -> SchemeDictionaryDestination:
        scheme = {
            "purelib": site_packages,
            "platlib": site_packages,
            "scripts": scripts,
            "data": PREFIX,
            "headers": at("include/whereabouts-py"),
        }
        return SchemeDictionaryDestination(
            scheme, interpreter=at("bin/python3"), script_kind="posix", bytecode_optimization_levels=()
        )

    shared = destination(at(f"{PY}/site-packages"), at("bin"))
    controller = destination(at(CONTROLLER_SITE), at(CONTROLLER_SITE + "/bin"))
    for wheel in wheels:
        if wheel != tool:
            name = os.path.basename(wheel).split("-", 1)[0].lower()
            with WheelFile.open(wheel) as source:
                install(
                    source,
                    controller if name in CONTROLLER_ONLY else shared,
                    {"INSTALLER": b"whereabouts-py deploy/image/finish.py\n"},
                )
    with open(at(f"{PY}/sitecustomize.py"), "w") as f:
        f.write(SITECUSTOMIZE)


def prune() -> None:
    for pattern in LAYOUT["prune"]:
        for path in glob.glob(at(pattern)):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    for directory, dirs, _ in os.walk(PREFIX):  # every old bytecode file: step 4 writes them anew
        if "__pycache__" in dirs:
            dirs.remove("__pycache__")
            shutil.rmtree(os.path.join(directory, "__pycache__"))


def elf_files() -> list[str]:
    found = []
    for directory, _, files in os.walk(PREFIX):
        for name in sorted(files):
            path = os.path.join(directory, name)
            if not os.path.islink(path) and (".so" in name or directory == at("bin")):
                with open(path, "rb") as f:
                    if f.read(4) == b"\x7fELF":
                        found.append(path)
    return found


def copy_libraries() -> None:
    out = subprocess.run(["ldd", *elf_files()], capture_output=True, text=True, check=False).stdout
    needed = sorted({line.split()[2] for line in out.splitlines() if " => /" in line})
    for lib in needed:
        name = os.path.basename(lib)
        if not lib.startswith(PREFIX + "/") and not name.startswith(GLIBC_LIBS):
            target = at("lib/" + name)
            if not os.path.exists(target):
                shutil.copy2(os.path.realpath(lib), target)


def interpreter(path: str) -> str:
    """The ELF program interpreter (PT_INTERP) of a 64-bit little-endian executable."""
    with open(path, "rb") as f:
        data = f.read()
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        kind, _, offset, _, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if kind == 3:  # PT_INTERP
            return data[offset : offset + filesz].rstrip(b"\0").decode()
    raise SystemExit(f"finish.py: {path} names no program interpreter")


def record_glibc() -> None:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    if not libc.startswith("glibc "):
        raise SystemExit(f"finish.py: not a glibc system ({libc!r})")
    record = {"glibc": libc.split()[1], "loader": interpreter(os.path.realpath(at("bin/python3")))}
    os.makedirs(os.path.dirname(at(GLIBC_RECORD)), exist_ok=True)
    with open(at(GLIBC_RECORD), "w") as f:
        json.dump(record, f, sort_keys=True)
        f.write("\n")


def check() -> None:
    missing = [rel for rel in LAYOUT["require"] if not glob.glob(at(rel))]
    left = [rel for pattern in LAYOUT["prune"] for rel in glob.glob(at(pattern))]
    if missing or left:
        raise SystemExit(f"finish.py: layout: missing {missing}, not pruned {left}")
    # every console script's module (a dependency missing from requirements.txt fails here), and the
    # datastore and YAML parser they load on demand
    (entry_points,) = glob.glob(at(f"{PY}/site-packages/whereabouts_py-*.dist-info/entry_points.txt"))
    with open(entry_points) as f:
        modules = sorted({line.split("=", 1)[1].split(":")[0].strip() for line in f if "=" in line})
    code = "import " + ", ".join([*modules, "ipam.shim", "ipam.cni", "ipam.store.kubernetes", "yaml"])
    # and what ipam-controller loads on demand: leader election, the webhook and its certificates
    code += (
        "; import ipam.webhook, ipam.webhook_certs, kubernetes.client, kubernetes.config"
        "; from kubernetes.leaderelection import leaderelection, electionconfig"
        "; from kubernetes.leaderelection.resourcelock import leaselock"
    )
    subprocess.run([at("bin/python3"), "-I", "-B", "-c", code], check=True)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    install_wheels(argv[0])
    installed = size(PREFIX)
    prune()
    pruned = size(PREFIX)
    copy_libraries()
    libraries = size(PREFIX) - pruned
    for tree in (at(PY), at(CONTROLLER_SITE)):
        if not compileall.compile_dir(
            tree,
            quiet=1,
            force=True,
            workers=1,
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        ):
            raise SystemExit("finish.py: some modules do not compile")
    record_glibc()
    check()
    total = sum(os.lstat(os.path.join(d, n)).st_size for d, _, files in os.walk(PREFIX) for n in files)
    controller_only = sum(
        os.lstat(os.path.join(d, n)).st_size for d, _, files in os.walk(at(CONTROLLER_SITE)) for n in files
    )
    print(
        f"finish.py: {PREFIX}: {installed / 1e6:.1f} MB installed, {pruned / 1e6:.1f} MB pruned, "
        f"+{libraries / 1e6:.1f} MB shared libraries, {total / 1e6:.1f} MB with bytecode, of which "
        f"{controller_only / 1e6:.1f} MB in {CONTROLLER_SITE} (not copied to nodes)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
