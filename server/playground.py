"""The playground page (`/`, `/playground`): static files that call this server's own API from
the browser, with the user's key. Nothing here runs per API request."""

from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from server.errors import APIError

router = APIRouter(include_in_schema=False)
PAGE = Path(__file__).with_name("playground")
FILES = {"app.js": "text/javascript", "style.css": "text/css"}


@router.get("/")
@router.get("/playground")
async def page() -> FileResponse:
    return FileResponse(PAGE / "index.html", media_type="text/html")


@router.get("/playground/{name}")
async def asset(name: str) -> FileResponse:
    if name not in FILES:
        raise APIError(HTTPStatus.NOT_FOUND, f"no file {name!r}", "name", "NotFoundError")
    return FileResponse(PAGE / name, media_type=FILES[name])
