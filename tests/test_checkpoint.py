"""Single-file checkpoints: save -> load round trips offline, family detection, refusal of
pickles and damaged files, and the real-size SD 1.5 / SDXL skeletons (on the meta device)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from studio.models.families.sd15 import TE_PREFIX as SD15_TE_PREFIX
from studio.models.families.sdxl import TE1_PREFIX as SDXL_TE1_PREFIX
from studio.models.families.sdxl import TE2_PREFIX as SDXL_TE2_PREFIX

from studio.models.single_file import (
    AS_STORED,
    UNET_PREFIX,
    VAE_PREFIX,
    detect_family,
    load_single_file,
    read_safetensors_header,
    save_single_file,
)
from studio.errors import StudioError
from studio.models.families.unet import unet_diffusers_to_ldm, unet_ldm_to_diffusers
from tests.tiny_models import generate, tiny_sd15_pipeline, tiny_sdxl_pipeline, write_config_folder

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" with the real CLIP vocabulary


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_own_cache(tmp_path_factory):
    """One torch thread (tiny models on a shared 2-core machine run many times faster than
    with two contending threads) and a fresh skeleton cache for this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_STUDIO_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection fails the test (and Hub clients are told they are offline)."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise ConnectionRefusedError(f"network access during a test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd15")
    pipe = tiny_sd15_pipeline(seed=1)
    path = save_single_file(pipe, folder / "tiny-sd15.safetensors")
    return {"pipe": pipe, "path": path, "config": write_config_folder(pipe, folder / "config")}


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    pipe = tiny_sdxl_pipeline(seed=2)
    path = save_single_file(pipe, folder / "tiny-sdxl.safetensors")
    return {"pipe": pipe, "path": path, "config": write_config_folder(pipe, folder / "config")}


def _assert_same_weights(source, loaded, components):
    for name in components:
        expected = getattr(source, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert got.keys() == expected.keys(), name
        different = [k for k in expected if not torch.equal(expected[k], got[k])]
        assert not different, f"{name}: {different[:5]}"


# ----------------------------------------------------------------- round trips, offline


def test_sd15_round_trip_offline(sd15, no_network):
    header, metadata = read_safetensors_header(sd15["path"])
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1"
    prefixes = {p for p in (UNET_PREFIX, VAE_PREFIX, SD15_TE_PREFIX) for k in header if k.startswith(p)}
    assert prefixes == {UNET_PREFIX, VAE_PREFIX, SD15_TE_PREFIX}
    assert UNET_PREFIX + "input_blocks.0.0.weight" in header
    assert SD15_TE_PREFIX + "embeddings.token_embedding.weight" in header

    loaded = load_single_file(sd15["path"], config_dir=sd15["config"])
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    _assert_same_weights(sd15["pipe"], loaded, ["unet", "vae", "text_encoder"])
    assert (generate(loaded, steps=1) == generate(sd15["pipe"], steps=1)).all()


def test_sdxl_round_trip_offline(sdxl, no_network):
    header, metadata = read_safetensors_header(sdxl["path"])
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    te2 = sdxl["pipe"].text_encoder_2.config
    # OpenCLIP layout: fused qkv, projection stored [width, dim], attention of the VAE as 1x1 convs.
    assert header[SDXL_TE2_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"]["shape"] == [3 * te2.hidden_size, te2.hidden_size]
    assert header[SDXL_TE2_PREFIX + "text_projection"]["shape"] == [te2.hidden_size, te2.projection_dim]
    assert SDXL_TE1_PREFIX + "final_layer_norm.weight" in header
    assert UNET_PREFIX + "label_emb.0.0.weight" in header
    assert len(header[VAE_PREFIX + "decoder.mid.attn_1.q.weight"]["shape"]) == 4

    loaded = load_single_file(sdxl["path"], config_dir=sdxl["config"])
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert loaded.tokenizer_2.pad_token == "!"
    _assert_same_weights(sdxl["pipe"], loaded, ["unet", "vae", "text_encoder", "text_encoder_2"])
    assert (generate(loaded, steps=1) == generate(sdxl["pipe"], steps=1)).all()


def test_fp16_save_casts_weights(sd15, tmp_path):
    path = save_single_file(sd15["pipe"], tmp_path / "half.safetensors", dtype=torch.float16, metadata={"modelspec.title": "t"})
    header, metadata = read_safetensors_header(path)
    assert {v["dtype"] for v in header.values()} == {"F16"}
    assert metadata["modelspec.title"] == "t"
    assert [p.name for p in tmp_path.iterdir()] == ["half.safetensors"]  # no temp file left behind


def _mapped(path) -> bool:
    return str(Path(path).resolve()) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings")
def test_weights_are_read_into_memory_of_their_own(sd15, no_network):
    # safetensors' load_file maps the whole file and a model loaded in the file's dtype views
    # that mapping (every page read stays resident): the loader reads tensor by tensor instead.
    loaded = load_single_file(sd15["path"], config_dir=sd15["config"])
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float32}  # as stored: no copy needed
    assert not _mapped(sd15["path"])
    reference = StableDiffusionPipeline.from_single_file(str(sd15["path"]), config=str(sd15["config"]),
                                                         local_files_only=True)
    assert _mapped(sd15["path"])  # what the loader avoids
    del reference


def test_stored_dtypes_are_kept_per_component(sdxl, tmp_path, no_network):
    # A file with an fp16 UNet and text encoders and an fp32 VAE (as many SDXL files are): each
    # component in its own stored dtype, the values exactly those of diffusers' own loader.
    state = {k: (v if k.startswith(VAE_PREFIX) else v.half()) for k, v in load_file(sdxl["path"]).items()}
    path = tmp_path / "mixed.safetensors"
    save_file(state, path)
    loaded = load_single_file(path, config_dir=sdxl["config"], torch_dtype=AS_STORED)
    dtypes = {name: {p.dtype for p in getattr(loaded, name).parameters()}
              for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert dtypes == {"unet": {torch.float16}, "vae": {torch.float32}, "text_encoder": {torch.float16},
                      "text_encoder_2": {torch.float16}}
    for dtype in (torch.float16, torch.float32):
        reference = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl["config"]),
                                                               local_files_only=True, torch_dtype=dtype)
        ours = loaded if dtype == torch.float16 else load_single_file(path, config_dir=sdxl["config"],
                                                                      torch_dtype=dtype)
        names = ["unet", "text_encoder", "text_encoder_2"] + (["vae"] if dtype == torch.float32 else [])
        _assert_same_weights(reference, ours, names)


