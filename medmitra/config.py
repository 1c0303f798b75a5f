"""One frozen Settings object: embedded defaults, then config.toml, then MEDMITRA_* env.

Every key is declared once, below, as a field of its section's dataclass::

    port: int = setting(8000, "TCP port to listen on", min=0, max=65535)

``setting(default, doc, min=, max=, choices=)`` carries everything about the key: its type
(the annotation: str, int, float or bool), default, one-line documentation, and the range
or the allowed values. Loading coerces each value to the type, and constructing a section
checks the range and choices (a section may add cross-key checks in ``_check``), so a value
of the wrong type or out of range stops start-up with a ``ConfigError`` that names the key.

Where a key is set, later wins: the default, ``config.toml`` (``[section]`` table), the
environment ``MEDMITRA_<SECTION>_<KEY>`` (upper case), then command-line overrides.

Adding a key (one place, then one generated file):

1. Add the field with ``setting(...)`` to its section below. A new section is a new
   ``@dataclass(frozen=True)`` subclass of ``Section`` plus one field of ``Settings``.
2. Regenerate the documented config file: ``python -m medmitra.config > config.toml``.
   ``config.toml`` is rendered from these declarations (tests/test_config.py checks that
   it is up to date), so the doc and default are never written twice.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

MiB = 1024 * 1024
# The value of an int key declared with ``auto=True`` when it is set to "auto": the code that
# reads the key decides at run time (compare with ``AUTO``; it is not a number to use).
AUTO = -1


class ConfigError(Exception):
    """A config value is missing, of the wrong type or out of range."""


def setting(default: Any, doc: str, *, min: float | None = None, max: float | None = None,
            choices: tuple[str, ...] | None = None, auto: bool = False) -> Any:
    """Declare a config key: its default, one-line doc (shown in config.toml), and range
    (``min``/``max`` for numbers, inclusive) or allowed values (``choices``, matched
    case-insensitively and stored in the spelling given here). ``auto``: an int key that
    also takes the word "auto", stored as ``AUTO``."""
    return field(default=default, metadata={"doc": doc, "min": min, "max": max,
                                            "choices": choices, "auto": auto})


_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class Section:
    """Base of the section dataclasses: validates every key when constructed."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("auto") and value == AUTO:
                continue
            lo, hi = f.metadata.get("min"), f.metadata.get("max")
            if lo is not None and value < lo or hi is not None and value > hi:
                raise ConfigError(f"{self.name}.{f.name}: {value!r} is out of range "
                                  f"[{lo}, {hi}]")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{self.name}.{f.name}: {value!r} is not one of "
                                  f"{', '.join(choices)}")
        self._check()

    def _check(self) -> None:
        """Checks that involve several keys of the section (override where needed)."""

    @classmethod
    def field_types(cls) -> dict[str, type]:
        try:
            return {f.name: _TYPES[str(f.type)] for f in dataclasses.fields(cls)}
        except KeyError as exc:
            raise TypeError(f"{cls.__name__}: config keys are str, int, float or bool, "
                            f"not {exc}") from None


@dataclass(frozen=True)
class ServerSettings(Section):
    host: str = setting("127.0.0.1", 'listen address; "0.0.0.0" to serve the clinic\'s LAN')
    port: int = setting(8000, "TCP port to listen on", min=0, max=65535)
    public_url: str = setting(
        "", 'base of signed file links, e.g. "http://clinic-server:8000"; empty = from the '
        "request")
    access_log: bool = setting(False, "log one line per request")
    trusted_proxies: int = setting(
        0, "reverse proxies in front of the server whose X-Forwarded-For is believed for "
           "the client address (sign-in rate limits, logs); 0 = the socket's peer",
        min=0, max=10)
    request_max_bytes: int = setting(120 * MiB, "one request's body, all files together",
                                     min=1024)
    json_max_bytes: int = setting(
        1 * MiB, "body of every other route (JSON, sign-in), refused while it arrives, "
        "before authentication", min=1024, max=64 * MiB)
    header_timeout_s: float = setting(
        10.0, "a client must send its request line and headers within this", min=0.5,
        max=600)
    keep_alive_timeout_s: float = setting(
        5.0, "an idle keep-alive connection is closed after this", min=0.5, max=3600)
    max_connections: int = setting(
        512, "open at once; past it idle ones are closed first, then new ones get 503",
        min=16, max=100_000)
    cors_origins: str = setting(
        "*", "comma-separated origins allowed to call the API from a browser")
    graceful_shutdown_s: float = setting(
        15.0, "time running requests and analyses get to finish on stop", min=0, max=3600)


