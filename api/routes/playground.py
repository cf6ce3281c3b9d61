"""GET /: the playground, one static page (HTML, CSS, JS from api/playground/, no build step).

Everything it needs comes from this server: no CDN, no web fonts, so it works offline. The
Content-Security-Policy says so to the browser as well (only this origin; images from data:
URLs, which is how generated images arrive).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import envelope

router = APIRouter(include_in_schema=False)

PLAYGROUND_DIR = Path(__file__).resolve().parent.parent / "playground"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
"""The only files served besides the page (a fixed list: no path from the URL reaches the disk)."""
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html", headers=HEADERS)


@router.get("/playground/{name}")
async def asset(name: str):
    if name not in ASSETS:
        return envelope(404, "not_found", f"no playground file {name}")
    return FileResponse(PLAYGROUND_DIR / name, media_type=ASSETS[name], headers=HEADERS)
