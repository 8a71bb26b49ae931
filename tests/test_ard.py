"""ARD-LoRA rank allocation (network.rank_allocation = "ard") on lora / locon: learned gates
per rank component with the L1 + total-variation penalty, pruned to the budget so the
modules end with different ranks, a module that cannot matter ends with none, and the file
is a plain LoRA with those ranks that equals the trained model and that our engine,
diffusers and a mix read; gates and masks resume exactly."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from studio.config import network_config
from tests.conftest import demo_config
from tests.test_adalora import sdxl_predict, tiny_sdxl_folder
from tests.method_checks import TrainedFileChecks, assert_file_equals_trained_model
from tests.test_networks import _fixed_loss

STEPS = 20
BUDGET = 700  # of 122 modules x rank 8 = 976 on the built-in model (locon + text encoder)
# Its LoRA's input is zeroed by a hook: nothing it learns can change the output.
INSENSITIVE = "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"


def _ard_config(**training):
    config = demo_config(learning_rate=3e-3, **training)
    config.network.rank_allocation = "ard"
    config.network.ard_threshold = 0.0  # only the budget prunes: the outcome does not hang on a threshold
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoCon + ARD run on the UNet and the text encoder with one module made insensitive:
    the trainer after STEPS steps, the component sizes c one step before the end, the
    fixed-draw loss before and after, and the exported file."""
    from studio.adapters.methods.base import ADAPTER_NAME
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    config = _ard_config(max_steps=STEPS)
    config.network = network_config("locon", like=config.network, train_text_encoder=True, rank_budget=BUDGET)
    trainer = AdapterTrainer(create_run(config, Workspace.open(tmp_path_factory.mktemp("ard") / "ws")), show_progress=False)
    trainer.setup()
    layer = trainer.accelerator.unwrap_model(trainer.denoiser).get_submodule(INSENSITIVE)
    layer.lora_A[ADAPTER_NAME].register_forward_pre_hook(lambda module, args: (torch.zeros_like(args[0]),))
    before = _fixed_loss(trainer)
    for step in range(STEPS - 1):
        trainer.train_step(step)
    sizes = {k: trainer.adapter.gates.sizes(k).detach() for k in trainer.adapter.gates.scales}
    trainer.train_step(STEPS - 1)
    after = _fixed_loss(trainer)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    return {"trainer": trainer, "sizes": sizes, "before": before, "after": after,
            "path": trainer.export(time.time())}


def test_ard_is_a_network_option_with_its_help():
    from ui import train_view as tv

    fields = {s.path: s for s in tv.config_fields()}
    assert "ard = ARD-LoRA" in fields[("network", "rank_allocation")].info
    assert "ard" in fields[("network", "rank_allocation")].choices
    for knob in ("ard_l1", "ard_tv", "ard_threshold", "ard_prune_every", "ard_lr_ratio"):
        assert fields[("network", knob)].info.startswith("ARD-LoRA: ")
    network_config("locon", rank_allocation="ard", rank_budget=10)
    for option, message in (({"type": "loha"}, "an option of lora and locon, not of loha"),
                            ({"type": "lora_fa"}, "an option of lora and locon, not of lora_fa"),
                            ({"use_dora": True}, "DoRA's norm"), ({"init": "pissa"}, "PiSSA"),
                            ({"rank_allocation": "none", "rank_budget": 10}, "rank_budget needs a rank_allocation")):
        with pytest.raises(ValidationError, match=message):
            network_config(**{"rank_allocation": "ard", **option})


def test_the_penalty_and_the_pruning_act_on_the_component_sizes():
    """c_i = |s_i| |B[:, i]| |A[i, :]|; penalty = l1 Σ c + tv Σ |Δc| over live components;
    pruning: below threshold x the module's largest, then the budget's largest over all."""
    from studio.adapters.methods.ard import ARDGates

    gates = ARDGates(network_config(rank_allocation="ard", ard_l1=0.5, ard_tv=2.0, ard_threshold=0.1), max_steps=10)
    eye = torch.eye
    gates.scales = {("unet", "a"): torch.nn.Parameter(torch.tensor([1.0, -0.5, 0.25, 3.0])),
                    ("unet", "b"): torch.nn.Parameter(torch.tensor([2.0, 1.0])),
                    ("unet", "c"): torch.nn.Parameter(torch.tensor([1.0, 0.05]))}
    gates.masks = {("unet", "a"): torch.tensor([1.0, 1.0, 0.0, 1.0]), ("unet", "b"): torch.ones(2),
                   ("unet", "c"): torch.ones(2)}
    gates.factors = {("unet", "a"): (eye(4), torch.diag(torch.tensor([1.0, 2.0, 1.0, 1.0]))),
                     ("unet", "b"): (eye(2), eye(2)), ("unet", "c"): (eye(2), eye(2))}
    # live sizes a: (1, 1, 3): L1 5, TV 2; b: (2, 1): L1 3, TV 1; c: (1, 0.05): L1 1.05, TV 0.95
    assert float(gates.penalty().detach()) == pytest.approx(0.5 * (5 + 3 + 1.05) + 2.0 * (2 + 1 + 0.95))
    gates.prune(budget=None)  # c's second is under 0.1 x c's largest
    assert gates.ranks() == {("unet", "a"): 3, ("unet", "b"): 2, ("unet", "c"): 1}
    gates.prune(budget=3)  # the three largest of all: a's 3, b's 2, then one of the 1s
    assert sum(gates.ranks().values()) == 3 and gates.masks[("unet", "a")][3] == 1 and gates.masks[("unet", "b")][0] == 1
    assert float(gates.scales[("unet", "a")].detach()[2]) == 0.0 == float(gates.scales[("unet", "c")].detach()[1])


