"""The network options as pydantic models: what every method takes (`NetworkOptions`), and the
option groups several methods take (the mixins below), each defined once. A method's own
options model lives in its module (`LoKrOptions` in lokr.py: `type: Literal["lokr"]` and
`lokr_factor`), built from `NetworkOptions` and the groups it honours, and is its
`Method.options`; studio.config makes `[network]` the union of them chosen by `type`. So an
option exists only in the methods that use it, and one given to another method is refused
by name (as peft keeps a method's options in its own config class).

Mixins go before NetworkOptions in a model's bases (`class X(BlockRanks, NetworkOptions)`):
pydantic puts the fields of later bases first, so every [network] starts with the shared ones.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ENCODER_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_CONV = ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"]


class Section(BaseModel):
    """A section of the training config (studio.config's sections and the network options)."""

    # NaN and infinity are refused everywhere: no setting means anything at either.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class NetworkOptions(Section):
    """The options every method takes. `type` is each method's own Literal."""

    type: str
    rank: int = Field(8, ge=1, le=1024, description="Rank (dim) of each adapted layer.")
    alpha: float = Field(8.0, gt=0, le=4096, description="Alpha; the update is scaled by alpha/rank (alpha/sqrt(rank) with rsLoRA).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter path.")
    target_modules: list[str] = Field(default_factory=lambda: list(UNET_ATTENTION),
                                      description="UNet module names to adapt (attn1 and attn2 of every transformer block).")
    train_text_encoder: bool = Field(False, description="Also train the adapter on the text encoder(s).")
    pivotal_vectors: int = Field(
        0, ge=0, le=75, description="Pivotal tuning: also train a new embedding of N vectors for dataset.trigger_word "
                                    "(every text encoder), bundled in the adapter file and saved as "
                                    "<trigger>.safetensors in the run folder; 0 = off.")
    pivotal_init: str = Field("", description="Pivotal tuning: start the embedding from this word's token embeddings "
                                              "(e.g. the class, 'star'); empty = random at the vocabulary's scale.")
    text_encoder_target_modules: list[str] = Field(default_factory=lambda: list(TEXT_ENCODER_ATTENTION),
                                                   description="Text-encoder module names to adapt.")

    def learning_rate_ratios(self) -> dict[str, float]:
        """The options that train some of the adapter's parameters at a multiple of the
        learning rate (option name -> ratio): what an optimizer with one rate refuses."""
        return {}


class BlockRanks(Section):
    """Per-section ranks of the UNet's attention layers (the peft methods' rank_pattern)."""

    block_rank_down: int | None = Field(None, ge=1, le=1024, description="Rank of the adapted attention layers in the UNet's down blocks (default: rank).")
    block_rank_mid: int | None = Field(None, ge=1, le=1024, description="Rank of the adapted attention layers in the UNet's mid block (default: rank).")
    block_rank_up: int | None = Field(None, ge=1, le=1024, description="Rank of the adapted attention layers in the UNet's up blocks (default: rank).")


class ConvTargets(Section):
    """The UNet's conv layers a method also adapts."""

    conv_target_modules: list[str] = Field(default_factory=lambda: list(UNET_CONV),
                                           description="Extra UNet modules for locon and adalora, and for tlora with "
                                                       "tlora_conv (ResNet convs, time projections, resamplers).")


class RsLoRA(Section):
    use_rslora: bool = Field(False, description="rsLoRA: scale by alpha/sqrt(rank), steadier at high ranks.")


class RankBudget(Section):
    rank_budget: int | None = Field(
        None, ge=1, le=1_000_000, description="Total rank summed over the adapted modules that rank allocation and "
                                              "adalora end with (default: rank x modules, no reduction).")
