"""X/Y plots of a mix: one labelled picture over adapter weights, prompts or seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from studio.errors import StudioError
from studio.generation.engine import MAX_SEED, Engine, GenerateRequest
from studio.limits import GRID_CELLS


@dataclass(frozen=True)
class Axis:
    """`kind` is "weight" (of adapter `index`), "prompt" or "seed"; `values` as given."""

    kind: str
    values: tuple
    index: int = 0

    @classmethod
    def parse(cls, text: str) -> "Axis":
        """'adapter0=0,0.5,1' | 'seed=1,2,3' | 'prompt=a red circle|a blue square'."""
        key, sep, raw = text.partition("=")
        key = key.strip().lower()
        if not sep or not raw.strip():
            raise StudioError(f"Axis {text!r}: write adapterN=0,0.5,1 or seed=1,2,3 or prompt=first|second.")
        try:
            if key.startswith("adapter"):
                weights = tuple(float(v) for v in raw.split(","))
                if not all(math.isfinite(w) for w in weights):
                    raise ValueError
                return cls("weight", weights, int(key[len("adapter"):] or 0))
            if key == "seed":
                seeds = tuple(int(v) for v in raw.split(","))
                if not all(0 <= seed <= MAX_SEED for seed in seeds):
                    raise ValueError
                return cls("seed", seeds)
        except ValueError:
            raise StudioError(f"Axis {text!r}: the values must be finite numbers (seeds: whole numbers from 0 to "
                              f"{MAX_SEED}).") from None
        if key == "prompt":
            prompts = tuple(p.strip() for p in raw.split("|") if p.strip())
            if not prompts:
                raise StudioError(f"Axis {text!r}: give at least one prompt, e.g. prompt=a red star|a blue star.")
            return cls("prompt", prompts)
        raise StudioError(f"Axis {text!r}: unknown axis {key!r}; use adapterN, seed or prompt.")

    def apply(self, request: GenerateRequest, value) -> GenerateRequest:
        if self.kind == "seed":
            return replace(request, seed=value)
        if self.kind == "prompt":
            return replace(request, prompt=value)
        if self.index >= len(request.adapters):
            raise StudioError(f"Axis adapter{self.index}: the mix has {len(request.adapters)} adapters.")
        adapters = list(request.adapters)
        adapters[self.index] = replace(adapters[self.index], weight=value)
        return replace(request, adapters=adapters)

    def label(self, value, request: GenerateRequest) -> str:
        if self.kind == "weight":
            return f"{request.adapters[self.index].path.stem}: {value:g}"
        return f"seed {value}" if self.kind == "seed" else str(value)


#: Space around a label, in pixels.
LABEL_PAD = 4
#: Small cells (the built-in model's 64 px) are enlarged at most this many times to fit their labels.
MAX_CELL_SCALE = 8


def label_font():
    from PIL import ImageFont

    return ImageFont.load_default()


def fit_text(text: str, width: float, font) -> str:
    """`text`, cut with an ellipsis where it is wider than `width` pixels."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def cell_scale(cell_width: int, labels: list[str], font) -> int:
    """The whole factor that makes a cell wide enough for the widest column label (pixel
    for pixel, nearest neighbour: small images stay sharp)."""
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(draw.textlength(label, font=font) for label in labels) + 2 * LABEL_PAD
    return max(1, min(MAX_CELL_SCALE, math.ceil(widest / cell_width)))


def xy_grid(engine: Engine, request: GenerateRequest, x: Axis, y: Axis | None = None):
    """(labelled grid image, [[image per x] per y]) for the request over the axes; a grid
    over the cap on cells (studio.limits) is refused before any image is made. Each column's
    label fits above it: small images are enlarged (nearest neighbour) to make room, and a
    label longer than even that is cut with an ellipsis."""
    from PIL import Image, ImageDraw

    cells = len(x.values) * (len(y.values) if y else 1)
    GRID_CELLS.check(cells, f"This grid has {cells} cells" + (f" ({len(x.values)} x {len(y.values)})" if y else ""))
    for axis in (x, y) if y else (x,):
        for value in axis.values:
            axis.apply(request, value).validate()

    rows = []
    for y_value in (y.values if y else (None,)):
        base = y.apply(request, y_value) if y else request
        rows.append([engine.generate(replace(x.apply(base, x_value), batch_count=1))[0] for x_value in x.values])
    font = label_font()
    x_labels = [x.label(value, request) for value in x.values]
    y_labels = [y.label(value, request) for value in y.values] if y else []
    scale = cell_scale(rows[0][0].width, x_labels, font)
    cell_w, cell_h = rows[0][0].width * scale, rows[0][0].height * scale
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_h = font.getbbox("Ag")[3]
    pad_left = (math.ceil(max(measure.textlength(t, font=font) for t in y_labels)) + 2 * LABEL_PAD) if y else 0
    pad_top = text_h + 2 * LABEL_PAD
    sheet = Image.new("RGB", (pad_left + cell_w * len(x.values), pad_top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, label in enumerate(x_labels):
        draw.text((pad_left + i * cell_w + LABEL_PAD, LABEL_PAD), fit_text(label, cell_w - 2 * LABEL_PAD, font),
                  fill="black", font=font)
    for j, row in enumerate(rows):
        if y:
            draw.text((LABEL_PAD, pad_top + j * cell_h + (cell_h - text_h) // 2), y_labels[j], fill="black", font=font)
        for i, image in enumerate(row):
            cell = image.resize((cell_w, cell_h), Image.Resampling.NEAREST) if scale > 1 else image
            sheet.paste(cell, (pad_left + i * cell_w, pad_top + j * cell_h))
    return sheet, rows
