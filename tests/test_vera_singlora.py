"""VeRA and SingLoRA on tiny SD 1.5 (the built-in model) and tiny SDXL: the loss drops from
a start equal to the base model, the file is a plain LoRA equal to the trained model that
diffusers loads key for key, the engine blends it and `generate` redraws the run's last
sample; VeRA trains only its vectors over shared frozen projections, SingLoRA's update is a
symmetric PSD matrix on a square layer with half LoRA's parameters and resumes exactly."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from studio.config import network_config
from tests.conftest import demo_config
from tests.test_networks import _fixed_loss

STEPS = 30
RAMP = 10
# Per method: the network settings and learning rate of the test runs. VeRA trains r + out
# values a layer, so it takes a higher rank and rate (as the paper does).
SETTINGS = {
    "vera": ({"type": "vera", "rank": 32}, 2e-2),
    "singlora": ({"type": "singlora", "rank": 8, "alpha": 8.0, "singlora_ramp_steps": RAMP}, 3e-3),
}
CASES = [(method, family) for method in SETTINGS for family in ("sd15", "sdxl")]


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from tests.tiny_models import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


def _unet_out(unet, seed=0):
    """The UNet on fixed random inputs (with SDXL's pooled text and time ids when it takes them)."""
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    sample = torch.randn(2, c.in_channels, c.sample_size, c.sample_size, generator=g)
    text = torch.randn(2, 8, c.cross_attention_dim, generator=g)
    extra = {}
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        return unet(sample, torch.tensor([500, 20]), text, **extra).sample


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sdxl_dir):
    """run(method, family): a run of STEPS steps on the UNet and the text encoder(s), trained
    on first use and kept for the module: the trainer, the UNet output at the start, the
    fixed-draw loss before and after, and the exported file."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    done = {}

    def run(method, family):
        if (method, family) not in done:
            network, lr = SETTINGS[method]
            config = demo_config(max_steps=STEPS, learning_rate=lr)
            config.network = network_config(like=config.network, **network, train_text_encoder=True)
            if family == "sdxl":
                config.base_model = str(tiny_sdxl_dir)
            workspace = Workspace.open(tmp_path_factory.mktemp(f"{method}-{family}") / "ws")
            trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
            trainer.setup()
            start = _unet_out(trainer.accelerator.unwrap_model(trainer.denoiser))
            before = _fixed_loss(trainer)
            for step in range(STEPS):
                trainer.train_step(step)
            after = _fixed_loss(trainer)
            trainer.accelerator.unwrap_model(trainer.denoiser).eval()
            done[method, family] = {"trainer": trainer, "start": start, "before": before, "after": after,
                                    "path": trainer.export(time.time())}
        return done[method, family]

    return run


def _trained_unet(trained):
    trainer = trained["trainer"]
    return trainer.accelerator.unwrap_model(trainer.denoiser)


def test_both_are_network_types_with_help_and_refuse_what_does_not_apply():
    from ui import train_view as tv

    spec = next(s for s in tv.config_fields() if s.path == ("network", "type"))
    assert {"vera", "singlora"} <= set(spec.choices)
    assert "vera (VeRA: frozen random A, B shared by every layer" in spec.info
    assert "singlora (SingLoRA: ΔW = alpha/r · u(t) A Aᵀ" in spec.info
    ramp = next(s for s in tv.config_fields() if s.path == ("network", "singlora_ramp_steps"))
    assert "u(t) = min(t/T, 1)" in ramp.info
    for method in ("vera", "singlora"):
        network_config(method, rank=16, dropout=0.1, train_text_encoder=True)
        for option in ({"use_dora": True}, {"init": "pissa"}, {"loraplus_lr_ratio": 16.0}, {"block_rank_up": 4},
                       {"conv_rank": 4}, {"tlora_conv": True}, {"use_rslora": True}):
            with pytest.raises(ValidationError, match=f"an option of .*, not of {method}"):
                network_config(method, **option)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_conv_targets_are_refused_with_the_setting_to_change(method):
    from studio.adapters.methods import get_method
    from studio.errors import StudioError
    from studio.models import load_pipeline

    unet = load_pipeline("builtin").unet
    training = get_method(method).training(network_config(method, target_modules=["to_q", "conv1"]), seed=0)
    with pytest.raises(StudioError, match=r"adapts Linear layers only; network.target_modules matches .*conv1, a Conv2d"):
        training.add("unet", unet, 1e-3)


def test_vera_layers_compute_what_peft_vera_computes():
    """Same seed, same projections: our hook layers and peft's VeRA (through get_peft_model,
    which peft allows for VeRA) give the same A, B and outputs for the same d and b."""
    import copy

    from peft import VeraConfig, get_peft_model

    from studio.adapters.methods import get_method

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.GELU(), torch.nn.Linear(20, 7))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 12, generator=g)
    with torch.no_grad():
        base = model(x)
    ours = copy.deepcopy(model)
    theirs = get_peft_model(model, VeraConfig(r=5, target_modules=["0", "2"], projection_prng_key=123))
    net = network_config("vera", rank=5, text_encoder_target_modules=["0", "2"])
    training = get_method("vera").training(net, seed=123)
    training.add("text_encoder", ours, 1e-3)
    a, b = training.projections["text_encoder"]
    assert torch.equal(a, theirs.base_model.vera_A["default"]) and torch.equal(b, theirs.base_model.vera_B["default"])
    with torch.no_grad():
        for index in ("0", "2"):
            layer = theirs.base_model.model[int(index)]
            for name in ("vera_lambda_d", "vera_lambda_b"):
                value = torch.randn(getattr(layer, name)["default"].shape, generator=g)
                getattr(layer, name)["default"].copy_(value)
                training.params["text_encoder"][index][name].copy_(value)
        assert (ours(x) - theirs(x)).abs().max() <= 1e-6 and (ours(x) - base).abs().max() > 1e-2
        for index in ("0", "2"):
            down, up = training.factors("text_encoder", index)
            delta = theirs.base_model.model[int(index)].get_delta_weight("default")
            assert (up @ down - delta).abs().max() <= 1e-6


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("method,family", CASES)
def test_it_starts_as_the_base_model_and_the_loss_drops(runs, method, family):
    from studio.models import load_pipeline

    trained = runs(method, family)
    base = _unet_out(load_pipeline(trained["trainer"].config.base_model).unet)
    assert (trained["start"] - base).abs().max() == 0
    assert trained["after"] < trained["before"], (trained["before"], trained["after"])


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("method,family", CASES)
def test_the_file_is_a_plain_lora_equal_to_the_trained_model(runs, method, family, capsys):
    from studio.adapters import attach_adapter, load_adapter
    from studio.adapters.library import describe_adapter
    from studio.cli import main
    from studio.models import load_pipeline

    trained = runs(method, family)
    trainer = trained["trainer"]
    info = describe_adapter(trained["path"])
    metadata = info["metadata"]
    assert info["type"] == "lora" and info["format"] == "kohya" and info["text_encoder_modules"] > 0
    assert info["ranks"] == [SETTINGS[method][0]["rank"]] and info["alphas"] == [SETTINGS[method][0]["rank"]]
    assert metadata["ss_network_module"] == "networks.lora"
    args = json.loads(metadata["ss_network_args"])
    assert args == ({"algo": "vera"} if method == "vera" else {"algo": "singlora", "ramp_steps": str(RAMP)})
    assert metadata["lora_studio_adapter_type"] == method
    assert main(["inspect", str(trained["path"])]) == 0
    assert f"lora_studio_adapter_type = {method}\n" in capsys.readouterr().out

    fresh = load_pipeline(trainer.config.base_model)
    base = _unet_out(fresh.unet)
    attach_adapter(fresh, load_adapter(trained["path"]), "x")
    expected = _unet_out(_trained_unet(trained))
    assert (expected - base).abs().max() > 1e-3
    assert (_unet_out(fresh.unet) - expected).abs().max() <= 1e-5
    for (component, encoder), tokenizer in zip(trainer.text_encoder_components(), trainer.family.tokenizers):
        tok = getattr(fresh, tokenizer)
        ids = tok(["a sks star"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            ours, theirs = getattr(fresh, component)(ids)[0], encoder(ids)[0]
        assert (ours - theirs).abs().max() <= 1e-5, component


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("method,family", CASES)
def test_diffusers_loads_every_key(runs, method, family):
    from studio.adapters import load_adapter
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers

    trained = runs(method, family)
    theirs = load_pipeline(trained["trainer"].config.base_model)
    messages = _diffusers_load(theirs, trained["path"])
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))]
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(load_adapter(trained["path"]).modules)
    assert (_unet_out(theirs.unet) - _unet_out(_trained_unet(trained))).abs().max() <= 1e-5


def _merged_base(model: str, paths_weights):
    """The base pipeline with w * dW of each adapter added to its weights."""
    from studio.adapters import load_adapter
    from studio.adapters.formats.naming import name_table
    from studio.models import load_pipeline

    pipe = load_pipeline(model)
    models = {a: getattr(pipe, a) for a in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, a, None)}
    with torch.no_grad():
        for path, weight in paths_weights:
            adapter = load_adapter(path)
            table = name_table(adapter.family, models)
            for name, module in adapter.modules.items():
                layer = table[name].layer
                layer.weight.add_(weight * module.delta(layer.weight.shape))
    return pipe


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_they_blend_with_each_other_in_the_engine(runs, family):
    from studio.generation.engine import AdapterUse, Engine

    vera, singlora = runs("vera", family), runs("singlora", family)
    model = vera["trainer"].config.base_model
    engine = Engine()
    base = _unet_out(engine.set_mix(model, []).unet)
    vera_only = _unet_out(engine.set_mix(model, [AdapterUse(vera["path"], 0.7)]).unet)
    mix = [(vera["path"], 0.7), (singlora["path"], -1.2)]
    mixed = _unet_out(engine.set_mix(model, [AdapterUse(p, w) for p, w in mix]).unet)
    expected = _unet_out(_merged_base(model, mix).unet)
    assert (vera_only - base).abs().max() > 1e-3 and (mixed - vera_only).abs().max() > 1e-3
    assert (mixed - expected).abs().max() <= 1e-4


@pytest.mark.slow(seconds=20)
@pytest.mark.parametrize("method,family", CASES)
def test_generate_reproduces_the_runs_last_sample(runs, method, family, tmp_path):
    from tests.method_checks import assert_generate_reproduces_sample

    trained = runs(method, family)
    assert_generate_reproduces_sample(trained["trainer"], trained["path"], tmp_path, step=STEPS)


@pytest.mark.slow(seconds=15)
def test_vera_trains_only_its_vectors_over_shared_frozen_projections(runs):
    """Only d and b train (r + out values a layer); every layer's file factors are
    diag(d) A[:, :in] and diag(b) B[:out] of the one pair A, B of its model, which stays
    the seeded draw it started as."""
    from studio.adapters import load_adapter
    from studio.adapters.formats.naming import path_to_name
    from studio.adapters.methods import get_method

    trained = runs("vera", "sd15")
    trainer, r = trained["trainer"], SETTINGS["vera"][0]["rank"]
    adapter = trainer.adapter
    assert sum(p.numel() for p in trainer.trainable) == sum(
        r + layer.out_features for component in adapter.layers for layer in adapter.layers[component].values())
    fresh = get_method("vera").training(trainer.config.network, seed=trainer.config.seed)
    fresh.add("unet", trainer.pipe.unet.__class__.from_config(trainer.pipe.unet.config), 1e-3)
    a, b = adapter.projections["unet"]
    assert torch.equal(a, fresh.projections["unet"][0]) and torch.equal(b, fresh.projections["unet"][1])
    file = load_adapter(trained["path"])
    for path, layer in adapter.layers["unet"].items():
        parts = adapter.params["unet"][path]
        d, b_vector = parts["vera_lambda_d"].detach(), parts["vera_lambda_b"].detach()
        assert (d - 0.1).abs().max() > 1e-4 and b_vector.abs().max() > 0  # both trained
        module = file.modules[path_to_name(file.family, "unet", path)]
        assert torch.allclose(module.down, d[:, None] * a[:, :layer.in_features], rtol=0, atol=1e-7)
        assert torch.allclose(module.up, b_vector[:, None] * b[:layer.out_features], rtol=0, atol=1e-7)


@pytest.mark.slow(seconds=15)
def test_singlora_update_is_symmetric_psd_with_half_loras_parameters(runs):
    from studio.adapters import load_adapter

    trained = runs("singlora", "sd15")
    adapter, r = trained["trainer"].adapter, SETTINGS["singlora"][0]["rank"]
    assert adapter.ramp == 1.0 and adapter.done == STEPS
    layers = [layer for component in adapter.layers for layer in adapter.layers[component].values()]
    trainable = sum(p.numel() for p in trained["trainer"].trainable)
    assert trainable == sum(max(l.in_features, l.out_features) * r for l in layers)
    assert trainable < 0.8 * sum((l.in_features + l.out_features) * r for l in layers)  # a LoRA of this rank
    square = [m for m in load_adapter(trained["path"]).modules.values() if m.up.shape[0] == m.down.shape[1]]
    assert square
    for module in square:
        delta = module.up @ module.down
        assert (delta - delta.T).abs().max() <= 1e-6 * delta.abs().max()
        eigenvalues = torch.linalg.eigvalsh(delta.double())
        assert eigenvalues.min() >= -1e-6 * eigenvalues.max() and eigenvalues.max() > 0


@pytest.mark.slow(seconds=20)
def test_singlora_resumes_exactly_mid_ramp(workspace):
    """Stopped at step 3 of a 6-step ramp, the resumed run continues u(t) where it was (the
    step count is in the checkpoint) and ends with the uninterrupted run's weights."""
    from studio.jobs.runs import checkpoint_path, create_run
    from trainers.checkpoints import load_checkpoint
    from trainers.trainer import AdapterTrainer

    steps, stop = 9, 3
    config = demo_config(max_steps=steps, every_n_steps=stop, learning_rate=3e-3)
    config.network = network_config("singlora", like=config.network, singlora_ramp_steps=6)
    config.sampling.steps = 1
    config.checkpoints.keep_last = 5
    run_dir = create_run(config, workspace)
    full = AdapterTrainer(run_dir, show_progress=False)
    full.run()
    expected = full.adapter_state()
    assert load_checkpoint(checkpoint_path(run_dir, stop))["adapter"]["singlora.steps"] == stop
    for later in range(stop + 1, steps + 1):
        checkpoint_path(run_dir, later).unlink(missing_ok=True)
    resumed = AdapterTrainer(run_dir, show_progress=False)
    resumed.run(resume=True)
    assert resumed.adapter.done == steps
    state = resumed.adapter_state()
    assert state.keys() == expected.keys()
    assert max(float((state[k] - expected[k]).abs().max()) for k in state) == 0
