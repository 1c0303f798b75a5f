"""The clinician web app: a static shell and small ES modules under /app/, calling the same
JSON API and /auth/v1 sign-in as every other client (see docs/web-app.md)."""

from medmitra.web.routes import register_web, wants_html

__all__ = ["register_web", "wants_html"]
