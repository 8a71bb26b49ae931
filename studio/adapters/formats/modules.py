"""One adapted layer as the kohya / LyCORIS file stores it, and the exact math loaders apply.

Kinds and their tensors (names after `<module name>.`):

    lora   lora_down.weight [r, in] or [r, in, kh, kw] (LoCon), lora_up.weight [out, r] or
           [out, r, 1, 1]; dW = up @ down * alpha / r
    loha   hada_w1_a [out, r], hada_w1_b [r, in*kh*kw], hada_w2_a, hada_w2_b (same), or with
           Tucker cores hada_t1/hada_t2 [r, r, kh, kw] and w*_a [r, out], w*_b [r, in];
           dW = (w1a @ w1b) * (w2a @ w2b) * alpha / r
    lokr   lokr_w1 [a, c] or lokr_w1_a [a, r] @ lokr_w1_b [r, c]; lokr_w2 [b, d(, kh, kw)] or
           lokr_w2_a [b, r] @ lokr_w2_b [r, d*kh*kw] or Tucker (lokr_t2, w2_a [r, b], w2_b [r, d]);
           dW = kron(w1, w2) * alpha / r, where r is the rank of the decomposed factor
           (w2's when both are decomposed) and the scale is 1 with two full factors
    + alpha (0-d; absent or 0 means alpha = r) and, for DoRA, dora_scale (see dora_merge)

These are the formulas of AUTOMATIC1111's extensions-builtin/Lora and ComfyUI's
comfy/weight_adapter (checked against their public code); `delta` reproduces them.

DoRA conventions (`dora_merge`, verified numerically in tests/test_formats.py):

- peft (training): W' = m * (W + dW) / ||W + dW||_row, the norm per output channel, m [out].
- A1111 (1.10): only the input-axis form: W' = (W + dW) * d / ||W + dW||_col with d [1, in]
  (the norm per input column). A [out, 1] dora_scale is silently broadcast to [out, in] there.
- ComfyUI and Forge: d [1, in] as A1111 (plus eps); when d.shape[0] == out they take the
  output axis but divide by the norm of the *base* weight: W' = (W + dW) * d / (||W||_row + eps)
  (an open ComfyUI pull request would change that to ||W + dW||, LyCORIS's own formula).
- peft's per-output DoRA cannot be written in the input-axis form: (W + U) diag(d / c) =
  diag(m / n) (W + dW) needs a full-rank U. So we write the output-axis layout with
  d = m * (||W||_row + eps) / ||W + dW||_row, which ComfyUI and Forge turn back into peft's
  W' exactly, and read [out, 1] files with the same formula (what ComfyUI users see). The
  base weight enters d, so a DoRA file is tied to its base model, as DoRA is anyway.
  A1111 cannot load peft-style DoRA correctly in any layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

from studio.errors import StudioError

LORA, LOHA, LOKR = "lora", "loha", "lokr"
KIND_PARTS = {
    LORA: {"lora_down.weight", "lora_up.weight"},
    LOHA: {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    LOKR: {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
COMMON_PARTS = {"alpha", "dora_scale"}
# Kinds of other LyCORIS algorithms and extras, named in errors so a person knows what the file is.
_FOREIGN_PARTS = {
    "lora_mid.weight": "LoCon with Tucker decomposition (lora_mid)",
    "diff": "a full weight difference (LyCORIS 'full')", "diff_b": "a bias difference",
    "w_norm": "trained norm layers", "b_norm": "trained norm layers",
    "oft_blocks": "OFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "on_input": "IA3",
    "weight": "IA3", "lora_up.bias": "LoRA with bias",
}
# ComfyUI adds torch.finfo(weight.dtype).eps to the norm; we use float32's.
DORA_EPS = float(torch.finfo(torch.float32).eps)


@dataclass
class AdapterModule:
    """One adapted layer in file terms: `kind`, its tensors by part name, `alpha` (None =
    not in the file), and for DoRA either `dora_scale` (file semantics, see module doc) or
    `magnitude` (peft's lora_magnitude_vector [out], as diffusers / peft files hold it)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None

    # ---- LoRA view (kept for callers that know only LoRA)
    @property
    def down(self) -> torch.Tensor:
        return self.tensors["lora_down.weight"]

    @property
    def up(self) -> torch.Tensor:
        return self.tensors["lora_up.weight"]

    @property
    def is_dora(self) -> bool:
        return self.dora_scale is not None or self.magnitude is not None

    @property
    def is_conv_kernel(self) -> bool:
        """A LoCon/LoHa/LoKr module on a kxk (k > 1) convolution."""
        t = self.tensors
        if self.kind == LORA:
            return self.down.ndim == 4 and tuple(self.down.shape[2:]) != (1, 1)
        if self.kind == LOHA:
            return "hada_t1" in t and tuple(t["hada_t1"].shape[2:]) != (1, 1)
        w2 = t.get("lokr_w2")
        return ("lokr_t2" in t and tuple(t["lokr_t2"].shape[2:]) != (1, 1)) or (
            w2 is not None and w2.ndim == 4 and tuple(w2.shape[2:]) != (1, 1))

    @property
    def rank(self) -> int | None:
        """The dimension loaders divide alpha by (None: a LoKr with two full factors)."""
        t = self.tensors
        if self.kind == LORA:
            return int(self.down.shape[0])
        if self.kind == LOHA:
            return int(t["hada_w1_b"].shape[0])
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        return None

    @property
    def effective_alpha(self) -> float | None:
        rank = self.rank
        if rank is None:
            return None
        return self.alpha if self.alpha else float(rank)

    @property
    def scale(self) -> float:
        """What A1111 / ComfyUI multiply the product by: alpha / rank (1 for LoKr with two
        full factors or without alpha)."""
        rank = self.rank
        if rank is None:
            return 1.0
        if self.kind == LOKR and not self.alpha:
            return 1.0
        return (self.alpha or rank) / rank

    def delta(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """The scaled weight difference (float32) in the layer's weight shape."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == LORA:
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            product = up.flatten(1) @ down.flatten(1)
        elif self.kind == LOHA:
            if "hada_t1" in t:
                w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
            else:
                w1 = t["hada_w1_a"] @ t["hada_w1_b"]
                w2 = t["hada_w2_a"] @ t["hada_w2_b"]
            product = w1 * w2
        else:
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if "lokr_w2" in t:
                w2 = t["lokr_w2"]
            elif "lokr_t2" in t:
                w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            product = torch.kron(w1, w2)
        if product.numel() != math.prod(shape):
            raise StudioError(f"a {self.kind} module of {product.numel()} weights does not fit a layer of shape {tuple(shape)}")
        return product.reshape(shape) * self.scale

    def parts(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(part name, tensor) as written to a kohya / LyCORIS file. Every module carries
        `alpha`, because LyCORIS's loader reads `float(alpha)` of each module and rejects the
        whole file without one; where none was set it is the rank (kohya's default, the same
        scale), or 1 for a LoKr with two full factors, whose scale every loader fixes at 1."""
        yield from sorted(self.tensors.items())
        alpha = self.alpha if self.alpha is not None else float(self.rank or 1)
        yield "alpha", torch.tensor(float(alpha), dtype=torch.float32)
        if self.dora_scale is not None:
            yield "dora_scale", self.dora_scale

    def cast(self, dtype: torch.dtype) -> "AdapterModule":
        def c(x):
            return None if x is None else x.detach().to(dtype).contiguous()

        return AdapterModule(self.kind, {k: c(v) for k, v in self.tensors.items()}, self.alpha,
                             c(self.dora_scale), c(self.magnitude))

    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.tensors.values())


def module_rows(module: AdapterModule, start: int, stop: int, what: str) -> AdapterModule | None:
    """The part of `module` that updates output rows [start, stop) of its layer: how a
    module of a fused layer (FLUX.1's qkv) becomes one per diffusers module, exactly.

    - lora: up[start:stop] with the shared down; rank columns whose up rows there are all
      zero are dropped (a block-diagonal up, sd-scripts' split_qkv form, gives each part its
      own rank back), alpha kept in proportion so the scale alpha/r stays. None when no
      column is left (the part is not updated), unless DoRA rescales it anyway.
    - loha: rows of hada_w1_a and hada_w2_a, (w1a w1b) * (w2a w2b) being row-wise.
    - lokr: kron(w1, w2) has rows i = i1 b + i2 (w2: b rows), so a range of whole w1 rows
      when b divides start and stop; otherwise it has no LoKr form and is refused.
    DoRA: an output-axis dora_scale / magnitude is row-wise too; an input-axis one is not."""
    t = module.tensors
    if module.dora_scale is not None and module.dora_scale.numel() != module.dora_scale.shape[0]:
        raise StudioError(f"{what}: an input-axis dora_scale normalises the columns of the whole fused layer; it "
                          "cannot be split into its parts")
    dora = {"dora_scale": None if module.dora_scale is None else module.dora_scale[start:stop],
            "magnitude": None if module.magnitude is None else module.magnitude.flatten()[start:stop]}
    if module.kind == LORA:
        up = module.up[start:stop]
        keep = up.flatten(1).abs().sum(dim=0) > 0
        if not bool(keep.any()):
            if not module.is_dora:
                return None
            keep = torch.ones_like(keep)
        kept = int(keep.sum())
        return AdapterModule(LORA, {"lora_down.weight": module.down[keep].contiguous(),
                                    "lora_up.weight": up[:, keep].contiguous()},
                             module.scale * kept, **dora)
    if module.kind == LOHA:
        if "hada_t1" in t:
            raise StudioError(f"{what}: a LoHa with Tucker cores is for convolutions, not a fused linear layer")
        parts = dict(t, hada_w1_a=t["hada_w1_a"][start:stop].contiguous(), hada_w2_a=t["hada_w2_a"][start:stop].contiguous())
        return AdapterModule(LOHA, parts, module.alpha, **dora)
    w2 = t.get("lokr_w2")
    b = w2.shape[0] if w2 is not None else (t["lokr_w2_a"].shape[1] if "lokr_t2" in t else t["lokr_w2_a"].shape[0])
    if start % b or stop % b:
        raise StudioError(f"{what}: its LoKr factor of {b} rows does not divide the fused layer's parts at rows "
                          f"{start}-{stop}, so no LoKr module updates that part alone; train LoKr on FLUX.1 with "
                          "another lokr factor, or use LoRA / LoHa")
    key = "lokr_w1" if "lokr_w1" in t else "lokr_w1_a"
    parts = dict(t, **{key: t[key][start // b: stop // b].contiguous()})
    return AdapterModule(LOKR, parts, module.alpha, **dora)


def stack_rows(parts: list[AdapterModule | None], sizes: list[int], what: str) -> AdapterModule:
    """One LoRA module for a fused layer from LoRA modules of its parts (rows `sizes[i]`
    each, None for a part without one): downs stacked, ups block-diagonal, each part's
    scale folded into its up, so that row block i of the product is part i's update
    exactly (sd-scripts' split_qkv layout). Rank: the sum of the parts' ranks. DoRA:
    magnitudes and output-axis dora_scales stacked, every part then needs one."""
    present = [p for p in parts if p is not None]
    if any(p.kind != LORA for p in present):
        raise StudioError(f"{what}: only LoRA parts stack into one module")
    dora = [p.is_dora for p in present]
    if any(dora) and (not all(dora) or len(present) != len(parts)):
        raise StudioError(f"{what}: DoRA on only some parts of a fused layer has no single DoRA module; adapt all of "
                          "its parts (to_q, to_k, to_v) or none with DoRA")
    rank = sum(p.rank for p in present)
    first = present[0]
    down = torch.cat([p.down.float() for p in present])
    up = torch.zeros(sum(sizes), rank, dtype=torch.float32)
    row = col = 0
    for part, size in zip(parts, sizes):
        if part is not None:
            up[row:row + size, col:col + part.rank] = part.up.float().flatten(1) * part.scale
            col += part.rank
        row += size
    module = AdapterModule(LORA, {"lora_down.weight": down.to(first.down.dtype),
                                  "lora_up.weight": up.to(first.up.dtype)}, float(rank))
    if all(dora) and present:
        if all(p.magnitude is not None for p in present):
            module.magnitude = torch.cat([p.magnitude.flatten() for p in present])
        if all(p.dora_scale is not None for p in present):
            module.dora_scale = torch.cat([p.dora_scale.reshape(-1, 1) for p in present])
    return module


def LoraModule(down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> AdapterModule:
    """A plain LoRA / LoCon module (compatibility constructor)."""
    return AdapterModule(LORA, {"lora_down.weight": down, "lora_up.weight": up}, alpha)


def keep_components(module: AdapterModule, keep: torch.Tensor, alpha: float) -> AdapterModule | None:
    """The LoRA module with only the rank components `keep` (a bool mask over its rank), with
    file alpha `alpha` and the same update: down[keep], up[:, keep] x (scale x kept / alpha),
    so it computes the sum of the kept components exactly (a dropped one whose factor is
    zero changes nothing). None when no component is kept.

    How methods whose ranks end different per module (AdaLoRA, ARD-LoRA) write them. Every
    module gets the same alpha because diffusers' load_lora_weights (get_peft_kwargs) keys
    the alpha_pattern of per-module alphas wrongly (a text encoder's `...self_attn.q_proj`
    becomes `...self_attn`, matching nothing), and then scales those modules by the common
    alpha: an AdaLoRA file with alpha = scale x rank had modules off by up to 4x in diffusers
    (tests/test_ard.py::test_files_with_per_module_ranks_carry_one_alpha_for_diffusers)."""
    if module.kind != LORA or module.is_dora:
        raise StudioError("only plain LoRA modules can drop rank components")
    keep = keep.to(torch.bool).flatten().cpu()
    kept = int(keep.sum())
    if kept == 0:
        return None
    up = module.up[:, keep] * (module.scale * kept / alpha)
    return LoraModule(module.down[keep].contiguous(), up.contiguous(), alpha)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS / A1111 `make_weight_cp`: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa)


def parse_module(name: str, parts: dict[str, torch.Tensor], source: str) -> AdapterModule:
    """An AdapterModule from the tensors of one kohya / LyCORIS module, checked for
    completeness, consistent ranks and finite values; a StudioError names what is wrong."""
    present = set(parts)
    foreign = sorted(present - COMMON_PARTS - set().union(*KIND_PARTS.values()))
    if foreign:
        what = ", ".join(sorted({_FOREIGN_PARTS.get(p, "") for p in foreign} - {""}))
        raise StudioError(f"{source}: module {name!r} has tensors this studio does not know: {', '.join(foreign)}"
                          + (f" ({what})" if what else "") + ". Supported: LoRA/LoCon, LoHa, LoKr, DoRA.")
    kinds = [k for k, names in KIND_PARTS.items() if present & names]
    if len(kinds) != 1:
        raise StudioError(f"{source}: module {name!r} has {'no weights' if not kinds else 'a mix of ' + ' and '.join(kinds)} "
                          f"({', '.join(sorted(present))}).")
    kind = kinds[0]
    tensors = {k: v for k, v in parts.items() if k not in COMMON_PARTS}
    checked = dict(tensors)
    if "dora_scale" in parts:
        checked["dora_scale"] = parts["dora_scale"]
    for part, tensor in checked.items():
        if not tensor.is_floating_point():
            raise StudioError(f"{source}: {name}.{part} has dtype {tensor.dtype}; adapter weights are floating point.")
        if not torch.isfinite(tensor).all():
            raise StudioError(f"{source}: {name}.{part} contains NaN or infinite values; the file is broken.")
    alpha = None
    if "alpha" in parts:
        a = parts["alpha"]
        if a.numel() != 1:
            raise StudioError(f"{source}: {name}.alpha has shape {tuple(a.shape)}; it must be a single number.")
        alpha = float(a.reshape(()).float())
        if not math.isfinite(alpha) or alpha < 0:
            raise StudioError(f"{source}: {name}.alpha is {alpha}; it must be a finite number >= 0.")
    module = AdapterModule(kind, tensors, alpha, parts.get("dora_scale"))
    _check_structure(name, module, source)
    return module


def _need(name: str, module: AdapterModule, source: str, *groups: tuple[str, ...]) -> None:
    for options in groups:
        if not any(all(p in module.tensors for p in opt.split("+")) for opt in options):
            raise StudioError(f"{source}: module {name!r} ({module.kind}) lacks "
                              f"{' or '.join(o.replace('+', ' and ') for o in options)}.")


def _check_structure(name: str, module: AdapterModule, source: str) -> None:
    t = module.tensors

    def bad(msg: str) -> StudioError:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(t.items()))
        return StudioError(f"{source}: module {name!r}: {msg} ({shapes}).")

    if module.kind == LORA:
        _need(name, module, source, ("lora_down.weight",), ("lora_up.weight",))
        down, up = module.down, module.up
        if down.ndim not in (2, 4) or up.ndim != down.ndim:
            raise bad("lora_down and lora_up must both be 2-D (linear) or 4-D (conv)")
        if up.shape[1] != down.shape[0]:
            raise bad("the ranks of lora_down and lora_up differ")
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise bad("lora_up of a conv must be 1x1")
    elif module.kind == LOHA:
        _need(name, module, source, ("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",))
        tucker = ("hada_t1" in t, "hada_t2" in t)
        if tucker[0] != tucker[1]:
            raise bad("hada_t1 and hada_t2 come together")
        r1, r2 = t["hada_w1_b"].shape[0], t["hada_w2_b"].shape[0]
        for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if t[part].ndim != 2:
                raise bad(f"{part} must be 2-D")
        ok = (t["hada_w1_a"].shape[0 if tucker[0] else 1] == r1 and t["hada_w2_a"].shape[0 if tucker[0] else 1] == r2)
        if tucker[0]:
            ok = ok and t["hada_w1_a"].shape[1] == t["hada_w2_a"].shape[1] and t["hada_w1_b"].shape[1] == t["hada_w2_b"].shape[1]
            ok = ok and tuple(t["hada_t1"].shape[:2]) == (r1, r1) and tuple(t["hada_t2"].shape[:2]) == (r2, r2)
        else:
            ok = ok and t["hada_w1_a"].shape[0] == t["hada_w2_a"].shape[0] and t["hada_w1_b"].shape[1] == t["hada_w2_b"].shape[1]
        if not ok:
            raise bad("the Hadamard factors do not fit together")
    else:
        _need(name, module, source, ("lokr_w1", "lokr_w1_a+lokr_w1_b"), ("lokr_w2", "lokr_w2_a+lokr_w2_b"))
        if "lokr_w1" in t and ("lokr_w1_a" in t or "lokr_w1_b" in t):
            raise bad("lokr_w1 and lokr_w1_a/_b exclude each other")
        if "lokr_w2" in t and ("lokr_w2_a" in t or "lokr_w2_b" in t or "lokr_t2" in t):
            raise bad("lokr_w2 and lokr_w2_a/_b/lokr_t2 exclude each other")
        if "lokr_w1_a" in t and t["lokr_w1_a"].shape[1] != t["lokr_w1_b"].shape[0]:
            raise bad("the ranks of lokr_w1_a and lokr_w1_b differ")
        if "lokr_w2_a" in t:
            inner = t["lokr_w2_a"].shape[0] if "lokr_t2" in t else t["lokr_w2_a"].shape[1]
            if inner != t["lokr_w2_b"].shape[0]:
                raise bad("the ranks of lokr_w2_a and lokr_w2_b differ")
    if module.dora_scale is not None and module.dora_scale.ndim not in (1, 2, 4):
        raise bad(f"dora_scale has shape {tuple(module.dora_scale.shape)}")


# --------------------------------------------------------------------------------------
# DoRA
# --------------------------------------------------------------------------------------


def dora_axis(dora_scale: torch.Tensor, weight_shape: tuple[int, ...]) -> str:
    """"output" (d [out, 1, ...], ComfyUI/Forge's output-axis branch) or "input" (d [1, in, ...],
    A1111 / legacy LyCORIS); a StudioError when it fits neither."""
    out, inp = weight_shape[0], weight_shape[1]
    if dora_scale.shape[0] == out and dora_scale.numel() == out:
        return "output"
    if dora_scale.numel() == inp and (dora_scale.ndim == 1 or dora_scale.shape[0] == 1):
        return "input"
    raise StudioError(f"dora_scale of shape {tuple(dora_scale.shape)} fits neither the output ({out}) nor the "
                      f"input ({inp}) channels of a layer of shape {tuple(weight_shape)}")


def _row_norm(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).norm(dim=1)


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """The merged weight ComfyUI / Forge compute for a DoRA module (A1111's for the input
    axis, up to ComfyUI's eps), in float32: our reading of `dora_scale`."""
    w, dw = weight.float(), delta.float().reshape(weight.shape)
    merged = w + dw
    d = dora_scale.float()
    if dora_axis(d, tuple(w.shape)) == "output":
        norm = _row_norm(w) + DORA_EPS
        return merged * (d.flatten() / norm).reshape(-1, *[1] * (w.ndim - 1))
    col = merged.transpose(0, 1).flatten(1).norm(dim=1) + DORA_EPS
    return merged * (d.flatten() / col).reshape(1, -1, *[1] * (w.ndim - 2))


def magnitude_from_dora_scale(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """peft's magnitude m [out] that reproduces an output-axis `dora_scale` under ComfyUI's
    formula: m = d * ||W + dW||_row / (||W||_row + eps)."""
    w = weight.float()
    if dora_axis(dora_scale, tuple(w.shape)) != "output":
        raise StudioError("an input-axis dora_scale ([1, in], A1111 / legacy LyCORIS) normalises each input column; "
                          "peft's DoRA normalises output rows and cannot represent it")
    merged = w + delta.float().reshape(w.shape)
    return dora_scale.float().flatten() * _row_norm(merged) / (_row_norm(w) + DORA_EPS)


def dora_scale_from_magnitude(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The output-axis `dora_scale` [out, 1(, 1, 1)] that ComfyUI / Forge turn back into peft's
    DoRA with magnitude m: d = m * (||W||_row + eps) / ||W + dW||_row."""
    w = weight.float()
    merged = w + delta.float().reshape(w.shape)
    d = magnitude.float().flatten() * (_row_norm(w) + DORA_EPS) / _row_norm(merged)
    return d.reshape(-1, *[1] * (w.ndim - 1))
