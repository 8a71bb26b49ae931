"""T-LoRA's layers, schedule and native file (the method itself: studio.adapters.methods.tlora).

T-LoRA (arXiv 2507.05964) is a LoRA whose active rank depends on the diffusion timestep.

    r(t) = floor(((T - t) / T) ** a * (r_max - r_min)) + r_min,   T = 1000
    delta(x) = scale * (P diag(lambda * m_t) Q x  -  P0 diag(lambda0 * m_t) Q0 x)

m_t keeps the first r(t) components, so noisy steps use few ranks. Ortho-LoRA starts
P, lambda, Q from the *last* singular triplets of a random matrix R ~ N(0, 1/r) and
subtracts a frozen copy (P0, lambda0, Q0) under the same mask: the initial update is
exactly zero. Vanilla T-LoRA is the mask alone on an ordinary LoRA (Q random, P = 0).

On a Conv2d (LoCon's layers: ResNet convs, resamplers) Q is a conv with the layer's kernel,
stride and padding into r channels and P a 1x1 conv out of them, as LoCon's down / up; the
mask keeps the first r(t) of those inner channels. R is then [out, in * kh * kw].

The adapter works through hooks: a forward hook on each adapted Linear adds the delta,
and a pre-hook on the denoiser (a UNet, FLUX.1's transformer) reads the timestep of every
call (training and sampling: its family's `call_timesteps`, in [0, T)) and sets the mask
per sample. Hooks compose with peft layers on the same model, so T-LoRA
adapters blend with ordinary LoRAs at generation time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from studio.adapters.formats.files import data_sha256, legacy_hash, read_checked_header
from studio.errors import StudioError
from studio.adapters.formats.header_keys import FORMAT_KEY
from studio.fsutil import atomic_write_bytes
from studio.models.families import FAMILIES

NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class TLoRASchedule:
    rank: int
    min_rank: int
    exponent: float = 1.0
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS

    def rank_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """r(t) for each timestep (an integer tensor of the same shape)."""
        T = self.num_train_timesteps
        t = timesteps.to(torch.float64).clamp(0, T)
        span = self.rank - self.min_rank
        return (((T - t) / T) ** self.exponent * span).floor().to(torch.long) + self.min_rank

    def mask(self, timesteps: torch.Tensor) -> torch.Tensor:
        """[B, rank] float mask: 1 for the first r(t) components of each sample."""
        ranks = self.rank_at(timesteps.reshape(-1))
        return (torch.arange(self.rank, device=ranks.device)[None, :] < ranks[:, None]).to(torch.float32)

    def to_dict(self) -> dict:
        return {"rank": self.rank, "min_rank": self.min_rank, "exponent": self.exponent,
                "num_train_timesteps": self.num_train_timesteps}


class TLoRALayer(nn.Module):
    """The trainable factors of one adapted Linear or Conv2d layer (plus the frozen
    Ortho-LoRA copy). `kernel` (kh, kw) makes it a conv layer's: Q is [r, in, kh, kw]."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, ortho: bool,
                 generator: torch.Generator | None = None, kernel: tuple[int, int] | None = None):
        super().__init__()
        self.ortho = ortho
        q_shape = (rank, in_features, *kernel) if kernel else (rank, in_features)
        if ortho:
            fan_in = math.prod(q_shape[1:])
            random = torch.randn(out_features, fan_in, generator=generator) / math.sqrt(rank)
            u, s, vh = torch.linalg.svd(random, full_matrices=False)
            p, lam, q = u[:, -rank:], s[-rank:], vh[-rank:, :].reshape(q_shape)
            self.register_buffer("p0", p.clone())
            self.register_buffer("lam0", lam.clone())
            self.register_buffer("q0", q.clone())
            self.p, self.lam, self.q = nn.Parameter(p.clone()), nn.Parameter(lam.clone()), nn.Parameter(q.clone())
        else:
            q = torch.empty(q_shape)
            nn.init.kaiming_uniform_(q, a=math.sqrt(5), generator=generator)
            self.q = nn.Parameter(q)
            self.p = nn.Parameter(torch.zeros(out_features, rank))
            self.register_buffer("lam", torch.ones(rank))

    @property
    def is_conv(self) -> bool:
        return self.q.dim() == 4

    def delta(self, x: torch.Tensor, mask: torch.Tensor, conv: nn.Conv2d | None = None) -> torch.Tensor:
        """Linear: x [B, ..., in] -> [B, ..., out]; conv (`conv` the adapted layer, for its
        stride, padding and dilation): x [B, in, H, W] -> [B, out, H', W']. mask [B, r] (or
        [1, r]). Unscaled."""
        if self.is_conv:
            m = mask.to(x.dtype)[:, :, None, None]
            geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
            out = F.conv2d(F.conv2d(x, self.q, **geometry) * (self.lam[:, None, None] * m), self.p[:, :, None, None])
            if self.ortho:
                out = out - F.conv2d(F.conv2d(x, self.q0, **geometry) * (self.lam0[:, None, None] * m),
                                     self.p0[:, :, None, None])
            return out
        shape = (mask.shape[0],) + (1,) * (x.dim() - 2) + (mask.shape[1],)
        m = mask.to(x.dtype).reshape(shape)
        out = ((x @ self.q.t()) * (self.lam * m)) @ self.p.t()
        if self.ortho:
            out = out - ((x @ self.q0.t()) * (self.lam0 * m)) @ self.p0.t()
        return out

    def plain_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All ranks on, as an ordinary LoRA: up [out, r'] and down [r', in] with r' = 2r
        for Ortho-LoRA (the frozen copy becomes the second half, negated); a conv layer's
        as LoCon's: up [out, r', 1, 1], down [r', in, kh, kw]."""
        up = self.p * self.lam
        down = self.q
        if self.ortho:
            up = torch.cat([up, -(self.p0 * self.lam0)], dim=1)
            down = torch.cat([down, self.q0], dim=0)
        if self.is_conv:
            up = up[:, :, None, None]
        return up.detach(), down.detach()


def denoisers() -> tuple[str, ...]:
    """The pipeline attributes of every family's denoiser (unet, transformer)."""
    return tuple(dict.fromkeys(f.denoiser for f in FAMILIES.values()))


def call_timesteps(denoiser: str):
    """How a call of that denoiser carries its timesteps (a family's `call_timesteps`; the
    UNet families share theirs)."""
    return next(f.call_timesteps for f in FAMILIES.values() if f.denoiser == denoiser)


class TLoRAAdapter(nn.Module):
    """A T-LoRA adapter attached to a pipeline's denoiser (`denoiser`: its attribute, unet
    or transformer) through hooks; `weight` scales it (blending). With `masked` False every
    rank is on at every step: what its plain-LoRA export computes."""

    def __init__(self, schedule: TLoRASchedule, alpha: float, layers: dict[str, TLoRALayer], denoiser: str = "unet"):
        super().__init__()
        self.denoiser = denoiser
        self._call_timesteps = call_timesteps(denoiser)
        self.schedule, self.alpha, self.weight = schedule, alpha, 1.0
        self.enabled = True
        self.masked = True
        self.layers = nn.ModuleDict({path.replace(".", "__"): layer for path, layer in layers.items()})
        self._mask: torch.Tensor | None = None
        self._handles: list = []

    @property
    def scale(self) -> float:
        return self.alpha / self.schedule.rank

    def module_paths(self) -> list[str]:
        return [key.replace("__", ".") for key in self.layers]

    def attach(self, denoiser: nn.Module) -> "TLoRAAdapter":
        modules = dict(denoiser.named_modules())
        self._handles.append(denoiser.register_forward_pre_hook(self._set_timesteps, with_kwargs=True))
        for key, layer in self.layers.items():
            target = _base_layer(modules[key.replace("__", ".")])
            self._handles.append(target.register_forward_hook(self._make_hook(layer)))
        return self

    def use(self, use) -> None:
        """Weight it for one generation request: `use` is its AdapterUse (weight, and
        tlora_masked: the timestep mask or every rank), or None to switch it off."""
        self.enabled = use is not None
        if use is not None:
            self.weight, self.masked = use.weight, use.tlora_masked

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _set_timesteps(self, module, args, kwargs):
        batch, t = self._call_timesteps(args, kwargs)
        if t.numel() == 1:
            t = t.expand(batch)
        self._mask = self.schedule.mask(t)

    def _make_hook(self, layer: TLoRALayer):
        def hook(module, inputs, output):
            if not self.enabled or self.weight == 0 or self._mask is None:
                return output
            x = inputs[0]
            mask = self._mask if self.masked else torch.ones_like(self._mask)
            if mask.shape[0] != x.shape[0]:
                if not bool((mask == mask[:1]).all()):
                    raise RuntimeError(f"T-LoRA: batch {x.shape[0]} does not match the timestep batch {mask.shape[0]}")
                mask = mask[:1]
            delta = layer.delta(x, mask, module if layer.is_conv else None)
            return output + (self.weight * self.scale) * delta.to(output.dtype)

        return hook


def _base_layer(module: nn.Module) -> nn.Module:
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if get_base else module


def inject_tlora(model: nn.Module, target_modules: list[str], *, rank: int, alpha: float, ortho: bool,
                 schedule: TLoRASchedule, seed: int = 0, denoiser: str = "unet") -> TLoRAAdapter:
    """Create T-LoRA layers on every Linear or Conv2d of the denoiser `model` (the pipeline's
    attribute `denoiser`) whose path ends with a target name and attach their hooks; the
    caller keeps the returned adapter (its parameters are the trainables)."""
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, TLoRALayer] = {}
    for path, module in model.named_modules():
        if not any(path == t or path.endswith("." + t) for t in target_modules):
            continue
        base = _base_layer(module)
        if isinstance(base, nn.Linear):
            layers[path] = TLoRALayer(base.in_features, base.out_features, rank, ortho=ortho, generator=generator)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            layers[path] = TLoRALayer(base.in_channels, base.out_channels, rank, ortho=ortho, generator=generator,
                                      kernel=tuple(base.kernel_size))
        else:
            raise StudioError(f"T-LoRA adapts Linear and Conv2d layers; {path} is a {type(base).__name__}. "
                              "Remove it from the network's target modules.")
    if not layers:
        raise StudioError(f"network.target_modules {target_modules} matched no Linear or Conv2d layer of the "
                          f"{denoiser}.")
    weight = next(model.parameters())
    adapter = TLoRAAdapter(schedule, alpha, layers, denoiser).to(device=weight.device)
    adapter.attach(model)
    return adapter


