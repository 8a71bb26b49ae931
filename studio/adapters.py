"""Adapter files: the one place that writes and reads LoRA `.safetensors` files.

On disk we use the kohya / CivitAI layout that AUTOMATIC1111, ComfyUI and diffusers load:
`<prefix>_<module path with . -> _>.lora_down.weight` [r, in], `.lora_up.weight` [out, r]
and a real `.alpha` (scale = alpha / r). Training and generation use peft adapters on the
diffusers UNet and the transformers CLIP text encoder; this module maps between the two.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from studio.errors import StudioError
from studio.fsutil import atomic_write_bytes
from studio.safetensors_file import read_safetensors_header, refuse_pickle, sniff_format

log = logging.getLogger(__name__)

UNET_PREFIX = "lora_unet"
TEXT_ENCODER_PREFIX = "lora_te"
# transformers 5's CLIPTextModel has no `text_model` submodule any more, but A1111 and
# ComfyUI match names that contain it.
CLIP_NAME_PREFIX = "text_model_"
# Submodules peft adds around an adapted layer; they are not layers of the base model.
_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A",
               "lora_embedding_B", "lora_magnitude_vector"}

@dataclass
class LoraModule:
    """One adapted module: up @ down scaled by alpha / rank."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class AdapterFile:
    """A LoRA file in memory: modules keyed by kohya name, and the header metadata."""

    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values()})

    @property
    def alphas(self) -> list[float]:
        return sorted({m.alpha for m in self.modules.values()})


def kohya_name(prefix: str, module_path: str) -> str:
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_encoder_module_name(prefix: str, module_path: str) -> str:
    """kohya name of a CLIP text-encoder module, with `text_model_` whatever transformers' layout."""
    path = module_path.removeprefix("text_model.")
    return kohya_name(prefix, "text_model." + path)


def modules_from_peft(peft_state: dict[str, torch.Tensor], *, alpha: float, prefix: str,
                      text_encoder: bool = False) -> dict[str, LoraModule]:
    """peft state dict (`<path>.lora_A.weight`, `<path>.lora_B.weight`) -> kohya modules."""
    modules: dict[str, LoraModule] = {}
    for key, down in peft_state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[: -len(".lora_A.weight")]
        up = peft_state[f"{path}.lora_B.weight"]
        name = text_encoder_module_name(prefix, path) if text_encoder else kohya_name(prefix, path)
        modules[name] = LoraModule(down.detach(), up.detach(), float(alpha))
    return modules


