"""Settings: flag > environment > default, conversions, validation, URL masking."""

from __future__ import annotations

import os
import re
import socket
import tempfile
from typing import Any

import pytest

from sidecar import config
from sidecar.config import OPTIONS, Settings, UsageError, build, mask_url

ALL_DESTS = [o.dest for o in OPTIONS]


def mk(
    values: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    command: tuple[str, ...] = ("agent",),
) -> Settings:
    vals: dict[str, Any] = {d: None for d in ALL_DESTS}
    vals.update(values or {})
    return build(vals, dict(env or {}), command)


def option(dest: str) -> config.Option:
    return next(o for o in OPTIONS if o.dest == dest)


# -- defaults and precedence -------------------------------------------------------------


def test_defaults() -> None:
    s = mk(env={"POD_NAME": "pod-a", "RUN_ID": "run1"})
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.redis_password is None
    assert s.run_id == "run1"
    assert s.run_id_generated is False
    assert s.variation_id == "0"
    assert s.agent_id == "pod-a"
    assert s.echo is True
    assert s.log_format == "text"
    assert s.log_level == "info"
    assert s.transport == "both"
    assert s.wire == "batch"
    assert s.output_channel == "run:{run_id}:output:{variation_id}"
    assert s.batch_max_records == 1000
    assert s.batch_max_bytes == 256 * 1024
    assert s.linger_ms == 5.0
    assert s.compress_threshold == 1024
    assert s.max_line_bytes == 1 << 20
    assert s.buffer_max_bytes == 64 << 20
    assert s.spool_dir == os.path.join(tempfile.gettempdir(), "agent-sidecar-spool")
    assert s.spool_max_bytes == 1 << 30
    assert s.when_full == "block"
    assert s.drain_timeout_s == 10.0
    assert s.retention_s == 86400.0
    assert s.max_stream_len == 1_000_000
    assert s.command == ("agent",)


def test_values_dict_may_omit_options() -> None:
    s = build({}, {"RUN_ID": "r"}, ("x", "y"))
    assert s.run_id == "r"
    assert s.command == ("x", "y")
    assert s.transport == "both"


@pytest.mark.parametrize(
    ("dest", "env_name", "flag_value", "env_value", "default", "flag_expect", "env_expect"),
    [
        ("transport", "SIDECAR_TRANSPORT", "stream", "pubsub", "both", "stream", "pubsub"),
        ("variation_id", "VARIATION_ID", "v-flag", "v-env", "0", "v-flag", "v-env"),
        ("batch_max_records", "SIDECAR_BATCH_MAX_RECORDS", "7", "9", 1000, 7, 9),
        ("buffer_max_bytes", "SIDECAR_BUFFER_MAX_BYTES", "1k", "2k", 64 << 20, 1024, 2048),
        ("linger_ms", "SIDECAR_LINGER_MS", "1.5", "2.5", 5.0, 1.5, 2.5),
        ("retention_s", "SIDECAR_RETENTION", "1h", "2m", 86400.0, 3600.0, 120.0),
        (
            "redis_url",
            "REDIS_URL",
            "redis://flag:1/1",
            "redis://env:2/2",
            "redis://localhost:6379/0",
            "redis://flag:1/1",
            "redis://env:2/2",
        ),
        (
            "output_channel",
            "SIDECAR_OUTPUT_CHANNEL",
            "f:{run_id}",
            "e:{run_id}",
            "run:{run_id}:output:{variation_id}",
            "f:{run_id}",
            "e:{run_id}",
        ),
    ],
)
def test_flag_beats_env_beats_default(
    dest: str, env_name: str, flag_value: str, env_value: str, default: Any, flag_expect: Any, env_expect: Any
) -> None:
    assert getattr(mk(), dest) == default
    assert getattr(mk(env={env_name: env_value}), dest) == env_expect
    assert getattr(mk({dest: flag_value}), dest) == flag_expect
    assert getattr(mk({dest: flag_value}, {env_name: env_value}), dest) == flag_expect


def test_empty_env_value_is_ignored() -> None:
    s = mk(env={"SIDECAR_TRANSPORT": "", "SIDECAR_BATCH_MAX_RECORDS": "", "RUN_ID": ""})
    assert s.transport == "both"
    assert s.batch_max_records == 1000
    assert s.run_id_generated is True


def test_unrelated_env_is_ignored() -> None:
    s = mk(env={"TRANSPORT": "stream", "BATCH_MAX_RECORDS": "3"})
    assert s.transport == "both"
    assert s.batch_max_records == 1000


# -- conversions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512", 512),
        ("512b", 512),
        ("1k", 1024),
        ("1K", 1024),
        ("1kib", 1024),
        ("1KiB", 1024),
        ("1kb", 1000),
        ("64MiB", 64 << 20),
        ("64m", 64 << 20),
        ("2MB", 2_000_000),
        ("1g", 1 << 30),
        ("1GiB", 1 << 30),
        ("3gb", 3_000_000_000),
        (" 8 kib ", 8192),
        ("1.5k", 1536),
        ("0", 0),
    ],
)
def test_bytes_conversion(text: str, expected: int) -> None:
    assert config.parse_bytes(text) == expected
    assert mk({"buffer_max_bytes": text}).buffer_max_bytes == expected
    assert mk(env={"SIDECAR_SPOOL_MAX_BYTES": text}).spool_max_bytes == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("24h", 86400.0),
        ("30m", 1800.0),
        ("90s", 90.0),
        ("2d", 172800.0),
        ("45", 45.0),
        ("0.5h", 1800.0),
        ("0", 0.0),
        ("1.25", 1.25),
        ("10M", 600.0),
    ],
)
def test_duration_conversion(text: str, expected: float) -> None:
    assert config.parse_duration(text) == expected
    assert mk({"retention_s": text}).retention_s == expected


