"""Secret redaction: environment values, token shapes, user patterns, secrets split across reads."""

from __future__ import annotations

import random
import re

import pytest

from sidecar.redaction import MASK, Redactor

ENV = {
    "OPENAI_API_KEY": "sk-live-0123456789abcdefghijklmn",
    "github_token": "gho-not-a-shape-but-env-1234",
    "DB_PASSWORD": "hunter2hunter2",
    "SHORT_TOKEN": "abc123",  # shorter than 8: not masked
    "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/creds/key.json",
    "HOME": "/home/agentuser",  # not a secret name
    "SPACED_SECRET": "two words secret",
}

TOKENS = {
    "anthropic": b"sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWxYz012345",
    "openai": b"sk-proj-AbCdEfGhIjKlMnOpQrStUvWx",
    "github": b"ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "github_pat": b"github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "aws": b"AKIAIOSFODNN7EXAMPLE",
    "slack": b"xoxb-123456789012-abcdefghijkl",
    "gitlab": b"glpat-AbCdEfGhIjKlMnOpQrSt",
    "stripe": b"sk_live_AbCdEfGhIjKlMnOpQrStUvWx",
    "stripe_restricted": b"rk_test_AbCdEfGhIjKlMnOpQrStUvWx",
    "huggingface": b"hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456",
    "npm": b"npm_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "google": b"AIzaSyD-AbCdEfGhIjKlMnOpQrStUvWxYz_0123",
    "jwt": b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
}
BEARER = b"Authorization: Bearer ya29.a0AfH6SMB-x3k9q_Z~long+token/value=="


def run(r: Redactor, chunks: list[bytes], stream: str = "stdout") -> bytes:
    out = b"".join(r(stream, c, False) for c in chunks)
    return out + r(stream, b"", True)


def test_environment_values_are_masked_and_short_or_unrelated_ones_not() -> None:
    r = Redactor(ENV)
    text = (b"key=sk-live-0123456789abcdefghijklmn pw=hunter2hunter2 gh=gho-not-a-shape-but-env-1234\n"
            b"short=abc123 home=/home/agentuser creds=/var/run/creds/key.json s=two words secret!\n")
    assert run(r, [text]) == (b"key=[REDACTED] pw=[REDACTED] gh=[REDACTED]\n"
                              b"short=abc123 home=/home/agentuser creds=[REDACTED] s=[REDACTED]!\n")


@pytest.mark.parametrize("name", sorted(TOKENS))
def test_token_shapes(name: str) -> None:
    r = Redactor({})
    assert run(r, [b"error: invalid key " + TOKENS[name] + b" (401)\n"]) == b"error: invalid key [REDACTED] (401)\n"


def test_basic_credentials_of_an_authorization_header_are_masked() -> None:
    text = (b"> GET / HTTP/1.1\n> Authorization: Basic YWRtaW46aHVudGVyMg==\n"
            b"> Proxy-Authorization: Basic dTpw\n"
            b'{"headers":{"authorization: Basic YWRtaW46aHVudGVyMg=="}}\n'
            b"Basic usage: Basic authentication is described in RFC 7617\n")
    assert run(Redactor({}), [text]) == (
        b"> GET / HTTP/1.1\n> Authorization: Basic [REDACTED]\n> Proxy-Authorization: Basic [REDACTED]\n"
        b'{"headers":{"authorization: Basic [REDACTED]"}}\n'
        b"Basic usage: Basic authentication is described in RFC 7617\n")
    whole = run(Redactor({}), [text])
    for i in range(1, len(text)):
        assert run(Redactor({}), [text[:i], text[i:]]) == whole, i


def test_a_bearer_token_is_masked_and_the_word_bearer_stays() -> None:
    assert run(Redactor({}), [b"curl -H '" + BEARER + b"' https://api\n"]) == (
        b"curl -H 'Authorization: Bearer [REDACTED]' https://api\n")
    jwt_header = b'{"headers": {"authorization": "Bearer ' + TOKENS["jwt"] + b'"}}\n'
    assert run(Redactor({}), [jwt_header]) == b'{"headers": {"authorization": "Bearer [REDACTED]"}}\n'


@pytest.mark.parametrize("word", [b"bearer", b"BEARER", b"bEaReR"])
def test_the_word_bearer_in_any_case_is_followed_by_a_masked_token(word: bytes) -> None:
    """The scheme's name is case-insensitive in HTTP: requests libraries and hand-written
    headers send it in lower case too."""
    text = (b'{"authorization": "' + word + b' ya29.a0AfH6SMB-x3k9q_Z~long+token/value=="}\n'
            b"curl -H 'authorization: " + word + b" 0123456789abcdef0123' https://api\n"
            b"the " + word + b" of this note\n")
    expected = (b'{"authorization": "' + word + b' [REDACTED]"}\n'
                b"curl -H 'authorization: " + word + b" [REDACTED]' https://api\n"
                b"the " + word + b" of this note\n")
    for r in (Redactor({}), Redactor({"API_KEY": "hunter2hunter2xx"})):  # the anchored scan, the whole expression
        assert run(r, [text]) == expected
    for i in range(1, len(text)):
        assert run(Redactor({}), [text[:i], text[i:]]) == expected, i


