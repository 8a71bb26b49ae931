"""Blending is exact: live mixes equal merged weights, zero weights are the base model bit
for bit, LBW removes exactly one block; baked and resized files reproduce the mix."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.generation.engine import AdapterUse, Engine, GenerateRequest


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    from toyworld.fidelity import train
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path_factory.mktemp("blend") / "ws")
    plain = dict(steps=6, alpha=8.0, prior_preservation=False)
    a = train(workspace, name="a", rank=4, type="lora", **plain)
    b = train(workspace, name="b", rank=8, type="locon", conv_rank=4, conv_alpha=8.0, **plain)
    return a, b


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=g)
    text = torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500, 20]), text).sample


def _merged_base(paths_weights, blocks_off=()):
    """The base UNet with w * dW of each adapter added to its weights (except in blocks_off)."""
    from studio.adapters import load_adapter
    from studio.models.families.unet import module_block
    from studio.adapters.formats.naming import name_table
    from studio.models import load_pipeline

    pipe = load_pipeline("builtin")
    table = name_table("sd15", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    with torch.no_grad():
        for path, weight in paths_weights:
            for name, module in load_adapter(path).modules.items():
                target = table[name]
                if module_block(target.path, pipe.unet.config) in blocks_off:
                    continue
                target.layer.weight.add_(weight * module.delta(target.layer.weight.shape))
    return pipe


@pytest.mark.slow
def test_live_mix_equals_merged_weights_and_zero_is_base(two_adapters):
    a, b = two_adapters
    engine = Engine()
    base = _unet_out(engine.set_mix("builtin", []))
    mixed = _unet_out(engine.set_mix("builtin", [AdapterUse(a, 0.7), AdapterUse(b, -1.2)]))
    expected = _unet_out(_merged_base([(a, 0.7), (b, -1.2)]))
    assert (mixed - base).abs().max() > 1e-3
    assert (mixed - expected).abs().max() <= 1e-4
    zero = _unet_out(engine.set_mix("builtin", [AdapterUse(a, 0.0), AdapterUse(b, 0.0)]))
    assert torch.equal(zero, base)
    assert torch.equal(_unet_out(engine.set_mix("builtin", [])), base)
    assert engine.pipeline_loads == 1


@pytest.mark.slow
def test_any_sequence_of_mixes_ends_where_a_fresh_engine_starts(two_adapters, tmp_path):
    """Merged mixes are recomputed from the original weights: switching through mixes
    (including a DoRA adapter, which runs live and needs the original weights back) never
    accumulates rounding or leaves a delta behind."""
    from toyworld.fidelity import train
    from studio.workspace import Workspace

    a, b = two_adapters
    dora = train(Workspace.open(tmp_path / "ws"), name="dora", steps=4, rank=4, alpha=8.0, type="lora",
                 use_dora=True, prior_preservation=False)
    engine = Engine()
    base = _unet_out(engine.set_mix("builtin", []))
    mixes = ([AdapterUse(a, 0.7)], [AdapterUse(a, 0.3), AdapterUse(b, 1.1)], [AdapterUse(dora, 1.0), AdapterUse(a, 0.7)],
             [AdapterUse(b, -2.0, te_weight=0.5)], [AdapterUse(dora, 1.0), AdapterUse(a, 0.7)], [AdapterUse(a, 0.7)])
    for mix in mixes:
        assert torch.equal(_unet_out(engine.set_mix("builtin", mix)), _unet_out(Engine().set_mix("builtin", mix)))
    assert torch.equal(_unet_out(engine.set_mix("builtin", [])), base)
    with_dora = _unet_out(engine.set_mix("builtin", mixes[2]))
    assert (with_dora - _unet_out(engine.set_mix("builtin", mixes[0]))).abs().max() > 1e-4


@pytest.mark.slow
def test_block_weight_removes_exactly_one_block(two_adapters):
    a, _ = two_adapters
    engine = Engine()
    blocks = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
    vector = ",".join("0" if name == "M00" else "1" for name in blocks)
    live = _unet_out(engine.set_mix("builtin", [AdapterUse(a, 1.0, block_weights=vector)]))
    expected = _unet_out(_merged_base([(a, 1.0)], blocks_off={"M00"}))
    full = _unet_out(_merged_base([(a, 1.0)]))
    assert (live - expected).abs().max() <= 1e-4
    assert (live - full).abs().max() > 1e-5  # the middle block did contribute


@pytest.mark.slow
def test_bake_reproduces_the_live_mix_and_resize_to_full_rank_is_lossless(two_adapters, tmp_path):
    from studio.adapters import load_adapter
    from studio.adapters.mixing import bake, resize

    a, b = two_adapters
    engine = Engine()
    request = dict(prompt="a sks shape on a white background", seed=2, steps=8)
    live = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(a, 0.8), AdapterUse(b, 0.6)]))[0]
    baked = bake([(a, 0.8), (b, 0.6)], tmp_path / "baked.safetensors")
    assert baked.ranks == [4, 12]  # a's rank-4 modules alone; shared modules 4 + 8
    from_file = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(baked.path, 1.0)]))[0]
    diff = np.abs(np.asarray(live, dtype=np.int16) - np.asarray(from_file, dtype=np.int16)).max()
    assert diff <= 1, diff
    assert "a:0.8" in load_adapter(baked.path).metadata["modelspec.merged_from"]

    full = resize(baked.path, tmp_path / "full.safetensors", rank=12)
    assert min(full.energy_kept.values()) == pytest.approx(1.0, abs=1e-6)
    small = resize(baked.path, tmp_path / "small.safetensors", rank=2)
    assert small.ranks == [2] and min(small.energy_kept.values()) < 1.0


@pytest.mark.slow
def test_cli_fuse_grid_suggest_resize(two_adapters, tmp_path):
    from PIL import Image

    from studio.generation.engine import GenerateRequest
    from tests.conftest import run_cli

    a, b = two_adapters
    fused = tmp_path / "fused.safetensors"
    result = run_cli("fuse", f"{a}:0.8", f"{b}:0.6", "--out", fused)
    assert result.returncode == 0, result.stderr
    engine = Engine()
    request = dict(prompt="a sks shape on a white background", seed=4, steps=6)
    live = engine.generate(GenerateRequest(**request, adapters=[AdapterUse(a, 0.8), AdapterUse(b, 0.6)]))[0]
    from_checkpoint = engine.generate(GenerateRequest(**request, model=str(fused)))[0]
    assert np.abs(np.asarray(live, dtype=np.int16) - np.asarray(from_checkpoint, dtype=np.int16)).max() <= 1

    grid = run_cli("grid", "--prompt", "a sks shape on a white background", "--adapter", a, "--x", "adapter0=0,1",
                   "--y", "seed=1,2", "--steps", "4", "--out", tmp_path / "grid.png")
    assert grid.returncode == 0, grid.stderr
    sheet = Image.open(tmp_path / "grid.png")
    assert sheet.width >= 2 * 64 and sheet.height >= 2 * 64 and (tmp_path / "grid-1-1.png").exists()
    cells = [np.asarray(Image.open(tmp_path / f"grid-0-{i}.png"), dtype=np.int16) for i in (0, 1)]
    assert np.abs(cells[0] - cells[1]).mean() > 1  # weight 0 vs 1 differ

    resized = run_cli("resize", a, "--out", tmp_path / "r.safetensors", "--sv-fro", "0.9")
    assert resized.returncode == 0 and "energy kept" in resized.stdout, resized.stderr
    bad = run_cli("resize", a, "--out", tmp_path / "r2.safetensors", "--sv-fro", "3")
    assert bad.returncode == 2 and "sv-fro" in bad.stderr

    workspace = a.parent.parent
    suggested = run_cli("suggest", "--prompt", "a sks shape on a black background", "--workspace", workspace)
    assert suggested.returncode == 0, suggested.stderr
    assert "<lora:a:" in suggested.stdout and "trigger word 'sks'" in suggested.stdout


def test_a1111_tags_read_and_written_back():
    from pathlib import Path

    from studio.errors import StudioError
    from studio.generation.engine import lora_tag, parse_prompt_loras

    prompt, uses = parse_prompt_loras(
        "a star <lora:a:0.8> on <lora:b:0.5:1.2> white <lora:c:1:lbw=OUTD> <lora:d:unet=0.3:te=0>", Path)
    assert prompt == "a star on white"
    assert [(u.path.name, u.weight, u.text_encoder_weight, u.block_weights) for u in uses] == [
        ("a", 0.8, 0.8, None), ("b", 1.2, 0.5, None), ("c", 1.0, 1.0, "OUTD"), ("d", 0.3, 0.0, None)]
    assert parse_prompt_loras(" ".join(lora_tag(u.path.name, u) for u in uses), Path)[1] == uses
    with pytest.raises(StudioError, match="unknown setting 'dyn'"):
        parse_prompt_loras("<lora:a:1:dyn=4>", Path)
    with pytest.raises(StudioError, match="'x' is not a number"):
        parse_prompt_loras("<lora:a:1:x>", Path)
