"""Adapter files: kohya / LyCORIS export and import for every adapter type, diffusers as an
independent loader, sd-scripts' key set on the full-size architectures, hashes, metadata
editing, conversions and hostile files."""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import run_cli
from tests.tiny_models import generate, tiny_sd15_pipeline, tiny_sdxl_pipeline

PIXEL_TOLERANCE = 1 / 255

# name -> (AdapterType args, peft config extras, rank, alpha)
VARIANTS = {
    "lora": (("lora", False), {}, 4, 2.0),
    "lora-rslora": (("lora", False), {"use_rslora": True}, 4, 3.0),
    "locon": (("locon", False), {}, 4, 8.0),
    "dora": (("locon", True), {}, 4, 2.0),
    "loha": (("loha", False), {}, 4, 2.0),
    "loha-tucker": (("loha", False), {"use_effective_conv2d": True}, 2, 2.0),
    "lokr": (("lokr", False), {}, 2, 1.0),
    "lokr-full": (("lokr", False), {}, 8, 4.0),
    "lokr-both": (("lokr", False), {"decompose_both": True}, 1, 2.0),
}


def add_adapter(pipe, variant: str, name: str = "default") -> None:
    """The variant's peft adapter on the UNet (sd-scripts' targets, + convs for LyCORIS
    types) and the text encoder(s)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    from studio.adapters import adapter_models, targets_for
    from studio.adapters.formats.peft_bridge import inject_peft_adapter

    (network, dora), extra, rank, alpha = VARIANTS[variant]
    targets = targets_for(adapter_models(pipe), conv=network != "lora")
    for attr, paths in targets.items():
        if network in ("lora", "locon"):
            config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, use_dora=dora, **extra)
        else:
            config = (LoHaConfig if network == "loha" else LoKrConfig)(r=rank, alpha=alpha, target_modules=paths, **extra)
        inject_peft_adapter(getattr(pipe, attr), config, name)


def train_a_little(pipe, steps: int = 2) -> None:
    """A few Adam steps on a denoising-style loss, so every adapter tensor is non-trivial."""
    params = [p for m in (pipe.unet, pipe.text_encoder) for n, p in m.named_parameters() if p.requires_grad]
    assert params
    optimizer = torch.optim.Adam(params, lr=2e-2)
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    size = pipe.unet.config.sample_size
    for _ in range(steps):
        latents = torch.randn(1, 4, size, size, generator=g)
        out = pipe.unet(latents, torch.tensor([500]), pipe.text_encoder(ids)[0]).sample
        loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def perturb(models, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * scale)


def cli(capsys, *args) -> tuple[int, str, str]:
    """The CLI in this process (a subprocess costs seconds of imports): exit code, stdout, stderr."""
    from studio.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def max_pixel_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd15_round_trip_gives_the_same_images(variant, tmp_path):
    from studio.adapters import AdapterType, adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    torch.manual_seed(0)
    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, variant)
    train_a_little(pipe)
    pipe.unet.eval()
    expected = generate(pipe)
    base = generate(tiny_sd15_pipeline())
    assert max_pixel_diff(expected, base) > 0.02  # the adapter does something

    path = save_adapter(tmp_path / f"{variant}.safetensors", export_adapter(adapter_models(pipe), family="sd15"))
    adapter = load_adapter(path)
    (network, dora), _, _, _ = VARIANTS[variant]
    assert adapter.family == "sd15" and adapter.adapter_type == AdapterType(network, dora)
    assert set(adapter.prefix_counts()) == {"lora_unet", "lora_te"}

    fresh = tiny_sd15_pipeline()
    attach_adapter(fresh, adapter, "imported")
    assert max_pixel_diff(generate(fresh), expected) <= PIXEL_TOLERANCE


def test_file_alpha_reproduces_peft_scale(tmp_path):
    """rsLoRA: peft scales by alpha / sqrt(r); the file's alpha makes alpha_file / r equal."""
    from studio.adapters import adapter_models, export_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "lora-rslora")
    adapter = export_adapter(adapter_models(pipe))
    assert adapter.alphas == [pytest.approx(3.0 * 4 ** 0.5)]
    assert all(m.scale == pytest.approx(3.0 / 4 ** 0.5) for m in adapter.modules.values())


