"""Latents and text conditioning cached on disk, shared by the runs of a workspace
(workspace/cache/), so that the next run on the same pictures and model skips the VAE and
text-encoder passes (kohya's cache_latents_to_disk, with the keys below).

An entry's name is the SHA-256 of everything its tensors depend on, so a stale entry is
never read: it is simply not asked for again.

- latents (the VAE posterior's mean and std of one picture): the VAE encoder's weights
  (`module_digest`: its tensors' bytes, not the file's name: a copied or renamed model
  hits, a fine-tune with its own VAE misses, and models sharing a VAE share latents), the
  dtype it ran in, the picture's bytes, the bucket it was cut to, the crop (the centre:
  random crops are never cached) and the flip;
- text conditioning (one caption): the text encoders' weights and the tokenizers'
  vocabularies, the family (how the conditioning is made from them), the caption.

`FORMAT` is part of every key: raise it when the pixels or the conditioning a key stands for
would change (how pictures are scaled or cropped, a family's encode_text).

A file that cannot be read is encoded again and rewritten; writes are atomic. Nothing is
ever deleted here: each run's "cache" event says how many entries and bytes the folder
holds and where it is; deleting the folder (or turning training.cache_to_disk off) is
always safe, the next run encodes again.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from studio.fsutil import atomic_write_with

log = logging.getLogger(__name__)

FORMAT = 1
#: The parts of a VAE that play no part in encoding (diffusers' AutoencoderKL names).
VAE_DECODER = ("decoder.", "post_quant_conv.")


def module_digest(*modules: torch.nn.Module, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 of the modules' parameters and buffers (but those whose names start with one
    of `exclude`): names, dtypes, shapes and bytes, in state-dict order."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            if name.startswith(exclude):
                continue
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")
    return digest.hexdigest()


def vocabulary_digest(tokenizers) -> str:
    digest = hashlib.sha256()
    for tokenizer in tokenizers:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        digest.update(str(tokenizer.model_max_length).encode())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def key(*parts) -> str:
    return hashlib.sha256(json.dumps([FORMAT, *parts], default=str).encode()).hexdigest()


class DiskCache:
    """Tensors by key in `folder`/<kind>/<key[:2]>/<key>.safetensors."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = self.misses = 0

    def _path(self, kind: str, name: str) -> Path:
        return self.folder / kind / name[:2] / f"{name}.safetensors"

    def get(self, kind: str, name: str) -> dict[str, torch.Tensor] | None:
        from safetensors.torch import load_file

        path = self._path(kind, name)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            tensors = load_file(str(path))
        except Exception as error:  # a damaged entry is encoded again and rewritten
            log.warning("cache entry %s unreadable (%s); encoding again", path, error)
            self.misses += 1
            return None
        self.hits += 1
        return tensors

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) in the folder, all kinds and models together."""
        files = [path for path in self.folder.rglob("*.safetensors") if path.is_file()]
        return len(files), sum(path.stat().st_size for path in files)

    def put(self, kind: str, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = self._path(kind, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp)))
