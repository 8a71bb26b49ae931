"""X/Y plots of a mix: one labelled picture over adapter weights, prompts or seeds."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from studio.errors import StudioError
from studio.generate import MAX_SEED, Engine, GenerateRequest
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


def xy_grid(engine: Engine, request: GenerateRequest, x: Axis, y: Axis | None = None):
    """(labelled grid image, [[image per x] per y]) for the request over the axes; a grid
    over the cap on cells (studio.limits) is refused before any image is made."""
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
    cell_w, cell_h = rows[0][0].size
    pad_left = 110 if y else 0
    pad_top = 18
    sheet = Image.new("RGB", (pad_left + cell_w * len(x.values), pad_top + cell_h * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, x_value in enumerate(x.values):
        draw.text((pad_left + i * cell_w + 2, 3), x.label(x_value, request)[:24], fill="black")
    for j, row in enumerate(rows):
        if y:
            draw.text((2, pad_top + j * cell_h + cell_h // 2 - 5), y.label(y.values[j], request)[:18], fill="black")
        for i, image in enumerate(row):
            sheet.paste(image, (pad_left + i * cell_w, pad_top + j * cell_h))
    return sheet, rows

