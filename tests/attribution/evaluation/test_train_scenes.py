"""scripts/train_scenes.py and attribution.evaluation.scenes_training: deterministic batches, no false
negatives, the sigmoid and binding losses against their formulas, a run that checkpoints and resumes, a
SigLIP-style run that learns."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

from attribution.evaluation.retrieval import scene_pixels
from attribution.evaluation.scenes import describes, generate_scenes
from attribution.evaluation.scenes_training import (
    also_true_mask,
    binding_loss,
    negatives,
    objects_mix,
    sigmoid_losses,
    training_batch,
)
from attribution.models import SCENES_SIGLIP_MODEL, get_tokenizer
from scripts.train_scenes import lr_at, main, reinit_text_embeddings


def test_training_batches_are_fixed_by_seed_and_step():
    mix = objects_mix(0, 100)
    a, b = training_batch(0, 5, 16, mix, 64), training_batch(0, 5, 16, mix, 64)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert [s.caption for s in a] != [s.caption for s in training_batch(0, 6, 16, mix, 64)]
    assert [s.caption for s in a] != [s.caption for s in training_batch(1, 5, 16, mix, 64)]
    late = training_batch(0, 1000, 400, objects_mix(1000, 100), 64)
    counts = np.bincount([len(s.objects) for s in late], minlength=4)[1:] / 400
    assert np.allclose(counts, objects_mix(1000, 100), atol=0.08)


def test_also_true_captions_are_masked_and_nothing_else():
    scenes = generate_scenes(40, 9)
    texts = [s.caption for s in scenes]
    mask = also_true_mask(scenes, texts)
    assert not mask.diagonal().any()
    expected = torch.tensor([[describes(t, s) for t in texts] for s in scenes])
    expected.fill_diagonal_(False)
    assert torch.equal(mask, expected)
    # A scene of a lone red circle and another's "there is a red circle" would be a false negative.
    assert mask.any()


def test_learning_rate_warms_up_holds_and_decays():
    class Args:
        lr, min_lr, warmup, steps, decay_steps = 1e-3, 1e-5, 10, 100, 20

    lrs = [lr_at(s, Args) for s in range(101)]
    assert lrs[0] < lrs[9] == 1e-3 == lrs[79]
    assert lrs[80] > lrs[90] > lrs[100] and abs(lrs[100] - 1e-5) < 1e-12


def test_a_short_run_checkpoints_and_resumes(tmp_path):
    common = [
        "--out",
        str(tmp_path),
        "--batch",
        "4",
        "--held-out",
        "8",
        "--eval-every",
        "1",
        "--ckpt-every",
        "1",
        "--warmup",
        "1",
        "--decay-steps",
        "1",
        "--threads",
        "1",
    ]
    main([*common, "--steps", "2"])
    rows = list(csv.DictReader(open(tmp_path / "curve.csv")))
    assert [r["step"] for r in rows] == ["1", "2"]
    assert all(0 <= float(r["i2t_top1"]) <= 1 and float(r["loss"]) > 0 for r in rows)
    assert (tmp_path / "best.pt").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["step"] == 2
    assert state["metrics"]["i2t_top1"] == float(rows[1]["i2t_top1"])  # what export_scenes.py records
    main([*common, "--steps", "2", "--resume"])  # nothing left to train: last.pt keeps its metrics
    assert torch.load(tmp_path / "last.pt", weights_only=True)["metrics"] == state["metrics"]
    main([*common, "--steps", "3", "--resume"])
    rows = list(csv.DictReader(open(tmp_path / "curve.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert float(rows[2]["wall_s"]) >= float(rows[1]["wall_s"])
    assert "start_step 2" in (tmp_path / "run.txt").read_text().splitlines()[-1]


def test_a_run_starts_from_given_weights(tmp_path):
    """``--init`` loads an exported model (fp16 safetensors, as shipped); with a zero learning rate the
    weights the run saves are exactly those, patch dropout (a training-only change) included."""
    import open_clip
    from safetensors.torch import save_file

    from attribution.models import SCENES_MODEL

    torch.manual_seed(123)
    weights = {
        k: v.half() for k, v in open_clip.create_model(SCENES_MODEL, pretrained=None).state_dict().items()
    }
    init = tmp_path / "init.safetensors"
    save_file(weights, str(init))
    out = tmp_path / "run"
    args = ["--out", str(out), "--batch", "4", "--held-out", "8", "--eval-every", "1", "--threads", "1"]
    main([*args, "--steps", "1", "--lr", "0", "--min-lr", "0", "--init", str(init), "--patch-dropout", "0.5"])
    saved = torch.load(out / "last.pt", weights_only=False)["model"]
    assert saved.keys() == weights.keys()
    assert all(torch.equal(saved[k], weights[k].float()) for k in weights)
    assert float(next(csv.DictReader(open(out / "curve.csv")))["loss"]) > 0
    # A run's own last.pt (optimiser, arguments) is weights too, loadable without unpickling code.
    main(
        [
            *args[:1],
            str(tmp_path / "again"),
            *args[2:],
            "--steps",
            "1",
            "--lr",
            "0",
            "--min-lr",
            "0",
            "--init",
            str(out / "last.pt"),
        ]
    )
    again = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(again[k], saved[k]) for k in saved)
    # And a run without --init starts elsewhere (the test above could not pass by accident).
    main([*args[:1], str(tmp_path / "fresh"), *args[2:], "--steps", "1", "--lr", "0", "--min-lr", "0"])
    fresh = torch.load(tmp_path / "fresh" / "last.pt", weights_only=False)["model"]
    assert not torch.equal(fresh["visual.conv1.weight"], weights["visual.conv1.weight"].float())


@pytest.mark.parametrize("share", ["1", "1.5", "-0.1", "nan"])
def test_patch_dropout_outside_its_range_is_a_usage_error(share, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--patch-dropout", share])
    assert exit_info.value.code == 2  # argparse's usage error, before any model is built
    assert "--patch-dropout: must be at least 0 and below 1" in capsys.readouterr().err


def test_sigmoid_loss_is_siglips_pairwise_loss_with_the_swaps_as_negatives():
    """Against the formula written out pair by pair: label +1 for an image's own caption, -1 for every
    other caption and every swap, pairs whose text is also true of the image left out, summed / n."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model(SCENES_SIGLIP_MODEL, pretrained=None)
    with torch.no_grad():  # away from the initial values, so scale and bias are both exercised
        model.logit_scale.fill_(math.log(7.0))
        model.logit_bias.fill_(-2.0)
    scenes = generate_scenes(6, 11) + generate_scenes(2, 11)[:1]  # the last repeats the first: also true
    captions = [s.caption for s in scenes]
    neg_texts, owners = negatives(scenes, np.random.default_rng(0))
    texts = captions + neg_texts
    also_true = also_true_mask(scenes, texts)
    assert also_true[6, 0] and owners  # the cases the formula must leave out and include
    tokens = get_tokenizer(SCENES_SIGLIP_MODEL)(texts)
    pixels = scene_pixels(scenes, torch.zeros(3), torch.ones(3))
    loss, binding = sigmoid_losses(model, pixels, tokens, also_true, owners)

    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1)
    n, expected = len(scenes), 0.0
    for i in range(n):
        for j in range(len(texts)):
            if also_true[i, j]:
                continue
            logit = 7.0 * float(img[i] @ txt[j]) - 2.0
            label = 1.0 if i == j else -1.0
            expected += math.log1p(math.exp(-label * logit))
    assert float(loss) == pytest.approx(expected / n, rel=1e-5)
    # The binding loss sees the same logits; the bias cancels among an image's own captions.
    logits = (7.0 * img @ txt.T - 2.0).masked_fill(also_true, float("-inf"))
    assert float(binding) == pytest.approx(float(binding_loss(logits, owners)), rel=1e-6)


