"""The pure HTTP/1.x framing (nodemanager.http.framing): request heads, response heads, chunked
bodies, in tables of good and bad inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nodemanager.http.framing import (
    MAX_HEAD_BYTES,
    BodyTooLarge,
    ChunkedDecoder,
    HttpError,
    ProtocolError,
    Request,
    Response,
    encode_request,
    encode_response,
    error_response,
    http_date,
    parse_request_head,
    parse_response_head,
)


def head(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("latin-1") + b"\r\n"


# --------------------------------------------------------------------------- request heads

def test_a_post_head_is_parsed() -> None:
    request = parse_request_head(
        head("POST /RPC2?x=1&y=%20z&x=2 HTTP/1.1\nHost: a\nContent-Length: 12\nX-A: 1\nx-a: 2\n"), max_body=100
    )
    assert request.method == "POST"
    assert request.target == "/RPC2?x=1&y=%20z&x=2"
    assert request.path == "/RPC2"
    assert request.query == {"x": "1", "y": " z"}
    assert request.content_length == 12
    assert request.headers["x-a"] == "1, 2"
    assert request.headers["host"] == "a"
    assert request.keep_alive and request.http11 and not request.expect_continue


def test_request_is_frozen_and_compares_by_value() -> None:
    a = parse_request_head(head("POST / HTTP/1.1\nContent-Length: 0\n"), max_body=0)
    b = parse_request_head(head("POST / HTTP/1.1\nContent-Length: 0\n"), max_body=0)
    assert a == b and "Request(method='POST'" in repr(a)
    with pytest.raises(AttributeError):
        a.method = "GET"  # type: ignore[misc]
    assert Request("GET", "/", {}, 0, True, True, False).query == {}


@pytest.mark.parametrize(
    ("text", "keep_alive", "http11", "expect"),
    [
        ("POST / HTTP/1.1\nContent-Length: 1\n", True, True, False),
        ("POST / HTTP/1.1\nContent-Length: 1\nConnection: Close\n", False, True, False),
        ("POST / HTTP/1.1\nContent-Length: 1\nConnection: foo, close\n", False, True, False),
        ("POST / HTTP/1.0\nContent-Length: 1\n", False, False, False),
        ("POST / HTTP/1.0\nContent-Length: 1\nConnection: Keep-Alive\n", True, False, False),
        ("POST / HTTP/1.1\nContent-Length: 1\nExpect: 100-Continue\n", True, True, True),
        ("POST / HTTP/1.0\nContent-Length: 1\nExpect: 100-continue\n", False, False, False),
    ],
)
def test_keep_alive_and_expect_rules(text: str, keep_alive: bool, http11: bool, expect: bool) -> None:
    request = parse_request_head(head(text), max_body=10)
    assert (request.keep_alive, request.http11, request.expect_continue) == (keep_alive, http11, expect)


@pytest.mark.parametrize(
    ("text", "methods", "status"),
    [
        ("GET / HTTP/1.1\nHost: x\n", ("POST",), 405),
        ("DELETE / HTTP/1.1\nContent-Length: 0\n", ("GET", "HEAD"), 405),
        ("POST / HTTP/1.1\nHost: x\n", ("POST",), 411),
        ("POST / HTTP/1.1\nTransfer-Encoding: chunked\n", ("POST",), 411),
        ("POST / HTTP/1.1\nContent-Length: 12abc\n", ("POST",), 400),
        ("POST / HTTP/1.1\nContent-Length: -1\n", ("POST",), 400),
        ("POST / HTTP/1.1\nContent-Length: 1234567890123456789\n", ("POST",), 400),
        ("POST / HTTP/1.1\nContent-Length: 3\nContent-Length: 4\n", ("POST",), 400),
        ("POST / HTTP/1.1\nContent-Length: 3\nContent-Length: 3\n", ("POST",), 400),
        ("POST / HTTP/1.1\nContent-Length: 11\n", ("POST",), 413),
        ("POST / HTTP/1.1\nContent-Length: 3\nContent-Encoding: gzip\n", ("POST",), 415),
        ("POST / HTTP/2.0\nContent-Length: 0\n", ("POST",), 505),
        ("POST / HTTP/0.9\nContent-Length: 0\n", ("POST",), 505),
        ("POST / HTTP/1.1x\nContent-Length: 0\n", ("POST",), 400),
        ("POST / FTP/1.1\nContent-Length: 0\n", ("POST",), 400),
        ("hello there\n", ("POST",), 400),
        ("POST  / HTTP/1.1\n", ("POST",), 400),
        ("POST / HTTP/1.1\nbad header\n", ("POST",), 400),
        ("POST / HTTP/1.1\nbad name: x\n", ("POST",), 400),
        ("GET / HTTP/1.1\nContent-Length: 4\n", ("GET",), 400),
        ("GET / HTTP/1.1\nTransfer-Encoding: chunked\n", ("GET",), 400),
        ("HEAD / HTTP/1.1\nContent-Length: 1\n", ("GET", "HEAD"), 400),
        ("P(ST / HTTP/1.1\nContent-Length: 0\n", ("POST",), 400),
    ],
)
def test_bad_request_heads_get_their_status(text: str, methods: tuple[str, ...], status: int) -> None:
    with pytest.raises(HttpError) as caught:
        parse_request_head(head(text), max_body=10, methods=methods)
    assert caught.value.status == status
    assert caught.value.message


def test_a_405_names_the_allowed_methods() -> None:
    with pytest.raises(HttpError) as caught:
        parse_request_head(head("POST / HTTP/1.1\nContent-Length: 0\n"), max_body=1, methods=("GET", "HEAD"))
    assert caught.value.headers == ((b"Allow", b"GET, HEAD"),)
    assert b"\r\nAllow: GET, HEAD\r\n" in error_response(caught.value)


def test_a_head_over_the_cap_is_431() -> None:
    big = b"POST / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    with pytest.raises(HttpError) as caught:
        parse_request_head(big, max_body=1)
    assert caught.value.status == 431


def test_get_and_head_without_a_body_are_fine() -> None:
    get = parse_request_head(head("GET /metrics HTTP/1.1\n"), max_body=0, methods=("GET", "HEAD"))
    assert get.content_length == 0 and get.path == "/metrics"
    zero = parse_request_head(head("HEAD / HTTP/1.0\nContent-Length: 0\n"), max_body=0, methods=("GET", "HEAD"))
    assert zero.content_length == 0 and not zero.keep_alive


# --------------------------------------------------------------------------- responses

def test_encode_response_frames_the_body() -> None:
    data = encode_response(Response(200, b"<x/>", headers=((b"ETag", b'"7"'),)), keep_alive=True, http11=True)
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert body == b"<x/>"
    lines = head_part.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Length: 4" in lines and b"Content-Type: text/xml" in lines and b'ETag: "7"' in lines
    assert not any(line.startswith(b"Connection") for line in lines)
    assert b"Connection: keep-alive" in encode_response(Response(), keep_alive=True, http11=False)
    assert b"Connection: close" in encode_response(Response(), keep_alive=False, http11=True)


def test_a_head_response_has_the_length_but_no_body() -> None:
    data = encode_response(Response(200, b"12345"), keep_alive=True, http11=True, head_only=True)
    assert data.endswith(b"Content-Length: 5\r\n\r\n")


def test_a_header_with_a_line_break_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_response(Response(200, b"", headers=((b"X", b"a\r\nSet-Cookie: 1"),)), keep_alive=True, http11=True)
    with pytest.raises(ValueError):
        encode_response(Response(200, b"", content_type=b"text/plain\r\nX: 1"), keep_alive=True, http11=True)
    with pytest.raises(ValueError):
        encode_request("GET", "/", host="a\r\nX: 1")


def test_error_response_is_plain_text_and_closes() -> None:
    data = error_response(HttpError(413, "too big"))
    assert data.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert b"Connection: close" in data and data.endswith(b"\r\n\r\ntoo big\n")


def test_http_date_format() -> None:
    assert http_date(784111777) == b"Sun, 06 Nov 1994 08:49:37 GMT"
    assert len(http_date()) == 29


# --------------------------------------------------------------------------- client side

def test_encode_request() -> None:
    data = encode_request("POST", "/RPC2", host="node:812", body=b"abc", headers=[("User-Agent", "nm")],
                          keep_alive=False)
    assert data == (b"POST /RPC2 HTTP/1.1\r\nHost: node:812\r\nContent-Type: text/xml\r\nContent-Length: 3\r\n"
                    b"Connection: close\r\nUser-Agent: nm\r\n\r\nabc")
    assert b"Content-Length" not in encode_request("GET", "/x", host="h")
    request = parse_request_head(data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n", max_body=3)
    assert request.content_length == 3 and not request.keep_alive


@pytest.mark.parametrize(
    ("text", "status", "length", "chunked", "keep_alive"),
    [
        ("HTTP/1.1 200 OK\nContent-Length: 5\n", 200, 5, False, True),
        ("HTTP/1.1 200 OK\nContent-Length: 5, 5\n", 200, 5, False, True),
        ("HTTP/1.1 404 Not Found\nTransfer-Encoding: chunked\nContent-Length: 9\n", 404, None, True, True),
        ("HTTP/1.0 200 OK\nContent-Length: 0\n", 200, 0, False, False),
        ("HTTP/1.0 200 OK\nContent-Length: 0\nConnection: keep-alive\n", 200, 0, False, True),
        ("HTTP/1.1 200 OK\n", 200, None, False, False),
        ("HTTP/1.1 304 Not Modified\n", 304, None, False, True),
        ("HTTP/1.1 200\nContent-Length: 1\n", 200, 1, False, True),
    ],
)
def test_good_response_heads(text: str, status: int, length: int | None, chunked: bool, keep_alive: bool) -> None:
    parsed = parse_response_head(head(text))
    assert (parsed.status, parsed.content_length, parsed.chunked, parsed.keep_alive) == (
        status, length, chunked, keep_alive)


@pytest.mark.parametrize(
    "text",
    [
        "garbage\n",
        "HTTP/2 200 OK\n",
        "HTTP/1.1 20 OK\n",
        "HTTP/1.1 2000 OK\n",
        "HTTP/1.1 abc OK\n",
        "HTTP/1.1 200 OK\nno colon\n",
        "HTTP/1.1 200 OK\nContent-Length: x\n",
        "HTTP/1.1 200 OK\nContent-Length: 1, 2\n",
        "HTTP/1.1 200 OK\nContent-Length: -5\n",
        "HTTP/1.1 200 OK\nTransfer-Encoding: gzip, chunked\n",
        "HTTP/1.1 200 OK\nX: " + "a" * (4 * MAX_HEAD_BYTES) + "\n",
    ],
)
def test_bad_response_heads(text: str) -> None:
    with pytest.raises(ProtocolError):
        parse_response_head(head(text))


def test_chunked_body_in_one_piece_and_byte_by_byte() -> None:
    wire = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT"
    whole = ChunkedDecoder(100)
    assert whole.feed(wire) == b"hello 0123456789" and whole.done and whole.unused == b"NEXT"
    drip = ChunkedDecoder(100)
    out = b"".join(drip.feed(wire[i:i + 1]) for i in range(len(wire)))
    assert out == b"hello 0123456789" and drip.done and drip.unused == b"NEXT"


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"FFFFFFFFFFFFFFFF\r\n", BodyTooLarge),           # a hostile size: refused before any data
        (b"11\r\n" + b"a" * 17 + b"\r\n", BodyTooLarge),   # 17 > 16
        (b"8\r\naaaaaaaa\r\n9\r\n", BodyTooLarge),         # the running total counts
        (b"1FFFFFFFFFFFFFFFF\r\n", ProtocolError),         # 17 hex digits
        (b"0x5\r\nhello\r\n", ProtocolError),
        (b"-5\r\nhello\r\n", ProtocolError),
        (b"5_0\r\n", ProtocolError),
        (b"\r\n", ProtocolError),
        (b"zz\r\n", ProtocolError),
        (b"5\r\nhelloXX", ProtocolError),
        (b"1" * 2000, ProtocolError),                       # a size line that never ends
        (b"0\r\n" + b"X: y\r\n" * 4000, ProtocolError),     # an endless trailer
    ],
)
def test_hostile_chunked_bodies(wire: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        ChunkedDecoder(16).feed(wire)


def test_importing_framing_stays_cheap() -> None:
    """forward_api_calls imports it once per SSH call: no dataclasses, typing, re or email."""
    code = "import sys, nodemanager.http.framing; print(sorted({'dataclasses','typing','re','email'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = {sys.path!r}; {code}"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
