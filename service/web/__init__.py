"""The web page and its static assets (``service.web.router``), and the heatmap renderer (render.py)."""

from service.web.pages import router

__all__ = ["router"]
