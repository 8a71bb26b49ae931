"""Adapter files on disk: kohya / LyCORIS (default), diffusers and peft layouts, metadata
and A1111's hashes.

- kohya / LyCORIS: one .safetensors, `<kohya name>.<part>` tensors (see modules.py), real
  alpha, `ss_*` / `modelspec.*` metadata, `sshs_model_hash` (sha256 of the bytes after the
  header: A1111's "addnet" hash) and `sshs_legacy_hash` (sd-scripts: first 8 hex of sha256 of
  64 KiB at 1 MiB of the file serialised with only the `ss_*` metadata).
- diffusers: one .safetensors, `unet.<path>.lora_A.weight` / `lora_B.weight` (also read:
  `.lora.down.weight` / `.lora.up.weight`, `lora_magnitude_vector`), the peft config per
  model in the `lora_adapter_metadata` header entry (as diffusers' save_lora_weights writes it).
- peft: a folder with `<model>/adapter_model.safetensors` (`base_model.model.<path>...`) and
  `<model>/adapter_config.json` per adapted model (unet, text_encoder, text_encoder_2); a
  single adapter_model.safetensors with its adapter_config.json beside it is read as well.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import torch

from studio.errors import StudioError
from studio.models.families import (BUILTIN_MODELS, DEFAULT, family_from_diffusers_keys, family_from_metadata,
                                    family_from_prefixes, family_from_unet_names, get_family, part_attrs)
from studio.adapters.formats.header_keys import FORMAT_KEY, MIXTURE_KEY
from studio.adapters.formats.embeddings import bundled_tensors, parse_bundled, split_bundled
from studio.adapters.formats.modules import LOHA, LOKR, LORA, AdapterModule, dora_scale_from_magnitude, \
    magnitude_from_dora_scale, parse_module
from studio.adapters.formats.naming import (ALL_PREFIXES, Target, clip_kohya_path, describe_names, name_table,
                                   path_to_name, split_name)
from studio.adapters.formats.peft_bridge import (AdapterType, _lokr_config, _loha_config, _lora_config, check_fit,
                                                 module_from_peft, modules_from_models, plans_for)
from studio.fsutil import atomic_write_bytes, open_regular
from studio import ASSETS_DIR
from studio.models.skeletons import skeleton_dir
from studio.safetensors_file import read_safetensors_header, refuse_pickle, sniff_format

if TYPE_CHECKING:
    from studio.adapters.methods.base import Method, NativeFileMethod

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "peft")
PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"


@dataclass
class AdapterFile:
    """An adapter in memory: modules keyed by kohya name, header metadata, the base-model
    family (a studio.models.families name), the layout it was read from, and the
    textual-inversion embeddings bundled with it (name -> one [vectors, width] tensor per
    text encoder; kohya layout only, see embeddings.py)."""

    modules: dict[str, AdapterModule]
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None
    source_format: str = "kohya"
    embeddings: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if m.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.effective_alpha for m in self.modules.values() if m.effective_alpha is not None})

    @property
    def adapter_type(self) -> AdapterType:
        return AdapterType.of_modules(self.modules)

    def prefix_counts(self) -> dict[str, int]:
        return describe_names(self.modules)


def export_adapter(models: Mapping[str, torch.nn.Module], *, family: str = DEFAULT.name, adapter_name: str = "default",
                   metadata: Mapping[str, str] | None = None,
                   initial_factors: Mapping[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                   ) -> AdapterFile:
    """The peft adapter `adapter_name` on `models` ({"unet": ..., "text_encoder": ...,
    "text_encoder_2": ...}) as an AdapterFile in kohya names, whatever its peft type (LoRA,
    LoCon, DoRA, rsLoRA, LoHa, LoKr); rank and alpha come from the layers. After a PiSSA /
    OLoRA init, `initial_factors` (see `modules_from_models`) makes it the equivalent plain
    LoRA on the unmodified base model."""
    modules = modules_from_models(family, models, adapter_name, initial_factors)
    return AdapterFile(modules, dict(metadata or {}), family, "peft")


# --------------------------------------------------------------------------------------
# hashes
# --------------------------------------------------------------------------------------


def data_sha256(file_bytes: bytes) -> str:
    """A1111's `sshs_model_hash`: sha256 of the bytes after the 8-byte length and the JSON
    header, i.e. of the tensor data only (independent of the metadata)."""
    header_len = struct.unpack("<Q", file_bytes[:8])[0]
    return hashlib.sha256(file_bytes[8 + header_len:]).hexdigest()


def legacy_hash(file_bytes: bytes) -> str:
    """A1111's old short hash: first 8 hex of sha256 of 64 KiB at offset 1 MiB."""
    return hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]


