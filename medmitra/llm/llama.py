"""llama.cpp backend (llama-cpp-python). The only module of the project that imports llama_cpp.

One ``LlamaRuntime`` owns one model context; a worker uses it for one job at a time (the
lock only guards against misuse). Calls block and release the GIL, so workers run them in
threads and several runtimes compute in parallel.

Prefix reuse: llama-cpp-python keeps the tokens of the previous evaluation and, when the
next prompt starts with the same tokens, evaluates only the new suffix. The pipeline puts
the same system message + case facts first in every stage prompt to profit from that;
``Usage.cached_tokens`` reports how many prompt tokens were reused.
"""

from __future__ import annotations

import atexit
import base64
import ctypes
import io
import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

# llama.cpp is built with OpenMP here; its default "active" wait makes idle threads spin.
# On a machine shared with other work (API, OCR, other workers) that was measured 3-6x
# slower per call at 2 threads; "passive" only adds a thread wake-up (microseconds) per
# graph evaluation. Must be set before libgomp loads, i.e. before importing llama_cpp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402
from llama_cpp import Llama, LlamaGrammar  # noqa: E402

from medmitra.config import LLMSettings, resolve_model_path  # noqa: E402
from medmitra.llm.runtime import (LLMError, ModelUnavailable, Usage, check_gguf,  # noqa: E402
                                  model_info)

log = logging.getLogger(__name__)


def _close_llama_devnull() -> None:
    # llama_cpp._utils opens two /dev/null handles at import and never closes them; Python
    # then reports a ResourceWarning at exit (noise under warnings-as-errors test runs).
    utils = sys.modules.get("llama_cpp._utils")
    for name in ("outnull_file", "errnull_file"):
        handle = getattr(utils, name, None)
        if handle is not None and not handle.closed:
            handle.close()


atexit.register(_close_llama_devnull)

# Batch size for prompt evaluation, tokens; 512 is llama.cpp's default and fits small CPUs.
N_BATCH_TOKENS = 512


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# llama.cpp's llama_token_data {id, logit, p}, as a numpy record: a whole vocabulary of
# candidates is filled per token by two array copies instead of a Python loop.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _GrammarLastSampler:
    """Sampling with a grammar in llama.cpp's own order (its common/sampling.cpp, the
    llama-server default): sample from the plain chain (repeat penalty, top-k, top-p,
    min-p, temperature), check only the chosen token against the grammar, and only when
    the grammar rejects it apply the grammar to the whole vocabulary and sample again.

    llama-cpp-python puts the grammar inside the chain, so every token pays for matching
    all ~49k vocabulary entries against the grammar (measured: about a quarter of the
    generation time of a stage answer). The answers still always match the grammar: a
    token is only ever taken after the grammar accepted it.

    Duck-types ``llama_cpp._internals.LlamaSampler`` where ``Llama.generate`` / ``sample``
    use it (``sample(ctx, idx)``)."""

    def __init__(self, chain: Any, grammar: Any, n_vocab: int):
        self._chain = chain            # LlamaSampler without the grammar; owns its chain
        self._grammar = grammar        # llama_sampler pointer, owned by LlamaRuntime
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._buf = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._data = self._buf.ctypes.data_as(llama_cpp.llama_token_data_p)
        self._cur = llama_cpp.llama_token_data_array()
        self._one = (llama_cpp.llama_token_data * 1)()
        self._one_arr = llama_cpp.llama_token_data_array()
        self.rejected = 0   # tokens the grammar refused (then sampled again under it)

    def _fill(self, ctx: Any, idx: int) -> Any:
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        buf = self._buf
        buf["id"] = self._ids
        buf["logit"] = np.ctypeslib.as_array(logits, shape=(self._n_vocab,))
        buf["p"] = 0.0
        cur = self._cur
        cur.data, cur.size, cur.selected, cur.sorted = self._data, self._n_vocab, -1, False
        return cur

    def sample(self, ctx: Any, idx: int = -1) -> int:
        raw_ctx = ctx.ctx
        chain = self._chain.sampler
        cur = self._fill(raw_ctx, idx)
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        one, arr = self._one, self._one_arr
        one[0].id, one[0].logit, one[0].p = token, 1.0, 0.0
        arr.data, arr.size, arr.selected, arr.sorted = (
            ctypes.cast(one, llama_cpp.llama_token_data_p), 1, -1, False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(arr))
        if math.isinf(one[0].logit) and one[0].logit < 0:   # not allowed here
            self.rejected += 1
            cur = self._fill(raw_ctx, idx)
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(cur))
            llama_cpp.llama_sampler_apply(chain, ctypes.byref(cur))
            token = int(cur.data[cur.selected].id)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token


