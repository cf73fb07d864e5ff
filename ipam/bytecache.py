"""A least-recently-used cache bounded by an estimate of its values' bytes, not by their number.

The node agent computes ranges from configs tenants write; one value can be small (a /24) or large (a
range with thousands of excludes), so a bound on entries bounds nothing. Thread-safe.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

V = TypeVar("V")
ENTRY_OVERHEAD = 200  # the key, the OrderedDict node, the size recorded


def _block(obj: object) -> int:
    return (sys.getsizeof(obj) + 15) & ~15  # the allocator hands out 16-byte blocks


def deep_size(items: Iterable[tuple[int, ...]]) -> int:
    """Bytes of a tuple of small tuples of ints (intervals): each tuple and each int counted."""
    total = 64
    for item in items:
        total += _block(item) + sum(_block(x) for x in item) + 8
    return total


class ByteLRU(Generic[V]):
    """`get`/`put` with at most `budget` bytes of values (as estimated by the caller) kept."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                return None
            self._items.move_to_end(key)
            return found[0]

    def put(self, key: Hashable, value: V, size: int) -> None:
        """Keep `value`, evicting the least recently used past the budget; a value bigger than the
        whole budget is not kept."""
        size += ENTRY_OVERHEAD
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.used -= old[1]
            if size > self.budget:
                return
            self._items[key] = (value, size)
            self.used += size
            while self.used > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.used -= dropped

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0

    def __len__(self) -> int:
        return len(self._items)
