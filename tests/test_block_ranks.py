"""Block-wise ranks (sd-scripts' block_dims): the UNet's attention layers in its down, mid
and up blocks at their own rank, in training and in the exported file."""
from __future__ import annotations

import pytest

from studio.config import network_config
from tests.conftest import demo_config

RANKS = {"down_blocks": 2, "mid_block": 6, "up_blocks": 4}


@pytest.mark.slow(seconds=5)
@pytest.mark.parametrize("network", [{}, {"type": "locon", "conv_rank": 3}, {"type": "loha"}, {"type": "lokr"}])
def test_each_unet_block_trains_and_exports_at_its_rank(network, workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = demo_config()
    config.network.block_rank_down, config.network.block_rank_mid, config.network.block_rank_up = RANKS.values()
    config.network = network_config(like=config.network, **network)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    assert float(trainer.train_step(0)) > 0
    unet = trainer.accelerator.unwrap_model(trainer.denoiser)
    layers = {path: module.r["default"] for path, module in unet.named_modules()
              if isinstance(getattr(module, "r", None), dict)}
    attention = {path: r for path, r in layers.items() if path.endswith(tuple(config.network.target_modules))}
    assert {path.split(".")[0] for path in attention} == RANKS.keys()
    assert all(r == RANKS[path.split(".")[0]] for path, r in attention.items())
    convs = {r for path, r in layers.items() if path not in attention}
    assert convs == ({3} if network.get("type") == "locon" else set())

    if network.get("type") in (None, "locon"):  # kinds whose file modules carry a rank
        exported = trainer.adapter.export(trainer.model_ref.family)
        ranks = {name: module.rank for name, module in exported.modules.items()}
        for section, rank in RANKS.items():
            in_section = [r for name, r in ranks.items() if f"_{section}_" in name and "attn" in name]
            assert in_section and set(in_section) == {rank}, (section, in_section)


def test_tlora_refuses_block_ranks():
    from studio.config import parse_config
    from studio.errors import StudioError

    with pytest.raises(StudioError, match="network.block_rank_mid: an option of lora, locon, loha, lokr and lora_fa, "
                                          "not of tlora"):
        parse_config({"network": {"type": "tlora", "block_rank_mid": 4}})
