"""A real headless Chromium renders /docs and /redoc with no request leaving 127.0.0.1.

Needs Debian's chromium (/usr/bin/chromium) and the PyPI package playwright (its wheel
ships the driver; no `playwright install`). Screenshots go to /tmp for a person to look at.
Takes a few seconds.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import CHROMIUM, chromium
from medmitra.api.openapi import build_openapi

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="needs Debian's chromium at /usr/bin/chromium "
                              "(apt-get install -y chromium)"),
]

ROOT = Path(__file__).resolve().parents[1]
RENDER_TIMEOUT_MS = 20_000
SCREENSHOT_DIR = Path(tempfile.gettempdir())
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


@pytest.fixture(scope="module")
def base_url(docs_server_url: str) -> str:
    return docs_server_url


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


class PageLog:
    """Everything a page asked for or complained about."""

    def __init__(self, page) -> None:
        self.requests: list[str] = []
        self.failed: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.url} {r.failure}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # CSP violations and failed loads are reported as console errors.
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def assert_local_only(self, base_url: str) -> None:
        origin = urlsplit(base_url)
        assert self.requests, "the page made no requests at all?"
        for url in self.requests:
            inner = url.removeprefix("blob:")  # ReDoc's search worker is a blob: of this page
            parts = urlsplit(inner)
            if parts.scheme == "data":
                continue
            assert (parts.scheme, parts.hostname, parts.port) == \
                (origin.scheme, "127.0.0.1", origin.port), url
        assert not self.failed, self.failed
        assert not self.errors, self.errors


def _operation_count() -> int:
    return sum(1 for item in build_openapi()["paths"].values() for m in item
               if m in HTTP_METHODS)


def test_swagger_ui_renders_offline(browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(RENDER_TIMEOUT_MS)
    log = PageLog(page)
    page.goto(f"{base_url}/docs", wait_until="networkidle")
    page.wait_for_selector(".opblock", timeout=RENDER_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")

    assert page.locator(".opblock").count() == _operation_count()
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/cases/create_case" in [p.replace("\u200b", "") for p in paths]
    assert page.locator(".opblock-summary-path", has_text="create_case").first.is_visible()
    assert page.locator(".info h1.title").inner_text().startswith("MedMitra Edge API")
    assert page.get_by_role("button", name=re.compile("Authorize")).is_visible()
    # Open one operation: its multipart form fields render from the document.
    page.locator(".opblock-summary-path[data-path='/cases/create_case']").click()
    assert page.locator(".opblock.is-open").get_by_text("radiology_files").first.is_visible()
    # The default validator badge would call validator.swagger.io.
    assert page.locator("img[src*='validator']").count() == 0
    page.screenshot(path=str(SCREENSHOT_DIR / "medmitra-docs-swagger.png"))
    log.assert_local_only(base_url)
    page.close()


def test_redoc_renders_offline(browser, base_url: str) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(RENDER_TIMEOUT_MS)
    log = PageLog(page)
    page.goto(f"{base_url}/redoc", wait_until="networkidle")
    title = page.locator("h1").first
    title.wait_for(timeout=RENDER_TIMEOUT_MS)
    page.wait_for_load_state("networkidle")

    assert title.inner_text().startswith("MedMitra Edge API")
    assert page.locator("h2", has_text="Create a case, optionally with files").is_visible()
    for tag in ("Cases", "Files", "Analysis", "System", "Auth"):
        assert page.locator(".menu-content").get_by_text(tag, exact=True).first.is_visible()
    # No remote images anywhere (ReDoc's footer logo came from its CDN), and the
    # "API docs by Redocly" footer link is hidden.
    remote_imgs = page.eval_on_selector_all(
        "img", "els => els.map(e => e.src).filter(s => s && !s.startsWith(location.origin))")
    assert remote_imgs == []
    assert not page.locator("a[href^='https://redocly.com']").first.is_visible()
    page.screenshot(path=str(SCREENSHOT_DIR / "medmitra-docs-redoc.png"))
    log.assert_local_only(base_url)
    page.close()
