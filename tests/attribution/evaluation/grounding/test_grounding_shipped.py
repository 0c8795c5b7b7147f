"""With the shipped demo model, a phrase's interaction heatmap points at its object well above chance,
and far better than the whole caption's map does: the explanation tells the caption's objects apart.

A fixed seeded set of scenes (not the benchmark's, not the training script's held-out set), the model's
default layers, the benchmark's own code path. Chance is what the random-patch baseline scores on the
same phrases (about 0.1: an object covers a few of the 64 patch centres). Then, on a fresh set, the
pointing share per object count under both rules, and the swapped-caption binding test.
"""

from __future__ import annotations

import math

import pytest
import torch

from attribution.evaluation.grounding.benchmark import run_benchmark
from attribution.evaluation.grounding.methods import Batch, MethodOptions, create_method
from attribution.evaluation.grounding.metrics import POINTING_RULES, pointing_hit
from attribution.evaluation.grounding.samples import from_scene
from attribution.evaluation.retrieval import retrieval_accuracy
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


# Per object count, both pointing rules, on a set never used to choose anything. Seed 7 000 003 is none
# of: the training runs' streams, 1 000 003 (the set the shipped checkpoint was chosen on), 2 000 003
# and 3 000 003 (the sets the default layers and the weights to ship were chosen on), 4242 and 424 242
# (sets earlier thresholds were measured on), 5 000 011 (the set the values below were measured on).
FRESH_SEED, FRESH_PER_COUNT = 7_000_003, 20
# Measured on 150 scenes per object count of seed 5 000 011 (hits / phrases; the packaged weights at the
# model card's default layers, steps 10; python -m attribution.evaluation.grounding --seed 5000011 --n 150
# --objects K --methods interactions [--pointing-rule overlap]): centre 0.940 / 0.833 / 0.762, overlap
# 1.000 / 0.910 / 0.849 for 1 / 2 / 3 objects. (The README's 0.92 / 0.89 / 0.79, centre rule, are of the
# benchmark's set of mixed scenes, the one the default layers were chosen on.)
MEASURED_BY_COUNT = {
    ("centre", 1): (141, 150),
    ("centre", 2): (250, 300),
    ("centre", 3): (343, 450),
    ("overlap", 1): (150, 150),
    ("overlap", 2): (273, 300),
    ("overlap", 3): (382, 450),
}
# Swapped captions (colour / shape): 1.00 / 1.00 on 256 scenes of seed 5 000 011; the claim tested is
# >= 0.95 (the README says 1.00).
MIN_SWAP = 0.95
# This test's own set (20 scenes per count, 20 / 40 / 60 phrases) measured centre 19/20, 38/40, 48/60 and
# overlap 20/20, 39/40, 52/60; swaps 1.00 / 1.00 on 256 of its scenes. The thresholds below ask for
# 16/20, 27/40, 36/60 and 19/20, 31/40, 43/60. The test takes about 40 s of CPU on one core (2-core x86):
# 20 scenes per count is what fits in a CI minute, and the margin is sized for that sample (see threshold).


def threshold(rule: str, count: int) -> float:
    """Measured share minus three standard errors of a share over this test's phrases.

    A fresh set of FRESH_PER_COUNT scenes holds FRESH_PER_COUNT * count phrases, so its share scatters
    around the measured one by about sqrt(p (1 - p) / n); three of those make a miss by chance rare
    (about 1 in 700 per cell if phrases were independent). p is smoothed as (hits + 1) / (phrases + 2)
    so that a measured 1.0 still leaves a margin.
    """
    hits, phrases = MEASURED_BY_COUNT[(rule, count)]
    p = (hits + 1) / (phrases + 2)
    return hits / phrases - 3 * math.sqrt(p * (1 - p) / (FRESH_PER_COUNT * count))


def test_phrases_point_at_their_objects_per_object_count_on_a_fresh_set(scenes_model):
    method = create_method("interactions", MethodOptions(steps=10))
    layers = (scenes_model.default_text_layer, scenes_model.default_image_layer)
    shares = {}
    for count in (1, 2, 3):
        scenes = generate_scenes(FRESH_PER_COUNT, FRESH_SEED, n_objects=count)
        batch = Batch.build(scenes_model, [from_scene(s, i) for i, s in enumerate(scenes)])
        maps = method.heatmaps(scenes_model, batch, *layers)
        for rule in POINTING_RULES:
            hits = [
                pointing_hit(heatmap, geometry, phrase.boxes, rule)
                for sample, geometry, sample_maps in zip(batch.samples, batch.geometries, maps, strict=True)
                for phrase, heatmap in zip(sample.phrases, sample_maps, strict=True)
            ]
            assert len(hits) == FRESH_PER_COUNT * count
            shares[(rule, count)] = sum(hits) / len(hits)
    assert all(shares[key] >= threshold(*key) for key in MEASURED_BY_COUNT), shares


def test_true_captions_beat_their_swapped_versions_on_a_fresh_set(scenes_model):
    scenes = generate_scenes(256, FRESH_SEED)
    pixels = torch.stack([scenes_model.transform(s.image) for s in scenes])
    acc = retrieval_accuracy(scenes_model.model, scenes_model.tokenizer, pixels, scenes)
    assert acc["colour_swap"] >= MIN_SWAP and acc["shape_swap"] >= MIN_SWAP, acc
