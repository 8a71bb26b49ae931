"""The Generate tab's presentation and the work behind its events (adapter rows, mixes, grids,
suggestions), calling the same studio functions as the CLI. No Gradio here, and torch only
inside the functions that need it, so this is quick to import and to test without a browser."""
from __future__ import annotations

import datetime
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from studio.datasets import caption_with_trigger
from studio.errors import StudioError
from studio.generation.engine import (MAX_BATCH_COUNT, MAX_GUIDANCE, MAX_SEED, MAX_STEPS, AdapterUse, GenerateRequest,
                                      parse_prompt_loras, save_new_png, save_png)
from studio.generation.grid import Axis, xy_grid
from studio.jobs.runs import run_config
from studio.models import resolve_model
from studio.models.families import DEFAULT, Family, get_family
from studio.workspace import check_name

SIZE_DEFAULT = "Model default"
SIZE_CHOICES = [SIZE_DEFAULT, "64 × 64", "128 × 128", "256 × 256", "512 × 512", "512 × 768", "768 × 512",
                "768 × 768", "1024 × 1024", "832 × 1216", "1216 × 832"]


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """`512 × 768` (or `512x768`) -> (512, 768); the default choice or empty -> (None, None)."""
    if not text or text == SIZE_DEFAULT:
        return None, None
    cleaned = text.replace("×", "x").replace("X", "x").replace(" ", "")
    try:
        width, height = (int(v) for v in cleaned.split("x"))
    except ValueError:
        raise StudioError(f"Size {text!r} is not WIDTH x HEIGHT; write e.g. 512 x 768.") from None
    return width, height


class AdapterRow(NamedTuple):
    """One adapter row of the Generate tab as the page sends it: library name, weight,
    text-encoder weight (empty = the weight), LoRA Block Weights (a preset or values;
    empty = every block 1) and, for T-LoRA files, whether the timestep mask is on."""

    name: str | None
    weight: float | None = 1.0
    te_weight: float | str | None = None
    block_weights: str | None = None
    tlora_masked: bool = True


def _optional_number(value, what: str) -> float | None:
    """A number from a form field; None when it is empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise StudioError(f"{what} {value!r} is not a number; write e.g. 0.8, or leave the box empty.") from None


def row_uses(rows: Sequence[Sequence], resolve: Callable[[str], Path], *,
             keep_rows: Iterable[int] = ()) -> dict[int, Any]:
    """Row index -> AdapterUse for the rows with an adapter. Rows whose weights are all 0
    are left out, except those in `keep_rows` (a grid axis sets their weight)."""
    keep = set(keep_rows)
    uses = {}
    for index, values in enumerate(rows):
        row = AdapterRow(*values)
        if not row.name:
            continue
        weight = _optional_number(row.weight, f"Adapter {index + 1}: the weight")
        weight = 1.0 if weight is None else weight
        te_weight = _optional_number(row.te_weight, f"Adapter {index + 1}: the text-encoder weight")
        if weight == 0 and te_weight in (None, 0) and index not in keep:
            continue
        uses[index] = AdapterUse(resolve(row.name), weight, te_weight=te_weight,
                                 block_weights=(row.block_weights or "").strip() or None,
                                 tlora_masked=bool(row.tlora_masked))
    return uses


def merge_uses(*groups: Sequence) -> list:
    """Adapters from the rows and from `<lora:...>` tags; each file at most once."""
    merged, seen = [], {}
    for group in groups:
        for use in group:
            key = Path(use.path).resolve()
            if key in seen:
                raise StudioError(f"Adapter {use.path.stem!r} is used twice (in the adapter rows and/or a "
                                  "<lora:...> tag in the prompt); keep one and set its weight there.")
            seen[key] = use
            merged.append(use)
    return merged


_REQUIRED = object()


def _plain(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:g}"


class FormProblems:
    """What is wrong with a form's fields, collected so that one message names them all,
    each by the label the page shows."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def number(self, value, label: str, low: float | None = None, high: float | None = None, *,
               whole: bool = False, empty: Any = _REQUIRED) -> Any:
        """`value` as a finite number within [low, high] (an int when `whole`); an empty field
        gives `empty`. A bad value is noted, and None (or `empty`) returned."""
        fallback = None if empty is _REQUIRED else empty
        if value is None or (isinstance(value, str) and not value.strip()):
            if empty is _REQUIRED:
                self.problems.append(f"{label}: empty; give a number")
            return fallback
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            self.problems.append(f"{label}: {value!r} is not a number")
            return fallback
        in_range = (low is None or number >= low) and (high is None or number <= high)
        if math.isfinite(number) and in_range and (number.is_integer() or not whole):
            return int(number) if whole else number
        wanted = "a whole number" if whole else "a finite number"
        if low is not None and high is not None:
            wanted += f" from {_plain(low)} to {_plain(high)}"
        self.problems.append(f"{label}: {value!r} is not {wanted}")
        return fallback

    def raise_if_any(self) -> None:
        if self.problems:
            fix = "Fix it" if len(self.problems) == 1 else f"Fix these {len(self.problems)} fields"
            raise StudioError(f"{'; '.join(self.problems)}. {fix} and try again.")


