"""The native module gives the same answers as the Python code it stands in for.

Each check runs on fixed edge cases and on seeded random input built from the pieces that
matter (token prefixes, braces, quotes, backslashes, control bytes, valid and invalid UTF-8).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from typing import Any

import orjson
import pytest

from sidecar import _native, events, protocol, redaction

if _native.speedups is None:
    if os.environ.get("CI"):
        pytest.fail("sidecar/_speedups.c was not built (a C compiler is needed at install time)",
                    pytrace=False)
    pytest.skip("native module not built", allow_module_level=True)

sp: Any = _native.speedups

PIECES = [
    b"sk-", b"sk", b"-", b"github_pat_", b"github_pa", b"ghp_", b"gho_", b"gha_", b"ghz_", b"AKIA", b"ASIA",
    b"AXIA", b"xoxb-", b"xoxz-", b"xpxp-", b"xsxa-", b"{", b"}", b"{}", b'{"a":1}', b"\n", b"\r", b"\r\n",
    b'"', b"\\", b"\\n", b"\x00", b"\x01", b"\x08", b"\x09", b"\x0c", b"\x1f", b" ", b"\x7f", b"a", b"s", b"g",
    b"A", b"x", b"k", b"_", b"h", b"I", b"K", b"S", b"glpat-", b"glpa", b"hf_", b"f_", b"npm_", b"np",
    b"sk_live_", b"rk_test_", b"sk_", b"_live_", b"test_", b"sk_lived_", b"hello world ", b"AIza", b"AIz", b"Iza",
    b"eyJ", b"ey", b"J", b"B", b"Bearer ", b"Bearer", b"earer ", b"Bearer\n", b"Authorization: ", b"Basic ",
    b"bearer ", b"BEARER ", b"bEARER ", b"b", b"EARER ", b"Bearer\t", b"\xe2bearer ",
    b"uthorization: Basic ", b"-----BEGIN ", b"-----BEGIN", b"-", b"\xc3\xa9", b"\xe2\x80\xa8",
    b"\xf0\x9f\x98\x80", b"\xf4\x8f\xbf\xbf", b"\xed\x9f\xbf", b"\xee\x80\x80",
    # invalid UTF-8: surrogates, overlong forms, past U+10FFFF, truncated, stray bytes
    b"\xed\xa0\x80", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x80", b"\xbf", b"\xc3", b"\xe2\x80", b"\xf0\x9f\x98",
]


def _agent_text() -> Any:
    """bench/agent_text.py, the benchmark's agent-like text."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    try:
        import agent_text
    finally:
        sys.path.pop(0)
    return agent_text


def random_bytes(rnd: random.Random, most: int = 40) -> bytes:
    return b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(0, most)))


def python_lines(data: bytes, partial: bool) -> protocol.Texts:
    count = 1 if partial else data.count(b"\n")
    return protocol.texts_of(protocol.Lines(segments=[(data, count, partial)], ts=[], n=count, nbytes=len(data)))


def check_candidates(cands: list[tuple[int, bytes, int]], lines: list[str], base: int) -> None:
    """The records that may be JSON objects, each without its trailing CRs; one the native
    code vouches for is a JSON object to orjson too."""
    expected = [(base + i, line.rstrip("\r").encode()) for i, line in enumerate(lines)
                if line[:1] == "{" and line.rstrip("\r")[-1:] == "}" and len(line.rstrip("\r")) >= 2]
    assert [(i, text) for i, text, _ in cands] == expected
    for _, text, kind in cands:
        if kind:
            obj = orjson.loads(text)
            assert isinstance(obj, dict), text
            assert kind == 2 or events.classify(obj) is None, text


# -- token_starts -------------------------------------------------------------------------