def test_binding_loss_chooses_among_an_images_own_caption_and_swaps():
    # Two images, two captions; negatives 0 and 1 belong to image 0, none to image 1.
    logits = torch.tensor([[2.0, 9.0, 1.0, 0.0], [5.0, 3.0, 7.0, 7.0]])
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(1) + math.exp(0)))
    assert float(binding_loss(logits, [0, 0])) == pytest.approx(expected)
    assert float(binding_loss(logits[:, :2], [])) == 0.0


def _sigmoid_loss_on(scenes: list, state: dict | None) -> float:
    """The sigmoid loss (with swaps) of the SigLIP-style model on ``scenes``: ``state``, else its init."""
    import open_clip

    torch.manual_seed(0)  # the training script's initialisation for --seed 0
    model = open_clip.create_model(SCENES_SIGLIP_MODEL, pretrained=None)
    if state is not None:
        model.load_state_dict(state)
    neg_texts, owners = negatives(scenes, np.random.default_rng(0))
    texts = [s.caption for s in scenes] + neg_texts
    tokens = get_tokenizer(SCENES_SIGLIP_MODEL)(texts)
    mean, std = (torch.tensor(model.visual.preprocess_cfg[k]) for k in ("mean", "std"))
    with torch.no_grad():
        loss, _ = sigmoid_losses(
            model, scene_pixels(scenes, mean, std), tokens, also_true_mask(scenes, texts), owners
        )
    return float(loss)


def test_a_short_siglip_run_lowers_the_sigmoid_loss(tmp_path):
    """The SigLIP-style architecture and the sigmoid loss through the script, 20 steps of 8 scenes: the
    loss on scenes it never trained on falls well below that of its initial weights."""
    main(
        [
            "--out",
            str(tmp_path),
            "--arch",
            SCENES_SIGLIP_MODEL,
            "--loss",
            "sigmoid",
            "--steps",
            "20",
            "--batch",
            "8",
            "--lr",
            "5e-3",
            "--held-out",
            "8",
            "--eval-every",
            "20",
            "--ckpt-every",
            "20",
            "--warmup",
            "5",
            "--threads",
            "1",
        ]
    )
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["args"]["arch"] == SCENES_SIGLIP_MODEL and state["step"] == 20
    unseen = generate_scenes(16, 77)
    before, after = _sigmoid_loss_on(unseen, None), _sigmoid_loss_on(unseen, state["model"])
    assert after < 0.9 * before, (before, after)  # measured: 10.08 -> 8.67


def test_patch_dropout_needs_open_clips_own_vit(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--arch", SCENES_SIGLIP_MODEL, "--patch-dropout", "0.5"])
    assert exit_info.value.code == 2
    assert "--patch-dropout needs open_clip's own ViT" in capsys.readouterr().err


def test_text_embeddings_are_drawn_again_at_the_given_scale():
    import open_clip

    from attribution.models import SCENES_MODEL

    for arch in (SCENES_SIGLIP_MODEL, SCENES_MODEL):  # CustomTextCLIP (.text) and CLIP (itself)
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        text = getattr(model, "text", model)
        assert float(text.positional_embedding.std()) == pytest.approx(0.01, rel=0.1)  # open_clip's
        reinit_text_embeddings(model, 0.125)
        assert float(text.positional_embedding.std()) == pytest.approx(0.125, rel=0.1)
        assert float(text.token_embedding.weight.std()) == pytest.approx(0.125, rel=0.1)
