"""The Train tab's presentation: the config form built from the pydantic config (every field,
its limits and help; of the network options, those of the method network.type names), and
the time/memory hint. No Gradio here, and torch only inside the functions that need it, so
this is quick to import and to test without a browser."""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from studio.config import TrainConfig
from studio.datasets import dataset_stats, infer_trigger_word, sample_prompts
from studio.jobs.runs import NATIVE_SHARE
from studio.errors import StudioError
from studio.instant import make_instant_adapter
from studio.models.families import FAMILIES
from ui.format import format_duration, humanize

#: Settings shown in the Train tab's first block; everything else goes in "All settings".
MAIN_FIELDS: tuple[tuple[str, ...], ...] = (
    ("name",), ("base_model",), ("dataset", "name"), ("dataset", "path"),
    ("training", "max_steps"), ("network", "rank"), ("network", "alpha"), ("training", "learning_rate"),
    ("dataset", "resolution"), ("dataset", "trigger_word"), ("training", "batch_size"), ("sampling", "prompts"),
    ("dataset", "class_prompt"), ("dataset", "num_class_images"),
)

SECTION_TITLES = {"": "General", "dataset": "Dataset", "network": "Network (adapter method)", "training": "Training",
                  "checkpoints": "Checkpoints", "sampling": "Sample images", "mixture": "Mixture of adapters"}


@dataclass(frozen=True)
class FieldSpec:
    """One TrainConfig field as a form input."""

    path: tuple[str, ...]
    label: str
    kind: str                   # bool | choice | int | float | text | list | lines
    info: str | None
    default: Any
    choices: tuple = ()
    optional: bool = False      # None allowed (an empty box means "default")
    minimum: float | None = None
    maximum: float | None = None
    methods: tuple[str, ...] = ()  # the section's types (network.type) whose option it is; () = every config's

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return self.path[0] if len(self.path) > 1 else ""


def _constraints(field) -> tuple[float | None, float | None]:
    low = high = None
    for item in field.metadata:
        for attr in ("ge", "gt"):
            if getattr(item, attr, None) is not None:
                low = getattr(item, attr)
        for attr in ("le", "lt"):
            if getattr(item, attr, None) is not None:
                high = getattr(item, attr)
    return low, high


def _spec(path: tuple[str, ...], field) -> FieldSpec:
    from pydantic_core import PydanticUndefined

    annotation = field.annotation
    optional = False
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0] if len(args) == 1 else str
        origin = typing.get_origin(annotation)
    choices: tuple = ()
    if origin is typing.Literal:
        kind, choices = "choice", typing.get_args(annotation)
    elif origin is list:
        kind = "lines" if path == ("sampling", "prompts") else "list"
    elif annotation is bool:
        kind = "bool"
    elif annotation is int:
        kind = "int"
    elif annotation is float:
        kind = "float"
    else:
        kind = "text"
    if field.default_factory is not None:
        default = field.default_factory()
    else:
        default = None if field.default is PydanticUndefined else field.default
    low, high = _constraints(field)
    info = field.description
    if optional:
        info = (info + " " if info else "") + "Leave empty for the default."
    if kind == "list":
        info = (info + " " if info else "") + "Comma-separated."
    return FieldSpec(path, humanize(path[-1]), kind, info, default, choices, optional, low, high)


def _models_by_type(annotation) -> dict[str, type] | None:
    """{type: model} of a section that is one of several models chosen by their `type`
    field (network: one per method), or None."""
    from pydantic import BaseModel

    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return None
    members = [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
               for a in typing.get_args(annotation)]
    if not all(isinstance(m, type) and issubclass(m, BaseModel) and "type" in m.model_fields for m in members):
        return None
    return {m.model_fields["type"].default: m for m in members}


