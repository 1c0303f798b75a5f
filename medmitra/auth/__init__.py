"""Supabase-compatible bearer tokens: verification (HS256 secret, JWKS by kid) and issuing."""

from medmitra.auth.jwt import Principal, TokenVerifier, issue_token
from medmitra.auth.keys import load_or_create_secret

__all__ = ["Principal", "TokenVerifier", "issue_token", "load_or_create_secret"]
