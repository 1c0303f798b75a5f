"""The database for the ops commands, in a tortoise context of their own: a command may run
in a process that also serves (tests call the CLI in-process beside a live server), and
tortoise allows one global context only."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

from tortoise.context import TortoiseContext

from medmitra.config import Settings


@asynccontextmanager
async def ops_db(settings: Settings, *, migrate: bool = True) -> AsyncIterator[None]:
    from medmitra.db.setup import apply_migrations, open_audit, tortoise_config
    from medmitra.ops import audit_store

    async with TortoiseContext() as ctx:
        await ctx.init(config=tortoise_config(settings))
        try:
            await open_audit(settings)
            if migrate:
                await apply_migrations(settings)
            yield
        finally:
            await audit_store.close()
