"""LoRA-FA: A stays at its random init while B trains, the optimizer holds state for B
alone, and the file is a plain LoRA that our engine, diffusers and a mix all read."""
from __future__ import annotations

import json
import time

import pytest
import torch

from studio.adapters.methods.lora import LoRAOptions
from studio.config import network_config, parse_config
from studio.errors import StudioError
from tests.conftest import demo_config
from tests.method_checks import TrainedFileChecks, assert_file_equals_trained_model
from tests.test_networks import _fixed_loss

STEPS = 30


def _factors(trainer, part: str) -> dict[str, torch.Tensor]:
    models = {"unet": trainer.accelerator.unwrap_model(trainer.denoiser), **dict(trainer.text_encoder_components())}
    return {f"{component}.{name}": p for component, model in models.items()
            for name, p in model.named_parameters() if f".{part}." in name}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA-FA run on the UNet and the text encoder: the trainer after STEPS steps, its
    factors at the start, the fixed-draw loss before and after, and the exported file."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    config = demo_config(max_steps=STEPS, learning_rate=3e-3)
    config.network = network_config("lora_fa", like=config.network, train_text_encoder=True)
    trainer = AdapterTrainer(create_run(config, Workspace.open(tmp_path_factory.mktemp("lora_fa") / "ws")),
                      show_progress=False)
    trainer.setup()
    start = {name: p.detach().clone() for part in ("lora_A", "lora_B") for name, p in _factors(trainer, part).items()}
    before = _fixed_loss(trainer)
    for step in range(STEPS):
        trainer.train_step(step)
    after = _fixed_loss(trainer)
    trainer.accelerator.unwrap_model(trainer.denoiser).eval()
    return {"trainer": trainer, "start": start, "before": before, "after": after,
            "path": trainer.export(time.time())}



def test_lora_fa_is_a_network_type_with_its_help():
    from ui import train_view as tv

    spec = next(s for s in tv.config_fields() if s.path == ("network", "type"))
    assert "lora_fa" in spec.choices and "lora_fa (LoRA-FA: A frozen at its random init, only B trains" in spec.info
    network_config("lora_fa", use_rslora=True, train_text_encoder=True)
    for option in ("use_dora", "init", "loraplus_lr_ratio"):  # refused by name, even at LoRA's default
        with pytest.raises(StudioError, match=rf"network\.{option}: an option of lora and locon, not of lora_fa"):
            parse_config({"network": {"type": "lora_fa", option: LoRAOptions.model_fields[option].default}})


@pytest.mark.slow(seconds=60)
def test_only_b_trains_and_the_loss_drops(trained):
    trainer, start = trained["trainer"], trained["start"]
    assert trained["after"] < trained["before"]
    down, up = _factors(trainer, "lora_A"), _factors(trainer, "lora_B")
    assert down and len(down) == len(up)
    assert any(name.startswith("text_encoder.") for name in down)
    for name, p in down.items():
        assert not p.requires_grad and torch.equal(p, start[name]), name
        assert p.abs().max() > 0  # a random projection, not zeros
    for name, p in up.items():
        assert not torch.equal(p, start[name]), name
        assert not start[name].any()  # B starts at zero: the adapter starts as the base model


@pytest.mark.slow(seconds=60)
def test_optimizer_holds_state_for_b_alone(trained):
    trainer = trained["trainer"]
    down, up = _factors(trainer, "lora_A"), _factors(trainer, "lora_B")
    state = trainer.optimizer.state
    assert {id(p) for p in state} == {id(p) for p in up.values()}
    held = sum(t.numel() for p in state for t in state[p].values() if torch.is_tensor(t) and t.ndim > 0)
    b_values = sum(p.numel() for p in up.values())
    assert held == 2 * b_values  # AdamW's two moments, of B only
    assert held < 2 * (b_values + sum(p.numel() for p in down.values()))  # what a LoRA of this rank holds


@pytest.mark.slow(seconds=60)
def test_the_file_is_a_plain_lora_equal_to_the_trained_model(trained):
    from studio.adapters.library import describe_adapter

    info = describe_adapter(trained["path"])
    metadata = info["metadata"]
    assert info["type"] == "lora" and info["format"] == "kohya" and info["prefixes"]["lora_te"] > 0
    assert metadata["ss_network_module"] == "networks.lora"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lora_fa"}
    assert metadata["lora_studio_adapter_type"] == "lora_fa"

    trainer = trained["trainer"]
    assert_file_equals_trained_model(trainer, trained["path"], name="fa")


class TestTrainedFile(TrainedFileChecks):
    blend_with = "locon"
    steps = STEPS
