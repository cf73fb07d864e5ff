"""Open the datastore a config names; the kubernetes client is imported only when it is chosen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import errors
from ..errors import CNIError
from .base import Store

if TYPE_CHECKING:
    from ..config import Config


def open_store(cfg: Config) -> Store:
    if cfg.ipam.datastore == "file":
        from .file import FileStore

        return FileStore(cfg.ipam.data_dir)
    try:
        from .kubernetes import KubernetesStore
    except ImportError as exc:
        raise CNIError(
            errors.INVALID_CONFIG, "invalid config: ipam.datastore: 'kubernetes' is not available", str(exc)
        ) from None
    return KubernetesStore.from_config(cfg)
