"""Masking secrets in the agent's output before it is echoed or published.

Masked as ``[REDACTED]``: the values (8 characters or more) of the agent's environment
variables whose names end in KEY, TOKEN, SECRET, PASSWORD or CREDENTIALS (any case);
well-known token shapes; and the user's own patterns. Works on bytes (the output may be
any bytes), with one compiled alternation.

A secret can straddle two reads of the pipe. The filter therefore holds back the end of a
chunk that could be the beginning of a secret — at most ``max_token`` bytes, never past a
line end (secrets contain no CR or LF), and only as much as could still become a match:
the trailing run of token characters, a suffix that begins an environment secret, or, when
user patterns are set, the unfinished line. What is held back goes out with the next read
or when the pipe closes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

MASK = b"[REDACTED]"
SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIALS")
MIN_VALUE_LEN = 8

# Token shapes, each long enough that ordinary words do not match.
TOKEN_PATTERNS: tuple[bytes, ...] = (
    rb"sk-ant-[A-Za-z0-9_\-]{20,}",  # Anthropic
    rb"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",  # OpenAI
    rb"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    rb"github_pat_[A-Za-z0-9_]{30,}",  # GitHub fine-grained tokens
    rb"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key ids
    rb"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
)
# Every token shape begins with one of these: when none occurs in a chunk (nearly always),
# the regular expression need not run at all.
TOKEN_PREFIXES: tuple[bytes, ...] = (b"sk-", b"ghp_", b"gho_", b"ghu_", b"ghs_", b"ghr_", b"github_pat_", b"AKIA",
                                     b"ASIA", b"xox")
_TOKEN_CHARS = re.compile(rb"[A-Za-z0-9_\-]*\Z")


def secret_values(env: Mapping[str, str], min_len: int = MIN_VALUE_LEN) -> list[bytes]:
    values = {v.encode() for k, v in env.items() if k.upper().endswith(SUFFIXES) and len(v) >= min_len}
    return sorted(values, key=len, reverse=True)  # longest first: a value containing another wins


class Redactor:
    """``filter(stream, chunk, final)`` for agent_wrapper.pipes.PipeReader, one state per stream."""

    def __init__(self, env: Mapping[str, str], extra_patterns: Sequence[str] = (), *,
                 min_len: int = MIN_VALUE_LEN, max_token: int = 512) -> None:
        self.values = secret_values(env, min_len)
        self.user_patterns = bool(extra_patterns)
        # Token shapes only where a token can begin: not inside a word ("risk-assessment-...").
        shapes = [rb"(?<![A-Za-z0-9])" + p for p in TOKEN_PATTERNS]
        parts = [re.escape(v) for v in self.values] + shapes + [p.encode() for p in extra_patterns]
        self.rx = re.compile(b"|".join(b"(?:" + p + b")" for p in parts))
        self.max_token = max_token
        self.literals = (*TOKEN_PREFIXES, *self.values)
        self._held: dict[str, bytes] = {}
        self.masked = 0

    def __call__(self, stream: str, chunk: bytes, final: bool) -> bytes:
        held = self._held.pop(stream, b"")
        data = held + chunk if held else chunk
        if not data:
            return b""
        end = len(data) if final else len(data) - self._holdback(data)
        if not self.user_patterns and not any(lit in data for lit in self.literals):
            if end < len(data):
                self._held[stream] = data[end:]
            return data[:end] if end < len(data) else data
        out: list[bytes] = []
        pos = 0
        for m in self.rx.finditer(data):
            if m.start() >= end:
                break  # may still grow: decide with the next chunk
            out.append(data[pos : m.start()])
            out.append(MASK)
            self.masked += 1
            pos = m.end()
        release = max(end, pos)
        out.append(data[pos:release])
        if release < len(data):
            self._held[stream] = data[release:]
        return b"".join(out)

    def _holdback(self, data: bytes) -> int:
        """How many trailing bytes could be the start of a secret."""
        line_start = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        tail = data[max(line_start, len(data) - self.max_token) :]
        if not tail:
            return 0
        if self.user_patterns:
            return len(tail)
        m = _TOKEN_CHARS.search(tail)
        hold = len(tail) - m.start() if m else 0
        for v in self.values:
            for k in range(min(len(v) - 1, len(tail)), hold, -1):
                if tail.endswith(v[:k]):
                    hold = k
                    break
        return hold


def from_settings(env: Mapping[str, str], patterns: Sequence[str], enabled: bool) -> Redactor | None:
    return Redactor(env, patterns) if enabled else None
