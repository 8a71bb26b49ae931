"""The instant-adapter hypernetwork: pictures or a description of a concept -> the weights of
a LoRA for one base model, in one forward pass.

    z = image_encoder(pictures) (the mean over 1..k pictures)  or  text_encoder(description)
    for every adapted layer l:  up_l = reshape(H_l z + b_l, [out_l, r]),  down_l learned
    the layer's update:  dW_l = up_l @ down_l  (a conv's down is [r, in, kh, kw], its up 1x1)

So the file is an ordinary LoRA / LoCon of rank r at alpha r (scale 1): the downs are shared
by every concept (a basis of input directions learned in training), the ups are a linear
function of the concept's code z. Linear in z on purpose: an adapter of a colour plus an
adapter of a shape drawn together make both (toyworld/fidelity.py's composition figures),
so a code that adds up from its parts can name a combination training never showed.

- image encoder: 3x3 convolutions of stride 2 with GroupNorm and SiLU, mean- and max-pooled, an MLP to z; pictures are resized to
  `resolution`.
- text encoder: a word embedding per vocabulary word; a causal convolution over the
  words (each sees the two before it) scores them, the softmax of the scores pools their
  embeddings, a linear map takes the pool to z. So a code is a weighted sum of its words'
  own vectors: "purple star" is made of what "purple" and "star" mean elsewhere (an MLP
  there, in a first version, drew cyan blobs for "a cyan cross" though it drew orange
  crosses), and the scores can learn to pass over "on a white background".

The config (HyperConfig, config.json beside the weights) names the base model's adapted
layers (denoiser path and kohya name, shapes), the vocabulary and what training held out.
Trained by toyworld/train_hyperlora.py; used by studio.instant.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from studio.adapters import LoraModule
from studio.errors import StudioError
from studio.fsutil import atomic_path, atomic_write_text
from studio.safetensors_file import read_safetensors_header

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"  # a hypernetwork's folder
KIND = "instant-lora-hypernetwork"
PAD, UNKNOWN = "<pad>", "<unk>"
MAX_WORDS = 24
WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Target:
    """One adapted layer of the denoiser: its module path, its kohya name in the file, and
    its weight's shape (a Linear's `kernel` is empty)."""

    path: str
    name: str
    in_features: int
    out_features: int
    kernel: tuple[int, ...] = ()

    @property
    def down_shape(self) -> tuple[int, ...]:
        return (self.in_features, *self.kernel)


@dataclass
class HyperConfig:
    """What a hypernetwork makes adapters for and how it is built (config.json)."""

    targets: list[Target]
    rank: int
    z_dim: int
    resolution: int
    image_widths: list[int]
    vocab: list[str]
    stop_words: list[str]
    word_dim: int
    trigger: str
    trigger_shapes: list[list[int]]  # [tokens, width] of the trigger's embedding in each text encoder
    family: str
    base_model: dict[str, str]       # what it was trained on: display name, sha256 of the denoiser weights
    version: str
    held_out: dict = field(default_factory=dict)
    kind: str = KIND

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> "HyperConfig":
        try:
            data = json.loads(text)
            if data.get("kind") != KIND:
                raise ValueError(f"kind is {data.get('kind')!r}, not {KIND!r}")
            data["targets"] = [Target(**{**t, "kernel": tuple(t["kernel"])}) for t in data["targets"]]
            return cls(**data)
        except (ValueError, TypeError, KeyError) as error:
            raise StudioError(f"{source} is not an instant-adapter hypernetwork config ({error}); "
                              "train one with `python -m toyworld.train_hyperlora`.") from None

    @property
    def up_sizes(self) -> list[int]:
        return [t.out_features * self.rank for t in self.targets]


def to_pixels(images: list, resolution: int) -> torch.Tensor:
    """RGB pictures (PIL) -> [N, 3, R, R] in [-1, 1], resized (bicubic) to R x R where they differ."""
    from PIL import Image

    arr = np.stack([np.asarray(im.convert("RGB") if im.size == (resolution, resolution) else
                               im.convert("RGB").resize((resolution, resolution), Image.Resampling.BICUBIC),
                               dtype=np.float32) for im in images])
    return torch.from_numpy(arr / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous()


def words(text: str) -> list[str]:
    """A description's words: lower case letters, everything else separates."""
    return WORD.findall(text.lower())


