# Sourced by the scripts: make sure .venv exists and holds the project with its test extras.
# Installs only when the project metadata (or this script's install command) changed since the
# last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "" >/dev/null 2>&1; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
# The editable install is a plain path entry (editable_mode=compat): setuptools' default
# import-hook finder is run by every interpreter in the venv at start-up and costs each
# sidecar, agent and test child about 20 ms that an installed package does not.
INSTALL_MODE="editable_mode=compat"
# The native module (sidecar/_speedups.c) is compiled by the install: a change to it installs again.
stamp="$VENV/.installed-$( (cat "$ROOT/pyproject.toml" "$ROOT/setup.py" "$ROOT/sidecar/_speedups.c"; echo "$INSTALL_MODE") \
    | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$PY" -m pip install --disable-pip-version-check -q -e "$ROOT[test,dev]" --config-settings "$INSTALL_MODE"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
# Bytecode for the project's own modules, as pip writes it when it installs a package: with
# PYTHONDONTWRITEBYTECODE set (CI sets it) every sidecar start would otherwise compile them
# from source. Up-to-date files are skipped; a stale .pyc is never used (Python checks the
# source's mtime).
"$PY" -m compileall -q "$ROOT/sidecar" "$ROOT/agent_wrapper" >/dev/null
