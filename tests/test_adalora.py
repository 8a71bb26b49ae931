"""AdaLoRA: the SVD-form update is pruned during training to the rank budget, the modules end
with different ranks, and the file is a plain LoRA with those ranks that equals the trained
model and that our engine, diffusers and a mix read; its allocator state resumes exactly."""
from __future__ import annotations

import json
import time

import pytest
import torch
from pydantic import ValidationError

from studio.config import network_config
from tests.conftest import demo_config
from tests.method_checks import TrainedFileChecks, assert_file_equals_trained_model
from tests.test_networks import _fixed_loss

STEPS = 12


def _adalora_config(**training):
    config = demo_config(learning_rate=3e-3, **training)
    # prunes from 1.5 x 4 = 6 per module to 4 on average
    config.network = network_config("adalora", like=config.network, rank=4, adalora_tinit=1, adalora_tfinal=4)
    return config


def tiny_sdxl_folder(tmp_path_factory):
    """The tiny SDXL pipeline saved as a diffusers folder."""
    from tests.tiny_models import tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder


def sdxl_predict(trainer, unet) -> torch.Tensor:
    """`unet`'s noise prediction for a fixed noisy latent of the trainer's first picture."""
    batch = trainer.batch(trainer.instance, [0], torch.Generator().manual_seed(0))
    noise = torch.randn(batch.latents.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return trainer.predict(unet, batch, noise, torch.tensor([300]))


def _lora_E(trainer) -> dict[str, torch.Tensor]:
    return {n: p for n, p in trainer.adapter._all().named_parameters() if ".lora_E." in n}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An AdaLoRA run on the UNet (attention and convs) and the text encoder: the trainer
    after STEPS steps, the fixed-draw loss before and after, and the exported file."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    config = _adalora_config(max_steps=STEPS)
    config.network.train_text_encoder = True
    trainer = AdapterTrainer(create_run(config, Workspace.open(tmp_path_factory.mktemp("adalora") / "ws")),
                      show_progress=False)
    trainer.setup()
    before = _fixed_loss(trainer)
    for step in range(STEPS):
        trainer.train_step(step)
    after = _fixed_loss(trainer)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    return {"trainer": trainer, "before": before, "after": after, "path": trainer.export(time.time())}


def test_adalora_is_a_network_type_with_its_options():
    from ui import train_view as tv

    spec = next(s for s in tv.config_fields() if s.path == ("network", "type"))
    assert "adalora" in spec.choices and "adalora (AdaLoRA: SVD-form update pruned to a rank budget" in spec.info
    assert any(s.path == ("network", "adalora_init_r") and "AdaLoRA: starting rank" in s.info for s in tv.config_fields())
    network_config("adalora", rank_budget=100, train_text_encoder=True)
    for option, message in (({"use_dora": True}, "an option of lora and locon, not of adalora"),
                            ({"rank_allocation": "ard"}, "an option of lora and locon, not of adalora"),
                            ({"block_rank_up": 4}, "an option of lora, locon, loha, lokr and lora_fa, not of adalora"),
                            ({"adalora_init_r": 4, "rank": 8}, "must exceed rank")):
        with pytest.raises(ValidationError, match=message):
            network_config("adalora", **option)


@pytest.mark.slow(seconds=12)
def test_a_schedule_that_cannot_prune_is_refused_in_one_line(workspace):
    """Before anything runs where the config gives the run's length; by the worker (which
    counts an epoch run's steps) otherwise. peft's allocator fixes the ranks at step
    max_steps - tfinal from the scores of the steps before it: a 1-step run has none."""
    from studio.adapters.methods import get_method
    from studio.config import parse_config
    from studio.errors import StudioError
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    def refused(max_steps, **network):
        with pytest.raises(StudioError) as error:
            parse_config({"network": {"type": "adalora", **network}, "training": {"max_steps": max_steps}})
        assert "\n" not in str(error.value)
        return str(error.value)

    assert "adalora_tinit (1) and adalora_tfinal (4) leave no pruning phase in a run of 5 steps" in refused(
        5, adalora_tinit=1, adalora_tfinal=4)
    assert "training.max_steps to at least 2" in refused(1)
    assert "training.max_steps to at least 6" in refused(5, adalora_tinit=0, adalora_tfinal=4)
    parse_config({"network": {"type": "adalora"}, "training": {"max_steps": 2}})
    with pytest.raises(StudioError, match=r"training.max_steps to at least 2 or lower network.adalora_tfinal\.$"):
        get_method("adalora").training(network_config("adalora"), seed=0, max_steps=1)
    config = _adalora_config(max_steps=10)
    config.network.target_modules = ["attn2.to_k"]
    config.network.conv_target_modules = []
    config.network.rank_budget = 1000
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    with pytest.raises(StudioError, match=r"rank_budget \(1000\) must be below the rank AdaLoRA starts from, "
                                          r"adalora_init_r x 7 modules = 42"):
        trainer.train_step(0)


@pytest.mark.slow(seconds=8)
def test_a_section_that_does_not_train_gets_no_adalora_layer(workspace):
    """block_lr_down = 0 (the tiny-demo-quick preset's): the allocator scores every AdaLoRA
    layer by its gradient, which a frozen one in that section would not have (such a run
    stopped with a TypeError in peft's update_ipt)."""
    from studio.adapters import load_adapter
    from studio.jobs.runs import create_run
    from trainers.run import train_run

    config = demo_config(max_steps=2, block_lr_down=0.0)
    config.network = network_config("adalora", like=config.network, rank=4)
    config.sampling.prompts = []
    names = load_adapter(train_run(create_run(config, workspace), show_progress=False)).modules
    assert any("up_blocks" in name for name in names) and not any("down_blocks" in name for name in names)


@pytest.mark.slow(seconds=60)
def test_loss_drops_and_ranks_end_different_within_the_budget(trained):
    trainer = trained["trainer"]
    assert trained["after"] < trained["before"]
    live = {n: int((e != 0).sum()) for n, e in _lora_E(trainer).items()}
    assert any(n.startswith("text_encoder.") for n in live) and any(".conv" in n for n in live)
    # the budget: rank x modules of the 6 each started with, shared by the UNet and the text encoder
    assert sum(live.values()) <= 4 * len(live) < 6 * len(live)
    assert len(set(live.values())) >= 3
    from studio.adapters import load_adapter

    ranks = {m.rank for m in load_adapter(trained["path"]).modules.values()}
    assert len(ranks) >= 3 and max(ranks) <= 6 and min(ranks) >= 1


@pytest.mark.slow(seconds=60)
def test_inspect_shows_what_it_was_trained_as(trained, capsys):
    from tests.test_formats import cli

    code, out, _ = cli(capsys, "inspect", trained["path"])
    assert code == 0 and "lora_studio_adapter_type = adalora (ranks " in out and '"algo": "adalora"' in out


@pytest.mark.slow(seconds=60)
def test_the_file_is_a_plain_lora_equal_to_the_trained_model(trained):
    from studio.adapters import load_adapter
    from studio.adapters.library import describe_adapter

    info = describe_adapter(trained["path"])
    metadata = info["metadata"]
    assert info["type"] == "locon" and info["format"] == "kohya" and info["prefixes"]["lora_te"] > 0
    assert metadata["ss_network_module"] == "networks.lora"
    args = json.loads(metadata["ss_network_args"])
    assert {k: args[k] for k in ("algo", "init_r", "target_r", "tinit", "tfinal", "orth_reg_weight")} == {
        "algo": "adalora", "init_r": "6", "target_r": "4", "tinit": "1", "tfinal": "4", "orth_reg_weight": "0.1"}
    assert metadata["lora_studio_adapter_type"].startswith("adalora (ranks ")
    # modules with every triplet pruned are not in the file
    trainer = trained["trainer"]
    dead = sum(1 for e in _lora_E(trainer).values() if not e.any())
    assert len(load_adapter(trained["path"]).modules) == len(_lora_E(trainer)) - dead

    assert_file_equals_trained_model(trainer, trained["path"], name="ada")


class TestTrainedFile(TrainedFileChecks):
    blend_with = "locon"
    steps = STEPS


@pytest.mark.slow(seconds=40)
def test_resume_in_the_pruning_phase_is_exact(workspace):
    """A run resumed from step 3 (importance scores mid-way, budget falling) ends bit for bit
    where the uninterrupted run ends; without the allocator's scores it does not."""
    from studio.jobs.runs import checkpoint_path, create_run, iter_events
    from trainers.checkpoints import load_checkpoint
    from trainers.trainer import AdapterTrainer

    config = _adalora_config(max_steps=8, every_n_steps=3)
    config.network.adalora_tfinal = 2
    config.network.target_modules = ["attn2.to_k", "attn2.to_v"]
    config.network.conv_target_modules = []
    config.sampling.steps = 1
    run_dir = create_run(config, workspace)
    full = AdapterTrainer(run_dir, show_progress=False)
    full.run(resume=False)
    resumed = AdapterTrainer(run_dir, show_progress=False)
    resumed.run(resume=True)  # from step-000006.pt: the ranks fixed at step 6 come back
    assert [e["step"] for e in iter_events(run_dir) if e["type"] == "resume"] == [6]
    a, b = full.adapter_state(), resumed.adapter_state()
    assert a.keys() == b.keys() and any(k.startswith("adalora.keep.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    at_3 = load_checkpoint(checkpoint_path(run_dir, 3))["adapter"]
    assert any(k.startswith("adalora.ipt.") and v.abs().max() > 0 for k, v in at_3.items())
    again = AdapterTrainer(run_dir, show_progress=False)
    again.setup()
    again.load_adapter_state(at_3)
    again.optimizer.load_state_dict(load_checkpoint(checkpoint_path(run_dir, 3))["optimizer"])
    for step in range(3, 8):
        again.train_step(step)
    assert all(torch.equal(a[k], v) for k, v in again.adapter_state().items())
    scores_lost = AdapterTrainer(run_dir, show_progress=False)
    scores_lost.setup()
    scores_lost.load_adapter_state({k: v for k, v in at_3.items() if not k.startswith("adalora.")})
    scores_lost.optimizer.load_state_dict(load_checkpoint(checkpoint_path(run_dir, 3))["optimizer"])
    for step in range(3, 8):
        scores_lost.train_step(step)
    lost = scores_lost.adapter_state()
    assert any(not torch.equal(a[k], lost[k]) for k in a if ".lora_E." in k)


@pytest.mark.slow(seconds=60)
def test_adalora_on_sdxl(tmp_path_factory, workspace):
    """Tiny SDXL: loss drops, ranks end different, the file equals the trained UNet in the
    engine and diffusers consumes every key."""
    from studio.adapters import load_adapter
    from studio.generation.engine import AdapterUse, Engine
    from studio.jobs.runs import create_run
    from studio.models import load_pipeline
    from tests.test_formats import _diffusers_load, _lora_layers
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    model = tiny_sdxl_folder(tmp_path_factory)
    config = _adalora_config(max_steps=10)
    config.base_model = str(model)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    before = _fixed_loss(trainer, range(5000, 5008))
    for step in range(10):
        trainer.train_step(step)
    assert _fixed_loss(trainer, range(5000, 5008)) < before
    path = trainer.export(time.time())
    ranks = [m.rank for m in load_adapter(path).modules.values()]
    assert len(set(ranks)) >= 3 and sum(ranks) <= 4 * len(_lora_E(trainer))

    trained_unet = trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    trained = sdxl_predict(trainer, trained_unet)
    engine = Engine()
    assert (trained - sdxl_predict(trainer, engine.set_mix(str(model), []).unet)).abs().max() > 1e-3
    assert (sdxl_predict(trainer, engine.set_mix(str(model), [AdapterUse(path)]).unet) - trained).abs().max() <= 1e-5
    theirs = load_pipeline(str(model))
    messages = _diffusers_load(theirs, path)
    # UNet only: diffusers says it found nothing for the text encoders, which is right here
    problems = [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not been", "mismatch"))
                and not m.startswith("No LoRA keys associated to CLIPTextModel")]
    assert not problems, problems
    assert len(_lora_layers(theirs, "d")) == len(ranks)
    assert (sdxl_predict(trainer, theirs.unet) - trained).abs().max() <= 1e-5


@pytest.mark.slow(seconds=60)
def test_two_processes_allocate_what_one_process_with_the_whole_batch_allocates(workspace):
    """Data parallel: the allocator scores the gradients averaged over the processes, so two
    processes with batch 1 prune the same triplets as one process with batch 2."""
    from safetensors.torch import load_file

    from studio.jobs.runs import create_run, iter_events
    from tests.test_distributed import _finish, _launch, _relative_l2
    from trainers.trainer import AdapterTrainer

    def config(**training):
        config = _adalora_config(max_steps=6, num_threads=1, **training)
        config.network.adalora_tfinal = 2
        config.network.target_modules = ["attn2.to_k", "attn2.to_v"]
        config.network.conv_target_modules = []
        config.sampling.steps = 1
        return config

    two = create_run(config(batch_size=1, num_processes=2), workspace)
    output = _finish(_launch(two))
    done = [e for e in iter_events(two) if e["type"] == "done"]
    assert done, output[-2000:]
    one = AdapterTrainer(create_run(config(batch_size=2), workspace), show_progress=False).run()
    a, b = load_file(str(one)), load_file(str(done[0]["adapter"]))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert len({v.shape[0] for k, v in a.items() if k.endswith("lora_down.weight")}) >= 2
    assert _relative_l2(a, b) < 1e-4