class ImageEncoder(nn.Module):
    def __init__(self, widths: list[int], z_dim: int):
        super().__init__()
        layers, channels = [], 3
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1),
                       nn.GroupNorm(8, width), nn.SiLU()]
            channels = width
        self.features = nn.Sequential(*layers)
        self.mlp = nn.Sequential(nn.Linear(2 * channels, 2 * z_dim), nn.SiLU(), nn.Linear(2 * z_dim, z_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] -> one code per picture [N, z]."""
        h = self.features(pixels)
        return self.mlp(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))


class TextEncoder(nn.Module):
    def __init__(self, vocab_size: int, word_dim: int, z_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.score = nn.Conv1d(word_dim, 1, kernel_size=3)
        self.project = nn.Linear(word_dim, z_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N, L] (0 = padding) -> one code per description [N, z]."""
        e = self.embedding(ids)
        scores = self.score(F.pad(e.transpose(1, 2), (2, 0))).squeeze(1)
        weights = torch.softmax(scores.masked_fill(ids == 0, float("-inf")), dim=1)
        pooled = (weights.unsqueeze(-1) * e).sum(dim=1)
        return self.project(pooled)


class HyperLoRA(nn.Module):
    """The hypernetwork (see the module docstring)."""

    def __init__(self, config: HyperConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ImageEncoder(config.image_widths, config.z_dim)
        self.text_encoder = TextEncoder(len(config.vocab), config.word_dim, config.z_dim)
        self.downs = nn.ParameterList()
        for target in config.targets:  # peft's LoRA A init: Kaiming-uniform, a = sqrt(5)
            down = torch.empty(config.rank, *target.down_shape)
            nn.init.kaiming_uniform_(down.flatten(1), a=5 ** 0.5)
            self.downs.append(nn.Parameter(down))
        self.head = nn.Linear(config.z_dim, sum(config.up_sizes))
        nn.init.normal_(self.head.weight, std=1e-4)
        nn.init.zeros_(self.head.bias)
        # The trigger's token embeddings in the base model's text encoders (filled in training):
        # an adapter made for another trigger word bundles them under that word.
        for i, shape in enumerate(config.trigger_shapes):
            self.register_buffer(f"trigger_embedding_{i}", torch.zeros(shape))
        self._word_ids = {w: i for i, w in enumerate(config.vocab)}
        self.weights_sha256 = ""  # of the weights file it was loaded from

    # ---------------------------------------------------------------- inputs
    def tokenize(self, descriptions: list[str]) -> torch.Tensor:
        """Word ids [N, L] of descriptions (unknown words -> <unk>), padded with 0."""
        unknown = self._word_ids[UNKNOWN]
        rows = [[self._word_ids.get(w, unknown) for w in words(text)][:MAX_WORDS] for text in descriptions]
        width = max([1, *(len(r) for r in rows)])
        return torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long)

    def unknown_words(self, description: str) -> list[str]:
        return [w for w in words(description) if w not in self._word_ids]

    def content_words(self, description: str) -> list[str]:
        """The description's known words that say something (not a stop word)."""
        stop = set(self.config.stop_words)
        return [w for w in words(description) if w in self._word_ids and w not in stop]

    # ---------------------------------------------------------------- codes and weights
    @staticmethod
    def unit(z: torch.Tensor) -> torch.Tensor:
        """A code with zero mean and unit variance over its entries: no code can shrink to
        nothing, so every concept's LoRA depends on what its code says."""
        return F.layer_norm(z, z.shape[-1:])

    def encode_images(self, pixels: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
        """The code of each picture [N, 3, R, R] -> [N, z]; with `counts`, of each group of
        that many consecutive pictures (the mean of their codes) -> [len(counts), z]."""
        codes = self.unit(self.image_encoder(pixels))
        if counts is None:
            return codes
        return self.unit(torch.stack([group.mean(dim=0) for group in codes.split(counts)]))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.unit(self.text_encoder(ids))

    def ups(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The up factors of every target for codes z [B, z_dim]: one [B, out, r] per target."""
        flat = self.head(z)
        r = self.config.rank
        return [chunk.reshape(z.shape[0], t.out_features, r)
                for chunk, t in zip(flat.split(self.config.up_sizes, dim=1), self.config.targets)]

    def adapter_modules(self, z: torch.Tensor) -> dict:
        """The LoRA of one code z [z_dim] as file modules (kohya names, alpha = rank)."""
        r = self.config.rank
        modules = {}
        for target, down, up in zip(self.config.targets, self.downs, self.ups(z[None])):
            up = up[0] if not target.kernel else up[0][:, :, None, None]
            modules[target.name] = LoraModule(down.detach().float().clone(), up.detach().float().contiguous(), float(r))
        return modules

    def trigger_embedding(self) -> list[torch.Tensor]:
        """The trigger's token embeddings, one [tokens, width] per text encoder of the base model."""
        return [getattr(self, f"trigger_embedding_{i}") for i in range(len(self.config.trigger_shapes))]

    # ---------------------------------------------------------------- files
    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / CONFIG_FILE, self.config.to_json())
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata={"kind": KIND})  # one entry: safetensors writes several in a random order

    @classmethod
    def load(cls, folder: Path) -> "HyperLoRA":
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise StudioError(f"{folder} has no {CONFIG_FILE} and {WEIGHTS_FILE}: it is not an instant-adapter "
                              "hypernetwork; train one with `python -m toyworld.train_hyperlora`.")
        network = cls(HyperConfig.from_json(config_path.read_text(encoding="utf-8"), str(config_path)))
        read_safetensors_header(weights_path)  # a pickle or a damaged file is refused before it is read
        state = load_file(str(weights_path))
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise StudioError(f"{weights_path} does not fit its {CONFIG_FILE}: {str(error).splitlines()[0]}") from None
        network.weights_sha256 = hashlib.sha256(weights_path.read_bytes()).hexdigest()
        return network.eval()
