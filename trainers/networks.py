"""Which adapter a run trains: peft configs for LoRA / LoCon / LoHa / LoKr (+ DoRA,
rsLoRA, PiSSA / OLoRA init), T-LoRA layers, and the optimizer's parameter groups (LoRA+)."""
from __future__ import annotations

import logging

import torch

from studio.config import NetworkConfig
from studio.errors import StudioError
from studio.formats.peft_bridge import inject_peft_adapter

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"


def peft_config(net: NetworkConfig, *, text_encoder: bool = False):
    """The peft config for a (non-T-LoRA) network on the UNet or a text encoder."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = list(net.text_encoder_target_modules if text_encoder else net.target_modules)
    if net.type == "locon" and not text_encoder:
        targets += net.conv_target_modules
    if net.type == "loha":
        return LoHaConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout, target_modules=targets)
    if net.type == "lokr":
        return LoKrConfig(r=net.rank, alpha=net.alpha, rank_dropout=net.dropout, target_modules=targets,
                          decompose_factor=net.lokr_factor)
    rank_pattern, alpha_pattern = {}, {}
    if net.type == "locon" and not text_encoder:
        for name in net.conv_target_modules:
            pattern = rf"^(.*\.)?{name.replace('.', chr(92) + '.')}$"
            if net.conv_rank:
                rank_pattern[pattern] = net.conv_rank
            if net.conv_alpha:
                alpha_pattern[pattern] = net.conv_alpha
    init = {"default": "gaussian", "pissa": "pissa", "olora": "olora"}[net.init]
    return LoraConfig(r=net.rank, lora_alpha=net.alpha, lora_dropout=net.dropout, init_lora_weights=init,
                      target_modules=targets, use_dora=net.use_dora, use_rslora=net.use_rslora,
                      rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def inject(model: torch.nn.Module, net: NetworkConfig, *, text_encoder: bool = False, seed: int = 0):
    """Add the run's adapter to a frozen diffusers UNet or transformers text encoder.
    Returns the T-LoRA adapter for tlora (its parameters train), else None (peft layers)."""
    if net.type == "tlora":
        from studio.tlora import TLoRASchedule, inject_tlora

        return inject_tlora(model, net.target_modules, rank=net.rank, alpha=net.alpha, ortho=net.tlora_ortho,
                            schedule=TLoRASchedule(net.rank, net.tlora_min_rank, net.tlora_exponent), seed=seed)
    try:
        inject_peft_adapter(model, peft_config(net, text_encoder=text_encoder), ADAPTER_NAME)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise StudioError(f"network.{'text_encoder_' if text_encoder else ''}target_modules: {error}") from None
    return None


def initial_factors(model: torch.nn.Module, component: str) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(component, module path) -> copies of (lora_A, lora_B) as injected. Taken right after
    a PiSSA / OLoRA injection, whose init moved the base weights: the export subtracts them."""
    from peft.tuners.lora.layer import LoraLayer

    return {(component, path): (layer.lora_A[ADAPTER_NAME].weight.detach().clone(),
                                 layer.lora_B[ADAPTER_NAME].weight.detach().clone())
            for path, layer in model.named_modules() if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A}


def param_groups(model: torch.nn.Module, lr: float, net: NetworkConfig) -> list[dict]:
    """Trainable parameters of `model`; with LoRA+ the B (up) matrices get lr x ratio."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
    if not net.loraplus_lr_ratio:
        return [{"params": [p for _, p in params], "lr": lr}]
    up = [p for n, p in params if ".lora_B." in n]
    rest = [p for n, p in params if ".lora_B." not in n]
    if not up:
        raise StudioError(f"loraplus_lr_ratio applies to lora/locon networks, not {net.type}.")
    return [{"params": rest, "lr": lr}, {"params": up, "lr": lr * net.loraplus_lr_ratio}]
