"""The IPAM configuration: pydantic models of the NAD's `ipam` block, the flat-file merge, validation.

Every problem becomes a CNIError with code 7 whose message names the key and the value.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from . import errors
from .errors import CNIError
from .flatfile import DEFAULT_FLAT_FILES, NodeFileError, flat_file_candidates, read_node_file
from .flatfile import find_flat_file as _find_existing
from .ranges import RangeConfigError, RangeSpec, build_range, parse_cidr, parse_ip
from .versions import SUPPORTED_VERSIONS

__all__ = ["DEFAULT_FLAT_FILES", "NODE_ONLY_KEYS", "Config", "IPAMConfig", "load_config"]

DEFAULT_DATA_DIR = "/var/lib/cni/whereabouts-py"
DEFAULT_AGENT_SOCKET = "/run/whereabouts-py/agent.sock"
_OBJECT_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")  # RFC 1123 subdomain characters
# network_name prefixes pool and reservation names: with the longest IPv6 suffix (44 characters) they
# stay inside Kubernetes' 253 and the file datastore's 255 (with its temp-file affixes).
MAX_NETWORK_NAME = 128
# Host paths and identities: only the node's flat file, the runtime's environment or the defaults set
# them. The network config (written by tenants) may repeat the node's value, nothing else, unless the
# flat file says `"allow_nad_overrides": true` (single-tenant clusters, tests).
NODE_ONLY_KEYS = (
    "kubernetes",
    "log_file",
    "data_dir",
    "datastore",
    "configuration_path",
    "agent_socket",
    "node_name",
    "allow_nad_overrides",
)
# Sizes a tenant's config may not pass (code 7 naming the key and the limit): far above real configs,
# low enough that one config's ranges cost the agent a bounded time and memory (ranges.CACHE_BYTES).
LIMITS = {"exclude": 4096, "ipRanges": 64, "routes": 1024, "addresses": 64}
MAX_EXCLUDES = 8192  # all exclude lists of one config together
_PATH_KEYS = ("log_file", "data_dir", "configuration_path", "agent_socket", "kubeconfig")
LOG_LEVELS = ("debug", "verbose", "info", "warning", "error", "panic")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class RangeEntry(_Model):
    range: str
    range_start: str | None = None
    range_end: str | None = None
    exclude: list[str] = Field(default_factory=list)


class Route(_Model):
    dst: str
    gw: str | None = None


class StaticAddress(_Model):
    """Whereabouts' `addresses` entry: added to the result, and recorded when inside a range."""

    address: str
    gateway: str | None = None


class DNS(_Model):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


