"""How much of the score change the interactions explain under each text reference convention.

For scenes of the grounding benchmark's held-out seed and the demo model, at each layer pair and N = 10,
the mean of ``completeness.total`` (the sum of all interactions), ``expected`` (the score change
between reference and input, on the cosine scale) and ``path_expected`` (what the sum converges to),
and the median share of ``expected`` that the sum misses (``|gap| / |expected|``) and that the
Riemann sum alone misses (``|integration_gap| / |expected|``). Pointing and energy for the same
conventions come from the grounding benchmark's ``--text-reference``.

    OMP_NUM_THREADS=1 python bench/text_reference.py                 # demo model, 40 scenes, 1/1 and 3/3
    OMP_NUM_THREADS=1 python bench/text_reference.py --scenes 200 --layers 1/1
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from common import line_buffered_stdout

from attribution.evaluation.scenes import GROUNDING_SEED, iter_scenes
from attribution.explainer import TEXT_REFERENCES, Completeness
from attribution.models import DEMO_MODEL, DEMO_PRETRAINED, load_model
from attribution.pipeline import ExplainRequest, explain_requests


def row(layers: str, reference: str, cs: list[Completeness]) -> str:
    missed = statistics.median(abs(c.gap) / abs(c.expected) for c in cs)
    integration = statistics.median(abs(c.integration_gap) / abs(c.expected) for c in cs)
    means = [statistics.mean(getattr(c, k) for c in cs) for k in ("total", "expected", "path_expected")]
    cells = [layers, reference, *(f"{m:.3f}" for m in means), f"{missed:.3f}", f"{integration:.3f}"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40, help="scenes of the held-out seed (40)")
    parser.add_argument("--layers", default="1/1,3/3", help="TEXT/IMAGE pairs (1/1,3/3)")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    line_buffered_stdout()
    loaded = load_model(DEMO_MODEL, DEMO_PRETRAINED)
    scenes = list(itertools.islice(iter_scenes(GROUNDING_SEED), args.scenes))
    requests = [ExplainRequest(s.image, [s.caption]) for s in scenes]
    print(
        "| layers t/i | text reference | mean total | mean expected | mean path_expected "
        "| median missed share | median integration error share |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for pair in args.layers.split(","):
        text_layer, image_layer = (int(v) for v in pair.split("/"))
        for reference in TEXT_REFERENCES:
            explained = explain_requests(
                loaded,
                requests,
                text_layer=text_layer,
                image_layer=image_layer,
                steps=args.steps,
                text_reference=reference,
            )
            print(row(pair, reference, [e.result.completeness for [e] in explained]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