@pytest.mark.parametrize("text", [b"sk-short", b"task-list of things", b"AKIA alone", b"ghp_short", b"xoxb-1",
                                  b"the risk-assessment-document-for-the-new-project",
                                  b"Bearer tokens are described in RFC 6750", b"Bearer authentication",
                                  b"the bearer of this message", b"xbearer 0123456789abcdef0123",
                                  b"AIzaSyD-AbCdEfGhIjKlMnOpQrStUvWxYz_01234 (one too many)",
                                  b"AIzaSyD-AbCdEfGhIjKlMnOpQrStUvWxYz_012 (one too few)",
                                  b"header only eyJhbGciOiJIUzI1NiJ9 and eyJhbGciOiJIUzI1NiJ9.notpayload"])
def test_near_misses_are_left_alone(text: str) -> None:
    assert run(Redactor({}), [text + b"\n"]) == text + b"\n"


def test_user_patterns() -> None:
    r = Redactor({}, [r"ticket-[0-9]{4}", r"Bearer [A-Za-z0-9.]+"])
    assert run(r, [b"ticket-1234 auth: Bearer abc.def.ghi ok\n"]) == b"[REDACTED] auth: [REDACTED] ok\n"


@pytest.mark.parametrize("secret", [ENV["OPENAI_API_KEY"].encode(), TOKENS["anthropic"], TOKENS["aws"],
                                    ENV["SPACED_SECRET"].encode(), ENV["DB_PASSWORD"].encode(), TOKENS["google"],
                                    TOKENS["jwt"], BEARER])
def test_a_secret_split_across_two_and_three_reads_at_every_position(secret: bytes) -> None:
    text = b"before " + secret + b" after\n"
    expected = b"before " + MASK + b" after\n"
    if secret == BEARER:
        expected = b"before Authorization: Bearer " + MASK + b" after\n"
    for i in range(1, len(text)):
        assert run(Redactor(ENV), [text[:i], text[i:]]) == expected, i
    for i in range(1, len(text) - 1, 3):
        for j in range(i + 1, len(text), 5):
            assert run(Redactor(ENV), [text[:i], text[i:j], text[j:]]) == expected, (i, j)


def test_secret_at_the_very_end_without_newline_is_masked_on_close() -> None:
    r = Redactor(ENV)
    first = r("stdout", b"tail " + TOKENS["github"][:12], False)
    assert first == b"tail "  # the start of a token waits for the rest
    assert r("stdout", TOKENS["github"][12:], False) == b""
    assert r("stdout", b"", True) == MASK


def test_binary_and_nul_bytes_around_secrets_are_kept() -> None:
    text = b"\x00\xff\xfe" + TOKENS["aws"] + b"\x00\x80 \xc3\x28\n"
    assert run(Redactor({}), [text]) == b"\x00\xff\xfe" + MASK + b"\x00\x80 \xc3\x28\n"


def test_streams_keep_separate_state() -> None:
    r = Redactor({})
    half = len(TOKENS["slack"]) // 2
    a = r("stdout", b"x " + TOKENS["slack"][:half], False)
    b = r("stderr", b"unrelated line\n", False)
    a += r("stdout", TOKENS["slack"][half:] + b"\n", False)
    assert a == b"x " + MASK + b"\n"
    assert b == b"unrelated line\n"


def test_complete_lines_are_never_held_back() -> None:
    r = Redactor(ENV)
    assert r("stdout", b"line with no secret\n", False) == b"line with no secret\n"
    assert r("stdout", b"ends in a token char abc\n", False) == b"ends in a token char abc\n"
    # a prompt without newline that cannot begin a secret goes out at once too
    assert r("stdout", b"Continue? [y/N] ", False) == b"Continue? [y/N] "


def test_trailing_dots_go_out_at_once_unless_they_may_be_part_of_a_jwt() -> None:
    r = Redactor({})
    assert r("stdout", b"Loading...", False) == b"Loading..."
    assert r("stdout", b"see docs/x.md", False) == b"see docs/x."  # the run of token characters waits
    assert r("stdout", b" a eyJhbGciOiJIUzI1NiJ9.", False) == b"md a "
    assert r("stdout", b"eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig\n", False) == MASK + b"\n"
    assert r("stdout", b"Authorization: Bearer ", False) == b"Authorization: "
    assert r("stdout", b"abc/def", False) == b""
    assert r("stdout", b"+ghijklmnop12345\n", False) == b"Bearer " + MASK + b"\n"


