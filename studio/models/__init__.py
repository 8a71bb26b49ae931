"""Base models: loading.py resolves a reference ('builtin', a diffusers folder, a single-file
checkpoint, a model name pulled into the workspace: hub.py) and loads its pipeline with no
network; families/ holds every model family, blocks.py LoRA Block Weight's blocks,
single_file.py A1111 / CivitAI checkpoints, builtin.py and skeletons.py the built-in tiny model
and the configs for offline loading."""
from __future__ import annotations

from studio.models.loading import AS_STORED, PICKLE_SUFFIXES, ModelRef, load_pipeline, quiet_libraries, resolve_model

__all__ = ["AS_STORED", "PICKLE_SUFFIXES", "ModelRef", "load_pipeline", "quiet_libraries", "resolve_model"]
