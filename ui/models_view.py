"""What the model fields do with a model name (the base model of the Train and Generate tabs,
the captioner of the Datasets tab): offer the names pulled and the curated ones, and pull a
name that is not in the workspace yet, its progress shown over the field. The work is
studio.models.hub's, as for `lora-studio models pull`."""
from __future__ import annotations

from typing import Callable

from studio.models import hub
from studio.workspace import Workspace


def choices(workspace: Workspace, use: hub.Use) -> list[str]:
    return hub.choices(workspace, use)


def pull_for_field(workspace: Workspace, value: str | None, use: hub.Use,
                   progress: Callable[..., object]) -> str | None:
    """Pull `value` when it names a model not pulled yet; `progress(share, desc=...)` is
    gradio's bar. Returns the field's new info line, or None when `value` names no model
    (builtin, a path). A name of another kind (a LoRA picked as a base model) is refused
    after the pull (the LoRA stays in the library)."""
    name = (value or "").strip()
    if not hub.is_model_name(name):
        return None

    def show(done: int, total: int) -> None:
        progress(done / total if total else 0.0, desc=f"Pulling {name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB")

    entry, fetched = hub.pull(name, workspace, progress=show)
    hub.local_path(name, workspace, use=use)
    return f"{'Pulled' if fetched else 'Pulled before'}: {entry.path} ({hub.KIND_LABELS[entry.kind]}); used offline."
