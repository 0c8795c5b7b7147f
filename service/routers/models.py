"""``GET /models``: the models the live workers hold, with the accepted range of every option."""

from __future__ import annotations

from fastapi import APIRouter

from service.catalog import option_ranges
from service.dependencies import AppSettings, Served
from service.schemas import UNAUTHORIZED, ModelsOut

router = APIRouter(tags=["models"], responses=UNAUTHORIZED)


@router.get("/models", response_model=ModelsOut)
async def list_models(served: Served, settings: AppSettings) -> ModelsOut:
    """Patch grid, image size, context length and layer counts of each model, and the option ranges."""
    serving = await served.read()
    models = [
        {**info.model_dump(), "options": option_ranges(info, settings)}
        for _, info in sorted(serving.models.items())
    ]
    return ModelsOut(models=models, default=serving.default(settings))