def test_lokr_with_full_factors_bakes_the_scale(tmp_path):
    from studio.adapters import adapter_models, export_adapter, save_adapter
    from safetensors import safe_open

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "lokr-full")
    perturb([pipe.unet])
    adapter = export_adapter({"unet": pipe.unet})
    layer = pipe.unet.get_submodule("down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q")
    module = adapter.modules["lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert module.rank is None and module.alpha is None and module.scale == 1.0
    assert torch.allclose(module.delta(layer.get_base_layer().weight.shape), layer.get_delta_weight("default"), atol=1e-6)
    path = save_adapter(tmp_path / "k.safetensors", adapter)
    with safe_open(str(path), "pt") as f:  # LyCORIS's loader reads float(alpha) of every module
        keys = set(f.keys())
        assert all(f"{name}.alpha" in keys for name in adapter.modules)
        assert float(f.get_tensor("lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q.alpha")) == 1.0


def test_sdxl_round_trip_and_names(tmp_path):
    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    pipe = tiny_sdxl_pipeline()
    add_adapter(pipe, "locon")
    perturb(adapter_models(pipe).values())
    expected = generate(pipe)
    assert max_pixel_diff(expected, generate(tiny_sdxl_pipeline())) > 0.02
    path = save_adapter(tmp_path / "xl.safetensors", export_adapter(adapter_models(pipe), family="sdxl"))
    adapter = load_adapter(path)
    names = set(adapter.modules)
    assert adapter.family == "sdxl" and set(adapter.prefix_counts()) == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_v" in names
    assert "lora_unet_output_blocks_0_1_proj_in" in names
    assert "lora_unet_input_blocks_1_0_in_layers_2" in names  # LoCon: resnet conv1 in sgm names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2" in names
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block" in n for n in names)
    fresh = tiny_sdxl_pipeline()
    attach_adapter(fresh, adapter, "imported")
    assert max_pixel_diff(generate(fresh), expected) <= PIXEL_TOLERANCE


def test_precisions(tmp_path):
    from safetensors import safe_open

    from studio.adapters import adapter_models, export_adapter, load_adapter, save_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "dora")
    perturb([pipe.unet, pipe.text_encoder])
    adapter = export_adapter(adapter_models(pipe))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = save_adapter(tmp_path / f"{dtype}.safetensors", adapter, dtype=dtype)
        with safe_open(str(path), "pt") as f:
            dtypes = {k.rsplit(".", 1)[-1] if k.endswith("alpha") else "w": f.get_tensor(k).dtype for k in f.keys()}
        assert dtypes == {"alpha": torch.float32, "w": dtype}
        back = load_adapter(path)
        assert back.alphas == adapter.alphas


# --------------------------------------------------------------------------------------
# DoRA conventions, checked numerically
# --------------------------------------------------------------------------------------


def comfyui_weight_decompose(dora_scale, weight, lora_diff):
    """ComfyUI comfy/weight_adapter/base.py weight_decompose (strength 1), re-typed."""
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    return weight_calc * (dora_scale / (norm + torch.finfo(weight.dtype).eps))


def a1111_weight_decompose(dora_scale, weight, updown):
    """A1111 extensions-builtin/Lora/network.py apply_weight_decompose, re-typed (merged weight)."""
    merged = updown + weight
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale / norm)


