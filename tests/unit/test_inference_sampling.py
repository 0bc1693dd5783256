"""Sampling parameter validation, token selection and streamed-text bookkeeping."""

from __future__ import annotations

import pytest
import torch

from ftops.common.v1 import common_pb2
from ftops_inference.sampling import SamplingConfig, TextTracker, next_token, sampling_from_proto
from ftops_runtime.errors import InvalidArgument


def parse(**fields: object) -> SamplingConfig:
    return sampling_from_proto(
        common_pb2.SamplingParams(**fields),  # type: ignore[arg-type]
        default_max_tokens=64,
        max_new_tokens_limit=512,
    )


def test_defaults_are_greedy_with_server_default_length() -> None:
    cfg = parse()
    assert cfg.max_tokens == 64
    assert cfg.greedy
    assert cfg.top_p == 1.0
    assert cfg.seed is None


def test_explicit_values_are_kept() -> None:
    cfg = parse(max_tokens=10, temperature=0.7, top_p=0.9, top_k=5, stop=["\n"], seed=3)
    assert (cfg.max_tokens, cfg.top_k, cfg.stop, cfg.seed) == (10, 5, ("\n",), 3)
    assert cfg.temperature == pytest.approx(0.7)
    assert cfg.top_p == pytest.approx(0.9)


def test_seed_zero_is_a_seed() -> None:
    assert parse(seed=0).seed == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 513}, "exceeds this server's limit of 512"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [""]}, "stop strings"),
        ({"stop": ["x"] * 17}, "at most 16 stop strings"),
    ],
)
def test_invalid_parameters_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse(**fields)


def test_greedy_picks_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.0, -1.0])
    assert next_token(logits, SamplingConfig(5), torch.Generator()) == 1


def test_top_k_one_is_greedy_even_when_sampling() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    cfg = SamplingConfig(5, temperature=5.0, top_k=1)
    picks = {next_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(20)}
    assert picks == {1}


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    cfg = SamplingConfig(5, temperature=1.0, top_p=0.8)
    picks = {next_token(logits, cfg, torch.Generator().manual_seed(s)) for s in range(200)}
    assert picks == {0, 1}


def test_same_seed_same_samples() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    cfg = SamplingConfig(5, temperature=1.0)

    def draw(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [next_token(logits, cfg, gen) for _ in range(10)]

    assert draw(4) == draw(4)
    assert draw(4) != draw(5)


def feed(tracker: TextTracker, pieces: list[str]) -> list[str]:
    text, deltas = "", []
    for piece in pieces:
        text += piece
        deltas.append(tracker.update(text))
        if tracker.stopped:
            break
    deltas.append(tracker.finish())
    return deltas


def test_stop_string_cuts_the_text_and_is_not_emitted() -> None:
    tracker = TextTracker(("END",))
    deltas = feed(tracker, ["Hello ", "wor", "ld E", "N", "D more"])
    assert tracker.stopped
    assert tracker.text == "Hello world "
    assert "".join(deltas) == "Hello world "


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    tracker = TextTracker(("END",))
    assert tracker.update("abc E") == "abc "
    assert tracker.update("abc EN") == ""
    assert tracker.update("abc ENx") == "ENx"
    assert not tracker.stopped


def test_incomplete_utf8_is_held_back() -> None:
    tracker = TextTracker(())
    assert tracker.update("caf\ufffd") == "caf"
    assert tracker.update("café") == "é"
    assert tracker.finish() == ""


def test_deltas_concatenate_to_the_text() -> None:
    tracker = TextTracker(("##",))
    deltas = feed(tracker, ["a#", "b", "#", "c#"])
    assert "".join(deltas) == tracker.text == "a#b#c#"
