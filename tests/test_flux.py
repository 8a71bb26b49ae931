"""FLUX.1, the first transformer family: its objective, its call, its adapter files (the
kohya layout sd-scripts writes, with fused qkv; the diffusers layout), what diffusers'
own loader and ComfyUI's key map make of them, and single-file checkpoints."""
from __future__ import annotations

import math

import pytest
import torch

from tests.test_formats import perturb

#: A training run's target_modules on FLUX.1 (peft suffixes): the attention of both streams
#: and the single blocks' MLP input, which sd-scripts fuses with q, k, v into linear1.
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp"]


@pytest.fixture(scope="module")
def flux_pipe():
    from toyworld.builtin_flux import build_pipeline

    torch.manual_seed(0)
    return build_pipeline(0)


class Settings:
    def __init__(self, min_timestep=0, max_timestep=1000, min_snr_gamma=None):
        self.min_timestep, self.max_timestep, self.min_snr_gamma = min_timestep, max_timestep, min_snr_gamma


# --------------------------------------------------------------------------------------
# the objective
# --------------------------------------------------------------------------------------


def test_flow_matching_noisy_input_and_target():
    from studio.models.families.objectives import FlowMatchObjective

    objective = FlowMatchObjective({"num_train_timesteps": 1000, "shift": 1.0}, 64)
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([0.0, 250.0, 900.0])
    sigma = (t / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(objective.noisy(x0, noise, t), (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(objective.target(x0, noise, t), noise - x0)
    assert objective.prediction_type == "flow" and objective.loss_weight(t, Settings()) is None


def test_flow_matching_shift_is_the_schedulers():
    """Dynamic shifting: exp(mu) at the VAE's native size, mu linear in the image tokens
    from (256, 0.5) to (4096, 1.15): FLUX.1-dev at 1024 px gives sd-scripts' 3.1582."""
    from studio.models.families.objectives import FlowMatchObjective

    config = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
              "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
    assert FlowMatchObjective(config, 4096).shift == pytest.approx(math.exp(1.15))
    assert round(FlowMatchObjective(config, 4096).shift, 4) == 3.1582
    assert FlowMatchObjective({**config, "use_dynamic_shifting": False}, 4096).shift == 3.0


def test_flow_matching_timesteps_stay_in_range_and_repeat_from_the_generator():
    from studio.models.families.objectives import FlowMatchObjective

    objective = FlowMatchObjective({"num_train_timesteps": 1000, "shift": 3.0}, 64)
    draw = lambda seed, s: objective.sample_timesteps(4000, torch.Generator().manual_seed(seed), s)
    full = draw(0, Settings())
    assert full.min() >= 0 and full.max() < 1000
    assert torch.equal(full, draw(0, Settings()))  # the generator's draws only: a resume repeats them
    assert not torch.equal(full, draw(1, Settings()))
    # logit-normal shifted by 3: the median is sigma = 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert full.median().item() == pytest.approx(750, abs=20)
    bounded = draw(0, Settings(min_timestep=200, max_timestep=600))
    assert bounded.min() >= 200 and bounded.max() < 600
    # within the bounds the same distribution: its quantiles, restricted
    inside = full[(full >= 200) & (full < 600)]
    assert bounded.median().item() == pytest.approx(inside.median().item(), abs=15)


def test_flow_matching_refuses_min_snr_in_one_line():
    from studio.models.families.objectives import FlowMatchObjective

    objective = FlowMatchObjective({"num_train_timesteps": 1000}, 64)
    assert objective.check(Settings()) == []
    (problem,) = objective.check(Settings(min_snr_gamma=5.0))
    assert "min_snr_gamma" in problem and "\n" not in problem


# --------------------------------------------------------------------------------------
# the family's call and conditioning
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("guidance", [False, True])
@pytest.mark.slow(seconds=10)
def test_predict_is_fluxpipelines_transformer_call(flux_pipe, guidance):
    """predict packs, calls and unpacks exactly as FluxPipeline.__call__ does (its own
    _pack_latents / ids / encode_prompt), with the dev model's guidance embedding."""
    from diffusers import FluxTransformer2DModel

    from studio.models.families import get_family
    from studio.models.families.flux import TRAINING_GUIDANCE

    family = get_family("flux")
    pipe = flux_pipe
    transformer = pipe.transformer
    if guidance:
        torch.manual_seed(3)
        transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": True})
    prompts = ["a red circle on a white background", "a blue square"]
    with torch.no_grad():
        cond = family.encode_text([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                  prompts, "cpu")
        embeds, pooled, text_ids = pipe.encode_prompt(prompts, max_sequence_length=pipe.tokenizer_2.model_max_length)
        assert torch.equal(cond["encoder_hidden_states"], embeds) and torch.equal(cond["pooled_projections"], pooled)
        latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([300.0, 800.0])
        ours = family.predict(transformer, latents, t, cond)
        packed = pipe._pack_latents(latents, 2, 16, 16, 16)
        ids = pipe._prepare_latent_image_ids(2, 8, 8, "cpu", latents.dtype)
        theirs = transformer(hidden_states=packed, timestep=t / 1000,
                             guidance=torch.full([2], TRAINING_GUIDANCE) if guidance else None,
                             pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                             img_ids=ids, return_dict=False)[0]
    assert ours.shape == latents.shape
    assert torch.equal(ours, pipe._unpack_latents(theirs, 16, 16, 1))
    if guidance:  # the guidance input matters: the call would differ without it
        other = transformer(hidden_states=packed, timestep=t / 1000, guidance=torch.full([2], 4.0),
                            pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids,
                            img_ids=ids, return_dict=False)[0]
        assert not torch.allclose(other, theirs)


@pytest.mark.slow(seconds=5)
def test_family_detection(flux_pipe):
    from studio.models.families import (family_from_diffusers_keys, family_from_metadata, family_from_prefixes,
                                        family_from_unet_names, family_of_pipeline)

    assert family_of_pipeline(flux_pipe).name == "flux"
    assert family_from_metadata({"ss_base_model_version": "flux1"}).name == "flux"
    assert family_from_metadata({"modelspec.architecture": "flux-1-schnell/lora"}).name == "flux"
    assert family_from_prefixes({"lora_unet", "lora_te3"}).name == "flux"
    assert family_from_prefixes({"lycoris"}).name == "flux"
    assert family_from_unet_names(["lora_unet_double_blocks_0_img_attn_qkv"]).name == "flux"
    assert family_from_unet_names(["lora_unet_input_blocks_4_1_proj_in"]).name == "sdxl"
    assert family_from_diffusers_keys({"transformer"}, ["transformer_blocks.0.attn.to_q"]).name == "flux"
    assert family_from_diffusers_keys({"unet", "text_encoder_2"}, ["down_blocks.1.attentions.0"]).name == "sdxl"


# --------------------------------------------------------------------------------------
# adapter files
# --------------------------------------------------------------------------------------


def _inputs(pipe):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, pipe.tokenizer_2.model_max_length, 64, generator=g)
    return {"hidden_states": torch.randn(2, 64, 64, generator=g), "timestep": torch.tensor([0.3, 0.8]),
            "pooled_projections": torch.randn(2, 64, generator=g), "encoder_hidden_states": hidden,
            "txt_ids": torch.zeros(hidden.shape[1], 3), "img_ids": pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
            "guidance": None, "return_dict": False}


def _outputs(pipe):
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.transformer(**_inputs(pipe))[0], pipe.text_encoder(ids).pooler_output


def _adapted_layers(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in model.modules())


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def trained_files(flux_pipe, tmp_path_factory):
    """A perturbed rank-4 LoRA (alpha 8) on every transformer-block Linear and CLIP's
    attention, exported in the kohya and the diffusers layouts, with the adapted outputs."""
    import copy

    from peft import LoraConfig

    from studio.adapters import adapter_models, export_adapter, save_adapter
    from studio.adapters.formats.peft_bridge import inject_peft_adapter

    from studio.adapters import targets_for

    pipe = copy.deepcopy(flux_pipe)
    targets = targets_for({"transformer": pipe.transformer})["transformer"]
    assert len(targets) == 2 * 14 + 4 * 6  # every Linear of the double and single blocks
    inject_peft_adapter(pipe.transformer, LoraConfig(r=4, lora_alpha=8, target_modules=targets), "default")
    inject_peft_adapter(pipe.text_encoder, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                          "out_proj"]), "default")
    perturb([pipe.transformer, pipe.text_encoder])
    adapter = export_adapter(adapter_models(pipe), family="flux", metadata={"ss_base_model_version": "flux1"})
    folder = tmp_path_factory.mktemp("flux-files")
    kohya = save_adapter(folder / "kohya.safetensors", adapter)
    diffusers_file = save_adapter(folder / "diffusers.safetensors", adapter, format="diffusers",
                                  models=adapter_models(flux_pipe))
    return {"kohya": kohya, "diffusers": diffusers_file, "adapter": adapter, "outputs": _outputs(pipe),
            "layers": _adapted_layers(pipe.transformer) + _adapted_layers(pipe.text_encoder)}


@pytest.mark.slow(seconds=5)
def test_kohya_export_names_and_fuses_as_sd_scripts(trained_files, flux_pipe):
    from safetensors import safe_open

    with safe_open(str(trained_files["kohya"]), framework="pt") as f:
        keys = set(f.keys())
        qkv_up = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight")
        qkv_down = f.get_tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight")
        linear1_up = f.get_tensor("lora_unet_single_blocks_3_linear1.lora_up.weight")
    inner = flux_pipe.transformer.inner_dim
    assert tuple(qkv_up.shape) == (3 * inner, 12) and tuple(qkv_down.shape) == (12, inner)
    # block-diagonal: q's rows use only q's rank columns (sd-scripts' split_qkv form)
    assert qkv_up[:inner, 4:].abs().max() == 0 and qkv_up[inner:2 * inner, :4].abs().max() == 0
    assert tuple(linear1_up.shape) == (3 * inner + 4 * inner, 16)
    names = {k.split(".")[0] for k in keys}
    for name in ("lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
                 "lora_unet_double_blocks_0_txt_attn_proj", "lora_unet_double_blocks_0_img_mlp_0",
                 "lora_unet_double_blocks_0_img_mlp_2", "lora_unet_double_blocks_0_txt_mlp_2",
                 "lora_unet_double_blocks_0_img_mod_lin", "lora_unet_double_blocks_0_txt_mod_lin",
                 "lora_unet_single_blocks_0_linear2", "lora_unet_single_blocks_0_modulation_lin",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"):
        assert name in names
    assert not any("to_q" in n or "lycoris" in n for n in names)


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_diffusers_load_lora_weights_consumes_every_key(trained_files, flux_pipe, layout, tmp_path):
    """diffusers' own FluxPipeline.load_lora_weights reads our file: every module of it
    lands on a layer (as many adapted layers as our loader makes) and the transformer and
    CLIP outputs are ours (the trained model's, test_our_loader_reads_both_layouts_back)
    within 1e-5. diffusers splits sd-scripts' single-block linear1 at FLUX.1's full-size
    widths (3072 x 3 + 12288, hard-coded), so the tiny model's kohya file goes without its
    linear1 modules there; tests/test_flux.py's full-size key tables cover their names."""
    import copy

    from studio.adapters import AdapterFile, attach_adapter, load_adapter, save_adapter

    path = trained_files[layout]
    adapter = load_adapter(path)
    if layout == "kohya":
        adapter = AdapterFile({n: m for n, m in adapter.modules.items() if not n.endswith("_linear1")},
                              adapter.metadata, "flux")
        path = save_adapter(tmp_path / "without-linear1.safetensors", adapter)
    ours = copy.deepcopy(flux_pipe)
    attach_adapter(ours, adapter, "ours")
    pipe = copy.deepcopy(flux_pipe)
    pipe.load_lora_weights(str(path), adapter_name="theirs")
    assert _adapted_layers(pipe.transformer) + _adapted_layers(pipe.text_encoder) == (
        _adapted_layers(ours.transformer) + _adapted_layers(ours.text_encoder))
    (transformer, pooled), (want_transformer, want_pooled) = _outputs(pipe), _outputs(ours)
    assert _rel(transformer, want_transformer) < 1e-5 and _rel(pooled, want_pooled) < 1e-5
    base_transformer, _ = _outputs(flux_pipe)
    assert _rel(base_transformer, want_transformer) > 1e-3  # the adapter matters


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.slow(seconds=5)
def test_our_loader_reads_both_layouts_back(trained_files, flux_pipe, layout):
    import copy

    from studio.adapters import attach_adapter, load_adapter

    adapter = load_adapter(trained_files[layout])
    assert adapter.family == "flux"
    pipe = copy.deepcopy(flux_pipe)
    attach_adapter(pipe, adapter, "ours")
    transformer, pooled = _outputs(pipe)
    want_transformer, want_pooled = trained_files["outputs"]
    assert _rel(transformer, want_transformer) < 1e-5 and _rel(pooled, want_pooled) < 1e-5


# --------------------------------------------------------------------------------------
# full-size FLUX.1: sd-scripts' names and ComfyUI's key map
# --------------------------------------------------------------------------------------

HIDDEN, MLP, DOUBLE, SINGLE = 3072, 4 * 3072, 19, 38


def _bfl_flux():
    """The BFL FLUX.1 model's module tree (sd-scripts' library/flux_models.py, re-typed down
    to what names depend on: DoubleStreamBlock, SingleStreamBlock and their Linears), on the
    meta device."""
    from torch import nn

    class Modulation(nn.Module):
        def __init__(self, double):
            super().__init__()
            self.lin = nn.Linear(HIDDEN, (6 if double else 3) * HIDDEN)

    class QKNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_norm, self.key_norm = nn.RMSNorm(128), nn.RMSNorm(128)

    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.norm, self.proj = nn.Linear(HIDDEN, 3 * HIDDEN), QKNorm(), nn.Linear(HIDDEN, HIDDEN)

    class DoubleStreamBlock(nn.Module):
        def __init__(self):
            super().__init__()
            for stream in ("img", "txt"):
                setattr(self, f"{stream}_mod", Modulation(True))
                setattr(self, f"{stream}_attn", SelfAttention())
                setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(HIDDEN, MLP), nn.GELU(), nn.Linear(MLP, HIDDEN)))

    class SingleStreamBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1, self.linear2 = nn.Linear(HIDDEN, 3 * HIDDEN + MLP), nn.Linear(HIDDEN + MLP, HIDDEN)
            self.norm, self.modulation = QKNorm(), Modulation(False)

    class Flux(nn.Module):
        def __init__(self):
            super().__init__()
            self.double_blocks = nn.ModuleList(DoubleStreamBlock() for _ in range(DOUBLE))
            self.single_blocks = nn.ModuleList(SingleStreamBlock() for _ in range(SINGLE))

    with torch.device("meta"):
        return Flux()


