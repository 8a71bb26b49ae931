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


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(6, 10, 3, padding=1, stride=2)

    def forward(self, sample, timestep):
        return self.conv1(sample)


def _conv_adapter(ortho: bool, perturb: bool):
    torch.manual_seed(0)
    net = ConvNet()
    adapter = inject_tlora(net, ["conv1"], rank=8, alpha=4.0, ortho=ortho, schedule=TLoRASchedule(8, 2, 2.0))
    layer = next(iter(adapter.layers.values()))
    if perturb:
        with torch.no_grad():
            for param in layer.parameters():
                param.add_(torch.randn_like(param) * 0.1)
    return net, adapter, layer


@pytest.mark.parametrize("ortho", [True, False])
def test_conv_mask_keeps_the_first_ranks_the_formula_gives(ortho):
    """On a Conv2d the mask keeps the first r(t) inner channels of the conv LoRA."""
    import torch.nn.functional as F

    net, adapter, layer = _conv_adapter(ortho, perturb=True)
    x = torch.randn(1, 6, 9, 9)
    base = net.conv1(x)
    for t in (0, 300, 700, 999):
        r = math.floor(((1000 - t) / 1000) ** 2.0 * (8 - 2)) + 2
        geometry = {"stride": 2, "padding": 1}
        expected = F.conv2d(F.conv2d(x, layer.q[:r], **geometry) * layer.lam[:r, None, None],
                            layer.p[:, :r, None, None])
        if ortho:
            expected -= F.conv2d(F.conv2d(x, layer.q0[:r], **geometry) * layer.lam0[:r, None, None],
                                 layer.p0[:, :r, None, None])
        got = net(x, torch.tensor([t])) - base
        assert torch.allclose(got, adapter.scale * expected, atol=1e-5), t
    # every rank on is the plain LoCon-shaped pair
    up, down = layer.plain_factors()
    assert up.shape == (10, 16 if ortho else 8, 1, 1) and down.shape == (16 if ortho else 8, 6, 3, 3)
    plain = F.conv2d(F.conv2d(x, down, stride=2, padding=1), up)
    assert torch.allclose(net(x, torch.tensor([0])) - base, adapter.scale * plain, atol=1e-5)


def test_conv_ortho_init_delta_is_zero():
    net, adapter, layer = _conv_adapter(ortho=True, perturb=False)
    x = torch.randn(2, 6, 9, 9)
    assert (net(x, torch.tensor([10, 990])) - net.conv1(x)).abs().max() <= 1e-6
    adapter.detach()
    assert layer.q.shape == (8, 6, 3, 3) and layer.p.shape == (10, 8)


@pytest.mark.slow
@pytest.mark.parametrize("conv", [False, True])
def test_tlora_generation_masked_all_ranks_and_plain_export(conv, workspace, caplog):
    """On the built-in model: a trained T-LoRA's native file reloads with its schedule; the
    timestep mask changes the image; the plain kohya export (rank 2r, with a warning)
    reproduces the all-ranks image. With `tlora_conv` the ResNet convs are adapted too and
    the plain export holds LoCon-shaped conv modules."""
    from dataclasses import replace

    import numpy as np

    from studio.adapters import convert_adapter, load_adapter, read_checked_header
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest
    from studio.jobs.runs import create_run
    from studio.adapters.methods.tlora_layers import is_tlora_metadata, load_tlora
    from studio.config import network_config
    from tests.conftest import demo_config
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=30, learning_rate=3e-3)
    config.network = network_config("tlora", like=config.network, rank=8, tlora_min_rank=2, tlora_conv=conv)
    native = AdapterTrainer(create_run(config, workspace), show_progress=False).run()
    convs = [name for name, module in load_adapter(native).modules.items() if module.is_conv_kernel]
    assert bool(convs) == conv and (not conv or any("resnets" in name for name in convs))
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
