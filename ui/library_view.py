"""The Library tab's presentation and the work behind its events (metadata, bake, fuse,
resize), calling the same studio functions as the CLI. No Gradio here, and torch only inside
the functions that need it, so this is quick to import and to test without a browser."""
from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Sequence

from studio.errors import StudioError
from studio.models.families import FAMILIES
from studio.workspace import check_name
from ui.format import format_size, format_time
from ui.generate_view import _optional_number


def thumbnail_from_metadata(metadata: dict) -> Any:
    """The `modelspec.thumbnail` data URL as a PIL image, or None."""
    value = (metadata or {}).get("modelspec.thumbnail", "")
    if not value.startswith("data:image/") or "," not in value:
        return None
    try:
        from PIL import Image

        data = base64.b64decode(value.split(",", 1)[1], validate=False)
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception:  # a broken thumbnail must never break the library page
        return None


LIBRARY_HEADERS = ["Name", "Family", "Rank", "Alpha", "Trigger", "Size", "Modified"]


def _family_text(name: str | None, unknown: str) -> str:
    return FAMILIES[name].label if name in FAMILIES else (name or unknown)


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def library_row(path: Path, info: dict | None, error: str | None = None) -> list[str]:
    stat = path.stat()
    if info is None:
        return [path.stem, "?", "", "", f"unreadable: {error}" if error else "", format_size(stat.st_size),
                format_time(stat.st_mtime)]
    meta = info.get("metadata") or {}
    family = info.get("family")
    return [path.stem, _family_text(family, "?"), _numbers(info.get("ranks") or []),
            _numbers(info.get("alphas") or []), meta.get("modelspec.trigger_phrase", ""),
            format_size(stat.st_size), format_time(stat.st_mtime)]


def adapter_markdown(path: Path, info: dict) -> str:
    meta = info.get("metadata") or {}
    lines = [f"### {path.stem}"]
    modules = f"{info.get('modules', '?')}"
    if "unet_modules" in info:
        modules += f" ({info['unet_modules']} UNet, {info.get('text_encoder_modules', 0)} text encoder)"
    hash_ok = info.get("sshs_model_hash_matches")
    facts = [
        ("Family", _family_text(info.get("family"), "unknown")),
        ("Type", str(info.get("type", ""))),
        ("Rank", _numbers(info.get("ranks") or [])),
        ("Alpha", _numbers(info.get("alphas") or [])),
        ("Modules", modules),
        ("Parameters", f"{info['parameters']:,}" if info.get("parameters") else ""),
        ("Hash", "" if hash_ok is None else ("matches the data" if hash_ok else "does NOT match the data "
                                             "(the file was changed after it was written)")),
        ("Trigger", meta.get("modelspec.trigger_phrase", "")),
        ("Base model", meta.get("ss_sd_model_name", "")),
        ("Steps", meta.get("ss_steps", "")),
        ("Resolution", meta.get("modelspec.resolution", "")),
        ("Trained", meta.get("modelspec.date", "")),
        ("File", f"`{path.name}` ({format_size(path.stat().st_size)})"),
    ]
    lines += [f"- **{k}:** {v}" for k, v in facts if v]
    lines.append(f"\nUse it in a prompt as `<lora:{path.stem}:0.8>` (A1111 / Forge syntax).")
    return "\n".join(lines)


def metadata_for_display(metadata: dict) -> dict:
    """Metadata with JSON strings opened up and the (huge) thumbnail left out."""
    import json

    out = {}
    for key, value in sorted((metadata or {}).items()):
        if key == "modelspec.thumbnail":
            out[key] = f"<image, {len(value)} characters>"
            continue
        if isinstance(value, str) and value[:1] in "{[":
            try:
                out[key] = json.loads(value)
                continue
            except ValueError:
                pass
        out[key] = value
    return out


# --------------------------------------------------------------------------- library: bake, fuse, resize
PRECISION_CHOICES = ["fp16", "bf16", "fp32"]
RESIZE_RULES = [("Rank N", "rank"), ("sv-ratio: keep σ ≥ σmax / X", "sv_ratio"),
                ("sv-fro: keep share X of the Frobenius norm", "sv_fro"),
                ("sv-cumulative: keep share X of Σσ", "sv_cumulative")]
ENERGY_HEADERS = ["Module", "Energy kept"]


def library_mix(workspace, rows: Sequence[tuple[str | None, float | None]]) -> list[tuple[Path, float]]:
    """(file, weight) of the mix rows with an adapter picked; an empty weight is 1."""
    from studio.adapters.library import find_adapter

    mix = []
    for name, weight in rows:
        if not name:
            continue
        value = _optional_number(weight, f"The weight of {name!r}")
        value = 1.0 if value is None else value
        if not math.isfinite(value):
            raise StudioError(f"The weight of {name!r} is {value}; give a finite number such as 0.8 or -0.5.")
        mix.append((find_adapter(workspace, name), value))
    if not mix:
        raise StudioError("Pick at least one adapter for the mix.")
    return mix