def _sd_scripts_flux_names(flux, clip) -> dict[str, tuple[int, int]]:
    """sd-scripts networks/lora_flux.py LoRANetwork.create_modules, re-typed: every Linear
    inside DoubleStreamBlock / SingleStreamBlock under lora_unet, inside CLIPAttention /
    CLIPMLP under lora_te1; name = prefix + module path with '.' -> '_'. -> (out, in)."""
    names = {}
    for prefix, root, classes in (("lora_unet", flux, ("DoubleStreamBlock", "SingleStreamBlock")),
                                  ("lora_te1", clip, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))):
        for name, module in root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                if type(child).__name__ == "Linear":
                    path = f"{name}.{child_name}"
                    if prefix == "lora_te1":  # transformers 5's CLIPTextModel: sd-scripts' names keep text_model
                        path = "text_model." + path.removeprefix("text_model.")
                    names[f"{prefix}_{path.replace('.', '_')}"] = (child.out_features, child.in_features)
    return names


def _comfyui_flux_key_map(flux, clip) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """ComfyUI comfy/lora.py model_lora_keys_unet / model_lora_keys_clip for a Flux model,
    re-typed: lora_unet_<BFL path> for every weight of its (BFL-layout) model, and the
    diffusers names comfy.utils.flux_to_diffusers gives (transformer.<path>, lycoris_<path>,
    lora_transformer_<path>) -> (weight, (first row, rows) of it or None); lora_te1 CLIP-L."""
    key_map: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for key, _ in flux.named_parameters():
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[:-len(".weight")].replace(".", "_")] = (key, None)
    diffusers: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for i in range(DOUBLE):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            diffusers[f"{d}.attn.{img}"] = (f"{b}.img_attn.qkv.weight", (j * HIDDEN, HIDDEN))
            diffusers[f"{d}.attn.{txt}"] = (f"{b}.txt_attn.qkv.weight", (j * HIDDEN, HIDDEN))
        for ours, theirs in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                             ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                             ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                             ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            diffusers[f"{d}.{ours}"] = (f"{b}.{theirs}.weight", None)
    for i in range(SINGLE):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, part in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            diffusers[f"{d}.{part}"] = (f"{b}.linear1.weight", (j * HIDDEN, HIDDEN))
        diffusers[f"{d}.proj_mlp"] = (f"{b}.linear1.weight", (3 * HIDDEN, 4 * HIDDEN))
        diffusers[f"{d}.norm.linear"] = (f"{b}.modulation.lin.weight", None)
        diffusers[f"{d}.proj_out"] = (f"{b}.linear2.weight", None)
    for path, to in diffusers.items():
        key_map[f"transformer.{path}"] = to
        key_map[f"lycoris_{path.replace('.', '_')}"] = to
        key_map[f"lora_transformer_{path.replace('.', '_')}"] = to
    for name, module in clip.named_modules():
        if type(module).__name__ == "Linear" and ".encoder.layers." in f".{name}":
            layer = name.removeprefix("text_model.")
            key_map[f"lora_te1_text_model_{layer.replace('.', '_')}"] = (f"clip_l.{name}.weight", None)
    return key_map


