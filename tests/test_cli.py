"""CLI commands, called in-process with temporary folders."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest
from conftest import database_at_version

from medmitra.auth.jwt import TokenVerifier
from medmitra import cli
from medmitra.cli import build_parser, main
from medmitra.config import AUTO, load_settings


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.strip().startswith("medmitra ")


def test_migrate_creates_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "schema version" in out
    db = sqlite3.connect(tmp_path / "medmitra.sqlite3")
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"cases", "case_files", "ai_insights", "jobs", "schema_version"} <= tables
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == sorted(set(versions)) and versions[0] == 1
    # Running it again applies nothing new and keeps the versions.
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    assert [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY 1")] == versions


def test_token_create_prints_a_token_the_server_accepts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uid = str(uuid.uuid4())
    assert main(["token", "create", "--user-id", uid, "--email", "d@c.test",
                 "--expires-in", "120", "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    settings = load_settings(None, env={}, overrides={"storage": {"data_dir": str(tmp_path)}})
    # Signed by the server's own key ring (its public key is in the key table) and bound
    # to a revocable token row named by session_id.
    db = sqlite3.connect(tmp_path / "medmitra.sqlite3")
    jwks = {"keys": [json.loads(r[0]) for r in db.execute(
        "SELECT public_jwk FROM auth_signing_keys")]}
    principal = TokenVerifier(settings.auth, hs256_secret=None, jwks=jwks).verify(token)
    assert principal.user_id == uid and principal.email == "d@c.test"
    assert principal.claims["exp"] - principal.claims["iat"] == 120
    assert db.execute("SELECT user_id, revoked_at FROM auth_api_tokens WHERE id = ?",
                      (principal.session_id,)).fetchall() == [(uid, None)]


@pytest.mark.parametrize("argv", [
    ["token", "create", "--user-id", "not-a-uuid"],
    ["token", "create", "--user-id", str(uuid.UUID(int=1)), "--expires-in", "0"],
])
def test_token_create_rejects_bad_arguments(tmp_path: Path, argv: list[str],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv + ["--data-dir", str(tmp_path)]) == 2
    assert "medmitra:" in capsys.readouterr().err


def test_bad_config_value_stops_with_the_key(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nport = -5\n")
    assert main(["migrate", "--config", str(cfg), "--data-dir", str(tmp_path)]) == 2
    assert "server.port" in capsys.readouterr().err


def test_models_import_checks_gguf_magic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"NOPE" + b"\0" * 64)
    assert main(["models", "import", str(bogus)]) == 2
    assert not (tmp_path / "models" / "x.gguf").exists()
    good = tmp_path / "src" / "tiny.gguf"
    good.parent.mkdir()
    good.write_bytes(b"GGUF" + b"\1" * 64)
    assert main(["models", "import", str(good)]) == 0
    assert (tmp_path / "models" / "tiny.gguf").read_bytes() == good.read_bytes()
    assert 'model_path = "models/tiny.gguf"' in capsys.readouterr().out


def test_migration_upgrade_keeps_existing_data(tmp_path: Path) -> None:
    """A database at schema version 1 with data is upgraded in place."""
    from medmitra.db import setup as dbsetup

    settings = load_settings(None, env={}, overrides={"storage": {"data_dir": str(tmp_path)}})
    database_at_version(settings, 1)
    db = sqlite3.connect(tmp_path / "medmitra.sqlite3")
    db.execute("INSERT INTO cases (case_id, user_id, patient_name, patient_age, patient_gender, "
               "status, created_at, updated_at) VALUES ('c1', 'u1', 'Old Patient', 70, 'M', "
               "'completed', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:00+00:00')")
    db.commit()
    assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == [1]
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    versions = [r[0] for r in db.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [v for v, _, _ in dbsetup.available_migrations("sqlite")]
    assert len(versions) >= 2
    assert db.execute("SELECT patient_name, patient_age FROM cases").fetchall() == [("Old Patient", 70)]


def test_data_dir_works_before_or_after_the_subcommand(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uid = str(uuid.uuid4())
    for i, argv in enumerate((["token", "--data-dir", str(tmp_path / "a"), "create", "--user-id", uid],
                              ["token", "create", "--user-id", uid, "--data-dir", str(tmp_path / "b")])):
        assert main(argv) == 0
        assert (tmp_path / "ab"[i] / "medmitra.sqlite3").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("given, expected", [("auto", AUTO), ("2", 2), ("0", 0)])
def test_serve_workers_flag_takes_a_number_or_auto(given: str, expected: int,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)                 # no ./config.toml to pick up
    monkeypatch.delenv("MEDMITRA_CONFIG", raising=False)
    monkeypatch.delenv("MEDMITRA_LLM_WORKERS", raising=False)
    args = build_parser().parse_args(["serve", "--workers", given])
    assert cli._settings(args).llm.workers == expected


def test_serve_workers_flag_refuses_other_words(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["migrate", "--data-dir", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["serve", "--workers", "many", "--data-dir", str(tmp_path)]) == 2
    assert "llm.workers" in capsys.readouterr().err
