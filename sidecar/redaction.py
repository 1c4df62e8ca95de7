"""Masking secrets in the agent's output before it is echoed or published.

Masked as ``[REDACTED]``: the values (8 characters or more) of the agent's environment
variables whose names end in KEY, TOKEN, SECRET, PASSWORD or CREDENTIALS (any case);
well-known token shapes; and the user's own patterns. A value is also recognised as it
appears inside a JSON string (escaped), a URL (percent-encoded) or base64. Works on bytes (the
output may be any bytes), with one compiled alternation.

A secret can straddle two reads of the pipe. The filter therefore holds back the end of a
chunk that could be the beginning of a secret — at most ``max_token`` bytes, never past a
line end (secrets contain no CR or LF), and only as much as could still become a match:
the trailing run of token characters, a suffix that begins an environment secret, or, when
user patterns are set, the unfinished line. What is held back goes out with the next read,
after 1 s without one (a prompt must not wait for its newline), or when the pipe closes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

from ._native import speedups as _speedups

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

MASK = b"[REDACTED]"
# A match reaching the end of a chunk is held back whole, up to this size, until the next
# read, 1 s or a line end shows where it ends: a long token written in two parts is masked whole.
MAX_HELD_SECRET = 8 << 10
SUFFIXES = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASSPHRASE", "CREDENTIALS", "_PAT", "_PWD", "_DSN",
            "_AUTH")
_NUMBERED = re.compile(r"_?[0-9]+\Z")  # API_KEY_2, TOKEN2: the name without its number
# The password of a URL in any variable (DATABASE_URL=postgresql://app:...@db/app).
_URL_PASSWORD = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]*:([^/\s@]+)@")
MIN_VALUE_LEN = 8
MULTILINE_PART_LEN = 16
# A line of a multi-line secret that is a secret of its own: base64 (a PEM body line), long.
_KEY_MATERIAL = re.compile(rf"[A-Za-z0-9+/=_\-]{{{MULTILINE_PART_LEN},}}")

# Token shapes, each long enough that ordinary words do not match.
TOKEN_PATTERNS: tuple[bytes, ...] = (
    rb"sk-ant-[A-Za-z0-9_\-]{20,}",  # Anthropic
    rb"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}",  # OpenAI
    rb"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    rb"github_pat_[A-Za-z0-9_]{30,}",  # GitHub fine-grained tokens
    rb"(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Za-z])",  # AWS access key ids (exactly 20 characters)
    rb"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack
    rb"glpat-[A-Za-z0-9_\-]{20,}",  # GitLab personal access tokens
    rb"[rs]k_(?:live|test)_[A-Za-z0-9]{20,}",  # Stripe secret and restricted keys
    rb"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    rb"npm_[A-Za-z0-9]{36,}",  # npm
)
# Every token shape begins with one of these prefixes. Rather than scanning each chunk once
# per prefix, the chunk is folded (o, u, s, r, a, b -> p and S -> K; one byte for one byte,
# so positions stay) and scanned for the folded prefixes: gh[pousr]_ becomes ghp_,
# A[KS]IA becomes AKIA, xox[abprs]- becomes xpxp-. Only where a prefix occurs does the
# token expression run, anchored there.
_FOLD = bytes.maketrans(b"ousrabS", b"ppppppK")
RAW_PREFIXES: tuple[bytes, ...] = (b"sk-", b"github_pat_", b"glpat-", b"sk_live_", b"rk_live_", b"sk_test_",
                                   b"rk_test_", b"hf_", b"npm_")
FOLDED_PREFIXES: tuple[bytes, ...] = (b"ghp_", b"AKIA", b"xpxp-")
_TOKEN_CHARS = re.compile(rb"[A-Za-z0-9_\-]*\Z")
_TOKEN_START = (rb"(?:(?<![A-Za-z0-9])|(?<=\\[bfnrt])|(?<=\\u[0-9A-Fa-f]{4})|(?<=%[0-9A-Fa-f]{2}))")


def secret_values(env: Mapping[str, str], min_len: int = MIN_VALUE_LEN) -> list[bytes]:
    """The secret values, the forms they take inside a JSON string or a URL where those
    differ (a value with quotes, slashes, spaces or non-ASCII characters), and inside base64."""
    values: set[bytes] = set()
    for k, v in env.items():
        if "://" in v:
            for password in _URL_PASSWORD.findall(v):
                from urllib.parse import unquote  # only with a password to decode: it costs the start

                for form in {password, unquote(password)}:
                    if len(form) >= min_len:
                        values.update(_encodings(form))
        if _NUMBERED.sub("", k.upper()).endswith(SUFFIXES) and len(v) >= min_len:
            values.update(_encodings(v))
            # A multi-line value (a PEM key, a JSON credentials file) may be written a line at a
            # time or with CRLF line ends, and the filter never holds back past a line end:
            # each of its lines long enough to be secret material is a secret too.
            for line in v.splitlines():
                line = line.strip()
                if line != v and _KEY_MATERIAL.fullmatch(line):  # not a JSON or PEM header line
                    values.update(_encodings(line))
    return sorted(values, key=len, reverse=True)  # longest first: a value containing another wins


def _encodings(value: str) -> set[bytes]:
    import json
    from urllib.parse import quote, quote_plus

    raw = value.encode("utf-8", "surrogateescape")
    forms = {raw}
    for ascii_only in (True, False):
        escaped = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        forms.add(escaped.encode("utf-8", "surrogateescape"))
        forms.add(escaped.replace("/", "\\/").encode("utf-8", "surrogateescape"))
    forms.add(quote(raw, safe="").encode())
    forms.add(quote_plus(raw, safe="").encode())
    forms.update(base64_cores(raw))
    return forms


_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def base64_cores(raw: bytes) -> set[bytes]:
    """What base64 makes of ``raw`` wherever it sits in the encoded data (an Authorization:
    Basic header, a data: URL, a Kubernetes Secret): for each of the three offsets ``raw`` can
    have within a 3-byte group, the characters that depend on ``raw`` alone. The one to three
    characters at each end, which it shares with its neighbours, are not part of it (they
    stay in the output). In the standard alphabet and the URL-safe one (JWTs, URLs), which
    differ only where the encoding holds + or /."""
    import base64

    cores: set[bytes] = set()
    for offset in range(3):
        encoded = base64.b64encode(bytes(offset) + raw)
        first = (offset * 8 + 5) // 6  # characters that hold bits of the filler
        last = (offset + len(raw)) * 8 // 6  # characters made of known bits only
        core = encoded[first:last]
        cores.add(core)
        cores.add(core.translate(_URL_SAFE))
    return cores


class Redactor:
    """``filter(stream, chunk, final)`` for agent_wrapper.pipes.PipeReader, one state per stream."""

    def __init__(self, env: Mapping[str, str], extra_patterns: Sequence[str] = (), *,
                 min_len: int = MIN_VALUE_LEN, max_token: int = 512) -> None:
        self.values = tuple(secret_values(env, min_len))
        self._value_set = frozenset(self.values)
        self.user_patterns = bool(extra_patterns)
        # Token shapes only where a token can begin: not inside a word ("risk-assessment-..."),
        # but right after an escape that ends in a letter or digit: a JSON string's \n, \t or
        # \u0022 (a tool result in stream-json), a URL's %20 or %3D.
        shapes = [_TOKEN_START + p for p in TOKEN_PATTERNS]
        parts = [re.escape(v) for v in self.values] + shapes + [scoped(p) for p in extra_patterns]
        self.rx = re.compile(b"|".join(b"(?:" + p + b")" for p in parts))
        self.token_rx = re.compile(b"|".join(b"(?:" + p + b")" for p in shapes))
        self.max_token = max(max_token, max((len(v) for v in self.values), default=0))
        self._held: dict[str, bytes] = {}
        self.masked = 0

    def __call__(self, stream: str, chunk: bytes, final: bool) -> bytes:
        held = self._held.pop(stream, b"")
        data = held + chunk if held else chunk
        if not data:
            return b""
        end = len(data) if final else len(data) - self._holdback(data)
        if self.user_patterns or self._any_secret(data):
            matches: Iterable[re.Match[bytes]] = self.rx.finditer(data)
        else:
            starts = _token_starts(data)
            if not starts:
                if end < len(data):
                    self._held[stream] = data[end:]
                return data[:end] if end < len(data) else data
            matches = self._anchored(data, starts)
        out: list[bytes] = []
        pos = 0
        for m in matches:
            if m.start() >= end:
                break  # may still grow: decide with the next chunk
            if m.end() == m.start():
                continue  # a user pattern that matched nothing here
            if (not final and m.end() == len(data) and len(data) - m.start() <= MAX_HELD_SECRET
                    and m.group() not in self._value_set):
                end = m.start()  # a token reaching the end of the chunk may go on in the next one
                break  # (an environment value may not: it is masked and goes out now)
            out.append(data[pos : m.start()])
            out.append(MASK)
            self.masked += 1
            pos = m.end()
        release = max(end, pos)
        out.append(data[pos:release])
        if release < len(data):
            self._held[stream] = data[release:]
        return b"".join(out)

    def mask(self, data: bytes) -> bytes:
        """``data`` whole (no state, nothing held back) with every secret masked."""
        if not (self.user_patterns or self._any_secret(data) or _token_starts(data)):
            return data
        masked = self.rx.sub(lambda m: MASK if m.end() > m.start() else b"", data)
        self.masked += masked != data
        return masked

    def mask_value(self, value: Any) -> Any:
        """A JSON-like value (a status message's metadata) with secrets masked in every string,
        keys included: text the agent chose reaches Redis through it unescaped."""
        if isinstance(value, str):
            raw = value.encode("utf-8", "surrogatepass")
            masked = self.mask(raw)
            return value if masked is raw else masked.decode("utf-8", "surrogatepass")
        if isinstance(value, dict):
            return {self.mask_value(k): self.mask_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mask_value(v) for v in value]
        return value

    def _any_secret(self, data: bytes) -> bool:
        """Whether some form of some secret occurs in ``data`` (with the native module, one pass
        for all forms; without it, one scan per form)."""
        if not self.values:
            return False
        if _speedups is not None and type(data) is bytes:
            return _speedups.contains_any(data, self.values)  # type: ignore[no-any-return]
        return any(v in data for v in self.values)

    def _anchored(self, data: bytes, starts: list[int]) -> Iterator[re.Match[bytes]]:
        """Token matches beginning at the candidate positions, in order, not overlapping."""
        after = 0
        for p in starts:
            if p < after:
                continue
            m = self.token_rx.match(data, p)
            if m is not None:
                after = m.end()
                yield m

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
        if hold and hold < len(tail) and tail[-hold - 1] in b"\\%":
            # The run may be a token after an escape (\nsk-..., %3Dsk-...): its backslash or %
            # goes with it, or the look-behind would not see it in the next read.
            hold += 1
        for v in self.values:
            # The longest end of the tail, longer than ``hold``, that begins v (v itself would
            # have been found whole): tried only where v's first byte occurs.
            first = v[:1]
            end = len(tail) - hold
            p = tail.find(first, max(len(tail) - len(v) + 1, 0), end)
            while p >= 0:
                if v.startswith(tail[p:]):
                    hold = len(tail) - p
                    break
                p = tail.find(first, p + 1, end)
        return hold


_LEADING_FLAGS = re.compile(r"\(\?([aiLmsux]+)\)")


def scoped(pattern: str) -> bytes:
    """A user pattern ready to join the alternation: leading inline flags such as ``(?i)``
    apply to the whole pattern alone, so they become a scoped group ``(?i:...)``."""
    flags = ""
    while m := _LEADING_FLAGS.match(pattern):
        flags += m.group(1)
        pattern = pattern[m.end():]
    return (f"(?{flags}:{pattern})" if flags else pattern).encode()


def nested_repeat(pattern: bytes) -> bool:
    """Whether ``pattern`` holds an unbounded repeat inside a repeat that may run more than
    once, such as ``(\\w+\\s?)+``: the shape of regular expressions whose backtracking takes
    exponential time on a near miss, during which Python's ``re`` holds the interpreter (no
    other thread, no signal handler runs). Possessive repeats and atomic groups do not
    backtrack into themselves and pass."""
    from re import _constants as c
    from re import _parser

    def walk(items: Any, repeated: bool) -> bool:
        for op, av in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT):
                _low, high, body = av
                if repeated and high == c.MAXREPEAT:
                    return True
                if walk(body, repeated or high > 1):
                    return True
            elif op is c.SUBPATTERN:
                if walk(av[-1], repeated):
                    return True
            elif op is c.BRANCH:
                if any(walk(branch, repeated) for branch in av[1]):
                    return True
            elif op in (c.ASSERT, c.ASSERT_NOT):
                if walk(av[1], repeated):
                    return True
            elif op is c.GROUPREF_EXISTS:
                if any(walk(branch, repeated) for branch in av[1:] if branch is not None):
                    return True
        return False

    return walk(_parser.parse(pattern), False)


def check_patterns(patterns: Sequence[str]) -> str | None:
    """Why these user patterns cannot be used, or None."""
    for p in patterns:
        try:
            rx = re.compile(scoped(p))
        except (re.error, OverflowError, RecursionError, ValueError) as exc:  # a{99999999999}: OverflowError
            return f"{p!r}: {exc}"
        if rx.fullmatch(b"") is not None:
            return f"{p!r} matches the empty string"
        if nested_repeat(scoped(p)):
            return (f"{p!r} repeats a repeat, like (a+)+: on some output it takes exponential time, and "
                    "the sidecar would hang; write it without the nesting, or make the inner repeat possessive (a++)")
    try:
        Redactor({}, patterns)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        return f"{exc} (when the patterns are combined)"
    return None


def _token_starts(data: bytes) -> list[int]:
    """Sorted positions where a token prefix occurs."""
    if _speedups is not None:
        return _speedups.token_starts(data)  # type: ignore[no-any-return]
    return _token_starts_py(data)


def _token_starts_py(data: bytes) -> list[int]:
    found = [p for p in RAW_PREFIXES if p in data]
    folded = data.translate(_FOLD)
    found_folded = [p for p in FOLDED_PREFIXES if p in folded]
    if not found and not found_folded:
        return []
    starts: set[int] = set()
    for hay, prefixes in ((data, found), (folded, found_folded)):
        for prefix in prefixes:
            i = hay.find(prefix)
            while i >= 0:
                starts.add(i)
                i = hay.find(prefix, i + 1)
    return sorted(starts)


def from_settings(env: Mapping[str, str], patterns: Sequence[str], enabled: bool) -> Redactor | None:
    return Redactor(env, patterns) if enabled else None