# --------------------------------------------------------------------------- files
# The native file keeps every factor under the denoiser's diffusers module path and the
# schedule in the metadata, so the studio reloads it with its timestep masks:
#   <unet|transformer>.<path>.tlora_q [r, in], .tlora_lambda [r], .tlora_p [out, r]
#   (+ .tlora_q0, .tlora_lambda0, .tlora_p0 for Ortho-LoRA), metadata tlora_schedule (JSON)
# TLoRA.native_format: tlora.py imports this module (inside its functions: torch), not the reverse.
FORMAT_VALUE = "tlora"
_PARTS = {"q": "tlora_q", "lam": "tlora_lambda", "p": "tlora_p", "q0": "tlora_q0", "lam0": "tlora_lambda0", "p0": "tlora_p0"}


def is_tlora_metadata(metadata: dict[str, str]) -> bool:
    return metadata.get(FORMAT_KEY) == FORMAT_VALUE


def save_tlora(path, adapter: TLoRAAdapter, metadata: dict[str, str]) -> Path:
    """Write the native T-LoRA file atomically (with A1111's sshs hashes)."""
    import json

    from safetensors.torch import save

    tensors = {}
    for key, layer in adapter.layers.items():
        path_name = f"{adapter.denoiser}." + key.replace("__", ".")
        for attr, suffix in _PARTS.items():
            if hasattr(layer, attr):
                tensors[f"{path_name}.{suffix}"] = getattr(layer, attr).detach().float().contiguous()
    meta = {k: str(v) for k, v in metadata.items() if not k.startswith("sshs_")}
    meta.update({FORMAT_KEY: FORMAT_VALUE, "tlora_schedule": json.dumps(adapter.schedule.to_dict()),
                 "tlora_alpha": str(adapter.alpha), "tlora_ortho": str(bool(next(iter(adapter.layers.values())).ortho)),
                 "ss_network_module": "lora_studio.tlora"})
    draft = save(tensors, metadata=meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = data_sha256(draft), legacy_hash(draft)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return Path(path)


def load_tlora(path) -> TLoRAAdapter:
    """A T-LoRA adapter from its native file (not yet attached to a UNet)."""
    import json

    from safetensors import safe_open

    _, metadata = read_checked_header(path)
    if not is_tlora_metadata(metadata):
        raise StudioError(f"{path} is not a T-LoRA file.")
    try:
        schedule = TLoRASchedule(**json.loads(metadata["tlora_schedule"]))
        alpha = float(metadata["tlora_alpha"])
        ortho = metadata.get("tlora_ortho", "True") == "True"
    except (KeyError, TypeError, ValueError) as error:
        raise StudioError(f"{path}: the T-LoRA schedule metadata is broken ({error}).") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    found: set[str] = set()
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():
            module, _, part = key.rpartition(".")
            denoiser = module.split(".", 1)[0]
            if denoiser not in denoisers() or part not in _PARTS.values():
                raise StudioError(f"{path}: unexpected tensor {key!r} in a T-LoRA file.")
            found.add(denoiser)
            grouped.setdefault(module[len(denoiser) + 1:], {})[part] = handle.get_tensor(key)
    if len(found) > 1:
        raise StudioError(f"{path}: a T-LoRA file adapts one denoiser; this one has {' and '.join(sorted(found))}.")
    layers = {}
    for module, parts in grouped.items():
        q, p = parts.get("tlora_q"), parts.get("tlora_p")
        if q is None or p is None or q.shape[0] != schedule.rank or p.shape[1] != schedule.rank:
            raise StudioError(f"{path}: module {module!r} does not hold rank-{schedule.rank} T-LoRA factors.")
        if not all(torch.isfinite(t).all() for t in parts.values()):
            raise StudioError(f"{path}: module {module!r} contains NaN or infinite values.")
        layer = TLoRALayer(q.shape[1], p.shape[0], schedule.rank, ortho=ortho,
                           kernel=tuple(q.shape[2:]) if q.dim() == 4 else None)
        layer.load_state_dict({attr: parts[suffix] for attr, suffix in _PARTS.items() if hasattr(layer, attr)})
        layers[module] = layer
    return TLoRAAdapter(schedule, alpha, layers, found.pop() if found else "unet")


def plain_lora_factors(adapter: TLoRAAdapter) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path -> (up, down, alpha) of the equivalent plain LoRA with every rank on
    (rank 2r for Ortho-LoRA). The timestep schedule is lost in this form."""
    out = {}
    for key, layer in adapter.layers.items():
        up, down = layer.plain_factors()
        out[key.replace("__", ".")] = (up, down, adapter.scale * down.shape[0])
    return out
