"""LoRA Block Weight (LBW): a weight per UNet block, as in the sd-webui-lora-block-weight
extension. A vector names blocks in the original (LDM) layout: BASE is the text
encoder(s), INnn the input blocks, M00 the middle block, OUTnn the output blocks.

SD1.x vectors have 17 values, SDXL 12; any model also takes the 26-value form
(BASE, IN00..IN11, M00, OUT00..OUT11) or a preset name.
"""
from __future__ import annotations

from studio.errors import StudioError
from studio.models.families import get_family
from studio.models.single_file import unet_diffusers_to_ldm

FULL_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]


def parse_block_weights(spec: str | list[float], family_name: str) -> dict[str, float]:
    """A preset name, or the family's vector (17 values on SD1.x, 12 on SDXL) or the
    26-value form, -> {block: weight}."""
    family = get_family(family_name)
    if isinstance(spec, str):
        text = family.block_presets.get(spec.strip().upper(), spec)
        try:
            values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise StudioError(f"Block weights {spec!r}: give a preset ({', '.join(family.block_presets)}) or "
                              "comma-separated numbers.") from None
    else:
        values = [float(v) for v in spec]
    expected = list(family.block_names)
    names = {len(expected): expected, len(FULL_BLOCKS): FULL_BLOCKS}.get(len(values))
    if names is None:
        raise StudioError(f"Block weights have {len(values)} values; {family.name} takes {len(expected)} "
                          f"({','.join(expected)}) or {len(FULL_BLOCKS)}.")
    return dict(zip(names, values))


def module_block(path: str, unet_config) -> str | None:
    """The LBW block of a diffusers UNet module path ('IN04', 'M00', 'OUT05'), or None for
    layers outside the blocks (conv_in, time embedding, conv_out)."""
    try:
        ldm = unet_diffusers_to_ldm(path, unet_config)
    except StudioError:
        return None
    parts = ldm.split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02d}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02d}"
    return None


def block_weight(weights: dict[str, float] | None, block: str | None) -> float:
    """The weight of `block` under an LBW vector; blocks the vector does not name keep 1."""
    if weights is None or block is None:
        return 1.0
    return weights.get(block, 1.0)