def test_default_skeleton_is_used_offline(sdxl, no_network):
    # Without config_dir the shipped real-size SDXL skeleton is used: no Hub access, and a
    # tiny checkpoint does not fit it, which must be a StudioError, not a deep traceback.
    with pytest.raises(StudioError, match=r"does not fit the SDXL configs in .*skeletons.*other shapes"):
        load_single_file(sdxl["path"])


def test_config_of_the_wrong_family_is_refused(sd15, sdxl):
    with pytest.raises(StudioError, match="is for Stable Diffusion 1.x but the checkpoint is SDXL"):
        load_single_file(sdxl["path"], config_dir=sd15["config"])


# ----------------------------------------------------------------- detection and refusals


def test_detect_family(sd15, sdxl):
    assert detect_family(sd15["path"]) == "sd15"
    assert detect_family(sdxl["path"]) == "sdxl"
    assert detect_family(sd15["config"]) == "sd15"  # diffusers folders via model_index.json
    assert detect_family(sdxl["config"]) == "sdxl"
    assert detect_family(["conditioner.embedders.1.model.positional_embedding"]) == "sdxl"
    assert detect_family(["cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd15"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"], "Stable Diffusion 2"),
        (["conditioner.embedders.0.model.text_projection"], "refiner"),
        (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "LoRA"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "no text encoder"),
        (["joint_blocks.0.x_block.attn.qkv.weight"], "SD3"),
        ([], "no tensors at all"),
    ],
)
def test_detect_family_rejects_other_models(keys, message):
    with pytest.raises(StudioError, match=message):
        detect_family(keys)


def test_detect_family_rejects_inpainting_by_shape():
    keys = {
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.empty(0),
        UNET_PREFIX + "input_blocks.0.0.weight": torch.empty(320, 9, 3, 3, device="meta"),
    }
    with pytest.raises(StudioError, match="inpainting"):
        detect_family(keys)


def test_pickle_is_refused_even_when_named_safetensors(tmp_path, sd15):
    disguised = tmp_path / "model.safetensors"
    torch.save({"cond_stage_model.transformer.text_model.x": torch.zeros(1)}, disguised)
    with pytest.raises(StudioError, match="is a pickle.*although its name ends in .safetensors"):
        load_single_file(disguised)
    with pytest.raises(StudioError, match="rename it to .ckpt"):
        load_single_file(disguised, allow_pickle=True)
    ckpt = tmp_path / "model.ckpt"
    disguised.rename(ckpt)
    with pytest.raises(StudioError, match="allow_pickle"):
        detect_family(ckpt)


