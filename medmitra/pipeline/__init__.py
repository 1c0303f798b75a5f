"""Analysis pipeline: extraction of uploaded files, LLM stages, prompts and schemas."""