@dataclass(frozen=True)
class StorageSettings(Section):
    data_dir: str = setting(
        "data", "database and uploaded files live here (relative = working directory)")
    min_free_bytes: int = setting(
        16 * MiB, "uploads are refused (507) while free disk space is below this", min=0)


@dataclass(frozen=True)
class DatabaseSettings(Section):
    url: str = setting("", "empty = SQLite file data_dir/medmitra.sqlite3; or "
                           "postgres://user:pass@host:5432/db")
    busy_timeout_ms: int = setting(10000, "SQLite: how long a writer waits for a lock",
                                   min=0, max=600000)


@dataclass(frozen=True)
class AuthSettings(Section):
    jwt_secret: str = setting(
        "", "HS256 secret of your Supabase project; empty = a local secret in "
            "data_dir/jwt_secret (mode 0600)")
    jwks_file: str = setting(
        "", "JSON Web Key Set file with ES256/RS256 public keys (chosen by kid)")
    audience: str = setting("authenticated", "required in the token's aud")
    issuer: str = setting("", "when set, the token's iss must match")
    leeway_s: int = setting(30, "clock skew allowed on exp/nbf/iat", min=0, max=3600)
    trust_user_id: bool = setting(
        False, "TRUSTED LAN ONLY: accept a user_id field / bare UUID instead of a token "
               "(the original frontend's compatibility mode)")
    signup_enabled: bool = setting(
        False, "allow POST /auth/v1/signup; off = only an admin creates users")
    access_token_ttl_s: int = setting(3600, "lifetime of access tokens this server issues",
                                      min=30, max=30 * 86400)
    refresh_reuse_window_s: int = setting(
        10, "a used refresh token may be replayed this long (concurrent tabs)",
        min=0, max=3600)
    # Rate limits count password guessing only (auth/ratelimit.py); calls with a valid
    # token (GET/PUT /user, logout, refresh) never count.
    rate_limit_per_min: int = setting(
        30, "failed sign-ins (and sign-up attempts) per minute per client address, over "
            "all accounts", min=1, max=100000)
    account_address_failures_per_hour: int = setting(
        10, "failed sign-ins per hour to one account from one address", min=1, max=100000)
    account_failures_per_hour: int = setting(
        100, "failed sign-ins per hour to one account from all addresses; above the "
             "previous key, so one client cannot lock the user out (addresses that signed "
             "in before are not held)", min=2, max=1000000)
    redirect_urls: str = setting(
        "", "where GET /auth/v1/authorize may return with a sign-in code: comma-separated "
            "URLs, e.g. \"http://clinic-server:3000/auth/callback\"; a trailing /** allows "
            "the paths below")
    pkce_allow_plain: bool = setting(
        False, "accept code_challenge_method=plain (a browser without WebCrypto: frontend "
               "over plain http on a LAN name); off = S256 only")

    def _check(self) -> None:
        if self.account_failures_per_hour <= self.account_address_failures_per_hour:
            raise ConfigError("auth.account_failures_per_hour: must be above "
                              "auth.account_address_failures_per_hour")


@dataclass(frozen=True)
class LimitsSettings(Section):
    lab_max_bytes: int = setting(10 * MiB, "one lab file", min=1)
    radiology_max_bytes: int = setting(50 * MiB, "one radiology file", min=1)
    files_per_request: int = setting(10, "files in one upload request", min=1, max=1000)
    text_field_max_chars: int = setting(
        20000, "case_summary and other free-text fields", min=1, max=10_000_000)
    name_max_chars: int = setting(200, "patient and file names", min=1, max=10000)
    file_url_ttl_s: int = setting(3600, "signed file_url links expire after this",
                                  min=10, max=7 * 86400)


