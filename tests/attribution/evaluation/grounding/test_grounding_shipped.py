"""With the shipped demo model, a phrase's interaction heatmap points at its object well above chance,
and far better than the whole caption's map does: the explanation tells the caption's objects apart.

A fixed seeded set of scenes (not the benchmark's, not the training script's held-out set), the model's
default layers, the benchmark's own code path. Chance is what the random-patch baseline scores on the
same phrases (about 0.1: an object covers a few of the 64 patch centres).
"""

from __future__ import annotations

import pytest

from attribution.evaluation.grounding.benchmark import run_benchmark
from attribution.evaluation.grounding.methods import MethodOptions, create_method
from attribution.evaluation.grounding.samples import from_scene
from attribution.evaluation.scenes import generate_scenes
from attribution.models import load_model

SEED, N_SCENES = 424_242, 24
# Measured on this set (46 phrases) with the packaged weights (fine-tuned 2026-11-29) at the model card's
# default layers (1/1): the phrase's map hits 40 of 46 phrases, the whole caption's map 24 of 46
# (it cannot tell two objects of one caption apart), random 4 of 46 (see BENCHMARKS.md, Grounding). The
# thresholds leave a margin of 0.1 (about 5 phrases) for numerical differences between machines and
# engine versions. New weights or new default layers: measure again.
MEASURED = 40 / 46
MEASURED_CAPTION = 24 / 46
MARGIN = 0.1


@pytest.fixture(scope="module")
def scenes_model():
    return load_model("exclip-scenes", "scenes")


def test_phrase_interactions_point_at_their_objects(scenes_model):
    samples = [from_scene(s, i) for i, s in enumerate(generate_scenes(N_SCENES, SEED))]
    pair = (scenes_model.default_text_layer, scenes_model.default_image_layer)
    names = ("interactions", "interactions-caption", "random")
    methods = [create_method(n, MethodOptions(steps=10)) for n in names]
    result = run_benchmark(scenes_model, samples, methods, [pair], batch_size=N_SCENES)
    pointing = {s.method: s.pointing for s in result.summaries() if s.group == "all"}
    assert pointing["random"] < 0.2
    assert pointing["interactions"] >= MEASURED - MARGIN
    # The phrase's own tokens select its object; the sum over the whole caption cannot.
    assert (
        pointing["interactions"] - pointing["interactions-caption"]
        >= (MEASURED - MEASURED_CAPTION) - 2 * MARGIN
    )