@pytest.mark.parametrize("data", [
    b"", b"sk-", b"sk", b"xsk-ab", b"github_pat_", b"github_pat", b"ghp_", b"ghq_", b"gh_", b"AKIA", b"AKI",
    b"ASIAASIA", b"xoxb-", b"xox-", b"xpxp-x", b"aaaaaaaasssssssssk-", b"sk-sk-sk-", b"A" * 9 + b"KIA",
    b"0123456sk-", b"01234567sk-", b"012345678ghp_", b"glpat-", b"lpat-", b"hf_", b"hhf_", b"npm_", b"pm_",
    b"sk_live_", b"rk_test_", b"xk_live_", b"sk_tost_", b"k_live_", b"sk_live_sk_test_hf_", b"AIza", b"AIz",
    b"AKIAIza", b"ASIAIzaAIza", b"eyJ", b"yJ", b"eyeyJ", b"Bearer ", b"Bearer", b"Bearer sk-", b"Bearer AIza",
    b"Bearer eyJ", b"BBearer Bearer ", b"0123456789abcBearer ", b"0123456789abcdeAIza", b"0123456789abcdefeyJ",
    b"bearer ", b"BEARER ", b"bEaReR ", b"bbearer bearer ", b"0123456789abcdebearer ", b"0123456789abcdebEARER x",
    b"bearer", b"bearer\x00", b"Bearer!", b"\xc2bearer ",
    b"Authorization: Basic ", b"uthorization: Basic ", b"thorization: Basic ", b"Authorization: Basic",
    b"Authorization: Basic sk-", b"------BEGIN ", b"-----BEGIN ", b"-----BEGIN", b"sk-----BEGIN ",
])
def test_token_starts_edge_cases(data: bytes) -> None:
    assert sp.token_starts(data) == redaction._token_starts_py(data)


def test_token_starts_matches_python_on_random_input() -> None:
    rnd = random.Random(11)
    for _ in range(20_000):
        data = random_bytes(rnd)
        assert sp.token_starts(data) == redaction._token_starts_py(data), data


def test_token_starts_matches_python_on_long_input() -> None:
    """Long enough for the block scan to run and for the GIL to be released (4 KiB and up)."""
    rnd = random.Random(17)
    found = 0
    for _ in range(300):
        data = random_bytes(rnd, 4000)
        expected = redaction._token_starts_py(data)
        assert sp.token_starts(data) == expected
        found += len(expected)
    assert found > 1000


def test_lines_json_takes_bytes_only_and_a_sane_base() -> None:
    """Only bytes: they are read with the GIL released, when no other thread can change them
    (a bytearray could change meanwhile)."""
    with pytest.raises(TypeError):
        sp.lines_json(bytearray(b"{}\n"), False, 0)
    with pytest.raises(TypeError):
        sp.lines_json(memoryview(b"{}\n"), False, 0)
    with pytest.raises(ValueError):
        sp.lines_json(b"{}\n", False, -1)
    with pytest.raises(ValueError):
        sp.lines_json(b"{}\n", False, sys.maxsize)


def test_token_starts_accepts_any_buffer() -> None:
    assert sp.token_starts(bytearray(b"..sk-..")) == [2]
    assert sp.token_starts(memoryview(b"..sk-..")) == [2]
    with pytest.raises(TypeError):
        sp.token_starts("sk-")


# -- count_lf -----------------------------------------------------------------------------


def test_count_lf_matches_bytes_count() -> None:
    rnd = random.Random(20)
    cases = [b"", b"\n", b"x", b"\n" * 15, b"\n" * 16, b"\n" * 17, b"\n" * 5000, b"a\n" * 4081]
    cases += [random_bytes(rnd, rnd.choice((5, 50, 2000))) for _ in range(2000)]
    for data in cases:
        assert sp.count_lf(data) == data.count(b"\n"), data
    with pytest.raises(TypeError):
        sp.count_lf(bytearray(b"\n"))


# -- contains_any -------------------------------------------------------------------------


def test_contains_any_matches_python_on_random_input() -> None:
    rnd = random.Random(16)
    for _ in range(20_000):
        data = random_bytes(rnd, 30)
        needles = tuple(random_bytes(rnd, 3) for _ in range(rnd.randint(0, 4)))
        if rnd.random() < 0.3 and data:  # one that surely occurs
            i = rnd.randrange(len(data))
            needles += (data[i:i + rnd.randint(1, 12)],)
        assert sp.contains_any(data, needles) == any(n in data for n in needles), (data, needles)


