"""CNI error codes and the one exception type every layer raises for a reportable failure.

Codes 1-99 are the CNI specification's; 100 and up are ours.
"""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
PLUGIN_NOT_AVAILABLE = 50
PLUGIN_LIMITED_RESOURCES = 51

POOL_EXHAUSTED = 100
DATASTORE_CORRUPT = 101
LEASE_NOT_FOUND = 102
DATASTORE_ERROR = 103
ADDRESS_TAKEN = 104  # a requested or static address another attachment holds


MAX_SHOWN = 256


def shown(value: object) -> str:
    """`repr(value)` for an error message, cut to about MAX_SHOWN characters: a tenant's value (a NAD,
    a pod's annotation) goes into the runtime's answer, pod events and the node's log."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else text[: MAX_SHOWN - 16] + f"... ({len(text)} characters)"


class CNIError(Exception):
    """A failure that is reported to the runtime as CNI error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __str__(self) -> str:
        return f"{self.msg}: {self.details}" if self.details else self.msg


class ConflictError(Exception):
    """The pool changed since it was read (resourceVersion mismatch); re-read and retry."""


class TransientStoreError(Exception):
    """The datastore failed in a way worth retrying (5xx, 429, connection reset)."""

    def __init__(self, msg: str, retry_after: float | None = None) -> None:
        super().__init__(msg)
        self.retry_after = retry_after


class PoolRetiredError(CNIError):
    """A slice pool that must not take a lease: reclaim is returning its slice (`absent` False), or
    it does not exist and only a node holding its slice may create it (`absent` True)."""

    def __init__(self, name: str, absent: bool = False) -> None:
        why = "does not exist yet" if absent else "is being returned by reclaim"
        super().__init__(TRY_AGAIN_LATER, f"slice pool {name} {why}")
        self.name = name
        self.absent = absent


class RangeTakenError(CNIError):
    """A pool or reservation by this network's name records another network's range or address
    (two (network_name, range) pairs map to one name): never written for this network."""

    def __init__(self, msg: str) -> None:
        super().__init__(DATASTORE_ERROR, msg)