def file_data_sha256(path: str | Path) -> str:
    """`data_sha256` of a file on disk, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_len = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + header_len)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_legacy_model_hash(path: str | Path) -> str:
    """A1111's old checkpoint hash (`ss_sd_model_hash`): sha256 of 64 KiB at 1 MiB, 8 hex."""
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        return hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]


def sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) the way sd-scripts precomputes them: the file
    serialised with only its `ss_*` metadata."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    return data_sha256(data), legacy_hash(data)


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def read_checked_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """The tensor table and metadata of an adapter file; a pickle (whatever its name), a
    truncated or a corrupt file raises a StudioError that says so."""
    path = Path(path)
    if not path.exists():
        raise StudioError(f"Adapter file {path} not found.")
    fmt = sniff_format(path)
    if fmt in ("pickle", "zip-pickle"):
        raise refuse_pickle(path, fmt)
    if fmt == "gguf":
        raise StudioError(f"{path.name} is a GGUF file, not a safetensors adapter; use the .safetensors version "
                          "of this LoRA.")
    if fmt != "safetensors":
        with open_regular(path) as handle:
            head = handle.read(9)
        if len(head) == 9 and head[8:9] == b"{":  # a safetensors header of an impossible size: say so
            read_safetensors_header(path)
        raise StudioError(f"{path.name} is not a valid safetensors file: its header cannot be read (the file is "
                          "damaged, or is some other kind of file renamed to .safetensors). Download the LoRA "
                          "again, or export it as .safetensors from the tool that made it.")
    return read_safetensors_header(path)


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    header, metadata = read_checked_header(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # the header checked out, so this is damaged data
        raise StudioError(f"{path} could not be read as safetensors ({exc}). Download it again.") from None
    if not tensors:
        raise StudioError(f"{path.name} holds no tensors; it is not an adapter.")
    return tensors, metadata


def load_adapter(path: str | Path, methods: Iterable[Method] = ()) -> AdapterFile:
    """Read an adapter file or folder in any supported layout (kohya / LyCORIS, diffusers,
    peft), checking every tensor; a clear StudioError names anything that does not fit.
    `methods` (studio.adapters.load_adapter passes every one; the formats import none) read
    their own layouts (T-LoRA's, named by the header's FORMAT_KEY) and say why a file of
    another tool they recognise cannot be read (`foreign_file`)."""
    path = Path(path)
    if path.is_dir():
        return _load_peft_folder(path)
    tensors, metadata = _read_tensors(path)
    if MIXTURE_KEY in metadata:
        raise StudioError(f"{path.name} is a mixture of adapters, not one adapter: generate with it, or write it as "
                          "one LoRA with `lora-studio bake` where its gates allow.")
    native = _native_method(methods, metadata.get(FORMAT_KEY))
    if native is not None:
        return _from_native(native, path, metadata)
    bundled = split_bundled(tensors)
    if bundled and not tensors:
        raise StudioError(f"{path.name} holds only bundled embeddings, no adapter.")
    keys = list(tensors)
    parts = {k.split(".", 1)[1] for k in keys if "." in k}
    for method in methods:  # another tool's file of a method (LyCORIS's lycoris_ T-LoRA): say so first
        why = method.foreign_file(path.name, parts)
        if why:
            raise StudioError(why)
    if all(k.split(".", 1)[0].startswith(tuple(p + "_" for p in ALL_PREFIXES)) for k in keys):
        adapter = _from_kohya(tensors, metadata, path.name)
        adapter.embeddings = parse_bundled(bundled, get_family(adapter.family), path.name)
        return adapter
    if bundled:
        raise StudioError(f"{path.name} bundles embeddings (bundle_emb.*) beside tensors that are not in the kohya "
                          "layout; only kohya adapter files bundle embeddings.")
    if all(k.startswith(tuple(f"{attr}." for attr in part_attrs())) for k in keys):
        return _from_diffusers(tensors, metadata, path.name)
    if all(k.startswith("base_model.model.") for k in keys):
        config_path = path.with_name(PEFT_CONFIG)
        if not config_path.is_file():
            raise StudioError(f"{path.name} is a peft adapter but there is no {PEFT_CONFIG} beside it; "
                              "peft needs both files.")
        return _from_peft({_guess_attr(tensors, path.parent.name): (tensors, _read_json(config_path))},
                          metadata, path.name)
    kohya = [k for k in keys if k.split(".", 1)[0].startswith(tuple(p + "_" for p in ALL_PREFIXES))]
    if kohya:
        other = [k for k in keys if k not in kohya]
        raise StudioError(f"{path.name}: {len(other)} of {len(keys)} tensors are not kohya adapter tensors, "
                          f"e.g. {', '.join(other[:3])}.")
    if any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")) for k in keys):
        raise StudioError(f"{path.name} is a base-model checkpoint, not an adapter; use it as the base model.")
    raise StudioError(f"{path.name} is not an adapter in a known layout (kohya/LyCORIS, diffusers or peft): "
                      f"its tensors are named like {', '.join(sorted(keys)[:3])}.")


def _native_method(methods: Iterable[Method], file_format: str | None) -> NativeFileMethod | None:
    """The one of `methods` whose own layout a header's FORMAT_KEY names, if any."""
    if file_format is None:
        return None
    return next((m for m in methods if getattr(m, "native_format", None) == file_format), None)


def _from_native(method: NativeFileMethod, path: Path, metadata: dict[str, str]) -> AdapterFile:
    """A file in a method's own layout (T-LoRA) as its plain modules: what other tools can
    load (the engine attaches the native file itself, see studio.adapters.methods)."""
    family = (family_from_metadata(metadata, path.name) or DEFAULT).name
    return AdapterFile(method.plain_modules(path, family), metadata, family, method.native_format)


def _from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> AdapterFile:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, sep, part = key.partition(".")
        if not sep:
            raise StudioError(f"{source}: tensor {key!r} has no part name (expected e.g. {key}.lora_down.weight).")
        groups.setdefault(name, {})[part] = tensor
    modules = {name: parse_module(name, parts, source) for name, parts in groups.items()}
    prefixes = {split_name(n)[0] for n in modules}
    # the text-encoder prefixes tell the family; else the metadata; else the UNet's naming
    from_metadata = family_from_metadata(metadata, source)
    family = family_from_prefixes(prefixes, source) or from_metadata or family_from_unet_names(list(modules))
    return AdapterFile(modules, metadata, family.name, "kohya")


_DIFFUSERS_KEY = re.compile(
    rf"^({'|'.join(part_attrs())})\.(.+?)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|lora_magnitude_vector(?:\.weight)?|alpha)$")


def _diffusers_family(attrs: set[str], paths: list[str], metadata: Mapping[str, str], source: str) -> str:
    from_metadata = family_from_metadata(metadata, source)
    return (family_from_diffusers_keys(attrs, paths) or from_metadata or DEFAULT).name


def _from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> AdapterFile:
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        key = re.sub(r"\.processor\.(to_q|to_k|to_v)_lora\.", r".\1.lora.", key)
        key = re.sub(r"\.processor\.to_out_lora\.", ".to_out.0.lora.", key)
        match = _DIFFUSERS_KEY.match(key)
        if match is None:
            raise StudioError(f"{source}: tensor {key!r} is not a diffusers LoRA tensor (lora_A / lora_B); "
                              "LoHa / LoKr have no diffusers LoRA layout here, use the kohya or peft layout.")
        attr, path, part = match.groups()
        part = {"lora.down.weight": "lora_A", "lora.up.weight": "lora_B", "lora_linear_layer.down.weight": "lora_A",
                "lora_linear_layer.up.weight": "lora_B", "lora_A.weight": "lora_A", "lora_B.weight": "lora_B",
                "lora_magnitude_vector.weight": "magnitude", "lora_magnitude_vector": "magnitude"}.get(part, part)
        groups.setdefault((attr, path), {})[part] = tensor
    family = _diffusers_family({a for a, _ in groups}, [p for _, p in groups], metadata, source)
    peft_meta = {}
    if DIFFUSERS_METADATA_KEY in metadata:
        try:
            peft_meta = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except ValueError:
            raise StudioError(f"{source}: its {DIFFUSERS_METADATA_KEY} header entry is not JSON.") from None
    modules = {}
    for (attr, path), parts in groups.items():
        what = f"{source}: {attr}.{path}"
        if "lora_A" not in parts or "lora_B" not in parts:
            raise StudioError(f"{what} lacks lora_A or lora_B.")
        config = {k.split(".", 1)[1]: v for k, v in peft_meta.items() if k.startswith(attr + ".")}
        r = int(parts["lora_A"].shape[0])
        if config:
            r_conf = _pattern_value(config, "rank_pattern", path, config.get("r", r))
            alpha = _pattern_value(config, "alpha_pattern", path, config.get("lora_alpha", r_conf))
            r = int(r_conf)
            rslora = bool(config.get("use_rslora", False))
        else:
            alpha = float(parts["alpha"].reshape(()).item()) if "alpha" in parts else float(r)
            rslora = False
        for part, tensor in parts.items():
            if not torch.isfinite(tensor.float()).all():
                raise StudioError(f"{what}.{part} contains NaN or infinite values; the file is broken.")
        module = _module_from_peft_state(LORA, {"lora_A": parts["lora_A"], "lora_B": parts["lora_B"]}, r, alpha,
                                         rslora, parts.get("magnitude"), what)
        modules[path_to_name(family, attr, path)] = module
    return AdapterFile(modules, metadata, family, "diffusers")


def _pattern_value(config: Mapping[str, Any], pattern_key: str, path: str, default):
    from peft.utils.other import get_pattern_key

    pattern = config.get(pattern_key) or {}
    key = get_pattern_key(list(pattern), path)
    return pattern.get(key, default)


def _module_from_peft_state(kind, tensors, r, alpha, rslora, magnitude, what) -> AdapterModule:
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise StudioError(f"{what}.{name} is not a finite floating-point tensor; the file is broken.")
    if kind == LORA and tensors["lora_A"].shape[0] != (tensors["lora_B"].shape[1]):
        raise StudioError(f"{what}: the ranks of lora_A {tuple(tensors['lora_A'].shape)} and lora_B "
                          f"{tuple(tensors['lora_B'].shape)} differ.")
    module = module_from_peft(kind, tensors, r=int(r), alpha=float(alpha), use_rslora=rslora, magnitude=magnitude)
    parse_module("x", dict(module.parts()), what)  # the same structural checks as kohya files
    return module


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudioError(f"{path} is not a readable JSON file ({exc}).") from None


def _guess_attr(tensors: Mapping[str, Any], folder_name: str) -> str:
    if folder_name in part_attrs():
        return folder_name
    if any("text_model." in k or ".encoder.layers." in k for k in tensors):
        return "text_encoder"
    return "unet"


def _load_peft_folder(folder: Path) -> AdapterFile:
    parts: dict[str, tuple[dict, dict]] = {}
    metadata: dict[str, str] = {}
    candidates = [folder / attr for attr in part_attrs()] + [folder]
    for sub in candidates:
        weights, config = sub / PEFT_WEIGHTS, sub / PEFT_CONFIG
        if weights.is_file() and config.is_file():
            tensors, meta = _read_tensors(weights)
            metadata.update(meta)
            attr = sub.name if sub != folder else _guess_attr(tensors, "")
            parts[attr] = (tensors, _read_json(config))
    if not parts:
        raise StudioError(f"{folder} is a folder without {PEFT_WEIGHTS} + {PEFT_CONFIG} (a peft adapter); "
                          "pass an adapter .safetensors file or a peft adapter folder.")
    return _from_peft(parts, metadata, folder.name)


_PEFT_TYPES = {"LORA": LORA, "LOHA": LOHA, "LOKR": LOKR}


def _from_peft(parts: Mapping[str, tuple[dict, dict]], metadata: dict[str, str], source: str) -> AdapterFile:
    family = _diffusers_family(set(parts), [k for t, _ in parts.values() for k in t], metadata, source)
    modules: dict[str, AdapterModule] = {}
    for attr, (tensors, config) in parts.items():
        kind = _PEFT_TYPES.get(str(config.get("peft_type", "")).upper())
        if kind is None:
            raise StudioError(f"{source}: peft_type {config.get('peft_type')!r} is not LORA, LOHA or LOKR.")
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            rest = key.removeprefix("base_model.model.")
            match = re.match(r"^(.+?)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?|"
                             r"hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?|lokr_t2)$", rest)
            if match is None:
                raise StudioError(f"{source}: tensor {key!r} is not a {kind} adapter tensor peft writes.")
            path, part = match.groups()
            part = part.replace(".weight", "")
            groups.setdefault(path, {})[part.replace("lora_magnitude_vector", "magnitude")] = tensor
        default_alpha = config.get("lora_alpha", config.get("alpha", config.get("r", 8)))
        for path, group in groups.items():
            r = _pattern_value(config, "rank_pattern", path, config.get("r", 8))
            alpha = _pattern_value(config, "alpha_pattern", path, default_alpha)
            magnitude = group.pop("magnitude", None)
            what = f"{source}: {attr}.{path}"
            if kind == LORA and not {"lora_A", "lora_B"} <= set(group):
                raise StudioError(f"{what} lacks lora_A or lora_B.")
            module = _module_from_peft_state(kind, group, r, alpha, bool(config.get("use_rslora", False)),
                                             magnitude, what)
            modules[path_to_name(family, attr, path)] = module
    return AdapterFile(modules, metadata, family, "peft")


# --------------------------------------------------------------------------------------
# reference architectures (meta device) for conversions without a base model at hand
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def reference_models(family: str) -> tuple[tuple[str, dict[str, torch.nn.Module]], ...]:
    """(label, models) of the architectures an adapter of `family` may be for, built on the
    meta device from shipped configs: the family's built-in tiny model, if any, and the real
    full-size one (SD 1.5, SDXL, FLUX.1-dev)."""
    import diffusers
    import transformers

    fam = get_family(family)
    folders = [(name, ASSETS_DIR / name) for name, f in BUILTIN_MODELS.items() if f is fam and (ASSETS_DIR / name).is_dir()]
    folders.append((fam.label, skeleton_dir(fam.name)))
    out = []
    for label, folder in folders:
        with torch.device("meta"):
            config = json.loads((folder / fam.denoiser / "config.json").read_text(encoding="utf-8"))
            cls = getattr(diffusers, config["_class_name"])
            models = {fam.denoiser: cls.from_config(cls.load_config(folder / fam.denoiser))}
            for attr in fam.text_encoders:
                te_config = transformers.AutoConfig.from_pretrained(folder / attr)
                models[attr] = getattr(transformers, te_config.architectures[0])(te_config)
        out.append((label, models))
    return tuple(out)


def fitting_models(adapter: AdapterFile, models: Mapping[str, torch.nn.Module] | None = None
                   ) -> tuple[str, dict[str, torch.nn.Module]]:
    """The models (given ones, else a reference architecture) every module of `adapter` fits."""
    family = get_family(adapter.family).name
    candidates = [("the given base model", dict(models))] if models is not None else list(reference_models(family))
    reasons = []
    for label, cand in candidates:
        table = name_table(family, cand)
        misfits = [n for n, m in adapter.modules.items() if n not in table or check_fit(n, m, table[n])]
        if not misfits:
            return label, cand
        reasons.append(f"{label}: e.g. {misfits[0]}")
    raise StudioError(f"The adapter does not fit {' or '.join(l for l, _ in candidates)} ({'; '.join(reasons)}); "
                      "pass the base model it was trained on (--model).")


def resolve_dora(adapter: AdapterFile, models: Mapping[str, torch.nn.Module], *, need: str) -> None:
    """Fill in `dora_scale` (need="dora_scale", for kohya files) or the peft magnitude
    (need="magnitude", for diffusers / peft files) from the other, using the base weights."""
    table = name_table(get_family(adapter.family).name, models)
    for name, module in adapter.modules.items():
        if not module.is_dora or getattr(module, need) is not None:
            continue
        weight = table[name].base_weight()
        if weight.is_meta:
            raise StudioError("Converting DoRA between the kohya and the diffusers/peft layouts needs the base model's "
                              "weights (the kohya dora_scale depends on them); pass --model.")
        delta = module.delta(weight.shape)
        if need == "dora_scale":
            module.dora_scale = dora_scale_from_magnitude(weight, delta, module.magnitude)
        else:
            module.magnitude = magnitude_from_dora_scale(weight, delta, module.dora_scale)


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------


def kohya_tensors(adapter: AdapterFile, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The tensors of the kohya / LyCORIS file (alpha always float32)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(adapter.modules.items()):
        if module.magnitude is not None and module.dora_scale is None:
            raise StudioError(f"{name} has a DoRA magnitude but no dora_scale; resolve_dora() with the base model first.")
        for part, tensor in module.parts():
            tensors[f"{name}.{part}"] = tensor.detach().to(torch.float32 if part == "alpha" else dtype).contiguous().cpu()
    if adapter.embeddings:
        tensors.update(bundled_tensors(adapter.embeddings, get_family(adapter.family)))
    return tensors


def _serialise(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    from safetensors.torch import save

    metadata = {str(k): str(v) for k, v in metadata.items() if not str(k).startswith("sshs_")}
    model_hash, legacy = sshs_hashes(tensors, metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hash, legacy
    return save(dict(tensors), metadata=metadata)


def save_adapter(path: str | Path, adapter: AdapterFile, *, dtype: torch.dtype = torch.float32,
                 format: str = "kohya", models: Mapping[str, torch.nn.Module] | None = None) -> Path:
    """Write `adapter` atomically in `format` (kohya: a .safetensors with hashes in the
    metadata; diffusers: a .safetensors; peft: a folder). `models` (the base models) are
    needed only to convert DoRA between layouts or for architectures not shipped."""
    path = Path(path)
    if format not in FORMATS:
        raise StudioError(f"Unknown adapter format {format!r}; choose one of {', '.join(FORMATS)}.")
    if format == "kohya":
        if any(m.is_dora and m.dora_scale is None for m in adapter.modules.values()):
            if models is None:
                raise StudioError("Writing this DoRA adapter in the kohya layout needs the base model (--model): "
                                  "its dora_scale is computed from the base weights.")
            resolve_dora(adapter, models, need="dora_scale")
        data = _serialise(kohya_tensors(adapter, dtype), adapter.metadata)
        atomic_write_bytes(path, data)
    else:
        if adapter.embeddings:  # diffusers and peft files have no place for them
            log.warning("%s: the bundled embeddings (%s) are left out of the %s layout; the kohya layout keeps them",
                        path.name, ", ".join(adapter.embeddings), format)
        label, fit = fitting_models(adapter, models)
        if any(m.is_dora and m.magnitude is None for m in adapter.modules.values()):
            resolve_dora(adapter, fit, need="magnitude")
        per_model = _peft_states(adapter, fit, dtype)
        if format == "diffusers":
            _write_diffusers(path, per_model, adapter.metadata)
        else:
            _write_peft(path, per_model, adapter.metadata)
    log.info("wrote %s adapter %s (%d modules)", format, path, len(adapter.modules))
    return path


def _peft_states(adapter: AdapterFile, models: Mapping[str, torch.nn.Module], dtype: torch.dtype
                 ) -> dict[str, tuple[Any, dict[str, torch.Tensor]]]:
    """attr -> (peft config, peft state dict keyed by module path)."""
    table = name_table(get_family(adapter.family).name, models)
    plans: dict[str, list] = {}
    for name, module in adapter.modules.items():
        target: Target = table[name]
        for plan in plans_for(name, module, target):
            plans.setdefault(plan.attr, []).append(plan)
    out = {}
    for attr, group in plans.items():
        kinds = {p.module.kind for p in group}
        if len(kinds) > 1:
            raise StudioError(f"The {attr} mixes {' and '.join(sorted(kinds))} modules; peft needs one kind per model.")
        kind = kinds.pop()
        config = {LORA: _lora_config, LOHA: _loha_config, LOKR: _lokr_config}[kind](group)
        state: dict[str, torch.Tensor] = {}
        for p in group:
            m = p.module
            if kind == LORA:
                conv = isinstance(p.layer, torch.nn.Conv2d)
                down, up = m.down, m.up
                if conv and down.ndim == 2:
                    down, up = down[:, :, None, None], up[:, :, None, None]
                if not conv and down.ndim == 4:
                    down, up = down.flatten(1), up.flatten(1)
                state[f"{p.path}.lora_A.weight"] = down
                state[f"{p.path}.lora_B.weight"] = up
                if m.magnitude is not None:
                    state[f"{p.path}.lora_magnitude_vector"] = (
                        m.magnitude.reshape(1, -1, 1, 1) if conv else m.magnitude.flatten())
            else:
                for part, tensor in m.tensors.items():
                    state[f"{p.path}.{part}"] = tensor
        out[attr] = (config, {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()})
    return out


def _config_dict(config) -> dict:
    data = config.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in data.items()}


def _write_diffusers(path: Path, per_model, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save

    tensors, packed = {}, {}
    for attr, (config, state) in per_model.items():
        if type(config).__name__ != "LoraConfig":
            raise StudioError("The diffusers layout holds LoRA / LoCon / DoRA only; write LoHa / LoKr as kohya or peft.")
        if attr.startswith("text_encoder"):
            # Tensor keys with `text_model.` whatever transformers' layout: ComfyUI reads text-encoder
            # tensors only so, and diffusers strips it for a model without that submodule. The
            # config's paths without it, so that peft's suffix match finds both layouts.
            state = {clip_kohya_path(k): v for k, v in state.items()}
            config = _strip_text_model(config)
        tensors.update({f"{attr}.{k}": v for k, v in state.items()})
        packed.update({f"{attr}.{k}": v for k, v in _config_dict(config).items()})
    header = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    header.update({"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)})
    atomic_write_bytes(path, save(tensors, metadata=header))


def _strip_text_model(config):
    """A copy of a LoraConfig whose module paths do not start with `text_model.`."""
    import copy

    def strip(path: str) -> str:
        return path.removeprefix("text_model.")

    config = copy.deepcopy(config)
    config.target_modules = sorted(strip(p) for p in config.target_modules)
    config.rank_pattern = {strip(k): v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {strip(k): v for k, v in config.alpha_pattern.items()}
    return config


def _write_peft(folder: Path, per_model, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save

    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder} exists and is not a folder; the peft layout is a folder.")
    header = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    header["format"] = "pt"
    for attr, (config, state) in per_model.items():
        sub = folder / attr
        sub.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(sub / PEFT_WEIGHTS, save({f"base_model.model.{k}": v for k, v in state.items()}, metadata=header))
        data = _config_dict(config)
        atomic_write_bytes(sub / PEFT_CONFIG, json.dumps(data, indent=2, sort_keys=True).encode())


# --------------------------------------------------------------------------------------
# metadata editing
# --------------------------------------------------------------------------------------


def edit_metadata(path: str | Path, updates: Mapping[str, str | None], out: str | Path | None = None) -> Path:
    """Set (or with None remove) header metadata of a kohya safetensors file, writing `out`
    (default: in place, atomically). Only the header is rewritten: the tensor bytes are
    copied unchanged, so `sshs_model_hash` stays valid and unchanged; `sshs_legacy_hash` is
    recomputed (it covers the header's `ss_*` entries). `sshs_*` keys cannot be set."""
    path = Path(path)
    read_checked_header(path)
    for key in updates:
        if key.startswith("sshs_"):
            raise StudioError(f"{key} is computed from the file; it cannot be set.")
        if not key or any(c in key for c in "\n\r"):
            raise StudioError(f"{key!r} is not a valid metadata key.")
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    data = raw[8 + header_len:]
    metadata = dict(header.pop("__metadata__", None) or {})
    for key, value in updates.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = str(value)
    metadata.pop("sshs_model_hash", None)
    metadata.pop("sshs_legacy_hash", None)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors_for_hash = {k: handle.get_tensor(k) for k in handle.keys()}
    model_hash, legacy = sshs_hashes(tensors_for_hash, metadata)
    if model_hash != hashlib.sha256(data).hexdigest():  # safetensors lays tensors out the same way
        model_hash = hashlib.sha256(data).hexdigest()
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = model_hash, legacy
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    target = Path(out) if out is not None else path
    atomic_write_bytes(target, struct.pack("<Q", len(text)) + text + data)
    return target


def parse_assignments(items: list[str]) -> dict[str, str | None]:
    """`key=value` strings (`key=` removes the key) from the command line."""
    out: dict[str, str | None] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise StudioError(f"--set takes key=value (got {item!r}); `key=` removes a key.")
        out[key.strip()] = value if value != "" else None
    return out
