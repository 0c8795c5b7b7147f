"""``python -m attribution.evaluation.grounding`` (also ``exclip-service evaluate``): the grounding benchmark.

Runs the chosen methods at the chosen layer pairs on the held-out captioned scenes or on annotations in
COCO or Flickr30k Entities format, prints Markdown tables (pointing game and energy in box per method ×
layers × group, cost per caption), and optionally writes the JSON and a PNG figure of examples.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from attribution.errors import AttributionError, InvalidOption
from attribution.evaluation.grounding.benchmark import (
    BenchmarkResult,
    LayerPair,
    effective_layers,
    n_batches,
    run_benchmark,
)
from attribution.evaluation.grounding.errors import AnnotationError
from attribution.evaluation.grounding.methods import METHODS, MethodOptions, create_method
from attribution.evaluation.grounding.metrics import POINTING_RULES
from attribution.evaluation.grounding.report import (
    plot_examples,
    read_json,
    require_matplotlib,
    text_report,
    write_json,
)
from attribution.evaluation.grounding.samples import GroundingSample, InvalidSample
from attribution.evaluation.scenes import GROUNDING_SEED
from attribution.explainer import DEFAULT_TEXT_REFERENCE, TEXT_REFERENCES
from attribution.models import LoadedModel, load_model

DATASETS = ("scenes", "coco", "flickr30k")


def parse_layers(value: str, loaded: LoadedModel) -> list[LayerPair]:
    """``all`` (every pair), ``default`` (the model's), ``last``, or ``TEXT/IMAGE`` pairs: ``1/1,3/3``."""
    if value == "all":
        return [(t, i) for t in range(loaded.text_layers) for i in range(loaded.image_layers)]
    if value == "default":
        return [(loaded.default_text_layer, loaded.default_image_layer)]
    if value == "last":
        return [(loaded.text_layers - 1, loaded.image_layers - 1)]
    pairs = []
    for part in value.split(","):
        try:
            t, i = (int(v) for v in part.split("/"))
        except ValueError as e:
            raise InvalidOption(f"layer pair {part!r} must be TEXT/IMAGE block indices, e.g. 1/1") from e
        if not (0 <= t < loaded.text_layers and 0 <= i < loaded.image_layers):
            raise InvalidOption(
                f"layer pair {part!r} is out of range: text 0..{loaded.text_layers - 1}, "
                f"image 0..{loaded.image_layers - 1}"
            )
        pairs.append((t, i))
    return pairs


def parse_methods(value: str) -> list[str]:
    names = list(METHODS) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise InvalidOption(f"unknown method(s) {unknown}; choose from all, {', '.join(METHODS)}")
    return names


def load_samples(args: argparse.Namespace, skipped: list[InvalidSample] | None) -> list[GroundingSample]:
    """The samples to run; bad ones (and their images) go to ``skipped``, or raise without it."""
    if args.dataset == "scenes":
        from attribution.evaluation.grounding.samples import from_scene
        from attribution.evaluation.scenes import generate_scenes

        scenes = generate_scenes(args.skip + args.n, args.seed, n_objects=args.objects)[args.skip :]
        return [from_scene(s, args.skip + i) for i, s in enumerate(scenes)]
    if not args.images:
        raise InvalidOption(f"--images (the folder of the image files) is required for {args.dataset}")
    if args.dataset == "coco":
        from attribution.evaluation.grounding.coco import read_coco

        if not (args.captions and args.instances):
            raise InvalidOption("coco needs --captions and --instances (COCO json files)")
        samples = read_coco(args.captions, args.instances, args.images, limit=args.n, skipped=skipped)
    else:
        from attribution.evaluation.grounding.flickr30k import read_flickr30k

        if not args.annotations:
            raise InvalidOption("flickr30k needs --annotations (the folder with Sentences/ and Annotations/)")
        samples = read_flickr30k(args.annotations, args.images, limit=args.n, skipped=skipped)
    return [s for s in samples if _image_ok(s, skipped)]


def _image_ok(sample: GroundingSample, skipped: list[InvalidSample] | None) -> bool:
    """Whether the sample's image file can be read (checked before the run, not found missing in it)."""
    try:
        sample.check_image()
    except AnnotationError as e:
        if skipped is None:
            raise
        skipped.append(InvalidSample(sample.id, str(e)))
        return False
    return True


def print_skipped(skipped: list[InvalidSample]) -> None:
    if skipped:
        print(f"skipped {len(skipped)} invalid sample(s):", file=sys.stderr)
        for item in skipped:
            print(f"  {item.id}: {item.reason}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m attribution.evaluation.grounding", description=__doc__.splitlines()[0]
    )
    p.add_argument("--dataset", choices=DATASETS, default="scenes")
    p.add_argument("--n", type=int, default=200, help="scenes to generate / most samples to read (200)")
    p.add_argument("--seed", type=int, default=GROUNDING_SEED, help="scenes seed (held-out set by default)")
    p.add_argument(
        "--skip",
        type=int,
        default=0,
        help="scenes: leave out the first SKIP (split a run over processes; merge with --tables)",
    )
    p.add_argument(
        "--objects", type=int, choices=(1, 2, 3), help="scenes: this many objects in every scene (1-3 mixed)"
    )
    p.add_argument("--captions", help="coco: captions json")
    p.add_argument("--instances", help="coco: instances json (boxes and categories)")
    p.add_argument("--annotations", help="flickr30k: folder with Sentences/ and Annotations/")
    p.add_argument("--images", help="coco, flickr30k: folder of the images")
    p.add_argument(
        "--skip-invalid",
        action="store_true",
        help="coco, flickr30k: leave out samples that cannot be run (listed on stderr and in the JSON) "
        "instead of stopping at the first",
    )
    p.add_argument("--model", default="exclip-scenes", help="open_clip architecture (exclip-scenes)")
    p.add_argument("--pretrained", default="scenes", help="tag, checkpoint path, or none (scenes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", default="all", help=f"all or a comma list of: {', '.join(METHODS)}")
    p.add_argument(
        "--layers",
        default="default",
        help="all, default (the model's), last, or TEXT/IMAGE pairs like 1/1,3/3 (default)",
    )
    p.add_argument("--steps", type=int, default=10, help="interpolation steps (interactions, IG)")
    p.add_argument(
        "--text-reference",
        choices=TEXT_REFERENCES,
        default=DEFAULT_TEXT_REFERENCE,
        help=f"the interactions' text reference convention ({DEFAULT_TEXT_REFERENCE})",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pointing-rule", choices=POINTING_RULES, default="centre")
    p.add_argument("--json", help="write all scores, summaries and costs here")
    p.add_argument("--figure", help="write a PNG grid of examples here")
    p.add_argument("--figure-layers", help="the TEXT/IMAGE pair the figure shows (first of --layers)")
    p.add_argument("--examples", type=int, default=8, help="rows of the figure")
    p.add_argument("--figure-dpi", type=int, default=90, help="resolution of the figure (90)")
    p.add_argument("--random-seed", type=int, default=0, help="seed of the random-patch baseline")
    p.add_argument(
        "--tables",
        nargs="+",
        metavar="JSON",
        help="only print the tables of these result files, merged (runs split over processes)",
    )
    return p


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def print_tables(paths: list[str], out: str | None) -> int:
    """Merge result files of runs on the same samples and print their tables (and write the merge)."""
    read = [read_json(p) for p in paths]
    try:
        result = BenchmarkResult.merge([r for _, r in read])
    except ValueError as e:
        raise InvalidOption(f"cannot merge these result files: {e}") from e
    print(text_report(result))
    if out:
        write_json(result, out, {"merged": [c for c, _ in read]})
        print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.tables:
            return print_tables(args.tables, args.json)
        if args.figure:
            require_matplotlib()
        loaded = load_model(args.model, args.pretrained, device=args.device)
        pairs = parse_layers(args.layers, loaded)
        figure_pair = parse_layers(args.figure_layers, loaded)[0] if args.figure_layers else pairs[0]
        names = parse_methods(args.methods)
        options = MethodOptions(steps=args.steps, seed=args.random_seed, text_reference=args.text_reference)
        methods = [create_method(n, options) for n in names]
        skipped: list[InvalidSample] | None = [] if args.skip_invalid else None
        samples = load_samples(args, skipped)
        print_skipped(skipped or [])
        if not samples:
            raise InvalidOption("no samples with a grounded phrase were found")
        n_examples = args.examples if args.figure else 0
        with tqdm(total=n_batches(methods, pairs, len(samples), args.batch_size), unit="batch") as bar:
            result = run_benchmark(
                loaded,
                samples,
                methods,
                pairs,
                batch_size=args.batch_size,
                pointing_rule=args.pointing_rule,
                n_examples=n_examples,
                progress=bar.update,
            )
    except AnnotationError as e:
        hint = "" if args.skip_invalid else " (--skip-invalid leaves out samples that cannot be run)"
        print(f"evaluate: {e}{hint}", file=sys.stderr)
        return 2
    except AttributionError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    print(text_report(result))
    config: dict[str, Any] = {
        **{k: v for k, v in vars(args).items() if k not in ("json", "figure")},
        "layer_pairs": pairs,
        "samples": len(samples),
        "skipped": [{"id": item.id, "reason": item.reason} for item in skipped or []],
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}",
    }
    if args.json:
        write_json(result, args.json, config)
        print(f"wrote {args.json}")
    if args.figure:
        from attribution.evaluation.grounding.methods import Batch

        columns = [(m.name, effective_layers(m, figure_pair)) for m in methods]
        shown = Batch.build(loaded, samples[: args.examples])
        plot_examples(result, shown, columns, args.figure, args.examples, args.figure_dpi)
        print(f"wrote {args.figure}")
    return 0
