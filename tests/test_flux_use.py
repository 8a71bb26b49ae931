"""FLUX.1 in use, on the built-in tiny Flux model (`builtin-flux`): a LoRA trained through
the one trainer is drawn by the engine exactly as the run sampled it (the family's sampler
and call, which the engine never names), weight 0 is the base; its file says the family
and the variant; check_training refuses by name what the family cannot do; every method of
METHODS trains a step and loads, or is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.adapters.methods import METHODS
from studio.config import network_config
from tests.conftest import demo_config
from tests.method_checks import assert_generate_reproduces_sample
from tests.test_flux import FLUX_TARGETS

STEPS = 6
PROMPT = "a sks star on a white background"


def flux_config(method: str = "lora", **training):
    """The demo config on builtin-flux at 32 px, 4 sampling steps, without class pictures."""
    config = demo_config(**training)
    config.base_model = "builtin-flux"
    config.network = network_config(method, target_modules=FLUX_TARGETS)
    config.dataset.resolution = 32
    config.sampling.steps = 4
    config.sampling.negative_prompt = ""
    return config


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory):
    """A LoRA on the transformer and CLIP-L (train_text_encoder), STEPS steps at lr 1e-2."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    workspace = Workspace.open(tmp_path_factory.mktemp("flux-use") / "ws")
    config = flux_config(max_steps=STEPS, learning_rate=1e-2)
    config.network.train_text_encoder = True
    config.name = "flux-use"
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    path = trainer.run()
    return {"trainer": trainer, "path": path, "workspace": workspace}


@pytest.mark.slow(seconds=60)
def test_generate_draws_what_the_run_sampled_and_weight_zero_is_the_base(flux_run, tmp_path):
    """The trainer's sample and `lora-studio generate` go through the family's sampler and
    call (flow-match Euler, true CFG for a model without a guidance embedding): the same
    pixels; the adapter changes them; at weight 0 the engine draws the base model."""
    from PIL import Image

    from studio.generation.engine import AdapterUse, Engine, GenerateRequest

    assert_generate_reproduces_sample(flux_run["trainer"], flux_run["path"], tmp_path, step=STEPS, changed_by=2)
    assert "Sampler: Euler," in Image.open(tmp_path / "with.png").info["parameters"]
    engine = Engine()
    request = GenerateRequest(PROMPT, model="builtin-flux", steps=3, width=32, height=32, seed=3)
    base = np.asarray(engine.generate(request)[0], dtype=np.int16)
    off = np.asarray(engine.generate(GenerateRequest(**{**request.__dict__, "adapters": [
        AdapterUse(flux_run["path"], 0.0)]}))[0], dtype=np.int16)
    on = np.asarray(engine.generate(GenerateRequest(**{**request.__dict__, "adapters": [
        AdapterUse(flux_run["path"], 1.0)]}))[0], dtype=np.int16)
    assert np.array_equal(base, off)
    assert np.abs(on - base).max() > 2


def test_a_sampler_of_another_family_is_refused_in_one_line():
    from studio.errors import StudioError
    from studio.generation.engine import sampler_of
    from studio.models.families import get_family

    assert sampler_of(get_family("flux"), None) == "euler"
    with pytest.raises(StudioError, match=r"^FLUX.1 models sample with euler, not 'ddim'; choose one of those\.$"):
        sampler_of(get_family("flux"), "ddim")


def test_dev_takes_the_cfg_scale_as_its_distilled_guidance_and_no_negative_prompt():
    """generation_kwargs: FLUX.1-dev (a guidance embedding) gets guidance_scale and no
    negative prompt; schnell (none) true CFG against the negative (or empty) prompt."""
    from types import SimpleNamespace

    from studio.errors import StudioError
    from studio.models.families import get_family

    def pipe(guidance):
        return SimpleNamespace(vae=SimpleNamespace(config=SimpleNamespace(sample_size=64)),
                               tokenizer_2=SimpleNamespace(model_max_length=16),
                               transformer=SimpleNamespace(config=SimpleNamespace(guidance_embeds=guidance)))

    kwargs = get_family("flux").generation_kwargs
    dev = kwargs(pipe(True), "a star", "", 3.5)
    assert dev["guidance_scale"] == 3.5 and "negative_prompt" not in dev and "true_cfg_scale" not in dev
    assert (dev["width"], dev["height"], dev["max_sequence_length"]) == (64, 64, 16)
    schnell = kwargs(pipe(False), ["a", "b"], "blurry", 5.0, 32, 32)
    assert schnell["true_cfg_scale"] == 5.0 and schnell["negative_prompt"] == ["blurry", "blurry"]
    with pytest.raises(StudioError, match="takes no negative prompt"):
        kwargs(pipe(True), "a star", "blurry", 3.5)