@pytest.fixture(scope="module")
def full_size():
    from studio.adapters import reference_models

    label, models = reference_models("flux")[-1]
    assert label == "FLUX.1" and models["transformer"].config.num_layers == DOUBLE
    return models


def _full_size_file(models, kind: str = "lora") -> "AdapterFile":
    """A rank-1 file for every module sd-scripts adapts, named by our naming (the fused
    targets of name_table): LoRA, or LoHa on the same modules."""
    from studio.adapters import AdapterFile, AdapterModule, LoraModule, name_table, targets_for
    from studio.adapters.formats.naming import kohya_name
    from studio.models.families import get_family

    table = name_table("flux", models)
    names = set()
    for attr, paths in targets_for({k: models[k] for k in ("transformer", "text_encoder")}).items():
        part = next(p for p in get_family("flux").parts if p.attr == attr)
        names |= {kohya_name(part, path) for path in paths}
    modules = {}
    for name in names:
        out, inp = table[name].weight_shape
        if kind == "lora":
            modules[name] = LoraModule(torch.zeros(1, inp), torch.zeros(out, 1), 1.0)
        else:
            modules[name] = AdapterModule("loha", {"hada_w1_a": torch.zeros(out, 1), "hada_w1_b": torch.zeros(1, inp),
                                                   "hada_w2_a": torch.zeros(out, 1), "hada_w2_b": torch.zeros(1, inp)}, 1.0)
    return AdapterFile(modules, {}, "flux")


