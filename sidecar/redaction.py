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
from _thread import get_ident
from bisect import bisect_left
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
BEARER = rb"(?i:bearer)"  # an authentication scheme's name is case-insensitive (RFC 9110)
BEARER_TOKEN = rb"[A-Za-z0-9\-._~+/]{16,}=*"
BASIC_CREDENTIALS = rb"[A-Za-z0-9+/]{4,}={0,2}"
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
    rb"AIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])",  # Google API keys (exactly 39 characters)
    # JWTs: a JSON header and payload, base64url; the signature may still be on its way. Not
    # after - or _ either: in a run such as "-eyJ-eyJ-eyJ..." each try would read to the run's
    # end and fail, quadratic time.
    rb"(?<![_\-])eyJ[A-Za-z0-9_\-]{10,}\.eyJ[A-Za-z0-9_\-]{10,}(?:\.[A-Za-z0-9_\-]*)?",
    # an HTTP bearer token (RFC 6750; the scheme's name in any case): "Bearer " itself stays,
    # where it does not continue a word
    rb"(?:(?<![A-Za-z0-9_]" + BEARER + rb" )|(?<=\\[bfnrt]" + BEARER + rb" )|(?<=%[0-9A-Fa-f]{2}" + BEARER + rb" ))"
    rb"(?<=" + BEARER + rb" )" + BEARER_TOKEN,
    # HTTP basic credentials, base64 of user:password, in an (Proxy-)Authorization header (curl -v)
    rb"(?<=uthorization: Basic )" + BASIC_CREDENTIALS,
)
# A private key printed from a file (cat id_rsa) or inside a JSON string (a tool's result in
# an agent's event, its lines joined by \n escapes): after the BEGIN line, each line of key
# material becomes [REDACTED]; the BEGIN and END lines, PEM headers, blank lines, indentation
# and line ends stay, so the output keeps its lines. A line that is not key material ends the
# block (a BEGIN line quoted in prose masks nothing after it).
PEM_GROUP = "_sidecar_pem"
PEM_BEGIN = rb"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"
_PEM_BEGIN = re.compile(PEM_BEGIN)
_PEM_END = re.compile(rb"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_PEM_OPEN = re.compile(rb"[A-Z0-9 ]*-{0,4}\Z")  # what may follow -----BEGIN in a marker not yet whole
# A line end, as it is or escaped in JSON, once or more (a JSON document inside a JSON string).
_PEM_BREAK = re.compile(rb"\r\n|\n|\r|\\+r\\+n|\\+n|\\+r")
# What may come before a line of key material and stays: indentation (tabs escaped or not), a
# line number as cat -n or an agent's file-reading tool print it (a tab, an arrow, ":" or
# "|" after it), a diff's - or a quote's >. (Not a diff's +, which a line of base64 may begin
# with: an added line is masked with its +.)
_SPACE = rb"(?:[ \t]|\\+t)"
_PEM_PREFIX = (_SPACE + rb"*(?:[0-9]+(?:\t|\\+t|\xe2\x86\x92|\\+u2192|:|\|)" + _SPACE + rb"*)?(?:[->] ?)?")
_PEM_PREFIX_RX = re.compile(_PEM_PREFIX)
_PEM_END_PREFIX = re.compile(_PEM_PREFIX + rb"\+? ?")  # before an END line, a diff's + is one
# PEM and OpenPGP armor headers (Proc-Type: 4,ENCRYPTED), before the key material
_PEM_HEADER_NAMES = (b"Proc-Type:", b"DEK-Info:", b"Comment:", b"Version:", b"Hash:", b"Charset:")
_PEM_HEADER = re.compile(_PEM_PREFIX + rb"(?:Proc-Type|DEK-Info|Comment|Version|Hash|Charset):[ \t]*[ -~]*")
_KEY_CHAR = rb"(?:[A-Za-z0-9+/=]|\\+/)"  # base64, a / escaped in JSON as \/
_PEM_LINE = re.compile(rb"(" + _PEM_PREFIX + rb")(" + _KEY_CHAR + rb"+)(" + _SPACE + rb"*)")
# Key material that ends a quoted string (a key cut short inside JSON or a repr: "...\nMIIE...",
# 'MIIE...'): what is masked of a last line that is not whole key material.
_PEM_LAST = re.compile(rb"(" + _PEM_PREFIX + rb")(" + _KEY_CHAR + rb"+)(?=\\*[\"'])")
# The start of a line of key material, cut before its end (an escape may have begun).
_PEM_LINE_OPEN = re.compile(_KEY_CHAR + rb"*\\*" + _SPACE + rb"*")
PEM_FIRST_LINE_LEN = 16  # the first line of key material is this long at least (64 or 70 as a rule)
# A line of key material waits for its end to be masked whole, up to this size.
PEM_MAX_LINE = 1 << 10
# Every token shape begins with one of these prefixes. Rather than scanning each chunk once
# per prefix, the chunk is folded (o, u, s, r, a, b -> p and S -> K; one byte for one byte,
# so positions stay) and scanned for the folded prefixes: gh[pousr]_ becomes ghp_,
# A[KS]IA becomes AKIA, xox[abprs]- becomes xpxp-. Only where a prefix occurs does the
# token expression run, anchored there.
_FOLD = bytes.maketrans(b"ousrabS", b"ppppppK")
RAW_PREFIXES: tuple[bytes, ...] = (b"sk-", b"github_pat_", b"glpat-", b"sk_live_", b"rk_live_", b"sk_test_",
                                   b"rk_test_", b"hf_", b"npm_", b"AIza", b"eyJ", b"-----BEGIN ",
                                   b"uthorization: Basic ")
# Basic credentials begin after their prefix, which the expression looks behind for; so does
# a bearer token, after "Bearer " in any case (looked for in a lower-cased copy).
_START_OFFSET = {b"uthorization: Basic ": 20}
_BEARER_WORD = b"bearer "
FOLDED_PREFIXES: tuple[bytes, ...] = (b"ghp_", b"AKIA", b"xpxp-")
# Bytes outside a run of token characters; of what may be a JWT; a bearer token; basic
# credentials. A run's start is found by searching the reversed tail for the first of these:
# searching forward for "[...]*\Z" would take quadratic time on a long run that stops short
# of the end.
_NOT_TOKEN = re.compile(rb"[^A-Za-z0-9_\-]")
_NOT_JWT = re.compile(rb"[^A-Za-z0-9_\-.]")
_NOT_BEARER = re.compile(rb"[^A-Za-z0-9\-._~+/=]")
_NOT_BASIC = re.compile(rb"[^A-Za-z0-9+/=]")
# An Authorization header whose basic credentials may still be on their way.
_BASIC_OPEN = re.compile(rb"(?: (?:B(?:a(?:s(?:i(?:c(?: [A-Za-z0-9+/=]*)?)?)?)?)?)?)?\Z")  # after "uthorization:"
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
        # one look-behind for all shapes: tried at every position of a read on the full
        # expression's path, once per shape it cost ~3x the time
        shapes = [_TOKEN_START + b"(?:" + b"|".join(b"(?:" + p + b")" for p in TOKEN_PATTERNS) + b")"]
        pem = b"(?P<" + PEM_GROUP.encode() + b">" + PEM_BEGIN + b")"  # found, not masked: a key follows
        parts = [re.escape(v) for v in self.values] + shapes + [pem] + [scoped(p) for p in extra_patterns]
        self.rx = re.compile(b"|".join(b"(?:" + p + b")" for p in parts))
        self.token_rx = re.compile(b"|".join(b"(?:" + p + b")" for p in [*shapes, pem]))
        self.max_token = max(max_token, max((len(v) for v in self.values), default=0))
        self._held: dict[str, bytes] = {}
        # _token_starts, bound once (its call costs a lone line as much as the native scan)
        self._token_starts = _speedups.token_starts if _speedups is not None else _token_starts_py
        # Streams inside a private key block: how many lines of it were masked; and the start
        # of a line that went out as a piece (a quiet second, a long line), for judging its rest.
        self._pem: dict[str, int] = {}
        self._pem_part: dict[str, bytes] = {}
        self.masked = 0

    def __call__(self, stream: str, chunk: bytes, final: bool) -> bytes:
        held = self._held.pop(stream, b"")
        data = held + chunk if held else chunk
        if not data:
            return b""
        out: list[bytes] = []
        pos = 0
        if stream in self._pem:
            pos = self._pem_block(stream, data, 0, final, out)
            if stream in self._pem:
                return self._released(stream, data, pos, out)
        # Nothing is held back after a line end (_holdback gives 0, and no "Bearer " ends there).
        end = len(data) if final or data[-1:] == b"\n" else _context_start(data, len(data) - self._holdback(data))
        full = self.user_patterns or self.values and self._any_secret(data)
        starts: list[int] = []
        if not full:
            starts = self._token_starts(data)
            if not starts and not pos:
                if end < len(data):
                    self._held[stream] = data[end:]
                return data[:end] if end < len(data) else data
        while True:
            matches: Iterable[re.Match[bytes]] = (
                self.rx.finditer(data, pos) if full else self._anchored(data, starts, pos))
            key = None
            for m in matches:
                if m.start() >= end:
                    break  # may still grow: decide with the next chunk
                if m.end() == m.start():
                    continue  # a user pattern that matched nothing here
                if m.group(PEM_GROUP) is not None:
                    key = m
                    break
                token = m.group() not in self._value_set
                # a token run on into a private key's BEGIN line: the token is masked, the key found
                key = _pem_inside(data, m) if token else None
                if (key is None and token and not final and (m.end() > end or m.end() == len(data))
                        and len(data) - m.start() <= MAX_HELD_SECRET):
                    # A token reaching the end of the read, or into what is held back, may go
                    # on, or end otherwise, in the next read ("sk-...-----BEGIN PRIV"): it waits
                    # whole, with the "Bearer " its expression looks behind for. (An environment
                    # value may not: it is masked and goes out now.)
                    end = _context_start(data, m.start())
                    break
                out.append(data[pos : m.start()])
                out.append(MASK)
                self.masked += 1
                if key is not None:
                    pos = key.start()
                    break
                pos = m.end()
            if key is None:
                break
            if not final and _line_open(data, key.end()):
                # The BEGIN line is not whole: it waits, so that its rest is judged with the
                # BEGIN line before it, as it is when the line comes in one read.
                end = key.start()
                break
            out.append(data[pos : key.end()])
            self._pem[stream] = 0
            pos = self._pem_block(stream, data, key.end(), final, out)
            if stream in self._pem:  # the block goes on; a line not yet whole waits
                return self._released(stream, data, pos, out)
        release = max(end, pos)
        out.append(data[pos:release])
        return self._released(stream, data, release, out)

    def _released(self, stream: str, data: bytes, release: int, out: list[bytes]) -> bytes:
        """What goes out (``out``, ``data`` up to ``release``); the rest of ``data`` waits."""
        if release < len(data):
            self._held[stream] = data[release:]
        return b"".join(out)

    def _pem_block(self, stream: str, data: bytes, pos: int, final: bool, out: list[bytes]) -> int:
        """Inside a private key block from ``pos``: appends to ``out`` what goes out, its lines of
        key material masked, and returns where it stopped: after the END line, at a line that is
        not key material (the block is over, ordinary redaction goes on from there), or at a
        line not yet whole (the block goes on; it waits for the next read, or is judged as it
        is when ``final``; a line longer than PEM_MAX_LINE is judged in pieces of that size)."""
        part = self._pem_part.get(stream, b"")
        if part.endswith(b"\\") and data[pos : pos + 1] in (b"n", b"r"):
            # an escaped line end cut by a quiet second: its backslash went out with the piece
            self._pem_part.pop(stream)
            out.append(data[pos : pos + 1])
            pos += 1
        while True:
            # A line is looked at PEM_MAX_LINE bytes at a time: a long one (many BEGIN lines
            # on one line of prose) costs each of its BEGIN lines no more than that.
            limit = min(len(data), pos + PEM_MAX_LINE)
            brk = _PEM_BREAK.search(data, pos, limit + 2)  # a break may begin at the limit
            line_end = brk.start() if brk is not None else limit
            end_marker = _PEM_END.search(data, pos, line_end)
            if end_marker is not None and end_marker.end() == len(data) and not final:
                return pos  # what follows the END line is judged with the END line before it
            if end_marker is not None:
                before = data[pos : end_marker.start()]  # key material may run on into the END line
                if _PEM_END_PREFIX.fullmatch(self._pem_part.get(stream, b"") + before):
                    masked: bytes | None = before  # its line number or indentation
                else:
                    masked = self._pem_line(stream, before)
                if masked is None:
                    return pos
                out.append(masked)
                out.append(end_marker.group())
                del self._pem[stream]
                self._pem_part.pop(stream, None)
                return end_marker.end()
            if brk is None and not final and limit == len(data):
                return pos  # the line may go on in the next read
            # Without a break, a piece: the start of a line longer than PEM_MAX_LINE, or of a
            # line not yet whole when the pipes went quiet. It is judged as a line's start, and
            # what follows it as that line's rest.
            line = data[pos:line_end]
            done = self._pem[stream]
            fresh = stream not in self._pem_part
            masked = self._pem_piece(stream, line) if brk is None else self._pem_line(stream, line)
            if masked is None:
                return pos + self._pem_string_end(line, done, fresh, out)
            out.append(masked)
            if brk is None:
                pos = line_end
                if pos == len(data):
                    return pos
                continue
            out.append(brk.group())
            pos = brk.end()

    def _pem_line(self, stream: str, line: bytes) -> bytes | None:
        """A line (or the rest of one whose start went out as a piece) inside a private key
        block as it goes out, or None when it is not part of the key (the block ends before it)."""
        done = self._pem[stream]
        part = self._pem_part.pop(stream, b"")
        whole = part + line
        if not whole.strip():
            return line
        if not done and _PEM_HEADER.fullmatch(whole):
            return self._tokens_masked(line)
        m = _PEM_LINE.fullmatch(whole)
        if m is not None and (done or part or len(m.group(2)) >= PEM_FIRST_LINE_LEN):
            self._pem[stream] = done + 1
            self.masked += 1
            if part:  # its start went out already, masked: the rest is masked as it is
                return MASK if line.strip() else line
            return m.group(1) + MASK + m.group(3)
        del self._pem[stream]
        return None

    def _pem_string_end(self, line: bytes, done: int, fresh: bool, out: list[bytes]) -> int:
        """A line that ended the block: when key material begins it and a closing quote follows
        (a key cut short inside a JSON string or a repr), the material is masked (appended to
        ``out``) and its length returned; the rest of the line is ordinary text. Else 0."""
        m = _PEM_LAST.match(line) if fresh else None
        if m is None or not (done or len(m.group(2)) >= PEM_FIRST_LINE_LEN):
            return 0
        self.masked += 1
        out.append(m.group(1) + MASK)
        return m.end()

    def _pem_piece(self, stream: str, piece: bytes) -> bytes | None:
        """The start of a line (or a further piece of it) inside a private key block as it goes
        out; None when it cannot begin a line of the block (the block ends before it)."""
        part = self._pem_part.get(stream, b"")
        start = part + piece
        p = _PEM_PREFIX_RX.match(start).end()  # type: ignore[union-attr]  # (it matches empty)
        rest = start[p:]
        if p == len(start) or rest.endswith((b"\\", b"\xe2", b"\xe2\x86")) and not rest.strip(b"\\\xe2\x86"):
            out = piece  # indentation, a line number, or an escape, so far
        elif not self._pem[stream] and any(h.startswith(rest) or rest.startswith(h) for h in _PEM_HEADER_NAMES):
            out = self._tokens_masked(piece)
        elif _PEM_LINE_OPEN.fullmatch(rest):
            self.masked += 1
            content = piece.rstrip(b"\\")  # an escape begun at its end stays whole
            out = MASK + piece[len(content):] if content.strip() else piece
        else:
            del self._pem[stream]
            self._pem_part.pop(stream, None)
            return None
        self._pem_part[stream] = start[-PEM_MAX_LINE:]
        return out

    def _tokens_masked(self, line: bytes) -> bytes:
        """``line`` (a PEM header) with the other redaction applied, in one piece."""
        return self.rx.sub(lambda m: MASK if m.end() > m.start() and m.group(PEM_GROUP) is None else m.group(), line)

    def mask(self, data: bytes) -> bytes:
        """``data`` whole (no state, nothing held back) with every secret masked."""
        if not (self.user_patterns or self._any_secret(data) or _token_starts(data)):
            return data
        # A stream of its own, over at once, and one per thread: the main and control threads
        # mask status messages while the reader thread filters the output.
        whole = f"\0whole-{get_ident()}"
        try:
            return self(whole, data, True)
        finally:
            self._pem.pop(whole, None)
            self._pem_part.pop(whole, None)
            self._held.pop(whole, None)

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

    def _anchored(self, data: bytes, starts: list[int], after: int = 0) -> Iterator[re.Match[bytes]]:
        """Token matches beginning at the candidate positions from ``after`` on, in order, not
        overlapping."""
        for i in range(bisect_left(starts, after), len(starts)):  # after a private key: from there on
            p = starts[i]
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
        start = _shape_start(tail, _run_start(tail, len(tail), _NOT_TOKEN))
        if start > 0 and tail[start - 1] in b"\\%":
            # The run may be a token after an escape (\nsk-..., %3Dsk-...), or the escape may
            # have just begun: its backslash or % goes with it, or the look-behind would not
            # see it in the next read.
            start -= 1
        hold = len(tail) - start
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


def _line_open(data: bytes, pos: int) -> bool:
    """Whether the line at ``pos`` may go on in the next read: no line end in the rest of
    ``data``, which is shorter than PEM_MAX_LINE."""
    return len(data) - pos <= PEM_MAX_LINE and _PEM_BREAK.search(data, pos) is None


def _context_start(data: bytes, start: int) -> int:
    """Where what is held back must begin for a token at ``start`` to be found again in the
    next read: before the "Bearer " or "Authorization: Basic " that its expression looks
    behind for, and the bytes before "Bearer" that decide whether it continues a word."""
    while True:
        moved = start
        # a "Bearer " or "uthorization: Basic " that ends at the start or runs across it
        p = _rfind_bearer(data, max(moved - 7, 0), moved + 6)
        if 0 <= p < moved:
            moved = max(p - 3, 0)  # the look-behinds see at most 3 bytes before "Bearer "
        p = data.rfind(b"uthorization: Basic ", max(moved - 20, 0), moved + 19)
        if 0 <= p < moved:
            moved = p
        if moved == start:
            return start
        start = moved


def _rfind_bearer(data: bytes, start: int, end: int) -> int:
    """data.rfind(b"Bearer ", start, end), the word in any case (a window of a few bytes)."""
    p = data[start:end].lower().rfind(_BEARER_WORD)
    return p + start if p >= 0 else -1


def _pem_inside(data: bytes, m: re.Match[bytes]) -> re.Match[bytes] | None:
    """A private key's BEGIN line that begins inside match ``m``, after its start."""
    q = data.find(b"-----BEGIN", m.start() + 1, m.end())
    while q >= 0:
        begin = _PEM_BEGIN.match(data, q)
        if begin is not None:
            return begin
        q = data.find(b"-----BEGIN", q + 1, m.end())
    return None


def _run_start(data: bytes, end: int, outside: re.Pattern[bytes]) -> int:
    """Where the run of bytes that ends at ``end`` begins, ``outside`` matching any byte not in it."""
    m = outside.search(data[end - 1 :: -1] if end > 0 else b"")
    return end - m.start() if m is not None else 0


def _shape_start(tail: bytes, start: int) -> int:
    """Where what is held back at the end of ``tail`` must begin, given that the run of token
    characters from ``start`` on is: earlier, when the bytes before it and the run may be one
    JWT ("eyJhbGciOiJIUzI1NiJ9." + "eyJz") or one bearer token ("Bearer abc/" + "def"), so
    that the expression sees them together in the next read. Each such move begins at a run's
    first byte, so the byte before what is held looks the same to the look-behinds in both
    reads. A plain "Loading..." is not held."""
    while True:
        moved = start
        if b"eyJ" in tail:
            run = _run_start(tail, moved, _NOT_JWT)
            if b"eyJ" in tail[run:]:
                moved = run
        if _BEARER_WORD in tail.lower():
            run = _run_start(tail, moved, _NOT_BEARER)
            if tail[max(run - 7, 0) : run].lower() == _BEARER_WORD:
                # with the word "Bearer", and what it continues: that decides whether a token follows
                moved = _run_start(tail, run - 1, _NOT_TOKEN)
        if b"uthorization:" in tail:
            p = tail.rfind(b"uthorization:")
            if p >= 0 and p < moved and _BASIC_OPEN.match(tail, p + 13):
                moved = p
            run = _run_start(tail, moved, _NOT_BASIC)
            if tail.endswith(b"uthorization: Basic ", 0, run):
                moved = run - 20
        if b"-----BEGIN" in tail:
            # a private key's BEGIN line not yet whole ("-----BEGIN RSA PRIV"): the block
            # is only found with the line whole
            p = tail.rfind(b"-----BEGIN")
            if p < moved and _PEM_OPEN.match(tail, p + 10):
                moved = p
        if moved == start:
            return start
        start = moved


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
    lowered = data.lower()
    bearer = _BEARER_WORD in lowered
    if not found and not found_folded and not bearer:
        return []
    starts: set[int] = set()
    for hay, prefixes in ((data, found), (folded, found_folded)):
        for prefix in prefixes:
            offset = _START_OFFSET.get(prefix, 0)
            i = hay.find(prefix)
            while i >= 0:
                starts.add(i + offset)
                i = hay.find(prefix, i + 1)
    i = lowered.find(_BEARER_WORD) if bearer else -1
    while i >= 0:
        starts.add(i + 7)
        i = lowered.find(_BEARER_WORD, i + 1)
    return sorted(starts)


def from_settings(env: Mapping[str, str], patterns: Sequence[str], enabled: bool) -> Redactor | None:
    return Redactor(env, patterns) if enabled else None
