"""The argparse side of the command line: --help, and flags in any form argparse takes.

Kept apart from cli.py: a run whose flags are all in their plain forms starts its agent
without importing argparse (see cli.quick_parse).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cli import USAGE, usage_error
from .config import OPTIONS, Option

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn


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
        usage_error(message, self.prog)

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        """As argparse, but a value given as exactly "--" (``--run-id=--``), which argparse
        turns into an empty list, is a usage error rather than a list where text belongs."""
        ns, rest = super().parse_known_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            if action.option_strings and isinstance(value, list) and (value == [] or [] in value):
                self.error(f"argument {'/'.join(action.option_strings)}: expected one argument, not '--'")
        return ns, rest


def _help_for(opt: Option) -> str:
    env = f"env {opt.env}" if opt.env else "no env"
    default = {"negbool": f"{opt.dest} on", "bool": "off"}.get(opt.kind, opt.default)
    if default is None:  # unset unless given (the help says what happens then)
        return f"{opt.help} [{env}]"
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