@pytest.mark.slow(seconds=60)
def test_full_size_key_set_equals_sd_scripts(full_size, tmp_path):
    from studio.adapters import load_adapter, name_table, save_adapter
    from studio.adapters.formats.peft_bridge import check_fit

    adapter = _full_size_file(full_size)
    expected = _sd_scripts_flux_names(_bfl_flux(), full_size["text_encoder"])
    assert set(adapter.modules) == set(expected)
    assert adapter.prefix_counts() == {"lora_te1": 72, "lora_unet": DOUBLE * 10 + SINGLE * 3}
    for name, module in adapter.modules.items():
        assert (module.up.shape[0], module.down.shape[1]) == expected[name], name
    path = save_adapter(tmp_path / "full.safetensors", adapter, dtype=torch.float16)
    back = load_adapter(path)
    assert back.family == "flux" and set(back.modules) == set(expected)
    table = name_table("flux", full_size)
    assert all(check_fit(n, m, table[n]) is None for n, m in back.modules.items())
    assert tuple(back.modules["lora_unet_double_blocks_18_img_attn_qkv"].up.shape) == (3 * HIDDEN, 1)
    assert tuple(back.modules["lora_unet_single_blocks_37_linear1"].up.shape) == (3 * HIDDEN + MLP, 1)


