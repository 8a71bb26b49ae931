"""Adapter files: the one place that writes and reads LoRA / LyCORIS adapter files.

On disk we use the kohya / LyCORIS layout that AUTOMATIC1111, Forge, ComfyUI, CivitAI and
diffusers load: `<prefix>_<module path with . -> _>.<part>` tensors with a real `alpha`,
`ss_*` and `modelspec.*` metadata and `sshs_*` hashes. SD 1.5 UNet names use diffusers
paths, SDXL UNet names the LDM (sgm) layout, text encoders `lora_te[1|2]_text_model_...`.
diffusers and peft layouts are read and written too. Training and generation use peft
adapters (LoRA, LoCon, DoRA, rsLoRA, LoHa, LoKr) on the diffusers UNet and the transformers
CLIP text encoders; this module maps between the two. Details: studio/adapters/formats/.
The package (studio.adapters) offers these names lazily.

The API:

    AdapterType(network, dora)          what the file holds (its kind; the method is studio.adapters.methods)
    export_adapter(models, family, ...) the peft adapter on the models -> AdapterFile
    save_adapter(path, adapter, dtype=, format=)    write (kohya by default)
    load_adapter(path) -> AdapterFile   read any supported layout, fully checked
    attach_adapter(pipe, adapter, name) inject into a pipeline as peft adapter `name`
    adapter_models(pipe)                the models attach_adapter may put adapters on
    edit_metadata(path, {key: value})   header-only rewrite; sshs_model_hash unchanged
    convert_adapter(src, dst, format=, precision=, set_metadata=, models=)
    training_metadata(config, model_ref, ...)   ss_* / modelspec.* of a trained adapter
"""
from __future__ import annotations

import base64
import datetime
import io
import json
import logging
from pathlib import Path
from typing import Mapping

import torch

from studio.errors import StudioError
from studio.adapters.formats import files
from studio.adapters.formats.files import (DIFFUSERS_METADATA_KEY, FORMATS, PRECISIONS, AdapterFile, data_sha256, edit_metadata,
                                  export_adapter, file_data_sha256, file_legacy_model_hash, file_sha256, fitting_models,
                                  legacy_hash, parse_assignments, read_checked_header, reference_models, save_adapter,
                                  sshs_hashes)
from studio.adapters.formats.modules import (LOHA, LOKR, LORA, AdapterModule, LoraModule, dora_merge, dora_scale_from_magnitude,
                                    magnitude_from_dora_scale)
from studio.models.families import family_of_pipeline, get_family
from studio.adapters.formats.naming import (ALL_PREFIXES, TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name, name_table,
                                   pipeline_models, sd_scripts_targets, split_name, targets_for)
from studio.adapters.formats.peft_bridge import NETWORK_TYPES, AdapterType, attach_modules
from studio.adapters.methods import METHODS, get_method, native_method
from studio.datasets import dataset_stats, load_items

log = logging.getLogger(__name__)

__all__ = [
    "AdapterFile", "AdapterModule", "AdapterType", "LoraModule", "NETWORK_TYPES", "FORMATS", "PRECISIONS",
    "LORA", "LOHA", "LOKR", "UNET_PREFIX", "TEXT_ENCODER_PREFIX", "ALL_PREFIXES",
    "adapter_models", "attach_adapter", "convert_adapter", "data_sha256", "dora_merge", "dora_scale_from_magnitude",
    "edit_metadata", "export_adapter", "file_data_sha256", "fitting_models", "kohya_name", "legacy_hash",
    "load_adapter", "magnitude_from_dora_scale", "name_table", "parse_assignments",
    "read_checked_header", "reference_models", "save_adapter", "sd_scripts_targets", "split_name", "sshs_hashes",
    "targets_for", "training_metadata", "thumbnail_data_url", "base_model_hashes", "DIFFUSERS_METADATA_KEY",
]


def adapter_models(pipe) -> dict[str, torch.nn.Module]:
    """unet, text_encoder (and text_encoder_2 for SDXL): where adapters live. The engine
    should activate and weight adapters on all of them."""
    return pipeline_models(pipe)


def load_adapter(path: str | Path) -> AdapterFile:
    """Read an adapter file or folder in any supported layout, every method's own (T-LoRA's)
    included, checking every tensor; a clear StudioError names anything that does not fit."""
    return files.load_adapter(path, METHODS.values())


