"""The benchmark runner and ``python -m attribution.evaluation.grounding`` end to end on the tiny model."""

from __future__ import annotations

import json
import sys

import pytest
from PIL import Image

from attribution.evaluation.grounding.benchmark import BenchmarkResult, run_benchmark
from attribution.evaluation.grounding.cli import main
from attribution.evaluation.grounding.methods import MethodOptions, create_method
from attribution.evaluation.grounding.report import read_json, write_json
from attribution.evaluation.grounding.samples import from_scene
from attribution.evaluation.scenes import generate_scenes

TINY = ["--model", "exclip-tiny", "--pretrained", "none"]


def test_runner_computes_each_method_once_per_layer_setting_it_reads(tiny_model):
    samples = [from_scene(s, i) for i, s in enumerate(generate_scenes(5, seed=11))]
    n_phrases = sum(len(s.phrases) for s in samples)
    methods = [create_method(n, MethodOptions(steps=2)) for n in ("random", "ig-phrase", "interactions")]
    pairs = [(0, 2), (1, 2)]
    result = run_benchmark(tiny_model, samples, methods, pairs, batch_size=2, n_examples=3)
    runs = {(s.method, s.layers) for s in result.scores}
    assert runs == {
        ("random", (None, None)),
        ("ig-phrase", (None, 2)),
        ("interactions", (0, 2)),
        ("interactions", (1, 2)),
    }
    assert len(result.scores) == 4 * n_phrases
    assert [(c.method, c.captions, c.phrases) for c in result.costs] == [
        ("random", 5, n_phrases),
        ("ig-phrase", 5, n_phrases),
        ("interactions", 5, n_phrases),
        ("interactions", 5, n_phrases),
    ]
    assert all(c.seconds > 0 and c.image_forward_s > 0 for c in result.costs)
    overall = {(s.method, s.layers): s for s in result.summaries() if s.group == "all"}
    hits = sum(s.hit for s in result.scores if s.method == "random")
    assert overall[("random", (None, None))].pointing == pytest.approx(hits / n_phrases)
    assert overall[("random", (None, None))].phrases == n_phrases
    assert len(result.examples[("interactions", (1, 2))]) == 3


def test_caption_readout_reuses_the_phrase_computation_and_reports_its_cost(tiny_model):
    samples = [from_scene(s, i) for i, s in enumerate(generate_scenes(3, seed=4))]
    methods = [create_method(n, MethodOptions(steps=2)) for n in ("interactions", "interactions-caption")]
    result = run_benchmark(tiny_model, samples, methods, [(2, 2)], batch_size=3)
    phrase, caption = result.costs
    assert methods[0].last_cost_s is None  # it computed
    assert methods[1].last_cost_s is not None  # it reused, and is charged the computation's time
    assert caption.seconds == methods[1].last_cost_s == pytest.approx(phrase.seconds, rel=0.05)


