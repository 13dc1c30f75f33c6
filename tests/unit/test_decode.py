"""decode.py: header values, parameters and base64 to text, whatever the labels say."""

import pytest

from bridge.mail import decode, parse
from bridge.mail.decode import decode_base64, decode_header_value, decode_params, split_params


def test_parse_re_exports_decode_header_value() -> None:
    assert parse.decode_header_value is decode.decode_header_value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ""),
        ("plain text", "plain text"),
        ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),
        ("=?utf-8?q?a?=  x  =?utf-8?q?b?=", "a  x  b"),
        ("=?UTF-8?B?8J+Ygg==?=", "😂"),
        ("=?utf-8?b?8J+Y?= =?utf-8?b?gg==?=", "😂"),  # one emoji split across two words
        ("=?iso-8859-1?q?caf=E9?=", "café"),
        ("=?x-klingon?q?caf=C3=A9?=", "café"),  # unknown charset: UTF-8 guess
        ("=?utf-8*en?q?hi?=", "hi"),  # RFC 2231 language suffix
        ("=?utf-8?b?SGVsbG8!!?=", "Hello"),  # damaged base64: decode what is there
        (b"Caf\xe9", "Café"),
        ("Re: =?utf-8?Q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?Q?_aus_Wien?=", "Re: Grüße aus Wien"),
    ],
)
def test_decode_header_value(value: str | bytes | None, expected: str) -> None:
    assert decode_header_value(value) == expected


def test_params_rfc2231_continuations_win_over_plain_fallback() -> None:
    pairs = split_params(
        "attachment; filename=\"fallback.pdf\"; filename*0*=utf-8''%E2%82%AC%20rates;"
        ' filename*1=" 2026.xlsx"; size=12'
    )
    problems: list[str] = []
    params = decode_params(pairs, problems.append)
    assert params == {"filename": "€ rates 2026.xlsx", "size": "12"}
    assert problems == []


def test_damaged_base64_decodes_what_is_there() -> None:
    assert decode_base64(b"SGVs\r\nbG8=") == (b"Hello", True)
    assert decode_base64(b"SGVs!bG8") == (b"Hello", False)