@pytest.mark.parametrize("conv", [False, True])
def test_exported_dora_scale_reproduces_peft_in_comfyui_formula(conv):
    from peft import LoraConfig, inject_adapter_in_model

    from studio.adapters import export_adapter

    torch.manual_seed(0)
    layer = torch.nn.Conv2d(6, 5, 3, padding=1) if conv else torch.nn.Linear(6, 5)
    model = torch.nn.Sequential()
    model.add_module("layer", layer)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["layer"], use_dora=True), model)
    perturb([model], scale=0.3)
    peft_layer = model.layer
    with torch.no_grad():
        peft_layer.merge()
        peft_merged = peft_layer.get_base_layer().weight.clone()
        peft_layer.unmerge()
    weight = peft_layer.get_base_layer().weight.detach()

    class Wrap(torch.nn.Module):  # a "unet" holding one layer named like a transformer module
        pass

    unet = Wrap()
    unet.add_module("layer", model.layer)
    module = export_adapter({"unet": unet}).modules["lora_unet_layer"]
    assert tuple(module.dora_scale.shape) == ((5, 1, 1, 1) if conv else (5, 1))  # output axis
    delta = module.delta(weight.shape)
    comfy = comfyui_weight_decompose(module.dora_scale, weight, delta)
    assert torch.allclose(comfy, peft_merged, atol=1e-5)
    # A1111 knows only the input axis: the same file broadcasts [out,1] / [1,in] there.
    a1111 = a1111_weight_decompose(module.dora_scale, weight, delta)
    assert not torch.allclose(a1111, peft_merged, atol=1e-2)
    # ... and the true magnitude with LyCORIS' own formula (||W + dW||) would give peft too;
    # ComfyUI's output-axis branch divides by ||W||, which the exported values account for.
    norm_merged = (weight + delta).flatten(1).norm(dim=1).reshape(module.dora_scale.shape)
    assert torch.allclose((weight + delta) * module.magnitude.reshape(module.dora_scale.shape) / norm_merged,
                          peft_merged, atol=1e-5)


# --------------------------------------------------------------------------------------
# diffusers as an independent loader
# --------------------------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _diffusers_load(pipe, path):
    import diffusers

    handler = _Records()
    logger = logging.getLogger("diffusers")
    diffusers.utils.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path), adapter_name="d")
    finally:
        logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity_error()
    return handler.messages + [str(w.message) for w in caught]


def _lora_layers(pipe, name):
    from peft.tuners.lora.layer import LoraLayer

    out = set()
    for attr in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, attr, None)
        for path, module in (model.named_modules() if model is not None else ()):
            if isinstance(module, LoraLayer) and name in module.lora_A:
                out.add((attr, path))
    return out


@pytest.mark.parametrize("variant", ["lora", "locon", "dora"])
def test_diffusers_loads_our_files(variant, tmp_path):
    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, variant)
    perturb(adapter_models(pipe).values())
    path = save_adapter(tmp_path / "a.safetensors", export_adapter(adapter_models(pipe)))
    adapter = load_adapter(path)

    theirs = tiny_sd15_pipeline()
    messages = _diffusers_load(theirs, path)
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))]
    assert not problems, problems
    ours = tiny_sd15_pipeline()
    if variant == "dora":
        # diffusers 0.42 drops dora_scale (with a warning) and loads the plain LoRA part:
        # its images equal ours for the same file without dora_scale.
        assert any("dora_scale" in m for m in messages)
        for module in adapter.modules.values():
            module.dora_scale = module.magnitude = None
    attach_adapter(ours, adapter, "x")
    assert _lora_layers(theirs, "d") == {(a, p) for a, p in _lora_layers(ours, "x")}
    assert len(_lora_layers(theirs, "d")) == len(adapter.modules)
    assert max_pixel_diff(generate(theirs), generate(ours)) <= PIXEL_TOLERANCE


@pytest.mark.slow(seconds=6)
def test_diffusers_loads_our_sdxl_file(tmp_path):
    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    pipe = tiny_sdxl_pipeline()
    add_adapter(pipe, "lora")
    perturb(adapter_models(pipe).values())
    path = save_adapter(tmp_path / "xl.safetensors", export_adapter(adapter_models(pipe), family="sdxl"))
    theirs = tiny_sdxl_pipeline()
    messages = _diffusers_load(theirs, path)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    ours = tiny_sdxl_pipeline()
    attach_adapter(ours, load_adapter(path), "x")
    assert _lora_layers(theirs, "d") == _lora_layers(ours, "x")
    assert max_pixel_diff(generate(theirs), generate(ours)) <= PIXEL_TOLERANCE


