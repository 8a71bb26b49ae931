"""LoRA Block Weight (LBW): a weight per block of the denoiser, as in the
sd-webui-lora-block-weight extension. Each family's block table (Family.blocks) names its
blocks: BASE is the text encoder(s), then the denoiser's blocks (a UNet's in the original LDM
layout: INnn the input blocks, M00 the middle block, OUTnn the output blocks).

A family takes its own vector (SD1.x 17 values, SDXL 12), its long form (`blocks.full`: 26
values on the UNet families) or a preset name.
"""
from __future__ import annotations

from studio.errors import StudioError
from studio.models.families import get_family


def parse_block_weights(spec: str | list[float], family_name: str) -> dict[str, float]:
    """A preset name, or the family's vector or its long form, -> {block: weight}."""
    blocks = get_family(family_name).blocks
    if isinstance(spec, str):
        text = blocks.presets.get(spec.strip().upper(), spec)
        try:
            values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise StudioError(f"Block weights {spec!r}: give a preset ({', '.join(blocks.presets)}) or "
                              "comma-separated numbers.") from None
    else:
        values = [float(v) for v in spec]
    names = {len(blocks.names): blocks.names, len(blocks.full): blocks.full}.get(len(values))
    if names is None:
        raise StudioError(f"Block weights have {len(values)} values; {family_name} takes {len(blocks.names)} "
                          f"({','.join(blocks.names)}) or {len(blocks.full)}.")
    return dict(zip(names, values))


def block_weight(weights: dict[str, float] | None, block: str | None) -> float:
    """The weight of `block` under an LBW vector; blocks the vector does not name keep 1."""
    if weights is None or block is None:
        return 1.0
    return weights.get(block, 1.0)
