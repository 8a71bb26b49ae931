"""The default data a mixture's gates learn from: the members' own training pictures and
captions, found through each member's metadata (`lora_studio_run_id` -> its run folder's
config -> its dataset) in the workspace that trained it."""
from __future__ import annotations

import shutil
from pathlib import Path

from studio.adapters.formats.files import read_checked_header
from studio.adapters.library import find_adapter
from studio.config import load_config
from studio.datasets import caption_with_trigger, training_items
from studio.errors import StudioError
from studio.fsutil import atomic_write_text
from studio.jobs.run_folder import CONFIG_FILE, dataset_folder


def members_dataset(config, workspace) -> Path:
    """datasets/<name>-members, rewritten: one kohya subset `N_<member>` per member (N its
    pictures' repeats), each picture with the caption its run trained on (the run's
    instance prompt for an uncaptioned one, its trigger word put in by
    `caption_with_trigger`). Regularisation pictures are left out: the members are frozen,
    there is no prior for the gates to keep."""
    target = workspace.dataset_dir(f"{config.name}-members")
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    for name in config.mixture.members:
        path = find_adapter(workspace, name)
        run_id = read_checked_header(path)[1].get("lora_studio_run_id", "")
        run_config = workspace.runs_dir / run_id / CONFIG_FILE if run_id else None
        if run_config is None or not run_config.is_file():
            shutil.rmtree(building, ignore_errors=True)
            raise StudioError(f"Member {name!r} was not trained in this workspace, so its pictures are unknown; set "
                              "dataset.name or dataset.path to the pictures the gates should learn from.")
        member = load_config(run_config)
        items, _ = training_items(dataset_folder(member, workspace))
        for index, item in enumerate(i for i in items if not i.is_regularisation):
            subset = building / f"{item.repeats}_{name}"
            subset.mkdir(exist_ok=True)
            stem = f"{index:05d}"
            shutil.copyfile(item.path, subset / f"{stem}{item.path.suffix.lower()}")
            caption = caption_with_trigger(item.caption.strip() or member.dataset.instance_prompt.strip(),
                                           member.dataset.trigger_word.strip())
            atomic_write_text(subset / f"{stem}.txt", caption + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target
