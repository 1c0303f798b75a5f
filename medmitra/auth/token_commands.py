"""CLI: ``medmitra token create`` and ``medmitra tokens list|revoke``.

``token create`` prints an access token the server accepts for ``--user-id``; each one is
recorded (auth/tokens.py) so it can be revoked: ``tokens revoke --id ID`` ends one,
``tokens revoke --user-id UUID`` every token of that user (``users disable`` and
``users reset-password`` do the same for a local user).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from typing import Any, Callable

from medmitra.config import Settings

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
COMMANDS = ("token", "tokens")


def register(sub: Any, common: Callable[[Any], None]) -> None:
    from medmitra.auth.tokens import MAX_API_TOKEN_TTL_S

    p = sub.add_parser("token", help="issue access tokens")
    common(p)
    tsub = p.add_subparsers(dest="token_command", required=True)
    t = tsub.add_parser("create", help="print a revocable JWT this server accepts")
    common(t)
    t.add_argument("--user-id", required=True)
    t.add_argument("--email")
    t.add_argument("--expires-in", type=int, default=3600,
                   help=f"seconds (default 3600, at most {MAX_API_TOKEN_TTL_S})")
    t.add_argument("--label", help="a note shown by `tokens list` (e.g. what uses it)")

    p = sub.add_parser("tokens", help="list or revoke tokens made by `token create`")
    common(p)
    tsub = p.add_subparsers(dest="tokens_command", required=True)
    t = tsub.add_parser("list", help="list tokens and their state")
    common(t)
    t.add_argument("--user-id")
    t = tsub.add_parser("revoke", help="refuse a token (or every token of a user) at once")
    common(t)
    which = t.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the token id (its session_id claim; see `tokens list`)")
    which.add_argument("--user-id", help="revoke every token made for this user")


def run(args: argparse.Namespace, settings: Settings) -> int:
    for name in ("user_id", "id"):
        value = getattr(args, name, None)
        if value is not None:
            try:
                setattr(args, name, str(uuid.UUID(value)))
            except ValueError:
                print(f"medmitra: --{name.replace('_', '-')} must be a UUID", file=sys.stderr)
                return EXIT_USAGE
    if args.command == "token":
        from medmitra.auth.tokens import MAX_API_TOKEN_TTL_S

        if not 1 <= args.expires_in <= MAX_API_TOKEN_TTL_S:
            print(f"medmitra: --expires-in must be between 1 and {MAX_API_TOKEN_TTL_S} seconds",
                  file=sys.stderr)
            return EXIT_USAGE
        body = _create
    else:
        body = _list if args.tokens_command == "list" else _revoke
    return asyncio.run(_with_db(settings, body, args))


async def _with_db(settings: Settings, body: Any, args: argparse.Namespace) -> int:
    from medmitra.db.setup import close_db, open_db

    await open_db(settings, migrate=True)
    try:
        return await body(args, settings)
    finally:
        await close_db()


async def _create(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth.signing import KeyRing
    from medmitra.auth.gotrue import DEFAULT_AUDIENCE, local_issuer
    from medmitra.auth.tokens import create_api_token

    settings.data_path.mkdir(parents=True, exist_ok=True)
    keyring = KeyRing(settings.data_path, token_ttl_s=settings.auth.access_token_ttl_s,
                      leeway_s=settings.auth.leeway_s)
    token, row = await create_api_token(
        keyring, user_id=args.user_id, email=args.email, expires_in_s=args.expires_in,
        audience=settings.auth.audience or DEFAULT_AUDIENCE, issuer=local_issuer(settings),
        label=args.label)
    print(token)
    print(f"token id {row.id} (revoke with: medmitra tokens revoke --id {row.id})",
          file=sys.stderr)
    return EXIT_OK


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    from datetime import datetime, timezone

    from medmitra.auth.tokens import list_api_tokens

    now = datetime.now(timezone.utc)
    rows = await list_api_tokens(args.user_id)
    print(f"{'id':36}  {'user':36}  {'expires':25}  state      label")
    for r in rows:
        state = "revoked" if r.revoked_at else ("expired" if r.expires_at <= now else "active")
        print(f"{r.id:36}  {r.user_id:36}  {r.expires_at.isoformat(timespec='seconds'):25}  "
              f"{state:9}  {r.label or ''}")
    print(f"{len(rows)} token(s)")
    return EXIT_OK


async def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth.tokens import revoke_api_tokens

    n = await revoke_api_tokens(user_id=args.user_id, token_id=args.id, reason="admin_revoke")
    if n == 0:
        print("medmitra: no active token matched", file=sys.stderr)
        return EXIT_REFUSED
    print(f"revoked {n} token(s); a running server refuses them within seconds")
    return EXIT_OK
