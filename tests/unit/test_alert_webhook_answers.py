"""One alert POST against webhooks that answer badly: it is over within its timeout however
slowly the answer trickles in, a 2xx stays a 2xx whatever follows it, and an answer that is
not HTTP is a failed attempt the deliverer catches (an exception it would not catch would
leave the event unlogged and uncounted)."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from extauthz.alerts import post

pytestmark = pytest.mark.unit


def webhook(head: bytes, trickle: bytes = b"", every_s: float = 0.1) -> Iterator[str]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65_536)
            try:
                conn.sendall(head)
                for byte in trickle:
                    time.sleep(every_s)
                    conn.sendall(bytes([byte]))
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    listener.close()


@pytest.fixture
def trickled_body() -> Iterator[str]:
    yield from webhook(b"HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n", b"x" * 40)


@pytest.fixture
def trickled_head() -> Iterator[str]:
    yield from webhook(b"", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")


@pytest.fixture
def broken_body() -> Iterator[str]:
    yield from webhook(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")


@pytest.fixture
def not_http() -> Iterator[str]:
    yield from webhook(b"garbage\r\n\r\n")


def test_a_body_trickled_after_a_2xx_ends_the_attempt_at_its_timeout_as_delivered(
    trickled_body: str,
) -> None:
    began = time.monotonic()
    assert post(trickled_body, b"{}", {}, 0.5) == 200
    assert time.monotonic() - began < 1.5  # 4 s of trickle


def test_a_status_line_trickled_in_fails_at_the_timeout(trickled_head: str) -> None:
    began = time.monotonic()
    with pytest.raises((OSError, http.client.HTTPException)):
        post(trickled_head, b"{}", {}, 0.5)
    assert time.monotonic() - began < 1.5


def test_a_2xx_whose_body_breaks_off_is_delivered(broken_body: str) -> None:
    assert post(broken_body, b"{}", {}, 2.0) == 200


def test_an_answer_that_is_not_http_is_an_exception_the_deliverer_catches(
    not_http: str,
) -> None:
    with pytest.raises(http.client.HTTPException):
        post(not_http, b"{}", {}, 2.0)