def attach_adapter(pipe, adapter: AdapterFile, adapter_name: str) -> None:
    """Inject `adapter` into the pipeline's UNet / text encoder(s) as peft layers named
    `adapter_name` (LoraConfig / LoHaConfig / LoKrConfig with per-module rank and alpha,
    DoRA with its magnitude). Every module must match a layer of the right shape, else a
    StudioError lists what did not match: never a silent partial load."""
    attach_modules(family_of_pipeline(pipe).name, adapter_models(pipe), adapter.modules, adapter_name,
                   adapter_family=adapter.family, source=f"Adapter {adapter_name!r}")


def convert_adapter(src: str | Path, dst: str | Path, *, format: str = "kohya", precision: str | None = None,
                    set_metadata: Mapping[str, str | None] | None = None,
                    models: Mapping[str, torch.nn.Module] | None = None) -> Path:
    """Convert an adapter file/folder to `format` and `precision` (fp16, bf16, fp32; default:
    the source's), setting / removing metadata. Only-metadata changes to a kohya file rewrite
    its header alone, so its tensor data and sshs_model_hash stay the same."""
    src, dst = Path(src), Path(dst)
    if format not in FORMATS:
        raise StudioError(f"Unknown format {format!r}; choose one of {', '.join(FORMATS)}.")
    if precision is not None and precision not in PRECISIONS:
        raise StudioError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    adapter = load_adapter(src)
    updates = dict(set_metadata or {})
    if format == "kohya" and precision is None and adapter.source_format == "kohya" and src.is_file():
        if updates or src.resolve() != dst.resolve():
            return edit_metadata(src, updates, out=dst)
        return dst
    dtype = PRECISIONS[precision] if precision else _source_dtype(adapter)
    metadata = {k: v for k, v in adapter.metadata.items() if k not in (DIFFUSERS_METADATA_KEY, "format")}
    native = native_method(adapter.source_format)
    if native is not None:  # written in its plain form: what only the native layout means goes
        metadata = native.plain_metadata(metadata, adapter, src.name)
    for key, value in updates.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    adapter.metadata = metadata
    if format == "kohya":
        metadata.setdefault("ss_network_module", adapter.adapter_type.ss_network_module)
        metadata.setdefault("ss_base_model_version", get_family(adapter.family).ss_base_model_version)
    return save_adapter(dst, adapter, dtype=dtype, format=format, models=models)


def _source_dtype(adapter: AdapterFile) -> torch.dtype:
    for module in adapter.modules.values():
        for tensor in module.tensors.values():
            return tensor.dtype
    return torch.float32


# --------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------


def base_model_hashes(model_ref) -> dict[str, str]:
    """`ss_sd_model_hash` (A1111's old 8-hex hash) and `ss_new_sd_model_hash` (sha256 of the
    file) of the base model: its single file, or for a diffusers folder (the built-in model)
    its UNet weights file."""
    path = Path(model_ref.path)
    if path.is_dir():
        candidates = sorted((path / "unet").glob("diffusion_pytorch_model*.safetensors"))
        if not candidates:
            return {}
        path = candidates[0]
    if not path.is_file():
        return {}
    return {"ss_sd_model_hash": file_legacy_model_hash(path), "ss_new_sd_model_hash": file_sha256(path)}


