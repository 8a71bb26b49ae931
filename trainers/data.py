"""Training data: examples, aspect-ratio buckets, preprocessing and a resume-safe order.

Every choice (which examples form micro-batch k, crops, flips) is a pure function of the
seed and k, so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.datasets import open_image, split_tags


def micro_generator(seed: int, micro_step: int, stream: int = 0) -> torch.Generator:
    """A generator owned by one micro-step: resume-safe randomness."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step * 7919 + stream) % (2**63))


def sample_generator(seed: int, micro_step: int, part: int, place: int) -> torch.Generator:
    """A generator owned by one sample of a micro-batch, apart from the micro-step's own
    stream (which draws crops, latent samples, noise and timesteps): `part` 0 for training
    pictures, 2 for validation draws, `place` its position in the global batch (all
    processes together). What it draws (caption dropout, tag order) depends on nothing
    else, and turning those options on leaves the micro-step's stream as it was."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + micro_step) * 65_537 + part * 32_768 + place) % (2**63))


def caption_variant(caption: str, generator: torch.Generator, *, dropout_rate: float, shuffle: bool,
                    keep: int) -> str:
    """The caption one sample trains with. With probability `dropout_rate` the whole caption
    is dropped ("": the unconditional prompt, kohya's caption_dropout_rate); otherwise, with
    `shuffle`, its comma-separated tags after the first `keep` come in a random order (kohya's
    shuffle_caption / keep_tokens). Draws from `generator` only for what is on: one uniform
    number for the dropout, one permutation for the shuffle."""
    if dropout_rate and float(torch.rand((), generator=generator)) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = split_tags(caption)
    kept, rest = tags[:keep], tags[keep:]
    return ", ".join(kept + [rest[int(i)] for i in torch.randperm(len(rest), generator=generator)])


def validation_indices(count: int, share: float, seed: int) -> list[int]:
    """The pictures (of `count`) held out for validation: round(share x count), at least
    one when share > 0, drawn by the seed; sorted."""
    if not share:
        return []
    held_out = max(1, round(share * count))
    return sorted(int(i) for i in torch.randperm(count, generator=torch.Generator().manual_seed(seed + 2))[:held_out])


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    repeats: int
    size: tuple[int, int]     # original (width, height)
    bucket: tuple[int, int]   # training (width, height)


def bucket_step(resolution: int) -> int:
    """kohya's 64-pixel bucket step, smaller for toy resolutions (8 at 64 px)."""
    return min(64, max(8, resolution // 8))


def bucket_sizes(resolution: int, *, step: int | None = None, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) buckets of area <= resolution^2, sides multiples of `step`, aspect
    ratio at most `max_aspect` either way (kohya / OneTrainer style)."""
    step = step or bucket_step(resolution)
    area = resolution * resolution
    sizes = set()
    width = step
    while width <= resolution * max_aspect:
        height = int(area / width) // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            sizes.add((width, height))
        width += step
    return sorted(sizes)


def choose_bucket(size: tuple[int, int], resolution: int, *, enabled: bool, no_upscale: bool = False) -> tuple[int, int]:
    """The bucket an image of `size` trains at: square `resolution` without bucketing, else
    the bucket of the nearest aspect ratio; with `no_upscale`, small images keep their own
    size (rounded down to the step) instead of being enlarged."""
    if not enabled:
        return (resolution, resolution)
    width, height = size
    step = bucket_step(resolution)
    if no_upscale and width * height <= resolution * resolution:
        return (max(step, width // step * step), max(step, height // step * step))
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution, step=step), key=lambda wh: (abs(math.log(wh[0] / wh[1]) - aspect), -wh[0] * wh[1]))


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """The size an image of `size` is scaled to so that it covers `bucket`."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    return (max(width, math.ceil(size[0] * scale - 1e-6)), max(height, math.ceil(size[1] * scale - 1e-6)))


def center_crop_offsets(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of the centered `bucket` crop of an image of `size` after cover_size."""
    resized = cover_size(size, bucket)
    return ((resized[1] - bucket[1]) // 2, (resized[0] - bucket[0]) // 2)


def random_crop_offsets(size: tuple[int, int], bucket: tuple[int, int], generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a random `bucket` crop of an image of `size` after cover_size (left
    drawn first); computable without the image, so every process draws every crop."""
    resized = cover_size(size, bucket)
    left = int(torch.randint(0, resized[0] - bucket[0] + 1, (1,), generator=generator))
    top = int(torch.randint(0, resized[1] - bucket[1] + 1, (1,), generator=generator))
    return top, left


def prepare_image(path: Path, bucket: tuple[int, int], *, center_crop: bool, flip: bool,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Load an image, scale it to cover `bucket`, crop to it, optionally mirror it.
    Returns ([3, H, W] in [-1, 1], (crop_top, crop_left)) — SDXL conditions on the crop."""
    import numpy as np
    from PIL import Image

    width, height = bucket
    image = open_image(path)
    original = image.size
    image = image.resize(cover_size(original, bucket), Image.Resampling.LANCZOS)
    if center_crop or generator is None:
        top, left = center_crop_offsets(original, bucket)
    else:
        top, left = random_crop_offsets(original, bucket, generator)
    image = image.crop((left, top, left + width, top + height))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return (tensor.flip(-1) if flip else tensor), (top, left)


def prepare_mask(mask, size: tuple[int, int], bucket: tuple[int, int], crop: tuple[int, int], flip: bool,
                 latent_size: tuple[int, int]) -> torch.Tensor:
    """A picture's loss mask (PIL "L", the picture's `size`) as its latents see it: scaled to
    cover `bucket`, cut at the picture's crop (top, left), mirrored with it, then averaged
    over each latent cell (area interpolation to `latent_size`): [h, w] in [0, 1]. BOX
    resampling, not the picture's Lanczos, so the weights stay in [0, 1] without ringing."""
    import numpy as np
    import torch.nn.functional as F
    from PIL import Image

    width, height = bucket
    top, left = crop
    mask = mask.resize(cover_size(size, bucket), Image.Resampling.BOX).crop((left, top, left + width, top + height))
    tensor = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)
    if flip:
        tensor = tensor.flip(-1)
    return F.interpolate(tensor[None, None], size=tuple(latent_size), mode="area")[0, 0]


def epochs_done(step: int, batches_per_epoch: int, accumulation: int) -> int:
    """Epochs whose every micro-batch is in the first `step` optimizer steps:
    floor(step x accumulation / batches_per_epoch)."""
    return step * accumulation // batches_per_epoch


class BatchOrder:
    """Which examples make up micro-batch k. Each epoch: the repeat-expanded examples of
    every bucket shuffled and cut into batches (a batch never mixes buckets), then the
    batches shuffled. Pure function of (seed, k)."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.seed, self.batch_size = seed, batch_size
        groups: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(examples):
            groups.setdefault(example.bucket, []).extend([index] * example.repeats)
        self.groups = [groups[b] for b in sorted(groups)]
        self.batches_per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)
        self._epoch, self._batches = -1, []

    def batch(self, micro_step: int) -> list[int]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch * 104_729)
            batches = []
            for group in self.groups:
                order = [group[int(i)] for i in torch.randperm(len(group), generator=generator)]
                batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            self._batches = [batches[int(i)] for i in torch.randperm(len(batches), generator=generator)]
            self._epoch = epoch
        return self._batches[index]