def parse_seed(value, problems: FormProblems | None = None) -> int | None:
    """The seed field: a whole number >= 0, or -1 (or empty) for a random one."""
    own = problems or FormProblems()
    number = own.number(value, "Seed", -1, MAX_SEED, whole=True, empty=-1)
    if problems is None:
        own.raise_if_any()
    if number is None:
        return None
    return random.randrange(2**31) if number < 0 else number


def model_family(studio, model: str) -> Family | None:
    """The family of the picked base model, None while it cannot be resolved (a name being
    typed, a model not pulled yet: generating says why)."""
    try:
        return get_family(resolve_model(model or "builtin", workspace=studio.workspace).family)
    except StudioError:
        return None


def sampler_choices(family: Family) -> list[tuple[str, str]]:
    """The family's samplers as the Sampler field lists them, (label, name), default first."""
    return [(sampler.label, name) for name, sampler in family.samplers.items()]


def block_weight_choices(family: Family) -> tuple[list[str], str]:
    """The Block weights field's choices (empty, the family's LBW presets) and its help."""
    blocks = family.blocks
    return ["", *blocks.presets], (f"A preset, or {len(blocks.names)} values ({family.label}: "
                                   f"{blocks.names[0]}, {blocks.names[1]}, ...) or {len(blocks.full)}; empty = all 1")


@dataclass(frozen=True)
class GenerateSettings:
    """The Generate tab's fields other than the adapter rows, as the page sends them."""

    prompt: str
    negative: str = ""
    model: str = "builtin"
    scheduler: str | None = None  # None: the model's family's default sampler
    size: str = SIZE_DEFAULT
    steps: float = 20
    cfg: float = 5.0
    seed: Any = -1
    count: float = 1


def mix_request(studio, settings: GenerateSettings, rows: Sequence[Sequence], *,
                weight_axis_rows: Iterable[int] = ()) -> tuple[Any, dict[int, int]]:
    """The GenerateRequest of the fields, the rows and the prompt's `<lora:...>` tags, and
    the position in its adapter list of each row's adapter."""
    from studio.adapters.library import find_adapter

    if not (settings.prompt or "").strip():
        raise StudioError("Write a prompt first.")
    problems = FormProblems()
    steps = problems.number(settings.steps, "Steps", 1, MAX_STEPS, whole=True)
    cfg = problems.number(settings.cfg, "CFG scale", 0, MAX_GUIDANCE)
    count = problems.number(settings.count, "Images", 1, MAX_BATCH_COUNT, whole=True)
    seed = parse_seed(settings.seed, problems)
    for index, values in enumerate(rows):
        row = AdapterRow(*values)
        if row.name:
            problems.number(row.weight, f"Adapter {index + 1} · Weight", empty=1.0)
            problems.number(row.te_weight, f"Adapter {index + 1} · Text-encoder weight", empty=None)
    problems.raise_if_any()
    resolve = lambda name: find_adapter(studio.workspace, name)  # noqa: E731
    prompt, tagged = parse_prompt_loras(settings.prompt, resolve)
    by_row = row_uses(rows, resolve, keep_rows=weight_axis_rows)
    width, height = parse_size(settings.size)
    request = GenerateRequest(prompt=prompt, model=settings.model or "builtin",
                              negative_prompt=settings.negative or "", adapters=merge_uses(by_row.values(), tagged),
                              seed=seed, steps=steps, guidance_scale=cfg, width=width, height=height,
                              scheduler=settings.scheduler or None, batch_count=count)
    request.validate()
    return request, {row: position for position, row in enumerate(by_row)}