@pytest.mark.parametrize("escape", [b"\\n", b"%3D"])
def test_a_token_after_an_escape_is_masked_when_a_read_ends_inside_the_escape(escape: bytes) -> None:
    line = b'{"text":"key:' + escape + TOKENS["anthropic"] + b'"}\n'
    at = line.index(escape)
    for cut in range(at + 1, at + len(escape) + 1):
        assert run(Redactor({}), [line[:cut], line[cut:]]) == b'{"text":"key:' + escape + MASK + b'"}\n', cut


def test_held_back_bytes_are_bounded() -> None:
    r = Redactor({}, max_token=64)
    out = r("stdout", b"a" * 10_000, False)
    assert len(out) >= 10_000 - 64
    assert out + r("stdout", b"", True) == b"a" * 10_000


def test_large_chunk_without_secrets_is_unchanged() -> None:
    text = (b"The quick brown fox jumps over the lazy dog 0123456789.\n" * 200_000)[:10_000_000]
    r = Redactor(ENV)
    assert run(r, [text]) == text
    assert r.masked == 0


def test_prefix_scan_finds_what_a_full_scan_finds() -> None:
    """Near misses ("task-", "xsk-..."), tokens at every kind of boundary, many per chunk:
    the anchored scan masks exactly what the whole expression masks."""
    import random

    rnd = random.Random(7)
    pieces = [b"task-list ", b"risk-", b"xsk-abcdefghijklmnopqrstuvwxyz ", b"ghp ", b"gho_x ", b"ASIA", b"AKIA ",
              b"xoxo- ", b"github_pat ", b"word ", b"\n", b"-", b"_", *TOKENS.values()]
    r = Redactor({})
    for _ in range(200):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randrange(1, 40)))
        expected = r.rx.sub(MASK, data)
        assert Redactor({})("stdout", data, True) == expected, data
    assert MASK in Redactor({})("stdout", b"key:" + TOKENS["slack"] + b"task-" + TOKENS["aws"], True)


def test_a_token_right_after_a_word_character_is_left_alone() -> None:
    # The look-behind sees the byte before the candidate position.
    assert run(Redactor({}), [b"x" + TOKENS["aws"] + b"\n"]) == b"x" + TOKENS["aws"] + b"\n"
    assert run(Redactor({}), [b"-" + TOKENS["aws"] + b"\n"]) == b"-[REDACTED]\n"


def test_leading_inline_flags_apply_to_their_own_pattern_only() -> None:
    r = Redactor({}, [r"(?i)password=\S+", r"ticket-[0-9]{4}"])
    assert run(r, [b"PASSWORD=x1 Password=y2 TICKET-1234 ticket-1234\n"]) == (
        b"[REDACTED] [REDACTED] TICKET-1234 [REDACTED]\n")


def test_patterns_that_match_nothing_somewhere_mask_nothing_there() -> None:
    assert run(Redactor({}, [r"\b"]), [b"hello world\n"]) == b"hello world\n"


def test_a_secret_longer_than_the_usual_hold_back_is_masked_across_reads() -> None:
    secret = "eyJ" + "a" * 1200
    r = Redactor({"GH_TOKEN": secret})
    data = b"token=" + secret.encode() + b"\n"
    assert run(r, [data[:1000], data[1000:]]) == b"token=[REDACTED]\n"


def test_a_secret_is_masked_json_escaped_and_url_encoded_too() -> None:
    value = 'ab/cd+ef"gh-é'
    r = Redactor({"API_TOKEN": value})
    import json
    from urllib.parse import quote

    for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1],
                 json.dumps(value)[1:-1].replace("/", "\\/"), quote(value, safe="")):
        assert run(r, [b"x=" + form.encode() + b"\n"]) == b"x=[REDACTED]\n", form


