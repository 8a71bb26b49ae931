"""What the UNet families (SD 1.x, SDXL) share: the UNet2DConditionModel call and its
coarse sections."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: training.block_lr_<key> / network.block_rank_<key> -> the UNet's top-level module
SECTIONS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}
#: conditioning entries that go to the UNet as added_cond_kwargs (SDXL's pooled text and size)
ADDED_CONDITIONING = ("text_embeds", "time_ids")


def predict(unet, noisy: "torch.Tensor", timesteps: "torch.Tensor", conditioning: dict) -> "torch.Tensor":
    """The UNet's prediction for `noisy` at `timesteps`: cross-attention on the text's hidden
    states, and SDXL's pooled text and size conditioning as added_cond_kwargs."""
    device = noisy.device
    added = {key: conditioning[key].to(device) for key in ADDED_CONDITIONING if key in conditioning}
    return unet(noisy, timesteps, conditioning["encoder_hidden_states"].to(device),
                added_cond_kwargs=added or None).sample
