"""The node kubeconfig, read under the CNI path's policy: inline credentials only.

The plugin runs as root for every pod. A kubeconfig can make its reader run a command (`exec`,
`auth-provider`) or read any file (`tokenFile`, `client-certificate`, `client-key`,
`certificate-authority`), so on the CNI path (direct mode and the node agent) those are refused with
code 7; the installer writes inline data. The file itself must be a regular file owned by root (our
euid) and writable by nobody else (`flatfile.read_node_file`).

`load_node_kubeconfig(path)` returns `KubeCredentials`, everything a REST client needs:

    server                  https://host:port (or http://), no trailing slash
    namespace               the current context's namespace, or None
    ca_data                 PEM bytes of the cluster CA, or None (system trust store)
    client_cert_data        PEM bytes of the client certificate, or None
    client_key_data         PEM bytes of its key, or None (set exactly when client_cert_data is)
    token                   bearer token, or None
    insecure_skip_tls_verify  the cluster's insecure-skip-tls-verify
    tls_server_name         the cluster's tls-server-name, or None

Messages name `ipam.kubernetes.kubeconfig` and the path, never the file's content.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors
from .errors import CNIError
from .flatfile import NodeFileError, read_node_file

KEY = "ipam.kubernetes.kubeconfig"
# user and cluster fields that run a command or read a file named in the kubeconfig
REFUSED_USER_FIELDS = ("exec", "auth-provider", "tokenFile", "client-certificate", "client-key")
REFUSED_CLUSTER_FIELDS = ("certificate-authority",)


@dataclass(frozen=True)
class KubeCredentials:
    server: str
    namespace: str | None = None
    ca_data: bytes | None = field(default=None, repr=False)
    client_cert_data: bytes | None = field(default=None, repr=False)
    client_key_data: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    insecure_skip_tls_verify: bool = False
    tls_server_name: str | None = None


def _bad(path: str, reason: str) -> CNIError:
    return CNIError(errors.INVALID_CONFIG, f"invalid config: {KEY}: {path!r} {reason}")


def _named(doc: Mapping[str, Any], section: str, name: Any, path: str) -> Mapping[str, Any]:
    entries = doc.get(section)
    if not isinstance(entries, list):
        raise _bad(path, f"has no {section} list")
    for entry in entries:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            body = entry.get(section[:-1])  # clusters[].cluster, users[].user, contexts[].context
            if not isinstance(body, Mapping):
                raise _bad(path, f"{section} entry {name!r} has no {section[:-1]} object")
            return body
    raise _bad(path, f"has no {section} entry named {name!r}")


def _pem(value: Any, path: str, what: str) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(path, f"{what} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(path, f"{what} is not valid base64") from None


def parse_kubeconfig(text: bytes, path: str, context: str | None = None) -> KubeCredentials:
    """Credentials of `context` (default: current-context) from kubeconfig `text`; pure."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise _bad(path, f"is not valid YAML{where}") from None
    if not isinstance(doc, Mapping):
        raise _bad(path, "is not a kubeconfig (not a YAML mapping)")
    name = context or doc.get("current-context")
    if not name:
        raise _bad(path, "has no current-context")
    ctx = _named(doc, "contexts", name, path)
    cluster = _named(doc, "clusters", ctx.get("cluster"), path)
    user: Mapping[str, Any] = _named(doc, "users", ctx.get("user"), path) if ctx.get("user") else {}
    for field_name in REFUSED_USER_FIELDS:
        if user.get(field_name):
            raise _bad(
                path,
                f"uses users[].user.{field_name}: the plugin runs as root and accepts only inline credentials "
                "(token, client-certificate-data, client-key-data)",
            )
    for key in REFUSED_CLUSTER_FIELDS:
        if cluster.get(key):
            raise _bad(path, f"uses clusters[].cluster.{key}: only certificate-authority-data is accepted")
    server = cluster.get("server")
    if not isinstance(server, str) or not server.startswith(("https://", "http://")):
        raise _bad(path, "has no https:// server for its current context")
    token = user.get("token")
    if token is not None and (not isinstance(token, str) or not token or "\n" in token):
        raise _bad(path, "has a token that is not a one-line string")
    cert = _pem(user.get("client-certificate-data"), path, "client-certificate-data")
    key_data = _pem(user.get("client-key-data"), path, "client-key-data")
    if (cert is None) != (key_data is None):
        raise _bad(path, "needs both client-certificate-data and client-key-data, or neither")
    namespace = ctx.get("namespace")
    tls_name = cluster.get("tls-server-name")
    return KubeCredentials(
        server=server.rstrip("/"),
        namespace=namespace if isinstance(namespace, str) and namespace else None,
        ca_data=_pem(cluster.get("certificate-authority-data"), path, "certificate-authority-data"),
        client_cert_data=cert,
        client_key_data=key_data,
        token=token,
        insecure_skip_tls_verify=cluster.get("insecure-skip-tls-verify") is True,
        tls_server_name=tls_name if isinstance(tls_name, str) and tls_name else None,
    )


def load_node_kubeconfig(path: str, context: str | None = None) -> KubeCredentials:
    """Read and validate the node kubeconfig at `path` (see the module docstring); code 7 otherwise."""
    try:
        text = read_node_file(path)
    except NodeFileError as exc:
        raise _bad(path, exc.reason) from None
    return parse_kubeconfig(text, path, context)
