"""The CNI protocol: read env + stdin, dispatch the command, write the result or error JSON to stdout.

Only parses, dispatches and formats. Heavy modules (pydantic, netaddr, datastores) are imported on the
paths that need them, so VERSION and env errors answer from the standard library alone.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TextIO

from . import errors
from .errors import CNIError
from .log import log
from .versions import LATEST

if TYPE_CHECKING:
    from .allocator import Retention
    from .config import Config
    from .engine import Assigned, Engine, Slicer
    from .requested import Static
    from .store.base import Store

EngineSource = Callable[["Config"], AbstractContextManager["Engine"]]

COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_BAD = re.compile(r"[/:\s\x00-\x1f\x7f]")


def parse_cni_args(text: str) -> dict[str, str]:
    """`K=V;K2=V2` from CNI_ARGS; a pair without '=' is an invalid environment (code 4)."""
    out: dict[str, str] = {}
    for part in filter(None, text.split(";")):
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(errors.INVALID_ENV, f"invalid CNI_ARGS: {errors.shown(part)} is not KEY=VALUE")
        out[key] = value
    return out


def _require(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise CNIError(errors.INVALID_ENV, f"required environment variable {name} is missing")
    return value


def container_identity(env: Mapping[str, str], need_netns: bool) -> tuple[str, str]:
    container_id = _require(env, "CNI_CONTAINERID")
    if len(container_id) > 256 or not _CONTAINER_ID.fullmatch(container_id):  # the CRDs' bound on an id
        raise CNIError(errors.INVALID_ENV, f"invalid CNI_CONTAINERID {errors.shown(container_id)}")
    ifname = _require(env, "CNI_IFNAME")
    if len(ifname) > 15 or _IFNAME_BAD.search(ifname) or ifname in (".", ".."):
        raise CNIError(errors.INVALID_ENV, f"invalid CNI_IFNAME {errors.shown(ifname)}")
    if need_netns:
        _require(env, "CNI_NETNS")
    return container_id, ifname


def format_ips(
    version: str, assigned: list[Assigned], cfg: Config, static: Sequence[Static] = ()
) -> dict[str, Any]:
    """The IPAM result in the caller's cniVersion (`ips[].version` below 1.0.0); Whereabouts' static
    addresses after the ranges' own, as Whereabouts puts them."""
    from .versions import version_tuple

    old = version_tuple(version) < (1, 0, 0)
    ips: list[dict[str, Any]] = []
    for a in assigned:
        entry: dict[str, Any] = {"address": a.cidr()}
        if old:
            entry["version"] = str(a.spec.version)
        if a.spec.gateway is not None:
            entry["gateway"] = str(a.spec.gateway)
        ips.append(entry)
    ips += [s.result(old) for s in static]
    result: dict[str, Any] = {"cniVersion": version, "ips": ips}
    routes = [r.model_dump(exclude_none=True) for r in cfg.ipam.routes]
    if routes:
        result["routes"] = routes
    if cfg.ipam.dns is not None:
        result["dns"] = cfg.ipam.dns.model_dump(exclude_none=True, exclude_defaults=True)
    return result


def node_name(cfg: Config) -> str:
    """The node recorded on leases (GC releases only its own node's): flat-file `node_name`, the
    NODENAME environment variable, else the host name."""
    import socket

    return cfg.ipam.node_name or os.environ.get("NODENAME") or socket.gethostname()


def make_engine(cfg: Config, store: Store) -> Engine:
    from .engine import Engine, RetryPolicy

    ipam = cfg.ipam
    policy = RetryPolicy(
        deadline_seconds=ipam.retry_deadline_seconds,
        backoff_initial=ipam.retry_backoff_initial_ms / 1000,
        backoff_max=ipam.retry_backoff_max_ms / 1000,
    )
    engine = Engine(
        store,
        policy,
        network_name=ipam.network_name,
        overlapping=ipam.enable_overlapping_ranges,
        network=cfg.network,  # recorded on leases; GC releases only this network's
    )
    if ipam.node_slice_size:
        engine.slicer = make_slicer(cfg, store)
    return engine


