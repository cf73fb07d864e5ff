"""The Rook/Ceph examples and guide, kept honest.

- every manifest in examples/ (and every YAML block of the guide) passes a server-side dry run on the
  real kube-apiserver, with the CRDs it needs (Rook's CephCluster CRD and Multus' NAD CRD, from
  tests/third_party/, each naming its source and version);
- the NAD configs of the examples run through the real CNI plugins in network namespaces and get the
  addresses the guide says they get (the ipvlan cases carry the `ipvlan` marker; macvlan stands in on
  kernels without CONFIG_IPVLAN, with the NAD's ipam block unchanged);
  the example ranges (192.168.20.0/24, 192.168.30.0/24) then exist only inside the test's network
  namespaces, whose parent links are veth pairs with both ends in the node netns: nothing leaves them;
- every JSON snippet of README.md and docs/*.md, and every NAD config, loads through
  ipam.config.load_config, and no NAD carries a node-only key.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipam.config import NODE_ONLY_KEYS, IPAMConfig, load_config
from ipam.ranges import RangeSpec, pool_name
from tests.e2e import conftest as e2e
from tests.e2e import runtime as rt
from tests.kubeapi.real import ApiError, RealKube

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
GUIDE = REPO / "docs" / "rook-ceph.md"
README = REPO / "README.md"
THIRD_PARTY = Path(__file__).resolve().parent / "third_party"
CRD_FILES = [THIRD_PARTY / "multus-nad-crd.yaml", THIRD_PARTY / "rook-cephcluster-crd.yaml"]

NAD_KIND = "NetworkAttachmentDefinition"
# Multus names a pod's extra interfaces net1, net2... in the order of its networks annotation; Rook
# lists the public network first and adds the cluster network for OSD pods only.
IFNAMES = {"public": "net1", "cluster": "net2"}

# The e2e suite's fixtures, reused (`backend` is this module's own: the file datastore, or IPPools on
# the real kube-apiserver).
cni_bin = e2e.cni_bin
runtime = e2e.runtime
ipam = e2e.ipam
store = e2e.store
ipam_log = e2e.ipam_log


# ---- reading the examples and the docs ------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    where: str  # file:line of the document, for messages
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def key(self) -> tuple[str, str]:
        meta = self.doc.get("metadata", {})
        return str(meta.get("namespace", "")), str(meta.get("name", ""))


def yaml_documents(text: str, where: str) -> list[Manifest]:
    return [Manifest(where, doc) for doc in yaml.safe_load_all(text) if doc is not None]


def example_manifests() -> list[Manifest]:
    out: list[Manifest] = []
    for path in sorted(EXAMPLES.rglob("*.y*ml")):
        out += yaml_documents(path.read_text(), str(path.relative_to(REPO)))
    return out


_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)


def fenced_blocks(path: Path, lang: str) -> list[tuple[str, str]]:
    """(file:line, text) of every ```lang block of a Markdown file, indented blocks dedented."""
    text = path.read_text()
    out = []
    for m in _FENCE.finditer(text):
        if m.group("lang") == lang:
            line = text.count("\n", 0, m.start()) + 1
            out.append((f"{path.relative_to(REPO)}:{line}", textwrap.dedent(m.group("body"))))
    return out


def guide_manifests() -> list[Manifest]:
    out: list[Manifest] = []
    for where, text in fenced_blocks(GUIDE, "yaml"):
        out += yaml_documents(text, where)
    return out


def nad_config(m: Manifest) -> dict[str, Any]:
    conf: dict[str, Any] = json.loads(m.doc["spec"]["config"])
    return conf


def nads_by_key(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    return {m.key: m for m in manifests if m.kind == NAD_KIND}


def load(conf: dict[str, Any]) -> tuple[IPAMConfig, tuple[RangeSpec, ...]]:
    """load_config as the plugin runs it, with no flat file (a NAD must stand on its own)."""
    cfg = load_config(json.dumps(conf).encode(), flat_search=[])
    return cfg.ipam, cfg.ranges


def node_only_keys_in(conf: dict[str, Any]) -> set[str]:
    return set(NODE_ONLY_KEYS) & set(conf.get("ipam") or {})


def parse_selector(value: str, cluster_namespace: str) -> tuple[str, str]:
    """Rook's selector values use Multus' short network-selection form: [NAMESPACE/]NAME[@IFNAME]."""
    ns, _, name = value.rpartition("/")
    name = name.split("@", 1)[0]
    return ns or cluster_namespace, name


def selected_nads(cluster: Manifest, nads: dict[tuple[str, str], Manifest]) -> dict[str, Manifest]:
    """{"public": NAD, "cluster": NAD} a CephCluster selects; fails when a selector names no NAD."""
    network = cluster.doc["spec"]["network"]
    selectors = network.get("selectors") or {}
    assert network.get("provider") == "multus", f"{cluster.where}: provider {network.get('provider')!r}"
    assert selectors and set(selectors) <= {"public", "cluster"}, f"{cluster.where}: selectors {selectors}"
    out = {}
    for net, value in selectors.items():
        key = parse_selector(str(value), cluster.key[0])
        assert key in nads, f"{cluster.where}: selectors.{net} {value!r} names no NAD; NADs: {sorted(nads)}"
        out[net] = nads[key]
    return out


def example_storage_nads() -> dict[str, dict[str, Any]]:
    """The NAD configs the example CephCluster selects, by Ceph network."""
    manifests = example_manifests()
    clusters = [m for m in manifests if m.kind == "CephCluster"]
    assert len(clusters) == 1, [m.where for m in clusters]
    return {net: nad_config(m) for net, m in selected_nads(clusters[0], nads_by_key(manifests)).items()}


def first_addresses(conf: dict[str, Any], count: int) -> list[str]:
    """The first `count` addresses the plugin hands out for `conf` (lowest free first), as CIDRs."""
    _, ranges = load(conf)
    (spec,) = ranges
    out: list[str] = []
    for lo, hi in spec.intervals:
        for value in range(lo, hi + 1):
            out.append(f"{ipaddress.ip_address(value)}/{spec.prefixlen}")
            if len(out) == count:
                return out
    raise AssertionError(f"{conf['name']} has fewer than {count} addresses")


# ---- the examples as files -------------------------------------------------------------------------


def test_examples_hold_two_storage_nads_and_a_cephcluster_selecting_them() -> None:
    manifests = example_manifests()
    kinds = sorted(m.kind for m in manifests)
    assert kinds.count(NAD_KIND) >= 2 and kinds.count("CephCluster") == 1, kinds
    nets = example_storage_nads()
    assert set(nets) == {"public", "cluster"}, nets
    public, cluster = nets["public"], nets["cluster"]
    # two networks, two address spaces, two parent links (the two-NIC plan of the guide)
    assert public["ipam"]["network_name"] != cluster["ipam"]["network_name"]
    assert public["master"] != cluster["master"]
    assert public["type"] == cluster["type"] == "ipvlan" and public["mode"] == cluster["mode"] == "l2"


@pytest.mark.parametrize("nad", nads_by_key(example_manifests()).values(), ids=lambda m: "/".join(m.key))
def test_example_nad_config_loads_without_node_only_keys(nad: Manifest) -> None:
    conf = nad_config(nad)
    assert conf["name"] == nad.key[1], f"{nad.where}: config name {conf['name']!r} differs from metadata.name"
    assert not node_only_keys_in(conf), f"{nad.where}: node-only keys in a NAD: {node_only_keys_in(conf)}"
    block, ranges = load(conf)
    assert block.type == rt.OUR_TYPE
    assert block.network_name, f"{nad.where}: every storage network needs its own network_name"
    assert block.exclude, f"{nad.where}: the hosts' own addresses and the router must be excluded"
    (spec,) = ranges
    for excluded in block.exclude:
        net = ipaddress.ip_network(excluded, strict=False)
        assert not any(spec.contains(int(ip)) for ip in (net.network_address, net.broadcast_address)), (
            excluded
        )


def test_example_address_plan_matches_the_guide() -> None:
    """The numbers the guide states for the example: 222 addresses per network, .32 to .253."""
    nets = example_storage_nads()
    for net, prefix in (("public", "192.168.20."), ("cluster", "192.168.30.")):
        _, (spec,) = load(nets[net])
        assert spec.size() == 222, (net, spec.size())
        first, last = spec.intervals[0][0], spec.intervals[-1][1]
        assert (str(ipaddress.ip_address(first)), str(ipaddress.ip_address(last))) == (
            f"{prefix}32",
            f"{prefix}253",
        )


def test_guide_names_the_example_pools() -> None:
    """The IPPool names the guide tells users to look for are the ones the plugin writes."""
    text = GUIDE.read_text()
    for conf in example_storage_nads().values():
        name = pool_name(conf["ipam"]["range"], conf["ipam"]["network_name"])
        assert f"`{name}`" in text, name


def test_example_cephcluster_address_ranges_cover_the_selected_nads() -> None:
    """Ceph binds to addresses inside public_network / cluster_network: each addressRanges entry list
    must contain the range of the NAD selected for that network."""
    manifests = example_manifests()
    (cluster,) = [m for m in manifests if m.kind == "CephCluster"]
    ranges = cluster.doc["spec"]["network"].get("addressRanges", {})
    for net, nad in selected_nads(cluster, nads_by_key(manifests)).items():
        _, (spec,) = load(nad_config(nad))
        cidrs = [ipaddress.ip_network(c) for c in ranges.get(net, [])]
        nad_net = ipaddress.ip_network(spec.cidr)
        assert any(nad_net.network_address in c and nad_net.broadcast_address in c for c in cidrs), (
            f"addressRanges.{net} {cidrs} does not hold {nad_net}"
        )


# ---- server-side dry runs on the real kube-apiserver -------------------------------------------------


def install_third_party_crds(real_kube: RealKube) -> None:
    """Create Multus' NAD CRD and Rook's CephCluster CRD for real (once per server) and wait for them."""
    for path in CRD_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            try:
                real_kube.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
            except ApiError as exc:
                if exc.status != 409:  # AlreadyExists: an earlier test of this session made it
                    raise
            real_kube.cluster.wait_established(doc["metadata"]["name"])


def missing_from(sent: Any, answer: Any, path: str = "") -> list[str]:
    """Paths of `sent` that the server's answer lacks or changed (a pruned or rewritten field)."""
    if isinstance(sent, dict):
        if not isinstance(answer, dict):
            return [path or "."]
        return [p for k, v in sent.items() for p in missing_from(v, answer.get(k, _ABSENT), f"{path}.{k}")]
    return [] if sent == answer else [path]


_ABSENT = object()
ALL_MANIFESTS = example_manifests() + guide_manifests()


@pytest.mark.parametrize("manifest", ALL_MANIFESTS, ids=[f"{m.where}-{m.key[1]}" for m in ALL_MANIFESTS])
def test_manifest_passes_server_side_dry_run(real_kube: RealKube, manifest: Manifest) -> None:
    """Created with dryRun=All and fieldValidation=Strict (an unknown field is an error), in this test's
    namespace; the server keeps every field as sent."""
    install_third_party_crds(real_kube)
    try:
        (answer,) = real_kube.apply(manifest.doc, dry_run=True)
    except ApiError as exc:
        raise AssertionError(
            f"{manifest.where}: {manifest.kind} {manifest.key} refused: {exc.status} {exc.body}"
        ) from None
    assert not missing_from(manifest.doc["spec"], answer["spec"], "spec"), (manifest.where, answer["spec"])
    # a dry run stores nothing
    plural = {NAD_KIND: "network-attachment-definitions", "CephCluster": "cephclusters"}[manifest.kind]
    group = manifest.doc["apiVersion"]
    listed = real_kube.request("GET", f"/apis/{group}/namespaces/{real_kube.namespace}/{plural}")
    assert listed["items"] == []


def _refused(real_kube: RealKube, obj: dict[str, Any]) -> str:
    try:
        real_kube.apply(obj, dry_run=True)
    except ApiError as exc:
        assert exc.status in (400, 422), (exc.status, exc.body)  # strict decoding: 400; schema: 422
        return json.dumps(exc.body)
    raise AssertionError(f"the server accepted {json.dumps(obj)}")


def test_dry_run_refuses_what_rooks_crd_refuses(real_kube: RealKube) -> None:
    """The dry runs above check something: broken variants of the examples are refused, with Rook's
    and Multus' own rules."""
    install_third_party_crds(real_kube)
    manifests = example_manifests()
    (cluster,) = [copy.deepcopy(m.doc) for m in manifests if m.kind == "CephCluster"]
    nad = copy.deepcopy(next(m.doc for m in manifests if m.kind == NAD_KIND))

    no_selectors = copy.deepcopy(cluster)
    del no_selectors["spec"]["network"]["selectors"]
    del no_selectors["spec"]["network"]["addressRanges"]
    assert "at least one network selector" in _refused(real_kube, no_selectors)

    bad_provider = copy.deepcopy(cluster)
    bad_provider["spec"]["network"]["provider"] = "Multus"
    assert "provider" in _refused(real_kube, bad_provider)

    no_prefix = copy.deepcopy(cluster)
    no_prefix["spec"]["network"]["addressRanges"]["public"] = ["192.168.20.0"]
    assert "addressRanges.public" in _refused(real_kube, no_prefix)

    typo = copy.deepcopy(cluster)
    typo["spec"]["netwrok"] = typo["spec"].pop("network")
    assert "netwrok" in _refused(real_kube, typo)

    config_as_object = copy.deepcopy(nad)
    config_as_object["spec"]["config"] = json.loads(nad["spec"]["config"])
    assert "spec.config" in _refused(real_kube, config_as_object)


# ---- README's and the guide's snippets ------------------------------------------------------------


# every page with configs; troubleshooting.md shows error answers (tests/test_docs.py runs those)
PAGES = [README, *sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "troubleshooting.md")]


def _json_snippets() -> list[tuple[str, str]]:
    return [snippet for page in PAGES for snippet in fenced_blocks(page, "json")]


def test_docs_have_snippets_to_check() -> None:
    """The parametrised tests below would pass vacuously if the fences were not found."""
    assert len(fenced_blocks(README, "json")) >= 1
    assert len(_json_snippets()) >= 8
    assert len(fenced_blocks(GUIDE, "json")) >= 3
    assert sum(m.kind == "CephCluster" for m in guide_manifests()) >= 1


@pytest.mark.parametrize(("where", "text"), _json_snippets(), ids=[w for w, _ in _json_snippets()])
def test_json_snippet_is_a_valid_config(where: str, text: str, tmp_path: Path) -> None:
    """A network config (it has `ipam`) loads as a NAD would; any other JSON is a flat file, loaded as
    the node's flat file under a minimal network config."""
    if text.lstrip().startswith('"'):
        # an object member shown alone (`"ipam": {...}`): the network config it belongs in
        text = '{"cniVersion": "1.0.0", "name": "snippet", ' + text + "}"
    doc = json.loads(text)
    assert isinstance(doc, dict), where
    if "ipam" in doc:
        assert not node_only_keys_in(doc), f"{where}: node-only keys in a NAD: {node_only_keys_in(doc)}"
        load(doc)
        return
    flat_keys = {f.alias or name for name, f in IPAMConfig.model_fields.items()} | {"allow_nad_overrides"}
    unknown = set(doc) - flat_keys
    assert not unknown, f"{where}: neither a network config nor a flat file (unknown keys {sorted(unknown)})"
    flat = tmp_path / "whereabouts.conf"
    flat.write_text(text)
    flat.chmod(0o600)  # a node file: the plugin reads it only when nobody else may write it
    stdin = json.dumps(
        {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": rt.OUR_TYPE, "range": "10.0.0.0/24"}}
    )
    cfg = load_config(stdin.encode(), flat_search=[str(flat)])
    assert cfg.flat_file == str(flat)


def test_guide_manifests_load_and_select_existing_nads() -> None:
    """The guide's YAML: any NAD config loads without node-only keys; every CephCluster's selectors
    name a NAD of the examples or of the guide."""
    manifests = guide_manifests()
    for nad in (m for m in manifests if m.kind == NAD_KIND):
        conf = nad_config(nad)
        assert not node_only_keys_in(conf), f"{nad.where}: node-only keys in a NAD: {node_only_keys_in(conf)}"
        load(conf)
    known = nads_by_key(example_manifests() + manifests)
    for cluster in (m for m in manifests if m.kind == "CephCluster"):
        assert set(selected_nads(cluster, known)) == set(cluster.doc["spec"]["network"]["selectors"])


# ---- the example NADs through the real plugins -----------------------------------------------------

SHIM_MODE = {"macvlan": "bridge", "ipvlan": "l2"}


@pytest.fixture
def netns_tools() -> None:
    missing = rt.tools_missing()
    if missing:
        pytest.fail("the network-namespace tests need: " + "; ".join(missing), pytrace=False)


@pytest.fixture
def backend(request: pytest.FixtureRequest, runtime: rt.Runtime, tmp_path: Path) -> e2e.Backend:
    """The file datastore by default; parametrise indirectly with "real-kubernetes" for IPPools on the
    real kube-apiserver (this test's namespace), reached from the node netns through a forwarder."""
    name = getattr(request, "param", "file")
    data_dir = tmp_path / "ipam-data"
    if name == "file":
        return e2e.Backend(
            name, {"datastore": "file", "data_dir": str(data_dir)}, lambda: rt.read_store(data_dir)
        )
    assert name == "real-kubernetes", name
    real_kube: RealKube = request.getfixturevalue("real_kube")
    forwarder = rt.LoopbackForwarder(runtime.node, int(real_kube.url.rsplit(":", 1)[1]))
    runtime.after_dels.append(forwarder.close)  # the teardown DELs still need the API server

    def read() -> rt.StoreView:
        def named(plural: str) -> dict[str, dict[str, Any]]:
            return {o["metadata"]["name"]: o for o in real_kube.api.objects(plural, real_kube.namespace)}

        return rt.StoreView(named("ippools"), named("overlappingrangeipreservations"))

    keys = {
        "datastore": "kubernetes",
        "kubernetes": {"kubeconfig": real_kube.kubeconfig_path},  # context namespace: the test's
        "data_dir": str(data_dir),  # the node-local lock directory
    }
    return e2e.Backend(name, keys, read)


def runnable(conf: dict[str, Any], kind: str, ipam: e2e.IpamFactory) -> dict[str, Any]:
    """The example config as the node runs it: main plugin `kind` (macvlan stands in for ipvlan where
    the kernel lacks it), the NAD's ipam block unchanged plus this test's datastore keys."""
    out = copy.deepcopy(conf)
    if kind != out["type"]:
        out["type"], out["mode"] = kind, SHIM_MODE[kind]
    block = dict(conf["ipam"])
    assert block.pop("type") == rt.OUR_TYPE
    out["ipam"] = ipam(**block)
    return out


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kind", "backend"),
    [
        pytest.param("ipvlan", "file", marks=pytest.mark.ipvlan, id="ipvlan-file"),
        pytest.param("macvlan", "file", id="macvlan-for-ipvlan-file"),
        # IPPools in the real API server, named as the guide says (macvlan: the datastore is the point)
        pytest.param(
            "macvlan", "real-kubernetes", marks=pytest.mark.apiserver, id="macvlan-for-ipvlan-real-kubernetes"
        ),
    ],
    indirect=["backend"],
)
def test_example_networks_attach_rook_pods(
    netns_tools: None,
    runtime: rt.Runtime,
    kind: str,
    ipam: e2e.IpamFactory,
    store: Callable[[], rt.StoreView],
    ipam_log: Callable[[], str],
) -> None:
    """Three OSD pods on both networks, a mon and a mgr on the public one, as Rook attaches them:
    addresses from the intended ranges, lowest free first after the excluded hosts' block; pods reach
    each other; the host reaches its pods through a shim link and not through the parent itself."""
    e2e.require_kernel_link(kind)
    nads = example_storage_nads()
    confs = {net: runnable(conf, kind, ipam) for net, conf in nads.items()}
    for conf in confs.values():
        runtime.add_parent_link(conf["master"])  # the node's eth1 / eth2, inside the node netns

    pods: list[tuple[rt.Pod, tuple[str, ...]]] = []
    for i in range(3):
        pods.append((runtime.new_pod(f"rook-ceph-osd-{i}-6b8f7c9d4-x{i}x7q"), ("public", "cluster")))
    pods.append((runtime.new_pod("rook-ceph-mon-a-7d9c5f6b8-m4k2p"), ("public",)))
    pods.append((runtime.new_pod("rook-ceph-mgr-a-5c6d7e8f9-q8r3t"), ("public",)))
    got: dict[str, list[str]] = {"public": [], "cluster": []}
    for pod, nets in pods:  # one after the other, as one node's kubelet would: the order is known
        for net in nets:
            att = runtime.add(pod, confs[net], IFNAMES[net])
            got[net] += att.addresses()
            assert rt.netns_addresses(pod.netns, IFNAMES[net]) == att.addresses(), (pod.name, net)

    assert got["public"] == first_addresses(nads["public"], 5), got
    assert got["cluster"] == first_addresses(nads["cluster"], 3), got
    for net, addresses in got.items():
        block = nads[net]["ipam"]
        network = ipaddress.ip_network(block["range"])
        excluded = [ipaddress.ip_network(e) for e in block["exclude"]]
        for address in addresses:
            ip = ipaddress.ip_interface(address).ip
            assert ip in network and not any(ip in e for e in excluded), (net, address)

    # one IPPool per network, named after network_name and the range, as Whereabouts names it
    pools = {Path(p).name.removesuffix(".json") for p in store().pools}
    assert pools == {pool_name(c["ipam"]["range"], c["ipam"]["network_name"]) for c in nads.values()}, pools

    osd0, osd2 = pods[0][0], pods[2][0]
    for net in ("public", "cluster"):
        target = osd2.attachments[list(IFNAMES).index(net)].addresses()[0].split("/")[0]
        reply = rt.ping(osd0.netns, target)
        assert reply.returncode == 0, f"{net}: {reply.stdout}{reply.stderr}"

    # the host: its address on the parent itself does not reach its own pods...
    public = nads["public"]
    host = f"{ipaddress.ip_network(public['ipam']['exclude'][0]).network_address + 1}/24"
    pod_ip = got["public"][0].split("/")[0]
    rt.run(["ip", "-n", runtime.node, "addr", "add", host, "dev", public["master"]])
    isolated = rt.ping(runtime.node, pod_ip, count=1)
    assert isolated.returncode != 0, f"the parent reached a {kind} pod:\n{isolated.stdout}"
    # ...the same address on a shim link of the same kind on the parent does
    rt.run(["ip", "-n", runtime.node, "addr", "del", host, "dev", public["master"]])
    shim = ["ip", "-n", runtime.node, "link", "add", "public-shim", "link", public["master"]]
    rt.run([*shim, "type", kind, "mode", SHIM_MODE[kind]])
    rt.run(["ip", "-n", runtime.node, "addr", "add", host, "dev", "public-shim"])
    rt.run(["ip", "-n", runtime.node, "link", "set", "public-shim", "up"])
    reply = rt.ping(runtime.node, pod_ip)
    assert reply.returncode == 0, f"host shim -> pod: {reply.stdout}{reply.stderr}"

    for pod, _ in reversed(pods):
        for att in reversed(pod.attachments):
            runtime.delete(att)
    view = store()
    left = {p: d["spec"].get("allocations") for p, d in view.pools.items() if d["spec"].get("allocations")}
    assert not left and not view.reservations, (
        f"left after DEL: {left} {sorted(view.reservations)}\n{ipam_log()}"
    )


@pytest.mark.e2e
def test_osd_pod_sandbox_recreated_and_rescheduled(
    netns_tools: None,
    runtime: rt.Runtime,
    ipam: e2e.IpamFactory,
    store: Callable[[], rt.StoreView],
    ipam_log: Callable[[], str],
) -> None:
    """What the guide says happens to an OSD's address: a new sandbox of the same pod keeps it (lease
    found by pod reference + interface); a replacement pod (new name and UID) gets a new one while the
    old lease is held, and the old address is free again once the old pod's DEL has run."""
    e2e.require_kernel_link("macvlan")
    nad = example_storage_nads()["public"]
    conf = runnable(nad, "macvlan", ipam)
    runtime.add_parent_link(conf["master"])
    first, second = first_addresses(nad, 2)
    ifname = IFNAMES["public"]

    old = runtime.new_pod("rook-ceph-osd-0-6b8f7c9d4-aaaaa")
    assert runtime.add(old, conf, ifname).addresses() == [first]

    # node reboot / sandbox recreation: the same pod (name and UID) in a new sandbox keeps its address
    resandboxed = runtime.new_pod(old.name)
    resandboxed.uid = old.uid
    assert runtime.add(resandboxed, conf, ifname).addresses() == [first]
    # the dead sandbox's DEL names a container id that no longer holds the lease: nothing is released
    runtime.delete(old.attachments[0])
    assert len(store().leases_of(resandboxed.container_id)) == 1, ipam_log()

    # rescheduled: the Deployment's new pod (new name, new UID) while the old one still holds its lease
    new = runtime.new_pod("rook-ceph-osd-0-6b8f7c9d4-bbbbb")
    assert runtime.add(new, conf, ifname).addresses() == [second]
    # the old pod's teardown DEL releases its lease (the reconciler does it if the DEL never comes)
    runtime.delete(resandboxed.attachments[0])
    assert not store().held_by(resandboxed.container_id), ipam_log()
    later = runtime.new_pod("rook-ceph-osd-1-6b8f7c9d4-ccccc")
    assert runtime.add(later, conf, ifname).addresses() == [first]