def test_opted_in_ckpt_loads(tmp_path, sd15, no_network):
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(sd15["path"]), "global_step": 3}, ckpt)
    assert detect_family(ckpt, allow_pickle=True) == "sd15"
    loaded = load_single_file(ckpt, allow_pickle=True, config_dir=sd15["config"])
    _assert_same_weights(sd15["pipe"], loaded, ["unet", "vae", "text_encoder"])


@pytest.mark.parametrize("keep", [0.5, 40])
def test_truncated_file_is_refused(tmp_path, sd15, keep):
    data = sd15["path"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(StudioError, match="truncated"):
        load_single_file(cut)
    with pytest.raises(StudioError, match="truncated"):
        detect_family(cut)


def test_garbage_and_incomplete_files_are_refused(tmp_path, sd15):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x13\x37" * 100)
    with pytest.raises(StudioError, match="not a safetensors checkpoint"):
        load_single_file(garbage)
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes((10).to_bytes(8, "little") + b"{not json}")
    with pytest.raises(StudioError, match="not valid JSON"):
        load_single_file(bad_json)

    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(sd15["path"]).items() if not k.startswith(VAE_PREFIX)}
    no_vae = tmp_path / "no-vae.safetensors"
    save_file(state, no_vae)
    with pytest.raises(StudioError, match=r"no weights for VAE \(first_stage_model"):
        load_single_file(no_vae, config_dir=sd15["config"])
    state = load_file(sd15["path"])
    del state[UNET_PREFIX + "out.2.bias"]
    no_bias = tmp_path / "no-bias.safetensors"
    save_file(state, no_bias)
    with pytest.raises(StudioError, match="lacks 1 of the .* UNet/VAE weights.*model.diffusion_model.out.2.bias"):
        load_single_file(no_bias, config_dir=sd15["config"])
    state = load_file(sd15["path"])
    del state[SD15_TE_PREFIX + "final_layer_norm.bias"]
    te_incomplete = tmp_path / "te-incomplete.safetensors"
    save_file(state, te_incomplete)
    with pytest.raises(StudioError, match="lacks 1 weight.*text_encoder.final_layer_norm.bias"):
        load_single_file(te_incomplete, config_dir=sd15["config"])
    with pytest.raises(StudioError, match="is a folder"):
        load_single_file(tmp_path)
    with pytest.raises(StudioError, match="must end in .safetensors"):
        save_single_file(sd15["pipe"], tmp_path / "x.ckpt")


# ----------------------------------------------------------------- UNet name mapping


SD15_UNET = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.1.proj_in.weight": "input_blocks.5.1.proj_in.weight",
    "down_blocks.0.resnets.1.conv1.weight": "input_blocks.2.0.in_layers.2.weight",
    "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
    "down_blocks.2.downsamplers.0.conv.weight": "input_blocks.9.0.op.weight",
    "down_blocks.3.resnets.1.time_emb_proj.bias": "input_blocks.11.0.emb_layers.1.bias",
    "mid_block.resnets.1.norm2.weight": "middle_block.2.out_layers.0.weight",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj": "middle_block.1.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.0.resnets.2.conv2.weight": "output_blocks.2.0.out_layers.3.weight",
    "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
    "up_blocks.1.upsamplers.0.conv.bias": "output_blocks.5.2.conv.bias",
    "up_blocks.3.attentions.2.proj_out": "output_blocks.11.1.proj_out",
    "up_blocks.3.resnets.2.conv_shortcut.weight": "output_blocks.11.0.skip_connection.weight",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_out.weight": "out.2.weight",
}
SDXL_UNET = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0": "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_v": "middle_block.1.transformer_blocks.9.attn2.to_v",
    "up_blocks.0.attentions.0.proj_in": "output_blocks.0.1.proj_in",
    "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
    "up_blocks.2.resnets.2.norm1.bias": "output_blocks.8.0.in_layers.0.bias",
    "add_embedding.linear_1.weight": "label_emb.0.0.weight",
    "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight":
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.default.weight",
}


def _skeleton_config(family, name):
    from studio.models.skeletons import skeleton_dir

    return json.loads((skeleton_dir(family) / name / "config.json").read_text())