def make_slicer(cfg: Config, store: Store) -> Slicer:
    """Node slices of the first range (as in Whereabouts, the only one `node_slice_size` cuts)."""
    from .nodeslices import Slicer
    from .slices import node_slice_pool_name, slice_prefix
    from .store.slicestore import SliceStore

    ipam = cfg.ipam
    size = str(ipam.node_slice_size)
    name = node_slice_pool_name(ipam.network_name, cfg.network)  # never empty: config.load_config checks
    if not isinstance(store, SliceStore):
        raise CNIError(
            errors.INVALID_CONFIG,
            f"invalid config: ipam.node_slice_size: {size!r} is not supported by this datastore",
        )
    spec = cfg.ranges[0]
    return Slicer(
        spec, size, slice_prefix(size, spec.network), name, node_name(cfg), ipam.network_name, store
    )


@contextmanager
def direct_engine(cfg: Config) -> Iterator[Engine]:
    """Direct mode: a fresh datastore connection for this one call."""
    from .store.open import open_store

    store = open_store(cfg)
    try:
        yield make_engine(cfg, store)
    finally:
        store.close()


def _require_version(cfg: Config, command: str, minimum: tuple[int, ...]) -> None:
    from .versions import version_tuple

    if version_tuple(cfg.cni_version) < minimum:
        wanted = ".".join(map(str, minimum))
        raise CNIError(
            errors.INCOMPATIBLE_VERSION,
            f"config version {cfg.cni_version} does not allow {command}",
            f"{command} needs cniVersion {wanted} or later",
        )


