"""The page at ``/`` and its static assets under ``/static/`` (plain files, no build step).

Explicit routes rather than a ``StaticFiles`` mount so the router can be included like any other;
only the files shipped in ``static/`` are served, so no path from the URL reaches the file system.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from service.web.render import colormap_json

STATIC_DIR = Path(__file__).parent / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# Revalidate on every load: the assets are tiny and must never be stale after an upgrade.
NO_CACHE = {"Cache-Control": "no-cache"}

router = APIRouter(include_in_schema=False)


@router.get("/", response_class=HTMLResponse)
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=MEDIA_TYPES[".html"], headers=NO_CACHE)


@router.get("/static/colormap.json")
def colormap() -> JSONResponse:
    """The colormap shared by the page and the PNG renderer (defined once, in render.py)."""
    return JSONResponse(colormap_json(), headers=NO_CACHE)


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    shipped = {p.name: p for p in STATIC_DIR.iterdir() if p.suffix in MEDIA_TYPES}
    if name not in shipped:
        raise HTTPException(404, f"no static file {name!r}; available: {', '.join(sorted(shipped))}")
    path = shipped[name]
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=NO_CACHE)


EXAMPLES_DIR = STATIC_DIR / "examples"
EXAMPLE_MEDIA_TYPES = {".png": "image/png", ".json": "application/json"}


@router.get("/static/examples/{name}")
def example_file(name: str) -> FileResponse:
    """The page's example scenes (written by scripts/make_examples.py)."""
    shipped = {p.name: p for p in EXAMPLES_DIR.iterdir() if p.suffix in EXAMPLE_MEDIA_TYPES}
    if name not in shipped:
        raise HTTPException(404, f"no example file {name!r}; available: {', '.join(sorted(shipped))}")
    path = shipped[name]
    return FileResponse(path, media_type=EXAMPLE_MEDIA_TYPES[path.suffix], headers=NO_CACHE)