def test_a_secret_is_masked_inside_base64_at_every_offset() -> None:
    """An Authorization: Basic header, a data: URL, a Kubernetes Secret: the secret's bytes
    can sit at any offset of a base64 group, and reads can cut it."""
    import base64

    secret = "p4ss-w0rd!Secret"
    r = Redactor({"DB_PASSWORD": secret})
    for before in range(6):
        for after in range(4):
            data = bytes(range(1, 1 + before)) + secret.encode() + bytes(range(200, 200 + after))
            enc = base64.b64encode(data)
            line = b"blob " + enc + b"\n"
            for cut in (len(line) // 2, 7):
                out = run(r, [line[:cut], line[cut:]])
                assert out.count(b"[REDACTED]") == 1, (before, after, enc, out)
                kept = out.replace(b"blob ", b"").replace(b"[REDACTED]", b"").rstrip(b"\n")
                # only what the secret shares with its neighbours is left: at most 3
                # characters at each end, besides the neighbours' own characters
                assert len(kept) <= len(enc) - len(secret) * 4 // 3 + 6, (enc, out)
    header = b"X-Credentials: " + base64.b64encode(b"admin:" + secret.encode()) + b"\n"
    assert run(r, [header]) == b"X-Credentials: YWRtaW46[REDACTED]A==\n"


def test_a_secret_is_masked_inside_url_safe_base64_too() -> None:
    """A JWT or a URL carries base64 with - and _ for + and /: the secret is masked there too,
    at every offset."""
    import base64

    secret = "\xfb\xff?>~secret~value"  # its base64 holds + and /, at every offset
    r = Redactor({"API_TOKEN": secret})
    assert any(b"+" in f or b"/" in f for f in r.values) and any(b"-" in f or b"_" in f for f in r.values)
    for before in range(3):
        data = bytes(range(1, 1 + before)) + secret.encode() + b"\x00"
        standard, url_safe = base64.b64encode(data), base64.urlsafe_b64encode(data)
        assert standard != url_safe
        for enc in (standard, url_safe):
            out = run(r, [b"token=" + enc + b"\n"])
            assert out.count(b"[REDACTED]") == 1, (before, enc, out)


def test_base64_forms_are_long_enough_not_to_match_by_chance() -> None:
    """Each form covers at least 10 characters of base64 for the shortest secret (8 bytes)."""
    import base64
    import os

    from sidecar.redaction import base64_cores

    for _ in range(50):
        cores = base64_cores(os.urandom(8))
        standard = {c for c in cores if b"-" not in c and b"_" not in c}
        assert 3 <= len(cores) <= 6 and len(standard) == 3 and min(map(len, cores)) >= 10
    r = Redactor({"API_KEY": "zq8Kx!pR"})  # a secret the noise does not hold
    noise = base64.b64encode(bytes(range(256)) * 4) + b"\n"
    assert run(r, [noise]) == noise


def _holdback_reference(r: Redactor, data: bytes) -> int:
    """What _holdback must return, tried at every length."""
    line_start = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
    tail = data[max(line_start, len(data) - r.max_token):]
    if not tail:
        return 0
    m = re.search(rb"[A-Za-z0-9_\-]*\Z", tail)
    hold = len(tail) - m.start() if m else 0
    if re.search(rb"[\\%%][A-Za-z0-9_\-]{%d}\Z" % hold, tail):  # with the escape it may follow
        hold += 1
    for v in r.values:
        for k in range(min(len(v) - 1, len(tail)), hold, -1):
            if tail.endswith(v[:k]):
                hold = k
                break
    return hold


def test_hold_back_finds_the_longest_start_of_a_secret_at_the_end() -> None:
    r = Redactor({"API_KEY": "abcab-cab/ca b", "DB_PASSWORD": "zz.zz.zzz", "X_TOKEN": "q" * 20})
    rnd = random.Random(5)
    pieces = [b"ab", b"c", b"a", b"b-", b"cab/", b"ca", b" b", b"z", b"zz.", b".", b"q", b"qqq", b" ", b"\n",
              b"-", b"x", b"%2F", b"YWJj"]
    held = 0
    for _ in range(5000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12)))
        expected = _holdback_reference(r, data)
        assert r._holdback(data) == expected, data
        held += expected > 0
    assert held > 1000


@pytest.mark.parametrize("split", [100, 600, 700, 1400])
def test_a_token_longer_than_the_hold_back_written_in_two_parts_is_masked_whole(split: int) -> None:
    """A match that reaches the end of a read may go on in the next one: it is held back whole."""
    token = b"eyJ" + bytes(random.Random(split).choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1500))
    data = b"two " + token + b" end\n"
    r = Redactor({}, [r"eyJ[A-Za-z0-9_\-]{20,}"])
    assert run(r, [data[:split], data[split:]]) == b"two [REDACTED] end\n"
    shaped = b"key " + b"github_pat_" + b"A" * 900 + b" end\n"
    assert run(Redactor({}), [shaped[:600], shaped[600:]]) == b"key [REDACTED] end\n"


@pytest.mark.parametrize("env", [{}, {"API_KEY": "hunter2hunter2xx"}])  # the anchored scan, the whole expression
def test_reads_cut_anywhere_mask_what_one_read_masks(env: dict[str, str]) -> None:
    """Token shapes among near misses, cut into two to four reads at random places: the output
    is byte for byte what the whole text in one read gives, and no token survives."""
    rnd = random.Random(13)
    pieces = [b"word ", b"\n", b".", b"/", b" ", b"Bearer ", b"Bearer", b"eyJ", b"eyJhbGciOiJIUzI1NiJ9.", b"\\n",
              b"%3D", b"%", b"\\", b"Loading...", b"AIza", b"sk-", b"a.b", b"+", b"=", BEARER + b" ", b"hunter2",
              b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN RSA ", b"PRIVATE KEY-----", b"-----END PRIVATE KEY-----",
              b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", b"Zm9v==", b"\r\n", b"\\r\\n", b"Proc-Type: 4,ENCRYPTED", b"\\/",
              b"bearer ", b"BEARER", b"beaRer ", b"b", b'", "x": 1}', b"'", b'\\"',
              b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC\"",
              b"Authorization: Basic ", b"Authorization:", b"uthorization: Basic YWRtaW46aHVudGVyMg== ", b"Basic ",
              *(b" " + t + b" " for t in TOKENS.values())]
    for _ in range(3000):
        data = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(1, 14)))
        whole = Redactor(env)("stdout", data, True)
        cuts = sorted(rnd.sample(range(1, len(data)), min(rnd.randint(1, 3), len(data) - 1))) if len(data) > 1 else []
        parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        assert run(Redactor(env), parts) == whole, (data, cuts)
        for token in TOKENS.values():  # where a token can begin and must end, it is masked
            assert b" " + token + b" " not in whole, data


