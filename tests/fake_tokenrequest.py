"""A TLS server answering the Kubernetes TokenRequest API the way kube-apiserver does, for the
installer's tests that need no real API server: it records each request's bearer token and body, and
mints JWT-shaped (unsigned) tokens whose lifetime the test chooses."""

from __future__ import annotations

import base64
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

TOKEN_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/serviceaccounts/([^/]+)/token$")


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), as (cert, key)."""
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class Minted:
    namespace: str
    service_account: str
    bearer: str
    body: dict[str, Any]
    token: str


@dataclass
class FakeTokenAPI:
    url: str
    ca: bytes
    #: the bearer tokens accepted (the installer pod's own token); others get 401
    accepted: set[str] = field(default_factory=set)
    #: seconds the minted token lives; None: what the request asked for
    grant_seconds: float | None = None
    #: answer every request with this status instead (e.g. 403)
    fail_status: int | None = None
    minted: list[Minted] = field(default_factory=list)
    #: minted tokens the server now refuses (their ServiceAccount was recreated)
    revoked: set[str] = field(default_factory=set)
    reviews: int = 0
    #: the bearer token of every GET, in order
    bearers: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mint(self, namespace: str, account: str, bearer: str, body: dict[str, Any]) -> dict[str, Any]:
        iat = int(time.time())
        lifetime = self.grant_seconds or body["spec"]["expirationSeconds"]
        exp = int(iat + lifetime)
        with self.lock:
            serial = len(self.minted) + 1
            claims = {
                "sub": f"system:serviceaccount:{namespace}:{account}",
                "iat": iat,
                "exp": exp,
                "n": serial,
            }
            token = ".".join((_b64(b'{"alg":"none"}'), _b64(json.dumps(claims).encode()), _b64(b"sig")))
            self.minted.append(Minted(namespace, account, bearer, body, token))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "spec": body["spec"],
            "status": {"token": token, "expirationTimestamp": stamp},
        }


def serve(directory: Path) -> Iterator[FakeTokenAPI]:
    cert, key = make_cert(directory)
    api: FakeTokenAPI

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def reply(self, status: int, doc: dict[str, Any]) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            """Any list (e.g. the plugin's STATUS check on IPPools): empty, recording who asked."""
            api.bearers.append(self.headers.get("Authorization", "").removeprefix("Bearer "))
            self.reply(200, {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": []})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
            match = TOKEN_PATH.match(self.path)
            if self.path == "/apis/authentication.k8s.io/v1/selfsubjectreviews":
                valid = {m.token for m in api.minted} - api.revoked
                api.reviews += 1
                self.reply(201 if bearer in valid else 401, {"kind": "SelfSubjectReview", "status": {}})
            elif api.fail_status is not None:
                self.reply(api.fail_status, {"kind": "Status", "message": "refused by the test"})
            elif bearer not in api.accepted:
                self.reply(401, {"kind": "Status", "message": "Unauthorized"})
            elif match is None or body.get("kind") != "TokenRequest":
                self.reply(404, {"kind": "Status", "message": "not found"})
            else:
                self.reply(201, api.mint(match.group(1), match.group(2), bearer, body))

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    api = FakeTokenAPI(f"https://127.0.0.1:{server.server_address[1]}", cert.read_bytes())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
