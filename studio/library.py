"""The adapter library: the adapters in workspace/adapters, found by name and described."""
from __future__ import annotations

from pathlib import Path

from studio.adapters import TEXT_ENCODER_PREFIX, UNET_PREFIX, load_adapter, read_checked_header
from studio.errors import StudioError
from studio.workspace import Workspace

_FAMILIES = {"sd_v1": "sd15", "sdxl_base_v1-0": "sdxl"}


def list_adapters(workspace: Workspace) -> list[Path]:
    return sorted(workspace.adapters_dir.glob("*.safetensors"))


def find_adapter(workspace: Workspace, name: str) -> Path:
    """An adapter by file stem or `ss_output_name` (A1111's rule for `<lora:name:w>`)."""
    candidates = list_adapters(workspace)
    for path in candidates:
        if path.stem == name:
            return path
    for path in candidates:
        try:
            meta = read_checked_header(path)[1]
        except StudioError:
            continue
        if meta.get("ss_output_name") == name:
            return path
    known = ", ".join(p.stem for p in candidates[:10]) or "none yet"
    raise StudioError(f"No adapter named {name!r} in {workspace.adapters_dir} (known: {known}).")


def describe_adapter(path: str | Path) -> dict:
    """Family, type, ranks, alphas, module count and metadata of an adapter file."""
    path = Path(path)
    adapter = load_adapter(path)
    metadata = adapter.metadata
    prefixes = sorted({name.split("_", 2)[0] + "_" + name.split("_", 2)[1] for name in adapter.modules})
    family = _FAMILIES.get(metadata.get("ss_base_model_version", ""))
    if family is None:
        family = "sdxl" if any("input_blocks" in n or n.startswith("lora_te2_") for n in adapter.modules) else "sd15"
    return {
        "file": str(path),
        "family": family,
        "type": "lora",
        "modules": len(adapter.modules),
        "unet_modules": sum(n.startswith(UNET_PREFIX + "_") for n in adapter.modules),
        "text_encoder_modules": sum(n.startswith(TEXT_ENCODER_PREFIX) for n in adapter.modules),
        "ranks": adapter.ranks,
        "alphas": adapter.alphas,
        "prefixes": prefixes,
        "metadata": metadata,
    }


def import_adapter(workspace: Workspace, source: str | Path, name: str | None = None, *,
                   overwrite: bool = False) -> Path:
    """Copy a LoRA `.safetensors` file into the library as `<name>.safetensors` (default: the
    file's own name), after checking that it loads as a kohya LoRA; the original is only read."""
    import shutil

    from studio.fsutil import atomic_path
    from studio.workspace import check_name

    source = Path(source)
    if source.suffix.lower() != ".safetensors":
        raise StudioError(f"{source.name} is not a .safetensors file; only LoRA .safetensors files can be imported.")
    load_adapter(source)  # a clear StudioError when it is not a LoRA this studio can use
    stem = (name or "").strip() or source.stem
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    stem = check_name(stem, "adapter name")
    target = workspace.adapters_dir / f"{stem}.safetensors"
    if target.exists() and not overwrite:
        raise StudioError(f"An adapter named {stem!r} is already in the library; choose another name "
                          "or delete the old one first.")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def delete_adapter(workspace: Workspace, name: str) -> Path:
    """Remove `adapters/<name>.safetensors` from the library; returns the removed path."""
    from studio.workspace import check_name

    target = workspace.adapters_dir / f"{check_name(name, 'adapter name')}.safetensors"
    if not target.is_file():
        raise StudioError(f"No adapter named {name!r} in {workspace.adapters_dir}.")
    target.unlink()
    return target
