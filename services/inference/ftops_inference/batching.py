"""Continuous batching on one model thread.

Requests for different adapters (and the base) share each forward pass through PEFT's
mixed-batch inference (``adapter_names=``, one name per row, ``"__base__"`` for the base).
The batch keeps one KV cache with left padding: each row has its own attention mask and
position ids, so a padded row computes exactly what it would alone. New requests are
prefilled together and joined to the running batch between two decode steps; finished or
cancelled rows leave between steps too, so a slot is free again at the next step.

Adapters other than LoRA fit the same scheme through three questions the engine asks its
runtime: how many virtual columns a row's adapter puts before its prompt (prompt tuning's
input tokens, prefix tuning's cache entries: ``virtual_tokens``), which rows must be
prefilled apart (``prefill_group``), and which adapters need a batch to themselves
(``exclusive``: a partial fine-tune swaps layers' weights for the whole forward pass).

Everything that touches the model (forward passes, adapter attach/detach) runs on this
one thread, so an adapter can never change under a forward pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ftops_inference.backend import Chunk
from ftops_inference.busy import BusyMeter
from ftops_inference.sampling import FinishReason, SamplingConfig, TextTracker, next_token
from ftops_runtime.errors import Unavailable

log = logging.getLogger(__name__)

BASE_ADAPTER = "__base__"


# Hands a row's new text (or its failure) to the request's consumer, from the model thread.
Emit = Callable[[Chunk | BaseException], None]


@dataclass
class Row:
    prompt_ids: list[int]
    sampling: SamplingConfig
    adapter: str | None
    max_new: int
    emit: Emit
    cancel: threading.Event
    tracker: TextTracker
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)
    # Real (unpadded) tokens in the cache; also the position id of the next input token.
    length: int = 0
    next_input: int = 0

    @property
    def adapter_name(self) -> str:
        return self.adapter or BASE_ADAPTER


@dataclass
class _Call:
    fn: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]


class ModelRuntime:
    """What the engine needs of a model: one forward over a padded batch, the tokenizer."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: Any,
        adapter_names: list[str],
    ) -> tuple[torch.Tensor, Any]:
        """Logits of the last position of each row, and the updated cache."""
        raise NotImplementedError

    def decode(self, tokens: list[int]) -> str:
        raise NotImplementedError

    @property
    def eos(self) -> set[int]:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        raise NotImplementedError

    def virtual_tokens(self, adapter: str) -> tuple[int, int]:
        """Columns an adapter puts before a row's prompt: (input, cache). Prompt tuning's
        virtual tokens are input columns the prefill fills, prefix tuning's keys and values
        cache columns; both are positions 0..n-1 of the row, its prompt comes after."""
        return 0, 0

    def exclusive(self, adapter: str) -> str | None:
        """A key when the adapter's rows must have their batch to themselves (the batch
        then holds only rows of that key), None when they mix with any other row."""
        return None

    def prefill_group(self, adapter: str) -> str | None:
        """Rows of different groups are prefilled in separate forward passes."""
        return None