# --------------------------------------------------------------------------------------
# full-size architectures: sd-scripts' key set
# --------------------------------------------------------------------------------------


def _expected_sd_scripts_names(family, models, conv):
    """sd-scripts networks/lora.py create_modules, re-typed: walk the target classes."""
    from studio.models.families.unet import unet_diffusers_to_ldm

    unet_classes = ["Transformer2DModel"] + (["ResnetBlock2D", "Downsample2D", "Upsample2D"] if conv else [])
    names = {}
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te" if family == "sd15" else "lora_te1",
                "text_encoder_2": "lora_te2"}
    for attr, model in models.items():
        classes = unet_classes if attr == "unet" else ["CLIPAttention", "CLIPMLP"]
        for name, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                is_linear = type(child).__name__ == "Linear"
                is_conv = type(child).__name__ == "Conv2d"
                if not (is_linear or is_conv) or (is_conv and child.kernel_size != (1, 1) and not conv):
                    continue
                path = f"{name}.{child_name}"
                if attr == "unet" and family == "sdxl":
                    path = unet_diffusers_to_ldm(path, model.config)
                elif attr != "unet":
                    path = "text_model." + path.removeprefix("text_model.")
                names[f"{prefixes[attr]}_{path.replace('.', '_')}"] = child
    return names