def thumbnail_data_url(image_path: str | Path, size: int = 128) -> str:
    """A small JPEG of an image as a data URL (modelspec.thumbnail)."""
    from PIL import Image

    with Image.open(image_path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


#: modelspec.prediction_type of a DDPM objective's prediction (sai_model_spec writes none for flow matching)
MODELSPEC_PREDICTION = {"epsilon": "epsilon", "v_prediction": "v"}


def training_metadata(config, model_ref, *, dataset_folder: Path, started: float, finished: float,
                      run_id: str, adapter: AdapterFile, thumbnail: str | Path | None = None,
                      prediction_type: str = "epsilon", ema: bool = False, denoiser_config=None) -> dict[str, str]:
    """sd-scripts `ss_*` and `modelspec.*` metadata for a trained adapter. `adapter` (the
    exported modules) supplies the file's real rank / alpha and type, the run's method
    (network.type) the ss_network_module / ss_network_args; `thumbnail` an image; `ema`
    says the file holds the EMA of the weights (training.ema_decay); `denoiser_config` the
    base model's variant where its family has several (FLUX.1-dev / schnell).
    modelspec.prediction_type is written for a DDPM model ("epsilon", "v") and, as
    sd-scripts does for FLUX.1, not for a flow-matching one."""
    stats = dataset_stats(dataset_folder, load_items(dataset_folder))
    net, train, ds = config.network, config.training, config.dataset
    base = get_family(model_ref.family)
    trigger = ds.trigger_word.strip()
    method = get_method(net.type)
    ranks = [m.rank for m in adapter.modules.values() if m.rank]
    alphas = [m.effective_alpha for m in adapter.modules.values() if m.effective_alpha]
    dim = max(set(ranks), key=ranks.count) if ranks else net.rank
    alpha = max(set(alphas), key=alphas.count) if alphas else net.alpha
    network_module, args = method.ss_network(net, adapter)
    date = datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).isoformat(timespec="seconds")
    metadata = {
        "ss_v2": "False",
        "ss_output_name": config.name,
        "ss_base_model_version": base.ss_base_model_version,
        "ss_network_module": network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": f"{alpha:g}",
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(net.dropout),
        "ss_sd_model_name": model_ref.display_name,
        **base_model_hashes(model_ref),
        "ss_resolution": f"({ds.resolution}, {ds.resolution})",
        "ss_max_train_steps": str(train.max_steps),
        "ss_steps": str(train.max_steps),
        "ss_learning_rate": str(train.learning_rate),
        "ss_text_encoder_lr": str(train.text_encoder_lr or train.learning_rate) if net.train_text_encoder else "0",
        "ss_unet_lr": str(train.learning_rate),
        "ss_network_train_unet_only": str(not net.train_text_encoder),
        "ss_optimizer": train.optimizer,
        "ss_lr_scheduler": train.lr_scheduler,
        "ss_lr_warmup_steps": str(train.lr_warmup_steps),
        "ss_batch_size_per_device": str(train.batch_size),
        "ss_gradient_accumulation_steps": str(train.gradient_accumulation_steps),
        "ss_mixed_precision": train.mixed_precision,
        "ss_min_snr_gamma": str(train.min_snr_gamma),
        "ss_noise_offset": str(train.noise_offset),
        "ss_prior_loss_weight": str(ds.prior_loss_weight),
        "ss_caption_dropout_rate": str(ds.caption_dropout_rate),
        "ss_shuffle_caption": str(ds.shuffle_tags),
        "ss_keep_tokens": str(ds.keep_tokens),
        **({"ss_num_epochs": str(train.max_epochs)} if train.max_epochs else {}),
        "ss_seed": str(config.seed),
        "ss_training_started_at": str(started),
        "ss_training_finished_at": str(finished),
        "ss_tag_frequency": json.dumps(stats.ss_tag_frequency),
        "ss_dataset_dirs": json.dumps(stats.ss_dataset_dirs),
        "ss_reg_dataset_dirs": json.dumps(stats.ss_reg_dataset_dirs),
        "ss_num_train_images": str(stats.image_count),
        "ss_num_reg_images": str(stats.reg_image_count),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": base.lora_architecture_of(denoiser_config),
        "modelspec.implementation": base.modelspec_implementation,
        "modelspec.title": config.name,
        "modelspec.resolution": f"{ds.resolution}x{ds.resolution}",
        "modelspec.date": date,
        **({"modelspec.prediction_type": MODELSPEC_PREDICTION[prediction_type]}
           if prediction_type in MODELSPEC_PREDICTION else {}),
        **({"modelspec.trigger_phrase": trigger} if trigger else {}),
        "lora_studio_adapter_type": method.label(net, adapter),
        "lora_studio_run_id": run_id,
    }
    if ema:
        metadata["lora_studio_ema"] = json.dumps({"decay": train.ema_decay, "start_step": train.ema_start_step})
    if adapter.adapter_type.dora:
        metadata["lora_studio_dora"] = ("dora_scale [out,1]: ComfyUI/Forge output-axis form, "
                                        "W' = (W + dW) * dora_scale / ||W||_row reproduces peft's DoRA")
    if thumbnail is not None and Path(thumbnail).is_file():
        metadata["modelspec.thumbnail"] = thumbnail_data_url(thumbnail)
    return metadata