def _host_path(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL character")
    if not os.path.isabs(value):
        raise ValueError("must be an absolute path")
    if len(value) > 4096:
        raise ValueError("is longer than 4096 characters")
    return value


def _empty_is_none(value: Any) -> Any:
    return None if value == "" else value


HostPath = Annotated[str, AfterValidator(_host_path)]
OptionalHostPath = Annotated[HostPath | None, BeforeValidator(_empty_is_none)]  # "" means unset


class KubernetesSettings(_Model):
    kubeconfig: OptionalHostPath = None


class IPAMConfig(_Model):
    """The `ipam` block; Whereabouts' keys plus ours (datastore, data_dir, retry knobs)."""

    type: str = "whereabouts-py"
    range: str | None = None
    range_start: str | None = None
    range_end: str | None = None
    exclude: list[str] = Field(default_factory=list)
    ip_ranges: list[RangeEntry] = Field(default_factory=list, alias="ipRanges")
    gateway: str | None = None
    routes: list[Route] = Field(default_factory=list)
    dns: DNS | None = None
    network_name: str = ""
    enable_overlapping_ranges: bool = True
    node_slice_size: str | None = None
    addresses: list[StaticAddress] = Field(default_factory=list)
    # sticky addresses (docs/requested-and-sticky-addresses.md): a DEL keeps the lease for its pod name
    sticky: Literal["statefulset"] | None = None
    # strict: `true` (meaning "on") would otherwise be read as 1 second, and "60" as 60
    sticky_seconds: Annotated[int, Field(strict=True, ge=1, le=366 * 86400)] | None = None
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    configuration_path: str | None = None
    log_file: OptionalHostPath = None
    log_level: Literal["debug", "verbose", "info", "warning", "error", "panic"] = "info"
    datastore: Literal["kubernetes", "file"] = "kubernetes"
    data_dir: HostPath = DEFAULT_DATA_DIR
    node_name: str = Field(default="", max_length=253)
    agent_socket: OptionalHostPath = None
    allow_nad_overrides: bool = False
    retry_deadline_seconds: float = Field(default=90.0, gt=0, le=200)
    retry_backoff_initial_ms: float = Field(default=5.0, gt=0)
    retry_backoff_max_ms: float = Field(default=250.0, gt=0)


class NetConf(_Model):
    cni_version: str = Field(default="0.3.1", alias="cniVersion")
    name: str = Field(default="", max_length=1024)  # recorded on every lease (the CRD bounds `attrs`)
    type: str = ""
    ipam: dict[str, Any] | None = None
    prev_result: dict[str, Any] | None = Field(default=None, alias="prevResult")
    runtime_config: dict[str, Any] = Field(default_factory=dict, alias="runtimeConfig")
    args: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Everything one CNI call needs, validated."""

    cni_version: str
    network: str
    ipam: IPAMConfig
    ranges: tuple[RangeSpec, ...]
    prev_result: dict[str, Any] | None
    runtime_config: dict[str, Any]
    flat_file: str | None


def invalid(key: str, value: object, reason: str) -> CNIError:
    return CNIError(errors.INVALID_CONFIG, f"invalid config: {key}: {errors.shown(value)} {reason}")


def _too_many(key: str, count: int, limit: int, what: str = "") -> CNIError:
    return CNIError(
        errors.INVALID_CONFIG,
        f"invalid config: {key}: {count} entries{what}, more than the limit of {limit} (docs/security.md)",
    )


def check_limits(raw: Mapping[str, Any]) -> None:
    """Refuse lists past LIMITS before any of their entries is parsed."""
    lists: list[tuple[str, Any]] = [("ipam.exclude", raw.get("exclude"))]
    addresses = raw.get("addresses")  # each one inside a range is its own pool write
    if isinstance(addresses, list) and len(addresses) > LIMITS["addresses"]:
        raise _too_many("ipam.addresses", len(addresses), LIMITS["addresses"])
    for alias in ("ipRanges", "ip_ranges", "routes"):
        value = raw.get(alias)
        limit = LIMITS["routes" if alias == "routes" else "ipRanges"]
        if isinstance(value, list) and len(value) > limit:
            raise _too_many(f"ipam.{alias}", len(value), limit)
        if alias != "routes" and isinstance(value, list):
            entries = enumerate(value)
            lists += [
                (f"ipam.{alias}[{i}].exclude", e.get("exclude")) for i, e in entries if isinstance(e, dict)
            ]
    total = 0
    for key, value in lists:
        if not isinstance(value, list):
            continue
        if len(value) > LIMITS["exclude"]:
            raise _too_many(key, len(value), LIMITS["exclude"])
        total += len(value)
        if total > MAX_EXCLUDES:
            raise _too_many(key, total, MAX_EXCLUDES, " in all exclude lists up to this one")


def _pydantic_error(prefix: str, exc: ValidationError, data: Mapping[str, Any]) -> CNIError:
    first = exc.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = prefix + "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc)
    value: Any = data
    for part in first["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = None
            break
    return invalid(key.lstrip("."), value, f"is invalid: {first['msg']}")


def check_object_name(key: str, value: str, limit: int, why: str) -> None:
    """A value that names a Kubernetes object or a file of the file datastore: an RFC 1123 subdomain."""
    if len(value) > limit:
        raise invalid(key, value, f"is longer than {limit} characters ({why})")
    if not _OBJECT_NAME.fullmatch(value):
        rule = "must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit"
        raise invalid(key, value, f"{rule} ({why})")


MAX_SLICE_TEXT = 45  # the longest slice range as a pool name writes it (IPv6, nothing to compress)


def check_slice_names(node: str, slices_name: str, network_name: str) -> None:
    """The names joining the node's to the network's fit a file name (safepath.MAX_FILE_NAME, tighter
    than Kubernetes' 253): the slice pools `<network_name>-<node>-<slice>` and the NodeSlicePool's
    lock `nodeslicepool-<name>-<node>`. Each name alone may pass and the two together not."""
    from .safepath import MAX_FILE_NAME

    longest = max(len(f"nodeslicepool-{slices_name}-{node}"), len(f"{network_name}-{node}-") + MAX_SLICE_TEXT)
    if longest > MAX_FILE_NAME:
        key = "ipam.network_name" if network_name else "name"
        raise invalid(
            "ipam.node_name",
            node,
            f"and {key} {errors.shown(slices_name)} together make slice pool names of up to {longest} "
            f"characters, more than {MAX_FILE_NAME}: use a shorter {key}",
        )


def version_supported(version: str) -> bool:
    return version in SUPPORTED_VERSIONS


def parse_netconf(stdin: bytes) -> NetConf:
    """Decode stdin; undecodable JSON is code 6, a non-object or wrong top-level type code 7."""
    try:
        data = json.loads(stdin or b"{}")
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise CNIError(
            errors.DECODE_FAILURE, "failed to decode network config from stdin", str(exc)
        ) from None
    if not isinstance(data, dict):
        raise invalid("(network config)", type(data).__name__, "is not a JSON object")
    try:
        return NetConf.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error("", exc, data) from None


def find_flat_file(search: Sequence[str]) -> str | None:
    """The first existing flat file among the node's locations (never one the network config names)."""
    return _find_existing(search)


def read_flat_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(read_node_file(path))
    except NodeFileError as exc:
        raise CNIError(
            errors.INVALID_CONFIG, f"invalid config: flat configuration file {exc.path} {exc.reason}"
        ) from None
    except ValueError as exc:
        raise invalid("configuration_path", path, f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("configuration_path", path, "does not hold a JSON object")
    if not isinstance(data.get("allow_nad_overrides", False), bool):
        raise invalid("allow_nad_overrides", data["allow_nad_overrides"], f"in {path} must be true or false")
    return data


def _node_defaults(
    flat: Mapping[str, Any], flat_path: str | None, environ: Mapping[str, str]
) -> dict[str, Any]:
    """The node's value of every node-only key: flat file, else trusted environment, else default."""
    return {
        "log_file": flat.get("log_file"),
        "data_dir": flat.get("data_dir", DEFAULT_DATA_DIR),
        "datastore": flat.get("datastore", "kubernetes"),
        "configuration_path": flat_path,
        "agent_socket": environ.get("WHEREABOUTS_PY_AGENT_SOCKET")
        or flat.get("agent_socket")
        or DEFAULT_AGENT_SOCKET,
        "node_name": flat.get("node_name") or environ.get("NODENAME") or socket.gethostname(),
        "allow_nad_overrides": flat.get("allow_nad_overrides", False),
    }


def _same(key: str, nad_value: Any, node_value: Any) -> bool:
    if nad_value is None or nad_value == "":
        return True  # "not set" in the network config: the node's value applies
    if key in _PATH_KEYS and isinstance(nad_value, str) and isinstance(node_value, str):
        return "\0" not in nad_value and os.path.normpath(nad_value) == os.path.normpath(node_value)
    return bool(type(nad_value) is type(node_value) and nad_value == node_value)


def node_only_error(key: str, value: Any) -> CNIError:
    # the node's own value is not echoed: the caller is a tenant, the node's paths are not theirs
    return invalid(
        key,
        value,
        "is a node setting: set it in the node's flat file (whereabouts.conf), not in the network "
        "config; the network config may only repeat the node's value",
    )


def check_node_only(
    nad: Mapping[str, Any], flat: Mapping[str, Any], flat_path: str | None, environ: Mapping[str, str]
) -> dict[str, Any]:
    """Refuse a network config that sets a node-only key to anything but the node's value; return the
    network config without those keys (the node's values are then the ones used)."""
    node = _node_defaults(flat, flat_path, environ)
    for key in NODE_ONLY_KEYS:
        if key not in nad:
            continue
        value = nad[key]
        if key == "kubernetes":
            if not isinstance(value, Mapping):
                raise invalid("ipam.kubernetes", value, "must be an object")
            node_kube = flat.get("kubernetes")
            node_kube = node_kube if isinstance(node_kube, Mapping) else {}
            for sub, sub_value in value.items():
                if not _same(str(sub), sub_value, node_kube.get(sub)):
                    raise node_only_error(f"ipam.kubernetes.{sub}", sub_value)
        elif not _same(key, value, node[key]):
            raise node_only_error(f"ipam.{key}", value)
    return {k: v for k, v in nad.items() if k not in NODE_ONLY_KEYS}


def merge_flat(nad: Mapping[str, Any], flat: Mapping[str, Any]) -> dict[str, Any]:
    """Keys set in the NAD win; nested objects (e.g. `kubernetes`) merge key by key."""
    merged: dict[str, Any] = dict(flat)
    for key, value in nad.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge_flat(value, merged[key])
        else:
            merged[key] = value
    return merged


def build_ranges(ipam: IPAMConfig) -> tuple[RangeSpec, ...]:
    gateway = parse_ip("ipam.gateway", ipam.gateway) if ipam.gateway else None
    entries: list[tuple[str, RangeEntry]] = []
    if ipam.range:
        top = RangeEntry(
            range=ipam.range, range_start=ipam.range_start, range_end=ipam.range_end, exclude=ipam.exclude
        )
        entries.append(("ipam", top))
    elif ipam.range_start or ipam.range_end:
        key = "ipam.range_start" if ipam.range_start else "ipam.range_end"
        raise RangeConfigError(key, ipam.range_start or ipam.range_end, "is set but ipam.range is missing")
    entries += [(f"ipam.ipRanges[{i}]", entry) for i, entry in enumerate(ipam.ip_ranges)]
    if not entries:
        raise RangeConfigError("ipam.range", None, "is missing (set range or ipRanges)")
    specs = tuple(
        build_range(key, e.range, e.range_start, e.range_end, e.exclude, gateway) for key, e in entries
    )
    for i, spec in enumerate(specs):
        for j in range(i):
            if specs[j].network == spec.network:  # one pool, and a pool holds one lease per attachment
                raise RangeConfigError(
                    entries[i][0] + ".range",
                    entries[i][1].range,
                    f"uses network {spec.cidr} of {entries[j][0]}.range again (one address per network)",
                )
    for i, route in enumerate(ipam.routes):
        parse_cidr(f"ipam.routes[{i}].dst", route.dst)
        if route.gw:
            parse_ip(f"ipam.routes[{i}].gw", route.gw)
    return specs


def load_config(
    stdin: bytes,
    flat_search: Sequence[str] | None = None,
    netconf: NetConf | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate one call's config. `environ` is the trusted environment (the runtime's, or the
    agent's own): it may name the flat file (`WHEREABOUTS_PY_FLAT_FILE`) and node identity; the network
    config on stdin never chooses the flat file or a node-only key."""
    env = os.environ if environ is None else environ
    search = flat_file_candidates(env) if flat_search is None else flat_search
    conf = netconf or parse_netconf(stdin)
    flat_path = find_flat_file(search)
    flat = read_flat_file(flat_path) if flat_path else {}
    return build_config(conf, flat, flat_path, env)


def build_config(
    conf: NetConf, flat: Mapping[str, Any], flat_path: str | None, env: Mapping[str, str]
) -> Config:
    """The pure half of load_config: the network config checked against the node's flat file (read
    already) and trusted environment. The admission webhook (ipam.webhook) calls it with the cluster's
    node settings, so a NAD is refused with the very message its ADD would get."""
    if not version_supported(conf.cni_version):
        raise CNIError(
            errors.INCOMPATIBLE_VERSION,
            f"incompatible CNI version {errors.shown(conf.cni_version)}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if conf.ipam is None:
        raise invalid("ipam", None, "is missing from the network config")
    nad = dict(conf.ipam)
    if not isinstance(nad.get("configuration_path", ""), str | None):
        raise invalid("ipam.configuration_path", nad["configuration_path"], "must be a string")
    if flat.get("allow_nad_overrides") is True:
        # single-tenant opt-in: network-config values win again, except that the flat file is never
        # located through the network config (the opt-in lives in that file)
        nad.pop("configuration_path", None)
        nad.pop("allow_nad_overrides", None)
    else:
        nad = check_node_only(nad, flat, flat_path, env)
    raw = merge_flat(nad, flat)
    raw["configuration_path"] = flat_path
    check_limits(raw)
    try:
        ipam = IPAMConfig.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error("ipam", exc, raw) from None
    if ipam.network_name:
        why = "it prefixes pool and reservation names"
        check_object_name("ipam.network_name", ipam.network_name, MAX_NETWORK_NAME, why)
    if ipam.node_slice_size:
        # the NodeSlicePool (and its file and lock file) is named after the network's name, slice
        # pools and their lock files after the node
        if not ipam.network_name and conf.name:
            why = "it names the NodeSlicePool (or set ipam.network_name)"
            check_object_name("name", conf.name, MAX_NETWORK_NAME, why)
        node = ipam.node_name or env.get("NODENAME") or socket.gethostname()
        check_object_name("ipam.node_name", node, 253, "it names the node's slice pools")
        check_slice_names(node, ipam.network_name or conf.name, ipam.network_name)
    try:
        ranges = build_ranges(ipam)
        for i, static in enumerate(ipam.addresses):  # Whereabouts' static addresses: CIDRs
            key = f"ipam.addresses[{i}]"
            if "/" not in static.address:
                raise RangeConfigError(f"{key}.address", static.address, "is not a CIDR (address/prefix)")
            parse_cidr(f"{key}.address", static.address)
            if static.gateway:
                parse_ip(f"{key}.gateway", static.gateway)
        if ipam.node_slice_size and (ipam.sticky or ipam.sticky_seconds):
            raise RangeConfigError(
                "ipam.sticky" if ipam.sticky else "ipam.sticky_seconds",
                ipam.sticky or ipam.sticky_seconds,
                "cannot be used with ipam.node_slice_size (a pod re-created on another node allocates "
                "in that node's slices)",
            )
        if ipam.node_slice_size:
            from .slices import slice_prefix

            slice_prefix(ipam.node_slice_size, ranges[0].network)
            if not (ipam.network_name or conf.name):
                raise RangeConfigError(
                    "ipam.node_slice_size",
                    ipam.node_slice_size,
                    "needs ipam.network_name or the network's name (the NodeSlicePool is named after it)",
                )
    except RangeConfigError as exc:
        raise invalid(exc.key, exc.value, exc.reason) from None
    return Config(
        cni_version=conf.cni_version,
        network=conf.name,
        ipam=ipam,
        ranges=ranges,
        prev_result=conf.prev_result,
        runtime_config=conf.runtime_config,
        flat_file=flat_path,
    )
