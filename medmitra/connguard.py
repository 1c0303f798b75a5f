"""Bounded connections: a header-read deadline and a maximum number of open connections.

Sanic's own timeouts restart at every byte received, so a client that trickles its request
head one byte at a time (slow-loris) keeps a connection for ever, and nothing caps how many
connections are open. ``GuardedHttpProtocol`` adds:

- a deadline for the request line and headers (``server.header_timeout_s``) counted from
  the first byte of the request, whatever arrives after it: past it the client gets 408
  and the connection is closed;
- at most ``server.max_connections`` open at once. A new connection beyond it first closes
  the connections doing nothing useful -- idle keep-alive ones, then ones still sending
  their head -- oldest first; only when every connection is busy with a request is the new
  one refused with a 503 that says why. A thousand idle sockets from one host therefore
  cannot keep anyone else (``/health`` included) out.

The keep-alive timeout is Sanic's ``KEEP_ALIVE_TIMEOUT`` (``server.keep_alive_timeout_s``).
"""

from __future__ import annotations

import logging
import sys
from time import monotonic
from typing import Any

import orjson
from sanic.exceptions import RequestTimeout
from sanic.http import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

log = logging.getLogger("medmitra.connections")

# How many connections one over-the-limit arrival may close at most (idle ones are cheap
# to close; closing a batch spares the next arrivals the search).
EVICT_BATCH = 16
REFUSAL_MESSAGE = "The server is at its connection limit (server.max_connections); try again"


# Descriptors kept free beyond the connections: database, files being uploaded, logs.
FD_RESERVE = 256


def fit_open_files(max_connections: int) -> int:
    """Raise this process's open-file limit toward ``max_connections + FD_RESERVE`` (up to
    the hard limit) and return the connection cap that fits: past the limit the server
    could not even accept a connection to refuse it."""
    try:
        import resource
    except ImportError:             # not POSIX
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        new_soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < want:
        fitted = max(16, soft - FD_RESERVE)
        log.warning("server.max_connections = %d does not fit the open-file limit (%d); "
                    "using %d", max_connections, soft, fitted)
        return fitted
    return max_connections


def _refusal() -> bytes:
    body = orjson.dumps({"detail": REFUSAL_MESSAGE, "error": REFUSAL_MESSAGE})
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            b"retry-after: 1\r\nconnection: close\r\ncache-control: no-store\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class GuardedHttpProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a header deadline and a connection cap."""

    __slots__ = ("_header_timeout", "_max_connections", "_head_started")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        server = self.app.ctx.settings.server
        self._header_timeout = float(server.header_timeout_s)
        self._max_connections = int(getattr(self.app.ctx, "max_connections",
                                            server.max_connections))
        self._head_started: float | None = None

    # -- connection cap ----------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        if len(self.connections) >= self._max_connections:
            self._make_room()
            if len(self.connections) >= self._max_connections:
                log.warning("connection refused: %d open (server.max_connections)",
                            len(self.connections))
                try:
                    transport.write(_refusal())
                finally:
                    transport.close()
                return
        super().connection_made(transport)

    def connection_lost(self, exc: Any) -> None:
        if self.transport is None:       # refused in connection_made: nothing was set up
            return
        super().connection_lost(exc)

    def _make_room(self) -> None:
        """Close up to EVICT_BATCH connections that hold no request: idle ones, then ones
        still sending their head, least recently active first."""
        candidates = []
        for conn in list(self.connections):
            http = getattr(conn, "http", None)
            stage = http.stage if http is not None else Stage.IDLE
            if stage is Stage.IDLE:
                candidates.append((0, conn._time, conn))
            elif stage is Stage.REQUEST:
                candidates.append((1, conn._time, conn))
        candidates.sort(key=lambda c: (c[0], c[1]))
        for _, _, conn in candidates[:EVICT_BATCH]:
            conn.close()
            # close() only starts closing; connection_lost removes it later.
            self.connections.discard(conn)

    # -- header deadline ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        http = self.http
        stage = http.stage if http is not None else Stage.IDLE
        if stage is Stage.IDLE or (stage is Stage.REQUEST and self._head_started is None):
            self._head_started = monotonic()      # the first byte of a request
        elif stage is not Stage.REQUEST:
            self._head_started = None
        super().data_received(data)

    def check_timeouts(self) -> None:
        http = self.http
        if self._task and http is not None and http.stage is Stage.REQUEST \
                and self._head_started is not None \
                and monotonic() - self._head_started > self._header_timeout:
            log.debug("header timeout: closing connection")
            http.exception = RequestTimeout("Request header timeout")
            if sys.version_info < (3, 14):
                self._task.cancel("Cancel connection task with a timeout")
            else:
                self._task.cancel()
            return
        if http is not None and http.stage is not Stage.REQUEST:
            self._head_started = None
        super().check_timeouts()