def test_a_match_at_the_end_goes_out_masked_when_the_pipe_closes_or_goes_quiet() -> None:
    r = Redactor({})
    assert r("stdout", b"token " + TOKENS["github"], False) == b"token "
    assert r("stdout", b"", True) == MASK


def test_mask_value_masks_every_string_of_a_status_message() -> None:
    r = Redactor({"DB_PASSWORD": "hunter2hunter2"})
    meta = {"state": "s", "tok": TOKENS["github"].decode(), "nested": [{"hunter2hunter2": "x hunter2hunter2 y"}, 3],
            "n": 1.5, "ok": True, "none": None}
    assert r.mask_value(meta) == {"state": "s", "tok": "[REDACTED]", "nested": [{"[REDACTED]": "x [REDACTED] y"}, 3],
                                  "n": 1.5, "ok": True, "none": None}
    assert r.mask_value("plain \udc80 text") == "plain \udc80 text"  # lone surrogates survive


@pytest.mark.parametrize("pattern", ["a{99999999999}", "(?i)a{4294967296}"])
def test_a_pattern_python_cannot_compile_is_reported_not_raised(pattern: str) -> None:
    from sidecar.redaction import check_patterns

    problem = check_patterns([pattern])
    assert problem is not None and "too large" in problem


def test_an_environment_secret_ending_a_read_goes_out_masked_at_once() -> None:
    r = Redactor({"DB_PASSWORD": "my pass!word"})
    assert r("stdout", b"Password: my pass!word", False) == b"Password: [REDACTED]"


def test_a_repeated_repeat_is_refused_and_its_possessive_form_accepted() -> None:
    """(\\w+\\s?)+= against a near miss ("aaa...a!") backtracks exponentially, holding the
    interpreter all the while; with a possessive inner repeat it matches the same texts in
    linear time."""
    import re

    from sidecar.redaction import check_patterns, nested_repeat

    pattern = r"(\w+\s?)+="
    assert nested_repeat(pattern.encode())
    assert "repeats a repeat" in (check_patterns([pattern]) or "")
    safe = r"(\w++\s?)+="
    assert check_patterns([safe]) is None
    assert re.search(safe.encode(), b"a" * 10_000 + b"!") is None
    for text in (b"ab cd=", b"x=", b"a b c d e=f"):
        assert re.search(safe.encode(), text).group() == re.search(pattern.encode(), text).group()


@pytest.mark.parametrize("before", [b"\\n", b"\\t", b"\\r", b"\\u0022", b"%20", b"%3D"])
def test_a_token_after_an_escape_is_masked(before: bytes) -> None:
    # A tool result in stream-json: "$ printenv KEY\nsk-..." is escaped as \nsk-...
    text = b'{"content": "' + before + TOKENS["aws"] + b'"}\n'
    assert run(Redactor({}), [text]) == b'{"content": "' + before + b'[REDACTED]"}\n'


def test_an_aws_shape_is_exactly_twenty_characters() -> None:
    text = b"region ASIAPACIFICREGIONSERVER1 host\n"
    assert run(Redactor({}), [text]) == text


def test_a_multi_line_secret_written_a_line_at_a_time() -> None:
    pem = ("-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(["MIIEpAIBAAKCAQEAz7" + str(i) * 40 for i in range(3)])
           + "\n-----END RSA PRIVATE KEY-----")
    r = Redactor({"PRIVATE_KEY": pem})
    out = run(r, [line.encode() + b"\n" for line in pem.split("\n")])
    assert b"MIIEpAIBAAKCAQEA" not in out
    assert run(Redactor({"PRIVATE_KEY": pem}), [pem.replace("\n", "\r\n").encode()]).count(MASK) == 3


def test_more_secret_variable_names_and_the_passwords_of_urls() -> None:
    env = {"GITHUB_PAT": "pat-value-0123456789", "API_KEY_2": "second-key-value", "DB_PASSPHRASE": "long passphrase",
           "SENTRY_DSN": "https://abcdef0123456789@o1.ingest.example/1",
           "DATABASE_URL": "postgresql://app:S3cret%2FPassw0rd@db:5432/app",
           "PWD": "/home/agent/work", "OLDPWD": "/home/agent"}
    r = Redactor(env)
    text = (b"pat-value-0123456789 second-key-value long passphrase\n"
            b"dsn https://abcdef0123456789@o1.ingest.example/1\n"
            b"url postgresql://app:S3cret%2FPassw0rd@db:5432/app pw S3cret/Passw0rd\n"
            b"cwd /home/agent/work\n")
    assert run(r, [text]) == (b"[REDACTED] [REDACTED] [REDACTED]\n"
                              b"dsn [REDACTED]\n"
                              b"url postgresql://app:[REDACTED]@db:5432/app pw [REDACTED]\n"
                              b"cwd /home/agent/work\n")


