"""Error against cost of each quadrature rule, against a converged result, per model and layer.

The interactions are bilinear in the two towers' integrated Jacobians, each a one-dimensional integral
along its own path, so a rule is a set of weighted points per tower. For each case (model, layers, one
image and one caption) this script computes:

- a converged result: Richardson extrapolation of the authors' right Riemann sums, 2·R(80) − R(40)
  (their error falls as 1/N), with the engine's explicit points; its own accuracy is shown against the
  finest Gauss–Legendre and Clenshaw–Curtis rows, which converge by other means;
- for every rule of ``attribution.quadrature`` and several N, the error of the matrix (CLS column
  included) as max |A − A_conv| / max |A_conv|, with N the points per tower: the cost, as each point is
  one pass of all the tower's tangents through the blocks above the cut;
- for the nested rules, the estimate a tolerance uses (the change from the previous level) beside the
  true error, which it must not under-state;
- each tower's integrand along α: ‖D(α)‖ / ‖D(1)‖ (Frobenius norms of the per-token derivatives).

Every point of a side is computed once (``Explainer.explain_rules``), so the run costs the union of the
rules' points, not their sum. CPU seconds of this process are printed per case.

    nice -n 10 env OMP_NUM_THREADS=1 python bench/quadrature.py                  # demo 1/1, B-32 6/6
    python bench/quadrature.py --cases scenes:1 ViT-B-32:6 ViT-B-16:6
"""

from __future__ import annotations

import argparse
import time

import torch
from common import line_buffered_stdout

from attribution.evaluation.scenes import generate_scenes
from attribution.explainer import Explainer, PairResult
from attribution.images import preprocess
from attribution.models import DEMO_MODEL, DEMO_PRETRAINED, load_model
from attribution.quadrature import (
    CLENSHAW_CURTIS,
    GAUSS_LEGENDRE,
    MIDPOINT,
    RIEMANN,
    TRAPEZOID,
    Rule,
    quadrature_rule,
    right_riemann_points,
)
from attribution.text import clip_bpe_tokenizer
from testing import random_clip

CAPTION = "a photo of a brown dog with a red ball on the green grass"  # 16 tokens with SOT, EOT
SIZES: dict[str, list[int]] = {
    RIEMANN: [2, 5, 10, 20, 40],
    MIDPOINT: [2, 5, 10, 20, 40],
    TRAPEZOID: [3, 5, 9, 17, 33],
    GAUSS_LEGENDRE: [2, 4, 6, 8, 10],
    CLENSHAW_CURTIS: [3, 5, 9, 17, 33],
}
NESTED = (TRAPEZOID, CLENSHAW_CURTIS)
PROFILE = [0.0, 1 / 80, 1 / 40, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]


def matrix(result: PairResult) -> torch.Tensor:
    """Every entry: the caption x patch matrix and the rows and columns beside it (CLS for CLIP)."""
    return result.entries()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def load_case(case: str) -> tuple[Explainer, torch.Tensor, torch.Tensor, str]:
    """``scenes:L`` (the demo model, one generated scene and its caption) or ``MODEL:L`` (random)."""
    name, layer_text = case.split(":")
    layer = int(layer_text)
    if name == "scenes":
        loaded = load_model(DEMO_MODEL, DEMO_PRETRAINED)
        scene = generate_scenes(1, seed=3)[0]
        image = preprocess(scene.image, loaded)[0].unsqueeze(0)
        model, tokenizer, caption = loaded.model, loaded.tokenizer, scene.caption
    else:
        model, tokenizer, image = random_clip(name)
        caption = CAPTION
    # The engine needs CLIP's BPE tokenizer (token offsets); a model with another one fails here, clearly.
    explainer = Explainer(model, clip_bpe_tokenizer(tokenizer), layer, layer)
    return explainer, image, tokenizer([caption])[0], caption


def row_spread(start: torch.Tensor, end: torch.Tensor) -> tuple[float, float, int]:
    """Where the rows of the straight path ``start + α·(end − start)`` come closest to a constant row,
    which the next block's LayerNorm divides by: the smallest min_α σ_row(α) / σ_row(1) over rows, its
    α, and how many rows dip below a tenth. σ² is a quadratic in α, so its minimum is closed-form."""
    delta = end - start
    centred_start = start - start.mean(-1, keepdim=True)
    centred_delta = delta - delta.mean(-1, keepdim=True)
    a, b, c = (
        centred_delta.pow(2).mean(-1),
        (centred_start * centred_delta).mean(-1),
        centred_start.pow(2).mean(-1),
    )
    alpha = (-b / a.clamp_min(1e-30)).clamp(0, 1)
    low = (c + 2 * alpha * b + alpha**2 * a).clamp_min(0).sqrt() / (c + 2 * b + a).sqrt()
    worst = int(low.argmin())
    return float(low[worst]), float(alpha[worst]), int((low < 0.1).sum())


