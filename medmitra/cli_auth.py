"""``medmitra users ...`` and ``medmitra keys ...``: parse, call auth/admin.py, print.

Each command opens the database (applying migrations), does one thing and closes it. Run
them while the server is up or down.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from typing import Any, Awaitable, Callable

from medmitra.config import Settings

# Exit codes: 0 done, 1 refused (exists / not found / weak password), 2 usage error.
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2


def register(sub: Any, common: Callable[[Any], None]) -> None:
    """Add the commands; each sets ``handler`` (cli.py calls it with the settings)."""
    p = sub.add_parser("users", help="manage the accounts that can sign in (/auth/v1)")
    common(p)
    p.set_defaults(handler=run)
    usub = p.add_subparsers(dest="users_command", required=True)
    u = usub.add_parser("add", help="create a user (password from --password or stdin)")
    common(u)
    u.add_argument("--email", required=True)
    u.add_argument("--password", help="the password; omit or '-' to read it from stdin")
    u = usub.add_parser("list", help="list users")
    common(u)
    for name, text in (("disable", "stop a user signing in and end their sessions"),
                       ("enable", "allow a disabled user to sign in again")):
        u = usub.add_parser(name, help=text)
        common(u)
        u.add_argument("--email", required=True)
    u = usub.add_parser("reset-password", help="set a new password and end all sessions")
    common(u)
    u.add_argument("--email", required=True)
    u.add_argument("--password", help="the new password; omit or '-' to read it from stdin")
    u = usub.add_parser("clear-metadata", help="empty a user's user_metadata (e.g. when it "
                                               "made their tokens too large)")
    common(u)
    u.add_argument("--email", required=True)

    p = sub.add_parser("keys", help="manage the ES256 keys that sign access tokens")
    common(p)
    p.set_defaults(handler=run)
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("rotate", help="sign with a new key; the old one stays valid until "
                                       "its tokens expire")
    common(k)
    k = ksub.add_parser("list", help="list signing keys and their state")
    common(k)
    k = ksub.add_parser("revoke", help="a compromised key: refuse every token it signed, "
                                       "at once (a running server within seconds)")
    common(k)
    k.add_argument("kid")


def _read_password(value: str | None) -> str | None:
    if value not in (None, "-"):
        return value
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != first:
            print("medmitra: the passwords do not match", file=sys.stderr)
            return None
        return first
    # Piped: the first line is the password (keeps it out of the shell history and ps).
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "users":
        handler = {"add": _users_add, "list": _users_list, "disable": _users_disable,
                   "enable": _users_enable, "reset-password": _users_reset_password,
                   "clear-metadata": _users_clear_metadata}[args.users_command]
    elif args.command == "keys":
        handler = {"rotate": _keys_rotate, "list": _keys_list,
                   "revoke": _keys_revoke}[args.keys_command]
    else:
        return EXIT_USAGE
    if args.command == "users" and args.users_command in ("add", "reset-password"):
        password = _read_password(args.password)
        if not password:
            print("medmitra: a password is required", file=sys.stderr)
            return EXIT_USAGE
        args.password = password
    from medmitra.ops.audit import audited_admin   # the audit trail records the command

    return asyncio.run(_with_db(settings, lambda: audited_admin(
        args, settings, _refusals(handler(args, settings)))))


async def _with_db(settings: Settings, body: Callable[[], Awaitable[int]]) -> int:
    from medmitra.db.setup import close_db, open_db

    await open_db(settings, migrate=True)
    try:
        return await body()
    finally:
        await close_db()


async def _refusals(command: Awaitable[int]) -> int:
    """Refusals every command can meet, as a message and exit code 1."""
    from medmitra.auth import admin, users

    try:
        return await command
    except (admin.NoSuchUser, users.WeakPassword) as exc:
        print(f"medmitra: {exc}", file=sys.stderr)
        return EXIT_REFUSED


async def _users_add(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import users

    try:
        user = await users.create_user(args.email, args.password)
    except users.WeakPassword:
        raise   # a refusal (_refusals), not the usage error below
    except users.UserExists:
        print(f"medmitra: a user with email {users.normalize_email(args.email)} already "
              "exists", file=sys.stderr)
        return EXIT_REFUSED
    except ValueError as exc:
        print(f"medmitra: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"created user {user.id} <{user.email}>")
    return EXIT_OK


async def _users_list(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    rows = await admin.list_users()
    print(f"{'id':36}  {'status':8}  {'last sign-in':25}  email")
    for u in rows:
        last = u.last_sign_in_at.isoformat(timespec="seconds") if u.last_sign_in_at else "-"
        print(f"{u.id:36}  {admin.user_status(u):8}  {last:25}  {u.email}")
    print(f"{len(rows)} user(s)")
    return EXIT_OK


async def _users_disable(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    user, ended = await admin.disable_user(args.email)
    print(f"disabled {user.email}; ended {ended} session(s)")
    return EXIT_OK


async def _users_enable(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    user = await admin.enable_user(args.email)
    print(f"enabled {user.email}")
    return EXIT_OK


async def _users_reset_password(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    user, ended = await admin.reset_password(args.email, args.password)
    print(f"password of {user.email} changed; ended {ended} session(s)")
    return EXIT_OK


async def _users_clear_metadata(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    user, size = await admin.clear_metadata(args.email)
    print(f"cleared the user metadata of {user.email} ({size} bytes)")
    return EXIT_OK


async def _keys_revoke(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    found, new_kid = await admin.revoke_key(settings, args.kid)
    if not found:
        print(f"medmitra: no signing key {args.kid}", file=sys.stderr)
        return EXIT_REFUSED
    if new_kid:
        print(f"signing with new key {new_kid}")
    print(f"revoked {args.kid}: every token it signed is refused (a running server stops "
          "accepting them within seconds)")
    return EXIT_OK


async def _keys_rotate(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    new_kid, retired = await admin.rotate_keys(settings)
    print(f"signing with new key {new_kid}")
    for kid in retired:
        print(f"retired {kid}: still accepted until its tokens expire "
              f"(at most {settings.auth.access_token_ttl_s} s)")
    return EXIT_OK


async def _keys_list(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.auth import admin

    keys = await admin.key_states(settings)
    print(f"{'kid':36}  {'alg':5}  {'created':25}  state")
    for k in keys:
        print(f"{k.kid:36}  {k.alg:5}  {k.created_at.isoformat(timespec='seconds'):25}  "
              f"{k.state}")
    print(f"{len(keys)} key(s)")
    return EXIT_OK