def _outputs_folder(studio) -> tuple[Path, datetime.datetime]:
    now = datetime.datetime.now()
    return studio.outputs_dir / now.strftime("%Y-%m-%d"), now


def generate_images(studio, settings: GenerateSettings, rows: Sequence[Sequence]) -> tuple[list, str]:
    """Generate tab: the images, saved in workspace/outputs/<day>/ with their A1111
    `parameters`; returns (gallery items, Markdown note)."""
    request, _ = mix_request(studio, settings, rows)
    images = studio.engine().generate(request)
    folder, now = _outputs_folder(studio)
    gallery, saved = [], []
    for index, image in enumerate(images):
        seed_used = request.seed + index
        path = save_new_png(image, folder, f"{now.strftime('%H%M%S')}-{seed_used}")
        gallery.append((str(path), f"seed {seed_used}"))
        saved.append(path)
    params = images[0].info.get("parameters", "")
    where = saved[0].parent.relative_to(studio.workspace.root).as_posix()
    text = (f"Saved {len(saved)} image(s) in `{where}/` — "
            f"{', '.join(f'`{p.name}`' for p in saved)}\n\n```\n{params}\n```")
    return gallery, text


GRID_NO_AXIS = ""
_GRID_VALUE_HINTS = {"weight": "numbers separated by commas, e.g. 0, 0.5, 1",
                     "seed": "whole numbers separated by commas, e.g. 1, 2, 3",
                     "prompt": "prompts separated by |, e.g. a red star | a blue star"}


def grid_axis_choices(adapter_rows: int, *, optional: bool = False) -> list[tuple[str, str]]:
    """(label, value) of the axes a mix grid can vary: each row's adapter weight, seed, prompt."""
    choices = [(f"Adapter {i + 1} weight", f"adapter{i}") for i in range(adapter_rows)]
    choices += [("Seed", "seed"), ("Prompt", "prompt")]
    return [("(none)", GRID_NO_AXIS), *choices] if optional else choices


def _axis_row(choice: str) -> int | None:
    return int(choice[len("adapter"):]) if choice.startswith("adapter") else None


def grid_axis(choice: str, values: str, row_positions: dict[int, int], which: str):
    """A studio.generation.grid.Axis from an axis choice and its values text; None for no axis."""
    if not choice:
        return None
    row = _axis_row(choice)
    kind = "weight" if row is not None else choice
    if kind not in _GRID_VALUE_HINTS:
        raise StudioError(f"{which} axis {choice!r} is not one the grid knows; pick an adapter weight, Seed or Prompt.")
    text = (values or "").strip()
    if row is not None:
        if row not in row_positions:
            raise StudioError(f"The {which} axis is the weight of adapter {row + 1}, but row {row + 1} has no "
                              "adapter; pick one there first.")
        choice = f"adapter{row_positions[row]}"
    try:
        axis = Axis.parse(f"{choice}={text}")
    except StudioError:
        raise StudioError(f"{which} values {text!r}: write {_GRID_VALUE_HINTS[kind]}.") from None
    if not axis.values:
        raise StudioError(f"{which} values {text!r}: write {_GRID_VALUE_HINTS[kind]}.")
    return axis