class BatchEngine:
    def __init__(
        self,
        runtime: ModelRuntime,
        *,
        device: torch.device,
        max_batch_size: int,
        max_batch_wait_s: float,
        probe_interval_s: float = 1.0,
    ) -> None:
        self._rt = runtime
        self._device = device
        self.max_batch_size = max_batch_size
        self._max_wait = max_batch_wait_s
        self._probe_interval = probe_interval_s
        self._cv = threading.Condition()
        self._pending: list[Row] = []
        self._calls: list[_Call] = []
        self._active: list[Row] = []
        self._past: Any = None
        self._mask: torch.Tensor | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        # Set after a failed forward pass until a probe pass succeeds again.
        self.crashed: str | None = None
        self._last_probe = 0.0
        self.busy = BusyMeter()

    # -- public, any thread ----------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="model", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def batch_size(self) -> int:
        return len(self._active)

    def submit(self, row: Row) -> None:
        if row.max_new <= 0:
            row.emit(Chunk("", 0, len(row.prompt_ids), FinishReason.LENGTH))
            return
        with self._cv:
            if self._closed:
                raise Unavailable("the model is shutting down")
            self._pending.append(row)
            self._cv.notify_all()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the model thread between two steps (adapter attach/detach)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, exc: BaseException | None) -> None:
            def settle() -> None:
                if future.done():
                    return
                if exc is not None:
                    future.set_exception(exc)
                else:
                    future.set_result(result)

            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(settle)

        with self._cv:
            if self._closed:
                raise Unavailable("the model is shutting down")
            self._calls.append(_Call(fn, done))
            self._cv.notify_all()
        return await future

    # -- the model thread ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._pending or self._calls or self._active or self._closed):
                    self._cv.wait(self._probe_interval if self.crashed else None)
                    if self.crashed and not (self._pending or self._calls):
                        break
                if self._closed:
                    self._fail_all(Unavailable("the model is shutting down"))
                    return
                calls, self._calls = self._calls, []
            started = time.monotonic()
            for call in calls:
                try:
                    call.done(call.fn(), None)
                except BaseException as exc:
                    call.done(None, exc)
            if self.crashed:
                self._try_recover()
                continue
            if not self._active and self._pending:
                self._gather()
            self._drop_cancelled()
            joining = self._take_pending()
            groups: dict[str | None, list[Row]] = {}
            for row in joining:
                groups.setdefault(self._rt.prefill_group(row.adapter_name), []).append(row)
            for group in groups.values():
                self._prefill(group)
            if self._active:
                self._decode()
            self.busy.add(started, time.monotonic())

    def _gather(self) -> None:
        """An idle engine waits up to max_batch_wait for a batch to fill."""
        deadline = time.monotonic() + self._max_wait
        with self._cv:
            while len(self._pending) < self.max_batch_size and not self._calls:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    break
                self._cv.wait(left)

    def _take_pending(self) -> list[Row]:
        with self._cv:
            room = self.max_batch_size - len(self._active)
            if room <= 0:
                return []
            # Joining a running batch needs cache surgery only plain dynamic caches allow.
            if self._active and not _mergeable(self._past):
                return []
            # Rows join in arrival order while they may share the batch: an adapter that
            # needs a batch to itself waits at the head until the running batch drains
            # (nothing joins it meanwhile), then has its turn; neither side starves.
            exclusive = self._rt.exclusive
            group = exclusive(self._active[0].adapter_name) if self._active else None
            rows: list[Row] = []
            taken = 0
            for r in self._pending:
                if len(rows) >= room:
                    break
                if not r.cancel.is_set():
                    key = exclusive(r.adapter_name)
                    if not rows and not self._active:
                        group = key
                    elif key != group:
                        break
                    rows.append(r)
                taken += 1
            self._pending = self._pending[taken:]
            return rows

    def _drop_cancelled(self) -> None:
        with self._cv:
            self._pending = [r for r in self._pending if not r.cancel.is_set()]
        keep = [i for i, r in enumerate(self._active) if not r.cancel.is_set()]
        if len(keep) != len(self._active):
            log.debug("%d rows cancelled", len(self._active) - len(keep))
            self._select(keep)

    def _prefill(self, rows: list[Row]) -> None:
        # Left padding; an adapter's virtual columns (``virtual_tokens``) right before its
        # prompt: input columns in ``ids``, cache columns ahead of them in the mask only.
        virtual = [self._rt.virtual_tokens(r.adapter_name) for r in rows]
        cached = max(c for _, c in virtual)
        width = max(v + len(r.prompt_ids) for r, (v, _) in zip(rows, virtual, strict=True))
        ids = torch.full((len(rows), width), self._rt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), cached + width), dtype=torch.long)
        for i, (r, (v, c)) in enumerate(zip(rows, virtual, strict=True)):
            n = len(r.prompt_ids)
            ids[i, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[i, cached + width - n - v :] = 1
            mask[i, cached - c : cached] = 1
            r.length = n + v + c
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, cached:]
        try:
            logits, past = self._rt.forward(
                ids, mask, positions, None, [r.adapter_name for r in rows]
            )
        except Exception as exc:
            # The model is suspect now: the running batch fails with the joining rows.
            active, self._active, self._past, self._mask = self._active, [], None, None
            self._crash(exc, rows + active)
            return
        finished = self._sample(rows, logits)
        if finished:
            # Rows done at their first token (max_tokens 1, warm-ups, EOS) never join the
            # running batch: joining and leaving would copy its whole cache twice.
            keep = [i for i in range(len(rows)) if i not in finished]
            if not keep:
                return
            rows = [rows[i] for i in keep]
            mask = _take_rows(past, mask, keep)
        self._merge(rows, past, mask)

    def _decode(self) -> None:
        rows = self._active
        assert self._mask is not None
        ids = torch.tensor([[r.next_input] for r in rows], dtype=torch.long, device=self._device)
        positions = torch.tensor([[r.length] for r in rows], dtype=torch.long, device=self._device)
        mask = torch.cat(
            [self._mask, torch.ones((len(rows), 1), dtype=torch.long, device=self._device)], dim=1
        )
        try:
            logits, past = self._rt.forward(
                ids, mask, positions, self._past, [r.adapter_name for r in rows]
            )
        except Exception as exc:
            # The shared cache may be half-updated: every row of the batch fails.
            active, self._active, self._past, self._mask = self._active, [], None, None
            self._crash(exc, active)
            return
        self._past, self._mask = past, mask
        for r in rows:
            r.length += 1
        finished = self._sample(rows, logits)
        if finished:
            self._select([i for i in range(len(rows)) if i not in finished])

    def _sample(self, rows: list[Row], logits: torch.Tensor) -> set[int]:
        """Next token of each row (logits row i is rows[i]); the indexes of finished rows."""
        finished: set[int] = set()
        for index, r in enumerate(rows):
            token = next_token(logits[index], r.sampling, r.generator)
            finish: FinishReason | None = None
            delta = ""
            if token in self._rt.eos:
                finish = FinishReason.EOS
            else:
                r.tokens.append(token)
                r.next_input = token
                delta = r.tracker.update(self._rt.decode(r.tokens))
                if r.tracker.stopped:
                    finish = FinishReason.STOP
                elif len(r.tokens) >= r.max_new:
                    finish = FinishReason.LENGTH
            if finish is not None:
                # The last chunk also carries what the tracker still held back.
                text = delta + r.tracker.finish()
                r.emit(Chunk(text, len(r.tokens), len(r.prompt_ids), finish))
                finished.add(index)
            elif delta:
                r.emit(Chunk(delta, len(r.tokens), len(r.prompt_ids)))
        return finished

    # -- cache surgery ---------------------------------------------------------------

    def _merge(self, rows: list[Row], past: Any, mask: torch.Tensor) -> None:
        if not self._active:
            self._active, self._past, self._mask = list(rows), past, mask
            return
        assert self._mask is not None
        width = max(self._mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self._mask.shape[1], width - mask.shape[1]
        for old, new in zip(self._past.layers, past.layers, strict=True):
            old.keys = torch.cat([_pad_left(old.keys, old_pad), _pad_left(new.keys, new_pad)])
            old.values = torch.cat([_pad_left(old.values, old_pad), _pad_left(new.values, new_pad)])
        self._mask = torch.cat([F.pad(self._mask, (old_pad, 0)), F.pad(mask, (new_pad, 0))])
        self._active.extend(rows)

    def _select(self, keep: list[int]) -> None:
        """Keep only these rows; drop the left columns no remaining row needs."""
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not self._active:
            self._past, self._mask = None, None
            return
        assert self._mask is not None
        self._mask = _take_rows(self._past, self._mask, keep)

    # -- failure ---------------------------------------------------------------------

    def _crash(self, exc: Exception, rows: list[Row]) -> None:
        log.error("forward pass failed for %d rows: %r", len(rows), exc)
        self.crashed = repr(exc)
        self._last_probe = time.monotonic()
        error = Unavailable(
            f"the model failed during generation ({exc!r}); retry on another replica"
        )
        for r in rows:
            r.emit(error)
        with self._cv:
            pending, self._pending = self._pending, []
        for r in pending:
            r.emit(error)

    def _try_recover(self) -> None:
        """After a crash: a one-token base pass every probe interval; success clears it."""
        with self._cv:
            pending, self._pending = self._pending, []
        for r in pending:
            r.emit(Unavailable(f"the model is recovering from a failure: {self.crashed}"))
        if time.monotonic() - self._last_probe < self._probe_interval:
            return
        self._last_probe = time.monotonic()
        ids = torch.tensor([[self._rt.pad_id]], dtype=torch.long, device=self._device)
        try:
            with torch.inference_mode():
                self._rt.forward(
                    ids, torch.ones_like(ids), torch.zeros_like(ids), None, [BASE_ADAPTER]
                )
        except Exception as exc:
            log.warning("model still failing: %r", exc)
            return
        log.info("model recovered after %s", self.crashed)
        self.crashed = None

    def _fail_all(self, exc: BaseException) -> None:
        rows = self._active + self._pending
        self._active, self._pending, self._past, self._mask = [], [], None, None
        for r in rows:
            r.emit(exc)
        for call in self._calls:
            call.done(None, exc)
        self._calls = []


def new_row(
    prompt_ids: list[int],
    sampling: SamplingConfig,
    adapter: str | None,
    *,
    max_new: int,
    emit: Emit,
    cancel: threading.Event,
    device: torch.device,
) -> Row:
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed if sampling.seed is not None else secrets.randbits(63))
    return Row(
        prompt_ids=prompt_ids,
        sampling=sampling,
        adapter=adapter,
        max_new=max_new,
        emit=emit,
        cancel=cancel,
        tracker=TextTracker(sampling.stop),
        generator=generator,
    )


def _take_rows(past: Any, mask: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Keep only these rows of a cache (in place) and its mask (returned), dropping the
    left columns no kept row needs."""
    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    mask = mask.index_select(0, index)
    if not _mergeable(past):
        # Caches with more state than keys/values (sliding windows, ...) select rows
        # themselves and keep their columns.
        past.batch_select_indices(index)
        return mask
    real = mask.any(dim=0).nonzero()
    start = int(real[0].item()) if real.numel() else 0
    for layer in past.layers:
        layer.keys = layer.keys.index_select(0, index)[:, :, start:]
        layer.values = layer.values.index_select(0, index)[:, :, start:]
    return mask[:, start:]


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    # [batch, heads, seq, dim]: pad the sequence axis on the left.
    return F.pad(t, (0, 0, n, 0)) if n else t


def _mergeable(past: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    layers = getattr(past, "layers", None)
    return layers is not None and all(type(layer) is DynamicLayer for layer in layers)
