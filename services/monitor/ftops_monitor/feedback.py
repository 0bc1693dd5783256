"""Which version answered a request: the index that lets a user's feedback, given by
request id, count for the right (alias, version, arm), and which score of a request holds.
Bounded in age and in size.

Scores reach every monitor replica as ``metrics.feedback`` events, in whatever order and
possibly more than once. The score that holds for a request is the one with the greatest
(given at, event id): the latest given replaces the earlier ones, as a second
``SubmitFeedback`` always has, and every replica ends up with the same one."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Served:
    alias: str
    version_id: str
    arm: str
    release_id: str
    at: float  # when the request finished (wall clock seconds)


@dataclass(frozen=True, slots=True)
class Given:
    """A score and what orders it against the request's other scores."""

    at: float  # when it was given (the event's occurred_at)
    event_id: str
    score: float

    def supersedes(self, other: Given) -> bool:
        return (self.at, self.event_id) > (other.at, other.event_id)


class RequestIndex:
    """Request id -> where it was served, for the last ``max_age_s`` seconds and at most
    ``max_items`` requests (oldest forgotten first), plus the scores given so far."""

    def __init__(self, *, max_age_s: float = 3600.0, max_items: int = 200_000) -> None:
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._scores: dict[str, Given] = {}

    def add(self, request_id: str, served: Served, *, answered: bool = False) -> None:
        """Remembers where a request was served. A request can have two results (the
        candidate failed, the stable version answered): ``answered`` marks the one whose
        answer the user got, which wins whatever the order they arrive in."""
        if not request_id:
            return
        if request_id in self._served:
            if answered:
                self._served[request_id] = served  # keeps its place in the age order
            return
        self._served[request_id] = served
        while len(self._served) > self.max_items:
            old, _ = self._served.popitem(last=False)
            self._scores.pop(old, None)

    def prune(self, now: float) -> None:
        cutoff = now - self.max_age_s
        while self._served:
            request_id, first = next(iter(self._served.items()))
            if first.at >= cutoff:
                break
            self._served.popitem(last=False)
            self._scores.pop(request_id, None)

    def get(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def held(self, request_id: str) -> Given | None:
        """The request's score that holds, if it has one."""
        return self._scores.get(request_id)

    def record(self, request_id: str, served: Served, given: Given) -> bool:
        """Records ``given`` unless the request holds the same or a later score (a
        redelivered event, or an earlier score arriving late): True when it now holds. A
        request not known here (its result has not arrived yet) is remembered as
        ``served`` says."""
        if not request_id:
            return False
        held = self._scores.get(request_id)
        if held is not None and not given.supersedes(held):
            return False
        self.add(request_id, served)
        if request_id not in self._served:  # max_items of 0: nothing is kept
            return True
        self._scores[request_id] = given
        return True

    def __len__(self) -> int:
        return len(self._served)
