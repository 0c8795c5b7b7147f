"""attribution.memory: tangent passes sized from the device's free memory."""

from __future__ import annotations

import pytest
import torch

from attribution.errors import InvalidOption
from attribution.explainer import Explainer
from attribution.memory import (
    CPU_MAX_TANGENTS,
    CUDA_MAX_TANGENTS,
    MIN_TANGENTS,
    ROW_FACTOR,
    free_memory_bytes,
    tangent_budget,
    widest_mlp,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_widest_mlp_reads_both_towers(tiny_model):
    model = tiny_model.model
    text = model.transformer.resblocks[0].mlp.c_fc.out_features
    image = model.visual.transformer.resblocks[0].mlp.c_fc.out_features
    assert widest_mlp(model) == max(text, image)


@pytest.mark.parametrize("dtype,bytes_", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2)])
def test_budget_is_the_free_share_over_a_rows_cost(tiny_model, dtype, bytes_):
    width = widest_mlp(tiny_model.model)
    row = ROW_FACTOR * width * bytes_
    free = 300 * row  # between the floor and the caps
    assert tangent_budget(width, CUDA, dtype, 0.5, free_bytes=free) == 150
    assert tangent_budget(width, CPU, dtype, 1.0, free_bytes=free) == 300
    # Less precision, twice the rows in the same memory.
    if bytes_ == 2:
        assert tangent_budget(width, CUDA, dtype, 0.5, free) == 2 * tangent_budget(
            width, CUDA, torch.float32, 0.5, free
        )


def test_budget_is_bounded_by_the_device_and_a_floor(tiny_model):
    width = widest_mlp(tiny_model.model)
    plenty = 1 << 50
    assert tangent_budget(width, CUDA, torch.float32, 0.5, free_bytes=plenty) == CUDA_MAX_TANGENTS
    assert tangent_budget(width, CPU, torch.float32, 0.5, free_bytes=plenty) == CPU_MAX_TANGENTS
    assert tangent_budget(width, CUDA, torch.float32, 0.5, free_bytes=0) == MIN_TANGENTS


def test_free_memory_on_this_cpu_is_read():
    free = free_memory_bytes(CPU)
    assert free is not None and 0 < free < 1 << 50
    assert tangent_budget(widest_mlp(torch.nn.Linear(1, 1)), CPU, torch.float32) <= CPU_MAX_TANGENTS


@pytest.mark.parametrize("layer", [0, 2])
def test_results_do_not_depend_on_the_pass_size(tiny_model, layer):
    """The sized passes (None) and tiny fixed ones (chunked points and tokens) give the same matrix."""
    model, tokenizer = tiny_model.model, tiny_model.tokenizer
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(layer))
    caption = ["a small red circle next to a large blue square on a noisy background"]
    sized = Explainer(model, tokenizer, layer, layer, 5).explain(image, caption)[0]
    chunked = Explainer(model, tokenizer, layer, layer, 5, max_tangents=7).explain(image, caption)[0]
    torch.testing.assert_close(sized.interactions, chunked.interactions, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("options", [{"max_tangents": 0}, {"memory_fraction": 0.0}, {"memory_fraction": 1.5}])
def test_bad_budget_options_are_refused(tiny_model, options):
    with pytest.raises(InvalidOption):
        Explainer(tiny_model.model, tiny_model.tokenizer, **options)


@pytest.mark.parametrize("options", [{"max_tangents": 1}, {"memory_fraction": 1.0}])
def test_budget_options_at_their_limits_are_accepted(tiny_model, options):
    """The smallest pass and the whole free memory are valid (a mutant refusing 1.0 survived)."""
    explainer = Explainer(tiny_model.model, tiny_model.tokenizer, **options)
    assert all(getattr(explainer, name) == value for name, value in options.items())