def test_int_and_float_conversion() -> None:
    s = mk(
        {
            "batch_max_records": "17",
            "compress_threshold": "-1",
            "max_stream_len": "0",
            "linger_ms": "0.25",
            "kill_grace_s": "3",
            "socket_timeout_s": "0.5",
        }
    )
    assert s.batch_max_records == 17
    assert isinstance(s.batch_max_records, int)
    assert s.compress_threshold == -1
    assert s.max_stream_len == 0
    assert s.linger_ms == 0.25
    assert s.kill_grace_s == 3.0
    assert isinstance(s.kill_grace_s, float)
    assert s.socket_timeout_s == 0.5


def test_non_string_values_pass_through() -> None:
    s = mk({"batch_max_records": 5, "linger_ms": 1.0})
    assert s.batch_max_records == 5
    assert s.linger_ms == 1.0


def test_negbool_no_echo() -> None:
    assert mk().echo is True
    assert mk({"echo": "1"}).echo is False  # --no-echo given
    assert mk(env={"SIDECAR_NO_ECHO": "1"}).echo is False
    for truthy in ("true", "TRUE", "yes", "on", " 1 "):
        assert mk(env={"SIDECAR_NO_ECHO": truthy}).echo is False, truthy
    for falsy in ("0", "false", "no", "off"):
        assert mk(env={"SIDECAR_NO_ECHO": falsy}).echo is True, falsy
    assert mk({"echo": "1"}, {"SIDECAR_NO_ECHO": "0"}).echo is False
    assert mk(env={"SIDECAR_NO_ECHO": ""}).echo is True  # set but empty: as if unset


@pytest.mark.parametrize("env", ["SIDECAR_NO_ECHO", "SIDECAR_NO_REDACT", "SIDECAR_CLUSTER_HASH_TAG"])
@pytest.mark.parametrize("value", ["maybe", "2", "y", "enabled"])
def test_a_boolean_variable_that_says_neither_is_a_usage_error(env: str, value: str) -> None:
    with pytest.raises(UsageError, match=env):
        mk(env={env: value})


@pytest.mark.parametrize(
    ("dest", "value"),
    [
        ("batch_max_records", "ten"),
        ("batch_max_records", "1.5"),
        ("batch_max_records", "1k"),
        ("compress_threshold", "big"),
        ("linger_ms", "abc"),
        ("linger_ms", "-1"),
        ("drain_timeout_s", "-0.5"),
        ("buffer_max_bytes", "lots"),
        ("buffer_max_bytes", "-1k"),
        ("buffer_max_bytes", "k"),
        ("buffer_max_bytes", "1x"),
        ("spool_max_bytes", "-5"),
        ("retention_s", "-5m"),
        ("retention_s", "xh"),
        ("retention_s", "1w"),
    ],
)
def test_bad_numbers(dest: str, value: str) -> None:
    opt = option(dest)
    with pytest.raises(UsageError) as exc_info:
        mk({dest: value})
    msg = str(exc_info.value)
    assert opt.flag in msg
    assert repr(value) in msg
    assert opt.env is not None and opt.env in msg
    # The same through the environment.
    with pytest.raises(UsageError):
        mk(env={opt.env: value})


@pytest.mark.parametrize("value", ["1e400k", "infk", "1e400"])
def test_overflowing_byte_sizes_are_usage_errors(value: str) -> None:
    with pytest.raises(UsageError):
        mk({"buffer_max_bytes": value})


@pytest.mark.parametrize(
    ("dest", "value"),
    [
        ("batch_max_records", "0"),
        ("batch_max_records", "-3"),
        ("batch_max_bytes", "0"),
        ("max_line_bytes", "0"),
    ],
)
def test_limits_below_one(dest: str, value: str) -> None:
    with pytest.raises(UsageError):
        mk({dest: value})


@pytest.mark.parametrize(
    ("dest", "value"),
    [
        ("transport", "tcp"),
        ("transport", "BOTH-"),
        ("log_level", "verbose"),
        ("log_format", "xml"),
        ("wire", "jsonl"),
        ("when_full", "DROPS"),
        ("when_full", ""),
    ],
)
def test_bad_choice(dest: str, value: str) -> None:
    with pytest.raises(UsageError) as exc_info:
        config.convert(option(dest), value)
    assert option(dest).flag in str(exc_info.value)
    if value:
        with pytest.raises(UsageError):
            mk({dest: value})


@pytest.mark.parametrize(
    ("dest", "value"),
    [
        ("transport", "pubsub"),
        ("log_level", "debug"),
        ("wire", "per-line-json"),
        ("when_full", "drop"),
        ("log_format", "json"),
    ],
)
def test_good_choice(dest: str, value: str) -> None:
    assert getattr(mk({dest: value}), dest) == value


@pytest.mark.parametrize(
    ("transport", "stream", "pubsub"),
    [("both", True, True), ("stream", True, False), ("pubsub", False, True)],
)
def test_transport_properties(transport: str, stream: bool, pubsub: bool) -> None:
    s = mk({"transport": transport})
    assert s.use_stream is stream
    assert s.use_pubsub is pubsub


