"""LoHa (LyCORIS): dW = (alpha / r) (B1 A1) * (B2 A2), a Hadamard product of two rank-r
products, so rank up to r^2 from the parameters of two rank-r LoRAs, on network.target_modules.
Trained with peft's LoHaConfig (rank_dropout = network.dropout); exported as kind loha (lycoris.kohya)."""
from __future__ import annotations

from typing import Literal

from studio.adapters.methods.base import PeftMethod
from studio.adapters.methods.options import BlockRanks, NetworkOptions


class LoHaOptions(BlockRanks, NetworkOptions):
    type: Literal["loha"] = "loha"


class LoHa(PeftMethod):
    name = "loha"
    summary = "loha (LyCORIS Hadamard product)"
    options = LoHaOptions
    nf4 = False  # peft has no 4-bit LoHa layer

    def peft_config(self, net, *, text_encoder):
        from peft import LoHaConfig

        return LoHaConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout,
                          target_modules=self.targets(net, text_encoder=text_encoder),
                          **self.rank_patterns(net, text_encoder=text_encoder))
