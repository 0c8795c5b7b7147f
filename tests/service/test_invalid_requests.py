"""Invalid requests get a specific 4xx and enqueue nothing (stream, job records and counters unchanged)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from tests.service.conftest import b64, png_bytes

IMAGE = png_bytes(48, 48, seed=9)
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
    "token range beyond tokens": (body(captions=[{"text": "a dog", "selections": [{"tokens": [1, 9]}]}]),
                                  422, "the caption has 4 tokens"),
    "malformed box": (form({"caption": "a dog", "box": "1,2,3"}), 422, "box '1,2,3' is malformed"),
    "empty box": (form({"caption": "a dog", "box": "30,30,10,10"}), 422, "need x0 < x1"),
    "box outside image": (form({"caption": "a dog", "box": "100,100,200,200"}), 422,
                          "outside the 48x48 image"),
    "two selection kinds": (body(captions=[{"text": "a dog",
                                            "selections": [{"span": [0, 1], "box": [0, 0, 1, 1]}]}]),
                            422, "exactly one of span, tokens, box"),
    "bad base64": (body(image="!!not base64!!"), 422, "not valid base64"),
    "base64 of text": (body(image=b64(b"plain text")), 422, "not an image"),
    "not JSON": ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
                 "not valid JSON"),
    "unknown JSON field": (body(colour="red"), 422, "colour"),
    "unknown form field": (form({"caption": "a dog", "captions": "x"}), 422,
                           "unknown form field(s) captions"),
    "wrong content type": ({"content": b"a dog", "headers": {"content-type": "text/plain"}}, 415,
                           "unsupported content type"),
    "negative wait": (body(wait=-1), 422, "wait"),
    "wait not a number": (form({"caption": "a dog", "wait": "NaN"}), 422,
                          "wait: Input should be a finite number"),
    "infinite wait": (form({"caption": "a dog", "wait": "inf"}), 422, "finite number"),
    "caption too long offers no truncation": (body(captions=["dog " * 80]), 422, "shorten it"),
    "unclosed multipart body": ({"content": UNCLOSED_MULTIPART,
                                 "headers": {"content-type": "multipart/form-data; boundary=XX"}}, 400,
                                "does not end with the closing boundary"),
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
                yield big[i:i + (1 << 20)]

        streamed = c.post("/explain", content=chunks(), headers={"content-type": "application/json"})
    for r in (declared, streamed):
        assert r.status_code == 413 and "EXCLIP_MAX_UPLOAD_BYTES" in r.json()["detail"]
    assert "content-length" not in streamed.request.headers
    assert stack.queue_state() == before
