"""One frozen Settings object: embedded defaults, then config.toml, then MEDMITRA_* env.

Every key lives in a section dataclass below; ``config.toml`` at the project root documents
each one with its default. A key can be overridden by ``MEDMITRA_<SECTION>_<KEY>``
(upper case). A value of the wrong type or out of range stops start-up with a
``ConfigError`` that names the key.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

MiB = 1024 * 1024


class ConfigError(Exception):
    """A config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    # Absolute base URL used in signed ``file_url`` links; empty = taken from the request.
    public_url: str = ""
    access_log: bool = False
    # Request body cap for one request (all files together), bytes.
    request_max_bytes: int = 120 * MiB
    cors_origins: str = "*"
    # Seconds to let running requests and jobs finish on shutdown.
    graceful_shutdown_s: float = 15.0


@dataclass(frozen=True)
class StorageSettings:
    data_dir: str = "data"
    # Uploads are refused while free space on the data dir is below this, bytes.
    min_free_bytes: int = 16 * MiB


@dataclass(frozen=True)
class DatabaseSettings:
    # Empty = SQLite file ``medmitra.sqlite3`` inside data_dir. Otherwise a tortoise URL,
    # e.g. ``postgres://user:pass@host:5432/medmitra``.
    url: str = ""
    busy_timeout_ms: int = 10000


@dataclass(frozen=True)
class AuthSettings:
    # HS256 secret of a Supabase project. Empty = a random local secret is created in the
    # data dir on first start (file ``jwt_secret``, mode 0600).
    jwt_secret: str = ""
    # Path to a JWKS JSON file with ES256/RS256 public keys, chosen by ``kid``.
    jwks_file: str = ""
    audience: str = "authenticated"
    issuer: str = ""
    leeway_s: int = 30
    # Trusted-LAN compatibility with the original frontend: requests without a token may
    # name the user by a ``user_id`` field or a bare UUID as the Bearer value. Off by default.
    trust_user_id: bool = False
    signup_enabled: bool = False
    access_token_ttl_s: int = 3600
    refresh_reuse_window_s: int = 10
    # Requests per minute per client address on the /auth/v1 endpoints.
    rate_limit_per_min: int = 30


@dataclass(frozen=True)
class LimitsSettings:
    lab_max_bytes: int = 10 * MiB
    radiology_max_bytes: int = 50 * MiB
    files_per_request: int = 10
    text_field_max_chars: int = 20000
    name_max_chars: int = 200
    file_url_ttl_s: int = 3600


@dataclass(frozen=True)
class LLMSettings:
    # GGUF chat model. Relative paths are looked up in the working directory, then beside
    # the executable / project root.
    model_path: str = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    n_ctx: int = 4096
    threads: int = 0          # 0 = cores / workers
    workers: int = 1
    temperature: float = 0.2
    seed: int = 42
    repeat_penalty: float = 1.1
    max_tokens_lab: int = 320
    max_tokens_radiology: int = 256
    max_tokens_summary: int = 320
    max_tokens_soap: int = 400
    max_tokens_diagnosis: int = 256
    max_tokens_differential: int = 400
    max_tokens_recommendations: int = 400
    # Optional vision model (GGUF + its mmproj projector) for radiology images.
    vision_model_path: str = ""
    mmproj_path: str = ""
    # A stage that runs longer than this fails its attempt.
    stage_timeout_s: float = 300.0
    # Remote inference instead of in-process models: the base URL of an OpenAI-compatible
    # server (llama.cpp's llama-server or llama-cpp-python's server), e.g.
    # "http://gpu-box:8080". Empty = load model_path in this process.
    remote_url: str = ""
    remote_model: str = ""
    remote_api_key: str = ""
    remote_timeout_s: float = 300.0


@dataclass(frozen=True)
class JobsSettings:
    max_attempts: int = 3
    lease_s: float = 60.0
    heartbeat_s: float = 10.0
    poll_s: float = 1.0