@pytest.mark.parametrize("cut", [1, 2, 5, 8])
def test_a_token_after_an_escape_split_between_reads_is_masked(cut: int) -> None:
    for before in (b"\\n", b"\\u0022", b"%3D"):
        text = b'{"c": "$ env' + before + TOKENS["anthropic"] + b'"}\n'
        at = text.index(TOKENS["anthropic"]) + cut
        assert run(Redactor({}), [text[:at], text[at:]]) == b'{"c": "$ env' + before + b'[REDACTED]"}\n'


def test_only_key_material_lines_of_a_multi_line_secret_become_secrets() -> None:
    """The lines of a credentials file that are JSON or PEM headers are ordinary text elsewhere."""
    creds = '{\n  "type": "service_account",\n  "universe_domain": "googleapis.com"\n}'
    key = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n" + "QUJD" * 12 + "\n-----END X-----"
    r = Redactor({"GOOGLE_CREDENTIALS": creds, "SSH_KEY": key})
    text = b'{"type": "service_account", "universe_domain": "googleapis.com"} Proc-Type: 4,ENCRYPTED\n'
    assert run(r, [text]) == text
    assert run(r, [b"QUJD" * 12 + b"\n"]) == b"[REDACTED]\n"


# -- private keys printed from a file ----------------------------------------------------

def _pem(kind: bytes = b"RSA PRIVATE KEY", lines: int = 6, eol: bytes = b"\n", indent: bytes = b"",
         headers: tuple[bytes, ...] = ()) -> tuple[bytes, list[bytes]]:
    rnd = random.Random(len(kind) * 31 + lines)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    body = [bytes(rnd.choice(alphabet) for _ in range(64)) for _ in range(lines - 1)] + [b"Zm9vYmFy4Q=="]
    parts = [indent + b"-----BEGIN " + kind + b"-----", *(indent + h for h in headers), *(([b""]) if headers else []),
             *(indent + line for line in body), indent + b"-----END " + kind + b"-----"]
    return eol.join(parts) + eol, body


def _pem_masked(text: bytes, body: list[bytes]) -> bytes:
    for line in body:
        text = text.replace(line, MASK, 1)
    return text


@pytest.mark.parametrize("kind", [b"RSA PRIVATE KEY", b"PRIVATE KEY", b"OPENSSH PRIVATE KEY", b"EC PRIVATE KEY",
                                  b"ENCRYPTED PRIVATE KEY", b"PGP PRIVATE KEY BLOCK"])
def test_a_private_key_printed_from_a_file_has_its_lines_of_key_material_masked(kind: bytes) -> None:
    key, body = _pem(kind)
    text = b"$ cat key.pem\n" + key + b"$ echo done\ndone\n"
    out = run(Redactor({}), [text])
    assert out == _pem_masked(text, body)
    assert out.count(b"\n") == text.count(b"\n")
    assert out.count(MASK) == len(body)


@pytest.mark.parametrize("eol", [b"\r\n", b"\\n", b"\\r\\n"])
def test_a_private_key_with_crlf_or_inside_a_json_string_is_masked(eol: bytes) -> None:
    key, body = _pem(b"PRIVATE KEY", eol=eol)
    line = b'{"type":"tool_result","content":"' + key + b'exit 0"}\n' if eol != b"\r\n" else key
    assert run(Redactor({}), [line]) == _pem_masked(line, body)


def test_an_encrypted_or_indented_private_key_keeps_its_headers_and_indentation() -> None:
    key, body = _pem(b"RSA PRIVATE KEY", headers=(b"Proc-Type: 4,ENCRYPTED", b"DEK-Info: AES-128-CBC,0A1B2C3D"))
    assert run(Redactor({}), [key]) == _pem_masked(key, body)
    assert b"Proc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,0A1B2C3D\n\n" + MASK in run(Redactor({}), [key])
    yaml = b"tls:\n  key: |\n"
    indented, body = _pem(b"EC PRIVATE KEY", indent=b"    ")
    out = run(Redactor({}), [yaml + indented + b"  cert: none\n"])
    assert out == yaml + _pem_masked(indented, body) + b"  cert: none\n"
    assert b"    " + MASK + b"\n" in out


def test_a_begin_line_without_a_key_after_it_masks_nothing() -> None:
    for text in (b"Keys begin with -----BEGIN PRIVATE KEY----- and a line of base64.\nok\n",
                 b"-----BEGIN PRIVATE KEY-----\nDone\nThe next line is ordinary.\nAbcdefghijklmnopqrstuvwxyz0123\n",
                 b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUXyZ0123456789abcdefghijklmnop\n"
                 b"-----END CERTIFICATE-----\n"):
        assert run(Redactor({}), [text]) == text


