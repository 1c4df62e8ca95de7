"""The command line's fast path: quick_parse gives exactly what argparse gives, or steps aside;
plain_url accepts only URLs the full validation accepts, with no password in them."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar import config
from sidecar.argv import run_parser
from sidecar.cli import quick_parse
from sidecar.config import OPTIONS, UsageError, mask_url, plain_url

VALUE_OPTIONS = [o for o in OPTIONS if o.kind not in ("bool", "negbool")]
FLAG_OPTIONS = [o for o in OPTIONS if o.kind in ("bool", "negbool")]


def argparse_values(opts: list[str]) -> dict[str, Any]:
    return vars(run_parser().parse_args(opts))


def a_value(rng: random.Random, opt: config.Option) -> str:
    if opt.kind == "choice":
        return rng.choice(opt.choices)
    return rng.choice(["5", "redis://h:1/0", "run:{run_id}:x", "", "a b", "x=y", "10m", "1.5", "ü", "a-b"])


def plain_command_line(rng: random.Random) -> list[str]:
    opts: list[str] = []
    for _ in range(rng.randrange(0, 8)):
        kind = rng.random()
        if kind < 0.2:
            opts.append(rng.choice(FLAG_OPTIONS).flag)
        elif kind < 0.3:
            opts += ["--redact-pattern", rng.choice(["sk-[a-z]+", "x=y", ""])]
        else:
            opt = rng.choice(VALUE_OPTIONS)
            value = a_value(rng, opt)
            opts += [f"{opt.flag}={value}"] if rng.random() < 0.4 else [opt.flag, value]
    return opts


def test_plain_command_lines_are_parsed_as_argparse_parses_them() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        opts = plain_command_line(rng)
        quick = quick_parse(opts)
        assert quick is not None, opts
        assert quick == argparse_values(opts), opts


@pytest.mark.parametrize(
    "opts",
    [
        ["--redis-url", "redis://h:1/0", "--no-echo", "--run-id", "r1", "--linger-ms=2"],
        ["--run-id", "a", "--run-id", "b"],
        ["--redact-pattern", "a", "--redact-pattern=b"],
        ["--compress-threshold=-1"],
        ["--transport=stream", "--wire", "per-line-json"],
        ["--output-channel="],
        [],
    ],
)
def test_the_usual_forms_take_the_fast_path(opts: list[str]) -> None:
    quick = quick_parse(opts)
    assert quick is not None
    assert quick == argparse_values(opts)


@pytest.mark.parametrize(
    "opts",
    [
        ["-h"],
        ["--help"],
        ["--redis-ur", "redis://h:1/0"],  # an abbreviation argparse accepts
        ["--nope"],
        ["--no-echo=1"],
        ["--transport", "carrier-pigeon"],
        ["--transport=carrier-pigeon"],
        ["--run-id"],
        ["--compress-threshold", "-1"],  # argparse takes it as a negative number
        ["--run-id", "--no-echo"],
        ["positional"],
        [""],
    ],
)
def test_anything_else_is_left_to_argparse(opts: list[str]) -> None:
    assert quick_parse(opts) is None


def test_left_to_argparse_means_the_same_result_or_the_same_error() -> None:
    assert argparse_values(["--compress-threshold", "-1"])["compress_threshold"] == "-1"
    assert argparse_values(["--redis-ur", "redis://h:1/0"])["redis_url"] == "redis://h:1/0"
    with pytest.raises(SystemExit):
        argparse_values(["--no-echo=1"])


# -- plain URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://h", "redis://h/", "rediss://c.example.com:6380/2",
                                 "redis://redis-0.redis_svc:1", "redis://10.0.0.1:65535/15"])
def test_plain_urls(url: str) -> None:
    assert plain_url(url)


@pytest.mark.parametrize("url", ["redis://u:pw@h:1/0", "redis://[::1]:6379/0", "unix:///tmp/r.sock", "redis://h:0",
                                 "redis://h:99999", "redis://h:", "redis://h/0/1", "redis://h/x", "redis:///0",
                                 "redis://h?db=1", "redis://h#f", "redis+sentinel://h:26379/m", "http://h",
                                 "redis://h:６３７９", "redis://h/０", "redis://h%41", "redis://h\t:1", ""])
def test_urls_that_take_the_full_check(url: str) -> None:
    assert not plain_url(url)


def full_check(url: str, monkeypatch: pytest.MonkeyPatch) -> bool:
    with monkeypatch.context() as m:
        m.setattr(config, "plain_url", lambda _url: False)
        try:
            config.validate_url(url)
        except UsageError:
            return False
        return True


def test_a_plain_url_is_one_the_full_check_accepts_and_has_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    alphabet = "redis:/@[]?#%.-_:0123456789hxé \t"
    seen_plain = 0
    for _ in range(20000):
        url = rng.choice(["redis://", "rediss://", "redis:/", "unix://", ""]) + "".join(
            rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        if plain_url(url):
            seen_plain += 1
            assert full_check(url, monkeypatch), url
            assert urlsplit(url).password is None
            assert mask_url(url) == url
    assert seen_plain > 500


@pytest.mark.parametrize("opts", [["--run-id=--"], ["--redact-pattern=--"], ["--batch-max-records=--"],
                                  ["--run-id", "x", "--run-id=--"]])
def test_a_value_of_exactly_two_dashes_is_a_usage_error(opts: list[str]) -> None:
    """argparse turns `--flag=--` into an empty list: reported, never passed on as a value."""
    assert quick_parse(opts) is None
    with pytest.raises(SystemExit) as exc:
        run_parser().parse_args(opts)
    assert exc.value.code == 2


@pytest.mark.parametrize("argv", [["--run-id=--", "--", "touch"], ["--redis-url=--", "--", "touch"],
                                  ["tail", "r", "--redis-url=--"], ["tail", "r", "--variation=--"],
                                  ["replay", "--timeout=--"], ["replay", "--spool-dir=--"]])
def test_two_dashes_as_a_value_give_one_line_and_exit_2(argv: list[str], tmp_path: Any) -> None:
    marker = tmp_path / "started"
    if argv[-1] == "touch":
        argv = [*argv, str(marker)]
    cp = subprocess.run([sys.executable, "-m", "sidecar", *argv], capture_output=True, timeout=60,
                        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    lines = cp.stderr.decode().strip().splitlines()
    assert cp.returncode == 2, cp.stderr
    assert len(lines) == 1 and "expected one argument, not '--'" in lines[0], lines
    assert not marker.exists()


def test_replay_of_a_spool_dir_that_is_a_file_is_a_usage_error(tmp_path: Any) -> None:
    """A mistyped --spool-dir naming a file must not read as "nothing to replay", exit 0."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    afile = tmp_path / "not-a-dir"
    afile.write_text("x")
    base = [sys.executable, "-m", "sidecar", "replay", "--redis-url", "redis://127.0.0.1:1/0", "--spool-dir"]
    cp = subprocess.run([*base, str(afile)], capture_output=True, timeout=60, cwd=root)
    assert cp.returncode == 2 and cp.stderr.decode().strip() == \
        f"agent-sidecar replay: error: --spool-dir {afile} is not a directory", cp.stderr
    cp = subprocess.run([*base, str(tmp_path / "absent")], capture_output=True, timeout=60, cwd=root)
    assert cp.returncode == 0 and b"nothing to replay" in cp.stderr, cp.stderr


@pytest.mark.parametrize("argv", [["tail", "r"], ["replay", "--spool-dir", "absent-spool-dir"]])
def test_ctrl_c_while_tail_or_replay_starts_never_crashes(argv: list[str], tmp_path: Any) -> None:
    """A SIGINT anywhere in start-up: exit 130 (or the command's own status if it was done),
    never a crash. One that lands inside an extension module's initialisation (orjson's,
    25-40 ms in on this machine) used to kill the interpreter with SIGSEGV."""
    import signal
    import time

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    codes = []
    for i in range(32):
        proc = subprocess.Popen([sys.executable, "-m", "sidecar", *argv, "--redis-url", "redis://127.0.0.1:1/0"],
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": root},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.005 + (i % 16) * 0.005)
        proc.send_signal(signal.SIGINT)
        codes.append(proc.wait(timeout=60))
    # -SIGINT: the signal came before the interpreter installed its handler, as for any Python program.
    assert set(codes) <= {130, 1, 0, -signal.SIGINT}, codes
    assert 130 in codes, codes
