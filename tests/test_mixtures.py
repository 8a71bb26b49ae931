"""Mixtures of adapters: a mixture file loads wherever an adapter loads; constant gates are
the weighted blend, a zero gate removes a member, per-block gates weight blocks exactly for
LoRA, LoHa and LoKr members; a banded gate follows the step schedule; bake writes the live
mixture as one LoRA and refuses gates that change with the step or the prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.errors import StudioError
from studio.models.families.unet import FULL_BLOCKS, module_block
from studio.generation.engine import AdapterUse, Engine, GenerateRequest

REQUEST = dict(prompt="a sks shape on a white background", seed=3, steps=6)


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A LoRA, a LoHa and a LoKr trained a few steps on the demo data, in one library folder."""
    from toyworld.fidelity import train
    from studio.workspace import Workspace

    torch.manual_seed(0)  # the adapters' random init
    workspace = Workspace.open(tmp_path_factory.mktemp("mix") / "ws")
    plain = dict(steps=6, prior_preservation=False, learning_rate=5e-3)
    paths = [train(workspace, name="lora", rank=4, alpha=4.0, type="lora", **plain),
             train(workspace, name="loha", rank=4, alpha=4.0, type="loha", **plain),
             train(workspace, name="lokr", rank=4, alpha=4.0, type="lokr", **plain)]
    return workspace, paths


@pytest.fixture(scope="module")
def engine():
    return Engine()


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(2, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size, generator=g)
    text = torch.randn(2, 8, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return pipe.unet(sample, torch.tensor([500, 20]), text).sample


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def _save(workspace, name, paths, gate="block", **kw):
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    return save_mixture(workspace.adapters_dir / f"{name}.safetensors", _edit(new_mixture(paths, gate, **kw)))


def _edit(mixture, **tensors):
    mixture.tensors.update(tensors)
    return mixture


@pytest.mark.slow(seconds=40)
def test_constant_gates_are_the_weighted_blend_everywhere_an_adapter_loads(library, engine):
    from studio.adapters.library import find_adapter
    from studio.generation.engine import parse_prompt_loras

    workspace, paths = library
    weights = [0.7, 1.3, 0.6]
    mix = _save(workspace, "blend", paths, weights=weights)
    blend = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(p, w) for p, w in zip(paths, weights)])))
    base = _pixels(engine.generate(GenerateRequest(**REQUEST)))
    live = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(mix, 1.0)])))
    assert np.abs(blend - base).max() > 8  # the members change the picture
    assert np.abs(live - blend).max() <= 1
    prompt, uses = parse_prompt_loras(REQUEST["prompt"] + " <lora:blend:1>", lambda n: find_adapter(workspace, n))
    tagged = _pixels(engine.generate(GenerateRequest(**{**REQUEST, "prompt": prompt}, adapters=uses)))
    assert np.abs(tagged - blend).max() <= 1
    assert engine.pipeline_loads == 1  # changing the mix never reloaded the base model


def merged_unet(paths, gates):
    """The base model with gate[k, block] x dW_k of each member added to its weights."""
    from studio.adapters import load_adapter
    from studio.adapters.formats.naming import name_table
    from studio.models.blocks import block_weight
    from studio.models import load_pipeline

    pipe = load_pipeline("builtin")
    table = name_table("sd15", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    with torch.no_grad():
        for path, row in zip(paths, gates.tolist()):
            for name, module in load_adapter(path).modules.items():
                target = table[name]
                block = module_block(target.path, pipe.unet.config) if target.attr == "unet" else "BASE"
                weight = block_weight(dict(zip(FULL_BLOCKS, row)), block)
                target.layer.weight.add_(weight * module.delta(target.layer.weight.shape))
    return pipe


@pytest.mark.slow(seconds=20)
def test_a_zero_gate_is_the_mix_without_that_member_and_blocks_are_weighted_exactly(library, engine):
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    workspace, paths = library
    gates = torch.rand(3, len(FULL_BLOCKS), generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    full = save_mixture(workspace.adapters_dir / "gated.safetensors", _edit(new_mixture(paths), **{"gate.block": gates}))
    without = gates.clone()
    without[2] = 0
    zero = save_mixture(workspace.adapters_dir / "zero.safetensors", _edit(new_mixture(paths), **{"gate.block": without}))
    two = save_mixture(workspace.adapters_dir / "two.safetensors",
                       _edit(new_mixture(paths[:2]), **{"gate.block": without[:2]}))
    assert torch.equal(_unet_out(engine.set_mix("builtin", [AdapterUse(zero, 1.0)])),
                       _unet_out(engine.set_mix("builtin", [AdapterUse(two, 1.0)])))
    live = _unet_out(engine.set_mix("builtin", [AdapterUse(full, 1.0)]))
    assert (live - _unet_out(merged_unet(paths, gates))).abs().max() <= 1e-4  # LoRA + LoHa + LoKr, per block
    assert (live - _unet_out(merged_unet(paths, torch.ones_like(gates)))).abs().max() > 1e-3


@pytest.mark.slow(seconds=20)
def test_a_gate_per_timestep_band_is_the_step_schedule(library, engine):
    """DDIM with 6 steps runs timesteps 831, 665, 499, 333, 167, 1 here: with 2 bands, the
    first two steps are in band 1 (t >= 500). Band 0 off = the members stopped after step 2."""
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    workspace, paths = library
    mixture = new_mixture(paths[:2], "block_timestep", weights=[0.8, 1.1], bands=2)
    mixture.tensors["gate.bands"][:, 0] = 0
    banded = save_mixture(workspace.adapters_dir / "banded.safetensors", mixture)
    live = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(banded, 1.0)])))
    stopped = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(paths[0], 0.8, stop=2),
                                                                            AdapterUse(paths[1], 1.1, stop=2)])))
    always = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(paths[0], 0.8),
                                                                           AdapterUse(paths[1], 1.1)])))
    assert np.abs(live - stopped).max() <= 1
    assert np.abs(live - always).max() > 1


