# The C module behind `signal`, without its enum wrappers: importing enum would cost every
# start a millisecond or two before the agent is spawned.
import _signal as signal
import os
import sys

# The signals the run command takes synchronously (agent_wrapper.signals.WAITED), blocked
# before anything else is imported: as PID 1 a SIGTERM that arrives during start-up would
# otherwise be ignored by the kernel, and anywhere else it would kill the sidecar before the
# agent could be told. ``tail`` and ``replay`` unblock them.
EARLY_BLOCKED = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                           signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD})


def entry() -> None:
    """``python -m sidecar`` and the ``agent-sidecar`` console script."""
    signal.pthread_sigmask(signal.SIG_BLOCK, EARLY_BLOCKED)
    try:
        from sidecar.cli import main

        code = main()
    except KeyboardInterrupt:  # Ctrl-C before the command took over its signals
        code = 130
    # Everything is delivered or spooled and every file is closed: skip the interpreter's
    # teardown of modules and daemon threads, which costs tens of milliseconds per agent.
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: the descriptor was closed when Python started
                stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    entry()
