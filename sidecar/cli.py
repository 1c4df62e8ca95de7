"""Command line: `agent-sidecar [OPTIONS] -- CMD`, `agent-sidecar tail RUN_ID`, `agent-sidecar replay`."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .config import OPTIONS, UsageError, plain_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

USAGE = "python -m sidecar [OPTIONS] -- CMD [ARG...]\n       python -m sidecar tail RUN_ID [...]\n" \
        "       python -m sidecar replay [--spool-dir DIR] [...]\n       python -m sidecar acl-rules [OPTIONS]"


def usage_error(message: str, prog: str = "agent-sidecar") -> NoReturn:
    try:
        os.write(2, f"{prog}: error: {message} (see --help)\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass  # stderr gone (a closed pipe): the exit status still says it
    raise SystemExit(2)


REDACT_PATTERN = "--redact-pattern"  # the one repeatable flag (argparse: action="append")

# Packages a run imports after its agent has started, or only when it first needs them
# (protocol.py): one missing must stop the sidecar before the agent starts, not in the
# middle of the run.
RUN_PACKAGES = ("hiredis", "orjson", "zstandard")


def missing_error(missing: list[str], note: str) -> int:
    """Say which packages are missing, in one line; the exit status to return."""
    try:
        os.write(2, f"agent-sidecar: error: Python packages missing: {', '.join(missing)} (install agent-sidecar "
                    f"with its dependencies, e.g. pip install .){note}\n".encode())
    except OSError:
        pass
    return 1


def missing_packages(names: Sequence[str] = RUN_PACKAGES) -> list[str]:
    """The packages among ``names`` that no import finder can find (found, not imported)."""
    missing = []
    for name in names:
        if sys.modules.get(name) is not None:
            continue
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            try:
                if find is not None and find(name, None) is not None:
                    break
            except (ImportError, ValueError):
                continue
        else:
            missing.append(name)
    return missing


def quick_parse(opts: Sequence[str]) -> dict[str, Any] | None:
    """The values argparse would give for ``opts`` (see argv.run_parser), when every flag is
    in a plain form: its exact name, followed by its value as the next argument (one not
    starting with "-") or after "=". None for anything else (--help, an abbreviation, an
    unknown flag, a value starting with "-", an invalid choice, a missing value): argparse
    then parses or reports it. The usual command line thus starts the agent without
    importing argparse, whose import and parser cost every start a few milliseconds."""
    by_flag = {opt.flag: opt for opt in OPTIONS}
    values: dict[str, Any] = {opt.dest: None for opt in OPTIONS}
    values["redact_patterns"] = None
    i = 0
    while i < len(opts):
        arg = opts[i]
        i += 1
        flag, eq, value = arg.partition("=")
        opt = by_flag.get(flag)
        if opt is None and flag != REDACT_PATTERN or value == "--":
            return None  # argparse drops a value "--" (argv.py reports it)
        if opt is not None and opt.kind in ("bool", "negbool"):
            if eq:
                return None  # argparse: "ignored explicit argument"
            values[opt.dest] = "1"
            continue
        if not eq:
            if i >= len(opts) or opts[i].startswith("-"):
                return None
            value = opts[i]
            i += 1
        if opt is None:
            values["redact_patterns"] = [*(values["redact_patterns"] or ()), value]
        elif opt.kind == "choice" and value not in opt.choices:
            return None
        else:
            values[opt.dest] = value
    return values


# The sidecar's own credentials: the agent gets the environment without them.
PRIVATE_ENV = ("REDIS_PASSWORD", "SIDECAR_CONTROL_SECRET")


def agent_environment(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment for the agent: the sidecar's, less its Redis password and control
    secret (and REDIS_URL when the URL carries a password)."""
    out = {k: v for k, v in env.items() if k not in PRIVATE_ENV}
    url = out.get("REDIS_URL", "")
    if not url or plain_url(url):
        return out
    from urllib.parse import urlsplit

    try:
        has_password = "+sentinel://" in url and "@" in url or urlsplit(url).password is not None
    except ValueError:
        has_password = True
    if has_password:
        del out["REDIS_URL"]
    return out


