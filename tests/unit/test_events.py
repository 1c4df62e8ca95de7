"""Agent events: recognised shapes, bounds on what an agent may report, the variation hash fields."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.events import MAX_COUNT, AgentStatus, TokenReport, UnusableReport, classify
from sidecar.transport import status_hash_fields


def test_token_shapes_are_recognised() -> None:
    claude = classify({"type": "result", "usage": {"input_tokens": 10, "output_tokens": 3}, "total_cost_usd": 0.5})
    assert claude == TokenReport("claude_result", {"input_tokens": 10, "output_tokens": 3}, 0.5, None)
    openai = classify({"usage": {"prompt_tokens": 4, "completion_tokens": 2}, "model": "m"})
    assert openai == TokenReport("openai_usage", {"input_tokens": 4, "output_tokens": 2}, None, "m")
    own = classify({"sidecar_event": "tokens", "input_tokens": 7.0, "output_tokens": 1})
    assert own == TokenReport("sidecar_event", {"input_tokens": 7, "output_tokens": 1}, None, None)


@pytest.mark.parametrize("bad", [-1, 1e30, MAX_COUNT + 1, float("inf"), float("nan"), 1.5, True, "12", None, [1]])
def test_counts_outside_the_exact_range_are_ignored(bad: Any) -> None:
    ev = classify({"sidecar_event": "tokens", "input_tokens": bad, "output_tokens": 2})
    ignored = () if bad is None else ("input_tokens",)  # a null field is as good as absent
    assert ev == TokenReport("sidecar_event", {"output_tokens": 2}, None, None, ignored)


def test_a_report_with_no_usable_count_counts_nothing_and_names_the_fields() -> None:
    assert classify({"sidecar_event": "tokens", "input_tokens": 1e30, "output_tokens": "x"}) == \
        UnusableReport("sidecar_event", ("input_tokens", "output_tokens"))
    assert classify({"type": "result", "usage": {"input_tokens": -1}}) == UnusableReport("claude_result",
                                                                                         ("input_tokens",))
    assert classify({"sidecar_event": "tokens"}) is None
    assert classify({"type": "result", "usage": {"other": 1}}) is None


@pytest.mark.parametrize("bad", [-0.5, 1e13, float("inf"), float("nan"), True])
def test_unusable_costs_are_ignored(bad: Any) -> None:
    ev = classify({"sidecar_event": "tokens", "input_tokens": 1, "cost_usd": bad})
    assert isinstance(ev, TokenReport) and ev.cost_usd is None and ev.ignored == ("cost_usd",)


def test_long_model_names_and_states_are_cut() -> None:
    ev = classify({"sidecar_event": "tokens", "input_tokens": 1, "model": "m" * 5000})
    assert isinstance(ev, TokenReport) and ev.model == "m" * 200
    st = classify({"sidecar_event": "status", "state": "s" * 5000})
    assert isinstance(st, AgentStatus) and st.state == "s" * 200


def test_agent_status_metadata_cannot_overwrite_the_sidecars_fields() -> None:
    msg = {"status": "agent", "agent_id": "a", "timestamp": "t", "producer": "p",
           "metadata": {"state": "planning", "pid": 1, "exit_code": 0, "status": "exited", "signal": "SIGKILL"}}
    fields = status_hash_fields(msg)
    assert dict(zip(fields[::2], fields[1::2], strict=True)) == {
        "agent_id": "a", "updated_at": "t", "producer": "p", "agent_state": "planning"}
    running = status_hash_fields({"status": "running", "agent_id": "a", "timestamp": "t", "producer": "p",
                                  "metadata": {"pid": 42}})
    assert dict(zip(running[::2], running[1::2], strict=True))["pid"] == 42


def test_the_variation_hash_names_the_signal_of_a_cancelled_agent_that_was_killed() -> None:
    def fields(status: str, meta: dict[str, object]) -> dict[str, object]:
        out = status_hash_fields({"status": status, "agent_id": "a", "timestamp": "t", "producer": "p",
                                  "metadata": meta})
        return dict(zip(out[::2], out[1::2], strict=True))

    assert fields("cancelled", {"exit_code": 137, "signal": "SIGKILL"})["signal"] == "SIGKILL"
    assert fields("killed", {"exit_code": 143, "signal": "SIGTERM"})["signal"] == "SIGTERM"
    assert "signal" not in fields("cancelled", {"exit_code": 0})
    assert "started_at" not in fields("running", {"pid": 1, "resumed": True})
    assert fields("running", {"pid": 1})["started_at"] == "t"