@pytest.mark.slow(seconds=60)
@pytest.mark.parametrize("kind", ["lora", "loha"])
def test_comfyui_maps_every_tensor_of_a_full_size_export(full_size, kind, tmp_path):
    """Every module of a full-size export (kohya layout) is a key of ComfyUI's map and fits
    the weight (or the slice of it) the map sends it to. LoHa trained on diffusers' split
    q/k/v is written per part under lycoris_ names, which ComfyUI maps to the slices."""
    import copy

    from safetensors import safe_open

    from studio.adapters import AdapterFile, save_adapter
    from studio.adapters.formats.modules import module_rows
    from studio.adapters import name_table

    adapter = _full_size_file(full_size, kind)
    if kind == "loha":  # as the trainer's export writes LoHa on fused layers: one module per part
        table = name_table("flux", full_size)
        modules = {}
        for name, module in adapter.modules.items():
            target = table[name]
            if not target.pieces:
                modules[name] = module
                continue
            for piece, start, stop in target.rows():
                modules["lycoris_" + piece.path.replace(".", "_")] = module_rows(module, start, stop, name)
        adapter = AdapterFile(modules, {}, "flux")
    path = save_adapter(tmp_path / "full.safetensors", adapter, dtype=torch.float16)
    flux = _bfl_flux()
    key_map = _comfyui_flux_key_map(flux, full_size["text_encoder"])
    shapes = {k: tuple(p.shape) for k, p in flux.named_parameters()}
    shapes |= {f"clip_l.{k}": tuple(p.shape) for k, p in full_size["text_encoder"].named_parameters()}
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        modules = {}
        for key in keys:
            name, _, part = key.partition(".")
            modules.setdefault(name, {})[part] = tuple(f.get_slice(key).get_shape())
    unmapped = [n for n in modules if n not in key_map]
    assert not unmapped, unmapped[:5]
    for name, parts in modules.items():
        weight, rows = key_map[name]
        out, inp = shapes[weight]
        if rows is not None:
            out = rows[1]
        if kind == "lora":
            assert (parts["lora_up.weight"][0], parts["lora_down.weight"][1]) == (out, inp), name
        else:
            assert (parts["hada_w1_a"][0], parts["hada_w1_b"][1]) == (out, inp), name
    assert len(modules) == (72 + DOUBLE * 10 + SINGLE * 3 if kind == "lora" else 72 + DOUBLE * 14 + SINGLE * 6)


