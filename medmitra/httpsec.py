"""HTTP-level protections that apply to every route: response headers that keep patient
data out of browser and proxy caches, an access log that never holds a query string or a
token, and the trusted base of the links the server builds.

- Every response gets ``X-Content-Type-Options: nosniff`` and, unless the route chose its
  own caching (the public JWKS, the bundled docs assets), ``Cache-Control: no-store``:
  API answers carry patient data and a shared clinic browser or proxy must not keep them.
- Access log (``server.access_log``): method, the route *template* (``/files/download/
  <token:str>``, never the signed token itself), status and size. Sanic's own access log
  writes the full URL (``?search=<patient name>``, signed download links), so it is off.
- ``base_url``: links (``file_url``) are built from ``server.public_url``; without it, from
  the request's ``Host`` only when that names this machine (its address the client
  connected to, its host name, localhost), else from the socket's own address. A
  ``Host: evil.example`` header cannot send clinicians' links elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from functools import lru_cache
from typing import Any, Callable

from sanic import Request
from sanic.response import HTTPResponse, ResponseStream

access_log = logging.getLogger("medmitra.access")

NO_STORE = "no-store"


def protector(*, log_access: bool) -> Callable[[Request, HTTPResponse], None]:
    """The headers and access log every response gets. A plain function, run by the
    server's one response middleware (ops/server.py): each middleware costs Sanic a
    coroutine and two signal dispatches per request."""

    def protect(request: Request, response: HTTPResponse) -> None:
        h = response.headers
        h.setdefault("X-Content-Type-Options", "nosniff")
        if "cache-control" not in h:
            h["Cache-Control"] = NO_STORE
        if log_access:
            access_log.info("%s %s %s %s", request.method, route_template(request),
                            response.status, _size(response))

    return protect


def _size(response: Any) -> Any:
    if isinstance(response, ResponseStream):   # a streamed file: its size is not known here
        return "-"
    return len(response.body or b"")


def route_template(request: Request | None) -> str:
    """The matched route's pattern (no values from the request), or a placeholder."""
    route = getattr(request, "route", None) if request is not None else None
    path = getattr(route, "path", None)
    if not path:
        return "<unmatched>"
    return "/" + path.lstrip("/")


@lru_cache(maxsize=1)
def _own_names() -> frozenset[str]:
    names = {"localhost", "127.0.0.1", "::1"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if name:
            names.add(name.lower())
    return frozenset(names)


def _host_name(host: str) -> str:
    """``Host`` header without its port, lower-case; IPv6 without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _format_host(addr: str, port: int | None) -> str:
    try:
        if ipaddress.ip_address(addr).version == 6:
            addr = f"[{addr}]"
    except ValueError:
        pass
    return f"{addr}:{port}" if port else addr


def base_url(request: Request, public_url: str) -> str:
    """Scheme and authority for absolute links (see the module notes)."""
    if public_url:
        return public_url.rstrip("/")
    local_addr, local_port = _local_address(request)
    header = request.host or ""
    name = _host_name(header)
    if name and (name in _own_names() or name == str(local_addr).lower()):
        return f"{request.scheme}://{header}"
    if local_port == {"http": 80, "https": 443}.get(request.scheme):
        local_port = None
    return f"{request.scheme}://{_format_host(str(local_addr), local_port)}"


def _local_address(request: Request) -> tuple[str, int | None]:
    """The address the client reached: the socket's own, or under ASGI the server address
    the ASGI server reports (never a request header)."""
    sockname = getattr(request.conn_info, "sockname", None)
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        return str(sockname[0]), int(sockname[1])
    scope = getattr(getattr(request, "transport", None), "scope", None)
    server = scope.get("server") if isinstance(scope, dict) else None
    if isinstance(server, (tuple, list)) and len(server) == 2 and server[0]:
        return str(server[0]), int(server[1]) if server[1] else None
    return "127.0.0.1", None               # a unix socket: only the loopback makes sense