@pytest.mark.slow(seconds=30)
def test_bake_writes_the_live_mixture_and_refuses_step_or_prompt_dependent_gates(library, engine, tmp_path):
    from studio.adapters.mixing import bake
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    workspace, paths = library
    mixture = new_mixture(paths, "block", weights=[0.9, 0.5, 1.2])
    mixture.tensors["gate.block"][:, FULL_BLOCKS.index("M00")] = 0
    mixture.tensors["gate.block"][1, FULL_BLOCKS.index("OUT05")] = 2.0
    path = save_mixture(workspace.adapters_dir / "tobake.safetensors", mixture)
    baked = bake([(path, 0.75)], tmp_path / "baked.safetensors").path
    live = _unet_out(engine.set_mix("builtin", [AdapterUse(path, 0.75)]))
    assert (live - _unet_out(engine.set_mix("builtin", [AdapterUse(baked, 1.0)]))).abs().max() <= 1e-4
    images = [_pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(p, w)])))
              for p, w in ((path, 0.75), (baked, 1.0))]
    assert np.abs(images[0] - images[1]).max() <= 1

    banded = new_mixture(paths[:2], "block_timestep", bands=3)
    flat = save_mixture(workspace.adapters_dir / "flat.safetensors", banded)  # equal bands: one weight per layer, bakeable
    bake([(flat, 1.0)], tmp_path / "flat-baked.safetensors")
    banded.tensors["gate.bands"][0, 2] = 0.5
    save_mixture(workspace.adapters_dir / "steps.safetensors", banded)
    with pytest.raises(StudioError, match="change with the denoising timestep"):
        bake([(workspace.adapters_dir / "steps.safetensors", 1.0)], tmp_path / "no.safetensors")
    prompt = save_mixture(workspace.adapters_dir / "prompt.safetensors",
                          new_mixture(paths[:2], "prompt", embedding_dim=32))
    with pytest.raises(StudioError, match="depend on the prompt"):
        bake([(prompt, 1.0)], tmp_path / "no.safetensors")


@pytest.mark.slow(seconds=12)
def test_members_are_found_by_hash_and_a_mixture_is_not_an_adapter(library, tmp_path):
    import shutil

    from studio.adapters import load_adapter
    from studio.adapters.mixtures.file import load_mixture, new_mixture, save_mixture

    _, paths = library
    folder = tmp_path / "lib"
    folder.mkdir()
    shutil.copy(paths[0], folder / "renamed.safetensors")
    shutil.copy(paths[1], folder / "loha.safetensors")
    path = save_mixture(folder / "m.safetensors", new_mixture([folder / "renamed.safetensors", folder / "loha.safetensors"]))
    (folder / "renamed.safetensors").rename(folder / "moved.safetensors")
    assert [m.path.name for m in load_mixture(path).members] == ["moved.safetensors", "loha.safetensors"]
    shutil.copy(paths[2], folder / "loha.safetensors")  # another adapter under the member's name
    with pytest.raises(StudioError, match="member 'loha'.*not in"):
        load_mixture(path)
    with pytest.raises(StudioError, match="is a mixture of adapters"):
        load_adapter(path)


