"""Bad input to ``explain_samples`` with real FiftyOne and MongoDB: a sample that cannot be explained
gets a clear error in its own field and the run goes on; arguments that make no sense and field names
taken by another type are refused before anything is written.

One driver process for the whole module (see test_explain_samples_e2e.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from attribution.text import MAX_CAPTION_CHARS
from service.fiftyone.limits import MAX_IMAGE_BYTES
from testing.fiftyone_env import FiftyOne

pytestmark = pytest.mark.slow

CAPTION = "a red circle and a blue square"
BAD = {
    "missing": {"filepath": "/nonexistent/scene.png", "caption": CAPTION},
    "garbage": {"filepath": "GARBAGE", "caption": CAPTION},
    "oversized": {"filepath": "HUGE", "caption": CAPTION},
    "empty caption": {"filepath": "GOOD", "caption": "   "},
    "huge caption": {"filepath": "GOOD", "caption": "a red circle " * 100},
    "phrase not in caption": {"filepath": "GOOD", "caption": CAPTION, "phrases": ["purple dragon"]},
}
MANY = {"filepath": "GOOD", "caption": CAPTION, "phrases": ["red circle", "blue square"] * 2500}
REFUSED = {
    "field of another type": {"prefix": "clash"},
    "thousands of fixed phrases": {"phrases": ["red"] * 5000, "caption_field": None, "phrases_field": None},
    "no such field": {"caption_field": "nope"},
    "no such model": {"model": "no-such-model"},
    "no concurrency": {"concurrency": 0},
    "two phrase sources": {"phrases": ["red"]},
}


@pytest.fixture(scope="module")
def outcome(fiftyone: FiftyOne, service, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("bad")
    garbage = root / "garbage.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    huge = root / "huge.png"
    with open(huge, "wb") as out:  # sparse: 16 MB on paper, nothing on disk
        out.truncate(MAX_IMAGE_BYTES + 1)
    base = {"name": "bad", "url": service.url, "caption_field": "caption", "phrases_field": "phrases"}
    steps: list[list[Any]] = [["build", {"name": "bad", "directory": str(root), "n": 1, "seed": 3}]]
    steps.append(["dump", {"name": "bad"}])
    steps.append(["add_field", {"name": "bad", "field": "clash_boxes", "kind": "StringField"}])
    steps += [["explain", base | change] for change in REFUSED.values()]
    steps.append(["dump", {"name": "bad"}])
    answers = fiftyone.run("steps", steps=steps)
    good = answers[1]["samples"][0]["filepath"]
    files = {"GOOD": good, "GARBAGE": str(garbage), "HUGE": str(huge)}
    samples = [
        {k: files.get(v, v) if k == "filepath" else v for k, v in s.items()} for s in [*BAD.values(), MANY]
    ]
    added, run, dumped = fiftyone.run(
        "steps",
        steps=[
            ["add_samples", {"name": "bad", "samples": samples}],
            ["explain", base],
            ["dump", {"name": "bad"}],
        ],
    )
    by_id = {s["id"]: s for s in dumped["samples"]}
    return {
        "refused": dict(zip(REFUSED, answers[3 : 3 + len(REFUSED)], strict=True)),
        "schema_after_refusals": answers[3 + len(REFUSED)]["schema"],
        "run": run["summary"],
        "bad": {name: by_id[i] for name, i in zip(BAD, added["ids"], strict=False)},
        "many": by_id[added["ids"][-1]],
    }


def test_each_bad_sample_gets_its_own_clear_error_and_the_run_goes_on(outcome):
    assert outcome["run"]["failed"] == len(BAD) and outcome["run"]["explained"] == 2  # the scene, MANY
    errors = {name: sample["error"] for name, sample in outcome["bad"].items()}
    assert "cannot read the image file" in errors["missing"] and "No such file" in errors["missing"]
    assert "not an image PIL can read" in errors["garbage"]
    assert f"has {MAX_IMAGE_BYTES + 1} bytes; the limit is max_image_bytes" in errors["oversized"]
    assert "must be a non-empty string" in errors["empty caption"]
    assert f"the limit is {MAX_CAPTION_CHARS}" in errors["huge caption"]
    assert "'purple dragon' is not in the caption" in errors["phrase not in caption"]
    for sample in outcome["bad"].values():
        assert sample["phrases"] is None and sample["boxes"] is None and sample["heatmaps"][0] is None


def test_thousands_of_phrases_are_cut_to_max_phrases_and_counted(outcome):
    assert outcome["run"]["phrases_cut"] == 1
    many = outcome["many"]
    assert many["error"] is None and [p["text"] for p in many["phrases"]] == ["red circle", "blue square"]


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_refused_run_writes_nothing(outcome, name: str):
    answer = outcome["refused"][name]
    assert answer.get("error") == "ValueError", answer
    schema = outcome["schema_after_refusals"]
    assert not any(field.startswith(("exclip_", "clash_heatmap")) for field in schema)
    assert "StringField" in schema["clash_boxes"]


def test_refusals_say_what_is_wrong(outcome):
    messages = {name: answer["message"] for name, answer in outcome["refused"].items()}
    assert "field 'clash_boxes' exists as StringField" in messages["field of another type"]
    assert "5000 phrases given" in messages["thousands of fixed phrases"]
    assert "no field 'nope'" in messages["no such field"]
    assert "serves no model 'no-such-model'" in messages["no such model"]
    assert "concurrency must be between 1" in messages["no concurrency"]
    assert "at most one of phrases_field, phrases and label_field" in messages["two phrase sources"]
