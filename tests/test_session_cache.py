"""SessionChecker's cache: concurrent requests of one session share one lookup, and a
revocation in this process is never answered from a lookup begun before it. (Logic around
the lookup only; the lookup itself is covered by the auth API tests on a real database.)"""

from __future__ import annotations

import asyncio

from medmitra.auth import sessions


def test_concurrent_misses_share_one_lookup_and_revocation_is_not_joined(monkeypatch) -> None:
    calls: list[str] = []
    answer = {"s1": sessions.ACTIVE}
    gate: asyncio.Event

    async def lookup(session_id: str) -> str | None:
        calls.append(session_id)
        state = answer[session_id]      # what the database said when the lookup began
        await gate.wait()
        return state

    monkeypatch.setattr(sessions, "_session_state", lookup)
    checker = sessions.SessionChecker("local")

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def run() -> None:
        nonlocal gate
        gate = asyncio.Event()
        tasks = [asyncio.create_task(checker.state("s1")) for _ in range(50)]
        await settle()
        assert calls == ["s1"]
        gate.set()
        assert set(await asyncio.gather(*tasks)) == {sessions.ACTIVE}
        assert await checker.state("s1") == sessions.ACTIVE and calls == ["s1"]   # cached

        # A revocation while a lookup is in flight: later requests do not join it, and the
        # old lookup's "active" is not kept.
        checker.forget_all()
        gate = asyncio.Event()
        early = asyncio.create_task(checker.state("s1"))
        await settle()
        answer["s1"] = sessions.REVOKED
        checker.forget_all()
        late = asyncio.create_task(checker.state("s1"))
        await settle()
        assert calls == ["s1", "s1", "s1"]
        gate.set()
        assert await early == sessions.ACTIVE      # it was in flight when the revocation came
        assert await late == sessions.REVOKED
        assert await checker.state("s1") == sessions.REVOKED and len(calls) == 3

    asyncio.run(run())