def test_contains_any_with_several_long_needles_matches_python() -> None:
    """Several needles of 4 bytes and more take the one-pass scan: found at the start, in the
    middle and at the very end of long data, or not at all; needles longer than the data."""
    rnd = random.Random(22)
    alphabet = b"abcdefgh ij-_/=+%"
    found = 0
    for k in range(3000):
        data = bytes(rnd.choices(alphabet, k=rnd.choice((3, 40, 700, 5000))))
        needles = [bytes(rnd.choices(alphabet, k=rnd.randint(4, 24))) for _ in range(rnd.randint(2, 20))]
        if k % 3 == 0 and len(data) >= 4:  # one that surely occurs, often at an end
            where = rnd.choice((0, len(data) - 4, rnd.randrange(len(data) - 3)))
            needles.append(data[where:where + rnd.randint(4, 30)])
        rnd.shuffle(needles)
        expected = any(n in data for n in needles)
        assert sp.contains_any(data, tuple(needles)) is expected, (data, needles)
        found += expected
    assert 600 < found < 2000  # a third surely, a few more by chance
    assert sp.contains_any(b"x" * 10 + b"abcd", (b"abcde", b"bcd!", b"abcd")) is True
    assert sp.contains_any(b"abc", (b"abcd", b"abce")) is False
    assert sp.contains_any(b"abcd" * 2, tuple(b"%04d" % i for i in range(100)) + (b"dabc",)) is True


def test_contains_any_edge_cases() -> None:
    assert sp.contains_any(b"abc", ()) is False
    assert sp.contains_any(b"abc", (b"",)) is True  # as `b"" in data`
    assert sp.contains_any(b"", (b"",)) is True
    assert sp.contains_any(b"ab", (b"abc",)) is False
    assert sp.contains_any(b"xxabc", (b"zz", b"abc")) is True
    with pytest.raises(TypeError):
        sp.contains_any(b"abc", [b"a"])
    with pytest.raises(TypeError):
        sp.contains_any(b"abc", ("a",))
    with pytest.raises(TypeError):
        sp.contains_any(bytearray(b"abc"), (b"a",))


# -- lines_json ---------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "partial"), [
    (b"", True), (b"\n", False), (b"\n\n\n", False), (b"a\n", False), (b"a", True), (b"{", True),
    (b'{"a":1}\r\r\n{}\n', False), (b"{}\r", True), (b"\x00\x1f\x7f\"\\\n", False),
    (b"\xe2\x80\xa8\xf4\x8f\xbf\xbf\n", False),
    (b"x" * 100 + b'"' + b"y" * 100 + b"\n", False),
])
def test_lines_json_edge_cases(data: bytes, partial: bool) -> None:
    t = python_lines(data, partial)
    js, n, cands, _ = sp.lines_json(data, partial, 7)
    assert b"[" + js + b"]" == orjson.dumps(t.lines)
    assert n == len(t.lines)
    check_candidates(cands, t.lines, 7)


@pytest.mark.parametrize(("data", "partial"), [
    (b"", False),  # no record at all
    (b"abc", False),  # whole lines that do not end with LF
    (b"ok\n\xff\n", False),  # a record that is not UTF-8
    (b"\xed\xa0\x80", True),  # a surrogate
    (b"\xf0\x9f\x98", True),  # a sequence cut short
])
def test_lines_json_leaves_the_rest_to_python(data: bytes, partial: bool) -> None:
    assert sp.lines_json(data, partial, 0) is None


def test_lines_json_matches_python_on_random_input() -> None:
    rnd = random.Random(12)
    checked = 0
    for _ in range(20_000):
        data = random_bytes(rnd)
        partial = rnd.random() < 0.2
        data = data.replace(b"\n", b"") if partial else data + b"\n"
        got = sp.lines_json(data, partial, 3)
        t = python_lines(data, partial)
        if got is None:
            assert t.b64, data  # only a record Python could not decode sends it back
            continue
        js, n, cands, _ = got
        assert not t.b64
        assert b"[" + js + b"]" == orjson.dumps(t.lines), data
        assert n == len(t.lines)
        check_candidates(cands, t.lines, 3)
        checked += 1
    assert checked > 2_000  # the fuzz reached the native path often enough to mean something


def test_lines_json_matches_python_on_long_input() -> None:
    """Segments of many records, as the reader passes them on (4 KiB and up: the GIL is
    released), whole and partial."""
    rnd = random.Random(18)
    checked = 0
    for k in range(400):
        data = random_bytes(rnd, 3000)
        if k % 2:  # mostly valid UTF-8, so that most segments take the native path
            data = data.decode("utf-8", "replace").encode()
        partial = k % 5 == 0
        data = data.replace(b"\n", b"") if partial else data + b"\n"
        got = sp.lines_json(data, partial, 5)
        t = python_lines(data, partial)
        if got is None:
            assert t.b64
            continue
        js, n, cands, _ = got
        assert b"[" + js + b"]" == orjson.dumps(t.lines)
        assert n == len(t.lines)
        check_candidates(cands, t.lines, 5)
        checked += 1
    assert checked > 150


