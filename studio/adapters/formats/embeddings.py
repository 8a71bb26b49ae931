"""Textual-inversion embeddings in A1111's layouts: bundled inside an adapter file and as a
file of their own.

- Bundled (A1111's `networks` extension reads these from a LoRA file and loads them as
  embeddings while the LoRA is in the prompt): `bundle_emb.<name>.<key>` with the family's
  `embedding_keys`, one [vectors, width] tensor per text encoder: `string_to_param.*` for
  SD 1.5 (its .pt layout), `clip_l` / `clip_g` for SDXL.
- A file of its own (`<name>.safetensors`; A1111 names the embedding after the file): the
  family's `embedding_file_keys`, `emb_params` for SD 1.5 (one tensor: what A1111 and
  diffusers' `load_textual_inversion(file, token=name)` read), `clip_l` / `clip_g` for SDXL
  (what A1111 reads; diffusers loads each into its text encoder).

The prompt word is the embedding's name; an embedding of n vectors is n tokens, named as
diffusers names them: `name`, `name_1`, ..., `name_{n-1}`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from studio.errors import StudioError
from studio.fsutil import atomic_write_bytes

BUNDLE_PREFIX = "bundle_emb."


def token_names(name: str, vectors: int) -> list[str]:
    """The tokens of an embedding of `vectors` vectors (diffusers' multi-vector names)."""
    return [name] + [f"{name}_{i}" for i in range(1, vectors)]


def split_bundled(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the `bundle_emb.*` tensors out of an adapter file's tensors and return them."""
    return {key: tensors.pop(key) for key in [k for k in tensors if k.startswith(BUNDLE_PREFIX)]}


def parse_bundled(bundled: Mapping[str, torch.Tensor], family, source: str) -> dict[str, list[torch.Tensor]]:
    """The embeddings of `bundle_emb.*` tensors: name -> one [vectors, width] tensor per text
    encoder of `family`, in its order. A bundle without every key of the family, or with
    encoders of different vector counts, raises a StudioError naming it."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in bundled.items():
        name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
        found.setdefault(name, {})[part] = tensor
    out = {}
    for name, parts in found.items():
        if set(parts) != set(family.embedding_keys):
            raise StudioError(f"{source}: the bundled embedding {name!r} has {', '.join(sorted(parts))}; a "
                              f"{family.label} bundle has {', '.join(family.embedding_keys)}.")
        vectors = [parts[key].reshape(-1, parts[key].shape[-1]) for key in family.embedding_keys]
        if len({v.shape[0] for v in vectors}) > 1:
            raise StudioError(f"{source}: the bundled embedding {name!r} has a different number of vectors per "
                              "text encoder.")
        out[name] = vectors
    return out


def bundled_tensors(embeddings: Mapping[str, list[torch.Tensor]], family) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` tensors of `embeddings` (see parse_bundled), float32."""
    return {f"{BUNDLE_PREFIX}{name}.{key}": vector.detach().float().contiguous().cpu()
            for name, vectors in embeddings.items() for key, vector in zip(family.embedding_keys, vectors)}


def save_embedding(path: str | Path, vectors: list[torch.Tensor], family, metadata: Mapping[str, str]) -> Path:
    """Write one embedding as a file of its own (the family's embedding_file_keys), atomically."""
    from safetensors.torch import save

    tensors = {key: v.detach().float().contiguous().cpu() for key, v in zip(family.embedding_file_keys, vectors)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={str(k): str(v) for k, v in metadata.items()}))
    return path
