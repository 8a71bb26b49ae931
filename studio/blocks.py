"""LoRA Block Weight (LBW): a weight per UNet block, as in the sd-webui-lora-block-weight
extension. A vector names blocks in the original (LDM) layout: BASE is the text
encoder(s), INnn the input blocks, M00 the middle block, OUTnn the output blocks.

SD1.x vectors have 17 values, SDXL 12; any model also takes the 26-value form
(BASE, IN00..IN11, M00, OUT00..OUT11) or a preset name.
"""
from __future__ import annotations

from studio.errors import StudioError

SD15_BLOCKS = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
               "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
SDXL_BLOCKS = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"]
FULL_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]

# The extension's default SD1.x presets.
SD15_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
# The same groups on SDXL's blocks: shallow input (IN04, IN05), deep input (IN07, IN08),
# middle, deep output (OUT00-OUT02), shallow output (OUT03-OUT05).
SDXL_PRESETS = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,1,1,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,1,1,1,1,1,1,0,0,0",
    "OUTD": "1,0,0,0,0,0,1,1,1,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,1,1,1",
    "OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 12),
}


def parse_block_weights(spec: str | list[float], family: str) -> dict[str, float]:
    """A preset name, or 17 (SD1.x) / 12 (SDXL) / 26 comma-separated values -> {block: weight}."""
    if isinstance(spec, str):
        presets = SDXL_PRESETS if family == "sdxl" else SD15_PRESETS
        text = presets.get(spec.strip().upper(), spec)
        try:
            values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise StudioError(f"Block weights {spec!r}: give a preset ({', '.join(presets)}) or comma-separated "
                              "numbers.") from None
    else:
        values = [float(v) for v in spec]
    layouts = {len(SD15_BLOCKS): SD15_BLOCKS, len(SDXL_BLOCKS): SDXL_BLOCKS, len(FULL_BLOCKS): FULL_BLOCKS}
    names = layouts.get(len(values))
    expected = SDXL_BLOCKS if family == "sdxl" else SD15_BLOCKS
    if names is None or (names is not FULL_BLOCKS and names is not expected):
        raise StudioError(f"Block weights have {len(values)} values; {family} takes {len(expected)} "
                          f"({','.join(expected)}) or {len(FULL_BLOCKS)}.")
    return dict(zip(names, values))


def module_block(path: str, unet_config) -> str | None:
    """The LBW block of a diffusers UNet module path ('IN04', 'M00', 'OUT05'), or None for
    layers outside the blocks (conv_in, time embedding, conv_out)."""
    from studio.checkpoint import unet_diffusers_to_ldm

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
