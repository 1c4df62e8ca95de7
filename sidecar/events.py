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
    __slots__ = tuple(__annotations__)


class AgentStatus(Frozen):
    state: str
    metadata: dict[str, Any]
    __slots__ = tuple(__annotations__)


Event = TokenReport | AgentStatus


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


def _counts(usage: dict[str, Any], mapping: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for src, dst in mapping.items():
        n = _int(usage.get(src))
        if n is not None:
            out[dst] = n
    return out


def classify(obj: dict[str, Any]) -> Event | None:
    """The event a stdout JSON object carries, if any."""
    kind = obj.get(RESERVED_KEY)
    if kind is not None:
        if kind == "tokens":
            counts = _counts(obj, {f: f for f in TOKEN_FIELDS})
            if not counts:
                return None
            model = obj.get("model")
            return TokenReport("sidecar_event", counts, _cost(obj.get("cost_usd")),
                               model[:200] if isinstance(model, str) else None)
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
        counts = _counts(usage, {f: f for f in TOKEN_FIELDS})
        if counts:
            model = obj.get("model")
            return TokenReport("claude_result", counts, _cost(obj.get("total_cost_usd")),
                               model[:200] if isinstance(model, str) else None)
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        counts = _counts(usage, {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens"})
        if counts:
            model = obj.get("model")
            return TokenReport("openai_usage", counts, None, model[:200] if isinstance(model, str) else None)
    return None