def test_native_calls_give_the_same_answers_from_several_threads() -> None:
    """Two threads call the module at once, each with the GIL released in turn."""
    rnd = random.Random(19)
    inputs = [random_bytes(rnd, 3000).decode("utf-8", "replace").encode() + b"\n" for _ in range(8)]
    expected = [(sp.lines_json(d, False, 0), sp.token_starts(d)) for d in inputs]
    results: list[list[Any]] = [[], []]

    def work(out: list[Any]) -> None:
        for _ in range(20):
            out.append([(sp.lines_json(d, False, 0), sp.token_starts(d)) for d in inputs])

    threads = [threading.Thread(target=work, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(got == expected for r in results for got in r)
    assert sum(len(r) for r in results) == 40


# -- JSON objects ---------------------------------------------------------------------------


def surely_json(text: bytes) -> bool | None:
    got = sp.lines_json(text + b"\n", False, 0)
    assert got is not None
    return bool(got[2][0][2]) if got[2] else None


@pytest.mark.parametrize(("text", "kind"), [
    (b'{"a":1}', 1), (b'{"usage":{}}', 2), (b'{"sidecar_event":"x"}', 2), (b'{"x":{"usage":1}}', 1),
    (b'{"x":"usage"}', 1), (b'{"us\\u0061ge":1}', 2), (b'{"a\\"b":1}', 2), (b'{"usagex":1}', 1), (b'{"usag":1}', 1),
])
def test_json_object_kinds(text: bytes, kind: int) -> None:
    """2 only where a top-level key may read "usage" or "sidecar_event" (events.classify)."""
    got = sp.lines_json(text + b"\n", False, 0)
    assert got[2][0][2] == kind


@pytest.mark.parametrize(("text", "surely"), [
    (b"{}", True), (b'{"a":1}', True), (b'{ "a" : [ 1 , -2.5 , 0 , -0 , true , false , null , "x" , {} , [] ] }', True),
    (b'{"a":"\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u00e9 \\u20AC"}', True), ('{"\u00e9":"\u2028"}'.encode(), True),
    (b'{"a":1,"a":2}', True), (b'{"":0}', True),
    (b'{"a":1e5}', False), (b'{"a":1E-5}', False),  # exponents: orjson judges the range
    (b'{"a":"\\ud83d\\ude00"}', False), (b'{"a":"\\ud800"}', False),  # surrogates: orjson decides
    (b'{"a":' + b"1" * 41 + b"}", False),  # long numbers: orjson decides
    (b'{"a":1} {}', False), (b'{"a":1,}', False), (b'{"a" 1}', False), (b"{'a':1}", False), (b'{"a":01}', False),
    (b'{"a":.5}', False), (b'{"a":1.}', False), (b'{"a":-}', False), (b'{"a":tru}', False), (b'{"a":NaN}', False),
    (b'{"a":"\x01"}', False), (b'{"a":"\\x41"}', False), (b'{"a":"\\u12G4"}', False), (b'{"a":[1,2}', False),
    (b'{"a":1}\x0c', None), (b'{"a":1\x0c}', False), (b'{"a"\x0b:1}', False),
])
def test_json_object_edge_cases(text: bytes, surely: bool | None) -> None:
    assert surely_json(text) is surely
    if surely:
        assert isinstance(orjson.loads(text), dict)


def test_json_nesting_past_the_native_limit_is_left_to_orjson() -> None:
    def nested(depth: int) -> bytes:
        return b'{"a":' * depth + b"1" + b"}" * depth

    assert surely_json(nested(190)) is True
    assert surely_json(nested(191)) is False
    assert surely_json(nested(5000)) is False  # no recursion past the limit


def test_json_objects_the_native_code_vouches_for_are_json_to_orjson() -> None:
    """Mutations of agent event lines: whatever the native code takes for a JSON object, orjson
    reads as one; and it takes every event line of the benchmark's agent text."""
    samples = [ln for ln in _agent_text().make_block(20_000, seed=6).split(b"\n") if ln[:1] == b"{"]
    assert samples and all(surely_json(ln) for ln in samples)
    rnd = random.Random(15)
    vouched = refused = 0
    for _ in range(40_000):
        text = bytearray(rnd.choice(samples))
        for _ in range(rnd.randint(1, 3)):
            i = rnd.randrange(len(text))
            op = rnd.random()
            if op < 0.4:
                text[i:i] = rnd.choice(PIECES)
            elif op < 0.8:
                del text[i:i + rnd.randint(1, 3)]
            else:
                text[i:i + 1] = rnd.choice(PIECES)
        t = bytes(text)
        if b"\n" in t or t[:1] != b"{" or t.rstrip(b"\r")[-1:] != b"}":
            continue
        got = sp.lines_json(t + b"\n", False, 0)
        if got is None:
            continue  # not UTF-8
        (_, text_, kind), = got[2]
        if kind:
            vouched += 1
            obj = orjson.loads(text_)
            assert isinstance(obj, dict), t
            assert kind == 2 or events.classify(obj) is None, t
        else:
            refused += 1
    assert vouched > 1_000 and refused > 1_000


# -- what the sidecar ships is the same either way -------------------------------------------

HEADER = {"v": 1, "type": "batch", "run_id": "r", "variation_id": "0", "agent_id": "a", "producer": "p",
          "channel": "run:r:output:0", "stream": "stdout"}


def _batches(rnd: random.Random) -> list[protocol.Lines]:
    out = []
    text = _agent_text().make_block(3000, seed=4)
    pos = 0
    while pos < len(text):  # agent text cut as the reader cuts it
        end = min(len(text), text.rindex(b"\n", pos, pos + 4096) + 1)
        out.append(protocol.Lines(segments=[(text[pos:end], text.count(b"\n", pos, end), False)],
                                  ts=[(0, 1.5)], n=0, nbytes=end - pos))
        pos = end
    event_lines = [  # lines that carry events, spelled in the ways that matter
        b'{"sidecar_event":"tokens","input_tokens":5,"output_tokens":1}',
        b'{"type":"result","usage":{"input_tokens":3,"output_tokens":4},"total_cost_usd":0.25}',
        b'{"\\u0075sage":{"prompt_tokens":1,"completion_tokens":2}}',
        b'{"usage":{"prompt_tokens":2,"completion_tokens":1e1}}\r',
        b'{"sidecar_event":"status","state":"planning","step":"\\ud83d\\ude00"}',
    ]
    out.append(protocol.Lines(segments=[(b"".join(e + b"\n" for e in event_lines), len(event_lines), False)],
                              ts=[(0, 3.5)], n=0, nbytes=0))
    for _ in range(3000):  # hostile segments, partial ones among them
        segs = []
        for _ in range(rnd.randint(1, 4)):
            data = random_bytes(rnd, 20)
            if rnd.random() < 0.25:
                segs.append((data.replace(b"\n", b""), 1, True))
            else:
                segs.append((data + b"\n", data.count(b"\n") + 1, False))
        out.append(protocol.Lines(segments=segs, ts=[(0, 2.5)], n=0, nbytes=0))
    return out


@pytest.mark.parametrize(("structured", "events_wanted"), [(True, True), (True, False), (False, False)])
def test_encoded_batches_are_byte_identical_with_and_without_native_code(
        monkeypatch: pytest.MonkeyPatch, structured: bool, events_wanted: bool) -> None:
    """stdout with its events read (the native code splices in the plain JSON objects and
    parses the rest), stdout with nobody reading events (it splices in all it vouches for),
    and stderr (no json array)."""
    batches = _batches(random.Random(13))
    native = []
    for b in batches:
        objects: list[dict[str, Any]] | None = [] if events_wanted else None
        native.append((protocol.encode_batch(HEADER, 5, b, structured=structured, threshold=-1, objects=objects),
                       objects or []))
    monkeypatch.setattr(protocol, "_speedups", None)
    for b, (payload, objects) in zip(batches, native, strict=True):
        expected_objects: list[dict[str, Any]] | None = [] if events_wanted else None
        expected = protocol.encode_batch(HEADER, 5, b, structured=structured, threshold=-1, objects=expected_objects)
        assert payload == expected
        # The objects handed on for events: the native path parses only those that may carry one.
        assert [events.classify(o) for o in objects if events.classify(o)] == \
            [events.classify(o) for o in expected_objects or [] if events.classify(o)]
    with_json = sum(b"\"json\":" in p for p, _ in native)
    assert with_json > 50 if structured else with_json == 0
    found_events = sum(1 for _, objects in native for o in objects if events.classify(o))
    assert found_events > 3 if events_wanted else found_events == 0


@pytest.mark.parametrize("splice", [1, 2])
def test_lines_json_splices_the_objects_it_vouches_for(splice: int) -> None:
    """With splice 1 (plain objects) or 2 (those with event keys too): when every JSON-object
    record is of such a kind, their [index, object] entries as orjson writes them, and no
    candidates; otherwise None and all the candidates, as with splice 0."""
    rnd = random.Random(21)
    spliced_seen = listed_seen = 0
    for _ in range(3000):
        lines = [rnd.choice([b'{"a":[1,"x"]}', b'{"usage":{"input_tokens":1}}', b'{"a":1e3}', b"plain", b"{",
                             b'{"b":{}}\r', random_bytes(rnd, 6)]) for _ in range(rnd.randint(0, 6))]
        data = b"".join(ln.replace(b"\n", b"") + b"\n" for ln in lines)
        if not data:
            continue
        full = sp.lines_json(data, False, 9, 0)
        got = sp.lines_json(data, False, 9, splice)
        if full is None:
            assert got is None
            continue
        assert full[3] is None and got[:2] == full[:2]
        if all(kind == 1 or (kind == 2 and splice == 2) for _, _, kind in full[2]):
            expected = orjson.dumps([[i, orjson.Fragment(text)] for i, text, _ in full[2]])[1:-1]
            assert got[2] == [] and got[3] == expected
            spliced_seen += bool(expected)
        else:
            assert got[2] == full[2] and got[3] is None
            listed_seen += 1
    assert spliced_seen > 300 and listed_seen > 300
    assert sp.lines_json(b'{"a":1}\nx\n', False, 0, 3) == (b'"{\\"a\\":1}","x"', 2, [], b"")


def test_redaction_is_the_same_with_and_without_native_code(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(14)
    chunks = [random_bytes(rnd, 60) + b"ghp_" + b"A" * 40 + b" sk-" + b"b" * 30 + b"\n" for _ in range(300)]

    def run() -> list[bytes]:
        r = redaction.Redactor({"API_KEY": "s3cr3t-value"})
        return [r("stdout", c, False) for c in chunks] + [r("stdout", b"", True)]

    with_native = run()
    monkeypatch.setattr(redaction, "_speedups", None)
    assert run() == with_native
    assert all(b"[REDACTED]" in out for out in with_native[:-1])


@pytest.mark.parametrize(("value", "used"), [("", True), ("0", True), ("1", False), ("yes", False)])
def test_sidecar_pure_python_turns_the_native_code_off(value: str, used: bool) -> None:
    env = dict(os.environ, SIDECAR_PURE_PYTHON=value)
    out = subprocess.run([sys.executable, "-c", "from sidecar import _native; print(_native.speedups is not None)"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(used)


def test_set_child_subreaper_makes_the_process_a_subreaper() -> None:
    """In a child process of its own (a subreaper test process would adopt every orphan)."""
    probe = ("import ctypes, sys\n"
             "from sidecar import _speedups\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "flag = ctypes.c_int(-1)\n"
             "libc.prctl(37, ctypes.byref(flag), 0, 0, 0)  # PR_GET_CHILD_SUBREAPER\n"
             "before = flag.value\n"
             "ok = _speedups.set_child_subreaper()\n"
             "libc.prctl(37, ctypes.byref(flag), 0, 0, 0)\n"
             "print(before, ok, flag.value)\n")
    cp = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=60, check=True)
    assert cp.stdout.split() == [b"0", b"True", b"1"]


# -- pack_commands ------------------------------------------------------------------------


def _random_arg(rnd: random.Random) -> Any:
    kind = rnd.randrange(6)
    if kind == 0:
        return random_bytes(rnd, 12)
    if kind == 1:
        return rnd.choice(["", "PING", "EVALSHA", "run:r:output:0", "caf\u00e9 \u2603", "\U0001f600", "a" * 300])
    if kind == 2:
        return rnd.choice([0, 1, -1, 9, 10, 99, 100, -100, 2**63 - 1, -(2**63), rnd.randrange(-10**12, 10**12)])
    if kind == 3:
        return rnd.choice([0.0, -0.0, 1.0, 0.1, 1e16, 1e-7, 2.5e300, float("inf"), float("-inf"), float("nan"),
                           rnd.random() * 1e10])
    if kind == 4:
        return rnd.choice([True, False, None, 2**64, -(2**63) - 1, bytearray(b"x"), "\ud800", 3 + 0j])
    return b"x" * rnd.randrange(0, 70000)


def test_pack_commands_is_what_pack_py_packs() -> None:
    from sidecar.resp import pack_py

    rnd = random.Random(3)
    declined = 0
    for _ in range(3000):
        cmds = [tuple(_random_arg(rnd) for _ in range(rnd.randrange(0, 6))) for _ in range(rnd.randrange(0, 4))]
        if rnd.random() < 0.2 and cmds:
            cmds[0] = list(cmds[0])
        got = sp.pack_commands(cmds)
        try:
            expected = b"".join(pack_py(c) for c in cmds)
        except UnicodeEncodeError:
            expected = None
        if got is None:  # declined: only for a type, size or text it does not take
            declined += 1
            assert any(type(a) not in (bytes, str, int, float) or a == "\ud800"
                       or (type(a) is int and not -(2**63) <= a < 2**63) for c in cmds for a in c), cmds
        else:
            assert got == expected, cmds
    assert 300 < declined < 2700
    assert sp.pack_commands([]) == b""
    assert sp.pack_commands([()]) == b"*0\r\n"
    assert sp.pack_commands([("PING",), ("GET", "k")]) == b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
    assert sp.pack_commands((("PING",),)) is None  # a tuple of commands: packed in Python
    assert sp.pack_commands(["PING"]) is None


# -- lone_payload / lone_exchange: a lone read's batch, written and sent in one call each -------

HEAD = b'{"v":1,"run_id":"r","variation_id":"0","type":"batch","channel":"run:r:output:0","stream":"stdout"'


def _usual_payload(data: bytes, seq: int, t: float, splice: int) -> bytes | None:
    """What the batcher's usual path queues for one read of whole lines (protocol.encode_batch
    on the native path, or the Python code where the native module declines), None where it
    parses objects for events (the lone path leaves those to it)."""
    parsed: list[dict[str, Any]] | None = [] if splice == protocol.SPLICE_PLAIN else None
    batch = protocol.Lines(segments=[(data, data.count(b"\n"), False)], ts=[(0, t)], n=data.count(b"\n"),
                           nbytes=len(data))
    got = sp.lines_json(data, False, 0, splice)
    if got is None or got[3] is None:
        return None
    header = orjson.loads(HEAD + b"}")
    return protocol.encode_batch(header, seq, batch, structured=splice != protocol.SPLICE_NONE, threshold=-1,
                                 objects=parsed, header_json=HEAD)


def test_lone_payload_is_the_usual_batch_message_on_random_reads() -> None:
    rnd = random.Random(21)
    agent_lines = _agent_text().make_block(400, seed=9).splitlines(keepends=True)
    taken = declined = 0
    for _ in range(4000):
        if rnd.random() < 0.5:
            data = b"".join(rnd.choice(agent_lines) for _ in range(rnd.randint(1, 4)))
        else:
            data = b"".join(random_bytes(rnd, 12) + b"\n" for _ in range(rnd.randint(1, 3)))
        seq = rnd.choice([1, 2, 999, 10**12])
        t = rnd.choice([1700000000.0, 1795962014.068139, 1.5, 0.000001, rnd.uniform(0, 4e9)])
        splice = rnd.choice([protocol.SPLICE_PLAIN, protocol.SPLICE_ALL, protocol.SPLICE_NONE])
        got = sp.lone_payload(data, HEAD, seq, round(t * 1_000_000), splice, 1000, -1)
        expected = _usual_payload(data, seq, t, splice)
        if got is None:
            declined += 1
            assert expected is None or not data.endswith(b"\n"), data
            continue
        taken += 1
        assert got == (expected, data.count(b"\n")), data
        orjson.loads(got[0])
    assert taken > 2500 and declined > 100


@pytest.mark.parametrize(("data", "max_records", "threshold"), [
    (b"a\nb\nc\n", 2, -1),  # more records than a batch may hold
    (b"x" * 200 + b"\n", 1000, 250),  # a payload above the compression threshold
    (b"no line end", 1000, -1),
    (b"", 1000, -1),
    (b"bad \xff\n", 1000, -1),
])
def test_lone_payload_declines_what_the_usual_path_must_take(data: bytes, max_records: int, threshold: int) -> None:
    assert sp.lone_payload(data, HEAD, 1, 1, protocol.SPLICE_ALL, max_records, threshold) is None


def test_lone_payload_takes_bytes_only() -> None:
    with pytest.raises(TypeError):
        sp.lone_payload(bytearray(b"x\n"), HEAD, 1, 1, 3, 10, -1)
    assert sp.lone_payload(b"x\n", HEAD, 1, -5, 3, 10, -1) is None  # before 1970: the usual path
    assert sp.lone_payload(b"x\n", HEAD, 1, 2**70, 3, 10, -1) is None  # beyond 64 bits: the same


class FakeRedis:
    """The other end of a socket pair: reads what the sidecar sends, answers what it is told."""

    def __init__(self) -> None:
        import socket

        self.ours, self.theirs = socket.socketpair()
        self.ours.setblocking(False)  # as a socket with a timeout is
        self.got = b""

    def receive(self, n: int) -> bytes:
        while len(self.got) < n:
            self.got += self.theirs.recv(1 << 20)
        return self.got

    def receive_until(self, end: bytes) -> bytes:
        while not self.got.endswith(end):
            self.got += self.theirs.recv(1 << 20)
        return self.got

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()


def _exchange(server: FakeRedis, payload: bytes = b'{"p":1}', timeout_ms: int = 2000) -> Any:
    from sidecar.resp import pack_py

    prefix = pack_py(("PING",)) + b"*14\r\n" + b"".join(pack_py((a,))[4:] for a in ("EVALSHA", "f" * 40, 2, "k",
                                                                                 "k:idem", "p"))
    suffix = b"".join(pack_py((a,))[4:] for a in (1000, 1, 86400, 0, 0))
    return sp.lone_exchange(server.ours.fileno(), prefix, 5, 7, payload, suffix, timeout_ms)


@pytest.mark.parametrize(("replies", "expected"), [
    ([b"+PONG\r\n:1\r\n"], (0, None)),
    ([b"+PONG\r\n", b":1", b"\r\n"], (0, None)),  # in pieces
    ([b"+PONG\r\n-NOSCRIPT No matching script\r\n"], (2, b"+PONG\r\n-NOSCRIPT No matching script\r\n")),
    ([b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n"],
     (2, b"-NOAUTH Authentication required.\r\n-NOAUTH Authentication required.\r\n")),
    ([b"+PONG\r\n$2\r\nok\r\n"], None),  # a bulk reply: what was read so far, the caller reads on
    ([b"+PONG\r\n:1\r\n:2\r\n"], (2, b"+PONG\r\n:1\r\n:2\r\n")),  # more than asked for
])
def test_lone_exchange_sends_the_append_and_reads_both_replies(replies: list[bytes], expected: Any) -> None:
    from sidecar.resp import pack_py

    server = FakeRedis()
    payload = b'{"lines":["x"]}'
    try:
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(_exchange(server, payload)))
        t.start()
        sent = pack_py(("PING",)) + pack_py(("EVALSHA", "f" * 40, 2, "k", "k:idem", "p", 5, 7, payload, 1000, 1,
                                             86400, 0, 0))
        assert server.receive(len(sent)) == sent
        for piece in replies:
            server.theirs.sendall(piece)
            time.sleep(0.01)  # separate reads (not needed for the outcome)
        t.join(5)
        if expected is None:
            joined = b"".join(replies)
            assert result[0][0] == 2 and len(result[0][1]) > 7 and joined.startswith(result[0][1])
        else:
            assert result == [expected]
    finally:
        server.close()


def test_lone_exchange_reports_a_closed_connection_a_timeout_and_a_large_payload() -> None:
    import errno

    server = FakeRedis()
    try:
        server.theirs.close()
        assert _exchange(server) in ((1, errno.ECONNRESET), (1, errno.EPIPE))
    finally:
        server.close()
    for blocking in (False, True):  # the descriptor's mode does not matter: no reply, a timeout
        server = FakeRedis()
        server.ours.setblocking(blocking)
        try:
            assert _exchange(server, timeout_ms=30) == (1, errno.ETIMEDOUT)
        finally:
            server.close()
    server = FakeRedis()
    try:  # more than the socket buffer takes at once: written as the peer reads
        big = b"y" * (4 << 20)
        result: list[Any] = []
        t = threading.Thread(target=lambda: result.append(_exchange(server, big)))
        t.start()
        got = server.receive_until(b"$5\r\n86400\r\n$1\r\n0\r\n$1\r\n0\r\n")
        server.theirs.sendall(b"+PONG\r\n:1\r\n")
        t.join(10)
        assert result == [(0, None)] and big in got
    finally:
        server.close()
