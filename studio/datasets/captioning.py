"""Auto-captioning: write a dataset's captions with a captioning model, never a download.

A captioning model is one of:

- ``"builtin"``: the toy-world captioner that ships with the built-in model
  (assets/builtin/captioner: `config.json` + `model.safetensors`, trained by
  toyworld/train_captioner.py). A small CNN with one classification head per attribute
  (shape colour, shape, background); the caption is its config's template filled with the
  most likely label of each head, e.g. "a purple star on a white background".
- a local **transformers image-to-text** folder (BLIP, GIT, Florence-2, ...): loaded with
  `AutoProcessor` + `AutoModelForImageTextToText`, `local_files_only=True`; greedy decoding.
- a model name pulled into the workspace (``org/name``: studio.models.hub), found offline
  in workspace/captioners, then loaded as the folder it is;
- a **WD14-style tagger** folder: one `.onnx` model + `selected_tags.csv` (columns
  `name`, `category`), run by onnxruntime (``pip install "lora-studio[tagger]"``). The
  picture is padded to a white square, resized to the model's input size, BGR, 0-255,
  NHWC (SmilingWolf's convention); the model outputs one probability per tag. General
  tags (category 0) at or above `threshold` are kept, character tags (4) at or above
  `CHARACTER_THRESHOLD`, rating tags (9) never; most probable first, "_" read as a space
  except in kaomoji such as "^_^".

Modes (`caption_dataset`): ``fill`` captions only pictures without a caption (or with an
empty one), ``overwrite`` replaces every caption, ``prepend`` / ``append`` put the new text
before / after the existing caption, leaving out tags the caption already has (so running
twice adds nothing). A multi-line caption file keeps its other lines: the first non-empty
line (what training reads) is the one changed. An optional trigger word is then put first
by `studio.datasets.caption_with_trigger`, the one trigger rule. Each caption is written
atomically as soon as its batch is done, so an interrupted run keeps what it wrote and
``fill`` carries on from there. A picture that cannot be read, one the model gives no text
for and a second picture of the same stem (one caption file for both) are reported and
left as they were.
"""
from __future__ import annotations

import abc
import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from studio import ASSETS_DIR
from studio.datasets.captions import (MAX_CAPTION_BYTES, _one_tag, _read_caption_file, caption_with_trigger, split_tags,
                                      write_caption)
from studio.datasets.images import open_image
from studio.datasets.layout import CAPTION_EXTENSION, _scan
from studio.errors import StudioError
from studio.fsutil import read_regular_bytes
from studio.models import quiet_libraries
from studio.models.hub import captioner_folder_kind, is_model_name, local_path

log = logging.getLogger(__name__)

BUILTIN_CAPTIONER = "builtin"
BUILTIN_CAPTIONER_DIR = ASSETS_DIR / "builtin" / "captioner"
MODES = ("fill", "overwrite", "prepend", "append")
#: WD14 general-tag threshold most taggers' front-ends default to (kohya, A1111's tagger).
DEFAULT_THRESHOLD = 0.35
#: Character tags need more confidence: a wrong name is worse than a missing one (kohya's default).
CHARACTER_THRESHOLD = 0.85
TAG_CATEGORIES = {"general": 0, "character": 4, "rating": 9}
#: Tags whose underscores are part of the face they draw.
KAOMOJI = frozenset({"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
                     "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"})
