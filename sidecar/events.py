"""Structured agent events: routing by a reserved key, and token usage recognised in known shapes.

Every stdout line stays in the output stream as it was written; an event found in a line is
sent *in addition* to its own channel. Pure functions, tested without Redis.

Convention (documented in docs/PROTOCOL.md): a JSON object line with the reserved key
``"sidecar_event"``:

    {"sidecar_event": "status", "state": "planning", ...}        -> status message "agent"
    {"sidecar_event": "tokens", "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.01}

Recognised without any convention (each report counted once, from the line that carries it):

- Claude Code ``--output-format stream-json`` final event: ``{"type": "result", "usage":
  {"input_tokens": N, "output_tokens": M, ...}, "total_cost_usd": X}``. The per-message usage
  of ``assistant`` events is not counted: the result carries the run's total.
- OpenAI-style ``"usage": {"prompt_tokens": N, "completion_tokens": M}`` at the top level of
  an object (chat completions, responses logged by an agent).
"""

from __future__ import annotations

from agent_wrapper.values import Frozen

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

RESERVED_KEY = "sidecar_event"
TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class TokenReport(Frozen):
    source: str  # sidecar_event | claude_result | openai_usage
    counts: dict[str, int]  # input_tokens, output_tokens, and cache fields when known
    cost_usd: float | None
    model: str | None
    ignored: tuple[str, ...]  # fields present but not usable (see _int, _cost): left out
    __slots__ = tuple(__annotations__)
    _defaults = {"ignored": ()}


class UnusableReport(Frozen):
    """A token report none of whose counts is usable: nothing is counted."""
    source: str
    ignored: tuple[str, ...]
    __slots__ = tuple(__annotations__)


class AgentStatus(Frozen):
    state: str
    metadata: dict[str, Any]
    __slots__ = tuple(__annotations__)


Event = TokenReport | UnusableReport | AgentStatus


# Counts are added up in Redis with HINCRBY, whose range is a signed 64-bit integer; a
# single report is accepted up to 2^53 (exact in a JSON double), anything else is ignored.
MAX_COUNT = 1 << 53
MAX_COST_USD = 1e12


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int) and 0 <= v <= MAX_COUNT:
        return v
    if isinstance(v, float) and 0 <= v <= MAX_COUNT and v.is_integer():
        return int(v)
    return None


def _cost(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= MAX_COST_USD:
        return None
    return float(v)


def _report(source: str, usage: dict[str, Any], mapping: dict[str, str], obj: dict[str, Any],
            cost_field: str | None) -> TokenReport | UnusableReport | None:
    """The counts of ``usage`` named by ``mapping`` (source field -> counted field) that are
    usable, the cost and model of ``obj``; the fields present but unusable are named."""
    counts: dict[str, int] = {}
    ignored: list[str] = []
    for src, dst in mapping.items():
        v = usage.get(src)
        n = _int(v)
        if n is not None:
            counts[dst] = n
        elif v is not None:
            ignored.append(src)
    if not counts:
        return UnusableReport(source, tuple(ignored)) if ignored else None
    cost = None
    if cost_field is not None and obj.get(cost_field) is not None:
        cost = _cost(obj[cost_field])
        if cost is None:
            ignored.append(cost_field)
    model = obj.get("model")
    return TokenReport(source, counts, cost, model[:200] if isinstance(model, str) else None, tuple(ignored))


def classify(obj: dict[str, Any]) -> Event | None:
    """The event a stdout JSON object carries, if any."""
    kind = obj.get(RESERVED_KEY)
    if kind is not None:
        if kind == "tokens":
            return _report("sidecar_event", obj, {f: f for f in TOKEN_FIELDS}, obj, "cost_usd")
        if kind == "status":
            state = obj.get("state")
            if not isinstance(state, str) or not state:
                return None
            meta = {k: v for k, v in obj.items() if k not in (RESERVED_KEY, "state")}
            return AgentStatus(state[:200], meta)
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    if obj.get("type") == "result":
        return _report("claude_result", usage, {f: f for f in TOKEN_FIELDS}, obj, "total_cost_usd")
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return _report("openai_usage", usage, {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"},
                       obj, None)
    return None