def test_tokens_in_the_headers_or_lines_of_a_key_block_are_masked_too() -> None:
    text = (b"-----BEGIN RSA PRIVATE KEY-----\nComment: " + TOKENS["github"] + b"\n-----END RSA PRIVATE KEY-----\n"
            b"-----BEGIN PRIVATE KEY-----\nkey " + TOKENS["slack"] + b" -----END PRIVATE KEY-----\n")
    assert run(Redactor({}), [text]) == (
        b"-----BEGIN RSA PRIVATE KEY-----\nComment: " + MASK + b"\n-----END RSA PRIVATE KEY-----\n"
        b"-----BEGIN PRIVATE KEY-----\nkey " + MASK + b" -----END PRIVATE KEY-----\n")


def test_redaction_goes_on_after_a_private_key_and_after_a_line_that_ends_the_block() -> None:
    key, body = _pem(b"PRIVATE KEY")
    text = key + b"token " + TOKENS["github"] + b"\n-----BEGIN PRIVATE KEY-----\nkey " + TOKENS["aws"] + b" here\n"
    expected = _pem_masked(key, body) + b"token " + MASK + b"\n-----BEGIN PRIVATE KEY-----\nkey " + MASK + b" here\n"
    assert run(Redactor({}), [text]) == expected
    assert run(Redactor({"DB_PASSWORD": "hunter2hunter2"}), [text + b"hunter2hunter2\n"]) == expected + MASK + b"\n"


@pytest.mark.parametrize("eol", [b"\n", b"\\n", b"\r\n"])
def test_a_private_key_cut_into_reads_anywhere_is_masked_as_in_one_read(eol: bytes) -> None:
    key, body = _pem(b"OPENSSH PRIVATE KEY", lines=4, eol=eol)
    text = b"a " + key + b"b " + TOKENS["slack"] + b" c\n"
    whole = run(Redactor({}), [text])
    assert whole == _pem_masked(b"a " + key, body) + b"b " + MASK + b" c\n"
    for i in range(1, len(text)):
        assert run(Redactor({}), [text[:i], text[i:]]) == whole, i
    rnd = random.Random(3)
    for _ in range(300):
        cuts = sorted(rnd.sample(range(1, len(text)), 3))
        assert run(Redactor({}), [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]) == whole


def test_a_line_of_key_material_that_waits_past_the_quiet_second_is_masked_and_so_is_its_rest() -> None:
    key, body = _pem(b"PRIVATE KEY")
    cut = key.index(body[1]) + 30
    r = Redactor({})
    first = r("stdout", key[:cut], False)
    assert body[0] not in first and first.endswith(MASK + b"\n")
    assert r("stdout", b"", True) == MASK  # the pipes went quiet: the half line goes out masked
    rest = r("stdout", key[cut:], True)
    assert rest.startswith(MASK + b"\n") and body[1][30:] not in rest
    assert rest.endswith(b"-----END PRIVATE KEY-----\n")


def test_a_very_long_line_inside_a_key_block_is_judged_in_pieces_not_held_back_whole() -> None:
    from sidecar.redaction import PEM_MAX_LINE

    r = Redactor({})
    r("stdout", b"-----BEGIN PRIVATE KEY-----\n", False)
    out = r("stdout", b"A" * (PEM_MAX_LINE * 9 + 10), False)
    assert out == MASK * 9  # the last 10 bytes may still be the start of a line: they wait
    assert r("stdout", b"A" * 100 + b"\n-----END PRIVATE KEY-----\nok\n", False) == (
        MASK + b"\n-----END PRIVATE KEY-----\nok\n")


def test_streams_keep_their_own_private_key_state() -> None:
    r = Redactor({})
    key, body = _pem(b"PRIVATE KEY")
    cut = key.index(body[2])
    out = r("stdout", key[:cut], False)
    err = r("stderr", body[2] + b"\n", False)
    out += r("stdout", key[cut:], False)
    assert out == _pem_masked(key, body)
    assert err == body[2] + b"\n"


def test_mask_value_masks_a_private_key_in_a_status_message() -> None:
    key, body = _pem(b"PRIVATE KEY")
    r = Redactor({})
    assert r.mask_value({"k": key.decode()}) == {"k": _pem_masked(key, body).decode()}
    assert r.mask(b"x") == b"x"
    assert not r._pem and not r._held


def test_mask_from_two_threads_at_once_keeps_each_ones_state() -> None:
    """The main and control threads mask status messages at the same time: each call is a
    stream of its own."""
    import sys
    import threading

    key, body = _pem(b"PRIVATE KEY")
    values = [{"k": key.decode()}, {"k": "plain " + TOKENS["github"].decode() + " text"}]
    expected = [{"k": _pem_masked(key, body).decode()}, {"k": "plain [REDACTED] text"}]
    r = Redactor({})
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3000):
                assert r.mask_value(values[i]) == expected[i]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]


