"""The header entries that mark the studio's own file layouts, apart from the formats' code so
that the adapter methods (which studio.config lists, torch not loaded) can name them."""
from __future__ import annotations

# A method's own file layout (T-LoRA's "tlora"); absent in kohya, diffusers and peft files.
FORMAT_KEY = "lora_studio.format"
# A mixture of adapters (studio.adapters.mixtures.file: members, gate kind and gate tensors).
MIXTURE_KEY = "lora_studio_mixture"
