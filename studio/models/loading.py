"""Base models: resolve a reference ('builtin', a diffusers folder, a single-file checkpoint, a
model name pulled into the workspace: studio.models.hub) and load its pipeline with no network."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from studio.errors import StudioError
from studio import ASSETS_DIR
from studio.models.builtin import BUILTIN_DIR
from studio.models.families import BUILTIN_MODELS, get_family
from studio.models.hub import is_model_name, local_path
from studio.models.single_file import AS_STORED, UNET_PREFIX, detect_family, load_single_file
from studio.safetensors_file import PICKLE_SUFFIXES, read_safetensors_header, sniff_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRef:
    """A resolved base-model reference."""

    kind: Literal["builtin", "diffusers", "single_file"]
    path: Path
    family: str  # a studio.models.families name
    name: str = ""  # the model name it was pulled by (org/name, civitai:ID, an address), if any

    @property
    def display_name(self) -> str:
        return self.name or self.path.name  # a built-in model's folder is named as the model ("builtin", ...)


def resolve_model(ref: str, *, allow_pickle: bool = False, workspace=None) -> ModelRef:
    """Turn a model reference into a ModelRef, checking that it exists and what family it is.
    A model name (org/name, civitai:ID, an address) is found among those pulled into
    `workspace` (default: this process's, $LORA_STUDIO_WORKSPACE or ./workspace), offline."""
    if ref in ("", *BUILTIN_MODELS):  # a built-in tiny model: assets/<its name>
        name = ref or "builtin"
        return ModelRef("builtin", ASSETS_DIR / name, BUILTIN_MODELS[name].name)
    path = Path(ref).expanduser()
    name = ""
    if not path.exists():
        if not is_model_name(ref):
            raise StudioError(f"Base model {ref!r} not found: use 'builtin', a diffusers folder, a .safetensors "
                              "checkpoint or a model name (org/name, civitai:ID) pulled with "
                              "`lora-studio models pull`.")
        path, name = local_path(ref, workspace, use="base model"), ref.strip()

    if path.is_dir():
        return ModelRef("diffusers", path.resolve(), detect_family(path), name)
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise StudioError(
            f"{path.name} is a pickle checkpoint, which can run code when loaded. Convert it to "
            ".safetensors, or pass --allow-pickle if you trust its source."
        )
    return ModelRef("single_file", path.resolve(), detect_family(path, allow_pickle=allow_pickle), name)


def quiet_libraries() -> None:
    """Our own progress and logs say what happens; the libraries' loading bars and the
    transformers note about torchvision (we never use its image processors) are noise."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_pipeline(ref: str | ModelRef, *, allow_pickle: bool = False, torch_dtype=None, denoiser_dtype=None,
                  denoiser_quantization=None, workspace=None):
    """Load a base model's diffusers pipeline offline (no hub access). `denoiser_quantization`
    (a diffusers quantization config such as BitsAndBytesConfig, CUDA only) loads the
    family's denoiser (UNet, transformer) quantized, its other layers in `denoiser_dtype`
    (default: `torch_dtype`). `torch_dtype = AS_STORED` loads a safetensors single file's
    components in the dtypes the file stores them in (for a caller that narrows them next);
    anything else in fp32."""
    import diffusers
    import torch

    model = ref if isinstance(ref, ModelRef) else resolve_model(ref, allow_pickle=allow_pickle, workspace=workspace)
    if torch_dtype is AS_STORED and not (model.kind == "single_file" and sniff_format(model.path) == "safetensors"):
        torch_dtype = None
    dtype = torch_dtype or torch.float32
    quiet_libraries()
    log.info("loading base model %s (%s, %s)", model.path, model.kind, model.family)
    if model.kind == "single_file":
        config_dir = _builtin_dir() if _is_builtin_architecture(model.path) else None
        pipe = load_single_file(model.path, allow_pickle=allow_pickle, torch_dtype=dtype, config_dir=config_dir,
                                denoiser_dtype=denoiser_dtype, denoiser_quantization=denoiser_quantization)
    else:
        family = get_family(model.family)
        cls = getattr(diffusers, family.pipeline_classes[0])
        kwargs = dict(family.pipeline_kwargs)
        if denoiser_quantization is not None:  # the denoiser's class as the folder's model_index.json names it
            index = json.loads((model.path / "model_index.json").read_text(encoding="utf-8"))
            denoiser_cls = getattr(diffusers, index[family.denoiser][1])
            kwargs[family.denoiser] = denoiser_cls.from_pretrained(
                model.path, subfolder=family.denoiser, dtype=denoiser_dtype or dtype, local_files_only=True,
                quantization_config=denoiser_quantization)
        pipe = cls.from_pretrained(model.path, dtype=dtype, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _is_builtin_architecture(path: Path) -> bool:
    """A single file of the built-in model's toy architecture (e.g. a fused mix) loads with
    the built-in folder as its config instead of the full-size SD1.5 skeleton."""
    if sniff_format(path) != "safetensors":
        return False
    tensors, _ = read_safetensors_header(path)
    conv_in = tensors.get(UNET_PREFIX + "input_blocks.0.0.weight", {}).get("shape")
    config = json.loads((_builtin_dir() / "unet" / "config.json").read_text())
    return conv_in == [config["block_out_channels"][0], config["in_channels"], 3, 3]


def _builtin_dir() -> Path:
    return BUILTIN_DIR