def mix_grid(studio, settings: GenerateSettings, rows: Sequence[Sequence], x_choice: str, x_values: str,
             y_choice: str = GRID_NO_AXIS, y_values: str = "") -> tuple[str, list, int, str]:
    """Generate tab's mix grid: an X/Y plot of the mix (studio.generation.grid), the labelled sheet and
    every single image saved in workspace/outputs/<day>/ as the CLI's `grid` names them;
    returns (sheet path, gallery items row by row, the grid's columns, Markdown note)."""
    if not x_choice:
        raise StudioError("Pick what the X axis varies.")
    if x_choice == y_choice:
        raise StudioError("The X and Y axes are the same; pick another Y axis, or (none).")
    axis_rows = [row for row in (_axis_row(x_choice), _axis_row(y_choice or "")) if row is not None]
    request, positions = mix_request(studio, replace(settings, count=1), rows, weight_axis_rows=axis_rows)
    x = grid_axis(x_choice, x_values, positions, "X")
    y = grid_axis(y_choice, y_values, positions, "Y")
    sheet, cells = xy_grid(studio.engine(), request, x, y)
    folder, now = _outputs_folder(studio)
    sheet_path = save_new_png(sheet, folder, f"grid-{now.strftime('%H%M%S')}")
    gallery = []
    for j, row in enumerate(cells):
        for i, image in enumerate(row):
            path = save_png(image, sheet_path.with_name(f"{sheet_path.stem}-{j}-{i}.png"))
            label = x.label(x.values[i], request) + (f" · {y.label(y.values[j], request)}" if y else "")
            gallery.append((str(path), label))
    where = sheet_path.parent.relative_to(studio.workspace.root).as_posix()
    text = (f"Saved the grid as `{where}/{sheet_path.name}` and its {len(gallery)} single image(s) beside it "
            f"(`{sheet_path.stem}-ROW-COLUMN.png`).")
    return str(sheet_path), gallery, len(x.values), text


SUGGESTION_HEADERS = ["Adapter", "Weight", "Why"]


def suggest_adapters(studio, prompt: str, model: str, *, top: int = 3) -> list[list]:
    """Generate tab: [adapter, weight, why] proposed by studio.generation.suggest for the prompt;
    adapters its `<lora:...>` tags already use are not proposed again."""
    from studio.adapters.library import find_adapter, list_adapters
    from studio.generation.suggest import suggest

    clean_prompt, tagged = parse_prompt_loras(prompt or "", lambda name: find_adapter(studio.workspace, name))
    used = {Path(use.path).resolve() for use in tagged}
    candidates = [path for path in list_adapters(studio.workspace) if path.resolve() not in used]
    found = suggest(studio.engine(), clean_prompt, candidates, model=model or "builtin", top=top)
    return [[s.path.stem, s.weight, s.reason] for s in found]


def accept_suggestions(suggested: Sequence[Sequence], rows: int) -> tuple[list[str], list[float], list[str]]:
    """The adapter rows holding exactly the suggested mix: each suggestion at its weight, in
    order from row 1, the other rows emptied (weight 1), so Generate draws what was proposed.
    Returns (names, weights, the suggested adapters beyond the last row)."""
    proposals = [row for row in suggested or [] if row and row[0]]
    if not proposals:
        raise StudioError("Nothing to accept: press 'Suggest adapters for the prompt' first.")
    names = [str(row[0]) for row in proposals[:rows]] + [""] * max(0, rows - len(proposals))
    weights = [float(row[1]) for row in proposals[:rows]] + [1.0] * max(0, rows - len(proposals))
    return names, weights, [str(row[0]) for row in proposals[rows:]]


@dataclass(frozen=True)
class AdapterContext:
    """What Generate needs to draw with an adapter as it was trained: the base model it was
    trained on and a prompt that calls it (its trigger word); None where unknown."""

    model: str | None
    prompt: str | None


