"""A Sanic signal router that skips built-in events nobody listens to.

Sanic dispatches about eleven built-in ``http.*`` signals per request, inline. With no
handler registered for one, each dispatch is a failed route lookup that builds and
catches an exception: a third of the CPU time of a cheap read (profiled on GET case).
Once the router is finalised at start-up its handlers cannot change, so an event found
without handlers then is skipped for good.

Sanic's own remedy, TouchUp, goes further: it recompiles its request path from source
with those dispatch calls removed (no call at all instead of a skipped one; with this
router alone, dispatching was still 8-13% of GET case's samples under py-spy). It rewrites
the classes for the whole process, needs the source files, and takes 46-60 ms on a 2-core
machine; Sanic would do it before the server listens, which would
delay the first answer at start-up by as much. So ``schedule_touchup`` runs it once the
server is listening (requests until then take the unrewritten, equivalent path), only for
the one server a ``serve`` process runs, and only where the source is there (the binary
collects the three files: build.spec).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

from sanic import Sanic
from sanic.signals import RESERVED_NAMESPACES, SignalRouter
from sanic.touchup import TouchUp
from sanic_routing.exceptions import NotFound

log = logging.getLogger("medmitra.server")
TOUCHUP_DELAY_S = 0.5   # after the server starts listening


class QuietSignalRouter(SignalRouter):
    def __init__(self) -> None:
        super().__init__()
        self._no_handlers: set[str] = set()

    @staticmethod
    def _key(event: Any, condition: dict[str, str] | None) -> Any:
        return (event, tuple(sorted(condition.items())) if condition else None)

    def get(self, event: Any, condition: dict[str, str] | None = None) -> Any:
        try:
            return super().get(event, condition)
        except NotFound:
            name = self.format_event(event)
            if self.finalized and name.split(".", 1)[0] in RESERVED_NAMESPACES:
                self._no_handlers.add(self._key(name, condition))
            raise

    async def dispatch(self, event: Any, *, context: dict[str, Any] | None = None,
                       condition: dict[str, str] | None = None, fail_not_found: bool = True,
                       inline: bool = False, reverse: bool = False) -> Any:
        if inline and isinstance(event, str) and \
                self._key(event, condition) in self._no_handlers:
            return None
        return await super().dispatch(event, context=context, condition=condition,
                                      fail_not_found=fail_not_found, inline=inline,
                                      reverse=reverse)


def touchup_sources() -> dict[str, str]:
    """Module name -> source file, of each module TouchUp reads (a binary must ship them:
    build.spec)."""
    return {cls.__module__: inspect.getsourcefile(cls) or "" for cls, _ in TouchUp._registry}


def touchup_safe() -> bool:
    """Whether Sanic can rewrite its request path from source in this process: false in a
    binary built without the sources, and once it has been rewritten (the rewritten
    methods have no source file), so nothing is ever rewritten twice."""
    try:
        return all(inspect.getsource(getattr(cls, name)) for cls, name in TouchUp._registry)
    except (OSError, TypeError):
        return False


def schedule_touchup(app: Sanic) -> None:
    """Run TouchUp on ``app`` shortly after the server starts listening (see the module
    notes). Only for a process that serves this one app."""

    def run() -> None:
        if not touchup_safe():
            log.info("request path not rewritten (Sanic's source files are not available)")
            return
        t0 = time.perf_counter()
        try:
            TouchUp.run(app)
        except Exception as exc:   # the unrewritten path keeps serving: equivalent, slower
            log.warning("request path not rewritten: %s", type(exc).__name__)
            return
        log.info("request path rewritten without unused signal dispatches (%.0f ms)",
                 1000 * (time.perf_counter() - t0))

    @app.after_server_start
    async def touchup_later(app: Sanic) -> None:
        asyncio.get_running_loop().call_later(TOUCHUP_DELAY_S, run)
