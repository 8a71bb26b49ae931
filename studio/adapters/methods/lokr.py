"""LoKr (LyCORIS): dW = (alpha / r) W1 (x) W2, a Kronecker product whose factor sizes follow
network.lokr_factor (-1: balanced), the larger factor decomposed at rank r when r is small
enough, on network.target_modules. Trained with peft's LoKrConfig (rank_dropout =
network.dropout); exported as kind lokr (lycoris.kohya, alpha per module)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from studio.adapters.methods.base import PeftMethod
from studio.adapters.methods.options import BlockRanks, NetworkOptions


class LoKrOptions(BlockRanks, NetworkOptions):
    type: Literal["lokr"] = "lokr"
    lokr_factor: int = Field(-1, ge=-1, le=1024, description="LoKr: Kronecker factor (-1 = balanced).")


class LoKr(PeftMethod):
    name = "lokr"
    summary = "lokr (LyCORIS Kronecker product)"
    options = LoKrOptions
    nf4 = False  # peft has no 4-bit LoKr layer

    def peft_config(self, net, *, text_encoder):
        from peft import LoKrConfig

        return LoKrConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout,
                          target_modules=self.targets(net, text_encoder=text_encoder),
                          **self.rank_patterns(net, text_encoder=text_encoder),
                          decompose_factor=net.lokr_factor)
