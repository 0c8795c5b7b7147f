"""Invalid requests get a specific 4xx and enqueue nothing (stream, job records and counters unchanged)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from attribution.explainer import Completeness
from tests.service.conftest import b64, png_bytes

IMAGE = png_bytes(48, 48, seed=9)
WIDE = png_bytes(96, 48, seed=9)  # the model sees the centre 48x48: crop box x 24..72
UNCLOSED_MULTIPART = b'--XX\r\nContent-Disposition: form-data; name="caption"\r\n\r\na dog'


def form(data: dict, image: bytes | None = IMAGE) -> dict:
    files = {"image": ("x.png", image, "image/png")} if image is not None else None
    return {"data": data, "files": files}


def body(**fields) -> dict:
    return {"json": {"image": b64(IMAGE), "captions": ["a dog"], **fields}}


CASES = {
    "missing image": (form({"caption": "a dog"}, image=None), 422, "missing image"),
    "not an image": (form({"caption": "a dog"}, image=b"hello, not a picture"), 422, "not an image"),
    "missing caption": (form({}), 422, "missing caption"),
    "unknown model": (form({"caption": "a dog", "model": "ViT-nope"}), 422, "unknown model 'ViT-nope'"),
    "text layer out of range": (form({"caption": "a dog", "text_layer": "3"}), 422, "use 0..2"),
    "image layer negative": (body(image_layer=-1), 422, "image_layer -1 is out of range"),
    "steps zero": (form({"caption": "a dog", "steps": "0"}), 422, "use 1..100"),
    "steps too many": (body(steps=101), 422, "use 1..100"),
    "steps not a number": (form({"caption": "a dog", "steps": "ten"}), 422, "steps"),
    "bad precision": (body(precision="float64"), 422, "precision"),
    "caption too long": (body(captions=["dog " * 80]), 422, "context length is 77"),
    "empty caption": (body(captions=["   "]), 422, "caption 0"),
    "too many captions": (body(captions=["a dog"] * 17), 422, "EXCLIP_MAX_CAPTIONS"),
    "malformed span": (form({"caption": "a dog", "span": "a:b"}), 422, "span 'a:b' is malformed"),
    "span beyond caption": (form({"caption": "a dog", "span": "0:40"}), 422, "the caption has 5 characters"),
    "span on missing caption": (form({"caption": "a dog", "span": "3:0:1"}), 422, "refers to caption 3"),
    "malformed token range": (form({"caption": "a dog", "token_range": "1-2"}), 422, "malformed"),
    "token range beyond tokens": (
        body(captions=[{"text": "a dog", "selections": [{"tokens": [1, 9]}]}]),
        422,
        "the caption has 4 tokens",
    ),
    "malformed box": (form({"caption": "a dog", "box": "1,2,3"}), 422, "box '1,2,3' is malformed"),
    "empty box": (form({"caption": "a dog", "box": "30,30,10,10"}), 422, "need x0 < x1"),
    "box outside image": (
        form({"caption": "a dog", "box": "100,100,200,200"}),
        422,
        "outside the 48x48 image",
    ),
    "two selection kinds": (
        body(captions=[{"text": "a dog", "selections": [{"span": [0, 1], "box": [0, 0, 1, 1]}]}]),
        422,
        "exactly one of span, tokens, box",
    ),
    "bad base64": (body(image="!!not base64!!"), 422, "not valid base64"),
    "base64 of text": (body(image=b64(b"plain text")), 422, "not an image"),
    "not JSON": (
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        400,
        "not valid JSON",
    ),
    "unknown JSON field": (body(colour="red"), 422, "colour"),
    "unknown form field": (
        form({"caption": "a dog", "captions": "x"}),
        422,
        "unknown form field(s) captions",
    ),
    "wrong content type": (
        {"content": b"a dog", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported content type",
    ),
    "negative wait": (body(wait=-1), 422, "wait"),
    "wait not a number": (
        form({"caption": "a dog", "wait": "NaN"}),
        422,
        "wait: Input should be a finite number",
    ),
    "infinite wait": (form({"caption": "a dog", "wait": "inf"}), 422, "finite number"),
    "caption too long offers no truncation": (body(captions=["dog " * 80]), 422, "shorten the caption"),
    "caption over the character limit": (body(captions=["a" * 1001]), 422, "the limit is 1000"),
    "quadratic-cleaning caption": (body(captions=["&" + "amp;" * 4000 + " dog"]), 422, "16005 characters"),
    "control-token text": (body(captions=["a photo <end_of_text> of a red ball"]), 422, "control tokens"),
    "control-token text, other case": (body(captions=["a <START_OF_TEXT> dog"]), 422, "control tokens"),
    "box outside the crop region": (
        form({"caption": "a dog", "box": "0,0,10,10"}, image=WIDE),
        422,
        "crop_box [24.0, 0.0, 72.0, 48.0]",
    ),
    "unclosed multipart body": (
        {"content": UNCLOSED_MULTIPART, "headers": {"content-type": "multipart/form-data; boundary=XX"}},
        400,
        "does not end with the closing boundary",
    ),
}


@pytest.mark.parametrize("endpoint", ["/explain", "/jobs"])
@pytest.mark.parametrize("case", list(CASES))
def test_invalid_request_is_refused_and_enqueues_nothing(stack, case, endpoint):
    kwargs, status, message = CASES[case]
    before = stack.queue_state()
    with stack.client() as c:
        r = c.post(endpoint, **kwargs)
    assert r.status_code == status, r.text
    assert message in str(r.json()["detail"])
    assert stack.queue_state() == before


def test_too_many_pixels_is_refused(stack):
    buf = io.BytesIO()
    Image.new("RGB", (7000, 6000)).save(buf, format="PNG")  # 42 M pixels > EXCLIP_MAX_PIXELS (40 M)
    before = stack.queue_state()
    with stack.client() as c:
        r = c.post("/explain", files={"image": ("big.png", buf.getvalue())}, data={"caption": "a dog"})
    assert r.status_code == 422 and "the limit is 40000000 pixels" in r.json()["detail"]
    assert stack.queue_state() == before


def test_oversized_upload_is_413_with_or_without_content_length(stack):
    big = b"\0" * 20_000_001  # EXCLIP_MAX_UPLOAD_BYTES is 20 000 000
    before = stack.queue_state()
    with stack.client() as c:
        declared = c.post("/explain", files={"image": ("big.png", big)}, data={"caption": "a dog"})

        def chunks():
            for i in range(0, len(big), 1 << 20):
                yield big[i : i + (1 << 20)]

        streamed = c.post("/explain", content=chunks(), headers={"content-type": "application/json"})
    for r in (declared, streamed):
        assert r.status_code == 413 and "EXCLIP_MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert "content-length" not in streamed.request.headers
    assert stack.queue_state() == before


# In-process checks of the HTTP surface (no worker needed): the app object itself, no queue traffic.


@pytest.fixture(scope="module")
def app_client():
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(redis_url=None, api_keys="k3y"))) as client:
        yield client


@pytest.mark.parametrize("path", ["/", "/healthz", "/readyz", "/static/app.js", "/openapi.json"])
def test_head_answers_like_get_without_a_body(app_client, path):
    get, head = app_client.get(path), app_client.head(path)
    assert head.status_code == get.status_code != 405
    assert head.content == b"" and head.headers["content-length"] == str(len(get.content))


@pytest.mark.parametrize("path", ["/", "/healthz", "/models", "/no-such-path"])
def test_security_headers_on_page_and_responses(app_client, path):
    headers = app_client.get(path).headers
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
    csp = headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    if path == "/":
        assert "script-src 'self'" in csp


@pytest.mark.parametrize("header", ["Bearer\tk3y", "Bearer   k3y", "bearer k3y", " Bearer k3y "])
def test_bearer_with_any_whitespace_is_accepted(app_client, header):
    assert app_client.get("/models", headers={"Authorization": header}).status_code == 200


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "missing API key"),
        ("Bearer", "malformed Authorization header"),
        ("Basic k3y", "malformed Authorization header"),
        ("Bearer\twrong", "invalid API key"),
    ],
)
def test_auth_failures_say_which(app_client, header, words):
    r = app_client.get("/models", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.json()["detail"].startswith(words)


def test_form_schema_is_generated_from_the_options_model(app_client):
    from service.schemas import PRECISIONS, ExplainOptions

    schema = app_client.get("/openapi.json").json()
    form = schema["paths"]["/explain"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(ExplainOptions.model_fields) <= set(form["properties"])
    assert form["properties"]["precision"]["enum"] == list(PRECISIONS)
    assert form["properties"]["text_layer"]["type"] == "integer"  # a form field is absent, never null


# Selections with an integer of more digits than Python's int() takes from a string (4300).
_HUGE_INTEGERS = st.tuples(
    st.sampled_from(["", "0:", "1:2:", "-"]),
    st.integers(4290, 4400),
    st.sampled_from(["", ":1", ":0:2", ",1,2,3"]),
).map(lambda t: t[0] + "9" * t[1] + t[2])


@given(
    field=st.sampled_from(["span", "token_range", "box"]),
    value=st.one_of(
        st.text(max_size=40),
        st.from_regex(r"-?\d{1,4}(:-?\d{1,4}){1,2}", fullmatch=True),
        st.from_regex(r"(\d:)?(-?\d{1,5}(\.\d*)?,){3}-?\d{1,5}(\.\d*)?", fullmatch=True),
        _HUGE_INTEGERS,
    ),
)
@example(field="span", value="0:" + "9" * 5000)
@example(field="token_range", value="9" * 5000 + ":0:2")
@example(field="box", value="9" * 5000 + ":1,2,3,4")
@settings(max_examples=300, deadline=None)
def test_any_selection_string_is_a_selection_or_a_422(field, value):
    from service.errors import RequestInvalid
    from service.parsing import _selection

    try:
        caption, selection = _selection(field, value)
    except RequestInvalid as exc:
        assert exc.status == 422 and str(exc) and len(str(exc)) < 600  # a huge value is not echoed whole
        return
    assert caption >= 0
    given = [v for v in (selection.span, selection.tokens, selection.box) if v is not None]
    assert len(given) == 1


@given(kind=st.sampled_from(["span", "tokens", "box"]), value=st.one_of(st.text(max_size=40), _HUGE_INTEGERS))
@example(kind="span", value="0:" + "9" * 5000)
@example(kind="tokens", value="9" * 5000 + ":1")
@settings(max_examples=200, deadline=None)
def test_any_heatmap_selection_string_is_a_selection_or_a_422(kind, value):
    from fastapi import HTTPException

    from service.routers.heatmap import selection_heatmap

    try:
        heat, outline = selection_heatmap(
            CAPTION_RESULT, **{"span": None, "tokens": None, "box": None, kind: value}
        )
    except HTTPException as exc:
        assert exc.status_code == 422 and exc.detail and len(exc.detail) < 600
        return
    assert heat.shape == (4, 4) and (outline is not None) == (kind == "box")


CAPTION_RESULT = {  # one caption of a result (as Explanation.to_dict gives it): "a dog", a 4x4 grid
    "caption": "a dog",
    "model": {"name": "exclip-tiny", "pretrained": None},
    "options": {},
    "tokens": [
        {"index": i, "text": text, "start": start, "end": end}
        for i, (text, start, end) in enumerate(
            [("<start_of_text>", 0, 0), ("a", 0, 1), ("dog", 2, 5), ("<end_of_text>", 5, 5)]
        )
    ],
    "image": {"width": 96, "height": 48, "crop_box": [24.0, 0.0, 72.0, 48.0], "patch_size": [12.0, 12.0]},
    "grid": {"rows": 4, "cols": 4},
    "interactions": [[[0.5] * 4] * 4] * 4,
    "cls": [0.0] * 4,
    "score": 0.1,
    "completeness": {f.name: 0.0 for f in dataclasses.fields(Completeness)},
    "selections": [],
}


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--span", "2:a", "span '2:a' is malformed"),
        ("--span", "5:2", "empty or negative"),
        ("--box", "1,2,3", "box '1,2,3' is malformed"),
    ],
)
def test_cli_checks_selections_with_the_library_syntax(capsys, flag, value, words):
    from service.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["explain", "photo.jpg", "a dog", flag, value])
    assert words in capsys.readouterr().err
    assert build_parser().parse_args(["explain", "p.jpg", "a dog", "--span", "2:5"]).span == ["2:5"]
