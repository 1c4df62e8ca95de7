"""CPU cost per line of each step of the sidecar's data path, measured in this process.

    python bench/costs.py [--lines 200000] [--json PATH]

Runs each step alone, single-threaded, on the benchmark's agent text (bench/agent_text.py,
the same text as bench.py) cut as the sidecar cuts it: 64 KiB reads for the reader's steps,
batches of 1,000 lines for the encoder's. Prints nanoseconds per line and the rate one core
would reach doing only that step. The steps that hold the GIL add up to the ceiling of the
in-process pipeline; zstd releases the GIL and runs beside them on a second core.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import agent_text  # noqa: E402

from agent_wrapper.lines import LineSplitter  # noqa: E402
from sidecar import _native, protocol, redaction  # noqa: E402

READ = 64 * 1024
BATCH = 1000
HEADER = {"v": 1, "type": "batch", "run_id": "r", "variation_id": "0", "agent_id": "a", "producer": "p",
          "channel": "run:r:output:0", "stream": "stdout"}


def per_line(fn: Callable[[], object], lines: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / lines * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=200_000)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args(argv)
    n = a.lines
    block = agent_text.make_block(n)
    reads = [block[i : i + READ] for i in range(0, len(block), READ)]
    batches: list[protocol.Lines] = []
    pos = 0
    while pos < len(block):
        end = pos
        count = 0
        while count < BATCH and end < len(block):
            end = block.index(b"\n", end) + 1
            count += 1
        batches.append(protocol.Lines(segments=[(block[pos:end], count, False)], ts=[(0, 1.0)], n=count,
                                      nbytes=end - pos))
        pos = end
    texts = [protocol.texts_of(b) for b in batches]
    native = _native.speedups is not None
    redactor = redaction.Redactor({})
    # three secrets in the environment, as a deployment might hold: 14 forms to look for
    with_secrets = redaction.Redactor({"OPENAI_API_KEY": "sk-" + "Ab3" * 16, "DB_PASSWORD": "p@ss w/rd-2024!",
                                       "GITHUB_TOKEN": "ghp_" + "Zx9" * 12})

    def split() -> None:
        s = LineSplitter(count_lf=_native.speedups.count_lf if native else None)
        for r in reads:
            s.feed(r)

    def redact() -> None:
        for r in reads:
            redactor("stdout", r, False)

    def redact_secrets() -> None:
        for r in reads:
            with_secrets("stdout", r, False)

    def redact_py() -> None:
        saved = redaction._speedups
        redaction._speedups = None
        try:
            redact()
        finally:
            redaction._speedups = saved

    def decode_split() -> None:
        for b in batches:
            protocol.texts_of(b)

    def json_objects() -> None:
        for t in texts:
            protocol._json_objects(t.lines, t.b64, [])

    def dumps() -> None:
        for b, t in zip(batches, texts, strict=True):
            protocol.encode_batch(HEADER, 1, b, structured=False, threshold=-1, texts=t)

    # as the encoder asks for stdout: JSON objects spliced in, those that may carry an event parsed
    natives = [protocol.native_lines(b, parsed=[]) for b in batches] if native else []

    def native_records() -> None:
        for b in batches:
            protocol.native_lines(b, parsed=[])

    header_json = protocol.encode_object(HEADER)[:-1]

    def native_message() -> None:
        for b, got in zip(batches, natives, strict=True):
            assert got is not None
            protocol.batch_message(header_json, 1, got[1], got[0], b.ts, got[2], got[3])

    payloads = [protocol.encode_batch(HEADER, 1, b, structured=True, threshold=-1, texts=t)
                for b, t in zip(batches, texts, strict=True)]

    def zstd() -> None:
        for p in payloads:
            protocol.compress_if_large(p, 0)

    def whole() -> None:
        for b in batches:
            protocol.encode_batch(HEADER, 1, b, structured=True, threshold=protocol.DEFAULT_COMPRESS_THRESHOLD)

    # (label, step, holds the GIL, on the path the sidecar takes here)
    steps: list[tuple[str, Callable[[], None], bool, bool]] = [
        ("split into runs of lines (reader)", split, True, True),
        ("redaction, no secret present (reader)", redact, True, True),
    ]
    if native:
        steps += [
            ("  the same in Python code (not used)", redact_py, True, False),
            ("lines and json arrays, native (encoder; no GIL)", native_records, False, True),
            ("the message put together around them (encoder)", native_message, True, True),
            ("  Python code: decode UTF-8, split into strings (not used)", decode_split, True, False),
            ("  Python code: find JSON-object lines (not used)", json_objects, True, False),
        ]
    else:
        steps += [
            ("decode UTF-8 and split into line strings (encoder)", decode_split, True, True),
            ("find and validate JSON-object lines (encoder)", json_objects, True, True),
            ("orjson encoding of the batch (encoder)", dumps, True, True),
        ]
    steps.insert(3 if native else 2, (f"  redaction, {len(with_secrets.values)} forms of 3 environment secrets "
                                       "(not here)", redact_secrets, True, False))
    steps.append(("zstd level 1 (compressor thread; no GIL)", zstd, False, True))
    rows = []
    gil = 0.0
    for label, fn, holds_gil, used in steps:
        ns = per_line(fn, n)
        rows.append({"step": label, "ns_per_line": round(ns, 1), "lines_per_s_one_core": round(1e9 / ns),
                     "used": used})
        if holds_gil and used:
            gil += ns
    total = per_line(whole, n)
    json_lines = sum(1 for t in texts for line in t.lines if line[:1] == "{")
    print(f"{n:,} lines of agent text, {len(block) / n:.1f} bytes a line, {100 * json_lines / n:.1f} % JSON-object "
          f"lines; Python {sys.version.split()[0]}; native module: {'yes' if native else 'no'}")
    print(f"{'step':60} | {'ns/line':>8} | {'lines/s on one core':>20}")
    print("-" * 61 + "+" + "-" * 10 + "+" + "-" * 21)
    for r in rows:
        print(f"{r['step']:60} | {r['ns_per_line']:8.0f} | {r['lines_per_s_one_core']:20,}")
    print(f"{'steps holding the GIL on the path taken, together':60} | {gil:8.0f} | {round(1e9 / gil):20,}")
    print(f"{'whole encode_batch as shipped (structured, zstd)':60} | {total:8.0f} | {round(1e9 / total):20,}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"lines": n, "native": native, "steps": rows, "gil_ns_per_line": round(gil, 1),
                       "encode_batch_ns_per_line": round(total, 1)}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
