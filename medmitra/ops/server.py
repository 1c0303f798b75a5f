"""What the ops modules add to a running server, installed by create_app in one call:
scheduled backups."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sanic import Sanic

from medmitra.config import Settings


def install(app: Sanic, settings: Settings) -> None:
    app.ctx.last_backup_at = None
    tasks: list[asyncio.Task] = []    # background loops, cancelled at stop

    @app.before_server_start
    async def start_ops(app: Sanic) -> None:
        if settings.backup.every_h > 0:
            from medmitra.ops.backup import run_schedule

            def done(result: Any) -> None:
                app.ctx.last_backup_at = time.time()

            tasks.append(asyncio.get_running_loop().create_task(
                run_schedule(settings, on_done=done), name="medmitra-backups"))

    @app.after_server_stop
    async def stop_ops(app: Sanic) -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
