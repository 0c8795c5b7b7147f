"""Run grounding methods over samples and layer pairs: per-phrase scores, summaries and costs.

Each method runs once per distinct setting of the cut points it reads (``GroundingMethod.layers``):
the interactions once per (text, image) layer pair, the first-order methods once per image layer,
the random baseline once. Costs are wall seconds per caption around each method's own calls in the
same process (for a method that reused another's computation, that computation's time), and the same
in units of one plain image forward pass per image (``encode_image`` on the same batches, timed in the
same run), which cancels most of a busy machine's momentary speed.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from attribution.evaluation.grounding.methods import Batch, GroundingMethod
from attribution.evaluation.grounding.metrics import energy_in_box, pointing_hit
from attribution.evaluation.grounding.samples import GroundingSample
from attribution.models import LoadedModel

LayerPair = tuple[int, int]
# The cut points a result depends on: None where the method does not read that tower's layer.
Layers = tuple[int | None, int | None]
ALL_GROUPS = "all"


def layers_label(layers: Layers) -> str:
    return "/".join("-" if v is None else str(v) for v in layers)


def effective_layers(method: GroundingMethod, pair: LayerPair) -> Layers:
    text_layer, image_layer = pair
    if method.layers == "text+image":
        return (text_layer, image_layer)
    if method.layers == "image":
        return (None, image_layer)
    return (None, None)


@dataclass(frozen=True)
class PhraseScore:
    sample_id: str
    phrase: int
    text: str
    group: str
    method: str
    layers: Layers
    hit: bool
    energy: float


@dataclass(frozen=True)
class Cost:
    method: str
    layers: Layers
    seconds: float
    captions: int
    phrases: int
    image_forward_s: float  # one plain image forward per image, measured in the same process

    @property
    def per_caption_s(self) -> float:
        return self.seconds / max(self.captions, 1)

    @property
    def per_caption_forwards(self) -> float:
        return self.per_caption_s / self.image_forward_s


@dataclass(frozen=True)
class Summary:
    method: str
    layers: Layers
    group: str
    phrases: int
    pointing: float
    energy: float


@dataclass
class BenchmarkResult:
    scores: list[PhraseScore]
    costs: list[Cost]
    pointing_rule: str
    # (method, layers) -> heatmaps of the first samples, for the figure: [sample][phrase] (rows, cols)
    examples: dict[tuple[str, Layers], list[list[torch.Tensor]]] = field(default_factory=dict)

    def summaries(self) -> list[Summary]:
        """Mean pointing and energy per (method, layers, group), plus the group ``all``."""
        buckets: dict[tuple[str, Layers, str], list[PhraseScore]] = defaultdict(list)
        for s in self.scores:
            buckets[(s.method, s.layers, s.group)].append(s)
            buckets[(s.method, s.layers, ALL_GROUPS)].append(s)
        return [
            Summary(m, layers, g, len(v), sum(s.hit for s in v) / len(v), sum(s.energy for s in v) / len(v))
            for (m, layers, g), v in buckets.items()
        ]

    def groups(self, few: int = 10) -> list[str]:
        """Up to ``few`` groups in natural order ("1 object" before "2 objects"); more (categories) by
        number of phrases, most first; ``all`` last."""
        counts: dict[str, int] = defaultdict(int)
        for s in self.scores:
            counts[s.group] += 1
        if len(counts) <= few:
            return sorted(counts, key=_natural) + [ALL_GROUPS]
        return sorted(counts, key=lambda g: (-counts[g], g)) + [ALL_GROUPS]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pointing_rule": self.pointing_rule,
            "summaries": [asdict(s) for s in self.summaries()],
            "costs": [
                {**asdict(c), "per_caption_s": c.per_caption_s, "forwards": c.per_caption_forwards}
                for c in self.costs
            ],
            "scores": [asdict(s) for s in self.scores],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchmarkResult:
        """The scores and costs of a JSON file written by ``to_dict`` (examples are not kept)."""

        def layers(value: list[int]) -> Layers:
            return (value[0], value[1])

        scores = [PhraseScore(**{**s, "layers": layers(s["layers"])}) for s in data["scores"]]
        fields = ("method", "seconds", "captions", "phrases", "image_forward_s")
        costs = [Cost(layers=layers(c["layers"]), **{k: c[k] for k in fields}) for c in data["costs"]]
        return cls(scores, costs, data["pointing_rule"])

    @classmethod
    def merge(cls, results: Sequence[BenchmarkResult]) -> BenchmarkResult:
        """One result from runs split over processes: by layer pairs, by samples, or both.

        Per (method, layers), runs over disjoint sample sets are pooled (costs add up; the image-forward
        unit is averaged, weighted by captions) and a run over the very same samples as one already
        taken is the same measurement repeated (a method that ignores the split's layers) and is left
        out. Partly overlapping sample sets are refused.
        """
        rules = {r.pointing_rule for r in results}
        if len(rules) != 1:
            raise ValueError(f"cannot merge results of different pointing rules {sorted(rules)}")
        merged = cls([], [], rules.pop())
        taken: dict[tuple[str, Layers], list[frozenset[str]]] = defaultdict(list)
        costs: dict[tuple[str, Layers], list[Cost]] = defaultdict(list)
        for r in results:
            runs: dict[tuple[str, Layers], list[PhraseScore]] = defaultdict(list)
            for score in r.scores:
                runs[(score.method, score.layers)].append(score)
            for key, scores in runs.items():
                ids = frozenset(s.sample_id for s in scores)
                if ids in taken[key]:
                    continue
                if any(ids & other for other in taken[key]):
                    raise ValueError(f"runs of {key[0]} at layers {layers_label(key[1])} share some samples")
                taken[key].append(ids)
                merged.scores += scores
                costs[key] += [c for c in r.costs if (c.method, c.layers) == key]
            merged.examples.update({k: v for k, v in r.examples.items() if k not in merged.examples})
        for (method, layers), parts in costs.items():
            captions = sum(c.captions for c in parts)
            forward_s = sum(c.image_forward_s * c.captions for c in parts) / max(captions, 1)
            merged.costs.append(
                Cost(
                    method,
                    layers,
                    sum(c.seconds for c in parts),
                    captions,
                    sum(c.phrases for c in parts),
                    forward_s,
                )
            )
        return merged


def _natural(text: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def batches(loaded: LoadedModel, samples: Sequence[GroundingSample], size: int) -> list[Batch]:
    return [Batch.build(loaded, samples[i : i + size]) for i in range(0, len(samples), size)]


@torch.no_grad()
def image_forward_seconds(loaded: LoadedModel, prepared: Sequence[Batch]) -> float:
    """Seconds of one plain image forward (``encode_image``) per image, over the same batches."""
    clip: Any = loaded.model  # open_clip's CLIP is untyped
    clip.encode_image(prepared[0].tensors[:1].to(loaded.device))  # warm-up
    start = time.perf_counter()
    images = 0
    for batch in prepared:
        clip.encode_image(batch.tensors.to(loaded.device))
        images += len(batch.samples)
    return (time.perf_counter() - start) / images


def run_benchmark(
    loaded: LoadedModel,
    samples: Sequence[GroundingSample],
    methods: Sequence[GroundingMethod],
    layer_pairs: Sequence[LayerPair],
    *,
    batch_size: int = 16,
    pointing_rule: str = "centre",
    n_examples: int = 0,
    progress: Callable[[int], None] | None = None,
) -> BenchmarkResult:
    """Score every method at every layer pair on ``samples``; ``progress(k)`` is told of k done batches."""
    prepared = batches(loaded, samples, batch_size)
    jobs: list[tuple[GroundingMethod, Layers, LayerPair]] = []
    for method in methods:
        seen: set[Layers] = set()
        for pair in layer_pairs:
            layers = effective_layers(method, pair)
            if layers not in seen:
                seen.add(layers)
                jobs.append((method, layers, pair))

    forward_s = image_forward_seconds(loaded, prepared)
    result = BenchmarkResult([], [], pointing_rule)
    for method, layers, (text_layer, image_layer) in jobs:
        seconds = 0.0
        examples: list[list[torch.Tensor]] = []
        for batch in prepared:
            start = time.perf_counter()
            heatmaps = method.heatmaps(loaded, batch, text_layer, image_layer)
            elapsed = time.perf_counter() - start
            seconds += elapsed if method.last_cost_s is None else method.last_cost_s
            for sample, geometry, maps in zip(batch.samples, batch.geometries, heatmaps, strict=True):
                if len(examples) < n_examples:
                    examples.append(maps)
                for i, (phrase, heatmap) in enumerate(zip(sample.phrases, maps, strict=True)):
                    result.scores.append(
                        PhraseScore(
                            sample.id,
                            i,
                            sample.phrase_text(i),
                            phrase.group,
                            method.name,
                            layers,
                            pointing_hit(heatmap, geometry, phrase.boxes, pointing_rule),
                            energy_in_box(heatmap, geometry, phrase.boxes),
                        )
                    )
            if progress is not None:
                progress(1)
        n_phrases = sum(b.n_phrases for b in prepared)
        result.costs.append(Cost(method.name, layers, seconds, len(samples), n_phrases, forward_s))
        if n_examples:
            result.examples[(method.name, layers)] = examples
    return result


def n_batches(
    methods: Sequence[GroundingMethod], layer_pairs: Sequence[LayerPair], n_samples: int, batch_size: int
) -> int:
    """How many ``progress`` steps ``run_benchmark`` will report."""
    runs = sum(len({effective_layers(m, p) for p in layer_pairs}) for m in methods)
    return runs * -(-n_samples // batch_size)
