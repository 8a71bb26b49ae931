"""Other tools read our files: LyCORIS's own loader (lycoris-lora) on our kohya/LyCORIS
exports, and the diffusers layout's text-encoder names that diffusers and ComfyUI read."""
from __future__ import annotations

import pytest
import torch

from tests.test_formats import add_adapter, cli, max_pixel_diff, perturb, train_a_little
from tests.tiny_models import generate, tiny_sd15_pipeline, tiny_sdxl_pipeline

# DoRA: ComfyUI divides an output-axis dora_scale by the base weight's norm, and our export
# writes dora_scale so that ComfyUI draws what peft trained (tests/test_formats.py); LyCORIS's
# runtime divides by the merged weight's norm, so a DoRA file draws a little differently there
# (studio.adapters.library.DORA_CONVENTION, shown by `lora-studio inspect`).
CONVENTIONS_DIFFER = {"dora"}


def _unet_output(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([500]), cond).sample


def _lycoris_unet_output(path):
    """The built-in UNet with `path` applied by LyCORIS's kohya loader; also returns how many
    UNet modules it built."""
    from lycoris.kohya import LycorisNetworkKohya, create_network_from_weights

    from studio.models import load_pipeline

    unet = load_pipeline("builtin").unet
    # LyCORIS's stock name list targets time_embedding.linear_1 both by class and by name on a
    # diffusers UNet and asserts on the duplicate; no file of ours has those modules.
    LycorisNetworkKohya.apply_preset({"unet_target_name": []})
    network, _ = create_network_from_weights(1.0, str(path), None, None, unet)
    network.apply_to(None, unet, apply_text_encoder=False, apply_unet=True)
    return _unet_output(unet), len(network.unet_loras)


@pytest.mark.parametrize("variant", ["lora", "locon", "loha", "lokr", "lokr-full", "lokr-both", "dora"])
@pytest.mark.slow(seconds=6)
def test_lycoris_reads_our_files_as_our_engine_does(variant, tmp_path):
    from studio.adapters import adapter_models, export_adapter, load_adapter, save_adapter
    from studio.generation.engine import AdapterUse, Engine

    pytest.importorskip("lycoris")
    pipe = tiny_sd15_pipeline()
    add_adapter(pipe, variant)
    train_a_little(pipe)
    path = save_adapter(tmp_path / f"{variant}.safetensors", export_adapter(adapter_models(pipe), family="sd15"))
    unet_modules = sum(n.startswith("lora_unet_") for n in load_adapter(path).modules)

    engine = Engine()
    base = _unet_output(engine.set_mix("builtin", []).unet)
    ours = _unet_output(engine.set_mix("builtin", [AdapterUse(path, 1.0)]).unet)
    theirs, built = _lycoris_unet_output(path)
    assert built == unet_modules
    effect = (ours - base).abs().max()
    difference = (ours - theirs).abs().max()
    assert effect > 1e-3
    if variant in CONVENTIONS_DIFFER:
        assert 1e-4 * effect < difference < 0.1 * effect, (difference, effect)
    else:
        assert difference <= 1e-4 * effect, (difference, effect)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.slow(seconds=8)
def test_diffusers_layout_names_every_text_encoder_with_text_model(family, tmp_path, capsys):
    """Both text encoders carry `text_model.` in the diffusers layout (ComfyUI reads text-encoder
    tensors only so); diffusers loads every key; converting there and back is exact."""
    from safetensors import safe_open

    from studio.adapters import adapter_models, export_adapter, load_adapter, save_adapter
    from tests.test_formats import _diffusers_load, _lora_layers

    make = tiny_sd15_pipeline if family == "sd15" else tiny_sdxl_pipeline
    pipe = make()
    add_adapter(pipe, "lora")
    perturb(adapter_models(pipe).values())
    kohya = save_adapter(tmp_path / "k.safetensors", export_adapter(adapter_models(pipe), family=family))
    diffusers_file = tmp_path / "d.safetensors"
    model = []  # the built-in model fits SD1.5 files; a tiny SDXL file needs its own base
    if family == "sdxl":
        make().save_pretrained(tmp_path / "tiny-sdxl")
        model = ["--model", tmp_path / "tiny-sdxl"]
    code, _, err = cli(capsys, "convert", kohya, diffusers_file, "--format", "diffusers", *model)
    assert code == 0, err
    with safe_open(str(diffusers_file), "pt") as handle:
        te_keys = [k for k in handle.keys() if k.startswith("text_encoder")]
    attrs = {k.split(".")[0] for k in te_keys}
    assert attrs == ({"text_encoder"} if family == "sd15" else {"text_encoder", "text_encoder_2"})
    assert all(k.split(".")[1] == "text_model" for k in te_keys), te_keys[:3]

    back = tmp_path / "back.safetensors"
    assert cli(capsys, "convert", diffusers_file, back, "--format", "kohya")[0] == 0
    original, returned = load_adapter(kohya), load_adapter(back)
    assert original.modules.keys() == returned.modules.keys()
    for name, module in original.modules.items():
        for part, tensor in module.parts():
            assert torch.equal(dict(returned.modules[name].parts())[part], tensor), (name, part)

    theirs = make()
    messages = _diffusers_load(theirs, diffusers_file)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()], messages
    assert len(_lora_layers(theirs, "d")) == len(original.modules)
    ours = make()
    from studio.adapters import attach_adapter

    attach_adapter(ours, original, "x")
    assert max_pixel_diff(generate(theirs), generate(ours)) <= 1 / 255


def test_a_lycoris_tlora_file_is_refused_with_the_reason(tmp_path, capsys):
    """LyCORIS (algo=tlora) saves only the trained factors; the frozen copy its update is
    measured against comes from the base weights at load time, so the file is refused."""
    lycoris = pytest.importorskip("lycoris")

    pipe = tiny_sd15_pipeline()
    # two layers are enough for the file's layout (LyCORIS's SVD init of every layer takes long)
    lycoris.LycorisNetwork.apply_preset({"target_module": [], "target_name": [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "down_blocks.0.resnets.0.conv1"]})
    network = lycoris.create_lycoris(pipe.unet, 1.0, linear_dim=4, linear_alpha=2.0, algo="tlora")
    network.apply_to()
    path = tmp_path / "lycoris-tlora.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    code, _, err = cli(capsys, "inspect", path)
    assert code == 2 and err.count("\n") == 1
    assert "is a LyCORIS T-LoRA file (algo=tlora)" in err and "frozen copy" in err