def parse_rank(value, what: str, hint: str = "") -> int:
    number = _optional_number(value, what)
    if number is None or not math.isfinite(number) or not number.is_integer() or number < 1:
        raise StudioError(f"{what} must be a whole number of at least 1 (got {value!r}){hint}.")
    return int(number)


def new_file(folder: Path, name: str | None, what: str) -> Path:
    """folder/<name>.safetensors for a file to be written: a valid name not taken yet."""
    stem = (name or "").strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not stem:
        raise StudioError(f"Give the new {what} a name.")
    target = folder / f"{check_name(stem, what + ' name')}.safetensors"
    if target.exists():
        raise StudioError(f"{target.name} already exists in {folder}; choose another name or delete the old "
                          "file first.")
    return target


def _ranks_text(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}"


def _energy_text(energy: dict[str, float]) -> str:
    values = list(energy.values())
    return f"energy kept per module: min {min(values):.4f}, mean {sum(values) / len(values):.4f}"


def bake_mix(studio, rows: Sequence[tuple[str | None, float | None]], name: str | None, rank,
             precision: str) -> tuple[str, str]:
    """Library tab: the mix as one LoRA file in the library (exact, or rank N when `rank`
    is given); returns (the new adapter's name, Markdown note)."""
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.mixing import bake

    mix = library_mix(studio.workspace, rows)
    target = new_file(studio.workspace.adapters_dir, name, "adapter")
    exact = _optional_number(rank, "Rank") is None
    rank_n = None if exact else parse_rank(rank, "Rank", "; leave it empty for an exact bake")
    report = bake(mix, target, rank=rank_n, dtype=PRECISIONS[precision])
    sources = ", ".join(f"{path.stem} × {weight:g}" for path, weight in mix)
    text = (f"Baked **{target.stem}** from {sources}: {report.modules} modules, {_ranks_text(report.ranks)}"
            + (f"; {_energy_text(report.energy_kept)}" if report.energy_kept else " (exact)") + ".")
    return target.stem, text


def fuse_mix(studio, model: str | None, rows: Sequence[tuple[str | None, float | None]], name: str | None) -> str:
    """Library tab: the base model with the mix merged in, as a single-file checkpoint in
    workspace/models; returns a Markdown note."""
    from studio.adapters.mixing import fuse

    mix = library_mix(studio.workspace, rows)
    target = new_file(studio.workspace.models_dir, name, "checkpoint")
    path = fuse(model or "builtin", mix, target, allow_pickle=studio.allow_pickle, workspace=studio.workspace)
    sources = ", ".join(f"{source.stem} × {weight:g}" for source, weight in mix)
    return (f"Fused {sources} into {model or 'builtin'}: `models/{path.name}` ({format_size(path.stat().st_size)}). "
            "Pick it as the base model in Generate or Train.")


def resize_rule(rule: str, value) -> dict[str, float]:
    """The keyword for studio.adapters.mixing.resize from the rule picked and its value."""
    if rule not in dict((v, k) for k, v in RESIZE_RULES):
        raise StudioError(f"Unknown resize rule {rule!r}; pick one of {', '.join(v for _, v in RESIZE_RULES)}.")
    if rule == "rank":
        return {"rank": parse_rank(value, "Rank")}
    number = _optional_number(value, rule.replace("_", "-"))
    if number is None or not math.isfinite(number):
        raise StudioError(f"Give the value X for {rule.replace('_', '-')} (got {value!r}).")
    return {rule: number}


def resize_adapter(studio, source: str | None, rule: str, value, name: str | None,
                   precision: str) -> tuple[str, str, list[list]]:
    """Library tab: the adapter squeezed to a lower rank, saved in the library (default
    name `<source>-<rule><value>`); returns (the new adapter's name, Markdown note, energy
    kept per module, least kept first)."""
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.library import find_adapter
    from studio.adapters.mixing import resize

    if not source:
        raise StudioError("Pick the adapter to resize.")
    path = find_adapter(studio.workspace, source)
    keyword = resize_rule(rule, value)
    default_name = f"{path.stem}-r{keyword['rank']}" if rule == "rank" else f"{path.stem}-{rule}{keyword[rule]:g}"
    target = new_file(studio.workspace.adapters_dir, (name or "").strip() or default_name, "adapter")
    report = resize(path, target, dtype=PRECISIONS[precision], **keyword)
    energy = sorted(report.energy_kept.items(), key=lambda item: item[1])
    text = (f"Saved **{target.stem}**: {report.modules} modules, {_ranks_text(report.ranks)}; "
            f"{_energy_text(report.energy_kept)}. The table lists the modules that lost most first.")
    return target.stem, text, [[module, round(kept, 6)] for module, kept in energy]