# -- URLs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost:6379/0",
        "redis://h",
        "redis://h/",
        "rediss://cache.example.com:6380/2",
        "redis://user:pw@h:1/15",
        "redis://h/2147483647",
        "redis://[::1]:6379/0",
        "redis://[fe80::1%25eth0]:6379/0",
        "redis://u:p%25w%41@h/0",
        "redis://my_cache-0.svc.cluster.local:6379/0",
        "unix:///tmp/redis.sock",
        "unix:///tmp/redis.sock?db=1",
        "unix:///run/redis@main/redis.sock",
        "unix://u:pw@/run/redis@main/redis.sock",
        "redis+sentinel://s1:26379,s2:26379,[::1]:26379/mymaster/2",
        "redis+sentinel://u:p%25w@s1/mymaster",
        "rediss+sentinel://s1:26379/mymaster",
    ],
)
def test_valid_urls(url: str) -> None:
    assert mk({"redis_url": url}).redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "foo://x",
        "http://h:6379",
        "localhost:6379",
        "redis://host:99999",
        "redis://h:0",
        "redis://h:port",
        "redis://:pw@/",
        "redis:///0",
        "redis://",
        "redis://h/abc",
        "redis://h/-1",
        "redis://h/0/1",
        "redis://h/2147483648",
        "redis://h/" + "1" * 5000,
        "redis+sentinel://h:26379/mymaster/2147483648",
        "redis+sentinel://h:26379/mymaster/-1",
        "redis+sentinel://h:26379/mymaster/\u0661",
        "redis+sentinel://h:99999/mymaster",
        "redis+sentinel://h:-1/mymaster",
        "redis+sentinel://h:26379/mymaster/0/extra",
        "redis+sentinel://h:26379/mymaster?x=y",
        "redis+sentinel://h:26379/mymaster#frag",
        "redis+sentinel://bad_host!:26379/mymaster",
        "redis+sentinel://h%41:26379/mymaster",
        "redis+sentinel://h:26379,/mymaster",
        "redis+sentinel://:26379/mymaster",
        "redis+sentinel://[::1:26379/mymaster",
        "redis+sentinel://u:pw%zz@h:26379/mymaster",
        "unix:///tmp/r.sock#frag",
        "redis://h:1/99999999999",
        "redis://h/\u00b2",
        "unix:///tmp/r.sock?db=2147483648",
        "unix://",
        "redis://127.0.0.1 :6379/0",
        "redis://x y/0",
        "redis://h\t/0",
        "redis://h/0#frag",
        "redis://h/0#",
        "redis://us%zzer:pw@h/0",
        "redis://u:pw%4@h/0",
        "redis://u:pw%@h/0",
        "redis://h%zz/0",
        "redis://h%/0",
    ],
)
def test_invalid_urls(url: str) -> None:
    with pytest.raises(UsageError):
        mk({"redis_url": url})
    with pytest.raises(UsageError):
        mk(env={"REDIS_URL": url})


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:s3cr3tPW@h:99999/0",
        "redis://:s3cr3tPW@/",
        "redis://u:s3cr3tPW@h/abc",
        "foo://u:s3cr3tPW@h",
    ],
)
def test_url_errors_do_not_leak_password(url: str) -> None:
    with pytest.raises(UsageError) as exc_info:
        mk({"redis_url": url})
    assert "s3cr3tPW" not in str(exc_info.value)


def test_mask_url_hides_password() -> None:
    masked = mask_url("redis://user:secret@h:6379/0")
    assert masked == "redis://user:***@h:6379/0"
    assert "secret" not in masked


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:secret@h", "redis://:***@h"),
        (
            "rediss://admin:secret@cache:6380/3?ssl_cert_reqs=none",
            "rediss://admin:***@cache:6380/3?ssl_cert_reqs=none",
        ),
        ("redis://u:sec@ret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u:secret@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://u:sec,ret@n0:1,n1:2/0", "redis://u:***@n0:1,n1:2/0"),
        ("redis://u:Ab+c/DeF9==@h:1/0", "redis://u:***@h:1/0"),
        ("unix://u:secret@/run/a:b@c/r.sock", "unix://u:***@/run/a:b@c/r.sock"),
        ("unix:///run/a:b@c/r.sock", "unix:///run/a:b@c/r.sock"),
    ],
)
def test_mask_url_variants(url: str, expected: str) -> None:
    masked = mask_url(url)
    assert masked == expected
    assert "secret" not in masked
    assert "ret@" not in masked


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "redis://user@h:6379", "unix:///tmp/r.sock", "rediss://h/1", "garbage"],
)
def test_mask_url_without_password_is_unchanged(url: str) -> None:
    assert mask_url(url) == url


def test_redis_password_from_env() -> None:
    assert mk(env={"REDIS_PASSWORD": "hunter2"}).redis_password == "hunter2"
    assert mk().redis_password is None
    assert mk(env={"REDIS_PASSWORD": ""}).redis_password is None


# -- channel templates -------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", ["run:{nope}", "run:{0}", "run:{}", "run:{", "run:}", "{run_id!x}", "{run_id:d}"]
)
@pytest.mark.parametrize("dest", ["output_channel", "logs_channel", "status_channel"])
def test_bad_channel_template(dest: str, template: str) -> None:
    with pytest.raises(UsageError) as exc_info:
        mk({dest: template})
    assert f"--{dest.replace('_', '-')} / SIDECAR_{dest.upper()}" in str(exc_info.value)


def test_template_with_attribute_lookup_is_usage_error() -> None:
    with pytest.raises(UsageError) as exc_info:
        mk({"output_channel": "run:{run_id.nope}"})
    assert "--output-channel / SIDECAR_OUTPUT_CHANNEL" in str(exc_info.value)


def test_channel_substitution() -> None:
    s = mk(
        {
            "run_id": "R",
            "variation_id": "V",
            "agent_id": "A",
            "output_channel": "o:{agent_id}:{run_id}:{variation_id}",
        }
    )
    assert s.channel(s.output_channel) == "o:A:R:V"
    assert s.channel(s.logs_channel) == "run:R:logs:V"
    assert s.channel(s.status_channel) == "run:R:status"
    assert s.channel("{{literal}}:{run_id}") == "{literal}:R"


# -- ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dest", ["run_id", "variation_id", "agent_id"])
@pytest.mark.parametrize("bad", ["a b", "a{b", "a}b", "{run_id}", "a\nb", "a\rb", "a\0b", " ", "r\u00a0x", "r\u3000x",
                                 "r\u2028x", "r\u200bx", "r\x85x"])
