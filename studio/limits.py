"""Caps on the work one request may start (CLI command or page action), so a typo or a
hostile script cannot start hours of generation or fill the disk. Each cap has a setting:
an environment variable read when the cap is checked, for the CLI and the server alike."""
from __future__ import annotations

import os
from dataclasses import dataclass

from studio.errors import StudioError


@dataclass(frozen=True)
class Cap:
    """At most `default` `unit` per request; the environment variable `env` changes it."""

    unit: str       # "adapters per mix"
    env: str
    default: int
    advice: str     # what to do instead of raising the cap

    def value(self) -> int:
        text = os.environ.get(self.env, "").strip()
        if not text:
            return self.default
        if not text.isdigit() or not 1 <= int(text) <= 10**9:
            raise StudioError(f"{self.env}={text!r} is not a whole number from 1 to 1000000000; "
                              f"set it to the most {self.unit} you allow (default {self.default}), or unset it.")
        return int(text)

    def check(self, count: int, what: str) -> None:
        """Refuse `count` (of `what`, e.g. "This mix has 20 adapters") when over the cap."""
        cap = self.value()
        if count > cap:
            raise StudioError(f"{what}, over the cap of {cap} {self.unit}; {self.advice}, or raise the cap "
                              f"with the environment variable {self.env}={count}.")


MIX_ADAPTERS = Cap("adapters per mix", "LORA_STUDIO_MAX_MIX_ADAPTERS", 16,
                   "use fewer adapters, or bake some of them into one with `lora-studio bake`")
GRID_CELLS = Cap("grid cells", "LORA_STUDIO_MAX_GRID_CELLS", 100, "use fewer values on the axes")
IMPORT_IMAGES = Cap("images per import", "LORA_STUDIO_MAX_IMPORT_IMAGES", 10_000,
                    "import the images in several parts (mode 'add')")

CAPS = (MIX_ADAPTERS, GRID_CELLS, IMPORT_IMAGES)


def check_settings() -> None:
    """Read every cap once, so a bad setting stops the server before it starts."""
    for cap in CAPS:
        cap.value()