def kohya_names_of(model: torch.nn.Module, prefix: str, *, text_encoder: bool = False) -> dict[str, str]:
    """kohya name -> module path for every Linear/Conv2d module of `model`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        elif any(part in _PEFT_PARTS for part in path.split(".")):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            name = text_encoder_module_name(prefix, path) if text_encoder else kohya_name(prefix, path)
            names[name] = path
    return names


def save_adapter(path: str | Path, adapter: AdapterFile, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write `adapter` atomically in kohya layout, with `sshs_*` hashes in the metadata."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(adapter.modules.items()):
        tensors[f"{name}.lora_down.weight"] = module.down.to(dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = module.up.to(dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(module.alpha, dtype=dtype)
    metadata = {k: str(v) for k, v in adapter.metadata.items() if not k.startswith("sshs_")}
    draft = save(tensors, metadata=metadata)
    metadata["sshs_model_hash"] = data_sha256(draft)
    metadata["sshs_legacy_hash"] = legacy_hash(draft)
    data = save(tensors, metadata=metadata)
    atomic_write_bytes(path, data)
    log.info("wrote adapter %s (%d modules)", path, len(adapter.modules))
    return Path(path)


def data_sha256(file_bytes: bytes) -> str:
    """sha256 of the tensor data: the bytes after the 8-byte length and the JSON header
    (A1111's `sshs_model_hash`; independent of the metadata)."""
    header_len = struct.unpack("<Q", file_bytes[:8])[0]
    return hashlib.sha256(file_bytes[8 + header_len:]).hexdigest()


def legacy_hash(file_bytes: bytes) -> str:
    """A1111's old short hash: first 8 hex of sha256 of 64 KiB at offset 1 MiB."""
    return hashlib.sha256(file_bytes[0x100000:0x110000]).hexdigest()[:8]


def read_checked_header(path: str | Path) -> tuple[dict, dict[str, str]]:
    """The tensor table and metadata of an adapter file; a pickle (whatever its name), a
    truncated or a corrupt file raises a StudioError that says so."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"Adapter file {path} not found.")
    fmt = sniff_format(path)
    if fmt in ("pickle", "zip-pickle"):
        raise refuse_pickle(path, fmt)
    if fmt != "safetensors":
        raise StudioError(f"{path.name} is not a safetensors file; adapters must be .safetensors.")
    return read_safetensors_header(path)


def load_adapter(path: str | Path) -> AdapterFile:
    """Read a kohya-layout LoRA file, checking every tensor; a clear StudioError names
    anything that does not fit."""
    from safetensors import safe_open

    path = Path(path)
    _, metadata = read_checked_header(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            name, _, part = key.partition(".")
            groups.setdefault(name, {})[part] = handle.get_tensor(key)
    modules: dict[str, LoraModule] = {}
    for name, parts in groups.items():
        unknown = set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if unknown or "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise StudioError(
                f"{path.name}: module {name!r} has tensors {sorted(parts)}; expected lora_down.weight, "
                "lora_up.weight and alpha (a kohya LoRA)."
            )
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        if down.shape[0] != up.shape[1]:
            raise StudioError(f"{path.name}: module {name!r} has lora_down {tuple(down.shape)} and "
                              f"lora_up {tuple(up.shape)}, whose ranks differ.")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise StudioError(f"{path.name}: module {name!r} contains NaN or infinite values; the file is broken.")
        alpha = float(parts["alpha"]) if "alpha" in parts else 0.0
        if not math.isfinite(alpha):
            raise StudioError(f"{path.name}: module {name!r} has a non-finite alpha.")
        modules[name] = LoraModule(down, up, alpha if alpha > 0 else float(down.shape[0]))
    if not modules:
        raise StudioError(f"{path.name} holds no LoRA modules.")
    return AdapterFile(modules, metadata)


def attach_adapter(pipe, adapter: AdapterFile, adapter_name: str) -> None:
    """Inject `adapter` into the pipeline's UNet / text encoder as peft LoRA layers named
    `adapter_name`. Every module must match a layer of the right shape, else a StudioError
    lists what did not match: never a silent partial load."""
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    targets = {UNET_PREFIX: (pipe.unet, False)}
    if getattr(pipe, "text_encoder", None) is not None:
        targets[TEXT_ENCODER_PREFIX] = (pipe.text_encoder, True)
    for prefix, part in split_by_prefix(adapter, targets).items():
        model, is_text_encoder = targets[prefix]
        names = kohya_names_of(model, prefix, text_encoder=is_text_encoder)
        from peft.tuners.tuners_utils import BaseTunerLayer

        modules = {path: (m.get_base_layer() if isinstance(m, BaseTunerLayer) else m)
                   for path, m in model.named_modules()}
        state, ranks, alphas, problems = {}, {}, {}, []
        for name, module in part.modules.items():
            path = names.get(name)
            if path is None:
                problems.append(f"{name} (no such layer)")
                continue
            weight = modules[path].weight
            expected = (weight.shape[0], weight.shape[1])
            down, up = module.down, module.up
            if (up.shape[0], down.shape[1]) != expected or (weight.ndim == 4) != (down.ndim == 4):
                problems.append(f"{name} (file {tuple(up.shape[:1]) + tuple(down.shape[1:])}, "
                                f"model {tuple(weight.shape)})")
                continue
            state[f"{path}.lora_A.weight"] = down.to(weight.dtype)
            state[f"{path}.lora_B.weight"] = up.to(weight.dtype)
            ranks[path], alphas[path] = module.rank, module.alpha
        if problems:
            raise StudioError(
                f"Adapter {adapter_name!r} does not fit this base model: {len(problems)} of "
                f"{len(part.modules)} {prefix} modules do not match, e.g. {'; '.join(problems[:3])}. "
                "Is it for another model family (SD1.5 vs SDXL)?"
            )
        base_rank = max(set(ranks.values()), key=list(ranks.values()).count)
        config = LoraConfig(r=base_rank, lora_alpha=base_rank, target_modules=sorted(ranks),
                            rank_pattern=ranks, alpha_pattern=alphas)
        model.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise StudioError(f"Adapter {adapter_name!r}: {len(unexpected)} tensors were not used, "
                              f"e.g. {unexpected[:3]}.")


def split_by_prefix(adapter: AdapterFile, prefixes: Iterable[str]) -> dict[str, AdapterFile]:
    """Group an adapter's modules by kohya prefix (lora_unet, lora_te, ...)."""
    parts: dict[str, AdapterFile] = {}
    ordered = sorted(prefixes, key=len, reverse=True)
    for name, module in adapter.modules.items():
        prefix = next((p for p in ordered if name.startswith(p + "_")), None)
        if prefix is None:
            raise StudioError(f"Module {name!r} has an unknown prefix; expected one of {sorted(prefixes)}.")
        parts.setdefault(prefix, AdapterFile({}, adapter.metadata)).modules[name] = module
    return parts


def training_metadata(config, model_ref, *, dataset_folder: Path, started: float, finished: float,
                      run_id: str) -> dict[str, str]:
    """sd-scripts `ss_*` and `modelspec.*` metadata for a trained adapter."""
    import datetime

    from studio.datasets import dataset_stats, load_items

    stats = dataset_stats(dataset_folder, load_items(dataset_folder))
    net, train, ds = config.network, config.training, config.dataset
    sdxl = model_ref.family == "sdxl"
    resolution = f"{ds.resolution}x{ds.resolution}"
    trigger = ds.trigger_word.strip()
    return {
        "ss_v2": "False",
        "ss_output_name": config.name,
        "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(net.rank),
        "ss_network_alpha": str(net.alpha),
        "ss_network_args": json.dumps({}),
        "ss_network_dropout": str(net.dropout),
        "ss_sd_model_name": model_ref.display_name,
        "ss_resolution": f"({ds.resolution}, {ds.resolution})",
        "ss_max_train_steps": str(train.max_steps),
        "ss_steps": str(train.max_steps),
        "ss_learning_rate": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.text_encoder_lr or train.learning_rate) if net.train_text_encoder else "0",
        "ss_unet_lr": str(train.learning_rate),
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_noise_offset": str(train.noise_offset),
        "ss_prior_loss_weight": str(ds.prior_loss_weight),
        "ss_seed": str(config.seed),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(finished),
        "ss_tag_frequency": json.dumps(stats.ss_tag_frequency),
        "ss_dataset_dirs": json.dumps(stats.ss_dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(stats.ss_reg_dataset_dirs),
        "ss_num_train_images": str(stats.image_count),
        "ss_num_reg_images": str(stats.reg_image_count),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora" if sdxl else "stable-diffusion-v1/lora",
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": config.name,
        "modelspec.resolution": resolution,
        "modelspec.date": datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "epsilon",
        **({"modelspec.trigger_phrase": trigger} if trigger else {}),
        "lora_studio_run_id": run_id,
    }
