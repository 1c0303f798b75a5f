"""Operations commands: backup, backup verify, restore (and the audit/export commands of
the other ops modules). cli.py calls ``register``; each command sets ``handler``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medmitra.config import Settings


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def register(sub: Any) -> None:
    from medmitra.cli import _common

    p = sub.add_parser("backup", help="consistent online backup of the data dir")
    _common(p)
    p.add_argument("--to", help="backup folder to create (default: "
                                "<backup.dir or data_dir/backups>/medmitra-<UTC time>)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_backup)
    bsub = p.add_subparsers(dest="backup_command", required=False)
    v = bsub.add_parser("verify", help="check a backup without restoring it")
    _common(v)
    v.add_argument("path")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(handler=_verify)

    p = sub.add_parser("restore", help="restore a backup into an empty data dir")
    _common(p)
    p.add_argument("path")
    p.add_argument("--force", action="store_true",
                   help="restore into a non-empty data dir (its contents are moved aside)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_restore)

    from medmitra.ops import audit, fhir

    audit.register(sub, _common)    # audit verify|list|prune
    fhir.register(sub, _common)     # export --format fhir --case ID


def _backup(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.ops.backup import BackupError, make_backup, summary

    try:
        result = make_backup(settings, Path(args.to) if args.to else None,
                             progress=_show_progress(args))
    except (BackupError, OSError) as exc:
        print(f"medmitra: backup failed: {exc}", file=sys.stderr)
        return 1
    for w in result.warnings:
        print(f"note: {w}", file=sys.stderr)
    print(f"backup written to {result.path} in {result.seconds:.1f} s: "
          f"{summary(result.manifest)}")
    return 0


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.ops.backup import BackupError, summary, verify_backup

    try:
        manifest, problems = verify_backup(Path(args.path), progress=_show_progress(args))
    except (BackupError, OSError) as exc:
        print(f"medmitra: backup refused: {exc}", file=sys.stderr)
        return 1
    if problems:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        print(f"medmitra: backup refused: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"backup ok: {summary(manifest)}")
    return 0


def _restore(args: argparse.Namespace, settings: Settings) -> int:
    from medmitra.ops.backup import BackupError, summary
    from medmitra.ops.restore import restore_backup

    try:
        result = restore_backup(Path(args.path), settings, force=args.force,
                                progress=_show_progress(args))
    except (BackupError, OSError) as exc:
        print(f"medmitra: restore refused: {exc}", file=sys.stderr)
        return 1
    if result.moved_aside:
        print(f"previous contents moved to {result.moved_aside}")
    migrated = (f", migrated forward: {', '.join(map(str, result.applied))}"
                if result.applied else "")
    print(f"restored into {result.data_dir}: {summary(result.manifest)}; schema version "
          f"{result.migrated_to}{migrated}")
    if result.manifest["database"]["kind"] != "sqlite":
        print(f"note: {result.manifest['database']['note']}")
    return 0
