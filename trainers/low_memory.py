"""A low-memory frozen base model for training: 4-bit NF4 (QLoRA, QDoRA with DoRA;
bitsandbytes through diffusers' quantization support, CUDA), or weights stored in float8
(CUDA) or bfloat16 (any device) and computed in the compute dtype (the mixed precision's
under autocast, else the input's: fp32 on a CPU). `studio.config.check_device_support`
refuses what the machine cannot run.

Low-precision storage is done here rather than with diffusers' `enable_layerwise_casting`:
that hook casts a layer's parameters back to the storage dtype in place after its forward
pass, so the weight autograd saved for the backward pass is low-precision by then and the
backward pass through the frozen layers (needed by every adapter before them) fails. Here a
frozen Linear / Conv2d keeps its weight in the storage dtype, casts a copy for each forward
pass and recasts it in backward: no full-precision copy lives between the two passes.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

FP8 = torch.float8_e4m3fn
#: training.base_weights -> the dtype the frozen weights are stored in
STORAGE = {"fp8": FP8, "bf16": torch.bfloat16}


def nf4_quantization(compute_dtype: torch.dtype):
    """The denoiser's Linear layers in 4-bit NormalFloat with double quantization (QLoRA's
    recipe), computed in `compute_dtype`; convolutions and norms keep their dtype."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def store_frozen_weights(model: nn.Module, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> int:
    """Store the weights of the model's frozen Linear and Conv2d layers in `dtype` (float8
    e4m3 or bfloat16), but the modules at paths `keep` (a family's full_precision_modules);
    biases, norms, embeddings and adapter layers stay as they are. Call it after the adapters
    are injected (PiSSA / OLoRA init reads the full-precision weights). Returns the layer
    count."""
    count = 0
    for path, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Conv2d) or path in keep:
            continue
        if any(p.requires_grad for p in module.parameters()):
            continue
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                continue
            module.forward = partial(_conv2d_forward, module)
        else:
            module.forward = partial(_linear_forward, module)
        module.weight.data = module.weight.data.to(dtype)
        count += 1
    return count


def store_loaded_weights(model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype,
                         keep: tuple[str, ...] = ()) -> int:
    """A frozen model loaded in the dtypes its file stores (studio.models.single_file.AS_STORED)
    made what store_frozen_weights makes of a full-precision one: its Linear / Conv2d weights
    (but `keep`) in `dtype`, everything else in `compute_dtype`, one tensor at a time, so the
    model never exists in full precision (a full-size SDXL file, fp16: 6.9 GB narrowed in place
    instead of 14 GB widened first). Rounding fp16 to bf16 directly equals rounding its exact
    fp32 widening. Returns the layer count."""
    count = store_frozen_weights(model, dtype, keep)
    stored = {id(module.weight) for path, module in model.named_modules()
              if type(module) in (nn.Linear, nn.Conv2d) and path not in keep and module.weight.dtype == dtype}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in stored and tensor.is_floating_point():
            tensor.data = tensor.data.to(compute_dtype)
    return count


def own_storage(*modules: nn.Module) -> None:
    """Copy every parameter and buffer of `modules` into memory of its own. A model loaded
    from a safetensors file views one mapping of the whole file, and every page read stays
    resident while any tensor still views it: after store_frozen_weights the norms, biases
    and the VAE kept the whole file (full-size SD1.5: 5.67 GB resident after bf16 storage,
    2.60 GB once they own their memory)."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = tensor.data.clone()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _bias(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.to(dtype)


def _linear_forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x)
    if module.weight.requires_grad:  # asked for its gradient (sensitivity-LoRA's Fisher scores): plain autograd
        return F.linear(x.to(dtype), module.weight.to(dtype), _bias(module, dtype))
    return _StoredLinear.apply(x.to(dtype), module.weight, _bias(module, dtype))


def _conv2d_forward(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(x)
    if module.weight.requires_grad:
        return F.conv2d(x.to(dtype), module.weight.to(dtype), _bias(module, dtype), module.stride, module.padding,
                        module.dilation, module.groups)
    return _StoredConv2d.apply(x.to(dtype), module.weight, _bias(module, dtype), module.stride, module.padding,
                               module.dilation, module.groups)


class _StoredLinear(torch.autograd.Function):
    """y = x W^T + b with W stored in low precision; gradient for x only (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output @ weight.to(grad_output.dtype), None, None


class _StoredConv2d(torch.autograd.Function):
    """conv2d with its weight stored in low precision; gradient for the input only."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.geometry = (x.shape, stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.geometry
        grad_x = torch.nn.grad.conv2d_input(shape, weight.to(grad_output.dtype), grad_output, stride, padding,
                                            dilation, groups)
        return grad_x, None, None, None, None, None, None
