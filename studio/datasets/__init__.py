"""Datasets: a folder of pictures with captions in kohya's layout, and what the studio does
with one. The code lives in modules; this package offers their public names.

    layout.py     the folder layout (repeats, regularisation, captions and masks beside the
                  pictures) and the scan that reads it
    images.py     the one image loader (`open_image`, `ImageLoadError`)
    masks.py      loss masks (`mask_path`, `open_mask`)
    captions.py   reading and writing captions, bulk edits, the trigger-word rule
    checks.py     the bad-file report (`check_dataset`)
    items.py      what training reads (`training_items`, `load_items`)
    stats.py      the workspace's datasets and their statistics (`dataset_stats`)
    importing.py  import from folders, zips and uploads (`import_dataset`)
    captioning.py auto-captioning (imported on its own: it loads the captioners)
"""
from __future__ import annotations

from studio.datasets.images import DEFAULT_MAX_PIXELS, ImageLoadError, open_image
from studio.datasets.layout import CAPTION_EXTENSION, IMAGE_EXTENSIONS, MASK_SUFFIX, MAX_REPEATS, REG_FOLDER
from studio.datasets.masks import mask_path, open_mask
from studio.datasets.captions import (MAX_CAPTION_BYTES, add_prefix, add_suffix, add_trigger_word, caption_path,
                                      caption_with_trigger, find_replace, read_caption, remove_tag, split_tags,
                                      tag_frequency, write_caption)
from studio.datasets.checks import DatasetReport, HUGE_CAPTION_CHARS, ISSUE_SEVERITY, Issue, check_dataset
from studio.datasets.items import DatasetItem, load_items, training_items
from studio.datasets.stats import DatasetStats, SubsetStats, dataset_stats, list_datasets
from studio.datasets.importing import ImportMode, ImportReport, Skipped, ZipLimits, import_dataset

__all__ = [
    "CAPTION_EXTENSION", "DEFAULT_MAX_PIXELS", "HUGE_CAPTION_CHARS", "IMAGE_EXTENSIONS", "ISSUE_SEVERITY",
    "MASK_SUFFIX", "MAX_CAPTION_BYTES", "MAX_REPEATS", "REG_FOLDER", "add_prefix", "add_suffix", "add_trigger_word",
    "caption_path", "caption_with_trigger", "check_dataset", "dataset_stats", "DatasetItem", "DatasetReport",
    "DatasetStats", "find_replace", "ImageLoadError", "import_dataset", "ImportMode", "ImportReport", "Issue",
    "list_datasets", "load_items", "mask_path", "open_image", "open_mask", "read_caption", "remove_tag", "Skipped",
    "split_tags", "SubsetStats", "tag_frequency", "training_items", "write_caption", "ZipLimits",
]
