"""A long-lived Kubernetes client follows the node kubeconfig's token as the installer renews it.

deploy/install.py mints the plugin's token with a lifetime and replaces the kubeconfig (by rename)
with a third of it left. A CNI call reads the file afresh; the node agent keeps one client for its
lifetime, so that client must pick the new token up before the old one expires.

`KubeconfigToken` is asked by the store's HTTP client (KubeClient) before each request.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable


class KubeconfigToken:
    """The inline bearer token the kubeconfig at `path` holds now: one stat per call, and a re-read
    only when the file was replaced. Only an inline `token` of the current context's user is taken
    (nothing is executed, no other file is read); an unreadable or tokenless replacement keeps the
    last good one. None until the file has been replaced once (the client keeps what it loaded)."""

    def __init__(self, path: str, read: Callable[[str], str | None] | None = None) -> None:
        self.path = path
        self.read = read or kubeconfig_token
        self._seen = _file_identity(path)
        self._token: str | None = None
        self._lock = threading.Lock()

    def current(self) -> str | None:
        identity = _file_identity(self.path)
        if identity is not None and identity != self._seen:
            with self._lock:
                if identity != self._seen:
                    try:
                        token = self.read(self.path)
                    except Exception:  # a replacement the loader refuses: keep the last good token
                        token = None
                    if token:
                        self._token = token
                    self._seen = identity
        return self._token


def kubeconfig_token(path: str) -> str | None:
    """The inline bearer token of the kubeconfig's current-context user; None when there is none."""
    import yaml

    try:
        with open(path, "rb") as f:
            doc = yaml.safe_load(f)
        context_name = doc["current-context"]
        context = next(c["context"] for c in doc["contexts"] if c["name"] == context_name)
        user = next(u["user"] for u in doc["users"] if u["name"] == context["user"])
        token = user.get("token")
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration, AttributeError):
        return None
    return token if isinstance(token, str) and token else None


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