@pytest.mark.parametrize(("family", "pairs"), [("sd15", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_unet_name_mapping_examples(family, pairs):
    config = _skeleton_config(family, "unet")
    for diffusers_name, ldm_name in pairs.items():
        assert unet_diffusers_to_ldm(diffusers_name, config) == ldm_name
        assert unet_ldm_to_diffusers(ldm_name, config) == diffusers_name
    for bad in ("time_proj", "down_blocks.0", "mid_block.nope", "down_blocks.0.resnets.0.bogus"):
        with pytest.raises(StudioError):
            unet_diffusers_to_ldm(bad, config)
    for bad in ("input_blocks.1.0.in_layers", "input_blocks.99.0.weight", "time_embed.1", "label_emb.0.1"):
        with pytest.raises(StudioError):
            unet_ldm_to_diffusers(bad, config)


# Parameter counts of the real models (UNet / text encoders / VAE), from the skeleton configs.
REAL_SIZES = {
    "sd15": {"unet": (686, 859_520_964), "text_encoder": (196, 123_060_480)},
    "sdxl": {"unet": (1680, 2_567_463_684), "text_encoder": (196, 123_060_480), "text_encoder_2": (389, 694_659_840)},
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_real_size_skeleton_layout(family):
    """Build the real UNet / VAE / CLIP from the skeleton on the meta device (no weights)
    and check that every parameter maps to an LDM name and back, and that diffusers' own
    LDM -> diffusers conversion gives the same names back."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from studio.models import single_file as checkpoint
    from studio.models.skeletons import skeleton_dir

    folder = skeleton_dir(family)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))

    state = unet.state_dict()
    ldm = {unet_diffusers_to_ldm(k, unet.config): v for k, v in state.items()}
    assert (len(state), sum(v.numel() for v in state.values())) == REAL_SIZES[family]["unet"]
    assert len(ldm) == len(state)
    assert all(ldm[k].shape == v.shape for k, v in zip(ldm, state.values()))
    assert {unet_ldm_to_diffusers(k, unet.config) for k in ldm} == set(state)
    converted = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert converted.keys() == state.keys()
    assert all(converted[k] is state[k] for k in state)

    vae_ldm = checkpoint._vae_to_ldm(vae)
    assert len(vae_ldm) == len(vae.state_dict()) == 248
    assert vae_ldm[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    te_prefix = SDXL_TE1_PREFIX if family == "sdxl" else SD15_TE_PREFIX
    for name, encoder in encoders.items():
        mapped = (checkpoint._open_clip_to_ldm(encoder, SDXL_TE2_PREFIX) if name == "text_encoder_2"
                  else checkpoint._clip_to_ldm(encoder, te_prefix))
        count, params = REAL_SIZES[family][name]
        assert len(mapped) == count
        assert sum(p.numel() for p in encoder.parameters()) == params
    if family == "sdxl":
        assert mapped[SDXL_TE2_PREFIX + "text_projection"].shape == (1280, 1280)
        assert mapped[SDXL_TE2_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_skeleton_tokenizers_use_the_real_clip_vocabulary(family):
    from transformers import CLIPTokenizer

    from studio.models.skeletons import skeleton_dir

    folder = skeleton_dir(family)
    assert detect_family(folder) == family
    names = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    for name in names:
        tokenizer = CLIPTokenizer.from_pretrained(folder / name)
        assert len(tokenizer) == 49408
        assert tokenizer("a photo of a cat").input_ids == CAT_IDS
        assert tokenizer.model_max_length == 77
        assert tokenizer.pad_token == ("!" if name == "tokenizer_2" else "<|endoftext|>")


@pytest.mark.slow(seconds=30)
def test_cli_generates_from_single_file_of_builtin_model(tmp_path, monkeypatch):
    """The CLI path: a single-file checkpoint of the built-in model, loaded by reference
    with no network, generates the same image as the built-in folder."""
    import numpy as np
    from PIL import Image

    from studio.models.single_file import save_single_file
    from studio.models import load_pipeline
    from tests.conftest import run_cli

    single = tmp_path / "tiny.safetensors"
    save_single_file(load_pipeline("builtin"), single)
    a = run_cli("generate", "--model", single, "--prompt", "a red circle", "--steps", "4", "--out", tmp_path / "a.png")
    b = run_cli("generate", "--model", "builtin", "--prompt", "a red circle", "--steps", "4", "--out", tmp_path / "b.png")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))