@pytest.mark.parametrize("token", [b"A" * 600, b"A" * 520 + b"/" + b"B" * 300, b"x.y" * 300])
def test_a_bearer_token_longer_than_the_hold_back_is_masked_wherever_a_read_cuts_it(token: bytes) -> None:
    line = b"Authorization: Bearer " + token + b"\n"
    for cut in range(1, len(line), 7):
        assert run(Redactor({}), [line[:cut], line[cut:]]) == b"Authorization: Bearer [REDACTED]\n", cut


def test_a_private_key_cut_short_inside_a_string_has_its_last_line_masked_too() -> None:
    """A tool's output truncated inside a JSON string, or a key printed as a Python repr: the
    key material before the closing quote is masked, and the rest of the line is ordinary text."""
    import json

    key, body = _pem(b"PRIVATE KEY", lines=4)
    cut = key[: key.index(body[2]) + 40].decode()
    event = json.dumps({"result": cut, "truncated": True, "auth": "sk-ant-" + "a1" * 12}).encode() + b"\n"
    nested = json.dumps({"tool": json.dumps({"out": cut})}).encode() + b"\n"
    shown = b"print(" + repr(cut.encode()).encode() + b")\n"
    for text in (event, nested, shown):
        whole = Redactor({})("stdout", text, True)
        for line in body[:2]:
            assert line not in whole, text
        assert body[2][:40] not in whole and body[2][:16] not in whole, whole
        assert whole.count(MASK) == (4 if text is event else 3), whole
        for i in range(1, len(text)):
            assert run(Redactor({}), [text[:i], text[i:]]) == whole, i
    # Quoted, a BEGIN line alone or with a short word after it masks nothing.
    for text in (b'"-----BEGIN PRIVATE KEY-----" marks it\n', b'"-----BEGIN PRIVATE KEY-----\\nabc" ok\n'):
        assert Redactor({})("stdout", text, True) == text


def test_a_private_key_double_escaped_tab_indented_or_line_numbered_is_masked() -> None:
    import json

    key, body = _pem(b"PRIVATE KEY", lines=3)
    service_account = json.dumps({"type": "service_account", "private_key": key.decode()})
    event = json.dumps({"type": "tool_result", "content": service_account}).encode()
    out = Redactor({}).mask(event)
    assert all(line not in out for line in body) and out.count(MASK) == len(body)
    tabbed = json.dumps({"content": "\t" + key.decode().replace("\n", "\n\t")}).encode()
    assert Redactor({}).mask(tabbed).count(MASK) == len(body)
    added = b"".join(b"+" + line + b"\n" for line in key.splitlines())  # a diff's +: masked with the line
    assert run(Redactor({}), [added]).count(MASK) == len(body)
    for numbered in (b"".join(b"%6d\t" % i + line + b"\n" for i, line in enumerate(key.splitlines(), 1)),
                     b"".join(b"%6d\xe2\x86\x92" % i + line + b"\n" for i, line in enumerate(key.splitlines(), 1)),
                     b"".join(b"-" + line + b"\n" for line in key.splitlines())):
        out = run(Redactor({}), [numbered])
        assert out == _pem_masked(numbered, body), numbered[:40]
        assert out.count(b"\n") == numbered.count(b"\n")


@pytest.mark.parametrize("eol", [b"\n", b"\\n"])
def test_a_quiet_second_anywhere_inside_a_key_line_leaks_nothing(eol: bytes) -> None:
    key, body = _pem(b"RSA PRIVATE KEY", lines=3, eol=eol, headers=(b"Proc-Type: 4,ENCRYPTED",))
    for cut in range(len(b"-----BEGIN RSA PRIVATE KEY-----") + 1, len(key) - 5):
        r = Redactor({})
        out = r("stdout", key[:cut], True) + r("stdout", key[cut:], False) + r("stdout", b"", True)
        assert b"Proc-Type: 4,ENCRYPTED" in out, cut
        for line in body:
            for i in range(0, len(line) - 8, 8):
                assert line[i : i + 8] not in out, (cut, out)


def test_a_key_line_that_begins_with_plus_or_slash_is_masked_whole() -> None:
    lines = [b"+" + b"A" * 63, b"/" + b"B" * 63, b"-" + b"C" * 63]
    key = b"-----BEGIN PRIVATE KEY-----\n" + b"\n".join(lines) + b"\n-----END PRIVATE KEY-----\n"
    # + and / are base64 and go with the mask; a leading - is no base64: a diff's, it stays
    assert run(Redactor({}), [key]) == (b"-----BEGIN PRIVATE KEY-----\n[REDACTED]\n[REDACTED]\n-[REDACTED]\n"
                                        b"-----END PRIVATE KEY-----\n")
