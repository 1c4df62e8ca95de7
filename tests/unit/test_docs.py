"""The README's configuration table lists every option the CLI accepts, with its environment variable."""

from __future__ import annotations

from pathlib import Path

from sidecar.config import OPTIONS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_option_is_in_the_readme_table() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| `--") or line.startswith("| |")]
    table = "\n".join(rows)
    missing = [o.flag for o in OPTIONS if f"`{o.flag}`" not in table or (o.env and f"`{o.env}`" not in table)]
    assert missing == []


def test_readme_has_no_placeholders() -> None:
    assert "PERFORMANCE_TABLE" not in README and "CAPACITY_TABLE" not in README