# --------------------------------------------------------------------------------------
# training through the generic trainer
# --------------------------------------------------------------------------------------


@pytest.mark.slow(seconds=60)
def test_the_trainer_trains_flux_unchanged(flux_pipe, tmp_path, workspace):
    """trainers/trainer.py trains a LoRA on the tiny Flux model through the family's seams
    (conditioning, call, flow-matching objective): the loss falls, and the exported kohya
    file (fused qkv) attached to a fresh model computes what training left."""
    import copy
    import time

    from studio.adapters import attach_adapter, load_adapter, read_checked_header
    from studio.jobs.runs import create_run
    from tests.conftest import demo_config
    from tests.test_networks import _fixed_loss
    from trainers.trainer import AdapterTrainer

    model_dir = tmp_path / "tiny-flux"
    flux_pipe.save_pretrained(model_dir)
    config = demo_config(max_steps=20, learning_rate=3e-3)
    config.base_model = str(model_dir)
    config.network.target_modules = FLUX_TARGETS
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    assert trainer.family.name == "flux" and type(trainer.denoiser).__name__ == "FluxTransformer2DModel"
    assert trainer.objective.prediction_type == "flow"
    before = _fixed_loss(trainer, range(5000, 5008))
    for step in range(20):
        trainer.train_step(step)
    assert _fixed_loss(trainer, range(5000, 5008)) < before
    path = trainer.export(time.time())
    meta = read_checked_header(path)[1]
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"].startswith("flux-1")
    adapter = load_adapter(path)
    assert "lora_unet_double_blocks_0_img_attn_qkv" in adapter.modules

    batch = trainer.batch(trainer.instance, [0], torch.Generator().manual_seed(0))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(1))
    trained_model = trainer.accelerator.unwrap_model(trainer.denoiser)
    trained_model.eval()
    fresh = copy.deepcopy(flux_pipe)
    attach_adapter(fresh, adapter, "reloaded")
    with torch.no_grad():
        trained = trainer.predict(trained_model, batch, noise, torch.tensor([300.0]))
        reloaded = trainer.predict(fresh.transformer, batch, noise, torch.tensor([300.0]))
        base = trainer.predict(flux_pipe.transformer, batch, noise, torch.tensor([300.0]))
    assert (trained - base).abs().max() > 1e-3
    assert (reloaded - trained).abs().max() <= 1e-4