@pytest.mark.slow(seconds=25)
def test_a_dev_model_draws_with_its_distilled_guidance():
    """FluxPipeline takes generation_kwargs as they are for a transformer with a guidance
    embedding (FLUX.1-dev's layout, the built-in model's weights otherwise): the CFG scale
    is the guidance it embeds, one pass per step, and changes the picture."""
    from diffusers import FluxTransformer2DModel

    from studio.models import load_pipeline
    from studio.models.families import get_family

    pipe = load_pipeline("builtin-flux")
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel.from_config({**pipe.transformer.config, "guidance_embeds": True})
    pipe.set_progress_bar_config(disable=True)
    family = get_family("flux")

    def draw(scale):
        call = family.generation_kwargs(pipe, PROMPT, "", scale, 32, 32)
        image = pipe(**call, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image, dtype=np.int16)

    low, high = draw(1.0), draw(3.5)
    assert low.shape == (32, 32, 3) and np.abs(high - low).max() > 0


@pytest.mark.slow(seconds=10)
def test_the_file_says_flux_and_the_variant_and_trains_clip_l_only(flux_run, capsys):
    """sd-scripts' metadata for FLUX.1: ss_base_model_version flux1, modelspec.architecture
    flux-1-schnell/lora for a model without a guidance embedding (flux-1-dev with one), no
    modelspec.prediction_type (sd-scripts writes none for flow matching); a text-encoder
    LoRA on CLIP-L (lora_te1) and none on T5 (lora_te3); `lora-studio inspect` says flux."""
    from studio.adapters import load_adapter, read_checked_header
    from studio.models.families import get_family

    metadata = read_checked_header(flux_run["path"])[1]
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert "modelspec.prediction_type" not in metadata
    assert get_family("flux").lora_architecture_of({"guidance_embeds": True}) == "flux-1-dev/lora"
    adapter = load_adapter(flux_run["path"])
    assert adapter.family == "flux"
    prefixes = {name.split("_text_model")[0] for name in adapter.modules if name.startswith("lora_te")}
    assert prefixes == {"lora_te1"}
    from studio.cli import main

    capsys.readouterr()
    assert main(["inspect", str(flux_run["path"])]) == 0
    assert "    family: flux" in capsys.readouterr().out.splitlines()


