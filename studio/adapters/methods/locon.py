"""LoCon: LoRA on the attention and also on the ResNet convs, time projections and
resamplers (network.conv_target_modules), a 3x3 conv as down [r, in, 3, 3] and up
[out, r, 1, 1], at conv_rank / conv_alpha when set. Every LoRA option applies.
Exported as kind lora with conv modules (networks.lora with conv_dim / conv_alpha)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from studio.adapters.methods.lora import LoRA, LoRAOptions
from studio.adapters.methods.options import ConvTargets


class LoConOptions(ConvTargets, LoRAOptions):
    type: Literal["locon"] = "locon"
    conv_rank: int | None = Field(None, ge=1, le=1024, description="Rank of the conv layers (default: rank).")
    conv_alpha: float | None = Field(None, gt=0, le=4096, description="Alpha of the conv layers (default: alpha).")


class LoCon(LoRA):
    name = "locon"
    summary = "locon (also the ResNet convs)"
    options = LoConOptions

    def targets(self, net, *, text_encoder):
        return super().targets(net, text_encoder=text_encoder) + ([] if text_encoder else list(net.conv_target_modules))

    def rank_patterns(self, net, *, text_encoder):
        """The conv layers at conv_rank / conv_alpha where set, then the block ranks."""
        blocks = super().rank_patterns(net, text_encoder=text_encoder)
        if text_encoder:
            return blocks
        rank_pattern, alpha_pattern = {}, {}
        for name in net.conv_target_modules:
            pattern = rf"^(.*\.)?{name.replace('.', chr(92) + '.')}$"
            if net.conv_rank:
                rank_pattern[pattern] = net.conv_rank
            if net.conv_alpha:
                alpha_pattern[pattern] = net.conv_alpha
        return {"rank_pattern": {**rank_pattern, **blocks["rank_pattern"]},
                "alpha_pattern": {**alpha_pattern, **blocks["alpha_pattern"]}}
