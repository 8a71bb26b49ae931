"""Class pictures for prior preservation (DreamBooth's regularisation): which a run uses, and
where the ones the base model draws are kept.

A run with `dataset.class_prompt` and `dataset.num_class_images` uses the dataset's own class
pictures first (its `reg/` folder, kohya's layout: pictures the person chose), then as many
pictures drawn by the base model as are still wanted. Those are kept in the workspace's own
folder, never in the dataset:

    workspace/class-images/<prompt>-<resolution>px-<key>/class_NNNNN.png (+ .txt, the prompt)
    workspace/class-images/<...>/about.json   what they were drawn with

The key hashes what a picture depends on (the base model, the prompt, the resolution, the
sampling steps and guidance), and picture i is drawn from seed CLASS_SEED + i whatever the
run's seed, so every run with the same key shares one folder: a later run reuses the
pictures, a run wanting more adds to them, and the first N never change (a resumed run
trains on what it started with). The studio draws the missing ones before the worker starts
(`prepare_class_images`); the worker only reads them (`class_pictures`)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from studio.config import TrainConfig
from studio.datasets import DatasetItem, dataset_stats, load_items
from studio.errors import StudioError
from studio.fsutil import atomic_path, atomic_write_text
from studio.jobs.run_folder import EventLog, dataset_folder, run_config, run_workspace
from studio.models import load_pipeline
from studio.models.families import family_of_pipeline
from studio.workspace import Workspace

CLASS_IMAGES_DIR = "class-images"
ABOUT_FILE = "about.json"
#: Picture i of a folder is drawn from seed CLASS_SEED + i.
CLASS_SEED = 10_000


@dataclass(frozen=True)
class ClassImagePlan:
    """The class pictures a config trains with: `own` from the dataset's reg/ folders, the
    rest (`drawn`) from `folder`, of which `present` are there already."""

    prompt: str
    wanted: int
    model: str
    resolution: int
    own: int
    folder: Path
    present: int

    @property
    def drawn(self) -> int:
        """Pictures taken from the workspace's folder."""
        return max(0, self.wanted - self.own)

    @property
    def missing(self) -> int:
        """Pictures the base model draws before the run starts."""
        return max(0, self.drawn - self.present)


def prior_preservation(config: TrainConfig) -> bool:
    return bool(config.dataset.class_prompt.strip() and config.dataset.num_class_images)


def _model_identity(base_model: str) -> str:
    """What names the model in the key: 'builtin', a model's resolved path, or its name."""
    ref = base_model.strip()
    if ref in ("", "builtin"):
        return "builtin"
    path = Path(ref).expanduser()
    return str(path.resolve()) if path.exists() else ref


def class_image_folder(config: TrainConfig, workspace: Workspace) -> Path:
    """workspace/class-images/<prompt>-<resolution>px-<key>/ for the config's class prompt."""
    ds, s = config.dataset, config.sampling
    key = json.dumps([_model_identity(config.base_model), ds.class_prompt.strip(), ds.resolution, s.steps,
                      s.guidance_scale])
    slug = re.sub(r"[^a-z0-9]+", "-", ds.class_prompt.strip().lower()).strip("-")[:40] or "class"
    return workspace.root / CLASS_IMAGES_DIR / f"{slug}-{ds.resolution}px-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def class_image_path(folder: Path, index: int) -> Path:
    return folder / f"class_{index:05d}.png"


def class_image_plan(config: TrainConfig, workspace: Workspace,
                     items: Sequence[DatasetItem] | None = None) -> ClassImagePlan | None:
    """Where `config`'s class pictures come from; None without prior preservation. The
    dataset's own are counted among `items` (what training reads, `load_items`), else
    among its files (quick: nothing decoded)."""
    if not prior_preservation(config):
        return None
    ds = config.dataset
    dataset = dataset_folder(config, workspace)
    if items is not None:
        own = sum(item.is_regularisation for item in items)
    else:
        own = dataset_stats(dataset).reg_image_count if dataset.is_dir() else 0
    folder = class_image_folder(config, workspace)
    drawn = max(0, ds.num_class_images - own)
    present = 0
    while present < drawn and class_image_path(folder, present).is_file():
        present += 1
    return ClassImagePlan(ds.class_prompt.strip(), ds.num_class_images, _model_identity(config.base_model),
                          ds.resolution, min(own, ds.num_class_images), folder, present)


