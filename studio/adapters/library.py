"""The adapter library: the adapters in workspace/adapters, found by name and described."""
from __future__ import annotations

from pathlib import Path

from studio.adapters.api import convert_adapter, load_adapter
from studio.adapters.formats.files import file_data_sha256, read_checked_header
from studio.adapters.formats.naming import UNET_PREFIX
from studio.errors import StudioError
from studio.fsutil import atomic_path
from studio.workspace import Workspace, check_name


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


DORA_CONVENTION = ("dora_scale is written so that ComfyUI (which divides an output-axis dora_scale by the base "
                   "weight's norm) draws what the trained peft DoRA drew; LyCORIS's own runtime divides by the "
                   "merged weight's norm and draws it slightly differently (tests/test_interop.py measures it)")


def describe_adapter(path: str | Path) -> dict:
    """Everything about an adapter file (or peft folder), after checking it fully: layout,
    family, type (lora / locon / loha / lokr, +dora), ranks, alphas, module count per prefix
    and per kind, tensor and parameter counts, whether `sshs_model_hash` matches the data,
    and the metadata."""
    path = Path(path)
    adapter = load_adapter(path)
    modules = adapter.modules
    prefixes = adapter.prefix_counts()
    kinds: dict[str, int] = {}
    for module in modules.values():
        kinds[module.kind] = kinds.get(module.kind, 0) + 1
    info = {
        "file": str(path),
        "format": adapter.source_format,
        "family": adapter.family,
        "type": adapter.adapter_type.label,
        "network": adapter.adapter_type.network,
        "dora": adapter.adapter_type.dora,
        "modules": len(modules),
        "unet_modules": prefixes.get(UNET_PREFIX, 0),
        "text_encoder_modules": sum(v for k, v in prefixes.items() if k != UNET_PREFIX),
        "prefixes": prefixes,
        "kinds": dict(sorted(kinds.items())),
        "ranks": adapter.ranks,
        "alphas": adapter.alphas,
        "conv_modules": sum(m.is_conv_kernel for m in modules.values()),
        "tensors": sum(len(list(m.parts())) for m in modules.values()),
        "parameters": sum(m.num_parameters() for m in modules.values()),
        "metadata": adapter.metadata,
    }
    if adapter.adapter_type.dora:
        info["dora_convention"] = DORA_CONVENTION
    if path.is_file() and adapter.source_format == "kohya":
        stored = adapter.metadata.get("sshs_model_hash")
        actual = file_data_sha256(path)
        info["sshs_model_hash"] = actual
        info["sshs_model_hash_matches"] = stored == actual if stored else None
    return info


def import_adapter(workspace: Workspace, source: str | Path, name: str | None = None, *,
                   overwrite: bool = False) -> Path:
    """Copy an adapter `.safetensors` file into the library as `<name>.safetensors` (default: the
    file's own name), after checking that it loads (kohya / LyCORIS, diffusers); the original is
    only read. Files in other layouts are stored in the kohya layout."""
    import shutil

    source = Path(source)
    if source.suffix.lower() != ".safetensors":
        raise StudioError(f"{source.name} is not a .safetensors file; only adapter .safetensors files can be imported.")
    adapter = load_adapter(source)  # a clear StudioError when it is not an adapter this studio can use
    stem = (name or "").strip() or source.stem
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    stem = check_name(stem, "adapter name")
    target = workspace.adapters_dir / f"{stem}.safetensors"
    if target.exists() and not overwrite:
        raise StudioError(f"An adapter named {stem!r} is already in the library; choose another name "
                          "or delete the old one first.")
    if adapter.source_format != "kohya":
        return convert_adapter(source, target, format="kohya")
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return target


def delete_adapter(workspace: Workspace, name: str) -> Path:
    """Remove `adapters/<name>.safetensors` from the library; returns the removed path."""
    target = workspace.adapters_dir / f"{check_name(name, 'adapter name')}.safetensors"
    if not target.is_file():
        raise StudioError(f"No adapter named {name!r} in {workspace.adapters_dir}.")
    target.unlink()
    return target
