"""``LLMRuntime`` over a remote OpenAI-compatible inference server.

For a clinic that outgrows one machine: the analysis workers send their model calls to
llama.cpp's ``llama-server`` or llama-cpp-python's ``python -m llama_cpp.server`` on
another box instead of loading a GGUF file in-process. Selected by ``llm.remote_url``;
nothing else changes for the pipeline.

Wire format (one form that both servers accept): ``POST /v1/chat/completions`` with
``response_format = {"type": "json_object", "schema": <schema>}``. Both turn the schema
into a decoding grammar. (llama-cpp-python's server rejects the newer
``{"type": "json_schema", ...}`` form with a validation error.)

Privacy: prompts carry patient text. Nothing here logs a prompt, and an error message
from the server is cut to its first line and dropped entirely when it echoes any part of
the prompt (llama-cpp-python's validation errors quote the request body).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
from pathlib import PurePosixPath
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import httpx

from medmitra.config import LLMSettings
from medmitra.llm.runtime import LLMError, ModelUnavailable, Usage, quantization_of

log = logging.getLogger(__name__)

# Start-up probes must fail fast so /health reports an unreachable server promptly; model
# calls get the configured llm.remote_timeout_s.
PROBE_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
# Fallback when the server has no tokenize endpoint. Measured with SmolLM2's tokenizer:
# English prose ~3.5 bytes/token, lab lines with numbers ~1.5, Devanagari ~1.8, digit runs
# 1.0. Erring high only trims a little more context; erring low overflows the window and
# fails the whole stage, so the estimate assumes dense text.
ESTIMATE_BYTES_PER_TOKEN = 1.5
# trim_to_tokens counts many prefixes of the same text; each count is a round trip.
COUNT_CACHE_ENTRIES = 512
# Server error text kept in an LLMError (first line only).
REASON_MAX_CHARS = 200
# A server error that contains this many consecutive characters of the prompt is
# treated as an echo of the prompt and not passed on.
ECHO_WINDOW_CHARS = 12
ECHO_MIN_CONTENT_CHARS = 6

# llama-cpp-python's context overflow message; the number is the server's real window.
_CTX_LIMIT = re.compile(r"maximum context length is (\d+) tokens")
_GGUF_SUFFIX = re.compile(r"\.gguf$", re.IGNORECASE)

# Errors after which the request cannot have reached the model (refused connection, a
# kept-alive connection the server had closed): safe to send once more.
_RECONNECTABLE = (httpx.ConnectError, httpx.RemoteProtocolError)


def base_url(raw: str) -> str:
    """``http(s)://host[:port][/prefix]`` without a trailing ``/`` or ``/v1``.

    Clinics copy OpenAI-style base URLs that end in ``/v1``; the endpoints used here are
    both under and beside ``/v1``, so the root is kept."""
    url = raw.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelUnavailable(f"llm.remote_url {display_url(raw)!r} is not an http(s) URL")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def display_url(raw: str) -> str:
    """The URL without user:password, for status output and messages."""
    try:
        parts = urlsplit(raw.strip())
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def _prompt_texts(messages: list[dict]) -> list[str]:
    texts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts.extend(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    return texts


def echoes_prompt(reason: str, messages: list[dict]) -> bool:
    """True when ``reason`` contains a piece of the prompt (so it must not be shown)."""
    texts = _prompt_texts(messages)
    joined = "\n".join(texts)
    for text in texts:
        if ECHO_MIN_CONTENT_CHARS <= len(text) < ECHO_WINDOW_CHARS and text in reason:
            return True
    if len(joined) < ECHO_WINDOW_CHARS:
        return False
    return any(reason[i:i + ECHO_WINDOW_CHARS] in joined
               for i in range(0, max(0, len(reason) - ECHO_WINDOW_CHARS) + 1))


def _server_message(resp: httpx.Response) -> str:
    """The error text of an error response: OpenAI ``error.message``, FastAPI ``detail``,
    or the raw body; first line only."""
    text = ""
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            text = str(err.get("message") or "")
        elif isinstance(err, str):
            text = err
        elif isinstance(body.get("detail"), str):
            text = body["detail"]
    if not text and body is None:
        text = resp.text
    lines = text.strip().splitlines()
    return lines[0][:REASON_MAX_CHARS] if lines else ""


class RemoteRuntime:
    """``LLMRuntime`` talking HTTP to an OpenAI-compatible llama.cpp server.

    ``has_vision()`` is False: image input over the API (``image_url`` parts to a
    multimodal llama-server) is not wired up yet, so radiology images are reported as
    unread, as with no local vision model.

    One instance per worker, used from that worker's thread; the ``httpx.Client`` keeps
    the connection alive between calls.
    """

    def __init__(self, url: str, *, model: str = "", api_key: str = "",
                 timeout_s: float = 300.0, n_ctx: int = 4096,
                 transport: httpx.BaseTransport | None = None):
        self.url = base_url(url)
        self._shown_url = display_url(self.url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s))
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=self._timeout,
                                    transport=transport)
        self._lock = threading.Lock()
        # LLMRuntime's stop flag. One non-streamed request per answer: it cannot be stopped
        # midway, so the flag is left to the runner's checks between calls.
        self.interrupt: Callable[[], bool] | None = None
        self._count_cached = functools.lru_cache(maxsize=COUNT_CACHE_ENTRIES)(self._count)
        try:
            model_id = self._probe_model(model)
            self._tokenize_path, self._bos_tokens = self._probe_tokenizer()
            server_ctx = self._probe_n_ctx()
        except BaseException:
            self._client.close()
            raise
        # The id is often the GGUF path the server was started with; show it the way the
        # in-process backend names a local file.
        file_name = PurePosixPath(model_id).name
        is_gguf = bool(_GGUF_SUFFIX.search(file_name))
        quant = quantization_of(PurePosixPath(file_name), {}) if is_gguf else "unknown"
        stem = _GGUF_SUFFIX.sub("", file_name)
        if quant != "unknown":
            stem = re.sub(r"[.\-_]" + re.escape(quant) + "$", "", stem, flags=re.IGNORECASE)
        self._model_id = model_id
        self.info: dict[str, Any] = {
            "name": model if model else (stem or model_id or "remote-model"),
            "file": f"remote:{self._shown_url}", "quantization": quant, "sha256": "unknown",
            "n_ctx": server_ctx or n_ctx, "remote_model_id": model_id,
            "tokenizer": self._tokenize_path or "estimate"}
        if server_ctx is None:
            log.info("inference server at %s does not report its context size; assuming "
                     "llm.n_ctx = %d (it must match the server's --n_ctx)",
                     self._shown_url, n_ctx)

    # -- HTTP ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, json: Any = None,
                 timeout: httpx.Timeout | float | None = None) -> httpx.Response:
        """One request, sent at most twice (one reconnect) when the connection failed
        before the server could have acted on it. Transport errors -> LLMError."""
        kw: dict[str, Any] = {"json": json} if json is not None else {}
        if timeout is not None:
            kw["timeout"] = timeout
        for attempt in (1, 2):
            try:
                return self._client.request(method, path, **kw)
            except _RECONNECTABLE as exc:
                if attempt == 2:
                    raise LLMError(f"inference server at {self._shown_url} is unreachable "
                                   f"({type(exc).__name__})") from None
                log.info("inference server %s: %s; reconnecting once", self._shown_url,
                         type(exc).__name__)
            except httpx.TimeoutException as exc:
                raise LLMError(f"inference server at {self._shown_url} did not answer in "
                               f"time ({type(exc).__name__})") from None
            except httpx.HTTPError as exc:
                raise LLMError(f"request to inference server at {self._shown_url} failed "
                               f"({type(exc).__name__})") from None
        raise AssertionError("unreachable")  # pragma: no cover

    # -- start-up probes ----------------------------------------------------------------

    def _probe_model(self, configured: str) -> str:
        """The served model id; ModelUnavailable when the server can't be used."""
        try:
            resp = self._request("GET", "/v1/models", timeout=min(
                PROBE_TIMEOUT_S, self._timeout.read or PROBE_TIMEOUT_S))
        except LLMError as exc:
            raise ModelUnavailable(str(exc)) from None
        if resp.status_code in (401, 403):
            raise ModelUnavailable(f"inference server at {self._shown_url} refused access "
                                   f"(HTTP {resp.status_code}): check llm.remote_api_key")
        if resp.status_code == 503:
            raise ModelUnavailable(f"inference server at {self._shown_url} is not ready "
                                   f"(HTTP 503, still loading its model?)")
        if resp.status_code != 200:
            raise ModelUnavailable(f"inference server at {self._shown_url} answered "
                                   f"GET /v1/models with HTTP {resp.status_code}: is it an "
                                   f"OpenAI-compatible server?")
        try:
            data = resp.json().get("data") or []
            ids = [str(d["id"]) for d in data if isinstance(d, dict) and d.get("id")]
        except (ValueError, AttributeError, TypeError):
            raise ModelUnavailable(f"inference server at {self._shown_url} sent an "
                                   f"unreadable model list") from None
        if configured:
            if ids and configured not in ids:
                # llama-server serves one model whatever the name; the router of a
                # multi-model server would reject the calls, so say so now.
                log.warning("llm.remote_model %r is not in the server's model list %s",
                            configured, ids)
            return configured
        if not ids:
            raise ModelUnavailable(f"inference server at {self._shown_url} serves no model")
        return ids[0]

    def _probe_tokenizer(self) -> tuple[str | None, int]:
        """Which tokenize endpoint exists, and how many tokens it adds to any text (a BOS
        token where the server always adds one)."""
        for path in ("/tokenize", "/extras/tokenize"):
            try:
                resp = self._request("POST", path, json=self._tokenize_body(path, ""),
                                     timeout=PROBE_TIMEOUT_S)
            except LLMError:
                continue
            if resp.status_code == 200:
                tokens = _tokens_of(resp)
                if tokens is not None:
                    return path, len(tokens)
        log.warning("inference server at %s has no tokenize endpoint; token counts are "
                    "estimated (%.1f bytes per token)", self._shown_url,
                    ESTIMATE_BYTES_PER_TOKEN)
        return None, 0

    def _probe_n_ctx(self) -> int | None:
        """The context size per request from llama-server's ``GET /props`` (the per-slot
        size when it runs several slots); None when the server doesn't say."""
        try:
            resp = self._request("GET", "/props", timeout=PROBE_TIMEOUT_S)
            if resp.status_code != 200:
                return None
            props = resp.json()
        except (LLMError, ValueError):
            return None
        if not isinstance(props, dict):
            return None
        gen = props.get("default_generation_settings")
        for value in ((gen or {}).get("n_ctx") if isinstance(gen, dict) else None,
                      props.get("n_ctx")):
            if isinstance(value, int) and value > 0:
                return value
        return None

    # -- LLMRuntime ---------------------------------------------------------------------

    @staticmethod
    def _tokenize_body(path: str, text: str) -> dict:
        if path == "/tokenize":  # llama-server
            return {"content": text, "add_special": False, "parse_special": False}
        return {"input": text}    # llama-cpp-python's server

    def _count(self, text: str) -> int:
        if self._tokenize_path is None:
            return estimate_tokens(text)
        resp = self._request("POST", self._tokenize_path,
                             json=self._tokenize_body(self._tokenize_path, text))
        tokens = _tokens_of(resp) if resp.status_code == 200 else None
        if tokens is None:
            raise LLMError(f"inference server at {self._shown_url} could not tokenize "
                           f"(HTTP {resp.status_code})")
        return max(0, len(tokens) - self._bos_tokens)

    def count_tokens(self, text: str) -> int:
        if not text:
            return 0
        return self._count_cached(text)

    def complete_json(self, messages: list[dict], schema: dict, *, max_tokens: int,
                      temperature: float, seed: int, repeat_penalty: float) -> tuple[str, Usage]:
        body = {
            "model": self._model_id, "messages": messages, "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "repeat_penalty": repeat_penalty,
            "response_format": {"type": "json_object", "schema": schema},
            # llama-server: keep the shared prompt prefix in the slot's KV cache (older
            # builds default to off); llama-cpp-python's server ignores the field.
            "cache_prompt": True, "stream": False,
        }
        with self._lock:
            resp = self._request("POST", "/v1/chat/completions", json=body)
        if resp.status_code != 200:
            raise self._error(resp, messages)
        try:
            data = resp.json()
            text = data["choices"][0]["message"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise LLMError(f"inference server at {self._shown_url} sent a malformed chat "
                           f"completion") from None
        return text, _usage_of(data)

    def _error(self, resp: httpx.Response, messages: list[dict]) -> LLMError:
        reason = _server_message(resp)
        limit = _CTX_LIMIT.search(reason)
        if limit and int(limit.group(1)) != self.info["n_ctx"]:
            # The server told its real window: later analyses budget for it.
            log.warning("inference server context is %s tokens, not %s; using it from now "
                        "on (set llm.n_ctx to match)", limit.group(1), self.info["n_ctx"])
            self.info["n_ctx"] = int(limit.group(1))
        if reason and echoes_prompt(reason, messages):
            reason = "(server message withheld: it quotes the request)"
        status = resp.status_code
        kind = "rejected the request" if status < 500 else "failed"
        return LLMError(f"inference server {kind} (HTTP {status})"
                        + (f": {reason}" if reason else ""))

    def has_vision(self) -> bool:
        return False

    def describe_image_json(self, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                            temperature: float = 0.1, seed: int = 0,
                            repeat_penalty: float = 1.1) -> tuple[str, Usage]:
        raise LLMError("image input is not supported with a remote inference server yet")

    def close(self) -> None:
        self._client.close()


def _tokens_of(resp: httpx.Response) -> list | None:
    try:
        tokens = resp.json().get("tokens")
    except (ValueError, AttributeError):
        return None
    return tokens if isinstance(tokens, list) else None


def _usage_of(data: dict) -> Usage:
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = timings.get("cache_n")  # llama-server: prompt tokens reused from the slot
    prompt_ms = timings.get("prompt_ms")
    return Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                 completion_tokens=int(usage.get("completion_tokens") or 0),
                 cached_tokens=int(cached or 0),
                 prompt_eval_s=float(prompt_ms) / 1000.0 if prompt_ms else 0.0)


def estimate_tokens(text: str) -> int:
    """A deliberately high token count for servers without a tokenize endpoint."""
    return math.ceil(len(text.encode("utf-8")) / ESTIMATE_BYTES_PER_TOKEN)


def load_remote_runtime(llm: LLMSettings) -> RemoteRuntime:
    """The runtime for ``llm.remote_url``; ``ModelUnavailable`` when the server can't be
    reached or used."""
    if not llm.remote_url.strip():
        raise ModelUnavailable("llm.remote_url is empty: no inference server is configured")
    return RemoteRuntime(llm.remote_url, model=llm.remote_model, api_key=llm.remote_api_key,
                         timeout_s=llm.remote_timeout_s, n_ctx=llm.n_ctx)
