"""The sans-I/O response reader shared by both clients and forward_api_calls."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodemanager.http.framing import BodyTooLarge, ProtocolError
from nodemanager.http.responses import ResponseCutShort, ResponseReader

OK = b"HTTP/1.1 200 OK\r\n"


def read(stream: bytes, *, pieces: list[int] | None = None, close: bool = True, max_body: int = 1000,
         head_only: bool = False) -> ResponseReader:
    """Feed ``stream`` cut at the offsets ``pieces`` (all at once without), then the close."""
    reader = ResponseReader(max_body=max_body, head_only=head_only)
    cuts = sorted({0, len(stream), *(p % (len(stream) + 1) for p in pieces or [])})
    for start, end in zip(cuts, cuts[1:]):
        reader.feed(stream[start:end])
    if close and not reader.done:
        reader.end_of_stream()
    return reader


COMPLETE = [
    (OK + b"Content-Length: 5\r\n\r\nhello", 200, b"hello"),
    (OK + b"Content-Length: 0\r\n\r\n", 200, b""),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n", 200, b"hello world"),
    (OK + b"Connection: close\r\n\r\nuntil the end", 200, b"until the end"),
    (b"HTTP/1.1 100 Continue\r\n\r\n" + OK + b"Content-Length: 2\r\n\r\nok", 200, b"ok"),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", 304, b""),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", 204, b""),
]


@pytest.mark.parametrize(("stream", "status", "body"), COMPLETE)
def test_complete_responses(stream: bytes, status: int, body: bytes) -> None:
    reader = read(stream)
    assert reader.done and reader.head is not None
    assert (reader.head.status, reader.body) == (status, body)


@given(case=st.sampled_from(COMPLETE), pieces=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_split_of_the_bytes_reads_the_same(case: tuple[bytes, int, bytes], pieces: list[int]) -> None:
    stream, status, body = case
    reader = read(stream, pieces=pieces)
    assert reader.head is not None and (reader.head.status, reader.body) == (status, body)


def test_head_request_has_no_body_whatever_the_head_announces() -> None:
    reader = read(OK + b"Content-Length: 100\r\n\r\n", head_only=True, close=False)
    assert reader.done and reader.body == b""


def test_bytes_after_a_complete_response_are_kept_as_unused() -> None:
    reader = read(OK + b"Content-Length: 2\r\nX: 1\r\n\r\nokHTTP/1.1", close=False)
    assert reader.done and reader.body == b"ok" and reader.unused == b"HTTP/1.1"
    reader.feed(b" 200")
    assert reader.unused == b"HTTP/1.1 200"


@pytest.mark.parametrize(("stream", "answered", "words"), [
    (b"", False, "before answering"),
    (b"HTTP/1.1 200", True, "mid-head"),
    (OK + b"Content-Length: 10\r\n\r\nabc", True, "3 of 10 bytes"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", True, "chunked body incomplete"),
])
def test_a_response_cut_short_says_how_far_it_got(stream: bytes, answered: bool, words: str) -> None:
    with pytest.raises(ResponseCutShort, match=words) as caught:
        read(stream)
    assert caught.value.answered is answered


@pytest.mark.parametrize(("stream", "error", "words"), [
    (OK + b"Content-Length: 1001\r\n\r\n", BodyTooLarge, "1001 bytes, over the 1000-byte cap"),
    (OK + b"\r\n" + b"x" * 1001, BodyTooLarge, "over the 1000-byte cap"),
    (OK + b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n", BodyTooLarge, "over 1000"),
    (b"garbage\r\n\r\n", ProtocolError, "."),
    (OK + b"X: " + b"a" * 70_000, ProtocolError, "response head over"),
])
def test_oversized_and_malformed_responses_are_refused(stream: bytes, error: type[Exception], words: str) -> None:
    with pytest.raises(error, match=words):
        read(stream, close=False)


def test_an_announced_oversized_body_is_refused_before_any_of_it_arrives() -> None:
    reader = ResponseReader(max_body=10)
    with pytest.raises(BodyTooLarge):
        reader.feed(OK + b"Content-Length: 11\r\n\r\n")
