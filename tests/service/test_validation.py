"""``service.validation`` in process: the job a valid request builds, and each check's refusal.

No HTTP and no queue: ``build_job`` and ``image_size`` are called with a parsed request, the tiny
model's ``ModelInfo`` (as its worker advertises it) and explicit limits, so every limit is tested at
its edge. tests/service/test_invalid_requests.py checks the same refusals end to end over HTTP.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.selections import Box, Span, TokenRange
from service import validation
from service.catalog import ModelInfo
from service.errors import RequestInvalid
from service.jobs import CaptionRequest, JobRequest, JobStatus
from service.schemas import CaptionIn, ExplainInput, ExplainOptions, SelectionIn
from service.settings import Settings
from service.validation import build_job, image_size
from tests.service.conftest import png_bytes

MODEL = "exclip-tiny"  # 3 blocks per tower, 32x32 input, 4x4 grid of 8x8 patches, context 77
LIMITS = Settings(max_captions=3, max_selections=4, max_steps=10, max_caption_chars=40, max_pixels=10_000)
SIZE = (64, 48)  # the model sees about its centre 48x48: crop box x 7.62..56.38, y 0..48


@pytest.fixture(scope="module")
def served(tiny_loaded) -> dict[str, ModelInfo]:
    return {MODEL: ModelInfo.model_validate(tiny_loaded.describe())}


def request(*captions: str | CaptionRequest, **options) -> ExplainInput:
    items = [c if isinstance(c, CaptionRequest) else CaptionRequest(c) for c in captions or ("a dog",)]
    return ExplainInput(image=b"", captions=items, options=ExplainOptions(**options))


def caption(text: str, *selections: dict) -> CaptionRequest:
    return CaptionIn(text=text, selections=[SelectionIn(**s) for s in selections]).to_request()


def refusal(served: dict[str, ModelInfo], inp: ExplainInput, limits: Settings = LIMITS) -> str:
    with pytest.raises(RequestInvalid) as info:
        build_job(inp, served, limits, SIZE, None)
    assert info.value.status == 422
    return str(info.value)


def test_a_valid_request_builds_its_typed_job(served):
    text = "a dog on the grass"  # tokens: SOT a dog on the grass EOT
    inp = request(
        caption(text, {"span": (2, 5)}, {"tokens": (1, 3)}, {"box": (8.5, 0, 20, 10)}),
        "a cat",
        steps=4,
        precision="bfloat16",
        format="base64",
        text_layer=0,
        image_layer=1,
    )
    job = build_job(inp, served, LIMITS, SIZE, owner="owner-tag")
    assert job.request == JobRequest(
        model=MODEL,
        text_layer=0,
        image_layer=1,
        steps=4,
        precision="bfloat16",
        format="base64",
        captions=(
            CaptionRequest(text, (Span(2, 5), TokenRange(1, 3), Box(8.5, 0, 20, 10))),
            CaptionRequest("a cat", ()),
        ),
    )
    assert (job.owner, job.status) == ("owner-tag", JobStatus.QUEUED)
    assert JobRequest.from_dict(job.request.to_dict()) == job.request  # what the worker reads back


def test_unset_options_take_the_defaults(served):
    job = build_job(request(), served, LIMITS, SIZE, None)
    assert (job.request.model, job.request.text_layer, job.request.image_layer) == (MODEL, 2, 2)
    assert (job.request.steps, job.request.precision, job.request.format) == (10, "float32", "json")
    assert job.owner is None


def test_unset_layers_take_the_model_cards_blocks(served):
    info = served[MODEL].model_copy(update={"default_text_layer": 0, "default_image_layer": 1})
    job = build_job(request(), {MODEL: info}, LIMITS, SIZE, None)
    assert (job.request.text_layer, job.request.image_layer) == (0, 1)


def test_no_model_named_means_the_configured_one_else_the_first_served(served):
    two = {MODEL: served[MODEL], "a-model": served[MODEL].model_copy(update={"name": "a-model"})}
    assert build_job(request(), two, LIMITS.model_copy(update={"model": MODEL}), SIZE, None).model == MODEL
    assert (
        build_job(request(), two, LIMITS.model_copy(update={"model": "gone"}), SIZE, None).model == "a-model"
    )


def test_an_unknown_model_is_refused_naming_the_served_ones(served):
    message = refusal(served, request(model="ViT-nope"))
    assert "unknown model 'ViT-nope'" in message and MODEL in message
    assert "unknown model None" in refusal({}, request())  # no worker serves anything


@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_caption_count_limit(served, n):
    inp = ExplainInput(image=b"", captions=[CaptionRequest("a dog")] * n, options=ExplainOptions())
    if 1 <= n <= LIMITS.max_captions:
        assert len(build_job(inp, served, LIMITS, SIZE, None).request.captions) == n
    else:
        assert f"{n} captions given; allowed: 1..3" in refusal(served, inp)


@pytest.mark.parametrize("n", [4, 5])
def test_selection_count_limit_counts_over_all_captions(served, n):
    first = caption("a dog", *[{"tokens": (1, 2)}] * 2)
    second = caption("a cat", *[{"span": (2, 5)}] * (n - 2))
    if n <= LIMITS.max_selections:
        job = build_job(request(first, second), served, LIMITS, SIZE, None)
        assert sum(len(c.selections) for c in job.request.captions) == n
    else:
        assert f"{n} selections given; allowed: at most 4" in refusal(served, request(first, second))


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(-3, 14))
def test_steps_are_accepted_exactly_within_1_to_max(served, steps):
    inp = request(steps=steps)
    if 1 <= steps <= LIMITS.max_steps:
        assert build_job(inp, served, LIMITS, SIZE, None).request.steps == steps
    else:
        assert refusal(served, inp) == f"steps {steps} is out of range: use 1..10"


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["text_layer", "image_layer"]), layer=st.integers(-5, 8))
def test_layers_are_accepted_exactly_within_the_models_blocks(served, field, layer):
    inp = request(**{field: layer})
    if 0 <= layer < 3:
        assert getattr(build_job(inp, served, LIMITS, SIZE, None).request, field) == layer
    else:
        message = refusal(served, inp)
        assert message.startswith(f"{field} {layer} is out of range: this model has 3 blocks, use 0..2")


@pytest.mark.parametrize(
    ("captions", "expected"),
    [
        (["a dog", "x" * 40], None),  # exactly EXCLIP_MAX_CAPTION_CHARS
        (["a dog", "x" * 41], "caption 1: caption has 41 characters; the limit is 40"),
        (["   "], "caption 0: caption is empty"),
        (["a <end_of_text> dog"], "caption 0: caption contains '<end_of_text>'"),
    ],
)
def test_caption_text_limits(served, captions, expected):
    if expected is None:
        assert [
            c.text for c in build_job(request(*captions), served, LIMITS, SIZE, None).request.captions
        ] == captions
    else:
        assert refusal(served, request(*captions)).startswith(expected)


@pytest.mark.parametrize(("words", "ok"), [(6, True), (7, False)])
def test_captions_are_counted_against_the_models_context_length(served, words, ok):
    """A model with an 8-token context takes SOT + 6 words + EOT and no more."""
    short = {MODEL: served[MODEL].model_copy(update={"context_length": 8})}
    inp = request("dog " * words)
    if ok:
        assert build_job(inp, short, LIMITS, SIZE, None).request.captions[0].text == "dog " * words
    else:
        message = refusal(short, inp)
        assert message == (
            "caption 0: caption has 9 tokens including start and end tokens; "
            "the model's context length is 8 tokens: shorten the caption"
        )


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"span": (0, 5)}, None),  # "a dog" has 5 characters
        ({"span": (0, 6)}, "span 0:6 is out of range: the caption has 5 characters"),
        ({"span": (1, 2)}, "span 1:2 covers no token"),  # the space between the words
        ({"tokens": (0, 4)}, None),  # SOT a dog EOT
        ({"tokens": (1, 5)}, "token range 1:5 is out of range: the caption has 4 tokens"),
        # The model sees the centre of the 64x48 image: crop box x 7.62..56.38, y 0..48.
        ({"box": (0, 0, 8, 48)}, None),
        ({"box": (56, 0, 64, 48)}, None),
        ({"box": (0, 0, 7.5, 48)}, "does not overlap the part of the image the model sees"),
        ({"box": (56.5, 0, 64, 48)}, "does not overlap the part of the image the model sees"),
        ({"box": (10, 48, 20, 60)}, "lies outside the 64x48 image"),
    ],
)
def test_selections_are_checked_against_the_caption_and_the_image(served, selection, expected):
    inp = request("a cat", caption("a dog", selection))
    if expected is None:
        assert len(build_job(inp, served, LIMITS, SIZE, None).request.captions[1].selections) == 1
    else:
        message = refusal(served, inp)
        assert message.startswith("caption 1: ") and expected in message


def test_image_size_reads_the_header_within_the_pixel_limit():
    assert image_size(png_bytes(64, 48), LIMITS) == (64, 48)
    assert image_size(png_bytes(100, 100), LIMITS) == (100, 100)  # exactly EXCLIP_MAX_PIXELS
    with pytest.raises(RequestInvalid, match="101x100 = 10100 pixels; the limit is 10000") as info:
        image_size(png_bytes(101, 100), LIMITS)
    assert info.value.status == 422
    with pytest.raises(RequestInvalid, match="image"):
        image_size(b"hello, not a picture", LIMITS)


def test_warm_up_loads_what_the_first_request_would(served):
    validation._tokenizer.cache_clear()
    validation._transform.cache_clear()
    validation.warm_up(served)
    assert validation._tokenizer.cache_info().currsize == 1
    assert validation._transform.cache_info().currsize == 1
    build_job(request(), served, LIMITS, SIZE, None)
    assert validation._tokenizer.cache_info().misses == 1  # the request found both ready
    assert validation._transform.cache_info().misses == 1