def test_ids_with_spaces_braces_or_controls(dest: str, bad: str) -> None:
    with pytest.raises(UsageError) as exc_info:
        mk({dest: bad})
    assert dest in str(exc_info.value)


def test_ids_in_other_scripts_are_fine() -> None:
    assert mk({"agent_id": "agent-\u00e9t\u00e9-\u4e2d\u6587"}).agent_id == "agent-\u00e9t\u00e9-\u4e2d\u6587"


def test_empty_ids() -> None:
    """An empty value is as if none was given, from a flag as from a variable."""
    s = mk({"run_id": "", "agent_id": "", "variation_id": ""}, {"POD_NAME": "pod-1"})
    assert s.run_id_generated and len(s.run_id) == 16 and s.agent_id == "pod-1" and s.variation_id == "0"
    s = mk({"run_id": "", "agent_id": "", "variation_id": "", "spool_dir": "", "output_channel": ""},
           {"RUN_ID": "r-env", "AGENT_ID": "a-env", "VARIATION_ID": "3", "SIDECAR_SPOOL_DIR": "/var/sp"})
    assert (s.run_id, s.agent_id, s.variation_id, s.spool_dir) == ("r-env", "a-env", "3", "/var/sp")
    assert not s.run_id_generated and s.output_channel == config.DEFAULT_OUTPUT
    with pytest.raises(UsageError, match="empty"):
        config.check_id("RUN_ID", "")


def test_bad_pod_name_is_rejected_as_agent_id() -> None:
    with pytest.raises(UsageError):
        mk(env={"POD_NAME": "my pod"})


def test_generated_run_id() -> None:
    a = mk()
    b = mk()
    assert a.run_id_generated is True
    assert re.fullmatch(r"[0-9a-f]{16}", a.run_id)
    assert re.fullmatch(r"[0-9a-f]{16}", b.run_id)
    assert a.run_id != b.run_id


def test_given_run_id_not_generated() -> None:
    assert mk(env={"RUN_ID": "from-env"}).run_id_generated is False
    s = mk({"run_id": "from-flag"}, {"RUN_ID": "from-env"})
    assert (s.run_id, s.run_id_generated) == ("from-flag", False)


def test_agent_id_sources() -> None:
    assert mk(env={"POD_NAME": "pod-xyz-1"}).agent_id == "pod-xyz-1"
    assert mk(env={"POD_NAME": "pod", "AGENT_ID": "env-agent"}).agent_id == "env-agent"
    assert (
        mk({"agent_id": "flag-agent"}, {"POD_NAME": "pod", "AGENT_ID": "env-agent"}).agent_id == "flag-agent"
    )
    assert mk().agent_id == f"{socket.gethostname()}-{os.getpid()}"
    assert mk(env={"POD_NAME": ""}).agent_id == f"{socket.gethostname()}-{os.getpid()}"


def test_build_connection_has_no_command() -> None:
    s = config.build_connection({"run_id": "r"}, {})
    assert s.command == ()
    assert s.run_id == "r"


def test_settings_are_frozen() -> None:
    s = mk()
    with pytest.raises(AttributeError):
        s.run_id = "other"  # type: ignore[misc]


# -- values that would break the run later are refused up front ----------------------------


@pytest.mark.parametrize(("dest", "raw"), [
    ("drain_timeout_s", "1e12"), ("drain_timeout_s", "inf"), ("socket_timeout_s", "nan"), ("socket_timeout_s", "0"),
    ("retention_s", "inf"), ("retention_s", "nan"), ("retention_s", "1e30"), ("max_stream_len", "-5"),
    ("kill_grace_s", "nan"), ("heartbeat_interval_s", "inf"), ("compress_threshold", "-2"),
    ("buffer_max_bytes", "1e30"), ("spool_max_bytes", "nan"), ("min_replicas_ack", "-1"),
    ("retry_max_s", "0"), ("retry_max_s", "0.01"),
])
def test_non_finite_negative_or_huge_numbers_are_usage_errors(dest: str, raw: str) -> None:
    with pytest.raises(UsageError):
        mk({dest: raw})


@pytest.mark.parametrize(("dest", "raw", "value"), [
    ("compress_threshold", "-1", -1), ("retention_s", "0", 0.0), ("max_stream_len", "0", 0),
    ("heartbeat_interval_s", "0", 0.0), ("retention_s", "7d", 604800.0), ("buffer_max_bytes", "1GiB", 1 << 30),
])
def test_documented_special_and_suffixed_values_still_work(dest: str, raw: str, value: float) -> None:
    assert getattr(mk({dest: raw}), dest) == value


@pytest.mark.parametrize("template", ["{run_id:>99999999999}", "{run_id!r}", "{run_id.x}", "{0}", "{nope}", "{",
                                      "run:{run_id}:{variation_id[0]}"])
def test_channel_templates_take_plain_placeholders_only(template: str) -> None:
    with pytest.raises(UsageError):
        mk({"output_channel": template})


@pytest.mark.parametrize(("values", "fragment"), [
    ({"logs_channel": "run:{run_id}:output:{variation_id}"}, "both resolve"),
    ({"status_channel": "run:{run_id}:output:{variation_id}"}, "both resolve"),
    ({"output_channel": "run:{run_id}:tokens"}, "something else"),
    ({"output_channel": "run:{run_id}:variation:{variation_id}"}, "something else"),
    ({"logs_channel": "run:{run_id}:control"}, "something else"),
    ({"output_channel": "x:idem"}, "something else"),
    ({"output_channel": "agent:{agent_id}:alive"}, "something else"),  # the heartbeat's SET would overwrite it
    ({"logs_channel": "agent:{agent_id}:heartbeat"}, "something else"),
    ({"status_channel": "agent:x:heartbeat", "agent_id": "x"}, "something else"),
    ({"output_channel": "metrics:agent:tokens"}, "something else"),
    ({"logs_channel": "run:{agent_id}:output:0", "run_id": "a", "agent_id": "a"}, "both resolve"),
])
def test_output_logs_and_status_need_keys_of_their_own(values: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=fragment):
        mk(values)