def test_results_of_split_runs_merge_into_one_table(tiny_model, tmp_path, capsys):
    samples = [from_scene(s, i) for i, s in enumerate(generate_scenes(3, seed=4))]
    paths = []
    for pair in ((0, 2), (1, 2)):  # the random baseline runs in both: the same measurement, kept once
        methods = [create_method(n, MethodOptions(steps=2)) for n in ("random", "interactions")]
        result = run_benchmark(tiny_model, samples, methods, [pair], batch_size=3)
        paths.append(tmp_path / f"{pair[0]}.json")
        write_json(result, paths[-1], {"pair": pair})
    assert main(["--tables", *map(str, paths), "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "| interactions | 0/2 |" in printed and "| interactions | 1/2 |" in printed
    assert printed.count("| random | -/- |") == 3  # once in each table (pointing, energy, cost)
    _, merged = read_json(tmp_path / "m.json")
    assert len(merged.scores) == 3 * sum(len(s.phrases) for s in samples)
    part = read_json(paths[0])[1]
    overlapping = BenchmarkResult([s for s in part.scores if s.sample_id != "scene-0"], part.costs, "centre")
    with pytest.raises(ValueError, match="share some samples"):
        BenchmarkResult.merge([part, overlapping])


def test_runs_over_sample_slices_merge_into_the_whole(tiny_model, tmp_path):
    parts = []
    for skip in (0, 2):
        out = tmp_path / f"s{skip}.json"
        assert (
            main(
                [
                    *TINY,
                    "--n",
                    "2",
                    "--skip",
                    str(skip),
                    "--seed",
                    "9",
                    "--methods",
                    "random",
                    "--json",
                    str(out),
                ]
            )
            == 0
        )
        parts.append(read_json(out)[1])
    whole_json = str(tmp_path / "w.json")
    assert main([*TINY, "--n", "4", "--seed", "9", "--methods", "random", "--json", whole_json]) == 0
    whole = read_json(whole_json)[1]
    merged = BenchmarkResult.merge(parts)
    assert sorted(map(repr, merged.scores)) == sorted(map(repr, whole.scores))
    (cost,) = merged.costs
    assert (cost.captions, cost.phrases) == (4, whole.costs[0].phrases)


def test_cli_on_scenes_prints_tables_and_writes_json_and_figure(tmp_path, capsys):
    out_json, out_png = tmp_path / "g.json", tmp_path / "g.png"
    code = main(
        [
            *TINY,
            "--n",
            "4",
            "--seed",
            "1",
            "--methods",
            "random,ig-phrase,interactions",
            "--layers",
            "2/2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--json",
            str(out_json),
            "--figure",
            str(out_png),
            "--examples",
            "3",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Pointing game (centre rule)" in printed and "| interactions | 2/2 |" in printed
    assert "| ig-phrase | -/2 |" in printed and "image forwards per caption" in printed
    data = json.loads(out_json.read_text())
    assert data["config"]["samples"] == 4 and data["config"]["layer_pairs"] == [[2, 2]]
    assert {s["method"] for s in data["summaries"]} == {"random", "ig-phrase", "interactions"}
    assert {c["method"] for c in data["costs"]} == {"random", "ig-phrase", "interactions"}
    with Image.open(out_png) as png:
        assert png.format == "PNG" and png.width > 200 and png.height > 200


def test_cli_reads_coco_and_groups_by_category(tmp_path, capsys):
    Image.new("RGB", (64, 48), (10, 120, 10)).save(tmp_path / "1.png")
    (tmp_path / "captions.json").write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.png"}],
                "annotations": [{"id": 5, "image_id": 1, "caption": "a cat next to a dog"}],
            }
        )
    )
    (tmp_path / "instances.json").write_text(
        json.dumps(
            {
                "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
                "annotations": [
                    {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20]},
                    {"image_id": 1, "category_id": 2, "bbox": [30, 20, 30, 25]},
                ],
            }
        )
    )
    code = main(
        [
            *TINY,
            "--dataset",
            "coco",
            "--captions",
            str(tmp_path / "captions.json"),
            "--instances",
            str(tmp_path / "instances.json"),
            "--images",
            str(tmp_path),
            "--methods",
            "random",
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert code == 0
    assert "cat (n=1)" in capsys.readouterr().out
    groups = {s["group"] for s in json.loads((tmp_path / "c.json").read_text())["summaries"]}
    assert groups == {"cat", "dog", "all"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layers", "9/0"], "out of range"),
        (["--layers", "one"], "TEXT/IMAGE"),
        (["--methods", "saliency"], "unknown method"),
        (["--dataset", "coco", "--images", "."], "--captions"),
    ],
)
def test_cli_bad_options_exit_2_with_a_message(args, message, capsys):
    assert main([*TINY, "--n", "1", *args]) == 2
    assert message in capsys.readouterr().err


def test_service_cli_delegates_evaluate(tmp_path, capsys):
    from service.cli import main as service_main

    assert service_main(["evaluate", *TINY, "--n", "2", "--methods", "random"]) == 0
    assert "| random | -/- |" in capsys.readouterr().out


def test_figure_without_matplotlib_is_a_clear_error_before_any_work(tmp_path, capsys, monkeypatch):
    # A None entry in sys.modules makes the import fail as if matplotlib were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    figure = tmp_path / "fig.png"
    assert main([*TINY, "--n", "2", "--figure", str(figure)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "exclip-service[evaluation]" in err
    assert not figure.exists()


def test_scenes_of_a_fixed_object_count(tmp_path):
    out = tmp_path / "r.json"
    assert main([*TINY, "--n", "3", "--objects", "2", "--methods", "random", "--json", str(out)]) == 0
    _, result = read_json(out)
    assert {s.group for s in result.scores} == {"2 objects"} and len(result.scores) == 6
