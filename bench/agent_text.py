"""Deterministic text that looks like what a coding agent prints.

The mix is prose, Python code, markdown and stream-json event lines. Line lengths are
spread around ``avg_len`` bytes (newline included) and their mean is kept close to it.

Only a pool of up to POOL_SIZE distinct lines is generated; longer outputs repeat the
pool in order, so a batch of a few hundred lines never holds repeats and compression
figures are not flattered. The pool is cached in the temp directory so that a benchmark
child can start writing within milliseconds.

    python bench/agent_text.py --lines 20          # print a sample
    python bench/agent_text.py --lines 2000000 --stats
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable
from functools import lru_cache
from typing import Any

POOL_SIZE = 16384

_PROSE = (
    "the a an this that it we I you of to in for on with from by as at and or but so "
    "then because when if while after before until only also just still already now "
    "file files function functions test tests module modules class method methods "
    "config value values error errors output input request response stream streams "
    "record records batch batches line lines buffer queue worker workers process "
    "handler client server connection retry timeout latency cache index schema field "
    "fields key keys token tokens message messages change changes patch diff commit "
    "branch repository dependency dependencies import imports type types argument "
    "is are was were be been has have had does do did can could should would will "
    "need needs look looks seem seems run runs ran fix fixes fixed add adds added "
    "update updates updated check checks checked read reads write writes return "
    "returns call calls handle handles parse parses raise raises pass passes fail "
    "fails failed open opens close closes start starts stop stops keep keeps "
    "first next last new old same different correct wrong missing empty small large "
    "slow fast safe simple current existing previous remaining following expected "
    "actual likely probably actually instead here there where which what why how "
    "let's let me I'll I've we're it's doesn't isn't won't can't "
    "café naïve — → ✓ ≥ résumé"
).split()

_SENTENCE_STARTS = (
    "Let me",
    "Now I'll",
    "I'll",
    "Looking at",
    "The",
    "This",
    "It looks like",
    "Next,",
    "First,",
    "Great,",
    "OK,",
    "I see that",
    "The test",
    "The error",
    "Now",
    "Finally,",
)

_IDENTS = (
    "batch",
    "buf",
    "chunk",
    "client",
    "conn",
    "count",
    "data",
    "deadline",
    "delay",
    "entry",
    "err",
    "event",
    "fd",
    "header",
    "idx",
    "item",
    "key",
    "line",
    "lines",
    "msg",
    "n",
    "offset",
    "payload",
    "pending",
    "queue",
    "record",
    "result",
    "retries",
    "seq",
    "size",
    "stream",
    "text",
    "timeout",
    "ts",
    "value",
    "writer",
)
_FUNCS = (
    "append",
    "decode",
    "encode",
    "flush",
    "get",
    "join",
    "load",
    "parse",
    "publish",
    "read",
    "send",
    "split",
    "strip",
    "update",
    "write",
    "xadd",
    "compress",
    "loads",
)
_TYPES = ("int", "str", "bytes", "float", "bool", "list[bytes]", "dict[str, Any]", "None")
_CODE = (
    "{i}{a} = {b}.{f}({c})",
    "{i}{a} = {f}({b}, {c}={num})",
    "{i}if {a} is None:",
    "{i}if not {a}:",
    "{i}if len({a}) > {num}:",
    "{i}for {a} in {b}:",
    "{i}for {a}, {b} in enumerate({c}):",
    "{i}while {a} < {b}:",
    "{i}return {a}",
    "{i}return {a}, {b}",
    "{i}{a} += {num}",
    "{i}self.{a} = {b}",
    "{i}self._{a}.{f}({b})",
    "{i}def {f}_{a}(self, {b}: {t}) -> {t2}:",
    "{i}async def {f}_{a}({b}: {t}, {c}: {t2} = None) -> {t}:",
    "{i}await self.{a}.{f}({b}, timeout={num})",
    '{i}raise ValueError(f"bad {a}: {{{b}!r}}")',
    "{i}except {exc} as exc:",
    "{i}try:",
    '{i}with open({a}, "rb") as {b}:',
    "{i}assert {a} == {b}, {a}",
    '{i}logger.debug("{f} %s %d", {a}, {b})',
    "{i}{a}: {t} = {num}",
    "{i}import {mod}",
    "{i}from {mod} import {a}",
    '{i}@pytest.mark.parametrize("{a}", [{num}, {num2}])',
    "{i}# {prose}",
)
_EXC = ("OSError", "KeyError", "ValueError", "TimeoutError", "ConnectionError", "RuntimeError")
_MODS = ("os", "sys", "json", "time", "asyncio", "logging", "redis", "zstandard", "orjson", "pathlib")
_MD = (
    "## {prose}",
    "### {prose}",
    "- {prose}",
    "* {prose}",
    "1. {prose}",
    "2. {prose}",
    "> {prose}",
    "**{word}**: {prose}",
    "- [x] {prose}",
    "- [ ] {prose}",
    "| `{ident}` | {prose} |",
    "```python",
    "```",
    "```bash",
    "$ pytest -q tests/{ident}",
)
_TOOLS = ("Bash", "Read", "Edit", "Write", "Grep", "Glob")


def _words(rng: random.Random, budget: int, start: str = "") -> str:
    """Prose of about ``budget`` characters, ending at a word boundary."""
    if len(start) >= budget:
        return start
    k = budget // 5 + 2
    text = " ".join(rng.choices(_PROSE, k=k))
    if start:
        text = start + " " + text
    while len(text) < budget:
        text += " " + " ".join(rng.choices(_PROSE, k=k))
    if len(text) > budget:
        cut = text.rfind(" ", 0, budget)
        text = text[:cut] if cut > budget // 2 else text[:budget]
    return text


def _prose(rng: random.Random, budget: int) -> str:
    text = _words(rng, budget - 1, rng.choice(_SENTENCE_STARTS))
    return text + rng.choice((".", ".", ",", ":", "?"))


def _code(rng: random.Random, budget: int) -> str:
    tpl = rng.choice(_CODE)
    a, b, c = rng.sample(_IDENTS, 3)
    line = tpl.format(
        i=" " * (4 * rng.randrange(4)),
        a=a,
        b=b,
        c=c,
        f=rng.choice(_FUNCS),
        t=rng.choice(_TYPES),
        t2=rng.choice(_TYPES),
        num=rng.randrange(1000),
        num2=rng.randrange(1 << 16),
        exc=rng.choice(_EXC),
        mod=rng.choice(_MODS),
        prose="{prose}",
    )
    if "{prose}" in line:
        return line.replace("{prose}", _words(rng, max(1, budget - len(line) + 7)))
    if len(line) + 12 < budget:
        line += "  # " + _words(rng, budget - len(line) - 4)
    return line


def _markdown(rng: random.Random, budget: int) -> str:
    tpl = rng.choice(_MD)
    line = tpl.replace("{word}", rng.choice(_PROSE)).replace("{ident}", rng.choice(_IDENTS))
    if "{prose}" in line:
        line = line.replace("{prose}", _words(rng, max(1, budget - len(line) + 7)))
    return line


def _event(rng: random.Random, budget: int) -> str:
    """One stream-json event, padded with text so the line has about ``budget`` characters."""
    kind = rng.randrange(4)
    msg_id = f"msg_{rng.getrandbits(64):016x}"
    build: Callable[[str], dict[str, Any]]
    if kind == 0:

        def build(text: str) -> dict[str, Any]:
            content = [{"type": "text", "text": text}]
            return {"type": "assistant", "message": {"id": msg_id, "role": "assistant", "content": content}}

    elif kind == 1:
        tool = {"type": "tool_use", "id": f"toolu_{rng.getrandbits(48):012x}", "name": rng.choice(_TOOLS)}

        def build(text: str) -> dict[str, Any]:
            content = [{**tool, "input": {"command": text}}]
            return {"type": "assistant", "message": {"id": msg_id, "role": "assistant", "content": content}}

    elif kind == 2:
        tool_id = f"toolu_{rng.getrandbits(48):012x}"

        def build(text: str) -> dict[str, Any]:
            content = [{"type": "tool_result", "tool_use_id": tool_id, "content": text}]
            return {"type": "user", "message": {"role": "user", "content": content}}

    else:
        index = rng.randrange(4)

        def build(text: str) -> dict[str, Any]:
            delta = {"type": "text_delta", "text": text}
            return {
                "type": "stream_event",
                "event": {"type": "content_block_delta", "index": index, "delta": delta},
            }

    overhead = len(_dumps(build("")))
    # Event lines are long by nature; the length feedback in _generate shortens the others.
    room = max(budget - overhead, rng.randrange(8, 60))
    return _dumps(build(_words(rng, room)))


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


_KIND_FUNCS = (_prose, _code, _markdown, _event)
_KIND_WEIGHTS = (45, 70, 85, 100)  # cumulative: prose 45%, code 25%, markdown 15%, events 15%


def _line(rng: random.Random, avg_len: int, correction: float) -> bytes:
    if rng.random() < 0.03:
        return b"\n"
    target = int(rng.gauss(avg_len - correction, avg_len * 0.35))
    target = min(max(target, 8, avg_len // 4), avg_len * 3) - 1
    gen = rng.choices(_KIND_FUNCS, cum_weights=_KIND_WEIGHTS)[0]
    return gen(rng, max(target, 1)).encode("utf-8") + b"\n"


def _generate(size: int, avg_len: int, seed: int) -> list[bytes]:
    rng = random.Random(f"agent-text:{seed}:{avg_len}")
    out: list[bytes] = []
    total = 0
    limit = avg_len / 4
    for i in range(size):
        # Steer each target by the running excess so the mean stays on avg_len.
        drift = total - i * avg_len
        line = _line(rng, avg_len, max(-limit, min(limit, drift)))
        total += len(line)
        out.append(line)
    return out


def _cache_path(size: int, avg_len: int, seed: int) -> str:
    with open(__file__, "rb") as f:
        version = hashlib.sha1(f.read()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "agent-text-cache", f"{version}-{size}-{avg_len}-{seed}.txt")


@lru_cache(maxsize=8)
def _pool(size: int, avg_len: int, seed: int) -> tuple[bytes, ...]:
    """The distinct lines, kept in a temp-dir file so a benchmark child starts fast."""
    path = _cache_path(size, avg_len, seed)
    try:
        with open(path, "rb") as f:
            data = f.read()
        lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
        if len(lines) == size and data.endswith(b"\n"):
            return tuple(lines)
    except OSError:
        pass
    lines = _generate(size, avg_len, seed)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(lines))
        os.replace(tmp, path)
    except OSError:
        pass
    return tuple(lines)


def warm(n: int, avg_len: int = 80, seed: int = 1) -> None:
    """Fill the on-disk cache for these arguments (call before timing a child)."""
    _pool(min(n, POOL_SIZE), avg_len, seed)


def make_lines(n: int, avg_len: int = 80, seed: int = 1) -> list[bytes]:
    """``n`` lines, each ending with b"\\n", same output for the same arguments."""
    if n <= 0:
        return []
    pool = _pool(min(n, POOL_SIZE), avg_len, seed)
    reps, rest = divmod(n, len(pool))
    return list(pool) * reps + list(pool[:rest])


def make_block(n: int, avg_len: int = 80, seed: int = 1) -> bytes:
    """``b"".join(make_lines(n, avg_len, seed))`` without building the list."""
    if n <= 0:
        return b""
    pool = _pool(min(n, POOL_SIZE), avg_len, seed)
    reps, rest = divmod(n, len(pool))
    unit = b"".join(pool)
    return b"".join([unit] * reps + [b"".join(pool[:rest])])


def block_period(n: int, avg_len: int = 80, seed: int = 1) -> tuple[bytes, int]:
    """``(unit, size)``: ``make_block(n, ...)`` is the first ``size`` bytes of ``unit`` repeated.

    Lets a writer stream hundreds of MB from a buffer of about a megabyte.
    """
    if n <= 0:
        return b"", 0
    pool = _pool(min(n, POOL_SIZE), avg_len, seed)
    unit = b"".join(pool)
    reps, rest = divmod(n, len(pool))
    return unit, len(unit) * reps + sum(map(len, pool[:rest]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=30)
    ap.add_argument("--avg-len", type=int, default=80)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stats", action="store_true", help="print size statistics instead of the text")
    args = ap.parse_args(argv)
    if args.stats:
        block = make_block(args.lines, args.avg_len, args.seed)
        print(f"lines={args.lines} bytes={len(block)} mean={len(block) / max(args.lines, 1):.1f}")
        return 0
    sys.stdout.buffer.write(make_block(args.lines, args.avg_len, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