# --------------------------------------------------------------------------------------
# single-file checkpoints
# --------------------------------------------------------------------------------------


@pytest.mark.slow(seconds=30)
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_a_bfl_transformer_file_loads_offline(flux_pipe, tmp_path, prefix):
    """A transformer file in the original BFL layout (flux1-dev.safetensors; ComfyUI's
    model.diffusion_model. prefix too), written by our own map from the tiny transformer,
    is detected as FLUX.1 and loads with the rest of the pipeline from a diffusers folder:
    every weight as written; without a folder, with the built-in Flux model's. Against the
    full-size skeleton's shapes it is refused in one line."""
    import copy

    from safetensors.torch import save_file

    from studio.errors import StudioError
    from studio.models.families.flux import state_dict_to_bfl
    from studio.models.single_file import detect_family, load_single_file

    folder = tmp_path / "tiny-flux"
    flux_pipe.save_pretrained(folder)
    transformer = copy.deepcopy(flux_pipe.transformer)
    perturb([transformer.requires_grad_(True)])
    bfl = {prefix + k: v.contiguous() for k, v in state_dict_to_bfl(transformer.state_dict()).items()}
    assert f"{prefix}double_blocks.0.img_attn.qkv.weight" in bfl and f"{prefix}single_blocks.0.linear1.weight" in bfl
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl, str(path))
    assert detect_family(path) == "flux"
    pipe = load_single_file(path, config_dir=folder)
    assert type(pipe).__name__ == "FluxPipeline"
    loaded = pipe.transformer.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in transformer.state_dict().items())
    # without a folder: the built-in Flux model's VAE and encoders, whose architecture the file fits
    assert torch.equal(load_single_file(path).transformer.state_dict()["x_embedder.weight"],
                       transformer.state_dict()["x_embedder.weight"])
    from studio.models.skeletons import skeleton_dir

    with pytest.raises(StudioError, match="does not fit the FLUX.1 transformer"):
        load_single_file(path, config_dir=skeleton_dir("flux"))