def class_pictures(config: TrainConfig, workspace: Workspace) -> list[DatasetItem]:
    """Every class picture the run trains with (caption: its own, else the class prompt): the
    dataset's own first, then the drawn ones; StudioError when drawn ones are missing."""
    items = load_items(dataset_folder(config, workspace))
    plan = class_image_plan(config, workspace, items)
    if plan is None:
        return []
    if plan.missing:
        raise StudioError(f"dataset.num_class_images asks for {plan.wanted} class pictures: {plan.own} are in the "
                          f"dataset's reg/ folder and {plan.present} of the other {plan.drawn} in {plan.folder}; "
                          "start the run with `lora-studio train` or the queue, which draw the missing ones first.")
    own = [item for item in items if item.is_regularisation][:plan.wanted]
    wanted = {class_image_path(plan.folder, index) for index in range(plan.drawn)}
    drawn = [item for item in load_items(plan.folder) if item.path in wanted] if plan.drawn else []
    if len(drawn) < plan.drawn:
        raise StudioError(f"{plan.drawn - len(drawn)} class picture(s) in {plan.folder} cannot be read; delete "
                          "them and start the run again: the queue draws them anew.")
    return [replace(item, caption=item.caption or plan.prompt) for item in own + drawn]


def prepare_class_images(run_dir: Path, *, stop: Callable[[], bool] = lambda: False) -> int:
    """Draw, with the base model, the class pictures the run's config asks for that neither
    the dataset nor the workspace's folder holds yet (picture i from seed CLASS_SEED + i, at
    the sampling settings), before the worker starts: the worker only reads its inputs. Each
    picture is reported as a `phase` event (class_images, done/total, eta_s); `stop()` true
    before a picture (the run was cancelled) ends it there, the pictures drawn kept.
    Returns how many were drawn."""
    config = run_config(run_dir)
    if not prior_preservation(config):
        return 0
    workspace = run_workspace(run_dir)
    dataset = dataset_folder(config, workspace)
    plan = class_image_plan(config, workspace, load_items(dataset) if dataset.is_dir() else [])
    if plan is None or not plan.missing:
        return 0
    import time

    import torch

    events = EventLog(run_dir)
    events.emit("phase", phase="class_images", done=0, total=plan.missing, folder=str(plan.folder))
    pipe = load_pipeline(config.base_model, workspace=workspace)
    plan.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.folder / ABOUT_FILE, json.dumps(
        {"model": plan.model, "prompt": plan.prompt, "resolution": plan.resolution, "steps": config.sampling.steps,
         "guidance_scale": config.sampling.guidance_scale, "seeds": f"{CLASS_SEED} + picture number"}, indent=1))
    # the family words the call (Flux takes no negative prompt)
    call = family_of_pipeline(pipe).generation_kwargs(pipe, plan.prompt, "", config.sampling.guidance_scale,
                                                      plan.resolution, plan.resolution)
    started = time.monotonic()
    for done, index in enumerate(range(plan.present, plan.drawn), start=1):
        if stop():
            return done - 1
        generator = torch.Generator().manual_seed(CLASS_SEED + index)
        image = pipe(**call, num_inference_steps=config.sampling.steps, generator=generator).images[0]
        target = class_image_path(plan.folder, index)
        atomic_write_text(target.with_suffix(".txt"), plan.prompt)
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG")
        per_picture = (time.monotonic() - started) / done
        events.emit("phase", phase="class_images", done=done, total=plan.missing,
                    eta_s=round(per_picture * (plan.missing - done), 1))
    return plan.missing
