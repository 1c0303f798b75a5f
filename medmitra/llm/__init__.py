"""Local LLM runtime: the interface (runtime.py) and the llama.cpp backend (llama.py).

Only ``medmitra.llm.llama`` imports ``llama_cpp``; everything else talks to the
``LLMRuntime`` protocol so unit tests can use ``FakeRuntime``.
"""

from medmitra.llm.runtime import (FakeRuntime, LLMError, LLMRuntime, ModelUnavailable, Usage,
                                  model_info)

__all__ = ["FakeRuntime", "LLMError", "LLMRuntime", "ModelUnavailable", "Usage", "model_info"]
