"""Command line: serve, migrate, token, models, version. No logic lives here."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from medmitra import __version__, cli_auth
from medmitra.auth import token_commands
from medmitra.atomicfile import atomic_file
from medmitra.config import AUTO, ConfigError, Settings, load_settings, resolve_model_path


def _common(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a sub-command's own default must not wipe a value given before it
    # (`medmitra token --data-dir D create ...` and `... create --data-dir D` both work).
    p.add_argument("--config", default=argparse.SUPPRESS,
                   help="path to config.toml (default: ./config.toml if present)")
    p.add_argument("--data-dir", default=argparse.SUPPRESS,
                   help="where the database and files live")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmitra",
                                     description="MedMitra Edge: offline clinical case server")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP server")
    _common(p)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", help='analysis workers, a number or "auto" (llm.workers)')

    p = sub.add_parser("migrate", help="create or upgrade the database schema")
    _common(p)

    p = sub.add_parser("version", help="print the version")
    _common(p)

    token_commands.register(sub, _common)   # token create, tokens list|revoke

    p = sub.add_parser("models", help="manage GGUF model files")
    _common(p)
    msub = p.add_subparsers(dest="models_command", required=True)
    m = msub.add_parser("import", help="copy a GGUF chat model into models/ and use it")
    _common(m)
    m.add_argument("path")
    m = msub.add_parser("show", help="print the configured model and whether it is present")
    _common(m)
    cli_auth.register(sub, _common)   # users add|list|disable|reset-password|clear-metadata,
    #                                    keys rotate|list|revoke
    from medmitra.ops import cli as ops_cli

    ops_cli.register(sub)              # backup [verify], restore, audit, export
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, Any]] = {
        "storage": {"data_dir": getattr(args, "data_dir", None)},
        "server": {"host": getattr(args, "host", None), "port": getattr(args, "port", None)},
        "llm": {"workers": getattr(args, "workers", None)},
    }
    return load_settings(getattr(args, "config", None), overrides=overrides)


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log.level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Library loggers that echo SQL parameters or request bodies stay at WARNING: they could
    # carry patient names.
    for noisy in ("tortoise", "aiosqlite", "db_client", "sanic.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"medmitra: configuration error: {exc}", file=sys.stderr)
        return 2
    cmd = args.command
    if getattr(args, "handler", None) is not None:
        return args.handler(args, settings)
    if cmd == "version":
        print(f"medmitra {__version__}")
        return 0
    if cmd == "migrate":
        return _migrate(settings)
    if cmd in token_commands.COMMANDS:
        return token_commands.run(args, settings)
    if cmd == "models":
        return _models(settings, args)
    if cmd == "serve":
        return _serve(settings)
    return 2


def _migrate(settings: Settings) -> int:
    from medmitra.db.setup import close_db, current_version, open_db

    async def run() -> int:
        await open_db(settings, migrate=True)
        try:
            return await current_version()
        finally:
            await close_db()

    version = asyncio.run(run())
    print(f"database at schema version {version}: {settings.database_url.split('@')[-1]}")
    return 0


def _models(settings: Settings, args: argparse.Namespace) -> int:
    if args.models_command == "show":
        path = resolve_model_path(settings.llm.model_path)
        state = "present" if path and path.is_file() else "MISSING"
        print(f"llm.model_path = {settings.llm.model_path} -> {path} ({state})")
        return 0 if state == "present" else 1
    src = Path(args.path).expanduser()
    try:
        with open(src, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        print(f"medmitra: cannot read {src}: {exc.strerror}", file=sys.stderr)
        return 2
    if magic != b"GGUF":
        print(f"medmitra: {src} is not a GGUF model file", file=sys.stderr)
        return 2
    dest_dir = Path("models")
    dest_dir.mkdir(exist_ok=True)
    dest = dest_dir / src.name
    if dest.resolve() != src.resolve():
        digest = hashlib.sha256()
        with open(src, "rb") as fin, atomic_file(dest) as fout:
            for block in iter(lambda: fin.read(1 << 20), b""):
                digest.update(block)
                fout.write(block)
        print(f"copied {src} -> {dest} (sha256 {digest.hexdigest()})")
    print("To use it, set in config.toml:\n\n[llm]\n"
          f'model_path = "models/{dest.name}"\n\n'
          f"or export MEDMITRA_LLM_MODEL_PATH=models/{dest.name}")
    return 0


def _serve(settings: Settings) -> int:
    from sanic import Sanic

    from medmitra.app import create_app

    _setup_logging(settings)
    if settings.auth.trust_user_id:
        logging.getLogger("medmitra").warning(
            "auth.trust_user_id is ON: requests without a token may act as any user_id. "
            "Use only on a trusted LAN.")
    # Everything the server writes is owner-only (filemodes.py makes the data dir so
    # explicitly; this covers any other file the process creates).
    os.umask(0o077)
    try:
        app = create_app(settings, name="medmitra")
    except ConfigError as exc:
        print(f"medmitra: configuration error: {exc}", file=sys.stderr)
        return 2
    from medmitra.api.signals import schedule_touchup

    # The one app of this process: Sanic's request path drops the signal dispatches nobody
    # listens to, once the server is listening (api/signals.py).
    schedule_touchup(app)
    host, port = settings.server.host, settings.server.port
    _banner(settings)
    from medmitra.connguard import GuardedHttpProtocol, fit_open_files

    app.ctx.max_connections = fit_open_files(settings.server.max_connections)

    # access_log=False: Sanic's would log full URLs; httpsec.py logs route templates.
    # GuardedHttpProtocol: header deadline and connection cap (connguard.py).
    app.prepare(host=host, port=port, single_process=True, access_log=False, motd=False,
                protocol=GuardedHttpProtocol, backlog=1024)
    Sanic.serve_single(app)
    return 0


def _banner(settings: Settings) -> None:
    model = resolve_model_path(settings.llm.model_path)
    if settings.llm.remote_url:
        from medmitra.llm.remote import display_url

        model_line = f"remote inference at {display_url(settings.llm.remote_url)}"
    else:
        model_line = f"{model} ({'found' if model and model.is_file() else 'MISSING'})"
    shown_host = "localhost" if settings.server.host in ("127.0.0.1", "0.0.0.0", "::") \
        else settings.server.host
    exe = "medmitra" if shutil.which("medmitra") or getattr(sys, "frozen", False) \
        else "python -m medmitra"
    workers = ("workers: auto (1, 2 if the machine has room)" if settings.llm.workers == AUTO
               else f"{settings.llm.workers} worker(s)")
    lines = [
        f"MedMitra Edge {__version__}",
        f"  API:      http://{shown_host}:{settings.server.port}/   (docs: /docs, /redoc)",
        f"  App:      http://{shown_host}:{settings.server.port}/app/   (accounts: "
        f"{exe} users add --email <address>)",
        f"  Data:     {settings.data_path}",
        f"  Config:   {settings.source}",
        f"  Model:    {model_line}, {workers}",
        f"  Token:    {exe} token create --user-id <UUID>"
        + (f" --data-dir {settings.data_path}" if settings.source == "defaults" else ""),
    ]
    print("\n".join(lines), flush=True)
