"""The scripts' SHA-1 digests, written out in sidecar.transport, match the scripts."""

from __future__ import annotations

import hashlib

import pytest

from sidecar import transport


@pytest.mark.parametrize(("script", "digest"), [
    (transport.APPEND_SCRIPT, transport.APPEND_SHA),
    (transport.TOKENS_SCRIPT, transport.TOKENS_SHA),
    (transport.VARIATION_SCRIPT, transport.VARIATION_SHA),
])
def test_script_digest_matches_the_script(script: str, digest: str) -> None:
    assert hashlib.sha1(script.encode()).hexdigest() == digest
