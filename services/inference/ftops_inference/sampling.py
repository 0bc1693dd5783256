"""Sampling parameters: validation of what a request asks for, next-token selection, and
the text bookkeeping (stop strings, streamed deltas) shared by every backend."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch

from ftops.common.v1 import common_pb2
from ftops_runtime.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


class FinishReason(Enum):
    LENGTH = common_pb2.FINISH_REASON_LENGTH
    STOP = common_pb2.FINISH_REASON_STOP
    EOS = common_pb2.FINISH_REASON_EOS
    # The caller went away; never reaches a client, only logs.
    CANCELLED = common_pb2.FINISH_REASON_UNSPECIFIED

    @property
    def proto(self) -> common_pb2.FinishReason.ValueType:
        return common_pb2.FinishReason.ValueType(self.value)


@dataclass(frozen=True)
class SamplingConfig:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_from_proto(
    params: common_pb2.SamplingParams, *, default_max_tokens: int, max_new_tokens_limit: int
) -> SamplingConfig:
    """Check a request's sampling parameters; raise InvalidArgument saying what is wrong."""
    max_tokens = params.max_tokens or min(default_max_tokens, max_new_tokens_limit)
    if max_tokens > max_new_tokens_limit:
        raise InvalidArgument(
            f"sampling.max_tokens={params.max_tokens} exceeds this server's limit of "
            f"{max_new_tokens_limit}"
        )
    temperature = float(params.temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be >= 0, got {params.temperature}")
    top_p = float(params.top_p)
    if not math.isfinite(top_p) or top_p < 0 or top_p > 1:
        raise InvalidArgument(f"sampling.top_p must be within [0, 1], got {params.top_p}")
    stop = tuple(params.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for s in stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop strings must have 1..{MAX_STOP_CHARS} characters")
    return SamplingConfig(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p if 0 < top_p < 1 else 1.0,
        top_k=int(params.top_k),
        stop=stop,
        seed=int(params.seed) if params.HasField("seed") else None,
    )


def next_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator) -> int:
    """Pick the next token from one row of logits (shape [vocab])."""
    if cfg.greedy:
        return int(torch.argmax(logits).item())
    scores = logits.float() / cfg.temperature
    if 0 < cfg.top_k < scores.shape[-1]:
        kth = torch.topk(scores, cfg.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if cfg.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them reaches top_p; the best token always stays.
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) >= cfg.top_p
        sorted_scores = sorted_scores.masked_fill(drop, -math.inf)
        scores = torch.full_like(scores, -math.inf).scatter(0, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


class TextTracker:
    """Turns the decoded text so far into deltas that are safe to stream.

    Text that might still become a stop string, or an incomplete multi-byte character, is
    held back, so the concatenation of deltas always equals the final text.
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self._stop = stop
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, decoded: str) -> str:
        """Feed the full decoded completion so far; returns the new safe delta."""
        if self.stopped:
            return ""
        cut = self._find_stop(decoded)
        if cut is not None:
            self.text = decoded[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        self.text = decoded
        safe = len(decoded) - self._held_back(decoded)
        return self._emit(safe)

    def finish(self) -> str:
        """Flush what was held back (generation ended without a stop string)."""
        if self.text.endswith("\ufffd") and not self.stopped:
            self.text = self.text.rstrip("\ufffd")
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted : upto]
        self.emitted = upto
        return delta

    def _find_stop(self, decoded: str) -> int | None:
        # Stop strings can only newly appear in the tail that was not fully checked before.
        start = max(0, self.emitted - MAX_STOP_CHARS)
        hits = [i for s in self._stop if (i := decoded.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _held_back(self, decoded: str) -> int:
        if decoded.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its rest
            return len(decoded) - len(decoded.rstrip("\ufffd"))
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(decoded)), 0, -1):
                if decoded.endswith(s[:n]):
                    longest = max(longest, n)
                    break
        return longest
