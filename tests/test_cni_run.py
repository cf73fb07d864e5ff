"""`ipam.cni.run` in-process under random, mostly malformed input: every answer is a CNI answer.

Whatever the NAD holds, a call ends with exit 0 and a result (or nothing), or exit 1 and one error
document with a specific code; never code 103 ("internal error"), which means an unexpected exception.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipam import errors
from ipam.cni import run
from ipam.log import log
from tests.cni_exec import FLAT_FILE_ENV

V4 = ["10.0.0.0", "10.0.0.1", "10.0.0.7", "10.0.0.255", "10.0.1.5", "0.0.0.0"]
V6 = ["fd00::", "fd00::1", "fd00::7", "fd00::ffff", "::"]
BAD = ["x", "", "10.0.0.0/24", "10.0.0.256", "fd00:::1"]
KNOWN_CODES = {
    errors.INCOMPATIBLE_VERSION,
    errors.INVALID_ENV,
    errors.IO_FAILURE,
    errors.DECODE_FAILURE,
    errors.INVALID_CONFIG,
    errors.PLUGIN_NOT_AVAILABLE,
    errors.POOL_EXHAUSTED,
    errors.LEASE_NOT_FOUND,
}

junk: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
address = st.one_of(st.sampled_from(V4), st.sampled_from(V6), st.sampled_from(BAD))
cidr = st.one_of(
    st.builds(lambda a, p: f"{a}/{p}", st.sampled_from(V4), st.sampled_from([0, 8, 24, 29, 30, 31, 32])),
    st.builds(lambda a, p: f"{a}/{p}", st.sampled_from(V6), st.sampled_from([0, 64, 120, 126, 127, 128])),
    st.builds(lambda a, b: f"{a}-{b}/29", st.sampled_from(V4), st.sampled_from(V4)),
    st.builds(lambda a, p: f"{a}{p}", address, st.sampled_from(["/33", "/129", "", "/x", "/24", "/64"])),
)
entry = st.fixed_dictionaries(
    {"range": cidr},
    optional={
        "range_start": address,
        "range_end": address,
        "exclude": st.lists(st.one_of(cidr, address), max_size=3),
    },
)
OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "range_start": address,
    "range_end": address,
    "exclude": st.lists(st.one_of(cidr, address), max_size=3),
    "gateway": address,
    "routes": st.lists(st.fixed_dictionaries({"dst": cidr}, optional={"gw": address}), max_size=2),
    "dns": st.fixed_dictionaries({"nameservers": st.lists(address, max_size=2)}),
    "enable_overlapping_ranges": st.booleans(),
    "log_level": st.sampled_from(["debug", "error"]),
    "retry_deadline_seconds": st.floats(min_value=0.5, max_value=5),
    # host paths and identities (node-only keys; these runs use the single-tenant opt-in or not)
    "network_name": st.sampled_from(["", "blue", "a.b", "x" * 129, "y" * 300, "-bad", "UPPER"]),
    "log_file": st.sampled_from(["", "x.log", "/nonexistent/dir/x.log", "/tmp/a\0b", "\0", "LOG"]),
    "data_dir": st.sampled_from(["", "relative", "/tmp/a\0b", "DATA", "/proc/self/fd/0/x"]),
    "configuration_path": st.one_of(st.sampled_from(["", "/etc/passwd", "/nonexistent", "\0"]), junk),
    "kubernetes": st.one_of(
        st.fixed_dictionaries({"kubeconfig": st.sampled_from(["BAD_YAML", "/nonexistent", "\0", ""])}),
        junk,
    ),
    "datastore": st.sampled_from(["file", "kubernetes", "zookeeper", ""]),
    "agent_socket": st.sampled_from(["", "/tmp/tenant.sock", "\0"]),
    "node_name": st.sampled_from(["", "node-b", "n" * 300]),
    "allow_nad_overrides": st.sampled_from([True, False, "yes"]),
}
TOP_OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "prevResult": st.fixed_dictionaries(
        {"ips": st.lists(st.fixed_dictionaries({"address": cidr}), max_size=2)}
    ),
    "cni.dev/valid-attachments": st.lists(
        st.fixed_dictionaries({"containerID": st.sampled_from(["c1", "c2"]), "ifname": st.just("net1")}),
        max_size=2,
    ),
    "runtimeConfig": st.fixed_dictionaries({}),
}


@st.composite
def netconf(draw: st.DrawFn, data_dir: str) -> dict[str, Any]:
    """Plausible configs (often with a bad value); now and then one key holds arbitrary JSON."""
    ipam: dict[str, Any] = {"datastore": "file", "data_dir": data_dir}
    if draw(st.booleans()):
        ipam["range"] = draw(cidr)
    else:
        ipam["ipRanges"] = draw(st.lists(entry, min_size=1, max_size=3))
    for key, strategy in OPTIONAL.items():
        if key in ("range_start", "range_end") and "range" not in ipam:
            continue
        if draw(st.integers(0, 3)) == 0:
            ipam[key] = draw(strategy)
    doc: dict[str, Any] = {
        "cniVersion": draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])),
        "name": "n",
    }
    for key, strategy in TOP_OPTIONAL.items():
        if draw(st.integers(0, 2)) == 0:
            doc[key] = draw(strategy)
    if draw(st.integers(0, 3)) == 0:
        key = draw(st.sampled_from(["range", "ipRanges", *OPTIONAL]))
        ipam[key] = draw(junk)
    for key, value in list(ipam.items()):  # placeholders for paths only known at run time
        if value == "LOG":
            ipam[key] = os.path.join(data_dir, "plugin.log")
        elif value == "DATA":
            ipam[key] = data_dir
    kube = ipam.get("kubernetes")
    if isinstance(kube, dict) and kube.get("kubeconfig") == "BAD_YAML":
        kube["kubeconfig"] = os.path.join(data_dir, "bad.kubeconfig")
    if draw(st.integers(0, 7)) == 0:
        doc[draw(st.sampled_from([*TOP_OPTIONAL, "cni.dev/attachments", "args"]))] = draw(junk)
    doc["ipam"] = ipam
    return doc


# named at import, created by the fixture: collecting the module must not leave a directory behind
DATA_DIR = os.path.join(tempfile.gettempdir(), f"wpy-cni-run-{os.getpid()}")
STRICT_FLAT_FILE = os.path.join(DATA_DIR, "whereabouts.conf")


@pytest.fixture(scope="module", autouse=True)
def quiet_and_clean() -> Iterator[None]:
    saved = (log.stderr, log.path, log.threshold)
    log.stderr = io.StringIO()  # thousands of records are not worth printing
    os.makedirs(DATA_DIR, exist_ok=True)
    with open(os.path.join(DATA_DIR, "bad.kubeconfig"), "w") as fh:
        fh.write("{{{ : not yaml [\n")  # a node kubeconfig that does not parse: code 7, not 103
    with open(STRICT_FLAT_FILE, "w") as fh:  # a multi-tenant node: NAD paths must match these
        json.dump(
            {"datastore": "file", "data_dir": DATA_DIR, "log_file": os.path.join(DATA_DIR, "plugin.log")}, fh
        )
    yield
    log.stderr, log.path, log.threshold = saved  # the call context is reset by every run() anyway
    shutil.rmtree(DATA_DIR, ignore_errors=True)


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    doc=netconf(DATA_DIR),
    command=st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS"]),
    container=st.sampled_from(["c1", "c2"]),
    strict=st.booleans(),
)
def test_any_netconf_gets_a_cni_answer(
    doc: dict[str, Any], command: str, container: str, strict: bool
) -> None:
    """Never code 103 (an internal error) for config-shaped input, in either node mode."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_IFNAME": "net1",
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={container}",
        "WHEREABOUTS_PY_AGENT_SOCKET": "/nonexistent/agent.sock",
    }
    out = io.StringIO()
    saved = os.environ[FLAT_FILE_ENV]
    os.environ[FLAT_FILE_ENV] = STRICT_FLAT_FILE if strict else saved
    try:
        code = run(env, json.dumps(doc).encode(), out)
    finally:
        os.environ[FLAT_FILE_ENV] = saved
    text = out.getvalue()
    if code == 0:
        if command == "ADD":
            result = json.loads(text)
            assert result["cniVersion"] == doc["cniVersion"] and result["ips"]
        else:
            assert text == ""
        return
    assert code == 1
    assert text.count("\n") == 1
    error = json.loads(text)
    assert error["code"] in KNOWN_CODES, error
    assert error["msg"]
