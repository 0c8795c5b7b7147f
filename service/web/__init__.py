"""The web page and heatmap images (placeholder router until the page lands)."""

from fastapi import APIRouter

router = APIRouter()
