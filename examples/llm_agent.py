#!/usr/bin/env python3
"""A stand-in for an LLM coding agent, for trying the sidecar by hand.

It logs to stderr, streams prose to stdout a few tokens at a time, prints stream-json
event lines like Claude Code's ``--output-format stream-json`` (assistant, tool use,
tool result, a final result with usage and cost) and a markdown code block, then exits.
The output is the same for the same options (seeded); only the pacing varies.

    python -m sidecar --run-id demo -- python examples/llm_agent.py
    python examples/llm_agent.py --fast --lines 5 --exit-code 3
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
import uuid
from typing import Any

MODEL = "claude-sonnet-4-5"

WORDS = (
    "the a to of and in that it is for on with as this we I will be can should "
    "function test tests file module config value error output stream batch line lines "
    "buffer queue worker retry timeout handler client server request response record "
    "records change fix patch import type check read write parse return call update "
    "first then next now because so but also only still already here instead "
    "looks seems needs runs passes fails failing expected actual missing empty "
    "small simple safe correct existing current new old same different"
).split()

OPENERS = (
    "Let me look at",
    "I'll start by reading",
    "Now I'll update",
    "The failing test is",
    "It looks like",
    "Next, I'll check",
    "The problem is that",
    "I've fixed",
    "Looking at the traceback,",
    "To confirm,",
    "Good, now",
    "Finally,",
)

CODE = '''```python
def drain(queue: "asyncio.Queue[bytes]", limit: int = 500) -> list[bytes]:
    """Take up to ``limit`` items without waiting."""
    out: list[bytes] = []
    while len(out) < limit:
        try:
            out.append(queue.get_nowait())
        except asyncio.QueueEmpty:
            break
    return out
```'''


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.session = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.lines = args.lines
        self.fast = args.fast
        self.exit_code: int = args.exit_code
        self.input_tokens = 0
        self.output_tokens = 0
        # Spread the run over about --duration seconds, however many lines were asked for.
        self.token_delay = 0.0 if args.fast else args.duration / max(1, args.lines * 14)

    def log(self, level: str, text: str) -> None:
        print(f"{level} {text}", file=sys.stderr, flush=True)

    def event(self, obj: dict[str, Any]) -> None:
        print(json.dumps(obj, separators=(",", ":")), flush=True)

    def pause(self, seconds: float) -> None:
        if not self.fast:
            time.sleep(seconds)

    def sentence(self) -> str:
        words = self.rng.choices(WORDS, k=self.rng.randint(6, 16))
        return f"{self.rng.choice(OPENERS)} {' '.join(words)}."

    def stream_prose(self, n: int) -> str:
        """Print ``n`` lines token by token, as a model would stream them."""
        text = []
        for _ in range(n):
            line = self.sentence()
            tokens = line.split(" ")
            for i, tok in enumerate(tokens):
                sys.stdout.write(tok if i == 0 else " " + tok)
                sys.stdout.flush()
                self.output_tokens += 1
                self.pause(self.token_delay * self.rng.uniform(0.5, 1.5))
            sys.stdout.write("\n")
            sys.stdout.flush()
            text.append(line)
        return "\n".join(text)

    def msg_id(self) -> str:
        return f"msg_{self.rng.getrandbits(96):024x}"

    def tool_id(self) -> str:
        return f"toolu_{self.rng.getrandbits(96):024x}"

    def assistant(self, content: list[dict[str, Any]], out_tokens: int) -> None:
        self.input_tokens += self.rng.randint(800, 3000)
        self.event(
            {
                "type": "assistant",
                "message": {
                    "id": self.msg_id(),
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": content,
                    "stop_reason": None,
                    "usage": {"input_tokens": self.input_tokens, "output_tokens": out_tokens},
                },
                "parent_tool_use_id": None,
                "session_id": self.session,
            }
        )

    def tool_round(self, name: str, tool_input: dict[str, Any], result: str) -> None:
        tid = self.tool_id()
        self.assistant([{"type": "tool_use", "id": tid, "name": name, "input": tool_input}], 40)
        self.pause(0.1)
        self.event(
            {
                "type": "user",
                "message": {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": tid, "content": result, "is_error": False}
                    ],
                },
                "parent_tool_use_id": None,
                "session_id": self.session,
            }
        )

    def run(self) -> int:
        self.log("INFO", f"starting run session={self.session} model={MODEL}")
        self.log("INFO", "loaded 14 tools, permission mode=acceptEdits")
        self.event(
            {
                "type": "system",
                "subtype": "init",
                "session_id": self.session,
                "model": MODEL,
                "cwd": "/workspace",
                "tools": ["Bash", "Read", "Edit", "Write", "Grep", "Glob"],
            }
        )

        first = (self.lines + 1) // 2
        prose = self.stream_prose(first)
        self.assistant([{"type": "text", "text": prose}], self.output_tokens)

        self.log("DEBUG", "tool call Read path=src/worker.py")
        self.tool_round(
            "Read",
            {"file_path": "/workspace/src/worker.py"},
            "     1\timport asyncio\n     2\t\n     3\tdef drain(queue):\n     4\t    ...",
        )
        self.tool_round(
            "Bash",
            {"command": "pytest -q tests/test_worker.py", "timeout": 120000},
            "F.\nFAILED tests/test_worker.py::test_drain_limit - assert 501 == 500\n1 failed, 1 passed",
        )
        self.log("WARNING", "test run reported 1 failure")

        print("Here is the fixed helper:", flush=True)
        for code_line in CODE.splitlines():
            print(code_line, flush=True)
            self.pause(self.token_delay * 4)
        self.assistant([{"type": "text", "text": CODE}], 120)

        rest = self.stream_prose(self.lines - first)
        self.tool_round("Bash", {"command": "pytest -q"}, "........\n8 passed in 0.41s")

        ok = self.exit_code == 0
        if not ok:
            self.log("ERROR", f"agent failed, exiting with {self.exit_code}")
        self.event(
            {
                "type": "result",
                "subtype": "success" if ok else "error_during_execution",
                "is_error": not ok,
                "num_turns": 5,
                "result": rest.split("\n")[-1] if rest else prose.split("\n")[-1],
                "session_id": self.session,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens + 200},
                "total_cost_usd": round(self.input_tokens * 3e-6 + (self.output_tokens + 200) * 15e-6, 6),
            }
        )
        self.log("INFO", f"run finished exit_code={self.exit_code}")
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=24, help="lines of streamed prose (default 24)")
    ap.add_argument("--duration", type=float, default=3.0, help="rough seconds spent streaming (default 3)")
    ap.add_argument("--fast", action="store_true", help="no sleeps")
    ap.add_argument("--exit-code", type=int, default=0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)

    def on_term(signum: int, _frame: object) -> None:
        print(f"WARNING received signal {signum}, stopping", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        return Agent(args).run()
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
