"""Reference agents for bench/slices.py: the node agent's own socket server and request handling, with
the allocation replaced by (a) nothing, or (b) the one request every ADD makes by design, the
overlapping-range reservation POST. The burst through them, in the same run, shows how much of an ADD
is the exec and the socket round trip, and how much the one unavoidable API write adds on top:

    python -m bench.refagent --socket S --mode noop|reserve [--network PREFIX]

`reserve` reads `kubernetes.kubeconfig` from each call's `ipam` config (the node's flat file, as the
real agent does) and creates a reservation for the next address of 10.250.0.0/16 under the call's pod
reference; the answer is a CNI result with that address. Nothing else is read or written.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import tempfile
import threading
from typing import Any

from netaddr import IPAddress

from ipam import agent as agent_mod
from ipam.allocator import Lease
from ipam.ranges import reservation_name
from ipam.store.kubernetes import KubernetesStore

BASE = int(IPAddress("10.250.0.0"))


class ReferenceAgent(agent_mod.Agent):
    def __init__(self, mode: str, network: str) -> None:
        super().__init__()
        self.mode = mode
        self.network = network
        self.counter = itertools.count(1)
        self.lock_dir = tempfile.mkdtemp(prefix="refagent-locks.")
        self.stores: dict[str, KubernetesStore] = {}
        self.stores_lock = threading.Lock()

    def _store(self, kubeconfig: str) -> KubernetesStore:
        with self.stores_lock:
            found = self.stores.get(kubeconfig)
            if found is None:
                found = self.stores[kubeconfig] = KubernetesStore.connect(
                    kubeconfig, self.lock_dir, inline_only=True
                )
            return found

    def serve_call(self, request: dict[str, Any]) -> dict[str, Any]:
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        conf = json.loads(str(request.get("stdin", "")))
        address = IPAddress(BASE + next(self.counter))
        if self.mode == "reserve":
            args = dict(kv.split("=", 1) for kv in env.get("CNI_ARGS", "").split(";") if "=" in kv)
            podref = f"{args.get('K8S_POD_NAMESPACE', '')}/{args.get('K8S_POD_NAME', '')}"
            lease = Lease(env.get("CNI_CONTAINERID", ""), podref, env.get("CNI_IFNAME", ""))
            holder = self._store(conf["ipam"]["kubernetes"]["kubeconfig"]).reserve(
                reservation_name(address, self.network), lease
            )
            if holder is not None:
                return {
                    "code": 1,
                    "stdout": json.dumps({"cniVersion": "1.0.0", "code": 11, "msg": "reserved"}),
                }
        result = {"cniVersion": conf.get("cniVersion", "1.0.0"), "ips": [{"address": f"{address}/16"}]}
        return {"code": 0, "stdout": json.dumps(result)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.refagent", description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--mode", choices=("noop", "reserve"), required=True)
    parser.add_argument(
        "--network",
        default=os.environ.get("NODENAME", "refagent"),
        help="prefix of the reservation names (default: $NODENAME, distinct per simulated node)",
    )
    args = parser.parse_args(argv)
    agent_mod.warm_up()
    server = agent_mod.bind(args.socket, ReferenceAgent(args.mode, args.network))
    signal.signal(
        signal.SIGTERM, lambda _s, _f: threading.Thread(target=server.shutdown, daemon=True).start()
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