def test_unix_socket_database_must_be_a_number() -> None:
    with pytest.raises(UsageError, match="database"):
        mk({"redis_url": "unix:///tmp/r.sock?db=abc"})
    assert mk({"redis_url": "unix:///tmp/r.sock?db=3"}).redis_url.endswith("db=3")


@pytest.mark.parametrize(("patterns", "fragment"), [
    (("(password)?",), "empty string"),
    (("ab[",), "unterminated"),
    (("(?P<a>x)", "(?P<a>y)"), "combined"),
    (("x(?i)y",), "global flags"),
    (("(\\w+\\s?)+=",), "repeats a repeat"),
    (("ok=\\S+", "(?i)(?:[a-z]*,)*x"), "repeats a repeat"),
    (("(?:(?=(a+)+))b",), "repeats a repeat"),
])
def test_redact_patterns_are_checked_as_they_will_be_used(patterns: tuple[str, ...], fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        mk({"redact_patterns": patterns})


@pytest.mark.parametrize("pattern", ["(\\d{1,3}\\.){3}\\d+", "(?:ab|cd)+", "(\\w++\\s?)+=", "(?>\\w+\\s?)+=",
                                     "(a+)?b", "token: *[a-z0-9]+"])
def test_redact_patterns_without_a_repeated_repeat_are_accepted(pattern: str) -> None:
    assert mk({"redact_patterns": (pattern,)}).redact_patterns == (pattern,)


def test_redact_patterns_variable_with_crlf_lines() -> None:
    s = mk(env={"SIDECAR_REDACT_PATTERNS": "ID-\\d+\r\nfoo\r\n"})
    assert s.redact_patterns == ("ID-\\d+", "foo")


def test_leading_inline_flags_in_a_redact_pattern_are_accepted() -> None:
    assert mk({"redact_patterns": ("(?i)password=\\S+", "(?s)(?x) a . b")}).redact_patterns


def test_every_seconds_option_takes_duration_suffixes() -> None:
    s = mk({"drain_timeout_s": "2m", "kill_grace_s": "1.5s", "heartbeat_interval_s": "1m", "socket_timeout_s": "2s",
            "pipe_grace_s": "0", "retry_max_s": "1m"})
    assert (s.drain_timeout_s, s.kill_grace_s, s.heartbeat_interval_s, s.socket_timeout_s, s.retry_max_s) == (
        120.0, 1.5, 60.0, 2.0, 60.0)


@pytest.mark.parametrize("url", ["redis://h:6379/0?db=2", "rediss://h/0?ssl_cert_reqs=none", "redis://h/?foo=1",
                                 "unix:///tmp/r.sock?db=1&foo=2"])
def test_query_parameters_are_refused(url: str) -> None:
    with pytest.raises(UsageError, match="query"):
        mk({"redis_url": url})


def test_read_commands_ignore_bad_values_of_options_they_do_not_use() -> None:
    from sidecar.config import CONNECTION_OPTIONS, build_connection

    vals = {o.dest: None for o in OPTIONS}
    s = build_connection(vals, {"SIDECAR_LINGER_MS": "abc", "REDIS_URL": "redis://h:1/0"}, CONNECTION_OPTIONS)
    assert s.redis_url == "redis://h:1/0"
    with pytest.raises(UsageError):
        build_connection(vals, {"SIDECAR_SOCKET_TIMEOUT": "abc"}, CONNECTION_OPTIONS)


def test_the_agent_does_not_get_the_sidecars_credentials() -> None:
    from sidecar.cli import agent_environment

    env = {"REDIS_PASSWORD": "pw", "SIDECAR_CONTROL_SECRET": "s", "REDIS_URL": "redis://u:pw@h:6379/0",
           "OPENAI_API_KEY": "sk-x", "PATH": "/bin"}
    assert agent_environment(env) == {"OPENAI_API_KEY": "sk-x", "PATH": "/bin"}
    assert agent_environment({"REDIS_URL": "redis://h:6379/0"}) == {"REDIS_URL": "redis://h:6379/0"}
    assert "REDIS_URL" not in agent_environment({"REDIS_URL": "redis+sentinel://:pw@h:26379/m"})


@pytest.mark.parametrize("tmpdir_value", ["writable", "missing", "file", ""])
def test_default_spool_dir_is_under_the_directory_tempfile_would_pick(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch, tmpdir_value: str) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "writable").mkdir()
    value = str(tmp_path / tmpdir_value) if tmpdir_value else ""
    for name in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", value)
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() caches its answer
    expected = os.path.join(tempfile.gettempdir(), "agent-sidecar-spool")
    assert config._default_spool_dir() == expected
    assert expected.startswith(str(tmp_path / "writable")) == (tmpdir_value == "writable")


def test_what_runs_before_the_agent_starts_imports_no_heavy_modules() -> None:
    """Everything cli.main does before the agent is spawned (flags in their usual forms, a
    plain URL) leaves out modules that cost milliseconds of every start and are not needed
    there: argparse, re, enum (signal's wrappers), ctypes, urllib.parse and ipaddress,
    shutil (argparse's help width), hashlib and hmac (OpenSSL), json, tempfile, socket, ssl,
    asyncio, dataclasses and inspect, typing, uuid and platform (a generated run id), string."""
    import subprocess
    import sys

    probe = ("import os, sys\n"
             "from agent_wrapper import process\n"
             "heavy = ('argparse', 're', 'enum', 'signal', 'ctypes', 'urllib.parse', 'ipaddress', 'shutil',\n"
             "         'hashlib', 'hmac', 'json', 'tempfile', 'socket', 'ssl', 'asyncio', 'dataclasses', 'inspect',\n"
             "         'typing', 'uuid', 'platform', 'string')\n"
             "def spawn(argv, env):\n"
             "    print('spawned', *(m for m in heavy if m in sys.modules), flush=True)\n"
             "    os._exit(0)\n"
             "process.spawn = spawn\n"
             "from sidecar.cli import main\n"
             "main(['--no-echo', '--redis-url', 'redis://h:1/0', '--linger-ms=2', '--', 'true'])\n")
    cp = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60)
    assert cp.stdout.decode().split() == ["spawned"], (cp.stdout, cp.stderr)