@pytest.mark.parametrize("family,conv,counts,tensors", [
    ("sd15", False, {"lora_unet": 192, "lora_te": 72}, 792),
    ("sd15", True, {"lora_unet": 278, "lora_te": 72}, 1050),
    ("sdxl", False, {"lora_unet": 722, "lora_te1": 72, "lora_te2": 192}, 2958),
    ("sdxl", True, {"lora_unet": 788, "lora_te1": 72, "lora_te2": 192}, 3156),
])
def test_full_size_key_set_equals_sd_scripts(family, conv, counts, tensors, tmp_path):
    from studio.adapters import (AdapterFile, LoraModule, load_adapter, name_table, reference_models, save_adapter,
                                 targets_for)
    from studio.models.families import get_family
    from studio.adapters.formats.naming import kohya_name
    from studio.adapters.formats.peft_bridge import check_fit

    label, models = reference_models(family)[-1]
    assert label in ("SD 1.5", "SDXL")
    ours = {}
    for attr, paths in targets_for(models, conv=conv).items():
        part = next(p for p in get_family(family).parts if p.attr == attr)
        for path in paths:
            ours[kohya_name(part, path, models["unet"].config)] = models[attr].get_submodule(path)
    expected = _expected_sd_scripts_names(family, models, conv)
    assert set(ours) == set(expected)
    assert sum(counts.values()) == len(ours)

    # a rank-1 file with a tensor of the right shape for every module, written and read back
    modules = {}
    for name, layer in ours.items():
        if isinstance(layer, torch.nn.Linear):
            modules[name] = LoraModule(torch.zeros(1, layer.in_features), torch.zeros(layer.out_features, 1), 1.0)
        else:
            modules[name] = LoraModule(torch.zeros(1, layer.in_channels, *layer.kernel_size),
                                       torch.zeros(layer.out_channels, 1, 1, 1), 1.0)
    path = save_adapter(tmp_path / "full.safetensors", AdapterFile(modules, {}, family), dtype=torch.float16)
    adapter = load_adapter(path)
    assert adapter.family == family and adapter.prefix_counts() == counts
    assert sum(len(list(m.parts())) for m in adapter.modules.values()) == tensors
    table = name_table(family, models)
    assert all(check_fit(n, m, table[n]) is None for n, m in adapter.modules.items())
    if family == "sd15":  # FORMATS.md's examples
        down = adapter.modules["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].down
        assert tuple(down.shape) == (1, 320)
        assert adapter.modules["lora_unet_down_blocks_0_attentions_0_proj_in"].down.ndim == 4
        if conv:
            assert tuple(adapter.modules["lora_unet_down_blocks_0_resnets_0_conv1"].down.shape) == (1, 320, 3, 3)
    else:
        assert tuple(adapter.modules["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].down.shape) == (1, 640)
        assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_v" in adapter.modules
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in adapter.modules


# --------------------------------------------------------------------------------------
# hashes and metadata
# --------------------------------------------------------------------------------------


def _data_section(path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def test_sshs_hashes_and_metadata_editing(tmp_path, capsys):
    from studio.adapters import adapter_models, edit_metadata, export_adapter, read_checked_header, save_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "lora")
    perturb([pipe.unet])
    adapter = export_adapter(adapter_models(pipe), metadata={"ss_output_name": "demo", "modelspec.title": "Demo"})
    path = save_adapter(tmp_path / "a.safetensors", adapter)
    meta = read_checked_header(path)[1]
    data = _data_section(path)
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()
    # sd-scripts' legacy hash: 64 KiB at 1 MiB of the file serialised with only ss_* metadata
    from safetensors.torch import load, save

    tensors = load(path.read_bytes())
    draft = save(tensors, metadata={"ss_output_name": "demo"})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(draft[0x100000:0x110000]).hexdigest()[:8]

    edited = edit_metadata(path, {"modelspec.title": "Renamed", "ss_output_name": None, "x": "1"}, out=tmp_path / "b.safetensors")
    new_meta = read_checked_header(edited)[1]
    assert new_meta["sshs_model_hash"] == meta["sshs_model_hash"]
    assert _data_section(edited) == data
    assert new_meta["modelspec.title"] == "Renamed" and "ss_output_name" not in new_meta and new_meta["x"] == "1"

    code, _, err = cli(capsys, "convert", path, path, "--set", "modelspec.title=From CLI",
                       "--set", "modelspec.trigger_phrase=sks")
    assert code == 0, err
    cli_meta = read_checked_header(path)[1]
    assert cli_meta["modelspec.title"] == "From CLI" and cli_meta["sshs_model_hash"] == meta["sshs_model_hash"]
    assert _data_section(path) == data
    code, _, err = cli(capsys, "convert", path, path, "--set", "sshs_model_hash=0")
    assert code == 2 and "sshs_model_hash" in err


@pytest.mark.slow(seconds=5)
def test_convert_between_layouts_and_precisions(tmp_path, capsys):
    from studio.adapters import (adapter_models, attach_adapter, convert_adapter, export_adapter, load_adapter,
                                 save_adapter)

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "locon")
    perturb(adapter_models(pipe).values())
    src = save_adapter(tmp_path / "a.safetensors", export_adapter(adapter_models(pipe)))
    # diffusers / peft need module paths: from the base model (the CLI's --model), or from the
    # shipped architectures (built-in, SD 1.5, SDXL) when it is one of them
    base = adapter_models(tiny_sd15_pipeline())
    convert_adapter(src, tmp_path / "d.safetensors", format="diffusers", models=base)
    convert_adapter(tmp_path / "d.safetensors", tmp_path / "p", format="peft", models=base)
    code, _, err = cli(capsys, "convert", tmp_path / "p", tmp_path / "k.safetensors", "--precision", "fp16")
    assert code == 0, err
    a, d, p, k = (load_adapter(x) for x in (src, tmp_path / "d.safetensors", tmp_path / "p", tmp_path / "k.safetensors"))
    assert (d.source_format, p.source_format, k.source_format) == ("diffusers", "peft", "kohya")
    assert a.modules.keys() == d.modules.keys() == p.modules.keys() == k.modules.keys()
    for name, module in a.modules.items():
        for other in (d, p):
            assert other.modules[name].scale == pytest.approx(module.scale)
            assert torch.equal(other.modules[name].down.reshape(module.down.shape), module.down)
        assert k.modules[name].down.dtype == torch.float16
    images = []
    for adapter in (a, p):
        fresh = tiny_sd15_pipeline()
        attach_adapter(fresh, adapter, "x")
        images.append(generate(fresh))
    assert max_pixel_diff(*images) <= PIXEL_TOLERANCE


def test_peft_and_diffusers_dora_need_the_base_model_for_kohya(tmp_path):
    from studio.adapters import adapter_models, convert_adapter, export_adapter, load_adapter, save_adapter
    from studio.errors import StudioError

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "dora")
    perturb(adapter_models(pipe).values())
    adapter = export_adapter(adapter_models(pipe))
    save_adapter(tmp_path / "p", adapter, format="peft", models=adapter_models(pipe))
    with pytest.raises(StudioError, match="base model"):
        convert_adapter(tmp_path / "p", tmp_path / "k.safetensors")
    convert_adapter(tmp_path / "p", tmp_path / "k.safetensors", models=adapter_models(tiny_sd15_pipeline()))
    k = load_adapter(tmp_path / "k.safetensors")
    for name, module in adapter.modules.items():
        assert torch.allclose(k.modules[name].dora_scale, module.dora_scale, atol=1e-6)


# --------------------------------------------------------------------------------------
# describe, errors, hostile files
# --------------------------------------------------------------------------------------


def test_describe_and_inspect(tmp_path, capsys):
    from studio.adapters import adapter_models, export_adapter, save_adapter
    from studio.adapters.library import describe_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "loha")
    path = save_adapter(tmp_path / "h.safetensors", export_adapter(adapter_models(pipe)))
    info = describe_adapter(path)
    assert info["family"] == "sd15" and info["type"] == "loha" and info["kinds"] == {"loha": info["modules"]}
    assert info["ranks"] == [4] and info["alphas"] == [2.0] and info["sshs_model_hash_matches"] is True
    assert info["prefixes"]["lora_te"] == 12 and info["prefixes"]["lora_unet"] == info["modules"] - 12
    code, out, _ = cli(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["type"] == "loha"
    code, out, _ = cli(capsys, "inspect", path)
    assert code == 0 and "lora_unet" in out and "matches" in out


def test_wrong_family_shapes_and_keys_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter
    from studio.errors import StudioError

    xl = tiny_sdxl_pipeline()
    add_adapter(xl, "lora")
    xl_file = save_adapter(tmp_path / "xl.safetensors", export_adapter(adapter_models(xl), family="sdxl"))
    sd = tiny_sd15_pipeline()
    with pytest.raises(StudioError, match="trained on SDXL but the base model is SD 1.5"):
        attach_adapter(sd, load_adapter(xl_file), "x")
    assert not getattr(sd.unet, "peft_config", None)

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, "lora")
    adapter = export_adapter(adapter_models(pipe))
    name = "lora_unet_down_blocks_2_attentions_0_transformer_blocks_0_attn1_to_q"
    adapter.modules[name].tensors["lora_down.weight"] = torch.zeros(4, 7)
    with pytest.raises(StudioError, match=r"do not match.*attn1_to_q: file \(64, 7\), model \(64, 64\)"):
        attach_adapter(sd, adapter, "x")
    assert not getattr(sd.unet, "peft_config", None) and not getattr(sd.text_encoder, "peft_config", None)

    extra = export_adapter(adapter_models(pipe))
    extra.modules["lora_unet_no_such_layer"] = extra.modules[name]
    with pytest.raises(StudioError, match="lora_unet_no_such_layer \\(no such layer\\)"):
        attach_adapter(sd, extra, "x")

    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.zeros(64, 4),
               f"{name}.oft_blocks": torch.zeros(2)}
    save_file(tensors, tmp_path / "odd.safetensors")
    with pytest.raises(StudioError, match="oft_blocks.*OFT"):
        load_adapter(tmp_path / "odd.safetensors")


