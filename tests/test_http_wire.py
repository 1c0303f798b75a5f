"""What only Sanic's HTTP server on a real socket does (the rest of the bad-input table runs
in process, in tests/test_bad_input.py): the whole-request cap counted as the body arrives,
a streaming route that refuses a request early still drains the body and keeps the
connection usable, and a declared body over the cap gets its answer before the server
closes the connection."""

from __future__ import annotations

import json
import socket
from typing import Iterator

import pytest

from conftest import serve_on_socket
from test_bad_input import (CAP, CAP_ROWS, CREATE, GOOD_PARTS, MP, OVER_CAP_NOTES, Call, MiB,
                            World, assert_error, file_part, make_world, mp, pad_pdf,
                            refused_without_a_trace, world_settings)
from tests import docfactory as df

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def wire(tmp_path_factory) -> Iterator[World]:
    """The bad-input world (same limits and baseline case) on a loopback socket."""
    with serve_on_socket(world_settings(tmp_path_factory, "wire"),
                         start_workers=False) as server:
        yield make_world(server)


def port(world: World) -> int:
    return int(world.server.url.rsplit(":", 1)[1])


@pytest.mark.parametrize("name, call, status", CAP_ROWS, ids=[r[0] for r in CAP_ROWS])
def test_request_over_the_cap_changes_nothing(wire: World, name: str, call: Call,
                                              status: int) -> None:
    refused_without_a_trace(wire, call, status)


def test_chunked_body_over_the_request_cap_is_413(wire: World) -> None:
    """No Content-Length to refuse up front: the cap is counted as the chunks arrive. Every
    part is within its own limit; only the whole is too big."""
    before = wire.snapshot()
    body = mp(*GOOD_PARTS, *OVER_CAP_NOTES, file_part("lab_files", "a.csv", df.lab_csv()))
    assert len(body) > CAP

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    with wire.server.client(wire.alice.token) as c:
        r = c.post(CREATE, content=chunks(), headers={"content-type": MP})
    assert_error(r, 413)
    assert wire.snapshot() == before


def _http(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one request (tolerating a peer that stops reading) and read one response."""
    try:
        sock.sendall(request)
    except OSError:
        pass   # the server answered early and closed; its answer is still in our buffer
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        assert data, f"connection closed before a response: {buf!r}"
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        data = sock.recv(65536)
        assert data, "connection closed inside the response body"
        rest += data
    return int(lines[0].split()[1]), headers, rest[:length]


def _create_request(body: bytes, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {CREATE} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MP}\r\n"
            f"Content-Length: {len(body)}\r\n{auth}\r\n").encode() + body


@pytest.mark.parametrize("token, file_bytes, status", [
    (None, 600 * 1024, 401),          # refused before the body is read
    ("alice", 600 * 1024, 413),       # one file over its 8 KiB limit, mid-body
    ("alice", 100, 415),              # refused after the whole body (baseline)
])
def test_early_refusal_is_clean_and_keeps_the_connection(wire: World, token, file_bytes,
                                                         status) -> None:
    """The client gets the whole error response, and the connection stays usable: the
    server read (drained) the rest of the body instead of resetting the connection."""
    before = wire.snapshot()
    body = mp(*GOOD_PARTS, file_part("lab_files", "x.pdf", df.elf_exe()[:file_bytes]
                                     if file_bytes <= 576 else pad_pdf(file_bytes)))
    assert len(body) < CAP
    with socket.create_connection(("127.0.0.1", port(wire)), timeout=30) as sock:
        code, headers, payload = _http(sock, _create_request(
            body, wire.alice.token if token else None))
        assert code == status
        doc = json.loads(payload)
        assert doc["detail"] == doc["error"]
        assert headers.get("connection", "keep-alive") == "keep-alive"
        code, _, payload = _http(sock, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert code == 200 and b"running" in payload
    assert wire.snapshot() == before


@pytest.mark.parametrize("token", [None, "alice"])
def test_declared_body_over_the_cap_gets_its_answer(wire: World, token) -> None:
    """Content-Length over request_max_bytes: refused without reading the body; the answer
    (401 or 413) still reaches a client that is busy sending, then the server closes."""
    before = wire.snapshot()
    body = mp(*GOOD_PARTS, file_part("lab_files", "x.pdf", pad_pdf(4 * MiB)))
    with socket.create_connection(("127.0.0.1", port(wire)), timeout=30) as sock:
        code, headers, payload = _http(sock, _create_request(
            body, wire.alice.token if token else None))
    assert code == (413 if token else 401)
    assert json.loads(payload)["detail"]
    assert headers["connection"] == "close"    # the unread body makes the connection unusable
    assert wire.snapshot() == before
