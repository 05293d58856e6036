"""List cursors are untrusted input: anything but a cursor the API made is InvalidCursor, never
another exception (which would be a 500)."""

from __future__ import annotations

import base64

import pytest

from smallfirst.api.listing import InvalidCursor, decode_cursor, encode_cursor


def b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_a_cursor_the_api_made_decodes_to_its_position() -> None:
    assert decode_cursor(encode_cursor((1764740000123, "job_abc"))) == (1764740000123, "job_abc")


@pytest.mark.parametrize("cursor", [
    "", "not-a-cursor", "é" * 10, "A" * 600,
    b64("Infinity"), b64('{"s": Infinity, "id": "j"}'), b64('{"s": -Infinity, "id": "j"}'),
    b64('{"s": NaN, "id": "j"}'), b64('{"s": 1e400, "id": "j"}'), b64('{"s": 1.5, "id": "j"}'),
    b64('{"s": ' + "9" * 300 + ', "id": "j"}'), b64('{"s": 9007199254740993, "id": "j"}'),
    b64('{"s": -1, "id": "j"}'), b64('{"s": true, "id": "j"}'), b64('{"s": "12", "id": "j"}'),
    b64('{"s": 1, "id": 5}'), b64('{"s": 1, "id": ""}'), b64('{"s": 1, "id": "' + "x" * 200 + '"}'),
    b64('{"s": 1}'), b64('{"s": 1, "id": "j", "more": 1}'), b64("[1, 2]"), b64("null"),
    b64("[" * 300), b64('{"s": ' * 300), b64('{"s": {"s": {"s": 1}}, "id": "j"}'),
    base64.urlsafe_b64encode(b"\xff\xfe\x00").decode(),
])
def test_anything_else_is_an_invalid_cursor(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)
