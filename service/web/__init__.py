"""The web page, its static assets and the heatmap PNG endpoint, as one router: ``service.web.router``."""

from fastapi import APIRouter

from service.web.heatmap import router as heatmap_router
from service.web.pages import router as pages_router

router = APIRouter()
router.include_router(pages_router)
router.include_router(heatmap_router)

__all__ = ["router"]
