"""The session-id format: what the server makes, what a record may hold, what may be routed."""

from __future__ import annotations

import pytest

from contract.session_id import is_session_id, is_storable_session_id, new_session_id, routable


def test_new_ids_have_the_server_format_and_differ() -> None:
    ids = {new_session_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(is_session_id(i) and len(i) == 32 for i in ids)


@pytest.mark.parametrize(
    "text", ["", "0" * 31, "0" * 33, "A" * 32, "g" * 32, " " + "0" * 31, "0" * 31 + "\n", "é" * 32]
)
def test_the_server_format_is_exactly_32_lower_case_hex(text: str) -> None:
    assert not is_session_id(text)


def test_records_accept_a_wider_alphabet_but_no_separator_or_long_id() -> None:
    assert is_storable_session_id(new_session_id())
    assert is_storable_session_id("ab12-CD_34.x")
    for text in ("", "a" * 129, "a/b", "a:b", "a b", "é"):
        assert not is_storable_session_id(text), text
    assert is_storable_session_id("a" * 128)


def test_routable_ids_are_printable_ascii_without_outer_spaces() -> None:
    assert routable(new_session_id())
    assert routable("any printable id")
    for text in ("", " x", "x ", "a\nb", "é", "x" * 129):
        assert not routable(text), text