@dataclass(frozen=True)
class LogSettings:
    level: str = "INFO"


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "auth": AuthSettings,
    "limits": LimitsSettings,
    "llm": LLMSettings,
    "jobs": JobsSettings,
    "log": LogSettings,
}


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    jobs: JobsSettings = field(default_factory=JobsSettings)
    log: LogSettings = field(default_factory=LogSettings)
    # Where the settings came from (for the start-up banner); not a config key.
    source: str = "defaults"

    @property
    def data_path(self) -> Path:
        return Path(self.storage.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite://{self.data_path / 'medmitra.sqlite3'}"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def replace(self, section: str, **values: Any) -> "Settings":
        """A copy with some keys of one section changed (values are validated)."""
        cls = SECTIONS[section]
        current = dataclasses.asdict(getattr(self, section))
        for key, raw in values.items():
            current[key] = _coerce(section, key, raw, _field_types(cls)[key])
        _validate(section, current)
        return dataclasses.replace(self, **{section: cls(**current)})


def _field_types(cls: type) -> dict[str, type]:
    return {f.name: {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
            for f in dataclasses.fields(cls)}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(section: str, key: str, raw: Any, typ: type) -> Any:
    name = f"{section}.{key}"
    if typ is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise ConfigError(f"{name}: expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, bool):
            raise ConfigError(f"{name}: expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        try:
            return int(str(raw).strip())
        except ValueError:
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from None
    if typ is float:
        if isinstance(raw, bool):
            raise ConfigError(f"{name}: expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}: expected a finite number, got {raw!r}")
        return value
    if not isinstance(raw, str):
        raise ConfigError(f"{name}: expected a string, got {raw!r}")
    return raw


# (section, key) -> (min, max) for numbers; None = unbounded on that side.
_RANGES: dict[tuple[str, str], tuple[float | None, float | None]] = {
    ("server", "port"): (0, 65535),
    ("server", "request_max_bytes"): (1024, None),
    ("server", "graceful_shutdown_s"): (0, 3600),
    ("storage", "min_free_bytes"): (0, None),
    ("database", "busy_timeout_ms"): (0, 600000),
    ("auth", "leeway_s"): (0, 3600),
    ("auth", "access_token_ttl_s"): (30, 30 * 86400),
    ("auth", "refresh_reuse_window_s"): (0, 3600),
    ("auth", "rate_limit_per_min"): (1, 100000),
    ("limits", "lab_max_bytes"): (1, None),
    ("limits", "radiology_max_bytes"): (1, None),
    ("limits", "files_per_request"): (1, 1000),
    ("limits", "text_field_max_chars"): (1, 10_000_000),
    ("limits", "name_max_chars"): (1, 10000),
    ("limits", "file_url_ttl_s"): (10, 7 * 86400),
    ("llm", "n_ctx"): (256, 1 << 20),
    ("llm", "threads"): (0, 1024),
    ("llm", "workers"): (0, 64),
    ("llm", "temperature"): (0, 5),
    ("llm", "repeat_penalty"): (0.5, 3),
    ("llm", "stage_timeout_s"): (1, 86400),
    ("llm", "remote_timeout_s"): (1, 86400),
    ("jobs", "max_attempts"): (1, 100),
    ("jobs", "lease_s"): (2, 86400),
    ("jobs", "heartbeat_s"): (0.2, 3600),
    ("jobs", "poll_s"): (0.05, 600),
}


def _validate(section: str, values: Mapping[str, Any]) -> None:
    for key, value in values.items():
        lo, hi = _RANGES.get((section, key), (None, None))
        if key.startswith("max_tokens_"):
            lo, hi = 16, 1 << 16
        if lo is not None and value < lo or hi is not None and value > hi:
            raise ConfigError(f"{section}.{key}: {value!r} is out of range [{lo}, {hi}]")
    if section == "jobs" and values["heartbeat_s"] >= values["lease_s"]:
        raise ConfigError("jobs.heartbeat_s: must be shorter than jobs.lease_s")
    if section == "log" and str(values["level"]).upper() not in {
            "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ConfigError(f"log.level: unknown level {values['level']!r}")


def default_config_path() -> Path | None:
    """``MEDMITRA_CONFIG``, else ``config.toml`` in the working directory if present."""
    env = os.environ.get("MEDMITRA_CONFIG")
    if env:
        return Path(env)
    cwd = Path("config.toml")
    return cwd if cwd.is_file() else None


def load_settings(config_path: str | Path | None = None, *,
                  env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, ``MEDMITRA_*`` env and CLI overrides."""
    env = os.environ if env is None else env
    path = Path(config_path) if config_path else default_config_path()
    file_data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        try:
            file_data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        source = str(path)
    for section in file_data:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown config section in {path}")

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        types = _field_types(cls)
        values = dataclasses.asdict(cls())
        sect_data = file_data.get(section, {})
        if not isinstance(sect_data, dict):
            raise ConfigError(f"{section}: expected a table")
        for key, raw in sect_data.items():
            if key not in types:
                raise ConfigError(f"{section}.{key}: unknown config key")
            values[key] = _coerce(section, key, raw, types[key])
        for key, typ in types.items():
            env_name = f"MEDMITRA_{section.upper()}_{key.upper()}"
            if env_name in env:
                values[key] = _coerce(section, key, env[env_name], typ)
        for key, raw in (overrides or {}).get(section, {}).items():
            if raw is not None:
                values[key] = _coerce(section, key, raw, types[key])
        _validate(section, values)
        built[section] = cls(**values)
    return Settings(**built, source=source)


def app_root() -> Path:
    """The folder beside the executable (frozen binary) or the project root (source tree)."""
    if getattr(sys, "frozen", False):
        return Path(sys.executable).resolve().parent
    return Path(__file__).resolve().parent.parent


def resolve_model_path(raw: str) -> Path | None:
    """Find a configured model file: absolute, else in the cwd, else beside the app."""
    if not raw:
        return None
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p
    for base in (Path.cwd(), app_root()):
        cand = base / p
        if cand.exists():
            return cand.resolve()
    return (Path.cwd() / p).resolve()
