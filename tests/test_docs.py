"""The docs: README and docs/ link only to what exists, README stays an overview, and every error
example in docs/troubleshooting.md is what the plugin really prints (tests/test_examples.py loads
every config example of the pages)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ipam import cni, errors

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found, fence = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.*)$", line)):
            found.add(slug(m.group(1)))
    return found


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target}: no such file"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: {target}: no such heading"


def test_the_readme_stays_an_overview() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


def code_blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


# (tests/test_examples.py loads every config and flat file the pages show)


# --- troubleshooting: every code has a section, every example is a real answer ---------------------


def test_every_error_code_has_a_troubleshooting_section() -> None:
    codes = {
        v for k, v in vars(errors).items() if k.isupper() and isinstance(v, int) and not k.startswith("MAX_")
    }
    assert {1, 4, 6, 7, 11, 100, 104} <= codes
    text = TROUBLESHOOTING.read_text()
    for code in codes:
        assert re.search(rf"^### .*\b[Cc]ode {code}\b", text, flags=re.M), f"code {code} has no section"


def netconf(data_dir: Path, **ipam: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "storage-public",
        "type": "macvlan",
        "ipam": {"type": "whereabouts-py", "datastore": "file", "data_dir": str(data_dir), **ipam},
    }


def call(
    conf: dict[str, Any] | bytes,
    command: str = "ADD",
    container: str = "c1",
    pod: str = "osd-0",
    drop: str = "",
) -> dict[str, Any]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": "/var/run/netns/x",
        "CNI_IFNAME": "net1",
        "CNI_ARGS": f"K8S_POD_NAMESPACE=rook-ceph;K8S_POD_NAME={pod}",
        "CNI_PATH": "/opt/cni/bin",
    }
    env.pop(drop, None)
    out = io.StringIO()
    cni.run(env, conf if isinstance(conf, bytes) else json.dumps(conf).encode(), out)
    answer: dict[str, Any] = json.loads(out.getvalue())
    return answer


def error_examples(tmp: Path) -> dict[int, tuple[dict[str, Any], Path]]:
    """Each documented error, made by the call the page describes; with the directory standing for
    /var/lib/cni in the page."""
    made: dict[int, tuple[dict[str, Any], Path]] = {}
    base = tmp / "a"
    data = base / "whereabouts-py" / "data"
    wide = netconf(data, range="192.168.2.224/28")
    made[1] = call({**wide, "cniVersion": "9.9.9"}), base
    made[4] = call(wide, drop="CNI_CONTAINERID"), base
    made[6] = call(b"{not json"), base
    made[7] = call(netconf(data, range="192.168.2.224/28", range_start="192.168.3.1")), base
    small = netconf(data, range="192.168.2.224/30")
    call(small, container="a", pod="osd-0")
    call(small, container="b", pod="osd-1")
    made[100] = call(small, container="c", pod="osd-2"), base
    made[102] = call(wide, command="CHECK", container="nobody"), base
    asks = {**small, "capabilities": {"ips": True}, "runtimeConfig": {"ips": ["192.168.2.225/30"]}}
    made[104] = call(asks, container="d", pod="mon-a"), base
    call(netconf(data, network_name="fd00", range="650::/120"), container="e")
    made[103] = call(netconf(data, range="fd00:650::/120"), container="f"), base
    pool = netconf(data, range="10.1.0.0/29")
    call(pool, container="g")
    (data / "pools" / "10.1.0.0-29.json").write_text("{truncated")
    made[101] = call(pool, container="h"), base
    other = tmp / "b"
    other.mkdir()
    (other / "whereabouts-py").write_text("")  # a file where data_dir's parent should be a directory
    made[5] = call(netconf(other / "whereabouts-py" / "data", range="10.2.0.0/29")), other
    return made


def test_every_error_example_is_what_the_plugin_prints(tmp_path: Path) -> None:
    text = TROUBLESHOOTING.read_text()
    shown = {
        json.loads(line)["code"]: json.loads(line)
        for block in code_blocks(TROUBLESHOOTING, "json")
        for line in block.splitlines()
        if line.strip()
    }
    made = error_examples(tmp_path)
    assert sorted(shown) == sorted(made)
    for code, (answer, base) in made.items():
        real = json.loads(json.dumps(answer).replace(str(base), "/var/lib/cni"))
        assert real == shown[code], (code, real)
    assert "tests/test_docs.py" in text