# --------------------------------------------------------------------------------------
# fused layers: one module <-> one per part
# --------------------------------------------------------------------------------------


def test_fused_modules_split_and_stack_exactly():
    """A fused layer's module becomes one per part with exactly the part's rows of the
    update (LoRA: block-diagonal columns dropped; LoHa: rows of w1a, w2a), LoRA parts stack
    back to the same update, and a LoKr whose Kronecker rows do not divide the parts is
    refused by name."""
    from studio.adapters import AdapterModule, LoraModule
    from studio.adapters.formats.modules import module_rows, stack_rows
    from studio.errors import StudioError

    g = torch.Generator().manual_seed(0)
    sizes, inp = [6, 6, 6, 24], 6
    parts = [LoraModule(torch.randn(2, inp, generator=g), torch.randn(n, 2, generator=g), alpha) if n != 6 or i != 1
             else None for i, (n, alpha) in enumerate(zip(sizes, (1.0, 2.0, 4.0, 2.0)))]
    fused = stack_rows(parts, sizes, "linear1")
    assert fused.rank == 6 and tuple(fused.up.shape) == (42, 6)
    delta, row = fused.delta((42, inp)), 0
    for part, size in zip(parts, sizes):
        piece = module_rows(fused, row, row + size, "linear1")
        if part is None:
            assert piece is None and delta[row:row + size].abs().max() == 0
        else:
            assert piece.rank == 2  # its own rank back: the other parts' columns are zero here
            assert torch.allclose(piece.delta((size, inp)), part.delta((size, inp)), atol=1e-6)
            assert torch.allclose(delta[row:row + size], part.delta((size, inp)), atol=1e-6)
        row += size

    loha = AdapterModule("loha", {"hada_w1_a": torch.randn(18, 3, generator=g), "hada_w1_b": torch.randn(3, inp, generator=g),
                                  "hada_w2_a": torch.randn(18, 3, generator=g), "hada_w2_b": torch.randn(3, inp, generator=g)},
                         1.5)
    full = loha.delta((18, inp))
    assert torch.allclose(module_rows(loha, 6, 12, "qkv").delta((6, inp)), full[6:12], atol=1e-6)

    lokr = AdapterModule("lokr", {"lokr_w1": torch.randn(3, 2, generator=g), "lokr_w2": torch.randn(6, 3, generator=g)})
    assert torch.allclose(module_rows(lokr, 6, 12, "qkv").delta((6, inp)), lokr.delta((18, inp))[6:12], atol=1e-6)
    odd = AdapterModule("lokr", {"lokr_w1": torch.randn(2, 2, generator=g), "lokr_w2": torch.randn(9, 3, generator=g)})
    with pytest.raises(StudioError, match="qkv: its LoKr factor of 9 rows"):
        module_rows(odd, 6, 12, "qkv")


@pytest.mark.slow(seconds=15)
def test_loha_on_flux_writes_its_fused_parts_by_lycoris_names_and_reads_back(flux_pipe, tmp_path):
    import copy

    from peft import LoHaConfig

    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter
    from studio.adapters.formats.peft_bridge import inject_peft_adapter

    pipe = copy.deepcopy(flux_pipe)
    inject_peft_adapter(pipe.transformer, LoHaConfig(r=2, alpha=4, target_modules=FLUX_TARGETS), "default")
    perturb([pipe.transformer])
    adapter = export_adapter(adapter_models(pipe), family="flux")
    names = set(adapter.modules)
    assert "lycoris_transformer_blocks_0_attn_to_q" in names and "lycoris_single_transformer_blocks_0_proj_mlp" in names
    assert "lora_unet_double_blocks_0_img_attn_proj" in names  # not fused: sd-scripts' name
    path = save_adapter(tmp_path / "loha.safetensors", adapter)
    fresh = copy.deepcopy(flux_pipe)
    attach_adapter(fresh, load_adapter(path), "reloaded")
    (got, _), (want, _) = _outputs(fresh), _outputs(pipe)
    assert _rel(got, want) < 1e-5
