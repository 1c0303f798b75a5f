"""Settings: defaults, TOML, MEDMITRA_* env, CLI overrides, and loud failures."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from medmitra.config import (AUTO, SECTIONS, ConfigError, JobsSettings, LLMSettings, load_settings,
                             render_config_toml)

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_without_file() -> None:
    s = load_settings(None, env={})
    assert s.server.port == 8000 and s.server.host == "127.0.0.1"
    assert s.auth.audience == "authenticated" and s.auth.trust_user_id is False
    assert s.limits.lab_max_bytes == 10 * 1024 * 1024
    assert s.limits.radiology_max_bytes == 50 * 1024 * 1024
    assert s.database_url.endswith("medmitra.sqlite3") and s.is_sqlite


def test_shipped_config_documents_every_key_with_its_default() -> None:
    text = (ROOT / "config.toml").read_text()
    # The shipped file changes nothing: loading it gives the defaults.
    assert load_settings(ROOT / "config.toml", env={}) == dataclasses.replace(
        load_settings(None, env={}), source=str(ROOT / "config.toml"))
    section = None
    seen: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        m = re.match(r"^\[(\w+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^# (\w+) = (\".*?\"|\S+)", line)
        if m and section:
            seen[(section, m.group(1))] = m.group(2)
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert (name, f.name) in seen, f"config.toml does not document {name}.{f.name}"
            default = f.default
            shown = seen[(name, f.name)]
            if f.metadata.get("auto") and default == AUTO:
                assert shown == '"auto"', (name, f.name)
            elif isinstance(default, bool):
                assert shown == str(default).lower(), (name, f.name)
            elif isinstance(default, str):
                assert shown == f'"{default}"', (name, f.name)
            else:
                assert float(shown) == float(default), (name, f.name)


def test_config_toml_is_rendered_from_the_declarations() -> None:
    assert (ROOT / "config.toml").read_text(encoding="utf-8") == render_config_toml(), (
        "config.toml is out of date: python -m medmitra.config > config.toml")


def test_injected_env_reads_nothing_from_the_process_or_cwd(tmp_path: Path,
                                                            monkeypatch) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[server]\nport = 70000\n")
    (tmp_path / "config.toml").write_text('[server]\nhost = "10.9.9.9"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDMITRA_SERVER_PORT", "9123")
    assert load_settings(env={}) == load_settings(None, env={"HOME": "/nowhere"})
    s = load_settings(env={})
    assert (s.server.host, s.server.port, s.source) == ("127.0.0.1", 8000, "defaults")
    # Without an injected env the process's variables and ./config.toml count ...
    s = load_settings()
    assert (s.server.host, s.server.port) == ("10.9.9.9", 9123)
    assert s.source == "config.toml"
    # ... and MEDMITRA_CONFIG names the file, in the process or in the injected env.
    monkeypatch.delenv("MEDMITRA_SERVER_PORT")
    monkeypatch.setenv("MEDMITRA_CONFIG", str(bad))
    with pytest.raises(ConfigError, match="server.port"):
        load_settings()
    assert load_settings(env={}).server.port == 8000
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(env={"MEDMITRA_CONFIG": str(bad)})


def test_sections_check_their_ranges_when_built_directly() -> None:
    with pytest.raises(ConfigError, match="llm.n_ctx"):
        LLMSettings(n_ctx=1)
    with pytest.raises(ConfigError, match="llm.max_tokens_soap"):
        LLMSettings(max_tokens_soap=8)
    with pytest.raises(ConfigError, match="jobs.heartbeat_s"):
        JobsSettings(lease_s=5, heartbeat_s=5)
    with pytest.raises(ConfigError, match="llm.workers"):
        load_settings(None, env={}).replace("llm", workers=65)
    with pytest.raises(ConfigError, match="llm.nope"):
        load_settings(None, env={}).replace("llm", nope=1)


def test_workers_take_auto_by_default_and_from_every_layer(tmp_path: Path) -> None:
    assert load_settings(None, env={}).llm.workers == AUTO
    cfg = tmp_path / "c.toml"
    cfg.write_text('[llm]\nworkers = "Auto"\n')
    assert load_settings(cfg, env={}).llm.workers == AUTO
    assert load_settings(cfg, env={"MEDMITRA_LLM_WORKERS": "3"}).llm.workers == 3
    assert load_settings(None, env={"MEDMITRA_LLM_WORKERS": " auto "}).llm.workers == AUTO
    assert load_settings(None, env={}, overrides={"llm": {"workers": "auto"}}).llm.workers \
        == AUTO
    assert load_settings(None, env={}).replace("llm", workers=0).llm.workers == 0
    assert '# workers = "auto"' in render_config_toml()
    assert '[0 to 64, or "auto"]' in render_config_toml()


def test_choices_match_case_insensitively_and_keep_the_declared_spelling() -> None:
    assert load_settings(None, env={"MEDMITRA_LOG_LEVEL": "debug"}).log.level == "DEBUG"


def test_only_the_result_of_all_layers_is_range_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 70000\n")
    assert load_settings(cfg, env={"MEDMITRA_SERVER_PORT": "8080"}).server.port == 8080
    with pytest.raises(ConfigError, match="server.port"):
        load_settings(cfg, env={"MEDMITRA_SERVER_PORT": "x"}, overrides={"server": {"port": 1}})


def test_file_env_and_overrides_in_order(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[llm]\nworkers = 2\n')
    s = load_settings(cfg, env={"MEDMITRA_SERVER_PORT": "9002", "MEDMITRA_AUTH_TRUST_USER_ID": "yes"},
                      overrides={"server": {"host": "10.0.0.5"}})
    assert s.server.port == 9002            # env beats file
    assert s.server.host == "10.0.0.5"      # CLI beats both
    assert s.llm.workers == 2               # file beats default
    assert s.auth.trust_user_id is True


@pytest.mark.parametrize("content, env, key", [
    ("[server]\nport = \"eighty\"\n", {}, "server.port"),
    ("[server]\nport = 70000\n", {}, "server.port"),
    ("[limits]\nlab_max_bytes = -1\n", {}, "limits.lab_max_bytes"),
    ("[auth]\ntrust_user_id = \"maybe\"\n", {}, "auth.trust_user_id"),
    ("[jobs]\nlease_s = 5\nheartbeat_s = 10\n", {}, "jobs.heartbeat_s"),
    ("[server]\nnope = 1\n", {}, "server.nope"),
    ("[nosection]\na = 1\n", {}, "nosection"),
    ("[server]\nport = 8000\n", {"MEDMITRA_SERVER_PORT": "-1"}, "server.port"),
    ("", {"MEDMITRA_LLM_WORKERS": "two"}, "llm.workers"),
    ("", {"MEDMITRA_LLM_WORKERS": "-1"}, "llm.workers"),     # not a spelling of "auto"
    ("[llm]\nworkers = -1\n", {}, "llm.workers"),
    ("[llm]\nworkers = \"sometimes\"\n", {}, "llm.workers"),
    ("[llm]\nthreads = \"auto\"\n", {}, "llm.threads"),   # only keys declared auto=True
    ("", {"MEDMITRA_LLM_TEMPERATURE": "nan"}, "llm.temperature"),
    ("", {"MEDMITRA_LOG_LEVEL": "LOUD"}, "log.level"),
    ("this is not toml", {}, "not valid TOML"),
])
def test_bad_values_name_the_key(tmp_path: Path, content: str, env: dict, key: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_settings(cfg, env=env)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", env={})
