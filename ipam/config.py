"""The IPAM configuration: pydantic models of the NAD's `ipam` block, the flat-file merge, validation.

Every problem becomes a CNIError with code 7 whose message names the key and the value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from . import errors
from .errors import CNIError
from .ranges import RangeConfigError, RangeSpec, build_range, parse_cidr, parse_ip
from .versions import SUPPORTED_VERSIONS

DEFAULT_FLAT_FILES = (
    "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf",
    "/etc/cni/net.d/whereabouts.d/whereabouts.conf",
)
DEFAULT_DATA_DIR = "/var/lib/cni/whereabouts-py"
_OBJECT_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")  # RFC 1123 subdomain characters
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


class DNS(_Model):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class KubernetesSettings(_Model):
    kubeconfig: str | None = None


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
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    configuration_path: str | None = None
    log_file: str | None = None
    log_level: Literal["debug", "verbose", "info", "warning", "error", "panic"] = "info"
    datastore: Literal["kubernetes", "file"] = "kubernetes"
    data_dir: str = DEFAULT_DATA_DIR
    node_name: str = ""
    retry_deadline_seconds: float = Field(default=90.0, gt=0, le=200)
    retry_backoff_initial_ms: float = Field(default=5.0, gt=0)
    retry_backoff_max_ms: float = Field(default=250.0, gt=0)


class NetConf(_Model):
    cni_version: str = Field(default="0.3.1", alias="cniVersion")
    name: str = ""
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
    return CNIError(errors.INVALID_CONFIG, f"invalid config: {key}: {value!r} {reason}")


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


def version_supported(version: str) -> bool:
    return version in SUPPORTED_VERSIONS


def parse_netconf(stdin: bytes) -> NetConf:
    """Decode stdin; undecodable JSON is code 6, a non-object or wrong top-level type code 7."""
    try:
        data = json.loads(stdin or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(
            errors.DECODE_FAILURE, "failed to decode network config from stdin", str(exc)
        ) from None
    if not isinstance(data, dict):
        raise invalid("(network config)", type(data).__name__, "is not a JSON object")
    try:
        return NetConf.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error("", exc, data) from None


def find_flat_file(configuration_path: str | None, search: Sequence[str]) -> str | None:
    candidates = ([configuration_path] if configuration_path else []) + list(search)
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def read_flat_file(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CNIError(errors.IO_FAILURE, f"cannot read flat configuration file {path}", str(exc)) from None
    except ValueError as exc:
        raise invalid("configuration_path", path, f"is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise invalid("configuration_path", path, "does not hold a JSON object")
    return data


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
    stdin: bytes, flat_search: Sequence[str] = DEFAULT_FLAT_FILES, netconf: NetConf | None = None
) -> Config:
    conf = netconf or parse_netconf(stdin)
    if not version_supported(conf.cni_version):
        raise CNIError(
            errors.INCOMPATIBLE_VERSION,
            f"incompatible CNI version {conf.cni_version!r}",
            f"supported versions: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if conf.ipam is None:
        raise invalid("ipam", None, "is missing from the network config")
    raw = dict(conf.ipam)
    flat_path = find_flat_file(raw.get("configuration_path") or None, flat_search)
    if flat_path:
        raw = merge_flat(raw, read_flat_file(flat_path))
    try:
        ipam = IPAMConfig.model_validate(raw)
    except ValidationError as exc:
        raise _pydantic_error("ipam", exc, raw) from None
    if ipam.network_name and not _OBJECT_NAME.match(ipam.network_name):
        # it prefixes pool and reservation names: Kubernetes object names and the file store's file names
        raise invalid(
            "ipam.network_name",
            ipam.network_name,
            "must be lowercase letters, digits, '-' or '.', starting and ending with a letter or digit",
        )
    try:
        ranges = build_ranges(ipam)
        if ipam.node_slice_size:
            from .slices import slice_prefix

            slice_prefix(ipam.node_slice_size, ranges[0].network)
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