def _max_tokens(default: int, doc: str = "") -> Any:
    return setting(default, doc, min=16, max=1 << 16)


@dataclass(frozen=True)
class LLMSettings(Section):
    model_path: str = setting(
        "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "any GGUF chat model; relative = cwd, then beside the program")
    n_ctx: int = setting(4096, "context window, tokens", min=256, max=1 << 20)
    threads: int = setting(0, "CPU threads per worker; 0 = cores / workers", min=0, max=1024)
    workers: int = setting(
        AUTO, 'analyses run at once, each with its own model context; 0 = API only; '
        '"auto" = 1, and a 2nd when the machine has 2+ cores and memory for another context '
        "(a local model only)", min=0, max=64, auto=True)
    inference: str = setting(
        "process", '"process": each worker\'s model runs in a child process (the API stays '
        'responsive while models compute); "thread": in the server process',
        choices=("process", "thread"))
    temperature: float = setting(0.2, "sampling temperature", min=0, max=5)
    seed: int = setting(42, "sampling seed (same input and seed = same text)")
    repeat_penalty: float = setting(1.1, "penalty on repeated tokens", min=0.5, max=3)
    max_tokens_lab: int = _max_tokens(320, "output budget per stage, tokens")
    max_tokens_radiology: int = _max_tokens(256)
    max_tokens_summary: int = _max_tokens(320)
    max_tokens_soap: int = _max_tokens(400)
    max_tokens_diagnosis: int = _max_tokens(256)
    max_tokens_differential: int = _max_tokens(400)
    max_tokens_recommendations: int = _max_tokens(400)
    vision_model_path: str = setting("", "optional vision GGUF for radiology images ...")
    mmproj_path: str = setting("", "... and its multimodal projector file")
    stage_timeout_s: float = setting(300.0, "a stage running longer fails the attempt",
                                     min=1, max=86400)
    remote_url: str = setting(
        "", 'OpenAI-compatible inference server (llama-server), e.g. "http://gpu-box:8080"; '
            "empty = in-process model")
    remote_model: str = setting(
        "", "model name to ask the remote server for (empty = its default)")
    remote_api_key: str = setting("", "sent as a Bearer token to the remote server")
    remote_timeout_s: float = setting(300.0, "one remote completion may take this long",
                                      min=1, max=86400)


@dataclass(frozen=True)
class JobsSettings(Section):
    max_attempts: int = setting(
        3, "an analysis is tried this often before the case is failed", min=1, max=100)
    lease_s: float = setting(
        60.0, "a worker that stops renewing its lease for this long loses the job",
        min=2, max=86400)
    heartbeat_s: float = setting(10.0, "lease renewal interval (shorter than lease_s)",
                                 min=0.2, max=3600)
    poll_s: float = setting(
        1.0, "idle workers look for new jobs this often (new jobs also wake them)",
        min=0.05, max=600)
    max_queued_per_user: int = setting(
        20, "analyses one user may have waiting; more answer 429 (the queue is fair "
        "across users)", min=1, max=1_000_000)

    def _check(self) -> None:
        if self.heartbeat_s >= self.lease_s:
            raise ConfigError("jobs.heartbeat_s: must be shorter than jobs.lease_s")


@dataclass(frozen=True)
class LogSettings(Section):
    level: str = setting(
        "INFO", "DEBUG logs may contain clinical text; INFO and above never do",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    format: str = setting("text", '"text" lines, or "json": one object per line with '
                                  "request_id", choices=("text", "json"))


@dataclass(frozen=True)
class BackupSettings(Section):
    every_h: float = setting(
        0.0, "the server makes a backup every this many hours; 0 = off", min=0, max=24 * 366)
    keep: int = setting(7, "scheduled backups kept (oldest deleted first); 0 = keep all",
                        min=0, max=100000)
    dir: str = setting("", "backup folder; empty = data_dir/backups (better: another disk)")


@dataclass(frozen=True)
class AuditSettings(Section):
    enabled: bool = setting(True, "record every access to patient data (docs/operations.md)")
    durability: str = setting(
        "batch", '"batch": rows are committed every flush_ms (a crash may lose the rows of '
                 'the last flush_ms); "ack": a response waits for its row\'s commit (a crash '
                 "loses none; costs read throughput, docs/operations.md)",
        choices=("batch", "ack"))
    flush_ms: int = setting(200, "batch mode's commit interval, milliseconds",
                            min=1, max=60000)
    retention_days: int = setting(0, "rows older than this are deleted daily; 0 = keep all",
                                  min=0, max=365 * 100)


@dataclass(frozen=True)
class MetricsSettings(Section):
    enabled: bool = setting(True, "serve GET /metrics (Prometheus text format)")
    allow_from: str = setting("127.0.0.0/8,::1",
                              "addresses or networks that may scrape, comma-separated")
    bearer_token: str = setting(
        "", 'if set, a scrape must also send "Authorization: Bearer <this>"')

    def _check(self) -> None:
        from ipaddress import ip_network

        for net in filter(None, (n.strip() for n in self.allow_from.split(","))):
            try:
                ip_network(net, strict=False)
            except ValueError:
                raise ConfigError(f"metrics.allow_from: {net!r} is not an address or "
                                  "network") from None


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
    backup: BackupSettings = field(default_factory=BackupSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
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
        """A copy with some keys of one section changed (values are coerced and checked)."""
        current = getattr(self, section)
        merged = dataclasses.asdict(current)
        _coerce_into(type(current), merged, values)
        return dataclasses.replace(self, **{section: type(current)(**merged)})


# section name -> its dataclass, in the order of Settings (and of config.toml).
SECTIONS: dict[str, type[Section]] = {
    f.name: f.default_factory for f in dataclasses.fields(Settings)  # type: ignore[misc]
    if f.default_factory is not dataclasses.MISSING}
for _name, _cls in SECTIONS.items():
    _cls.name = _name


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _coerce(name: str, raw: Any, typ: type, meta: Mapping[str, Any]) -> Any:
    """``raw`` (from TOML, the environment or the command line) as a value of ``typ``;
    ``meta`` is the key's ``setting`` metadata."""
    if meta.get("auto"):
        if isinstance(raw, str) and raw.strip().casefold() == "auto":
            return AUTO
        value = _coerce(name, raw, typ, {})
        if value == AUTO:   # the stand-in is not a number a user can mean
            raise ConfigError(f'{name}: expected a number or "auto", got {raw!r}')
        return value
    choices = meta.get("choices")
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
    for choice in choices or ():
        if raw.strip().casefold() == choice.casefold():
            return choice
    return raw


def _coerce_into(cls: type[Section], values: dict[str, Any], updates: Mapping[str, Any],
                 where: str = "") -> None:
    """Coerce ``updates`` onto ``values`` (keys of ``cls``; None = keep the value)."""
    meta = {f.name: f.metadata for f in dataclasses.fields(cls)}
    types = cls.field_types()
    for key, raw in updates.items():
        if key not in types:
            raise ConfigError(f"{cls.name}.{key}: unknown config key{where}")
        if raw is not None:
            values[key] = _coerce(f"{cls.name}.{key}", raw, types[key], meta[key])


def env_name(section: str, key: str) -> str:
    """The environment variable that sets ``section.key``."""
    return f"MEDMITRA_{section.upper()}_{key.upper()}"


def default_config_path(env: Mapping[str, str] | None = None) -> Path | None:
    """The config file read when none is named: ``MEDMITRA_CONFIG``, else ``config.toml``
    in the working directory if present. With an explicit ``env`` (tests, embedding) only
    that mapping's ``MEDMITRA_CONFIG`` counts: nothing is taken from the process or cwd."""
    if env is not None:
        named = env.get("MEDMITRA_CONFIG")
        return Path(named) if named else None
    named = os.environ.get("MEDMITRA_CONFIG")
    if named:
        return Path(named)
    cwd = Path("config.toml")
    return cwd if cwd.is_file() else None


def load_settings(config_path: str | Path | None = None, *,
                  env: Mapping[str, str] | None = None,
                  overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, ``MEDMITRA_*`` env and CLI overrides.

    ``env=None`` means the process: ``os.environ``, and ``./config.toml`` when no file is
    named. A given ``env`` is the whole environment: the process's variables, its
    ``MEDMITRA_CONFIG`` and the working directory's config.toml are not read.
    """
    path = Path(config_path) if config_path else default_config_path(env)
    env = os.environ if env is None else env
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
    for section in overrides or {}:
        if section not in SECTIONS:
            raise ConfigError(f"{section}: unknown config section")

    built: dict[str, Any] = {}
    for section, cls in SECTIONS.items():
        values = dataclasses.asdict(cls())
        sect_data = file_data.get(section, {})
        if not isinstance(sect_data, dict):
            raise ConfigError(f"{section}: expected a table")
        from_env = {key: env[env_name(section, key)] for key in values
                    if env_name(section, key) in env}
        # Each layer is coerced (a bad value is reported even if a later layer replaces
        # it); ranges are checked once, on the result.
        _coerce_into(cls, values, sect_data, f" in {path}")
        _coerce_into(cls, values, from_env)
        _coerce_into(cls, values, (overrides or {}).get(section, {}))
        built[section] = cls(**values)
    return Settings(**built, source=source)


# -- config.toml, rendered from the declarations above -----------------------------------

CONFIG_TOML_HEADER = """\
# MedMitra Edge configuration.
#
# Every key is shown commented out with its built-in default: uncomment to change it.
# Any key can also be set by an environment variable MEDMITRA_<SECTION>_<KEY>, e.g.
# MEDMITRA_SERVER_PORT=9000 or MEDMITRA_LLM_WORKERS=2; the environment wins over this file,
# and command-line flags (--host, --port, --data-dir) win over both.
# This file is read from ./config.toml, from $MEDMITRA_CONFIG, or from --config PATH.
# A value of the wrong type or out of range stops start-up with a message naming the key.
# (Generated from medmitra/config.py by `python -m medmitra.config`: edit that file.)
"""


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _key_comment(f: dataclasses.Field, value: Any) -> str:
    parts = [f.metadata.get("doc", "")]
    if f.name.endswith("_bytes") and value and value % MiB == 0:
        parts.append(f"({value // MiB} MiB)")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and hi is not None:
        parts.append(f"[{_number(lo)} to {_number(hi)}]")
    elif lo is not None:
        parts.append(f"[at least {_number(lo)}]")
    elif hi is not None:
        parts.append(f"[at most {_number(hi)}]")
    choices = f.metadata.get("choices")
    if choices:
        parts.append(f"[{', '.join(choices)}]")
    if f.metadata.get("auto") and parts[-1].startswith("["):
        parts[-1] = parts[-1][:-1] + ', or "auto"]'
    return " ".join(p for p in parts if p)


def render_config_toml() -> str:
    """The documented config file: every key commented out with its default, its doc and
    its range. The project's ``config.toml`` is this text."""
    lines = [CONFIG_TOML_HEADER.rstrip("\n")]
    for section, cls in SECTIONS.items():
        lines += ["", f"[{section}]"]
        for f in dataclasses.fields(cls):
            shown = "auto" if f.metadata.get("auto") and f.default == AUTO else f.default
            assign = f"# {f.name} = {_toml_value(shown)}"
            comment = _key_comment(f, f.default)
            lines.append(f"{assign:<31} # {comment}" if comment else assign)
    return "\n".join(lines) + "\n"


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


if __name__ == "__main__":
    sys.stdout.write(render_config_toml())
