"""tail: JSON lines of odd entries, text mode escapes, --follow through an outage."""

from __future__ import annotations

import json
from typing import Any

from sidecar.tail import _json_line


def test_what_orjson_refuses_is_written_by_the_standard_library() -> None:
    obj = {"type": "batch", "seq": 2**64, "n": 10**30, "text": "é"}
    assert json.loads(_json_line(obj)) == obj


def test_a_parsed_object_too_deep_for_any_encoder_is_left_out_and_the_text_stays() -> None:
    deep: object = 1
    for _ in range(100_000):
        deep = [deep]
    line = _json_line({"seq": 2**70, "text": "x", "json": deep})
    assert json.loads(line) == {"seq": 2**70, "text": "x"}


def test_plain_records_are_written_by_orjson_compactly() -> None:
    assert _json_line({"seq": 1, "text": "a b"}) == b'{"seq":1,"text":"a b"}'


def test_text_mode_shows_control_characters_as_escapes_and_raw_keeps_them() -> None:
    import io

    from sidecar.consumer import Status
    from sidecar.protocol import Record
    from sidecar.tail import Printer

    data = b"title \x1b]0;owned\x07 clip \x1b]52;c;ZWNobw==\x07 tab\there\rhidden \xc2\x9b\r\n"
    rec = Record(channel="run:r:output:0", stream="stdout", seq=1, ts=1_700_000_000.0, data=data, partial=False,
                 json=None, producer="p", agent_id="a", variation_id="0")
    status = Status(msg={"variation_id": "0", "status": "agent", "timestamp": "2026-01-01T00:00:00.000000Z",
                         "metadata": {"state": "\x1b[2Jcleared"}}, channel="run:r:status", status="agent", seq=1,
                    producer="p")
    out = {}
    for mode in ("text", "raw"):
        p = Printer(mode, None, True, "0")
        p.out, p.err = io.BytesIO(), io.BytesIO()
        p.emit(rec)
        p.emit(status)
        out[mode] = p.out.getvalue()
    assert out["raw"] == data
    text = out["text"].decode()
    assert not any(ord(c) < 32 and c not in "\t\n" or 127 <= ord(c) < 160 for c in text), text
    assert "title \\x1b]0;owned\\x07 clip \\x1b]52;c;ZWNobw==\\x07 tab\there\\x0dhidden \\x9b\n" in text
    assert "state=\\x1b[2Jcleared" in text


def test_follow_says_once_per_outage_that_redis_cannot_be_read(monkeypatch: Any, capfd: Any) -> None:
    """tail --follow retries a Redis it cannot read for as long as it takes, and says so once
    the outage has lasted STILL_TRYING_AFTER_S (not in --raw, whose stderr is the agent's)."""
    import fakeredis
    import redis

    from sidecar import consumer, tail, transport

    real = fakeredis.FakeRedis()
    calls = {"n": 0}
    # reads: two fail, one answers (an empty XREAD), two fail, then Ctrl-C
    script = ["fail", "fail", "ok", "fail", "fail", "stop"]

    class Flaky:
        def xrange(self, *a: Any, **k: Any) -> Any:
            return real.xrange(*a, **k)

        def xread(self, *a: Any, **k: Any) -> Any:
            step = script[min(calls["n"], len(script) - 1)]
            calls["n"] += 1
            if step == "fail":
                raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
            if step == "stop":
                raise KeyboardInterrupt
            return []

        def close(self) -> None:
            pass

    monkeypatch.setattr(transport, "connect", lambda *a, **k: Flaky())
    monkeypatch.setattr(tail, "STILL_TRYING_AFTER_S", 0.0)
    monkeypatch.setattr(consumer.time, "sleep", lambda s: None)
    assert tail.main(["r1", "--follow", "--redis-url", "redis://127.0.0.1:1/0"]) == 130
    err = capfd.readouterr().err
    notes = [x for x in err.splitlines() if "still trying" in x]
    assert len(notes) == 2, err  # one per outage
    assert "ConnectionError: Error 111" in notes[0] and "redis://127.0.0.1:1/0" in notes[0]
    calls["n"] = 0
    assert tail.main(["r1", "--follow", "--raw", "--redis-url", "redis://127.0.0.1:1/0"]) == 130
    assert "still trying" not in capfd.readouterr().err