@pytest.mark.slow(seconds=20)
def test_arrow_routing_reduces_to_the_blend_where_it_must_and_leaves_nothing_behind(library, engine):
    """One member routed (top 1) is that member; every member routed at a temperature so
    high that the softmax is flat is the blend with weights 1/K (LoRA, LoHa and LoKr
    alike); routing off is the base model bit for bit."""
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    workspace, paths = library
    base = _unet_out(engine.set_mix("builtin", []))
    single = _unet_out(engine.set_mix("builtin", [AdapterUse(paths[1], 0.8)], route=True))
    assert (single - _unet_out(engine.set_mix("builtin", [AdapterUse(paths[1], 0.8)]))).abs().max() <= 1e-4
    flat = save_mixture(workspace.adapters_dir / "flat-arrow.safetensors",
                        new_mixture(paths, "arrow", top_k=3, temperature=1e9))
    routed = _unet_out(engine.set_mix("builtin", [AdapterUse(flat, 1.0)]))
    third = _unet_out(engine.set_mix("builtin", [AdapterUse(p, 1 / 3) for p in paths]))
    assert (routed - third).abs().max() <= 1e-4 and (routed - base).abs().max() > 1e-3
    sharp = save_mixture(workspace.adapters_dir / "arrow.safetensors", new_mixture(paths, "arrow", top_k=1))
    top1 = _unet_out(engine.set_mix("builtin", [AdapterUse(sharp, 1.0)]))
    assert (top1 - third).abs().max() > 1e-4  # each token went to its own member
    assert torch.equal(_unet_out(engine.set_mix("builtin", [])), base)
    image = engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(p) for p in paths], route=True))[0]
    assert "Routing: arrow" in image.info["parameters"]


@pytest.mark.slow(seconds=15)
def test_the_engine_merges_prompt_gates_as_training_applies_them(library, engine):
    """What the trainer differentiates (live hooks, gates from the caption) is what the
    engine draws (the same gates merged as block weights), and the gates follow the prompt."""
    from studio.adapters import load_adapter
    from studio.adapters.mixtures.file import new_mixture, save_mixture
    from studio.adapters.mixtures.gates import Gates, prompt_embedding
    from studio.adapters.mixtures.live import LiveMembers, per_sample
    from studio.models import load_pipeline

    workspace, paths = library
    fresh = load_pipeline("builtin")
    dim = fresh.text_encoder.get_input_embeddings().weight.shape[1]
    mixture = new_mixture(paths, "prompt", embedding_dim=dim)
    g = torch.Generator().manual_seed(5)
    mixture.tensors["gate.weight"] = torch.randn(3, len(FULL_BLOCKS), dim, generator=g)
    mixture.tensors["gate.bias"] = torch.randn(3, len(FULL_BLOCKS), generator=g)
    path = save_mixture(workspace.adapters_dir / "by-prompt.safetensors", mixture)
    live = LiveMembers("sd15", {"unet": fresh.unet}, [load_adapter(p) for p in paths])
    outputs = {}
    for prompt in ("a sks shape", "a red circle on a blue background"):
        embedding = prompt_embedding(fresh.tokenizer, fresh.text_encoder, [prompt])
        with torch.no_grad():
            gates = Gates(mixture)(torch.zeros(1), embedding)
        live.install(per_sample(lambda: gates))
        expected = _unet_out(fresh)
        live.remove()
        outputs[prompt] = _unet_out(engine.set_mix("builtin", [AdapterUse(path, 1.0)], prompt=prompt))
        assert (outputs[prompt] - expected).abs().max() <= 1e-4
    first, second = outputs.values()
    assert (first - second).abs().max() > 1e-3


@pytest.mark.slow(seconds=20)
def test_cli_makes_inspects_and_draws_a_mixture(library, engine, tmp_path, capsys):
    import json

    from PIL import Image

    from studio.cli import main

    workspace, paths = library
    out = workspace.adapters_dir / "cli-mix.safetensors"
    assert main(["mixture", f"{paths[0]}:0.7", f"{paths[2]}:1.2", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    info = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert info["mixture"] == "block" and [m["name"] for m in info["members"]] == ["lora", "lokr"]
    common = ["generate", "--steps", "6", "--seed", "3", "--workspace", str(workspace.root)]
    assert main([*common, "--prompt", REQUEST["prompt"] + " <lora:cli-mix:1>", "--out", str(tmp_path / "t.png")]) == 0
    assert main([*common, "--prompt", REQUEST["prompt"], "--adapter", str(out), "--out", str(tmp_path / "a.png")]) == 0
    blend = _pixels(engine.generate(GenerateRequest(**REQUEST, adapters=[AdapterUse(paths[0], 0.7),
                                                                          AdapterUse(paths[2], 1.2)])))[0]
    for name in ("t.png", "a.png"):
        with Image.open(tmp_path / name) as image:
            assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - blend).max() <= 1
    assert main(["mixture", str(paths[0]), "--out", str(tmp_path / "elsewhere.safetensors")]) == 2
    assert "not in" in capsys.readouterr().err
