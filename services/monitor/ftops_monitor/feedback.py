"""Which version answered a request: the index that lets a user's feedback, given by
request id, count for the right (alias, version, arm). Bounded in age and in size."""

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


@dataclass(frozen=True)
class Feedback:
    served: Served
    score: float
    replaced: bool


class RequestIndex:
    """Request id -> where it was served, for the last ``max_age_s`` seconds and at most
    ``max_items`` requests (oldest forgotten first), plus the scores given so far."""

    def __init__(self, *, max_age_s: float = 3600.0, max_items: int = 200_000) -> None:
        self.max_age_s = max_age_s
        self.max_items = max_items
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._scores: dict[str, float] = {}

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

    def score(self, request_id: str, score: float) -> Feedback | None:
        """Records a score (replacing an earlier one); None for an unknown request."""
        served = self._served.get(request_id)
        if served is None:
            return None
        replaced = request_id in self._scores
        self._scores[request_id] = score
        return Feedback(served, score, replaced)

    def __len__(self) -> int:
        return len(self._served)
