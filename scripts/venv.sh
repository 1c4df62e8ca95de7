# Sourced by the scripts: make sure .venv exists and holds the project with its test extras.
# Installs only when the project metadata changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
if [ ! -x "$PY" ] || ! "$PY" -c "" >/dev/null 2>&1; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$PY" -m pip install --disable-pip-version-check -q -e "$ROOT[test,dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