def config_fields(exclude: Iterable[tuple[str, ...]] = ()) -> list[FieldSpec]:
    """Every settable TrainConfig field (sections flattened), in declaration order. A section
    chosen by its type (network) gives its `type` as a choice (help: the section's
    description) and each option of its models once, with the types that take it."""
    from pydantic import BaseModel

    skip = set(exclude)
    specs: list[FieldSpec] = []

    def walk(model: type[BaseModel], prefix: tuple[str, ...]) -> None:
        for name, field in model.model_fields.items():
            path = (*prefix, name)
            annotation = field.annotation
            by_type = _models_by_type(annotation)
            if by_type:
                walk_types(by_type, path, field)
            elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, path)
            elif path not in skip:
                specs.append(_spec(path, field))

    def walk_types(by_type: dict[str, type[BaseModel]], prefix: tuple[str, ...], field) -> None:
        if (*prefix, "type") not in skip:
            specs.append(FieldSpec((*prefix, "type"), humanize("type"), "choice", field.description,
                                   field.get_default(call_default_factory=True).type, tuple(by_type)))
        options, kinds = {}, {}  # option name -> its field, the types that take it
        for kind, model in by_type.items():
            for name, option in model.model_fields.items():
                if name != "type":
                    options.setdefault(name, option)
                    kinds.setdefault(name, []).append(kind)
        for name, option in options.items():
            if (*prefix, name) not in skip:
                methods = () if len(kinds[name]) == len(by_type) else tuple(kinds[name])
                specs.append(replace(_spec((*prefix, name), option), methods=methods))

    walk(TrainConfig, ())
    return specs


def shown(spec: FieldSpec, network_type: str | None) -> bool:
    """Whether the form shows `spec` (and its config holds it) while network.type is `network_type`."""
    return not spec.methods or network_type in spec.methods


def network_type(specs: Sequence[FieldSpec], values: Sequence[Any]) -> str | None:
    """The network.type the form's values choose."""
    return next((value for spec, value in zip(specs, values) if spec.path == ("network", "type")), None)


def to_form_value(spec: FieldSpec, value: Any) -> Any:
    if value is None:
        return None if spec.kind not in ("text", "list", "lines") else ""
    if spec.kind == "list":
        return ", ".join(value)
    if spec.kind == "lines":
        return "\n".join(value)
    return value