def spreads(
    explainer: Explainer, image: torch.Tensor, tokens: torch.Tensor
) -> dict[str, tuple[float, float, int]]:
    s = int(tokens.argmax()) + 1
    ref_tokens = torch.zeros(1, explainer.text.context_length, dtype=torch.long)
    bpe = clip_bpe_tokenizer(explainer.tokenizer)  # the authors' reference: CLIP's ids
    ref_tokens[0, 0], ref_tokens[0, 2] = bpe.sot_token_id, bpe.eot_token_id
    text = explainer.text.hidden(tokens[:s].unsqueeze(0), explainer.text_layer)[0].float()
    text_ref = explainer.text.hidden(ref_tokens, explainer.text_layer)[0, :s].float()
    img = explainer.image.hidden(image, explainer.image_layer)[0].float()
    img_ref = explainer.image.hidden(torch.zeros_like(image), explainer.image_layer)[0].float()
    return {"text": row_spread(text_ref, text), "image": row_spread(img_ref, img)}


def run(case: str, fine: int) -> None:
    explainer, image, tokens, caption = load_case(case)
    rules: list[tuple[str, Rule]] = [
        (f"R({n})", Rule(right_riemann_points(n), None)) for n in sorted({40, 80, fine, 2 * fine})
    ]
    rules += [(f"{name}:{n}", quadrature_rule(name, n)) for name, sizes in SIZES.items() for n in sizes]
    start = time.process_time()
    results = explainer.explain_rules(image, [tokens], rules)
    seconds = time.process_time() - start
    by_name = {name: matrix(r[0]) for (name, _), r in zip(rules, results, strict=True)}
    converged = 2 * by_name[f"R({2 * fine})"] - by_name[f"R({fine})"]
    points = len({round(float(a), 12) for _, rule in rules for a in rule.points})
    print(f"\n### {case}: {caption!r} ({points} distinct points per tower, {seconds:.0f} CPU s)\n")
    print(f"converged = 2·R({2 * fine}) − R({fine}) (which is the midpoint rule with {fine} points).")
    print("Distance of other estimates to it (a bound on its own error is the smaller of these):")
    others = ["2·R(80) − R(40)"] if fine != 40 else []
    if fine != 40:
        by_name["2·R(80) − R(40)"] = 2 * by_name["R(80)"] - by_name["R(40)"]
    for name in [*others, f"{GAUSS_LEGENDRE}:10", f"{CLENSHAW_CURTIS}:33", f"{TRAPEZOID}:33"]:
        print(f"- {name}: {relative(by_name[name], converged):.1e}")
    columns = sorted({n for sizes in SIZES.values() for n in sizes})
    print("\nError max|A − A_conv| / max|A_conv| (CLS column included) against points per tower N:\n")
    print("| rule | " + " | ".join(f"N={n}" for n in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, sizes in SIZES.items():
        cells = [f"{relative(by_name[f'{name}:{n}'], converged):.1e}" if n in sizes else "" for n in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n| nested rule | N | error | change from previous level | engine's estimate | estimate ≥ error |")
    print("|---|---:|---:|---:|---:|---|")
    for name in NESTED:
        changes: list[float] = []
        for previous, n in zip(SIZES[name], SIZES[name][1:], strict=False):
            current = by_name[f"{name}:{n}"]
            error = relative(current, converged)
            changes.append(float((current - by_name[f"{name}:{previous}"]).abs().max() / current.abs().max()))
            estimate = max(changes[-2:]) if len(changes) >= 2 else float("nan")
            verdict = "–" if len(changes) < 2 else ("yes" if estimate >= error else "NO")
            print(f"| {name} | {n} | {error:.1e} | {changes[-1]:.1e} | {estimate:.1e} | {verdict} |")

    text, image_side = explainer.integrands(image[0], tokens, torch.tensor(PROFILE, dtype=torch.float64))
    print("\nEach tower's integrand along its path, ‖D(α)‖ / ‖D(1)‖ (α = 0: the reference):\n")
    print("| tower | " + " | ".join(f"α={a:.4g}" for a in PROFILE) + " |")
    print("|---|" + "---:|" * len(PROFILE))
    for label, values in (("text", text.float()), ("image", image_side.float())):
        print(
            f"| {label} | " + " | ".join(f"{float(v.norm() / values[-1].norm()):.2f}" for v in values) + " |"
        )
    print("\nRows of the path closest to constant (the next LayerNorm divides by their spread):\n")
    print("| tower | min over rows of min_α σ(α)/σ(1) | at α | rows below 0.1 |")
    print("|---|---:|---:|---:|")
    for label, (low, alpha, count) in spreads(explainer, image, tokens).items():
        print(f"| {label} | {low:.3f} | {alpha:.3f} | {count} |")


def main() -> None:
    line_buffered_stdout()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["scenes:1", "ViT-B-32:6"])
    parser.add_argument("--fine", type=int, default=40, help="converged = 2·R(2·FINE) − R(FINE)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for case in args.cases:
        run(case, args.fine)


if __name__ == "__main__":
    main()