def adapter_context(workspace, name: str) -> AdapterContext:
    """From the adapter's run (its `lora_studio_run_id`): the run's base model, when it still
    resolves here, and its first sample prompt, with the trigger word by the training rule
    (caption_with_trigger); from the file alone (an imported adapter): its trigger phrase."""
    from studio.adapters import read_checked_header
    from studio.adapters.library import find_adapter

    metadata = read_checked_header(find_adapter(workspace, name))[1]
    trigger = metadata.get("modelspec.trigger_phrase", "").split(",")[0].strip()
    model, prompt = None, trigger or None
    run_id = metadata.get("lora_studio_run_id")
    try:
        config = run_config(workspace.run_dir(run_id)) if run_id else None
    except StudioError:  # the run folder was deleted: the file's own word
        config = None
    if config is not None:
        trigger = config.dataset.trigger_word.strip() or trigger
        first = next(iter(config.sampling.prompts), "") or trigger
        prompt = caption_with_trigger(first, trigger) if first else None
        try:
            resolve_model(config.base_model, workspace=workspace)
            model = config.base_model or "builtin"
        except StudioError:
            model = None
    return AdapterContext(model, prompt)


def is_tlora_adapter(workspace, name: str | None) -> bool:
    """Whether the library adapter `name` is a native T-LoRA file (False when unknown)."""
    from studio.adapters import read_checked_header
    from studio.adapters.library import find_adapter
    from studio.adapters.methods.tlora_layers import is_tlora_metadata

    if not name:
        return False
    try:
        return is_tlora_metadata(read_checked_header(find_adapter(workspace, name))[1])
    except StudioError:
        return False


def gate_headers(family: str | None = None) -> list[str]:
    """The gate table's columns: the member, then the family's blocks (BASE = text encoders)."""
    return ["Member", *(get_family(family) if family else DEFAULT).blocks.full]


def mixture_names(workspace) -> list[str]:
    """The library's mixture files, by name."""
    from studio.adapters.library import list_adapters
    from studio.adapters.mixtures.file import is_mixture

    return [path.stem for path in list_adapters(workspace) if is_mixture(path)]


def fuse_suggestions(studio, suggested: Sequence[Sequence], name: str | None) -> str:
    """Generate tab, AutoLoRA-style: the suggested adapters fused as one mixture in the
    library (a gate per member and block, each starting at the suggestion's weight);
    returns its library name."""
    from studio.adapters.library import find_adapter
    from studio.adapters.mixtures.file import new_mixture, save_mixture

    proposals = [row for row in suggested or [] if row and row[0]]
    if len(proposals) < 2:
        raise StudioError("Fusing needs two or more suggested adapters; press 'Suggest adapters for the prompt' "
                          "with a prompt that names several, or pick the adapters in the rows.")
    stem = check_name((name or "").strip() or "mix-" + "-".join(str(row[0]) for row in proposals), "mixture name")
    target = studio.workspace.adapters_dir / f"{stem}.safetensors"
    if target.exists():
        raise StudioError(f"The library already has {stem!r}; give the mixture another name.")
    mixture = new_mixture([find_adapter(studio.workspace, str(row[0])) for row in proposals], "block",
                          weights=[float(row[1]) for row in proposals])
    save_mixture(target, mixture)
    return stem


def mixture_gates(studio, name: str, prompt: str = "", model: str = "builtin") -> tuple[list[str], list[list]]:
    """Generate tab's gate table, (columns, rows): one row per member (per member and
    timestep band for a banded mixture): its name, then its gate in each block of its family
    (gate_headers; BASE = text encoders); prompt gates as the prompt sets them."""
    from studio.adapters.library import find_adapter

    mixture = studio.engine().mixture(find_adapter(studio.workspace, name))
    return gate_headers(mixture.family), _gate_rows(studio, mixture, name, prompt, model)


