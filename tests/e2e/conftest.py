"""Browser fixtures: Debian's Chromium driven by Playwright (PyPI), against the real stack.

Playwright's own browser download cannot work offline, so the tests run the system binary
(`FLUXSERVE_E2E_CHROMIUM`, default /usr/bin/chromium) and skip, saying how to enable them,
when it is missing. A failing test leaves a screenshot in build/e2e/failures/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.paths import BUILD_DIR

CHROMIUM = Path(os.environ.get("FLUXSERVE_E2E_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
HOW_TO_ENABLE = (
    "browser tests need Debian's Chromium at /usr/bin/chromium: run `apt-get update && apt-get install -y "
    "chromium` as root (.ci/run does this), or point FLUXSERVE_E2E_CHROMIUM at a Chromium binary"
)
SCREENSHOTS = BUILD_DIR / "e2e"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


# Module scope: Playwright's sync API keeps an event loop running in this thread while it lives,
# and the tests after this folder (asyncio.run in unit tests) need none.
@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.exists() or shutil.which(str(CHROMIUM)) is None:
        pytest.skip(HOW_TO_ENABLE)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: `make install` installs the test extra")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request) -> Iterator[object]:
    # The page's CSP forbids eval, which Playwright's wait_for_function and evaluate use to run test code.
    context = browser.new_context(viewport=DESKTOP, bypass_csp=True)
    pg = context.new_page()
    messages: list[str] = []
    pg.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    pg.console_messages = messages  # type: ignore[attr-defined]
    yield pg
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        SCREENSHOTS.joinpath("failures").mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / "failures" / f"{request.node.name}.png"
        pg.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}\nbrowser console:\n" + "\n".join(messages))
    context.close()