@pytest.mark.slow(seconds=8)
def test_hostile_files_fail_cleanly_in_the_cli(tmp_path, capsys):
    from safetensors.torch import save_file

    from studio.cli import main

    good = tmp_path / "good.safetensors"
    name = "lora_unet_down_blocks_2_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.ones(2, 64), f"{name}.lora_up.weight": torch.ones(64, 2)}, good)
    raw = good.read_bytes()
    cases = {
        "truncated": raw[:-100],
        "huge": struct.pack("<Q", 2 ** 60) + raw[8:],
        "pickle": b"\x80\x04\x95" + b"\x00" * 64,
    }
    nan = tmp_path / "nan.safetensors"
    save_file({f"{name}.lora_down.weight": torch.full((2, 64), float("nan")),
               f"{name}.lora_up.weight": torch.ones(64, 2)}, nan)
    paths = {"nan": nan}
    for case, data in cases.items():
        paths[case] = tmp_path / f"{case}.safetensors"
        paths[case].write_bytes(data)
    expected = {"truncated": "truncated", "huge": "header claims", "pickle": "pickle", "nan": "NaN"}
    for case, path in paths.items():
        for args in (("inspect", path), ("convert", path, tmp_path / "out.safetensors")):
            code = main([str(a) for a in args])
            err = capsys.readouterr().err
            assert code == 2, (case, err)
            assert err.count("\n") == 1 and "Traceback" not in err and expected[case] in err, (case, err)
    # and once through a real process
    result = run_cli("inspect", paths["pickle"])
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "pickle" in result.stderr