class LlamaRuntime:
    """``LLMRuntime`` over a local GGUF chat model, with an optional vision model."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, seed: int,
                 vision_model_path: Path | None = None, mmproj_path: Path | None = None,
                 cache_dir: Path | None = None):
        model_path = check_gguf(Path(model_path))
        want_vision = vision_model_path is not None or mmproj_path is not None
        if want_vision:  # a misconfigured vision model fails before anything is loaded
            if vision_model_path is None or mmproj_path is None:
                raise ModelUnavailable("a vision model needs both llm.vision_model_path and "
                                       "llm.mmproj_path (its projector GGUF)")
            check_gguf(Path(vision_model_path), "vision model")
            check_gguf(Path(mmproj_path), "mmproj projector")
        self.info: dict[str, Any] = {**model_info(model_path, cache_dir), "n_ctx": n_ctx}
        self._lock = threading.Lock()
        self._grammars: dict[str, LlamaGrammar] = {}
        # Parsed grammar samplers, one per (model, grammar): parsing a stage's GBNF again
        # for every call is avoided; a call starts from llama_sampler_reset.
        self._grammar_samplers: dict[tuple[int, str], Any] = {}
        # LLMRuntime's stop flag: checked between generated tokens; True ends the answer
        # there (it is then cut off, and the stage sees why).
        self.interrupt: Callable[[], bool] | None = None
        n_threads = threads if threads > 0 else None
        self._llm = self._load(model_path, n_ctx=n_ctx, n_threads=n_threads, seed=seed)
        self._sample_grammar_last(self._llm)
        self._vision: Llama | None = None
        if want_vision:
            try:
                self._vision = self._load_vision(Path(vision_model_path), Path(mmproj_path),
                                                 n_ctx=n_ctx, n_threads=n_threads, seed=seed)
                self._sample_grammar_last(self._vision)
            except ModelUnavailable:
                self._llm.close()
                raise
            self.info["vision"] = model_info(Path(vision_model_path), cache_dir)

    @staticmethod
    def _load(path: Path, **kw: Any) -> Llama:
        try:
            return Llama(model_path=str(path), n_batch=N_BATCH_TOKENS, verbose=False, **kw)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(f"model file {path} could not be loaded: {exc}") from None

    @staticmethod
    def _load_vision(vision_model_path: Path, mmproj_path: Path, **kw: Any) -> Llama:
        from llama_cpp.llama_chat_format import MTMDChatHandler

        # MTMDChatHandler formats with the vision model's own chat template, so any
        # mtmd-supported model (Gemma 3, Qwen2.5-VL, SmolVLM, LLaVA ...) works unchanged.
        try:
            handler = MTMDChatHandler(clip_model_path=str(mmproj_path), verbose=False,
                                      use_gpu=False)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(f"mmproj file {mmproj_path} could not be loaded: {exc}") \
                from None
        try:
            return Llama(model_path=str(vision_model_path), chat_handler=handler,
                         n_batch=N_BATCH_TOKENS, verbose=False, **kw)
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelUnavailable(
                f"vision model {vision_model_path} could not be loaded: {exc}") from None

    def _grammar(self, schema: dict) -> LlamaGrammar:
        key = json.dumps(schema)  # property order matters: the grammar emits keys in it
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = LlamaGrammar.from_string(schema_grammar(key), verbose=False)
            self._grammars[key] = grammar
        return grammar

    def _sample_grammar_last(self, llm: Llama) -> None:
        """Make ``llm`` sample with a grammar through ``_GrammarLastSampler``: its
        ``generate`` builds the sampler of every call with ``_init_sampler``; this instance's
        builder makes the plain chain and puts the (cached) grammar after it."""
        plain = getattr(llm, "_init_sampler", None)
        if plain is None:  # pragma: no cover - bindings other than the pinned version
            return

        def init_sampler(*args: Any, grammar: LlamaGrammar | None = None, **kw: Any) -> Any:
            chain = plain(*args, grammar=None, **kw)
            if grammar is None:
                return chain
            return _GrammarLastSampler(chain, self._grammar_sampler(llm, grammar),
                                       llm.n_vocab())

        llm._init_sampler = init_sampler  # type: ignore[method-assign]

    def _grammar_sampler(self, llm: Llama, grammar: LlamaGrammar) -> Any:
        key = (id(llm), grammar._grammar)
        smpl = self._grammar_samplers.get(key)
        if smpl is None:
            smpl = llama_cpp.llama_sampler_init_grammar(
                llm._model.vocab, grammar._grammar.encode("utf-8"),
                grammar._root.encode("utf-8"))
            if not smpl:
                raise LLMError("llama.cpp could not parse the output grammar")
            self._grammar_samplers[key] = smpl
        else:
            llama_cpp.llama_sampler_reset(smpl)
        return smpl

    def _interrupted(self, _tokens: Any, _logits: Any) -> bool:
        check = self.interrupt
        return bool(check is not None and check())

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def _chat(self, llm: Llama, messages: list[dict], schema: dict, *, max_tokens: int,
              temperature: float, seed: int, repeat_penalty: float) -> tuple[str, Usage]:
        with self._lock:
            before = llm.input_ids[: llm.n_tokens].tolist()
            try:
                llama_cpp.llama_perf_context_reset(llm.ctx)
            except AttributeError:  # pragma: no cover - older bindings
                pass
            started = time.perf_counter()
            pieces: list[str] = []
            emitted = 0
            try:
                # Streamed so that an interrupt (job cancelled, stage deadline, shutdown) can
                # end the answer between two tokens: the chat API has no stopping criteria.
                for chunk in llm.create_chat_completion(
                        messages=messages, grammar=self._grammar(schema),
                        max_tokens=max_tokens, temperature=temperature, seed=seed,
                        repeat_penalty=repeat_penalty, stream=True):
                    delta = chunk["choices"][0].get("delta") or {}
                    if delta.get("content"):
                        pieces.append(delta["content"])
                        emitted += 1
                    if self._interrupted(None, None):
                        break
            except (ValueError, RuntimeError) as exc:  # context overflow, decode failure
                raise LLMError(str(exc)) from None
            wall_s = time.perf_counter() - started
            try:
                # Ground truth from llama.cpp: prompt tokens actually evaluated this call.
                perf = llama_cpp.llama_perf_context(llm.ctx)
                prompt_eval_s = perf.t_p_eval_ms / 1000.0
                prompt_tokens = max(0, llm.n_tokens - perf.n_eval)
                cached = max(0, prompt_tokens - perf.n_p_eval)
            except AttributeError:  # pragma: no cover - bindings without perf counters
                prompt_eval_s = wall_s
                prompt_tokens = max(0, llm.n_tokens - emitted)
                cached = _common_prefix_len(before, llm.input_ids[:prompt_tokens].tolist())
        return "".join(pieces), Usage(prompt_tokens=prompt_tokens, completion_tokens=emitted,
                                      cached_tokens=cached, prompt_eval_s=prompt_eval_s,
                                      generate_s=max(0.0, wall_s - prompt_eval_s))

    def complete_json(self, messages: list[dict], schema: dict, *, max_tokens: int,
                      temperature: float, seed: int, repeat_penalty: float) -> tuple[str, Usage]:
        return self._chat(self._llm, messages, schema, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, repeat_penalty=repeat_penalty)

    def has_vision(self) -> bool:
        return self._vision is not None

    def describe_image_json(self, image: Any, prompt: str, schema: dict, *, max_tokens: int,
                            temperature: float = 0.1, seed: int = 0,
                            repeat_penalty: float = 1.1) -> tuple[str, Usage]:
        if self._vision is None:
            raise LLMError("no vision model is configured")
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        data_uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_uri}},
            {"type": "text", "text": prompt}]}]
        return self._chat(self._vision, messages, schema, max_tokens=max_tokens,
                          temperature=temperature, seed=seed, repeat_penalty=repeat_penalty)

    def set_threads(self, threads: int) -> None:
        """Generate with ``threads`` CPU threads from the next call on (prompt reading
        keeps its own count). The pool lowers it when a second worker shares the cores."""
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        with self._lock:
            for llm in (self._llm, self._vision):
                if llm is not None:
                    llm.n_threads = llm.context_params.n_threads = threads
                    llm._ctx.set_n_threads(threads, llm.n_threads_batch)

    def close(self) -> None:
        for smpl in self._grammar_samplers.values():
            llama_cpp.llama_sampler_free(smpl)
        self._grammar_samplers.clear()
        for llm in (self._llm, self._vision):
            if llm is not None:
                llm.close()
        self._vision = None


# llama-cpp-python's converter lets a JSON string hold raw control characters
# (char ::= [^"\\] ...); JSON forbids them, and "Invalid control character" failed whole
# cases. The rule llama.cpp's own converter writes excludes them.
_LOOSE_CHAR_RULE = 'char ::= [^"\\\\]'
_JSON_CHAR_RULE = 'char ::= [^"\\\\\\x7F\\x00-\\x1F]'


def schema_grammar(schema_json: str) -> str:
    """The GBNF grammar of a JSON schema, strings without raw control characters."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    gbnf = json_schema_to_gbnf(schema_json)
    return gbnf.replace(_LOOSE_CHAR_RULE, _JSON_CHAR_RULE)


def load_runtime(llm: LLMSettings, *, threads: int,
                 cache_dir: Path | None = None) -> LlamaRuntime:
    """The configured model(s), loaded; ``ModelUnavailable`` says what is missing."""
    model_path = resolve_model_path(llm.model_path)
    if model_path is None:
        raise ModelUnavailable("llm.model_path is empty: no model is configured")
    vision = resolve_model_path(llm.vision_model_path)
    mmproj = resolve_model_path(llm.mmproj_path)
    return LlamaRuntime(model_path, n_ctx=llm.n_ctx, threads=threads, seed=llm.seed,
                        vision_model_path=vision, mmproj_path=mmproj, cache_dir=cache_dir)
