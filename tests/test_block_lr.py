"""Block-wise learning rates: each UNet section's adapter parameters in a group of their own
at learning_rate x the section's multiplier."""
from __future__ import annotations

import pytest

from studio.config import network_config
from tests.conftest import demo_config

SECTIONS = {"down_blocks": "block_lr_down", "mid_block": "block_lr_mid", "up_blocks": "block_lr_up"}


@pytest.mark.slow(seconds=5)
@pytest.mark.parametrize("network", [{}, {"type": "locon", "loraplus_lr_ratio": 4.0}, {"type": "tlora"}])
def test_block_lr_puts_the_configured_lr_in_each_parameter_group(network, workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config(learning_rate=2e-3, block_lr_down=0.5, block_lr_mid=3.0, block_lr_up=0.0)
    config.network = network_config(like=config.network, **network)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    names = {id(p): name for name, p in trainer.adapter.named_parameters("unet")}
    ratio = config.network.learning_rate_ratios().get("loraplus_lr_ratio", 1.0)
    groups = trainer.optimizer.param_groups
    seen = set()
    for group in groups:
        blocks = {names[id(p)].split(".")[0] for p in group["params"]}
        assert blocks == {group["block"]} or (group["block"] == "other" and not blocks & SECTIONS.keys())
        multiplier = getattr(config.training, SECTIONS[group["block"]]) if group["block"] in SECTIONS else 1.0
        # LoRA+ groups (the B matrices) keep their ratio on top of the block's multiplier
        assert group["lr"] in (pytest.approx(2e-3 * multiplier), pytest.approx(2e-3 * multiplier * ratio))
        seen.add(group["block"])
    # x0: peft methods leave the up blocks without an adapter (sd-scripts' block lr weight 0);
    # T-LoRA adds one there, frozen
    peft_method = network.get("type") != "tlora"
    assert seen == SECTIONS.keys() - ({"up_blocks"} if peft_method else set()) | {"other"} & seen
    assert any(name.startswith("up_blocks.") for name in names.values()) != peft_method
    assert trainer.step_size() == pytest.approx(2e-3)  # what progress events report: the configured rate
    assert sum(len(g["params"]) for g in groups) == len(names)

    # The effect: after a few steps the up blocks (x0) are where they started, the rest moved.
    start = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for step in range(3):
        trainer.train_step(step)
    moved: dict[str, float] = {}
    for g in groups:
        change = max(float((p.detach() - start[id(p)]).abs().max()) for p in g["params"])
        moved[g["block"]] = max(moved.get(g["block"], 0.0), change)
    assert moved.get("up_blocks", 0.0) == 0.0 and moved["down_blocks"] > 0 and moved["mid_block"] > 0
    # x0 also means no gradient: the backward pass does not reach an up-block adapter (what
    # makes a section left out cheaper per step, not only still)
    frozen = [p for g in groups if g["block"] == "up_blocks" for p in g["params"]]
    assert bool(frozen) != peft_method and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for g in groups if g["block"] != "up_blocks" for p in g["params"])
    exported = trainer.adapter.export(trainer.model_ref.family).modules
    assert exported and any("up_blocks" in key or "output_blocks" in key for key in exported) != peft_method


def test_block_lr_multipliers_are_validated():
    from studio.config import parse_config
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="training.block_lr_mid"):
        parse_config({"training": {"block_lr_mid": -1.0}})
    with pytest.raises(StudioError, match="all 0: nothing would train"):
        parse_config({"training": {"block_lr_down": 0.0, "block_lr_mid": 0.0, "block_lr_up": 0.0}})


@pytest.mark.slow(seconds=8)
def test_a_section_without_an_adapter_loads_in_diffusers(workspace):
    """LoCon with block_lr_down = 0: the file has no down-block module, and diffusers'
    loader takes every key and gives the trained UNet's output."""
    import time

    from studio.adapters import load_adapter
    from studio.jobs.runs import create_run
    from tests.method_checks import assert_diffusers_loads_every_key
    from trainers.trainer import AdapterTrainer

    config = demo_config(learning_rate=3e-3, block_lr_down=0.0)
    config.network = network_config("locon", like=config.network, train_text_encoder=True)  # without it diffusers warns of no text-encoder keys
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    for step in range(4):
        trainer.train_step(step)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    path = trainer.export(time.time())
    keys = load_adapter(path).modules
    assert keys and not any("down_blocks" in key or "input_blocks" in key for key in keys)
    assert any("up_blocks" in key for key in keys) and any("mid_block" in key for key in keys)
    assert_diffusers_loads_every_key(trainer, path)


@pytest.mark.slow(seconds=10)
def test_a_checkpoint_of_other_trained_parameters_is_refused_in_one_line(workspace):
    """A checkpoint written while the down blocks had an adapter (by an older LoRA Studio at
    block_lr_down = 0, or before the run's settings changed) holds parameters the run no
    longer trains: resuming says so in one line and loads none of it."""
    from studio.config import dump_config
    from studio.errors import StudioError
    from studio.jobs.runs import CONFIG_FILE, create_run, iter_events, run_config
    from trainers.trainer import AdapterTrainer

    run_dir = create_run(demo_config(max_steps=4, every_n_steps=2), workspace)
    AdapterTrainer(run_dir, show_progress=False).run(resume=False)  # leaves its step-2 checkpoint
    changed = run_config(run_dir)
    changed.training.block_lr_down = 0.0
    (run_dir / CONFIG_FILE).write_text(dump_config(changed))
    resumed = AdapterTrainer(run_dir, show_progress=False)
    with pytest.raises(StudioError) as refused:
        resumed.run(resume=True)
    message = str(refused.value)
    assert "step-000002.pt" in message and "start the run again as a new run" in message and "\n" not in message
    assert [e["message"] for e in iter_events(run_dir) if e["type"] == "error"] == [message]
    assert all(float(p.detach().abs().max()) == 0.0 for name, p in resumed.adapter.named_parameters("unet")
               if name.endswith("lora_B.weight"))  # nothing of the checkpoint was loaded
