"""The fast header sanitiser (api/headers.py) writes exactly what Sanic's own does."""

from __future__ import annotations

import random

from sanic.response import json as json_response
from sanic.response.types import HEADER_TRANSLATION_TABLE, BaseHTTPResponse

from medmitra.api import headers


def sanic_own(value: str) -> str:
    return value.translate(HEADER_TRANSLATION_TABLE)


def test_every_bmp_character_alone_and_inside_text() -> None:
    for code in range(0x10000):
        ch = chr(code)
        for value in (ch, f"a{ch}b", f"{ch}{ch}"):
            assert headers.sanitize_header_value(value) == sanic_own(value), hex(code)


def test_random_strings_with_control_characters() -> None:
    rng = random.Random(1307)
    alphabet = "ab-/;= \t\r\n\x00\x7f\x85\u2028é中"
    for _ in range(20_000):
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert headers.sanitize_header_value(value) == sanic_own(value), repr(value)


def test_installed_responses_still_strip_injected_lines() -> None:
    headers.install()
    assert BaseHTTPResponse._sanitize_header_value("x") == "x"
    response = json_response({}, headers={"X-Evil": "a\r\nSet-Cookie: b=c\x00"})
    sent = dict(response.processed_headers)
    assert sent[b"X-Evil"] == b"aSet-Cookie: b=c"
    assert all(b"\r" not in v and b"\n" not in v for v in sent.values())
