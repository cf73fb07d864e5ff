"""Datastores: where pools and reservations live. They do I/O and decide nothing."""

from __future__ import annotations

from .base import PoolSnapshot, Store

__all__ = ["PoolSnapshot", "Store"]
