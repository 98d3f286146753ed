"""Finding features to steer with: search an SAE's catalogue, read a feature's card, or run a
text through the model and see which features light up on it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from features.catalogue import CLOSE, Catalogue
from features.sae import SAE
from features.vectors import saes_only
from server.errors import APIError
from server.state import SteeringState

router = APIRouter()
MAX_TEXT_TOKENS = 2048


class TextSearch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=20_000, description="text to run through the model")
    top_k: int = Field(default=20, ge=1, le=200, description="how many features to return")


@dataclass(frozen=True)
class Catalogued:
    state: SteeringState
    sae: SAE
    catalogue: Catalogue


def catalogued(sae_id: str, raw_request: Request) -> Catalogued:
    """The SAE named in the path, which must be loaded and have a catalogue (404 otherwise)."""
    state: SteeringState = raw_request.app.state.steering
    saes = saes_only(state.saes)
    sae = saes.get(sae_id)
    if sae is None:
        raise APIError(HTTPStatus.NOT_FOUND, f"no SAE {sae_id!r}; loaded SAEs: {sorted(saes)}", "sae", "NotFoundError")
    catalogue = state.catalogue(sae_id)
    if catalogue is None:
        raise APIError(HTTPStatus.NOT_FOUND, f"SAE {sae_id!r} has no feature catalogue", "sae", "NotFoundError")
    return Catalogued(state, sae, catalogue)


@router.get("/v1/saes/{sae_id}/features")
async def list_features(
    found: Annotated[Catalogued, Depends(catalogued)],
    q: Annotated[str | None, Query(max_length=200, description="what to search for: a concept, a category, words")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
    offset: Annotated[int, Query(ge=0)] = 0,
    min_similarity: Annotated[
        float, Query(ge=-1, le=1, description="list only features at least this close to q (labelled catalogues)")
    ] = CLOSE,
) -> dict:
    catalogue = found.catalogue
    if not q:
        return {"object": "list", "data": _with_effects(found.sae, [catalogue.summary(i) for i in range(offset, min(offset + limit, len(catalogue.cards)))])}
    by_meaning = catalogue.embeddings is not None  # else by words (Catalogue.search)
    data = _with_effects(found.sae, (await asyncio.to_thread(catalogue.search, q, limit + offset, min_similarity))[offset:])
    listing = {"object": "list", "search": "meaning" if by_meaning else "words", "data": data}
    if by_meaning and not data and offset == 0:
        listing["message"] = f"SAE {found.sae.id!r}: " + await asyncio.to_thread(catalogue.nothing_close, q, min_similarity)
    return listing


@router.get("/v1/saes/{sae_id}/features/{index}")
async def get_feature(index: int, found: Annotated[Catalogued, Depends(catalogued)]) -> dict:
    d_sae = found.sae.cfg.d_sae
    if not 0 <= index < d_sae:
        message = f"index {index} out of range for SAE {found.sae.id!r}: 0 <= index < {d_sae}"
        raise APIError(HTTPStatus.NOT_FOUND, message, "index", "NotFoundError")
    return {"object": "sae.feature", "sae": found.sae.id, **_with_effects(found.sae, [found.catalogue.card(index)])[0]}


def _with_effects(sae: SAE, rows: list[dict]) -> list[dict]:
    """Rows with each calibrated feature's recommendation and effect (server/calibrate.py)."""
    return sae.calibrations.annotate(rows) if sae.calibrations is not None else rows


@router.post("/v1/saes/{sae_id}/features/search")
async def search_by_text(body: TextSearch, found: Annotated[Catalogued, Depends(catalogued)]) -> dict:
    reader = await asyncio.to_thread(found.state.reader, found.sae.cfg.layer)
    tokens = reader.tokens(body.text)
    if len(tokens) > MAX_TEXT_TOKENS:
        message = f"text is {len(tokens)} tokens; at most {MAX_TEXT_TOKENS} are searched"
        raise APIError(HTTPStatus.BAD_REQUEST, message, "text")
    data = await asyncio.to_thread(found.catalogue.active_features, found.sae, reader, tokens, body.top_k)
    return {"object": "list", "data": data}