@pytest.mark.slow(seconds=60)
def test_loss_drops_and_ranks_follow_the_budget_and_the_sensitivity(trained):
    trainer, sizes = trained["trainer"], trained["sizes"]
    assert trained["after"] < trained["before"]
    ranks = trainer.adapter.gates.ranks()
    assert sum(ranks.values()) == BUDGET < 8 * len(ranks)
    assert len(set(ranks.values())) >= 4
    insensitive = ("unet", INSENSITIVE)
    # nothing reaches its B, so its components have size 0 and go first; every other module grew
    assert not sizes[insensitive].any() and all(c.max() > 0 for k, c in sizes.items() if k != insensitive)
    assert ranks[insensitive] == 0 == min(ranks.values())
    from studio.adapters import load_adapter

    file_ranks = [m.rank for m in load_adapter(trained["path"]).modules.values()]
    assert sorted(file_ranks) == sorted(r for r in ranks.values() if r) and len(set(file_ranks)) >= 3


@pytest.mark.slow(seconds=60)
def test_inspect_shows_what_it_was_trained_as(trained, capsys):
    from tests.test_formats import cli

    code, out, _ = cli(capsys, "inspect", trained["path"])
    assert code == 0 and "lora_studio_adapter_type = locon+ard (ranks " in out and '"algo": "ard_lora"' in out


@pytest.mark.slow(seconds=60)
def test_the_file_is_a_plain_lora_equal_to_the_trained_model(trained):
    from studio.adapters import load_adapter
    from studio.adapters.formats.naming import path_to_name
    from studio.adapters.library import describe_adapter

    info = describe_adapter(trained["path"])
    metadata = info["metadata"]
    assert info["type"] == "locon" and info["format"] == "kohya" and info["prefixes"]["lora_te"] > 0
    assert metadata["ss_network_module"] == "networks.lora"
    args = json.loads(metadata["ss_network_args"])
    assert args["algo"] == "ard_lora" and args["rank_budget"] == str(BUDGET)
    assert metadata["lora_studio_adapter_type"].startswith("locon+ard (ranks 1-8")
    trainer = trained["trainer"]
    assert path_to_name("sd15", "unet", INSENSITIVE) not in load_adapter(trained["path"]).modules

    assert_file_equals_trained_model(trainer, trained["path"], name="ard")


class TestTrainedFile(TrainedFileChecks):
    blend_with = "lora"
    steps = STEPS


@pytest.mark.slow(seconds=30)
def test_resume_with_pruning_during_training_is_exact(workspace):
    """Pruning every 2 steps: a run resumed from step 3 (some components already masked)
    ends bit for bit where the uninterrupted run ends."""
    from studio.jobs.runs import checkpoint_path, create_run, iter_events
    from trainers.checkpoints import load_checkpoint
    from trainers.trainer import AdapterTrainer

    config = _ard_config(max_steps=6, every_n_steps=3)
    config.network.target_modules = ["attn2.to_k", "attn2.to_v"]
    config.network.ard_threshold, config.network.ard_prune_every = 0.95, 2
    config.network.rank_budget = 40
    config.sampling.steps = 1
    run_dir = create_run(config, workspace)
    full = AdapterTrainer(run_dir, show_progress=False)
    full.run(resume=False)
    resumed = AdapterTrainer(run_dir, show_progress=False)
    resumed.run(resume=True)
    assert [e["step"] for e in iter_events(run_dir) if e["type"] == "resume"] == [3]
    at_3 = load_checkpoint(checkpoint_path(run_dir, 3))["adapter"]
    masks = torch.cat([v for k, v in at_3.items() if k.endswith(".ard_mask")])
    assert 0 < masks.sum() < masks.numel()  # the step-2 pruning is in the checkpoint
    a, b = full.adapter_state(), resumed.adapter_state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in (k for k in a if k.endswith(".ard_mask")):  # a pruned component stays pruned
        assert torch.all(a[key] <= at_3[key]), key
    assert 1 <= sum(int(v.sum()) for k, v in a.items() if k.endswith(".ard_mask")) <= 40