def from_form_value(spec: FieldSpec, value: Any) -> Any:
    """A form value as the config wants it; bad input is left for pydantic to name."""
    if spec.kind == "bool":
        return bool(value)
    if spec.kind in ("int", "float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, (int, float)) and spec.kind == "int" and float(value).is_integer():
            return int(value)
        return value
    if spec.kind == "list":
        return [part.strip() for part in str(value or "").split(",") if part.strip()]
    if spec.kind == "lines":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    if spec.kind == "choice":
        return value
    text = str(value or "").strip()
    return None if spec.optional and not text else text


def form_to_config_dict(specs: Sequence[FieldSpec], values: Sequence[Any]) -> dict:
    """Nested config dict from form values (empty optional numbers are left out, and so are the
    options of the methods the chosen network.type is not: their inputs keep what was typed)."""
    data: dict = {}
    chosen = network_type(specs, values)
    for spec, raw in zip(specs, values, strict=True):
        value = from_form_value(spec, raw)
        if (value is None and spec.optional) or not shown(spec, chosen):
            continue
        node = data
        for part in spec.path[:-1]:
            node = node.setdefault(part, {})
        node[spec.path[-1]] = value
    return data


def config_to_form(specs: Sequence[FieldSpec], config) -> list[Any]:
    """Form values for a TrainConfig, in the order of `specs` (an option its network's method
    does not take: that option's default)."""
    out = []
    for spec in specs:
        node: Any = config
        for part in spec.path:
            node = getattr(node, part, spec.default)
        out.append(to_form_value(spec, node))
    return out


# --------------------------------------------------------------------------- training hint
def resource_hint(*, family: str | None, builtin: bool, steps: int, batch_size: int, resolution: int,
                  grad_accum: int = 1, gradient_checkpointing: bool = False, mixed_precision: str = "no",
                  speed=None, plan=None, steps_per_epoch: int | None = None, sample_prompts: int = 0,
                  processes: int = 1, gpu: bool = True) -> str:
    """A time/memory estimate for a training run, as Markdown. The time comes from `plan`
    (studio.jobs.speed.Estimate at the measured `speed`); without one the built-in model's speed
    is being measured, and a full-size model's is not known on this machine until one of its
    runs has trained here: with a GPU (`gpu`) a rough planning figure for a recent 24 GB card
    stands in, without one the hint says it is not measured yet. Memory is the GPU's (VRAM)
    with a GPU, the computer's (RAM, fp32 weights) without: the family's
    ResourceGuide.training_memory_gb (studio.models.families.family). With several processes (data
    parallel) a step trains `processes` times the pictures; memory is per GPU."""
    lines: list[str] = []
    work = max(1, batch_size) * max(1, grad_accum)
    pixels = resolution * resolution * work
    if plan is not None:
        parts = [f"training {format_duration(plan.training_s)}"]
        if plan.setup_s is not None:
            parts.insert(0, f"loading {format_duration(plan.setup_s)}")
        if plan.samples_s:
            parts.append(f"{plan.sample_pictures} sample picture(s) {format_duration(plan.samples_s)}")
        if plan.class_images_s:
            parts.append(f"class pictures {format_duration(plan.class_images_s)}")
        lines.append(f"**Time:** about {format_duration(plan.total_s)} for {steps} steps on this machine "
                     f"({', '.join(parts)}), from {speed.source} ({speed.steps_per_s:.2f} steps/s).")
    elif builtin:
        lines.append("**Time:** this machine's speed is not measured yet (a few training steps of these "
                     "settings, timed when the dataset can train; *Check settings* says what stops it).")
    if builtin:
        lines.append("**Memory:** the built-in model is tiny — well under 1 GB of RAM, no GPU needed.")
    elif family in FAMILIES:
        guide = FAMILIES[family].resources
        scale = pixels / (guide.resolution ** 2)
        memory_gb = guide.training_memory_gb(pixels, gpu=gpu, full_precision=mixed_precision == "no",
                                             gradient_checkpointing=gradient_checkpointing)
        if plan is None and gpu:
            lines.append(f"**Time:** roughly {format_duration(steps / (guide.it_s / scale))} for {steps} steps on "
                         "a recent 24 GB GPU (a planning figure; your first run measures this machine).")
        elif plan is None:
            lines.append("**Time:** not measured on this machine yet: this model's first run here measures it "
                         "(the Runs tab shows its speed as it goes, and this box quotes it after). There is no "
                         "GPU here, and a full-size model trains on the CPU at many seconds per step.")
        memory = "VRAM" if gpu else "RAM"
        precision = ", fp32" if mixed_precision == "no" or not gpu else f", {mixed_precision}"
        lines.append(f"**{memory}:** roughly {memory_gb:.{1 if memory_gb < 10 else 0}f} GiB "
                     f"({FAMILIES[family].label}, {resolution} px, batch {work}"
                     + (", gradient checkpointing" if gradient_checkpointing else "") + f"{precision}; "
                     + ("a planning figure, not measured)." if gpu else "its weights and a step's working memory, "
                                                                    "as measured with SD 1.5)."))
        if gpu and not gradient_checkpointing and memory_gb > 12:
            lines.append("Short of memory? Turn on *Gradient checkpointing* and mixed precision in All settings.")
        native = FAMILIES[family].default_resolution
        if resolution < NATIVE_SHARE * native:
            lines.append(f"**Resolution:** {resolution} px is far below {FAMILIES[family].label}'s native {native} "
                         "px: the model draws poorly that small, and so will the adapter.")
    else:
        lines.append("Pick a base model to see an estimate.")
    if processes > 1:
        lines.append(f"**Processes:** {processes}, data parallel (one per GPU; gloo processes on a CPU): each step "
                     f"trains {processes} × {work} pictures" + (", and the memory above is per GPU" if not builtin
                                                                 else "") + ". The time was measured with one process.")
    if steps_per_epoch:
        epochs = steps * work * processes / steps_per_epoch
        lines.append(f"**Dataset:** {steps_per_epoch} images per epoch (repeats counted) → "
                     f"{steps} steps ≈ {epochs:.1f} epochs.")
    if sample_prompts and plan is not None:
        lines.append(f"**Samples:** {sample_prompts} prompt(s), {plan.sample_pictures} picture(s) in all.")
    lines.append("<small>The Runs tab shows the real speed as the run goes.</small>")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------- the form follows the dataset
def automatic_values(config: TrainConfig) -> dict:
    """What the page put in the fields that follow the dataset (trigger word, sample
    prompts) and the class prompt it came with, for `config` (a preset, a restored run):
    a field still holding it follows the next dataset picked."""
    return {"trigger": config.dataset.trigger_word.strip(), "prompts": "\n".join(config.sampling.prompts).strip(),
            "class_prompt": config.dataset.class_prompt.strip()}


@dataclass(frozen=True)
class DatasetFollow:
    """What picking a dataset changes in the Train tab's form (None: leave the field)."""

    trigger: str | None
    trigger_info: str
    prompts: str | None
    prior: bool | None
    auto: dict


def follow_dataset(folder: Path, auto: dict, *, trigger: str | None, prompts: str | None,
                   class_prompt: str | None) -> DatasetFollow:
    """The trigger word the dataset's captions use (studio.datasets.infer_trigger_word) and
    sample prompts from its captions, for the fields that still hold what the page put there
    (`auto`); prior preservation on with the class prompt that came with the page's values
    only when the dataset has class pictures of its own (that prompt was written for the
    dataset the values came with: the preset's demo)."""
    word = infer_trigger_word(folder)
    lines = "\n".join(sample_prompts(folder, word))
    follows = lambda value, key: (value or "").strip() == (auto or {}).get(key, "")  # noqa: E731
    info = (f"From the captions of {folder.name!r} (the word they use for the subject)." if word else
            f"The captions of {folder.name!r} share no such word: type the one they use for the subject.")
    prior = None
    if follows(class_prompt, "class_prompt"):
        prior = bool(class_prompt and class_prompt.strip()) and dataset_stats(folder).reg_image_count > 0
    new_auto = {**(auto or {}), "trigger": word, "prompts": lines}
    return DatasetFollow(word if follows(trigger, "trigger") else None, info,
                         lines if follows(prompts, "prompts") else None, prior, new_auto)


def class_pictures_note(plan, *, on: bool, class_prompt: str, model: str, seconds: float | None,
                        root: Path) -> str:
    """The Train tab's line on prior preservation (`plan`: studio.jobs.class_images'): off,
    or how many class pictures of which prompt, where they come from (the dataset's own
    reg/ folder; the workspace's folder of pictures `model` draws, never the dataset), and
    how many are drawn before training starts, and how long that takes (`seconds`)."""
    if not on:
        text = ("**Prior preservation is off.** Class pictures keep the base model's idea of the class (e.g. "
                "*a photo of a cat*) while the adapter learns your subject.")
        if class_prompt.strip():
            text += f" Before you tick it, check that *{class_prompt.strip()}* says what your subject is."
        return text
    if plan is None:
        return "**Prior preservation:** write a class prompt and how many class pictures, or untick it."
    sources = []
    if plan.own:
        sources.append(f"{plan.own} from the dataset's own `reg/` folder")
    if plan.drawn:
        where = plan.folder.relative_to(root).as_posix() if plan.folder.is_relative_to(root) else str(plan.folder)
        drawn = f"{plan.drawn} drawn by {model} into `{where}/` (the workspace's, not the dataset)"
        if not plan.missing:
            drawn += ": all there already, from an earlier run"
        else:
            took = f"about {format_duration(seconds)}" if seconds is not None else "time not measured yet"
            drawn += (f": {plan.present} there already, {plan.missing} to draw" if plan.present
                      else f": {plan.missing} to draw") + f" before training starts ({took})"
        sources.append(drawn)
    return (f"**Prior preservation is on:** {plan.wanted} class picture(s) of *{plan.prompt}* at "
            f"{plan.resolution} px — " + "; ".join(sources) + ".")
def instant_adapter(workspace, dataset_name: str | None, model: str, description: str, name: str | None,
                    trigger: str | None):
    """The Train tab's instant adapter: from the description, or (none written) from the
    dataset's pictures, named `<adapter name>-instant`, for the form's trigger word."""
    pictures = None
    if not (description or "").strip():
        if not dataset_name or not workspace.dataset_dir(dataset_name).is_dir():
            raise StudioError("Pick a dataset with pictures of the concept, or write a description.")
        pictures = workspace.dataset_dir(dataset_name)
    return make_instant_adapter(workspace, f"{(name or '').strip() or 'adapter'}-instant", pictures=pictures,
                                description=description if pictures is None else None, model=model,
                                trigger=(trigger or "").strip() or None)