@pytest.mark.slow(seconds=6)
def test_engine_blends_different_adapter_types(tmp_path):
    """The engine loads LoHa and LoRA files into one pipeline and weights them."""
    from studio.adapters import adapter_models, export_adapter, save_adapter
    from studio.generation.engine import AdapterUse, Engine, GenerateRequest
    from studio.models import load_pipeline

    torch.manual_seed(0)  # the adapters' random init: its effect must not depend on the tests run before
    files = []
    for variant in ("loha", "lora"):
        pipe = load_pipeline("builtin")
        add_adapter(pipe, variant)
        perturb(adapter_models(pipe).values())
        files.append(save_adapter(tmp_path / f"{variant}.safetensors", export_adapter(adapter_models(pipe))))
    engine = Engine()
    request = dict(prompt="a red circle", steps=3, seed=1)
    base = np.asarray(engine.generate(GenerateRequest(**request))[0], dtype=np.int16)
    both = np.asarray(engine.generate(GenerateRequest(**request, adapters=[AdapterUse(f, 1.0) for f in files]))[0],
                      dtype=np.int16)
    zero = np.asarray(engine.generate(GenerateRequest(**request, adapters=[AdapterUse(f, 0.0) for f in files]))[0],
                      dtype=np.int16)
    assert np.abs(both - base).mean() > 1.0
    assert np.array_equal(zero, base)


@pytest.mark.slow
def test_trained_adapter_metadata(trained_demo):
    from studio.adapters import read_checked_header

    meta = read_checked_header(trained_demo["adapter"])[1]
    for key in ("ss_output_name", "ss_tag_frequency", "ss_dataset_dirs", "ss_resolution", "ss_sd_model_name",
                "ss_sd_model_hash", "ss_new_sd_model_hash", "ss_steps", "ss_learning_rate", "ss_seed",
                "ss_training_started_at", "ss_training_finished_at", "ss_network_module", "ss_network_dim",
                "ss_network_alpha", "modelspec.architecture", "modelspec.title", "modelspec.resolution",
                "modelspec.date", "modelspec.prediction_type", "modelspec.thumbnail", "sshs_model_hash",
                "sshs_legacy_hash"):
        assert meta.get(key), key
    assert meta["modelspec.thumbnail"].startswith("data:image/jpeg;base64,")
    assert meta["modelspec.trigger_phrase"] and meta["ss_network_module"] == "networks.lora"
    assert len(meta["ss_new_sd_model_hash"]) == 64 and len(meta["ss_sd_model_hash"]) == 8
    assert meta["sshs_model_hash"] == hashlib.sha256(_data_section(trained_demo["adapter"])).hexdigest()


@pytest.mark.parametrize("variant", ["loha-tucker", "lokr-both", "dora"])
@pytest.mark.slow(seconds=6)
def test_peft_layout_round_trip(variant, tmp_path):
    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, variant)
    perturb(adapter_models(pipe).values())
    expected = generate(pipe)
    adapter = export_adapter(adapter_models(pipe))
    save_adapter(tmp_path / "p", adapter, format="peft", models=adapter_models(tiny_sd15_pipeline()))
    back = load_adapter(tmp_path / "p")
    assert back.source_format == "peft" and back.modules.keys() == adapter.modules.keys()
    assert back.adapter_type == adapter.adapter_type
    fresh = tiny_sd15_pipeline()
    attach_adapter(fresh, back, "x")
    assert max_pixel_diff(generate(fresh), expected) <= PIXEL_TOLERANCE


