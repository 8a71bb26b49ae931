"""T-LoRA: the paper's rank schedule, exact-zero Ortho-LoRA init, per-sample masks."""
from __future__ import annotations

import math

import pytest
import torch

from studio.adapters.methods.tlora_layers import TLoRALayer, TLoRASchedule, inject_tlora


@pytest.mark.parametrize("rank,min_rank,exponent", [(64, 32, 1.0), (8, 2, 2.0), (16, 1, 0.5)])
def test_rank_matches_paper_formula(rank, min_rank, exponent):
    schedule = TLoRASchedule(rank, min_rank, exponent)
    for t in (0, 1, 250, 500, 777, 999, 1000):
        expected = math.floor(((1000 - t) / 1000) ** exponent * (rank - min_rank)) + min_rank
        assert int(schedule.rank_at(torch.tensor(t))) == expected
    mask = schedule.mask(torch.tensor([0, 999]))
    assert mask.shape == (2, rank)
    assert mask[0].sum() == rank and mask[1].sum() == min_rank
    assert torch.equal(mask[1, :min_rank], torch.ones(min_rank))  # the first components stay on


def test_ortho_init_delta_is_zero_and_training_moves_it():
    layer = TLoRALayer(32, 48, 8, ortho=True, generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, 5, 32)
    mask = TLoRASchedule(8, 2).mask(torch.tensor([10, 500, 990]))
    assert layer.delta(x, mask).abs().max() <= 1e-6
    # the factors are the LAST singular triplets of the random matrix R ~ N(0, 1/r)
    random = torch.randn(48, 32, generator=torch.Generator().manual_seed(0)) / math.sqrt(8)
    assert torch.allclose(layer.lam, torch.linalg.svdvals(random)[-8:], atol=1e-5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer.delta(x, mask) * torch.randn(3, 5, 48)).sum().backward()  # any non-zero gradient
    opt.step()
    assert layer.delta(x, mask).abs().max() > 1e-3


def test_mask_is_per_sample_and_plain_factors_equal_all_ranks():
    torch.manual_seed(0)
    layer_input = torch.randn(2, 7, 16)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(16, 16)

        def forward(self, sample, timestep):
            return self.to_q(sample)

    net = Net()
    adapter = inject_tlora(net, ["to_q"], rank=8, alpha=4.0, ortho=True, schedule=TLoRASchedule(8, 2))
    layer = next(iter(adapter.layers.values()))
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    base = net.to_q(layer_input)
    both = net(layer_input, torch.tensor([0, 999]))
    first = net(layer_input[:1], torch.tensor([0]))
    second = net(layer_input[1:], torch.tensor([999]))
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-6)
    assert not torch.allclose(first, net(layer_input[:1], torch.tensor([999])), atol=1e-4)
    # t = 0 switches every rank on: that is the plain (rank 2r) LoRA
    up, down = layer.plain_factors()
    assert up.shape == (16, 16) and down.shape == (16, 16)
    plain = base[:1] + adapter.scale * layer_input[:1] @ (up @ down).t()
    assert torch.allclose(first, plain, atol=1e-5)
    adapter.detach()
    assert torch.allclose(net(layer_input, torch.tensor([0, 999])), base)


@pytest.mark.slow
def test_tlora_generation_masked_all_ranks_and_plain_export(workspace, caplog):
    """On the built-in model: a trained T-LoRA's native file reloads with its schedule; the
    timestep mask changes the image; the plain kohya export (rank 2r, with a warning)
    reproduces the all-ranks image."""
    from dataclasses import replace

    import numpy as np

    from studio.adapters import convert_adapter, load_adapter, read_checked_header
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest
    from studio.jobs.runs import create_run
    from studio.adapters.methods.tlora_layers import is_tlora_metadata, load_tlora
    from tests.conftest import demo_config
    from trainers.lora import Trainer

    config = demo_config(max_steps=30, learning_rate=3e-3)
    config.network.type, config.network.rank, config.network.tlora_min_rank = "tlora", 8, 2
    native = Trainer(create_run(config, workspace), show_progress=False).run()
    assert is_tlora_metadata(read_checked_header(native)[1])
    assert load_tlora(native).schedule == TLoRASchedule(8, 2, 1.0)

    engine = Engine()
    request = GenerateRequest("a sks shape on a white background", steps=10, seed=3)

    def image(*adapters) -> np.ndarray:
        return np.asarray(engine.generate(replace(request, adapters=list(adapters)))[0], dtype=float)

    masked = image(AdapterUse(native))
    all_ranks = image(AdapterUse(native, tlora_masked=False))
    base = image()
    effect = np.abs(all_ranks - base).mean()
    assert effect > 1.0
    assert np.abs(masked - all_ranks).mean() > max(0.5, 0.1 * effect)

    plain = workspace.adapters_dir / "plain.safetensors"
    with caplog.at_level("WARNING", logger="studio.adapters"):
        convert_adapter(native, plain, format="kohya")
    assert "schedule is lost" in caplog.text and "rank 16" in caplog.text
    meta = read_checked_header(plain)[1]
    assert not is_tlora_metadata(meta) and meta["ss_network_module"] == "networks.lora"
    assert {module.rank for module in load_adapter(plain).modules.values()} == {16}
    assert np.abs(image(AdapterUse(plain)) - all_ranks).max() <= 1