def cmd_add(cfg: Config, env: Mapping[str, str], engines: EngineSource) -> dict[str, Any]:
    from .allocator import LEASE_FIELD_LIMITS, Request
    from .requested import requested_wants, static_wants, statics

    container_id, ifname = container_identity(env, need_netns=True)
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    ns, pod = args.get("K8S_POD_NAMESPACE", ""), args.get("K8S_POD_NAME", "")
    podref, poduid = f"{ns}/{pod}" if ns and pod else "", args.get("K8S_POD_UID", "")
    # the lease's bounds, which only the plugin's reader checks (the API server keeps leases as written)
    for what, value, field in (
        ("K8S_POD_NAMESPACE/K8S_POD_NAME", podref, "podref"),
        ("K8S_POD_UID", poduid, "poduid"),
    ):
        if len(value) > LEASE_FIELD_LIMITS[field]:
            raise CNIError(
                errors.INVALID_ENV,
                f"invalid CNI_ARGS: {what} is {len(value)} characters long, more than {LEASE_FIELD_LIMITS[field]}",
            )
    request = Request(
        container_id=container_id,
        ifname=ifname,
        podref=podref,
        poduid=poduid,
        node=node_name(cfg),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    static = statics([a.model_dump() for a in cfg.ipam.addresses], args)
    wants = requested_wants(cfg.runtime_config, cfg.ranges) + static_wants(static, cfg.ranges)
    with engines(cfg) as engine:
        assigned = engine.add(cfg.ranges, request, wants)
    return format_ips(cfg.cni_version, assigned, cfg, static)


def retention(cfg: Config, now: float) -> Retention | None:
    """How a DEL keeps leases under `sticky` / `sticky_seconds`; None when sticky is off."""
    from .allocator import STATEFULSET, Retention

    ipam = cfg.ipam
    if not (ipam.sticky or ipam.sticky_seconds):
        return None
    stamp = "%Y-%m-%dT%H:%M:%SZ"
    until = time.strftime(stamp, time.gmtime(now + ipam.sticky_seconds)) if ipam.sticky_seconds else ""
    return Retention(time.strftime(stamp, time.gmtime(now)), STATEFULSET if ipam.sticky else "", until)


def cmd_del(cfg: Config, env: Mapping[str, str], engines: EngineSource) -> None:
    container_id, ifname = container_identity(env, need_netns=False)
    with engines(cfg) as engine:
        engine.release(cfg.ranges, container_id, ifname, retention(cfg, time.time()))


def cmd_check(cfg: Config, env: Mapping[str, str], engines: EngineSource) -> None:
    _require_version(cfg, "CHECK", (0, 4, 0))
    container_id, ifname = container_identity(env, need_netns=True)
    with engines(cfg) as engine:
        held = engine.leases_of(cfg.ranges, container_id, ifname)
    held_ranges = {a.spec for a in held}
    missing = [spec.describe() for spec in cfg.ranges if spec not in held_ranges]
    if missing:
        raise CNIError(
            errors.LEASE_NOT_FOUND,
            f"container {container_id} ({ifname}) holds no lease in {', '.join(missing)}",
        )
    prev = cfg.prev_result or {}
    raw_ips = prev.get("ips") or []
    if not isinstance(raw_ips, list):
        raise CNIError(
            errors.INVALID_CONFIG, f"invalid config: prevResult.ips: {errors.shown(raw_ips)} is not a list"
        )
    prev_ips = {str(ip.get("address", "")).split("/")[0] for ip in raw_ips if isinstance(ip, dict)}
    if prev_ips:
        absent = [str(a.address) for a in held if str(a.address) not in prev_ips]
        if absent:
            raise CNIError(
                errors.LEASE_NOT_FOUND,
                f"leased address {', '.join(absent)} is not in prevResult",
                f"prevResult ips: {sorted(prev_ips)}",
            )


def valid_attachments(raw: Any) -> set[tuple[str, str]]:
    if raw is None:  # absent is not "none valid": releasing every lease on the node would be the wrong guess
        raise CNIError(
            errors.INVALID_CONFIG,
            "invalid config: cni.dev/valid-attachments is missing; GC needs the list of valid attachments",
        )
    if not isinstance(raw, list):
        raise CNIError(errors.INVALID_CONFIG, "invalid config: cni.dev/valid-attachments must be a list")
    out = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CNIError(
                errors.INVALID_CONFIG,
                f"invalid config: cni.dev/valid-attachments[{i}]: {errors.shown(item)} has no string containerID",
            )
        out.add((item["containerID"], str(item.get("ifname", ""))))
    return out


def cmd_gc(cfg: Config, doc: Mapping[str, Any], engines: EngineSource) -> None:
    _require_version(cfg, "GC", (1, 1, 0))
    raw = doc.get("cni.dev/valid-attachments", doc.get("cni.dev/attachments"))
    valid = valid_attachments(raw)
    with engines(cfg) as engine:
        released = engine.gc(cfg.ranges, valid, node_name(cfg))
    log.info("gc.done", released=len(released), valid=len(valid))


def cmd_status(cfg: Config, engines: EngineSource) -> None:
    _require_version(cfg, "STATUS", (1, 1, 0))
    try:
        with engines(cfg) as engine:
            engine.store.check_reachable()
            full = [spec.describe() for spec, free in engine.free_counts(cfg.ranges) if free <= 0]
    except CNIError as exc:
        if exc.code == errors.PLUGIN_NOT_AVAILABLE:
            raise
        raise CNIError(errors.PLUGIN_NOT_AVAILABLE, "datastore not reachable", str(exc)) from None
    if full:
        raise CNIError(errors.PLUGIN_NOT_AVAILABLE, f"no free address in range {', '.join(full)}")


def _document(stdin: bytes) -> Any:
    """stdin's JSON value, or None when it does not decode (nested past the parser's depth included)."""
    try:
        return json.loads(stdin)
    except (ValueError, RecursionError):
        return None


def cmd_version(stdin: bytes) -> dict[str, Any]:
    from .versions import SUPPORTED_VERSIONS

    doc = _document(stdin) if stdin.strip() else None
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return {
        "cniVersion": version if isinstance(version, str) else LATEST,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def error_json(exc: CNIError, version: str) -> dict[str, Any]:
    out: dict[str, Any] = {"cniVersion": version, "code": exc.code, "msg": exc.msg}
    if exc.details:
        out["details"] = exc.details
    return out


def _reply_version(stdin: bytes) -> str:
    from .versions import SUPPORTED_VERSIONS

    doc = _document(stdin)
    version = doc.get("cniVersion") if isinstance(doc, dict) else None
    return version if version in SUPPORTED_VERSIONS else LATEST


def run(env: Mapping[str, str], stdin: bytes, out: TextIO, engines: EngineSource | None = None) -> int:
    """Execute one CNI call; returns the exit code. Never raises.

    `engines` supplies the engine per call: direct mode by default, the node agent's shared one there.
    """
    engines = engines or direct_engine
    command = env.get("CNI_COMMAND", "")
    try:
        if not command:
            raise CNIError(errors.INVALID_ENV, "required environment variable CNI_COMMAND is missing")
        if command not in COMMANDS:
            raise CNIError(
                errors.INVALID_ENV,
                f"invalid CNI_COMMAND {errors.shown(command)}",
                f"one of {', '.join(COMMANDS)}",
            )
        if command == "VERSION":
            out.write(json.dumps(cmd_version(stdin)) + "\n")
            return 0
        from .config import load_config, parse_netconf

        netconf = parse_netconf(stdin)
        cfg = load_config(stdin, netconf=netconf)
        log.begin_call(
            level=cfg.ipam.log_level,
            path=cfg.ipam.log_file,
            command=command,
            container=env.get("CNI_CONTAINERID", ""),
            ifname=env.get("CNI_IFNAME", ""),
            network=cfg.network,
        )
        if command == "ADD":
            result = cmd_add(cfg, env, engines)
            out.write(json.dumps(result) + "\n")
            # in the node agent the engine logs from a pool's worker thread, outside this call's
            # settings: this line is the call's own record in its log file
            log.info("cni.done", ips=[ip["address"] for ip in result["ips"]])
        elif command == "DEL":
            cmd_del(cfg, env, engines)
        elif command == "CHECK":
            cmd_check(cfg, env, engines)
        elif command == "GC":
            cmd_gc(cfg, json.loads(stdin), engines)
        elif command == "STATUS":
            cmd_status(cfg, engines)
        return 0
    except CNIError as exc:
        log.error("cni.error", command=command, code=exc.code, msg=exc.msg, details=exc.details)
        out.write(json.dumps(error_json(exc, _reply_version(stdin))) + "\n")
        return 1
    except Exception as exc:
        import traceback

        # the detail stays in our log: an exception's text can carry file content or credentials, and
        # the runtime copies our answer into pod events that tenants read
        log.error("cni.internal-error", command=command, error=repr(exc), trace=traceback.format_exc())
        wrapped = CNIError(
            errors.DATASTORE_ERROR, f"internal error during {command}", "see the plugin's log on the node"
        )
        out.write(json.dumps(error_json(wrapped, _reply_version(stdin))) + "\n")
        return 1
    finally:
        log.end_call()  # the node agent serves the next call on another thread, or this one


def main() -> int:
    """`python -m ipam.cni`: the call in this process (direct mode), never through the node agent (the
    executable that tries the agent first is ipam.plugin)."""
    try:
        stdin = sys.stdin.buffer.read() if not sys.stdin.isatty() else b""
    except OSError as exc:
        error = CNIError(errors.IO_FAILURE, "failed to read network config from stdin", str(exc))
        sys.stdout.write(json.dumps(error_json(error, LATEST)) + "\n")
        return 1
    return run(os.environ, stdin, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