@pytest.mark.parametrize(("values", "env", "fragment"), [
    ({"run_id": "r\udcff"}, {}, "run_id: not valid UTF-8"),
    ({"variation_id": "\udcc3"}, {}, "variation_id: not valid UTF-8"),
    ({}, {"AGENT_ID": "a\udcc3"}, "agent_id: not valid UTF-8"),
    ({"run_id": "a\tb"}, {}, "control characters"),
    ({"agent_id": "a\x7fb"}, {}, "control characters"),
    ({"output_channel": "run:{run_id}:\udcff"}, {}, "--output-channel: not valid UTF-8"),
    ({"redis_username": "u\udcff"}, {}, "--redis-username: not valid UTF-8"),
    ({}, {"REDIS_PASSWORD": "p\udcff"}, "REDIS_PASSWORD: not valid UTF-8"),
    ({"redact_patterns": ("x\udcff",)}, {}, "--redact-pattern: not valid UTF-8"),
])
def test_text_that_is_not_utf8_or_ids_with_control_characters_are_usage_errors(
        values: dict[str, Any], env: dict[str, str], fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        mk(values, env)


def test_a_password_file_that_is_not_utf8_is_a_usage_error(tmp_path: Any) -> None:
    path = tmp_path / "pw"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(UsageError, match="not valid UTF-8"):
        mk({"redis_password_file": str(path)})


def test_a_control_secret_from_the_environment_keeps_its_bytes() -> None:
    assert mk(env={"SIDECAR_CONTROL_SECRET": "k\udcffey"}).control_secret == b"k\xffey"


@pytest.mark.parametrize(("retention", "ttl"),
                         [("0", 0), ("0.4", 1), ("1e-300", 1), ("1", 1), ("1.5", 2), ("1d", 86400)])
def test_the_ttl_is_the_retention_rounded_up_to_whole_seconds(retention: str, ttl: int) -> None:
    assert mk({"retention_s": retention}).ttl_s == ttl


def test_json_diagnostics_take_text_of_other_bytes_than_utf8(capfd: pytest.CaptureFixture[str]) -> None:
    import orjson

    from sidecar import log

    log.configure("json", "info")
    try:
        log.error("'\udcff': command not found", path="/tmp/sp\udcff", n=3, big=2**70)
    finally:
        log.configure("text", "info")
    rec = orjson.loads(capfd.readouterr().err)
    assert rec["msg"] == "'\\udcff': command not found" and rec["path"] == "/tmp/sp\\udcff"
    assert rec["n"] == 3 and rec["big"] == str(2**70)


def test_a_client_key_without_its_certificate_is_a_usage_error(tmp_path: Any) -> None:
    key = tmp_path / "client.key"
    key.write_text("not used")
    with pytest.raises(UsageError, match="--redis-key-file needs --redis-cert-file"):
        mk({"redis_key_file": str(key), "redis_url": "rediss://h/0"})


def _self_signed_ca(directory: Any) -> Any:
    import subprocess

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=t",
                    "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem")],
                   check=True, capture_output=True)
    return directory / "ca.pem"


def test_tls_files_with_a_url_that_is_not_tls_are_a_usage_error(tmp_path: Any) -> None:
    ca = _self_signed_ca(tmp_path)
    for url in ("redis://u:pw@h/0", "unix:///tmp/r.sock", "redis+sentinel://s:26379/m"):
        with pytest.raises(UsageError, match="--redis-ca-file given, but .* is not a TLS URL") as info:
            mk({"redis_ca_file": str(ca), "redis_url": url})
        assert "pw" not in str(info.value)
    with pytest.raises(UsageError, match="not a TLS URL"):
        mk(env={"REDIS_CA_FILE": str(ca)})
    for url in ("rediss://h/0", "rediss+sentinel://s:26379/m"):
        assert mk({"redis_ca_file": str(ca), "redis_url": url}).redis_ca_file == str(ca)


def test_a_client_certificate_that_does_not_load_is_a_usage_error(tmp_path: Any) -> None:
    cert, key = tmp_path / "client.crt", tmp_path / "client.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    with pytest.raises(UsageError, match="not a usable certificate and private key"):
        mk({"redis_cert_file": str(cert), "redis_key_file": str(key), "redis_url": "rediss://h/0"})


def test_a_url_with_several_hosts_names_cluster_nodes() -> None:
    url = "rediss://u:p,w@n0:7000,[::1]:7001,n2/0"
    assert config.split_hosts(url) == ["rediss://u:p,w@n0:7000/0", "rediss://u:p,w@[::1]:7001/0", "rediss://u:p,w@n2/0"]
    assert config.split_hosts("redis://u:p,w@n0:7000/0") is None  # a comma in the password is no host list
    assert config.split_hosts("redis+sentinel://a:1,b:2/m") is None
    assert mk({"redis_url": url}).redis_url == url
    assert mk({"redis_url": "redis://n0,n1", "redis_mode": "cluster"}).redis_url == "redis://n0,n1"
    for bad, fragment in (("redis://n0:1,n1:2/3", "database 0 only"), ("redis://n0:1,,n1:2/0", "no host"),
                          ("redis://n0:1,n1:99999/0", "Port out of range"),
                          ("redis://u:pw@n0:1,n1:x/0", "u:***@n0:1,n1:x")):
        with pytest.raises(UsageError, match=re.escape(fragment)) as info:
            mk({"redis_url": bad})
        assert "pw" not in str(info.value)
    for mode in ("standalone", "sentinel"):
        with pytest.raises(UsageError, match="several hosts"):
            mk({"redis_url": "redis://n0:1,n1:2/0", "redis_mode": mode})


