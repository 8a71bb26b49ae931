"""Instant adapters: a LoRA for a base model from pictures of a concept or a description of
it, in one forward pass of a hypernetwork, with no training. `make.py`: the file in the
library (inputs checked, metadata naming the generator and its input); `network.py`: the
hypernetwork (imports torch)."""
from studio.instant.make import (check_description, hypernetwork_folder, instant_code, load_hypernetwork,
                                 make_instant_adapter, model_hashes, read_pictures)

__all__ = ["check_description", "hypernetwork_folder", "instant_code", "load_hypernetwork", "make_instant_adapter",
           "model_hashes", "read_pictures"]