@pytest.mark.slow(seconds=30)
def test_lbw_over_flux_blocks_and_fuse_of_fused_targets(flux_run, tmp_path):
    """LoRA Block Weight over D/S blocks in the engine: NONE is the base transformer,
    DOUBLE (the double blocks alone) differs from it and from ALL; bake of two halves is the
    adapter, resize to rank 2 reads back as FLUX.1; fuse merges
    the fused kohya modules (qkv) into the pieces' weights: the fused model's transformer
    computes what the adapter attached at weight 1 computes."""
    import copy

    from studio.adapters import attach_adapter, load_adapter, read_checked_header
    from studio.adapters.mixing import bake, fuse, module_blocks, resize
    from studio.generation.engine import AdapterUse, Engine
    from studio.models import load_pipeline
    from tests.test_flux import _inputs

    adapter = load_adapter(flux_run["path"])
    blocks = module_blocks("flux", adapter)
    assert blocks["lora_unet_double_blocks_0_img_attn_qkv"] == "D00"
    assert blocks["lora_unet_single_blocks_1_linear1"] == "S01"
    assert {b for name, b in blocks.items() if name.startswith("lora_te1")} == {"BASE"}

    engine = Engine()

    def transformer_out(block_weights):
        uses = [AdapterUse(flux_run["path"], 1.0, block_weights=block_weights)] if block_weights else []
        with torch.no_grad():
            return engine.set_mix("builtin-flux", uses).transformer(**_inputs(load_pipeline("builtin-flux")))[0]

    base, none, double, every = (transformer_out(b) for b in (None, "NONE", "DOUBLE", "ALL"))
    assert torch.allclose(none, base, atol=1e-6)
    assert (double - base).abs().max() > 1e-4 and (every - double).abs().max() > 1e-4

    out = fuse("builtin-flux", [(flux_run["path"], 1.0)], tmp_path / "fused.safetensors")
    fused = load_pipeline(str(out))
    attached = copy.deepcopy(load_pipeline("builtin-flux"))
    attach_adapter(attached, adapter, "a")
    inputs = _inputs(attached)
    with torch.no_grad():
        want = attached.transformer(**inputs)[0]
        got = fused.transformer(**inputs)[0]
    assert float((got - want).norm() / want.norm()) < 1e-4

    halves = bake([(flux_run["path"], 0.5), (flux_run["path"], 0.5)], tmp_path / "baked.safetensors").path
    assert set(load_adapter(halves).modules) == set(adapter.modules)
    assert read_checked_header(halves)[1]["modelspec.architecture"] == "flux-1-schnell/lora"
    baked = copy.deepcopy(load_pipeline("builtin-flux"))
    attach_adapter(baked, load_adapter(halves), "b")
    with torch.no_grad():
        assert float((baked.transformer(**inputs)[0] - want).norm() / want.norm()) < 1e-4
    small = resize(flux_run["path"], tmp_path / "rank2.safetensors", rank=2)
    assert small.ranks == [2] and load_adapter(small.path).family == "flux"


# --------------------------------------------------------------------------------------
# what FLUX.1 cannot do: check_training, one line each, naming the option
# --------------------------------------------------------------------------------------


def _problems(config, workspace) -> list[str]:
    from studio.jobs.runs import check_training

    return [str(p) for p in check_training(config, workspace).problems]


def test_check_training_refuses_min_snr_and_unet_sections_by_name(workspace):
    config = flux_config(min_snr_gamma=5.0, block_lr_down=0.5)
    config.network = network_config("lora", target_modules=FLUX_TARGETS, block_rank_up=4)
    problems = _problems(config, workspace)
    assert problems == [
        "training.min_snr_gamma weights the loss by DDPM's signal-to-noise ratio, which a flow-matching model "
        "(FLUX.1) does not have; unset it.",
        "training.block_lr_down sets the UNet's down blocks, which FLUX.1's transformer has not; unset it.",
        "network.block_rank_up sets the UNet's up blocks, which FLUX.1's transformer has not; unset it.",
    ]
    assert all("\n" not in p for p in problems)
    assert _problems(flux_config(), workspace) == []
    sd = demo_config(min_snr_gamma=5.0, block_lr_down=0.5)
    assert _problems(sd, workspace) == []


def test_check_training_says_t5_stays_frozen(workspace):
    from studio.jobs.runs import check_training

    config = flux_config()
    config.network.train_text_encoder = True
    check = check_training(config, workspace)
    assert not check.problems
    assert ("network.train_text_encoder on FLUX.1 trains CLIP-L (text_encoder) only; T5-XXL (text_encoder_2) "
            "stays frozen, as in sd-scripts without train_t5xxl.") in check.warnings


