"""Alert rules: hold time, one event per transition, every rule kind."""

from __future__ import annotations

from ftops_monitor.alerts import FIRING, RESOLVED, AlertBook, AlertRules
from ftops_monitor.windows import Figures

KEY = ("bot", "ver_s")


def _f(**kw: float) -> Figures:
    base: dict[str, float] = {"requests": 100, "ok_requests": 100}
    base.update(kw)
    return Figures(**base)  # type: ignore[arg-type]


def test_fires_after_hold_time_and_resolves_once() -> None:
    book = AlertBook(AlertRules(error_rate_above=0.1, for_s=5))
    bad = {KEY: _f(error_rate=0.3, errors=30)}
    assert book.evaluate(bad, 0.0) == []
    assert book.evaluate(bad, 4.9) == []
    [fired] = book.evaluate(bad, 5.0)
    assert (fired.state, fired.alert.rule, fired.for_seconds) == (FIRING, "error_rate", 5.0)
    assert "30.0% above 10.0%" in fired.alert.message
    assert book.evaluate(bad, 6.0) == []  # once per transition
    assert [a.rule for a in book.active()] == ["error_rate"]
    [resolved] = book.evaluate({KEY: _f(error_rate=0.05)}, 7.0)
    assert resolved.state == RESOLVED
    assert book.active() == []
    assert book.evaluate({KEY: _f(error_rate=0.05)}, 8.0) == []


def test_a_blip_shorter_than_the_hold_never_fires() -> None:
    book = AlertBook(AlertRules(error_rate_above=0.1, for_s=5))
    book.evaluate({KEY: _f(error_rate=0.5)}, 0.0)
    assert book.evaluate({KEY: _f(error_rate=0.0)}, 2.0) == []
    assert book.evaluate({KEY: _f(error_rate=0.5)}, 3.0) == []
    assert book.evaluate({KEY: _f(error_rate=0.5)}, 7.0) == []  # the clock restarted at 3
    assert len(book.evaluate({KEY: _f(error_rate=0.5)}, 8.0)) == 1


def test_version_without_data_resolves_and_small_samples_do_not_hold() -> None:
    book = AlertBook(AlertRules(error_rate_above=0.1, for_s=0, min_requests=10))
    assert book.evaluate({KEY: _f(requests=5, error_rate=1.0)}, 0.0) == []
    assert len(book.evaluate({KEY: _f(error_rate=1.0)}, 1.0)) == 1
    [resolved] = book.evaluate({}, 2.0)  # the version left the window
    assert resolved.state == RESOLVED


def test_latency_and_feedback_rules() -> None:
    rules = AlertRules(
        error_rate_above=0, p99_latency_above_ms=500, feedback_below=0.5, for_s=0, min_feedback=5
    )
    book = AlertBook(rules)
    assert [r.name for r in book.rules] == ["latency_p99", "feedback"]
    fired = book.evaluate({KEY: _f(latency_p99_ms=900, feedback_count=10, feedback_mean=0.2)}, 0.0)
    assert sorted(t.alert.rule for t in fired) == ["feedback", "latency_p99"]
    assert {a.rule for a in book.active("bot")} == {"feedback", "latency_p99"}
    assert book.active("other") == []
    assert AlertBook(AlertRules(error_rate_above=0)).rules == []