MAX_NEW_TOKENS = 75
DEFAULT_BATCH = 8
#: Text some image-to-text models need beside the picture to caption it (a task token);
#: the others caption from the picture alone. Keyed by the folder's config `model_type`.
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}

ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------- captioners
class Captioner(abc.ABC):
    """A loaded captioning model: `caption(images)` -> one caption per RGB picture; `name`
    says which model in reports."""

    name: str = ""

    @abc.abstractmethod
    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per picture, in order."""


def toy_network(widths: Sequence[int], heads: dict[str, Sequence[str]]):
    """The toy captioner's network: 3x3 convolutions, each with GroupNorm (4 groups) and
    ReLU (the first at stride 1, the others at stride 2), then the mean and the maximum of
    the last feature map over all places, one linear head per attribute. The maximum finds
    a small shape wherever it is; the mean carries the background. GroupNorm because
    without it the shape head stayed near chance for ~1000 steps (toyworld/train_captioner.py,
    seed 0: summed loss 1.13 at step 900 of 3000 and 98.6% shapes right at the end, against
    0.07 at step 1000 of 1500 and 100% with it). Input: RGB in [0, 1], N x 3 x H x W."""
    import torch
    from torch import nn

    class ToyCaptionNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            channels = 3
            for i, width in enumerate(widths):
                layers += [nn.Conv2d(channels, width, 3, stride=1 if i == 0 else 2, padding=1),
                           nn.GroupNorm(4, width), nn.ReLU()]
                channels = width
            self.features = nn.Sequential(*layers)
            self.heads = nn.ModuleDict({name: nn.Linear(2 * channels, len(labels)) for name, labels in heads.items()})

        def forward(self, x):
            f = self.features(x - 0.5)
            pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            return {name: head(pooled) for name, head in self.heads.items()}

    return ToyCaptionNet()


def toy_batch(images: Sequence[Image.Image], resolution: int):
    """Pictures as the toy network reads them: RGB, resized to resolution², [0, 1]."""
    import numpy as np
    import torch

    arrays = [np.asarray(im.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
                         if im.size != (resolution, resolution) else im.convert("RGB"), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0


class ToyCaptioner(Captioner):
    """The toy-world captioner (see the module docstring); `folder` holds config.json
    (`widths`, `heads` {attribute: labels}, `template`, `resolution`) and model.safetensors."""

    def __init__(self, folder: Path, name: str) -> None:
        import torch
        from safetensors.torch import load_file

        self.name = name
        self.config = json.loads((folder / "config.json").read_text())
        try:
            self.template: str = self.config["template"]
            self.resolution = int(self.config["resolution"])
            self.heads: dict[str, list[str]] = self.config["heads"]
            self.net = toy_network(self.config["widths"], self.heads)
            self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise StudioError(f"{folder} is not a usable toy captioner ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0]}); reinstall the built-in model's files.") from None
        self.net.eval()
        self._torch = torch

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, str]]:
        """The most likely label of every head, per picture."""
        with self._torch.no_grad():
            logits = self.net(toy_batch(images, self.resolution))
        picks = {name: out.argmax(dim=1).tolist() for name, out in logits.items()}
        return [{name: self.heads[name][picks[name][i]] for name in self.heads} for i in range(len(images))]

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        return [self.template.format(**labels) for labels in self.predict(images)]


class TransformersCaptioner(Captioner):
    """A local transformers image-to-text model (BLIP, GIT, Florence-2, ...), greedy decoding."""

    def __init__(self, folder: Path, prompt: str | None = None) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        quiet_libraries()
        self.name = str(folder)
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            raise StudioError(f"{folder} is not an image-to-text model transformers can load offline "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                              "give a BLIP, GIT or Florence-2 folder with its processor files.") from None
        self.model.eval()
        self.prompt = prompt if prompt is not None else TASK_PROMPTS.get(getattr(config, "model_type", ""))
        self._torch = torch

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if self.prompt:
            kwargs["text"] = [self.prompt] * len(images)
        inputs = self.processor(**kwargs)
        with self._torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        return [self._strip_prompt(t) for t in texts]

    def _strip_prompt(self, text: str) -> str:
        """Decoder-only models (GIT) and BLIP with a prompt give the prompt back first."""
        text = " ".join(text.split())
        if self.prompt and text.lower().startswith(self.prompt.lower()):
            text = text[len(self.prompt):].strip()
        return text


@dataclass(frozen=True)
class _Tag:
    name: str
    category: int


class TaggerCaptioner(Captioner):
    """A WD14-style ONNX tagger (see the module docstring)."""

    def __init__(self, folder: Path, threshold: float = DEFAULT_THRESHOLD) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise StudioError("A WD14 tagger needs onnxruntime: pip install \"lora-studio[tagger]\" "
                              "(or pip install onnxruntime), then try again.") from None
        import numpy as np

        if not 0.0 < threshold < 1.0:
            raise StudioError(f"Tag threshold {threshold} is outside (0, 1); 0.35 is the usual value.")
        self.name, self.threshold, self._np = str(folder), threshold, np
        models = sorted(folder.glob("*.onnx"))
        if len(models) != 1:
            raise StudioError(f"{folder} has {len(models)} .onnx files; a tagger folder holds exactly one "
                              "(model.onnx) beside selected_tags.csv.")
        self.tags = _read_tags(folder / "selected_tags.csv")
        try:
            self.session = onnxruntime.InferenceSession(str(models[0]), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise StudioError(f"{models[0]} is not a model onnxruntime can load ({str(exc).splitlines()[0]}); "
                              "download the tagger's model.onnx again.") from None
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        shape = first.shape
        if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise StudioError(f"{models[0]} takes input {shape}, not pictures N x H x W x 3 as WD14 taggers do.")
        self.size = int(shape[1])
        outputs = self.session.get_outputs()[0].shape
        if isinstance(outputs[-1], int) and outputs[-1] != len(self.tags):
            raise StudioError(f"{models[0]} gives {outputs[-1]} scores but selected_tags.csv names "
                              f"{len(self.tags)} tags; use the csv that came with this model.")

    def prepare(self, image: Image.Image):
        """Padded to a white square, resized to the input size (bicubic), BGR float 0-255."""
        image = image.convert("RGB")
        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        square = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return self._np.asarray(square, dtype=self._np.float32)[:, :, ::-1]

    def scores(self, images: Sequence[Image.Image]):
        batch = self._np.ascontiguousarray(self._np.stack([self.prepare(im) for im in images]))
        return self.session.run(None, {self.input_name: batch})[0]

    def caption(self, images: Sequence[Image.Image]) -> list[str]:
        general, character = TAG_CATEGORIES["general"], TAG_CATEGORIES["character"]
        captions = []
        for row in self.scores(images):
            kept = [(float(p), tag.name) for p, tag in zip(row, self.tags)
                    if (tag.category == general and p >= self.threshold)
                    or (tag.category == character and p >= CHARACTER_THRESHOLD)]
            kept.sort(key=lambda pt: -pt[0])
            captions.append(", ".join(name if name in KAOMOJI else name.replace("_", " ") for _, name in kept))
        return captions


def _read_tags(path: Path) -> list[_Tag]:
    if not path.exists():
        raise StudioError(f"{path.parent} has no selected_tags.csv; a WD14 tagger folder holds model.onnx and "
                          "the selected_tags.csv that came with it.")
    text = read_regular_bytes(path, "Tag list").decode("utf-8", errors="replace")
    rows = list(csv.DictReader(text.splitlines()))
    if not rows or "name" not in rows[0] or "category" not in rows[0]:
        raise StudioError(f"{path} has no 'name' and 'category' columns; use the tagger's own selected_tags.csv.")
    try:
        return [_Tag(row["name"], int(row["category"])) for row in rows]
    except (TypeError, ValueError):
        raise StudioError(f"{path} has a category that is not a number; use the tagger's own selected_tags.csv.") from None


def captioner_kind(model: str | os.PathLike = BUILTIN_CAPTIONER, *, workspace=None) -> tuple[str, Path]:
    """(kind, folder) of the captioning model `model` names, without loading it: kind "toy"
    ("builtin" or a folder the toy script wrote), "tagger" (a .onnx model or
    selected_tags.csv) or "transformers" (any other folder with config.json). A model name
    is looked up among those pulled into `workspace` (default: this process's)."""
    text = str(model).strip()
    if text == BUILTIN_CAPTIONER:
        if not (BUILTIN_CAPTIONER_DIR / "model.safetensors").is_file():
            raise StudioError(f"The built-in captioner is missing from {BUILTIN_CAPTIONER_DIR}; reinstall, or "
                              "run `python -m toyworld.train_captioner` in a checkout.")
        return "toy", BUILTIN_CAPTIONER_DIR
    folder = Path(text).expanduser()
    if not folder.is_dir() and is_model_name(text):
        folder = local_path(text, workspace, use="captioner")
    if not folder.is_dir():
        raise StudioError(f"Captioning model {text!r} is not a folder: use 'builtin', a local transformers "
                          "image-to-text folder (BLIP, GIT, Florence-2), a WD14 tagger folder or a model name "
                          "(org/name) pulled with `lora-studio models pull`.")
    return captioner_folder_kind(folder), folder


def load_captioner(model: str | os.PathLike = BUILTIN_CAPTIONER, *, threshold: float | None = None,
                   prompt: str | None = None, workspace=None) -> Captioner:
    """The captioning model `model` names (see `captioner_kind`). `threshold` is a tagger's
    general-tag threshold; `prompt` the text a transformers model gets beside each picture
    (default: its task token, if it needs one); either for another kind is refused."""
    kind, folder = captioner_kind(model, workspace=workspace)
    if threshold is not None and kind != "tagger":
        raise StudioError("A tag threshold applies to a WD14 tagger only; leave it out for this model.")
    if prompt is not None and kind != "transformers":
        raise StudioError("A prompt applies to a transformers image-to-text model only; leave it out for this model.")
    if kind == "tagger":
        return TaggerCaptioner(folder, DEFAULT_THRESHOLD if threshold is None else threshold)
    if kind == "toy":
        return ToyCaptioner(folder, BUILTIN_CAPTIONER if folder == BUILTIN_CAPTIONER_DIR else str(folder))
    return TransformersCaptioner(folder, prompt)


# --------------------------------------------------------------------------- the dataset
@dataclass
class CaptionReport:
    """What `caption_dataset` did: dataset-relative paths written, left alone, failed."""

    model: str
    mode: str
    written: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"Captioned with {self.model} ({self.mode}): {len(self.written)} caption file(s) written, "
                 f"{len(self.unchanged)} left as they were, {len(self.failed)} picture(s) skipped."]
        lines += [f"  skipped {rel}: {why}" for rel, why in self.failed]
        return "\n".join(lines)


