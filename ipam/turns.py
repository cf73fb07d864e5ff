"""Writer turns: nodes that keep refusing each other's writes of one shared pool take turns instead.

Every pool write is a PUT at the version read, so two nodes writing one IPPool at once cost the API
server two writes for one lease change: the second is refused (409) after the server has decoded and
validated the whole pool, and its node reads the pool again. Under a burst on one big pool most writes
are refused, and a node can lose for seconds on end while the others win. Once the node agent has
seen a write of a pool refused (`PoolCache.recently_contended`), it takes the pool's writer turn
before its next read-modify-write: a small WriterTurn object (crds/), created to take it and deleted
to hand it on. A node that finds the turn taken polls for it, its calls queuing into the batch
meanwhile, so that the writes go through one at a time, each carrying more leases. Node slices
claim under the NodeSlicePool's turn every time (ipam.nodeslices): claims are rare, and the nodes of
a burst on a new network all claim at once.

A turn is only a courtesy between writers: every write still carries its resourceVersion, so a writer
without the turn (the reconciler, a direct-mode call, a node whose cluster lacks the WriterTurn CRD,
an older plugin) is refused or refuses as before and nothing is ever lost or doubled. Hence the
failure rules: a turn that cannot be taken or read (no CRD or RBAC for it, a transient error) means
writing without one; a turn kept past its duration without changing hands (its holder died) is
deleted by a waiter, with a precondition on that very object; a waiter gives up waiting and writes
without the turn when half its remaining time has passed.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from random import Random

from .errors import CNIError, TransientStoreError
from .log import log
from .store.base import Turn, TurnStore, TurnsUnavailable

# How long a turn may stand unchanged before a waiter takes it for abandoned: one read-modify-write of
# a 1,000-lease pool takes ~0.1 s quiet and ~0.5 s on a saturated 2-core node.
TURN_SECONDS = 5
# A waiter polls about once per the pool's write time (PoolCache.write_seconds), within these bounds,
# and every POLL_UNKNOWN while this process has not yet written the pool.
POLL_MIN = 0.01
POLL_MAX = 0.5
POLL_UNKNOWN = 0.1


def holder_identity() -> str:
    """Who holds a turn, for an operator reading the WriterTurn: this host and process."""
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass
class TurnWaiter:
    store: TurnStore
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    rng: Random
    turn_seconds: float = TURN_SECONDS
    # the store refused turns (TurnsUnavailable): stop asking it for a while; `refused` is told at once
    # (PoolCache.turns_refused), so a body that then fails does not skip it
    unavailable: bool = False
    refused: Callable[[], None] | None = None
    # pool -> another writer's turn and since when this process sees it unchanged, kept across batches
    # (PoolCache.turns_seen): a waiter gives up after half its deadline, which may come before its own
    # sighting is turn_seconds old, so a dead holder's turn is found abandoned over several batches
    sightings: dict[str, tuple[Turn, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def held(self, pool: str, deadline: float, write_seconds: float) -> Iterator[bool]:
        """Hold `pool`'s writer turn for the body; yields whether another writer held it first.
        Without a turn (see the module's failure rules) the body runs all the same; a refusal sets
        `unavailable` and calls `refused`, before the body runs."""
        turn: Turn | None = None
        waited = False
        try:
            turn, waited = self._take(pool, deadline, write_seconds)
        except TurnsUnavailable as exc:
            self.unavailable = True
            log.warning("turn.unavailable", pool=pool, reason=str(exc))
            if self.refused is not None:
                self.refused()
        except (TransientStoreError, CNIError) as exc:
            log.debug("turn.not-taken", pool=pool, reason=str(exc))
        try:
            yield waited
        finally:
            if turn is not None:
                try:
                    self.store.end_turn(turn)
                except (TransientStoreError, CNIError, TurnsUnavailable) as exc:
                    # it stands until a waiter finds it unchanged for turn_seconds
                    log.warning("turn.not-ended", pool=pool, turn=turn.name, reason=str(exc))

    def _take(self, pool: str, deadline: float, write_seconds: float) -> tuple[Turn | None, bool]:
        started = self.clock()
        give_up = started + max(0.0, deadline - started) / 2
        poll = min(POLL_MAX, max(POLL_MIN, write_seconds)) if write_seconds > 0 else POLL_UNKNOWN
        holder = holder_identity()
        seen: Turn | None = None  # the other writer's turn, and since when it stands unchanged
        seen_since = started
        if (sighting := self.sightings.get(pool)) is not None:
            seen, seen_since = sighting
        waited = False
        retry_now = True  # one immediate retry after finding the turn handed on, then sleep
        while True:
            turn = self.store.take_turn(pool, holder, int(self.turn_seconds))
            if turn is not None:
                self.sightings.pop(pool, None)
                return turn, waited
            waited = True
            now = self.clock()
            if now - seen_since >= self.turn_seconds or seen is None:
                current = self.store.current_turn(pool)
                if current is None:
                    seen = None
                    self.sightings.pop(pool, None)
                    if retry_now:
                        retry_now = False
                        continue  # handed on between the two requests: take it now
                elif current == seen and now - seen_since >= self.turn_seconds:
                    log.warning(
                        "turn.abandoned", pool=pool, turn=current.name, seconds=round(now - seen_since, 1)
                    )
                    self.store.end_turn(current)
                    seen = None
                    self.sightings.pop(pool, None)
                    continue
                if current is not None and current != seen:
                    seen, seen_since = current, now
                    self.sightings[pool] = (current, now)
            if now + poll >= give_up:
                log.debug("turn.gave-up", pool=pool, waited=round(now - started, 3))
                return None, waited
            self.sleep(self.rng.uniform(poll / 2, poll))
            retry_now = True