def test_a_target_for_several_hosts_is_a_cluster_seeded_by_all() -> None:
    from sidecar.topology import ClusterTarget
    from sidecar.transport import make_target, open_connection

    s = mk({"redis_url": "redis://u:pw@n0:7000,n1:7001,n0:7000/0"})
    target = make_target(s, lambda _conn: None)
    assert isinstance(target, ClusterTarget)
    assert target.seeds == [("n0", 7000), ("n1", 7001)]
    assert (target.endpoint.host, target.endpoint.port, target.endpoint.password) == ("n0", 7000, "pw")
    conn = open_connection(s)  # connects lazily: the first node, with the URL's credentials
    assert (conn.endpoint.host, conn.endpoint.port, conn.endpoint.username) == ("n0", 7000, "u")


def test_a_heartbeat_interval_is_none_or_at_least_a_tenth_of_a_second() -> None:
    assert mk({"heartbeat_interval_s": "0"}).heartbeat_interval_s == 0
    assert mk({"heartbeat_interval_s": "0.1"}).heartbeat_interval_s == 0.1
    for bad in ("1e-9", "0.05"):
        with pytest.raises(UsageError, match="at least 0.1 s"):
            mk({"heartbeat_interval_s": bad})


@pytest.mark.parametrize(("dest", "raw", "says"), [
    ("batch_max_bytes", "1XB", "not a size"), ("buffer_max_bytes", "abc", "not a size"),
    ("batch_max_records", "1.5", "not a whole number"), ("linger_ms", "x", "not a number"),
    ("heartbeat_interval_s", "1x", "not a duration"), ("batch_max_bytes", "1e400k", "must be a finite number"),
    ("batch_max_records", "0", "must be between 1 and"), ("batch_max_records", "-1", "must be between 1 and"),
])
def test_a_bad_number_is_named_in_plain_words(dest: str, raw: str, says: str) -> None:
    with pytest.raises(UsageError) as exc:
        mk({dest: raw})
    assert says in str(exc.value) and "int()" not in str(exc.value) and "float" not in str(exc.value)


def test_a_tls_file_that_is_a_directory_is_not_called_missing(tmp_path: Any) -> None:
    with pytest.raises(UsageError, match="not a file"):
        mk({"redis_url": "rediss://h:1/0", "redis_ca_file": str(tmp_path)})


@pytest.mark.parametrize(("values", "says"), [
    ({"variation_id": "x", "status_channel": "run:{run_id}:output:0"}, "--output-channel of another variation"),
    ({"variation_id": "x", "output_channel": "run:{run_id}:variation:0"}, "the variation hash of another"),
    ({"agent_id": "a", "variation_id": "x", "output_channel": "o:{run_id}:{agent_id}:{variation_id}",
      "logs_channel": "o:{run_id}:{agent_id}:3"}, "--output-channel of another variation"),
])
def test_a_key_of_another_variation_of_the_run_is_a_usage_error(values: dict[str, str], says: str) -> None:
    with pytest.raises(UsageError, match=says):
        mk({"run_id": "r", **values})


@pytest.mark.parametrize("values", [
    {"output_channel": "run:{run_id}:{variation_id}", "logs_channel": "run:{run_id}:{variation_id}:err"},
    {"output_channel": "out:{run_id}:{variation_id}", "logs_channel": "log:{run_id}:{variation_id}"},
    {"variation_id": "7", "status_channel": "run:{run_id}:status:{variation_id}"},
    {"output_channel": "run:{run_id}:{agent_id}"},
    {"output_channel": "o:{run_id}:{agent_id}", "logs_channel": "o:{run_id}:{agent_id}-err"},
    {"output_channel": "{run_id}:{agent_id}", "logs_channel": "{run_id}:{agent_id}:err",
     "status_channel": "{run_id}:status"},
])
def test_templates_that_keep_variations_apart_are_accepted(values: dict[str, str]) -> None:
    mk({"run_id": "r", **values})


def test_readers_do_not_check_the_keys_of_other_variations() -> None:
    """tail reads what was written: templates a sidecar refuses now must not lock a reader out."""
    values = {"variation_id": "x", "status_channel": "run:{run_id}:output:0", "run_id": "r"}
    with pytest.raises(UsageError):
        mk(values)
    config.build_connection(values, {})


def test_an_empty_redis_url_is_noticed() -> None:
    assert mk({}, env={"REDIS_URL": ""}).redis_url_empty
    assert mk({"redis_url": ""}).redis_url_empty  # --redis-url "$UNSET"
    assert mk({"redis_url": ""}, env={"REDIS_URL": ""}).redis_url_empty
    assert not mk({}).redis_url_empty  # not set at all: the default, as documented
    assert not mk({"redis_url": "redis://h:1/0"}, env={"REDIS_URL": ""}).redis_url_empty  # --redis-url given
    assert not mk({"redis_url": ""}, env={"REDIS_URL": "redis://h:1/0"}).redis_url_empty  # the variable applies


def test_unknown_sidecar_variables_are_named_with_the_closest_known_one() -> None:
    env = {"SIDECAR_REDACT_PATTERN": "x", "SIDECAR_LINGER_MS": "1", "SIDECAR_FOO": "1", "REDIS_URL": "redis://h",
           "SIDECAR_PURE_PYTHON": "1", "SIDECAR_CONTROL_SECRET": "s" * 16, "SIDECAR_TEST_REDIS_SERVER": "x",
           "SIDECAR_BATCH_MAX_BYTE": "1"}
    assert config.unknown_variables(env) == ["SIDECAR_BATCH_MAX_BYTE (did you mean SIDECAR_BATCH_MAX_BYTES?)",
                                             "SIDECAR_FOO",
                                             "SIDECAR_REDACT_PATTERN (did you mean SIDECAR_REDACT_PATTERNS?)"]
    assert config.unknown_variables({opt.env: "1" for opt in config.OPTIONS if opt.env}) == []


