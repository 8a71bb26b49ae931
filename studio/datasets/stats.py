"""Listing a workspace's datasets and their statistics (pictures, repeats, tags; the
sd-scripts `ss_*` metadata a trained adapter carries)."""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from studio.datasets.captions import _caption_for_stats, _training_caption
from studio.datasets.items import DatasetItem
from studio.datasets.layout import _is_hidden, _scan, _sorted_dirs
from studio.workspace import Workspace


def list_datasets(workspace: Workspace) -> list[str]:
    """Names of the datasets in a workspace, sorted case-insensitively."""
    folder = workspace.datasets_dir
    if not folder.is_dir():
        return []
    return sorted((e.name for e in _sorted_dirs(folder) if e.is_dir() and not _is_hidden(e.name)),
                  key=lambda n: (n.casefold(), n))


@dataclass(frozen=True)
class SubsetStats:
    folder: str               # relative to the dataset, posix ("" = top level)
    key: str                  # kohya dir name
    repeats: int
    image_count: int
    is_regularisation: bool


@dataclass(frozen=True)
class DatasetStats:
    folder: Path
    subsets: tuple[SubsetStats, ...]
    image_count: int              # training images (not regularisation)
    reg_image_count: int
    steps_per_epoch: int          # sum(images * repeats) over training subsets, at batch size 1
    ss_dataset_dirs: dict[str, dict[str, int]]
    ss_reg_dataset_dirs: dict[str, dict[str, int]]
    ss_tag_frequency: dict[str, dict[str, int]]

    @property
    def samples_per_epoch(self) -> int:
        """kohya pairs every training sample with a regularisation one when reg images exist."""
        return self.steps_per_epoch * (2 if self.reg_image_count else 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "image_count": self.image_count,
            "reg_image_count": self.reg_image_count,
            "steps_per_epoch": self.steps_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "subsets": [dataclasses.asdict(s) for s in self.subsets],
            "ss_dataset_dirs": self.ss_dataset_dirs,
            "ss_reg_dataset_dirs": self.ss_reg_dataset_dirs,
            "ss_tag_frequency": self.ss_tag_frequency,
        }


def dataset_stats(folder: str | os.PathLike, items: Sequence[DatasetItem] | None = None) -> DatasetStats:
    """Image counts and repeats per subfolder, and the kohya `ss_dataset_dirs`,
    `ss_reg_dataset_dirs` and `ss_tag_frequency` metadata. Without `items` every image file
    is counted (fast, nothing decoded); pass `load_items(folder)` to count what trains.
    Tag frequency follows kohya: tags lower-cased, every occurrence counted."""
    scan = _scan(folder)
    counts: Counter[Path] = Counter()
    captions: dict[Path, list[str]] = {}
    if items is None:
        for entry in scan.images:
            key = entry.subset.path.resolve()
            counts[key] += 1
            captions.setdefault(key, []).append(_training_caption(_caption_for_stats(entry)))
    else:
        for item in items:
            key = item.path.parent.resolve()
            counts[key] += 1
            captions.setdefault(key, []).append(item.caption)
    subsets: list[SubsetStats] = []
    dirs: dict[str, dict[str, int]] = {}
    reg_dirs: dict[str, dict[str, int]] = {}
    tag_freq: dict[str, dict[str, int]] = {}
    for subset in scan.subsets:
        where = subset.path.resolve()
        n = counts.get(where, 0)
        if subset.rel == "" and n == 0:
            continue
        subsets.append(SubsetStats(subset.rel, subset.key, subset.repeats, n, subset.is_reg))
        if n == 0:
            continue
        (reg_dirs if subset.is_reg else dirs)[subset.key] = {"n_repeats": subset.repeats, "img_count": n}
        freq = tag_freq.setdefault(subset.key, {})
        for caption in captions.get(where, []):
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    freq[tag] = freq.get(tag, 0) + 1
    train = [s for s in subsets if not s.is_regularisation]
    return DatasetStats(
        folder=scan.folder,
        subsets=tuple(subsets),
        image_count=sum(s.image_count for s in train),
        reg_image_count=sum(s.image_count for s in subsets if s.is_regularisation),
        steps_per_epoch=sum(s.image_count * s.repeats for s in train),
        ss_dataset_dirs=dirs,
        ss_reg_dataset_dirs=reg_dirs,
        ss_tag_frequency=tag_freq,
    )
