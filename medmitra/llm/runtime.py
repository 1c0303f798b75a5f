"""The runtime interface the pipeline talks to, a scripted fake, and GGUF model facts.

No ``llama_cpp`` import here: the job worker, the API and the unit tests use this module
without loading the native library. ``medmitra.llm.llama`` is the real backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol, runtime_checkable

from medmitra.atomicfile import write_atomic

log = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1 << 20
GGUF_MAGIC = b"GGUF"


class LLMError(Exception):
    """The runtime could not produce an output (context overflow, native error ...)."""


class ModelUnavailable(LLMError):
    """A configured model file is missing, unreadable or not a GGUF file."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Prompt tokens served from the KV cache of the previous call (shared-prefix reuse).
    cached_tokens: int = 0
    # Wall time spent evaluating the prompt, seconds (0.0 when the backend can't tell).
    prompt_eval_s: float = 0.0
    # Wall time spent generating the answer after the prompt was read, seconds (0.0 when
    # the backend can't tell): completion_tokens / generate_s is the generation speed.
    generate_s: float = 0.0


@runtime_checkable
class LLMRuntime(Protocol):
    info: dict  # {"name", "file", "quantization", "sha256", "n_ctx"}
    # Stop flag, set by the job runner for the length of a job (None otherwise). A backend
    # that generates token by token checks it between tokens and ends the answer when it
    # returns True (job cancelled, stage deadline, shutdown); the stage then sees a cut-off
    # answer. A backend that cannot stop mid-answer ignores it; the runner checks the same
    # flag between calls.
    interrupt: Callable[[], bool] | None

    def complete_json(self, messages: list[dict], schema: dict, *, max_tokens: int,
                      temperature: float, seed: int,
                      repeat_penalty: float) -> tuple[str, Usage]: ...

    def count_tokens(self, text: str) -> int: ...

    def has_vision(self) -> bool: ...

    def describe_image_json(self, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                            temperature: float = 0.1, seed: int = 0,
                            repeat_penalty: float = 1.1) -> tuple[str, Usage]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- fake runtime

class FakeRuntime:
    """Deterministic stand-in for unit tests of the logic around the model.

    ``script`` maps a schema ``title`` (the pipeline names each schema after its stage) to
    outputs returned one per call: a string (any text — broken or truncated JSON, numbers
    out of range, ``Infinity`` ...), an exception to raise, or a callable
    ``(messages, schema) -> str``. When a title's list is used up (or absent) the fake
    answers with a small valid instance of the schema, built by ``example_for_schema``.

    Tokens are whitespace-separated words, so trimming by tokens is easy to check.
    Like llama.cpp, a prompt that doesn't fit ``n_ctx - max_tokens`` raises ``LLMError``.
    """

    def __init__(self, script: dict[str, list[Any]] | None = None, *, name: str = "fake-model",
                 n_ctx: int = 4096, vision: bool = False):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.calls: list[dict[str, Any]] = []
        self.vision = vision
        self.closed = False
        self.interrupt: Callable[[], bool] | None = None   # answers are instant: not checked
        self.info = {"name": name, "file": f"{name}.gguf", "quantization": "F16",
                     "sha256": "0" * 64, "n_ctx": n_ctx}

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def _answer(self, kind: str, messages: list[dict], schema: dict, max_tokens: int,
                seed: int) -> tuple[str, Usage]:
        key = str(schema.get("title", ""))
        prompt_tokens = sum(self.count_tokens(_content_text(m.get("content"))) for m in messages)
        self.calls.append({"kind": kind, "key": key, "messages": messages, "schema": schema,
                           "max_tokens": max_tokens, "seed": seed,
                           "prompt_tokens": prompt_tokens})
        if prompt_tokens + max_tokens > self.info["n_ctx"]:
            raise LLMError(f"prompt of {prompt_tokens} tokens + {max_tokens} to generate "
                           f"exceeds the context window of {self.info['n_ctx']}")
        queue = self.script.get(key)
        out: Any = queue.pop(0) if queue else json.dumps(example_for_schema(schema))
        if isinstance(out, BaseException):
            raise out
        if callable(out):
            out = out(messages, schema)
        return out, Usage(prompt_tokens, self.count_tokens(out))

    def complete_json(self, messages: list[dict], schema: dict, *, max_tokens: int,
                      temperature: float, seed: int, repeat_penalty: float) -> tuple[str, Usage]:
        return self._answer("text", messages, schema, max_tokens, seed)

    def has_vision(self) -> bool:
        return self.vision

    def describe_image_json(self, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                            temperature: float = 0.1, seed: int = 0,
                            repeat_penalty: float = 1.1) -> tuple[str, Usage]:
        if not self.vision:
            raise LLMError("no vision model is configured")
        return self._answer("image", [{"role": "user", "content": prompt}], schema,
                            max_tokens, seed)

    def close(self) -> None:
        self.closed = True


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def example_for_schema(schema: dict, name: str = "value") -> Any:
    """A small valid instance of a (bounded) JSON schema; strings echo their property name."""
    if "enum" in schema:
        return schema["enum"][0]
    typ = schema.get("type")
    if isinstance(typ, list):
        typ = next((t for t in typ if t != "null"), "null")
    if typ == "object":
        return {k: example_for_schema(v, k) for k, v in schema.get("properties", {}).items()}
    if typ == "array":
        count = max(1, int(schema.get("minItems", 1)))
        count = min(count, int(schema.get("maxItems", count)))
        return [example_for_schema(schema.get("items", {}), f"{name}_{i}") for i in range(count)]
    if typ == "string":
        return name[: int(schema.get("maxLength", len(name)))]
    if typ == "number":
        return 0.5
    if typ == "integer":
        return 1
    if typ == "boolean":
        return False
    return None