def test_a_bad_agent_id_from_pod_name_names_pod_name() -> None:
    with pytest.raises(UsageError, match=r"invalid agent_id \(from POD_NAME\) 'my pod'"):
        mk(env={"POD_NAME": "my pod"})
    with pytest.raises(UsageError, match=r"invalid agent_id 'a b'"):
        mk({"agent_id": "a b"}, env={"POD_NAME": "pod-1"})
    assert mk(env={"POD_NAME": "pod-1"}).agent_id == "pod-1"


def test_redact_patterns_of_the_variable_and_the_flags_are_used_together() -> None:
    s = mk({"redact_patterns": ("FOO-\\d+", "shared")}, env={"SIDECAR_REDACT_PATTERNS": "BAR-\\d+\nshared\n"})
    assert s.redact_patterns == ("FOO-\\d+", "shared", "BAR-\\d+")
    with pytest.raises(UsageError, match="redact-pattern"):  # the variable's are checked also with a flag given
        mk({"redact_patterns": ("FOO",)}, env={"SIDECAR_REDACT_PATTERNS": "ok\n("})


def test_choice_variables_are_trimmed_and_case_folded_and_errors_name_the_variable() -> None:
    s = mk(env={"SIDECAR_LOG_LEVEL": "DEBUG", "SIDECAR_TRANSPORT": "stream "})
    assert (s.log_level, s.transport) == ("debug", "stream")
    with pytest.raises(UsageError, match="SIDECAR_TRANSPORT: choose from"):
        mk(env={"SIDECAR_TRANSPORT": "streams"})


def test_the_compress_threshold_is_a_size() -> None:
    assert mk({"compress_threshold": "4KiB"}).compress_threshold == 4096
    assert mk({"compress_threshold": "-1"}).compress_threshold == -1
    assert mk(env={"SIDECAR_COMPRESS_THRESHOLD": "0"}).compress_threshold == 0
    for bad in ("-2", "-1KiB", "1.5x"):
        with pytest.raises(UsageError, match="--compress-threshold"):
            mk({"compress_threshold": bad})


def test_start_warnings_name_what_does_less_than_it_seems() -> None:
    def said(s: config.Settings, env: dict[str, str] | None = None) -> list[str]:
        return [message.split(":")[0].split(" (")[0] for message, _fields in config.start_warnings(s, env or {})]

    assert said(mk({"run_id": "r", "agent_id": "a"})) == []
    s = mk({"redis_url": "", "wire": "per-line-json", "transport": "stream", "output_channel": "o:{agent_id}",
            "redact": "1", "redact_patterns": ("x",), "when_full": "drop", "buffer_max_bytes": "1k",
            "spool_max_bytes": "0"}, env={})
    assert s.agent_id_generated and s.run_id_generated and s.redis_url_empty
    assert said(s, {"SIDECAR_LINGER_M": "1"}) == [
        "no run id given", "unknown SIDECAR_ environment variables, ignored",
        "--wire per-line-json shapes the pub/sub messages, and --transport stream publishes none",
        "a channel template uses {agent_id} and no agent id was given", "--no-redact",
        "--when-full drop with room for fewer than 4 batches", "the Redis URL"]
    assert not mk(env={"POD_NAME": "pod-1"}).agent_id_generated
    assert not mk({"agent_id": "a"}).agent_id_generated


@pytest.mark.parametrize("flag", ["redis_password_file", "control_secret_file"])
def test_a_secret_file_that_is_a_device_fifo_directory_or_too_large_is_a_usage_error(
        tmp_path: Any, flag: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes to it: opening it must not wait
    big = tmp_path / "big"
    big.write_bytes(b"x" * (config.MAX_SECRET_FILE_BYTES + 1))
    for path, fragment in (("/dev/zero", "not a regular file"), (str(fifo), "not a regular file"),
                           (str(tmp_path), "not a regular file"), (str(big), "larger than 64 KiB")):
        with pytest.raises(UsageError, match=re.escape(fragment)):
            mk({flag: path})
    ok = tmp_path / "ok"
    ok.write_bytes(b"s" * (config.MAX_SECRET_FILE_BYTES - 1) + b"\n")
    assert len(mk({flag: str(ok)}).control_secret or b"") == (config.MAX_SECRET_FILE_BYTES - 1
                                                               if flag == "control_secret_file" else 0)


@pytest.mark.parametrize(("url", "mode", "fragment"), [
    ("unix:///tmp/r.sock", "cluster", "a unix socket"),
    ("redis://h:6379/3", "cluster", "database 0 only"),
    ("redis+sentinel://s:26379/mymaster", "cluster", "names Sentinels"),
    ("redis+sentinel://s:26379/mymaster", "standalone", "names Sentinels"),
])
def test_a_redis_mode_the_url_cannot_be_is_a_usage_error(url: str, mode: str, fragment: str) -> None:
    with pytest.raises(UsageError, match=re.escape(fragment)):
        mk({"redis_url": url, "redis_mode": mode})


def test_a_ca_file_without_a_certificate_is_a_usage_error(tmp_path: Any) -> None:
    path = tmp_path / "passwd"
    path.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(UsageError, match="--redis-ca-file .*: no usable CA certificate"):
        mk({"redis_url": "rediss://h:6380/0", "redis_ca_file": str(path)})
    assert mk({"redis_url": "rediss://h:6380/0", "redis_ca_file": str(_self_signed_ca(tmp_path))}).redis_ca_file