def _gate_rows(studio, mixture, name: str, prompt: str, model: str) -> list[list]:
    import torch

    from studio.adapters.library import find_adapter
    from studio.adapters.mixtures.gates import Gates, prompt_embedding

    members = [m.name for m in mixture.members]
    if mixture.gate == "arrow":
        raise StudioError(f"{name} routes each token by its own input (arrow): it has no gates per block to show.")
    if mixture.gate == "block":
        return [[member, *map(_gate, row)] for member, row in zip(members, mixture.tensors["gate.block"].tolist())]
    if mixture.gate == "block_timestep":
        base, bands = mixture.tensors["gate.base"].tolist(), mixture.tensors["gate.bands"]
        width = mixture.timesteps / mixture.bands
        return [[f"{member} · t {b * width:.0f}-{(b + 1) * width:.0f}", _gate(base[k]), *map(_gate, bands[k, b].tolist())]
                for k, member in enumerate(members) for b in range(mixture.bands)]
    clean, _ = parse_prompt_loras(prompt or "", lambda n: find_adapter(studio.workspace, n))
    if not clean.strip():
        raise StudioError(f"{name} sets its gates from the prompt; write the prompt first.")
    pipe = studio.engine().set_mix(model or "builtin", [])
    with torch.no_grad():
        gates = Gates(mixture)(torch.zeros(1), prompt_embedding(pipe.tokenizer, pipe.text_encoder, [clean]))[0]
    return [[member, *map(_gate, row)] for member, row in zip(members, gates.tolist())]


def _gate(value: float) -> float:
    return round(float(value), 3)


def save_mixture_gates(studio, name: str, rows: Sequence[Sequence]) -> str:
    """Write the edited gate table back into a mixture with fixed gates (per block, or per
    block and band); prompt gates are computed, not set. Returns a note."""
    import torch

    from studio.adapters.library import find_adapter
    from studio.adapters.mixtures.file import load_mixture, save_mixture

    path = find_adapter(studio.workspace, name)
    mixture = load_mixture(path)
    if mixture.gate not in ("block", "block_timestep"):
        raise StudioError(f"{name}'s gates are computed ({mixture.gate}); only fixed gates (block, block_timestep) "
                          "can be set here.")
    blocks = get_family(mixture.family).blocks.full
    values = []
    for index, row in enumerate(rows or []):
        cells = list(row)[1:]
        if len(cells) != len(blocks):
            raise StudioError(f"Gate row {index + 1} has {len(cells)} values; it needs {len(blocks)}.")
        values.append([_optional_number(v, f"Gate row {index + 1}, {block}:") or 0.0
                       for v, block in zip(cells, blocks)])
    table = torch.tensor(values, dtype=torch.float32)
    k = len(mixture.members)
    if not torch.isfinite(table).all():
        raise StudioError("Every gate must be a finite number.")
    if mixture.gate == "block":
        if table.shape[0] != k:
            raise StudioError(f"The table has {table.shape[0]} rows; {name} has {k} members.")
        mixture.tensors["gate.block"] = table
    else:
        if table.shape[0] != k * mixture.bands:
            raise StudioError(f"The table has {table.shape[0]} rows; {name} has {k} members x {mixture.bands} bands.")
        table = table.reshape(k, mixture.bands, len(blocks))
        if not torch.equal(table[:, :, 0], table[:, :1, 0].expand(-1, mixture.bands)):
            raise StudioError("BASE (the text encoders) runs once per picture: give each member the same BASE in "
                              "every band.")
        mixture.tensors["gate.base"], mixture.tensors["gate.bands"] = table[:, 0, 0].clone(), table[:, :, 1:].clone()
    save_mixture(path, mixture)
    return f"Saved the gates of `{name}`; the next picture uses them."


def gate_heatmap(rows: Sequence[Sequence]):
    """The gate table as a small picture: a cell per member (row) and block (column), white
    at 0, blue to 1, dark blue at 2 and above, red below 0."""
    import numpy as np
    from PIL import Image

    values = np.array([[float(v) for v in list(row)[1:]] for row in rows or []], dtype=np.float32)
    if values.size == 0:
        raise StudioError("No gates to show; pick a mixture.")
    cell = 12
    up = np.clip(values, 0, 2) / 2
    down = np.clip(-values, 0, 1)
    white = np.ones((*values.shape, 3), dtype=np.float32)
    rgb = white - up[..., None] * np.array([0.9, 0.75, 0.2]) - down[..., None] * np.array([0.0, 0.8, 0.8])
    pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8).repeat(cell, 0).repeat(cell, 1)
    return Image.fromarray(pixels)