# --------------------------------------------------------------------------- model facts

# llama.h ``enum llama_ftype`` values stored in GGUF ``general.file_type``.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}
_QUANT_IN_NAME = re.compile(
    r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32|FP16|MXFP4(?:_MOE)?)(?![A-Za-z0-9])",
    re.IGNORECASE)
_QUANT_SUFFIX = re.compile(r"[.\-_]" + _QUANT_IN_NAME.pattern + "$", re.IGNORECASE)

# GGUF value types -> struct format of fixed-size scalars (8 = string, 9 = array).
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}
_WANTED_KEYS = ("general.name", "general.file_type")


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, data)[0]


def _skip_or_read_value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _GGUF_SCALARS:
        return _read(f, "<" + _GGUF_SCALARS[vtype])
    if vtype == 8:
        length = _read(f, "<Q")
        if not keep:
            f.seek(length, os.SEEK_CUR)
            return None
        return f.read(length).decode("utf-8", "replace")
    if vtype == 9:
        item_type, count = _read(f, "<I"), _read(f, "<Q")
        if item_type in _GGUF_SCALARS:  # fixed size: jump over the whole array at once
            f.seek(count * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_or_read_value(f, item_type, False)
        return None
    raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """``general.name`` and ``general.file_type`` from a GGUF header (stops once found).

    A few lines of header parsing instead of a dependency: only two keys are needed and
    the header is read sequentially without touching the tensor data.
    """
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file (bad magic)")
        version = _read(f, "<I")
        if version < 2 or version > 0xFFFF:  # v1 used 32-bit counts; a huge value = big endian
            return found
        _read(f, "<Q")  # tensor count
        kv_count = _read(f, "<Q")
        for _ in range(kv_count):
            key_len = _read(f, "<Q")
            key = f.read(key_len).decode("utf-8", "replace")
            vtype = _read(f, "<I")
            value = _skip_or_read_value(f, vtype, key in _WANTED_KEYS)
            if key in _WANTED_KEYS:
                found[key] = value
                if len(found) == len(_WANTED_KEYS):
                    break
    return found


def quantization_of(path: Path, metadata: dict[str, Any]) -> str:
    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int) and file_type in _FILE_TYPES:
        return _FILE_TYPES[file_type]
    match = _QUANT_IN_NAME.search(path.name)
    return match.group(1).upper() if match else "unknown"


def sha256_cached(path: Path, cache_dir: Path | None = None) -> str:
    """SHA-256 of a model file, cached in ``<name>.sha256`` keyed by size and mtime: in
    ``cache_dir`` (the server passes its data dir: it writes nowhere else), else beside
    the model.

    A 5 GB model takes tens of seconds to hash; the cache makes that a one-off cost.
    """
    st = path.stat()
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        sidecar = cache_dir / (path.name + ".sha256")
    else:
        sidecar = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(sidecar.read_text(encoding="utf-8"))
        if cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
            digest = str(cached["sha256"])
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    digest = h.hexdigest()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        write_atomic(sidecar, json.dumps(record))
    except OSError as exc:  # read-only model folder: hash again next time
        log.debug("cannot write %s: %s", sidecar, exc)
    return digest


def check_gguf(path: Path | None, what: str = "model") -> Path:
    """The path if it names a readable GGUF file, else ``ModelUnavailable`` saying why."""
    if path is None:
        raise ModelUnavailable(f"no {what} file is configured")
    if not path.is_file():
        raise ModelUnavailable(f"{what} file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelUnavailable(f"{what} file {path} cannot be read: {exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelUnavailable(f"{what} file {path} is not a GGUF file")
    return path


def model_info(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """{"name", "file", "quantization", "sha256"} of a GGUF model file."""
    path = check_gguf(Path(path))
    try:
        metadata = read_gguf_metadata(path)
    except (ValueError, OSError) as exc:
        raise ModelUnavailable(f"model file {path} has an unreadable GGUF header: {exc}") from None
    quant = quantization_of(path, metadata)
    # The file name is what the clinic configured and recognises; GGUF ``general.name`` is
    # often a training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2"), so it is the fallback.
    name = _QUANT_SUFFIX.sub("", path.stem)
    gguf_name = metadata.get("general.name")
    if not name and isinstance(gguf_name, str):
        name = gguf_name.strip()
    return {"name": name or path.stem, "file": path.name, "quantization": quant,
            "sha256": sha256_cached(path, cache_dir),
            "gguf_name": gguf_name.strip() if isinstance(gguf_name, str) else None}