@pytest.mark.slow(seconds=40)
def test_ard_lora_on_sdxl(tmp_path_factory, workspace):
    """Tiny SDXL, lora + ARD: loss drops, ranks end different within the budget, the file
    equals the trained UNet in the engine and diffusers consumes every key."""
    from studio.adapters import load_adapter
    from studio.generation.engine import AdapterUse, Engine
    from studio.jobs.runs import create_run
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    model = tiny_sdxl_folder(tmp_path_factory)
    config = _ard_config(max_steps=10)
    config.base_model = str(model)
    config.network.rank_budget = 60
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    before = _fixed_loss(trainer, range(5000, 5008))
    for step in range(10):
        trainer.train_step(step)
    assert _fixed_loss(trainer, range(5000, 5008)) < before
    path = trainer.export(time.time())
    ranks = [m.rank for m in load_adapter(path).modules.values()]
    assert len(set(ranks)) >= 3 and sum(ranks) == 60 < 8 * len(trainer.adapter.gates.scales)

    trained_unet = trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    trained = sdxl_predict(trainer, trained_unet)
    engine = Engine()
    assert (trained - sdxl_predict(trainer, engine.set_mix(str(model), []).unet)).abs().max() > 1e-3
    assert (sdxl_predict(trainer, engine.set_mix(str(model), [AdapterUse(path)]).unet) - trained).abs().max() <= 1e-5
    theirs = load_pipeline(str(model))
    messages = _diffusers_load(theirs, path)
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))
                and not m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(ranks)
    assert (sdxl_predict(trainer, theirs.unet) - trained).abs().max() <= 1e-5


@pytest.mark.slow(seconds=12)
def test_files_with_per_module_ranks_carry_one_alpha_for_diffusers(tmp_path):
    """Why keep_components gives every module the same alpha: diffusers' load_lora_weights
    keys the alpha_pattern of a text encoder's per-module alphas wrongly and scales those
    modules by the common alpha. The same updates written with one alpha load exactly. (If
    the first assertion starts failing, diffusers reads per-module alphas now.)"""
    from studio.adapters import AdapterFile, LoraModule, attach_adapter, load_adapter, save_adapter
    from studio.adapters.formats.modules import keep_components
    from studio.adapters.formats.naming import path_to_name
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load

    g = torch.Generator().manual_seed(0)
    pipe = load_pipeline("builtin")
    paths = [f"encoder.layers.0.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "out_proj")]
    per_module = {}
    for path, rank in zip(paths, (1, 3, 3, 2)):
        layer = pipe.text_encoder.get_submodule(path)
        down = torch.randn(rank, layer.in_features, generator=g)
        up = torch.randn(layer.out_features, rank, generator=g) * 0.1
        per_module[path_to_name("sd15", "text_encoder", path)] = LoraModule(down, up, 0.5 * rank)  # scale 0.5 each
    one_alpha = {n: keep_components(m, torch.ones(m.rank, dtype=torch.bool), 4.0) for n, m in per_module.items()}
    for name, module in one_alpha.items():
        shape = (module.up.shape[0], module.down.shape[1])
        assert module.alpha == 4.0 and torch.allclose(module.delta(shape), per_module[name].delta(shape), atol=1e-6)
    ids = pipe.tokenizer(["a sks star"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    def encoded(modules, loader):
        path = save_adapter(tmp_path / f"{loader}-{len(list(tmp_path.iterdir()))}.safetensors",
                            AdapterFile(modules, {}, "sd15"))
        fresh = load_pipeline("builtin")
        if loader == "diffusers":
            _diffusers_load(fresh, path)
        else:
            attach_adapter(fresh, load_adapter(path), "ours")
        with torch.no_grad():
            return fresh.text_encoder(ids)[0]

    ours = encoded(per_module, "ours")
    with torch.no_grad():
        assert (ours - pipe.text_encoder(ids)[0]).abs().max() > 1e-2
    assert (encoded(per_module, "diffusers") - ours).abs().max() > 1e-3
    assert (encoded(one_alpha, "diffusers") - ours).abs().max() <= 1e-5
