"""A real `keyshift serve` refuses a request head (request line + headers) over
KEYSHIFT_MAX_HEADER_BYTES with 431 and a JSON error, and serves everything under it."""

from __future__ import annotations

import socket

import httpx
import pytest

from tests.support import LiveServer

pytestmark = pytest.mark.server


def _raw_request(base_url: str, head: bytes, body: bytes = b"") -> bytes:
    """Send ``head`` (and ``body``) over a plain socket, in chunks; return what comes back."""
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        data = head + body
        try:
            for start in range(0, len(data), 64 * 1024):
                conn.sendall(data[start : start + 64 * 1024])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading all of it: that is the point
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("size", [1024 * 1024, 8 * 1024 * 1024], ids=["1MB", "8MB"])
def test_a_megabyte_header_is_refused_with_431(live_server: LiveServer, size: int) -> None:
    head = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * size
        + b"\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_request(live_server.base_url, head)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 431 Request Header Fields Too Large", answer[:200]
    body = rest.partition(b"\r\n\r\n")[2]
    assert b'"code":"headers_too_large"' in body


def test_many_headers_over_the_cap_are_refused_with_431(live_server: LiveServer) -> None:
    headers = {f"x-h{i}": "v" * 100 for i in range(400)}  # ~43 KB in 400 complete headers
    response = httpx.get(f"{live_server.base_url}/healthz", headers=headers, timeout=10)
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"


def test_headers_under_the_cap_and_a_large_body_are_served(live_server: LiveServer) -> None:
    base = live_server.base_url
    assert (
        httpx.get(f"{base}/healthz", headers={"x-h": "v" * 16_000}, timeout=10).status_code == 200
    )
    # A body is not part of the head: arriving in the same chunk as the headers, it is not
    # counted against their cap.
    body = b'{"key": "x", "padding": "' + b"p" * 60_000 + b'"}'
    head = (
        b"POST /v1/licenses/validate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
    )
    answer = _raw_request(base, head, body)
    assert answer.startswith(b"HTTP/1.1 422"), answer[:200]


@pytest.mark.server_env(KEYSHIFT_MAX_HEADER_BYTES="4096")
def test_the_cap_is_configurable(live_server: LiveServer) -> None:
    base = live_server.base_url
    assert httpx.get(f"{base}/healthz", headers={"x-h": "v" * 3000}, timeout=10).status_code == 200
    assert httpx.get(f"{base}/healthz", headers={"x-h": "v" * 5000}, timeout=10).status_code == 431
