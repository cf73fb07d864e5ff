"""ipam-agent: the node daemon behind the CNI shim.

Serves CNI calls on a unix socket with warm datastore clients and coalesces: ops for one pool that
arrive while that pool's read-modify-write is in flight are served together by the next one (one
GET + one PUT for the whole batch), each with its own result or error. A result is only returned
after the write that holds it succeeded. Health and Prometheus metrics on a localhost port.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import queue
import signal
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from . import cni
from .config import Config
from .engine import AddOp, Engine, Op, ReleaseOp
from .log import log
from .shim import DEFAULT_SOCKET, WORK_MARGIN
from .store.base import Store
from .store.open import open_store

MAX_REQUEST = 4 << 20


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "whereabouts_py_requests", "CNI calls served", ["command", "result"], registry=r
        )
        self.allocations = Counter("whereabouts_py_allocations", "addresses handed out", registry=r)
        self.releases = Counter("whereabouts_py_releases", "addresses given back", registry=r)
        self.conflicts = Counter("whereabouts_py_conflicts", "conditional writes refused (409)", registry=r)
        self.batches = Histogram(
            "whereabouts_py_batch_size",
            "ops per pool write",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.latency = Histogram(
            "whereabouts_py_request_seconds",
            "CNI call latency",
            ["command"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )


@dataclass(eq=False)
class Ticket:
    engine: Engine
    cidr: str
    ops: list[Op]
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Coalescer:
    """One worker thread per pool; each takes everything queued for its pool as one batch."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.lock = threading.Lock()
        self.queues: dict[tuple[int, str, bool, str], queue.SimpleQueue[Ticket]] = {}

    def run(self, engine: Engine, name: str, cidr: str, ops: list[Op], deadline: float) -> None:
        """The engine's BatchRunner: queue the ops and wait for the batch that carries them."""
        key = (id(engine.store), engine.network_name, engine.overlapping, name)
        with self.lock:
            q = self.queues.get(key)
            if q is None:
                q = self.queues[key] = queue.SimpleQueue()
                threading.Thread(
                    target=self._worker, args=(name, q), name=f"pool-{name}", daemon=True
                ).start()
        ticket = Ticket(engine, cidr, ops, deadline)
        q.put(ticket)
        ticket.done.wait()
        if ticket.error is not None:
            raise ticket.error

    def _worker(self, name: str, q: queue.SimpleQueue[Ticket]) -> None:
        while True:
            batch = [q.get()]
            while True:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            engine = batch[0].engine
            ops = [op for t in batch for op in t.ops]
            conflicts_before = engine.stats.conflicts

            def absorb() -> list[Op]:
                more: list[Op] = []
                while True:
                    try:
                        ticket = q.get_nowait()
                    except queue.Empty:
                        return more
                    batch.append(ticket)  # noqa: B023 - this batch, while it is being served
                    more.extend(ticket.ops)

            try:
                engine.apply_batch(name, batch[0].cidr, ops, max(t.deadline for t in batch), absorb)
                self.metrics.allocations.inc(
                    sum(1 for op in ops if isinstance(op, AddOp) and op.error is None)
                )
                self.metrics.releases.inc(sum(len(op.released) for op in ops if isinstance(op, ReleaseOp)))
            except BaseException as exc:  # every waiter of the batch gets the batch's failure
                for t in batch:
                    t.error = exc
            finally:
                self.metrics.conflicts.inc(max(0, engine.stats.conflicts - conflicts_before))
                self.metrics.batches.observe(len(ops))
                if len(batch) > 1:
                    log.debug("agent.batch", pool=name, calls=len(batch), ops=len(ops))
                for t in batch:
                    t.done.set()


class Agent:
    def __init__(self) -> None:
        self.metrics = Metrics()
        self.coalescer = Coalescer(self.metrics)
        self.stores: dict[tuple[str, str, str], Store] = {}
        self.lock = threading.Lock()

    def store_for(self, cfg: Config) -> Store:
        key = (cfg.ipam.datastore, cfg.ipam.kubernetes.kubeconfig or "", cfg.ipam.data_dir)
        with self.lock:
            store = self.stores.get(key)
            if store is None:
                store = self.stores[key] = open_store(cfg)
            return store

    @contextmanager
    def engines(self, cfg: Config, shim_timeout: float | None = None) -> Iterator[Engine]:
        engine = cni.make_engine(cfg, self.store_for(cfg))
        engine.runner = self.coalescer.run
        if shim_timeout is not None:  # done (rollback included) before the shim falls back to direct mode
            policy = engine.policy
            fits = max(1.0, shim_timeout - policy.rollback_seconds - WORK_MARGIN)
            engine.policy = replace(policy, deadline_seconds=min(policy.deadline_seconds, fits))
        yield engine

    def serve_call(self, request: dict[str, Any]) -> dict[str, Any]:
        env = {str(k): str(v) for k, v in (request.get("env") or {}).items()}
        stdin = str(request.get("stdin", "")).encode("utf-8", errors="surrogateescape")
        command = env.get("CNI_COMMAND", "")
        out = io.StringIO()
        started = time.monotonic()
        raw_timeout = request.get("timeout")
        shim_timeout = float(raw_timeout) if isinstance(raw_timeout, (int, float)) else None
        code = cni.run(env, stdin, out, engines=lambda cfg: self.engines(cfg, shim_timeout))
        self.metrics.latency.labels(command).observe(time.monotonic() - started)
        self.metrics.requests.labels(command, "ok" if code == 0 else "error").inc()
        return {"code": code, "stdout": out.getvalue()}

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


class _CallHandler(socketserver.StreamRequestHandler):
    server: _SocketServer

    def handle(self) -> None:
        raw = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(raw)
            if not isinstance(request, dict):
                raise ValueError("request is not an object")
        except ValueError as exc:
            log.error("agent.bad-request", error=str(exc))
            return  # the shim sees a closed socket and falls back to direct mode
        reply = self.server.agent.serve_call(request)
        self.wfile.write(json.dumps(reply).encode())


class _SocketServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    request_queue_size = (
        512  # a burst of pods connects at once; a full backlog would push shims to direct mode
    )

    def __init__(self, path: str, agent: Agent) -> None:
        self.agent = agent
        super().__init__(path, _CallHandler)


def _health_server(agent: Agent, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            if self.path == "/metrics":
                body, ctype = generate_latest(agent.metrics.registry), "text/plain; version=0.0.4"
            elif self.path in ("/healthz", "/readyz"):
                body, ctype = b"ok\n", "text/plain"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def bind(path: str, agent: Agent) -> _SocketServer:
    """Listen on `path` (mode 0600, parent 0700), replacing a stale socket from a dead agent."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    if os.path.exists(path):
        os.unlink(path)
    old_umask = os.umask(0o177)
    try:
        server = _SocketServer(path, agent)
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipam-agent", description="whereabouts-py node agent")
    parser.add_argument(
        "--socket", default=DEFAULT_SOCKET, help=f"unix socket to serve (default {DEFAULT_SOCKET})"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9733, help="localhost port for /metrics and /healthz (0: off)"
    )
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    log.configure(level=args.log_level)
    agent = Agent()
    server = bind(args.socket, agent)
    health = _health_server(agent, args.metrics_port) if args.metrics_port else None

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("agent.listening", socket=args.socket, metrics_port=args.metrics_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if os.path.exists(args.socket):
            os.unlink(args.socket)
        if health is not None:
            health.shutdown()
        agent.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
