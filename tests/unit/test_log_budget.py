"""log.Budget: a flood is reported up to a limit per window, with one warning when it is passed."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar import log


def test_budget_allows_the_limit_per_window_and_warns_once(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    told: list[str] = []
    monkeypatch.setattr(log.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(log, "warning", lambda msg, **_f: told.append(msg))
    budget = log.Budget("too many", limit=3, window_s=60)
    assert [budget.take() for _ in range(6)] == [True, True, True, False, False, False]
    assert told == ["too many"]
    now[0] += 59
    assert not budget.take()  # the same window
    now[0] += 2
    assert [budget.take() for _ in range(4)] == [True, True, True, False]
    assert told == ["too many", "too many"]


def test_budget_warning_goes_to_stderr(capfd: Any) -> None:
    budget = log.Budget("over budget", limit=1)
    assert budget.take() and not budget.take() and not budget.take()
    assert capfd.readouterr().err.count("WARNING over budget") == 1