def test_sdxl_diffusers_layouts_import(tmp_path):
    """An SDXL file in diffusers layout, in both key spellings (`lora_A` and the older
    `.lora.down`), imports with sgm kohya names and generates like the original."""
    from safetensors.torch import load_file, save_file

    from studio.adapters import adapter_models, attach_adapter, export_adapter, load_adapter, save_adapter

    pipe = tiny_sdxl_pipeline()
    add_adapter(pipe, "lora")
    perturb(adapter_models(pipe).values())
    expected = generate(pipe)
    adapter = export_adapter(adapter_models(pipe), family="sdxl")
    save_adapter(tmp_path / "d.safetensors", adapter, format="diffusers", models=adapter_models(tiny_sdxl_pipeline()))
    old_style = {k.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight"): v
                 for k, v in load_file(tmp_path / "d.safetensors").items()}
    save_file(old_style, tmp_path / "old.safetensors")  # no metadata: alpha = rank, so scale 1 ...
    for name in ("d.safetensors",):
        back = load_adapter(tmp_path / name)
        assert back.family == "sdxl" and back.modules.keys() == adapter.modules.keys()
        fresh = tiny_sdxl_pipeline()
        attach_adapter(fresh, back, "x")
        assert max_pixel_diff(generate(fresh), expected) <= PIXEL_TOLERANCE
    old = load_adapter(tmp_path / "old.safetensors")  # ... which the LoRA alpha of 2 / rank 4 is not
    assert old.modules.keys() == adapter.modules.keys() and {m.scale for m in old.modules.values()} == {1.0}


@pytest.mark.slow
@pytest.mark.parametrize("network", [
    {"type": "lora", "train_text_encoder": True, "use_rslora": True},
    {"type": "locon", "use_dora": True, "conv_rank": 4, "conv_alpha": 2.0},
    {"type": "loha", "rank": 4},
    {"type": "lokr", "rank": 2},
    {"type": "tlora", "rank": 4, "tlora_min_rank": 2},
])
def test_trainer_export_round_trip(network, workspace):
    """Through the trainer: the file it writes, imported, generates what the trained
    in-memory adapter generates (T-LoRA: its plain all-ranks form loads and describes)."""
    from studio.adapters import attach_adapter, load_adapter
    from studio.adapters.library import describe_adapter
    from studio.config import network_config
    from studio.models import load_pipeline
    from studio.jobs.runs import create_run
    from tests.conftest import demo_config
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=3, learning_rate=3e-2)
    config.sampling.steps = 2
    config.network = network_config(like=config.network, **network)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    path = trainer.run()
    info = describe_adapter(path)
    assert info["metadata"]["ss_steps"] == "3" and info["metadata"]["modelspec.thumbnail"].startswith("data:")
    if network["type"] == "tlora":
        assert info["format"] == "tlora" and info["metadata"]["lora_studio_adapter_type"] == "tlora"
        assert info["ranks"] == [8]  # Ortho-LoRA: rank 2r with every rank on
        return
    expected_type = {"lora": "lora", "locon": "locon+dora", "loha": "loha", "lokr": "lokr"}[network["type"]]
    assert info["type"] == expected_type
    if network.get("train_text_encoder"):
        assert info["prefixes"]["lora_te"] > 0
    pipe = trainer.pipe
    pipe.unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    pipe.unet.eval()
    expected = generate(pipe, prompt="a sks star")
    fresh = load_pipeline("builtin")
    assert max_pixel_diff(generate(fresh, prompt="a sks star"), expected) > 0.01  # the adapter does something
    attach_adapter(fresh, load_adapter(path), "imported")
    assert max_pixel_diff(generate(fresh, prompt="a sks star"), expected) <= PIXEL_TOLERANCE
