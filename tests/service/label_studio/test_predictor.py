"""Predictor pieces that need no queue: the annotator's box, from Label Studio's percent to pixels."""

from __future__ import annotations

import asyncio

import pytest

from attribution.selections import Box
from service.label_studio import predictor as predictor_module
from service.label_studio.config import parse_label_config
from service.label_studio.predictor import Predictor
from service.label_studio.tasks import TaskWork, parse_context
from service.settings import Settings
from tests.service.conftest import png_bytes
from tests.service.label_studio.scenario import DOCUMENTED


@pytest.mark.parametrize(
    ("value", "pixels"),
    [
        ({"x": 50, "y": 0, "width": 50, "height": 100}, (48.0, 0.0, 96.0, 64.0)),  # the right half
        ({"x": 25, "y": 50, "width": 12.5, "height": 25}, (24.0, 32.0, 36.0, 48.0)),
    ],
)
def test_interactive_box_is_converted_to_pixels_of_the_image(
    monkeypatch: pytest.MonkeyPatch, value: dict, pixels: tuple
) -> None:
    """Label Studio gives x, y, width, height in percent of the image; the job takes x0, y0, x1, y1 in
    pixels of the original (here 96 x 64: x scales by the width, y by the height)."""
    built = []

    def build_call_job(call, served, settings, size, owner):  # the request the job would be built from
        built.append((call, size))
        return object()

    monkeypatch.setattr(predictor_module, "build_call_job", build_call_job)
    config = parse_label_config(DOCUMENTED)
    box = {"id": "b", "from_name": "region", "to_name": "image", "type": "rectanglelabels", "value": value}
    context = parse_context({"result": [box]}, config)
    predictor = Predictor(queue=None, settings=Settings(), owner=None, setup=None)
    work = TaskWork(task={"id": 7, "data": {"image": "/data/upload/1/x.png", "caption": "a red square"}})
    predictor._read_tasks([work], config, context)
    work.image = png_bytes(96, 64)
    asyncio.run(predictor._build_job(work, served={}))
    assert work.error is None, work.error
    ((call, size),) = built
    assert size == (96, 64)
    ((selection,),) = [c.selections for c in call.captions]
    assert isinstance(selection, Box)
    assert (selection.x0, selection.y0, selection.x1, selection.y1) == pytest.approx(pixels)
