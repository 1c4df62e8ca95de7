"""tail's JSON lines for entries a sidecar would not write (huge integers, deep nesting)."""

from __future__ import annotations

import json

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
