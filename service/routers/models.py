"""``GET /models``: the models the live workers hold, with the accepted range of every option."""

from __future__ import annotations

from fastapi import APIRouter

from service.catalog import default_model, option_ranges, served_models
from service.dependencies import AppSettings, Queue
from service.schemas import UNAUTHORIZED, ModelsOut

router = APIRouter(tags=["models"], responses=UNAUTHORIZED)


@router.get("/models", response_model=ModelsOut)
async def list_models(queue: Queue, settings: AppSettings) -> ModelsOut:
    """Patch grid, image size, context length and layer counts of each model, and the option ranges."""
    served = served_models(await queue.workers())
    models = [
        {**info.model_dump(), "options": option_ranges(info, settings)} for _, info in sorted(served.items())
    ]
    return ModelsOut(models=models, default=default_model(served, settings))
