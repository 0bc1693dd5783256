"""Monitor sliding windows and percentiles."""

from __future__ import annotations

import pytest

from ftops_monitor.windows import Sample, SlidingWindow, StatsBook, figures, percentile


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
