import os
import sys

if __name__ == "__main__":
    try:
        from sidecar.cli import main

        code = main()
    except KeyboardInterrupt:  # Ctrl-C before the command took over its signals
        code = 130
    # Everything is delivered or spooled and every file is closed: skip the interpreter's
    # teardown of modules and daemon threads, which costs tens of milliseconds per agent.
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code if isinstance(code, int) else 1)
