"""Where kube-apiserver spends its CPU: a CPU profile from its /debug/pprof/profile (on by default,
admin only), decoded here (no Go toolchain on these machines) into the functions that hold the most
samples, flat and cumulative. Used by `bench.controller --profile` to see what a release costs the
API server.

    profile = cpu_profile(client, seconds=10)      # the gzipped protobuf
    print(summarize(profile, focus=("k8s.io/apiextensions", "encoding/json")))
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ipam.store.kubeclient import KubeClient


def cpu_profile(client: KubeClient, seconds: int) -> bytes:
    conn, resp = client.stream("/debug/pprof/profile", {"seconds": str(seconds)}, "*/*", seconds + 60)
    try:
        return resp.read()
    finally:
        conn.close()


# -- a minimal protobuf reader for profile.proto (github.com/google/pprof/proto/profile.proto) ------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(buf, i)
            yield number, kind, value
        elif kind == 2:
            size, i = _varint(buf, i)
            yield number, kind, buf[i : i + size]
            i += size
        elif kind == 1:
            yield number, kind, int.from_bytes(buf[i : i + 8], "little")
            i += 8
        elif kind == 5:
            yield number, kind, int.from_bytes(buf[i : i + 4], "little")
            i += 4
        else:
            raise ValueError(f"wire type {kind}")


def _ints(kind: int, value: int | bytes) -> list[int]:
    """A repeated integer field: packed (bytes) or one value."""
    if isinstance(value, int):
        return [value]
    out, i = [], 0
    while i < len(value):
        v, i = _varint(value, i)
        out.append(v)
    return out


@dataclass
class Profile:
    strings: list[str] = field(default_factory=list)
    functions: dict[int, str] = field(default_factory=dict)  # id -> name
    locations: dict[int, list[int]] = field(default_factory=dict)  # id -> function ids, innermost first
    samples: list[tuple[list[int], int]] = field(default_factory=list)  # (location ids, cpu nanoseconds)


def parse(data: bytes) -> Profile:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    p = Profile()
    raw_functions: list[tuple[int, int]] = []
    for number, _kind, value in _fields(data):
        if number == 6:
            assert isinstance(value, bytes)
            p.strings.append(value.decode("utf-8", "replace"))
        elif number == 2:
            assert isinstance(value, bytes)
            locs: list[int] = []
            values: list[int] = []
            for n, k, v in _fields(value):
                if n == 1:
                    locs += _ints(k, v)
                elif n == 2:
                    values += _ints(k, v)
            p.samples.append((locs, values[-1] if values else 0))
        elif number == 4:
            assert isinstance(value, bytes)
            loc_id, funcs = 0, []
            for n, _k, v in _fields(value):
                if n == 1:
                    assert isinstance(v, int)
                    loc_id = v
                elif n == 4:
                    assert isinstance(v, bytes)
                    for ln, _lk, lv in _fields(v):
                        if ln == 1:
                            assert isinstance(lv, int)
                            funcs.append(lv)
            p.locations[loc_id] = funcs
        elif number == 5:
            assert isinstance(value, bytes)
            fid = name = 0
            for n, _k, v in _fields(value):
                assert isinstance(v, int) or n not in (1, 2)
                if n == 1:
                    fid = int(v)  # type: ignore[arg-type]
                elif n == 2:
                    name = int(v)  # type: ignore[arg-type]
            raw_functions.append((fid, name))
    p.functions = {fid: p.strings[name] for fid, name in raw_functions}
    return p


def stacks(p: Profile) -> Iterator[tuple[list[str], int]]:
    """Each sample's function names, innermost first, and its CPU nanoseconds."""
    for locs, ns in p.samples:
        names: list[str] = []
        for loc in locs:
            names += [p.functions.get(f, "?") for f in p.locations.get(loc, [])]
        yield names, ns


def summarize(data: bytes, top: int = 40, focus: Sequence[str] = ()) -> str:
    """The `top` functions by cumulative and by flat CPU, in seconds and as a share of the total; with
    `focus`, also the share of samples whose stack holds a function matching each substring."""
    p = parse(data)
    total = sum(ns for _, ns in p.samples) or 1
    flat: Counter[str] = Counter()
    cum: Counter[str] = Counter()
    hits: Counter[str] = Counter()
    for names, ns in stacks(p):
        if names:
            flat[names[0]] += ns
        for name in set(names):
            cum[name] += ns
        for f in focus:
            if any(f in n for n in names):
                hits[f] += ns
    lines = [f"total {total / 1e9:.2f} s of CPU in {len(p.samples)} samples"]
    lines.append("cumulative:")
    lines += [f"  {ns / 1e9:7.2f} s {100 * ns / total:5.1f}%  {name}" for name, ns in cum.most_common(top)]
    lines.append("flat:")
    lines += [f"  {ns / 1e9:7.2f} s {100 * ns / total:5.1f}%  {name}" for name, ns in flat.most_common(top)]
    if focus:
        lines.append("stacks holding:")
        lines += [f"  {hits[f] / 1e9:7.2f} s {100 * hits[f] / total:5.1f}%  {f}" for f in focus]
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    with open(sys.argv[1], "rb") as fh:
        print(summarize(fh.read(), top=int(sys.argv[2]) if len(sys.argv) > 2 else 40))
