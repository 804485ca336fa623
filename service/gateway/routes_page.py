"""GET /: a page to try the service, and /static/: its CSS and JavaScript (shipped as package data).

The page is plain HTML, CSS and JavaScript modules with no build step and nothing fetched from elsewhere
(its Content-Security-Policy says so); it uses the public native API only, as any client would.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
# Same origin only; the results are blob: URLs (shown, downloaded, and read back to reuse them).
CSP = (
    "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=headers)


def mount_page(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
