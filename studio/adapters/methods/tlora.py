"""T-LoRA (arXiv 2507.05964): a LoRA on the denoiser (a UNet, FLUX.1's transformer) whose
active rank follows the diffusion timestep, r(t) = floor(((T - t) / T)^a (r - r_min)) + r_min; the layers, schedule and
native file are in `tlora_layers`.

Its file has a layout of its own (the schedule in the metadata) that the engine attaches
with its timestep masks; other tools get its plain form, a LoRA with every rank on (rank 2r
for Ortho-LoRA), which `load_adapter` reads and `convert` writes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from studio.adapters.formats.header_keys import FORMAT_KEY
from studio.errors import StudioError
from studio.adapters.methods.base import NativeFileMethod, Training
from studio.adapters.methods.options import ConvTargets, NetworkOptions

log = logging.getLogger(__name__)

# Header entries only the native layout means: dropped from its plain form.
_NATIVE_METADATA = ("tlora_schedule", "tlora_alpha", "tlora_ortho", "ss_network_module")


class TLoRAOptions(ConvTargets, NetworkOptions):
    """T-LoRA adapts the denoiser only, with one rank schedule for every layer."""

    type: Literal["tlora"] = "tlora"
    tlora_min_rank: int = Field(4, ge=1, le=1024, description="T-LoRA: rank used at the noisiest step (the paper uses rank/2).")
    tlora_exponent: float = Field(1.0, gt=0, le=10, description="T-LoRA: exponent a of the rank schedule r(t) = ((T-t)/T)^a (r - r_min) + r_min.")
    tlora_ortho: bool = Field(True, description="T-LoRA: Ortho-LoRA initialisation (off = vanilla T-LoRA, mask only).")
    tlora_conv: bool = Field(False, description="T-LoRA: also the ResNet convs and resamplers (conv_target_modules), "
                                                "as LoCon: the mask on the conv LoRA's inner channels.")

    @model_validator(mode="after")
    def _check_tlora(self):
        if self.tlora_min_rank > self.rank:
            raise ValueError(f"tlora_min_rank ({self.tlora_min_rank}) must not exceed rank ({self.rank})")
        if self.train_text_encoder:
            raise ValueError("T-LoRA adapts the denoiser (UNet, transformer) only; set train_text_encoder = false")
        return self


class TLoRATraining(Training):
    """The T-LoRA adapter on the denoiser; checkpoints key its tensors `tlora.<name>`."""

    def __init__(self, method: "TLoRA", net, seed: int):
        self.method, self.net, self.seed = method, net, seed
        self.adapter = None
        self.denoiser = None
        self.trained: set[int] = set()

    def add(self, component, model, lr):
        from studio.adapters.methods.tlora_layers import TLoRASchedule, inject_tlora

        net = self.net
        targets = list(net.target_modules) + (list(net.conv_target_modules) if net.tlora_conv else [])
        self.adapter = inject_tlora(model, targets, rank=net.rank, alpha=net.alpha, ortho=net.tlora_ortho,
                                    schedule=TLoRASchedule(net.rank, net.tlora_min_rank, net.tlora_exponent),
                                    seed=self.seed, denoiser=component)
        self.denoiser = model
        # what trains, fixed now: block_lr_* = 0 may freeze some of it later
        self.trained = {id(p) for p in self.adapter.parameters() if p.requires_grad}
        return self.method.param_groups(self.adapter, lr, net)

    def named_parameters(self, component):
        # the adapter's ModuleDict keys are the denoiser's module paths with "__" for "."
        return ((name.removeprefix("layers.").replace("__", "."), p) for name, p in self.adapter.named_parameters()
                if id(p) in self.trained)

    def state(self):
        return {f"tlora.{k}": v for k, v in self.adapter.state_dict().items()}

    def load_state(self, state):
        self.adapter.load_state_dict({k[len("tlora."):]: v for k, v in state.items() if k.startswith("tlora.")})

    def export(self, family):
        """The plain (all ranks on) view: it gives the metadata its rank and alpha."""
        from studio.adapters.formats.files import AdapterFile
        from studio.adapters.formats.modules import LoraModule
        from studio.adapters.formats.naming import path_to_name
        from studio.adapters.methods.tlora_layers import plain_lora_factors

        return AdapterFile({path_to_name(family, self.adapter.denoiser, path, self.denoiser.config): LoraModule(down, up, alpha)
                            for path, (up, down, alpha) in plain_lora_factors(self.adapter).items()}, {}, family)

    def save(self, path, adapter):
        from studio.adapters.methods.tlora_layers import save_tlora

        return save_tlora(path, self.adapter, adapter.metadata)


class TLoRA(NativeFileMethod):
    name = "tlora"
    summary = "tlora (timestep-dependent rank, arXiv 2507.05964)"
    native_format = "tlora"
    options = TLoRAOptions

    def training(self, net, *, seed, max_steps=None):
        return TLoRATraining(self, net, seed)

    def label(self, net, adapter):
        return self.name

    def plain_modules(self, path, family):
        from studio.adapters.formats.modules import LoraModule
        from studio.adapters.formats.naming import path_to_name
        from studio.adapters.methods.tlora_layers import load_tlora, plain_lora_factors

        adapter = load_tlora(path)
        return {path_to_name(family, adapter.denoiser, p): LoraModule(down.float(), up.float(), alpha)
                for p, (up, down, alpha) in plain_lora_factors(adapter).items()}

    def plain_metadata(self, metadata, adapter, source):
        rank = max(module.rank or 0 for module in adapter.modules.values())
        log.warning("%s is a T-LoRA: its plain LoRA form has every rank on at every step (rank %d), so the timestep "
                    "schedule is lost; LoRA Studio generates with the schedule from the native file.", source, rank)
        plain = {k: v for k, v in metadata.items() if k != FORMAT_KEY and k not in _NATIVE_METADATA}
        plain["lora_studio_adapter_type"] = "lora (plain form of a T-LoRA, timestep schedule dropped)"
        return plain

    def foreign_file(self, name, parts):
        """LyCORIS's `algo=tlora` files (SimpleTuner trains them) hold only the trained
        factors (q_layer, p_layer, lambda_layer): the frozen copy that its delta subtracts is
        recomputed at load time by an SVD of the base model's own weights (its default init),
        and its conv factors are 1x1. Without that copy the delta is undefined, so such a file
        is refused with the reason rather than read wrongly."""
        if {"q_layer.weight", "p_layer.weight", "lambda_layer"} <= parts:
            return (f"{name} is a LyCORIS T-LoRA file (algo=tlora): it stores only the trained factors, and LyCORIS "
                    "rebuilds the frozen copy they are measured against from the base model's weights when it "
                    "loads the file, so other loaders cannot compute its update. Use it with LyCORIS (as SimpleTuner "
                    "does), or train T-LoRA here, whose files keep both.")
        return None

    def attach_file(self, pipe, path):
        from studio.adapters.methods.tlora_layers import load_tlora

        adapter = load_tlora(path)
        denoiser = getattr(pipe, adapter.denoiser, None)
        if denoiser is None:
            raise StudioError(f"{Path(path).name} is a T-LoRA of a {adapter.denoiser}; this base model has none.")
        return adapter.to(denoiser.device, denoiser.dtype).attach(denoiser)