def merge_caption(old: str, new: str, mode: str) -> str:
    """The caption `mode` makes from the old caption text and the model's `new` text; see
    the module docstring. Only the first non-empty line of `old` changes."""
    if mode not in MODES:
        raise StudioError(f"Unknown captioning mode {mode!r}: use one of {', '.join(MODES)}.")
    lines = old.strip().split("\n")
    at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if at is None:
        return new.strip()
    first = lines[at].strip()
    if mode == "fill":
        return old.strip()
    if mode == "overwrite":
        line = new.strip()
    else:
        have = set(split_tags(first))
        added = [tag for tag in split_tags(new) if tag not in have]
        parts = [", ".join(added), first] if mode == "prepend" else [first, ", ".join(added)]
        line = ", ".join(p for p in parts if p)
    return "\n".join(lines[:at] + [line] + lines[at + 1:]).strip()


def caption_dataset(folder: str | os.PathLike, model: str | os.PathLike | Captioner = BUILTIN_CAPTIONER, *,
                    mode: str = "fill", threshold: float | None = None, prompt: str | None = None,
                    trigger: str | None = None, include_regularisation: bool = False,
                    batch_size: int = DEFAULT_BATCH, progress: ProgressFn | None = None,
                    workspace=None) -> CaptionReport:
    """Caption the pictures of the dataset in `folder` with `model` (a name or path for
    `load_captioner`, or a loaded `Captioner`) by `mode` (fill, overwrite, prepend, append);
    `trigger` is then put first by caption_with_trigger. Regularisation pictures only with
    `include_regularisation`. `progress(done, total)` is called after every batch (and once
    with 0 before the first). A model name is found in `workspace` (see `captioner_kind`).
    Returns a `CaptionReport`."""
    if mode not in MODES:
        raise StudioError(f"Unknown captioning mode {mode!r}: use one of {', '.join(MODES)}.")
    if batch_size < 1:
        raise StudioError(f"Batch size {batch_size} is below 1; caption at least one picture at a time.")
    word = _one_tag(trigger, "trigger word") if trigger and trigger.strip() else None
    scan = _scan(folder)
    entries = [e for e in scan.images if include_regularisation or not e.subset.is_reg]
    captioner = model if isinstance(model, Captioner) else load_captioner(model, threshold=threshold, prompt=prompt,
                                                                          workspace=workspace)
    report = CaptionReport(captioner.name, mode)
    todo = []
    owners: dict[Path, str] = {}  # caption file -> the picture it is written for
    for entry in entries:
        target = entry.caption or entry.path.with_suffix(CAPTION_EXTENSION)
        if target in owners:
            report.failed.append((entry.rel, f"shares its caption file {target.name} with {owners[target]}; "
                                             "rename one of them"))
            continue
        owners[target] = entry.rel
        old = ""
        if entry.caption is not None:
            info = _read_caption_file(entry.caption)
            if info.too_big:
                report.failed.append((entry.rel, f"its caption is over {MAX_CAPTION_BYTES} bytes; shorten it"))
                continue
            old = info.text.strip()
        if mode == "fill" and old:
            report.unchanged.append(entry.rel)
            continue
        todo.append((entry, old))
    total = len(todo)
    if progress:
        progress(0, total)
    for start in range(0, total, batch_size):
        chunk, images = [], []
        for entry, old in todo[start:start + batch_size]:
            try:
                images.append(open_image(entry.path))
                chunk.append((entry, old))
            except StudioError as exc:
                report.failed.append((entry.rel, str(exc)))
        texts = captioner.caption(images) if images else []
        for (entry, old), text in zip(chunk, texts):
            if not text.strip():
                report.failed.append((entry.rel, "the model gave no caption; the caption was left as it was"))
                continue
            new = merge_caption(old, text, mode)
            if word:
                lines = new.split("\n")
                lines[0] = caption_with_trigger(lines[0], word)
                new = "\n".join(lines)
            if new == old:
                report.unchanged.append(entry.rel)
                continue
            write_caption(entry.caption or entry.path.with_suffix(CAPTION_EXTENSION), new)
            report.written.append(entry.rel)
        if progress:
            progress(min(start + batch_size, total), total)
    return report


__all__ = ["BUILTIN_CAPTIONER", "BUILTIN_CAPTIONER_DIR", "CHARACTER_THRESHOLD", "CaptionReport", "Captioner",
           "DEFAULT_THRESHOLD", "MODES", "TaggerCaptioner", "ToyCaptioner", "TransformersCaptioner",
           "caption_dataset", "captioner_kind", "load_captioner", "merge_caption", "toy_batch", "toy_network"]
