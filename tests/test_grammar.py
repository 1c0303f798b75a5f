"""The decoding grammar keeps raw control characters out of JSON strings (issue 9: cases
failed on "Invalid control character at character 32")."""

from __future__ import annotations

import json

from medmitra.llm.llama import schema_grammar
from medmitra.pipeline import schemas


def test_every_stage_grammar_forbids_raw_control_characters() -> None:
    from llama_cpp import LlamaGrammar

    for schema in schemas.ALL_SCHEMAS:
        gbnf = schema_grammar(json.dumps(schemas.fit_schema(schema, 256)))
        (char,) = [ln for ln in gbnf.splitlines() if ln.startswith("char ::=")]
        assert char.startswith('char ::= [^"\\\\\\x7F\\x00-\\x1F]'), char
        LlamaGrammar.from_string(gbnf, verbose=False)   # llama.cpp accepts it
