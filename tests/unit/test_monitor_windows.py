"""Monitor sliding windows and percentiles."""

from __future__ import annotations

import pytest

from ftops_monitor.windows import (
    FeedbackScores,
    Sample,
    SlidingWindow,
    StatsBook,
    figures,
    percentile,
)


def test_percentile_interpolates() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 95) == pytest.approx(95.05)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) == 0.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_figures_count_errors_and_use_successes_for_latency() -> None:
    samples = [Sample(at=0, latency_ms=100, ok=True, ttft_ms=10, completion_tokens=20)] * 9 + [
        Sample(at=0, latency_ms=1, ok=False)
    ]
    f = figures(samples)
    assert (f.requests, f.errors, f.ok_requests) == (10, 1, 9)
    assert f.error_rate == pytest.approx(0.1)
    assert f.latency_p95_ms == pytest.approx(100)
    assert f.ttft_p50_ms == pytest.approx(10)
    # 180 tokens over 0.9 s of generation.
    assert f.tokens_per_second == pytest.approx(200)


def test_window_slides() -> None:
    window = SlidingWindow(10)
    for t in range(20):
        window.add(Sample(at=float(t), latency_ms=float(t), ok=True))
    f = window.figures(now=19.0)
    assert f.requests == 11  # t = 9..19
    assert window.figures(now=100.0).requests == 0


def test_stats_book_keys_per_alias_and_version() -> None:
    book = StatsBook(60)
    book.add("bot", "ver_a", Sample(at=1, latency_ms=5, ok=True))
    book.add("bot", "ver_b", Sample(at=1, latency_ms=5, ok=False))
    book.add("other", "ver_a", Sample(at=1, latency_ms=5, ok=True))
    assert book.keys("bot") == [("bot", "ver_a"), ("bot", "ver_b")]
    assert book.has_alias("other")
    assert not book.has_alias("nope")
    assert book.figures("bot", "ver_b", 2).errors == 1
    assert book.figures("bot", "ver_zzz", 2).requests == 0


def test_window_feedback_divergence_and_cache() -> None:
    window = SlidingWindow(10)
    window.add(Sample(at=1.0, latency_ms=10, ok=True, divergence=0.2))
    window.add(Sample(at=2.0, latency_ms=20, ok=True, divergence=0.4))
    window.add(Sample(at=3.0, latency_ms=30, ok=False))  # no divergence known
    window.add_feedback("r1", 1.0, at=2.0)
    window.add_feedback("r2", 0.0, at=2.0)
    f = window.figures(now=5.0)
    assert f.divergence_count == 2
    assert f.divergence_mean == pytest.approx(0.3)
    assert f.feedback_count == 2
    assert f.feedback_mean == pytest.approx(0.5)
    assert window.figures(now=5.0) is f  # unchanged window: cached
    window.add_feedback("r2", 1.0, at=4.0)  # replaces, keeps its place in time
    f = window.figures(now=5.0)
    assert f.feedback_count == 2
    assert f.feedback_mean == pytest.approx(1.0)
    assert window.figures(now=12.5).feedback_count == 0  # scores given at 2.0 slid out
    assert window.figures(now=12.5).requests == 1
    assert window.empty(now=20.0)


def test_feedback_scores_bounded() -> None:
    scores = FeedbackScores(max_items=3)
    for i in range(5):
        scores.put(f"r{i}", i / 10, at=float(i))
    assert scores.scores() == [0.2, 0.3, 0.4]
    assert scores.prune(cutoff=3.5)
    assert scores.scores() == [0.4]


def test_active_versions() -> None:
    book = StatsBook(10)
    book.add("bot", "ver_a", Sample(at=1, latency_ms=5, ok=True))
    book.add("bot", "ver_b", Sample(at=9, latency_ms=5, ok=True))
    book.add_feedback("bot", "ver_c", "r1", 0.5, at=9)
    assert book.active(now=12) == [("bot", "ver_b"), ("bot", "ver_c")]