# --------------------------------------------------------------------------------------
# every method on builtin-flux
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_engine():
    from studio.generation.engine import Engine

    return Engine()


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_flux_and_loads_or_is_refused_in_one_line(method, workspace, flux_engine):
    """Each method at its default options (the attention of both streams and the single
    blocks' MLP input as targets): refused by check_training in one line naming the option,
    or two steps through the trainer (AdaLoRA needs one before its rank step) whose file
    loads as a FLUX.1 adapter, changes the transformer's output when attached, and changes
    the engine's picture (T-LoRA through its own file and timestep mask)."""
    import copy

    from studio.adapters import attach_adapter, load_adapter
    from studio.errors import StudioError
    from studio.generation.engine import AdapterUse, GenerateRequest
    from studio.jobs.runs import check_training, create_run
    from studio.models import load_pipeline
    from tests.test_flux import _inputs
    from trainers.trainer import AdapterTrainer

    config = flux_config(method, max_steps=2, learning_rate=1e-2)
    config.name = f"flux-{method}"
    problems = check_training(config, workspace).problems
    if problems:
        assert len(problems) == 1 and "\n" not in str(problems[0]) and "network." in str(problems[0]), problems
        with pytest.raises(StudioError):
            create_run(config, workspace)
        return
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    try:
        path = trainer.run()
    except StudioError as error:  # targets the transformer has not (LoCon's ResNet convs): refused at setup
        assert "\n" not in str(error) and "match no module" in str(error), error
        assert method in ("locon", "adalora"), error
        return
    adapter = load_adapter(path)
    assert adapter.family == "flux" and adapter.modules
    base = load_pipeline("builtin-flux")
    inputs = _inputs(base)
    with torch.no_grad():
        before = base.transformer(**inputs)[0]
    adapted = copy.deepcopy(base)
    attach_adapter(adapted, adapter, "a")
    with torch.no_grad():
        after = adapted.transformer(**inputs)[0]
    assert (after - before).abs().max() > 1e-6, method
    request = GenerateRequest(PROMPT, model="builtin-flux", steps=2, width=32, height=32, seed=3)
    drawn = [np.asarray(flux_engine.generate(GenerateRequest(**{**request.__dict__, "adapters": uses}))[0], np.int16)
             for uses in ([], [AdapterUse(path, 4.0)])]
    assert np.abs(drawn[1] - drawn[0]).max() > 0, method


@pytest.mark.slow(seconds=20)
def test_tlora_reads_the_transformers_timesteps_in_its_own_scale(tmp_path):
    """FluxTransformer2DModel takes t / 1000: T-LoRA's pre-hook reads the family's
    call_timesteps, so its rank mask on the transformer is the schedule's at t in [0, 1000),
    per sample, and its file keys the transformer."""
    from studio.adapters.methods.tlora_layers import TLoRASchedule, inject_tlora, load_tlora, save_tlora
    from tests.test_flux import _inputs
    from toyworld.builtin_flux import build_pipeline

    pipe = build_pipeline(0)
    schedule = TLoRASchedule(8, 2, 1.0)
    adapter = inject_tlora(pipe.transformer, ["to_q", "to_k"], rank=8, alpha=8, ortho=False, schedule=schedule,
                           denoiser="transformer")
    with torch.no_grad():
        pipe.transformer(**_inputs(pipe))  # timesteps 0.3 and 0.8
    assert torch.equal(adapter._mask, schedule.mask(torch.tensor([300.0, 800.0])))
    assert adapter._mask[0].sum() > adapter._mask[1].sum()  # the noisier sample keeps fewer ranks
    assert load_tlora(save_tlora(tmp_path / "t.safetensors", adapter, {})).denoiser == "transformer"


@pytest.mark.slow(seconds=30)
def test_class_pictures_for_flux_are_the_engines_pictures(tmp_path):
    """Prior preservation's class pictures on builtin-flux go through the family's call as
    the engine does: class picture i is the engine's picture of the class prompt at seed
    (seed + 10000 + i), the run's sampling steps and CFG, the dataset's size."""
    import shutil

    from PIL import Image

    from studio import ASSETS_DIR
    from studio.generation.engine import Engine, GenerateRequest
    from studio.jobs.class_images import CLASS_SEED, class_image_folder, class_image_path
    from studio.jobs.runs import create_run, prepare_class_images
    from studio.workspace import Workspace

    dataset = tmp_path / "ds"
    shutil.copytree(ASSETS_DIR / "demo-dataset", dataset, ignore=shutil.ignore_patterns("reg"))
    config = flux_config(max_steps=1)
    config.dataset.path, config.dataset.class_prompt, config.dataset.num_class_images = str(dataset), "a shape", 1
    workspace = Workspace.open(tmp_path / "ws")
    run_dir = create_run(config, workspace)
    assert prepare_class_images(run_dir) == 1
    made = np.asarray(Image.open(class_image_path(class_image_folder(config, workspace), 0)), dtype=np.int16)
    size = config.dataset.resolution
    drawn = Engine().generate(GenerateRequest("a shape", model="builtin-flux", seed=CLASS_SEED,
                                              steps=config.sampling.steps, guidance_scale=config.sampling.guidance_scale,
                                              width=size, height=size))[0]
    assert np.abs(np.asarray(drawn, dtype=np.int16) - made).max() <= 1
