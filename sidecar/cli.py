"""Command line: `agent-sidecar [OPTIONS] -- CMD`, `agent-sidecar tail RUN_ID`, `agent-sidecar replay`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .config import OPTIONS, Option, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

USAGE = "python -m sidecar [OPTIONS] -- CMD [ARG...]\n       python -m sidecar tail RUN_ID [...]\n" \
        "       python -m sidecar replay [--spool-dir DIR] [...]"


def _help_width() -> int:
    """What argparse's help formatter takes by default (shutil.get_terminal_size, less 2),
    found without importing shutil (fnmatch, zlib, bz2, lzma: milliseconds of every start),
    and once: argparse makes a formatter for every option it adds."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns if sys.__stdout__ else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return (columns or 80) - 2


class _Formatter(argparse.HelpFormatter):
    width: int | None = None

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:
            if _Formatter.width is None:
                _Formatter.width = _help_width()
            width = _Formatter.width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line and exits 2."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        usage_error(message)


def usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"agent-sidecar: error: {message} (see --help)\n")
    raise SystemExit(2)


def _help_for(opt: Option) -> str:
    env = f"env {opt.env}" if opt.env else "no env"
    default = {"negbool": f"{opt.dest} on", "bool": "off"}.get(opt.kind, opt.default)
    return f"{opt.help} [{env}; default: {default}]"


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    for opt in options:
        if opt.kind in ("negbool", "bool"):
            parser.add_argument(opt.flag, dest=opt.dest, action="store_const", const="1", default=None,
                                help=_help_for(opt))
        elif opt.kind == "choice":
            parser.add_argument(opt.flag, dest=opt.dest, choices=opt.choices, default=None, help=_help_for(opt))
        else:
            parser.add_argument(opt.flag, dest=opt.dest, default=None, metavar=opt.dest.upper().removesuffix("_S"),
                                help=_help_for(opt))


def run_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="agent-sidecar",
        usage=USAGE,
        description="Runs CMD as the agent, captures its stdout and stderr byte for byte, and ships them to "
        "Redis as batched, compressed records (streams and pub/sub). Exits with the agent's exit code. "
        "Every option can also be set by the environment variable shown; a flag wins. "
        "REDIS_PASSWORD supplies the Redis password (preferred to putting it in the URL).",
    )
    add_options(parser, OPTIONS)
    parser.add_argument("--redact-pattern", dest="redact_patterns", action="append", default=None,
                        metavar="REGEX", help="also mask what this regular expression matches (repeatable) "
                        "[env SIDECAR_REDACT_PATTERNS, one per line]")
    return parser


# The sidecar's own credentials: the agent gets the environment without them.
PRIVATE_ENV = ("REDIS_PASSWORD", "SIDECAR_CONTROL_SECRET")


def agent_environment(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment for the agent: the sidecar's, less its Redis password and control
    secret (and REDIS_URL when the URL carries a password)."""
    from urllib.parse import urlsplit

    out = {k: v for k, v in env.items() if k not in PRIVATE_ENV}
    url = out.get("REDIS_URL", "")
    try:
        has_password = "+sentinel://" in url and "@" in url or urlsplit(url).password is not None
    except ValueError:
        has_password = True
    if has_password:
        del out["REDIS_URL"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("tail", "replay"):
        import signal

        signal.pthread_sigmask(signal.SIG_SETMASK, set())  # blocked early for the run command only
    if args and args[0] == "tail":
        from .tail import main as tail_main

        return tail_main(args[1:])
    if args and args[0] == "replay":
        from .replay import main as replay_main

        return replay_main(args[1:])
    if "--" in args:
        i = args.index("--")
        opts, command = args[:i], args[i + 1 :]
    else:
        opts, command = args, []
    parser = run_parser()
    ns = parser.parse_args(opts)
    if not command:
        usage_error("no agent command given: put it after --, e.g. python -m sidecar -- python agent.py")
    from . import config

    try:
        values = vars(ns)
        if values.get("redact_patterns"):
            values["redact_patterns"] = tuple(values["redact_patterns"])
        settings = config.build(values, dict(os.environ), tuple(command))
    except UsageError as exc:
        usage_error(str(exc))
    # The agent starts before the sidecar imports and wires its Redis side: its output waits
    # in the pipes meanwhile, and start-up overlaps with the agent's own.
    from agent_wrapper import signals
    from agent_wrapper.process import spawn

    signals.block()  # before any thread starts, so all inherit the mask
    signals.become_subreaper()
    launched = spawn(settings.command, agent_environment(os.environ))
    # Once the agent runs with the normal policy: SCHED_BATCH for this thread and every thread
    # it starts. The same share of the CPU, but a sidecar thread woken by a pipe or a reply no
    # longer preempts the agent, Redis or a consumer on the same core.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):
        pass  # not Linux, or refused: the normal policy
    from .app import run

    return run(settings, launched)