def open_std_fds() -> None:
    """Put /dev/null on a standard descriptor that is closed: otherwise the agent's pipes could
    get numbers 0 to 2 and be taken for the sidecar's own stdin, stdout or stderr."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one, if lower ones are open
            if null != fd:
                os.dup2(null, fd)  # inheritable, as dup2 makes it
                os.close(null)
            else:
                os.set_inheritable(fd, True)  # os.open's are not: the agent would start without it
    # Python leaves sys.stdout and sys.stderr None when their descriptor was closed at its start.
    if sys.stdout is None:
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", errors="backslashreplace", closefd=False)  # noqa: SIM115


def subcommand(name: str, args: list[str]) -> int:
    """``tail`` or ``replay``, with Ctrl-C and SIGTERM working as usual. The signals blocked at
    start stay blocked until the modules with C parts are imported: a KeyboardInterrupt
    raised in the middle of an extension module's initialisation can crash the interpreter."""
    import signal

    missing = missing_packages(("orjson", "redis", "zstandard"))
    if missing:
        return missing_error(missing, "")
    if name == "tail":
        from .tail import main as run_it
    else:
        from .replay import main as run_it
    import orjson  # noqa: F401
    import redis  # noqa: F401
    import zstandard  # noqa: F401

    try:
        import hiredis  # noqa: F401 - what redis-py parses replies with, imported at its first connection
    except ImportError:
        pass

    signal.pthread_sigmask(signal.SIG_SETMASK, set())  # blocked early for the run command only
    return run_it(args)


def run_values(opts: list[str]) -> dict[str, Any]:
    """The run command's options, parsed (argparse exits on --help or a malformed flag)."""
    values = quick_parse(opts)
    if values is None:
        from .argv import run_parser

        values = vars(run_parser().parse_args(opts))
    return values


def run_settings(values: dict[str, Any], command: tuple[str, ...]) -> Any:
    """The run command's settings from its parsed options and the environment; a usage
    error exits."""
    from . import config

    try:
        if values.get("redact_patterns"):
            values["redact_patterns"] = tuple(values["redact_patterns"])
        return config.build(values, dict(os.environ), command)
    except UsageError as exc:
        usage_error(str(exc))


def acl_rules(opts: list[str]) -> int:
    """Print, one a line, the ACL rules of a Redis user for the sidecar these options make."""
    if "--" in opts:
        usage_error("acl-rules takes the run command's options, no agent command")
    s = run_settings(run_values(opts), ("true",))
    if s.run_id_generated or s.agent_id_generated:
        usage_error("acl-rules needs the run's ids: --run-id (RUN_ID) and --agent-id (AGENT_ID or POD_NAME)")
    from .acl import rules

    sys.stdout.write("".join(f"{rule}\n" for rule in rules(s)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    open_std_fds()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("tail", "replay"):
        return subcommand(args[0], args[1:])
    if args and args[0] == "acl-rules":
        return acl_rules(args[1:])
    if "--" in args:
        i = args.index("--")
        opts, command = args[:i], args[i + 1 :]
    else:
        opts, command = args, []
    values = run_values(opts)
    if not command:
        usage_error("no agent command given: put it after --, e.g. python -m sidecar -- python agent.py")
    settings = run_settings(values, tuple(command))
    missing = missing_packages()
    if missing:
        return missing_error(missing, "; the agent was not started")
    # The agent starts before the sidecar imports and wires its Redis side: its output waits
    # in the pipes meanwhile, and start-up overlaps with the agent's own.
    from agent_wrapper import signals
    from agent_wrapper.process import spawn

    from ._native import speedups

    signals.block()  # before any thread starts, so all inherit the mask
    signals.become_subreaper(speedups.set_child_subreaper if speedups is not None else None)
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
