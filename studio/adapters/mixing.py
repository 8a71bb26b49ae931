"""Turn a mix into files: bake (one LoRA file), resize (fewer ranks), fuse (a checkpoint).

A mix is a list of (adapter file, weight). Baking sums the weighted updates exactly by
concatenating ranks, or compresses the sum to rank N through QR + a small SVD
(studio.adapters.merge); LoHa / LoKr modules go through their full delta. DoRA updates depend on
the base weights, so they can be fused into a checkpoint but not baked into a LoRA.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.adapters.api import load_adapter
from studio.errors import StudioError
from studio.models.families import family_of_pipeline, get_family
from studio.adapters.formats.files import AdapterFile, fitting_models, save_adapter
from studio.adapters.formats.modules import LORA, LoraModule, dora_merge
from studio.adapters.formats.naming import name_table, pipeline_models
from studio.limits import MIX_ADAPTERS
from studio.adapters.merge import Factors, check_rule, concat, factors_of_delta, squeeze
from studio.adapters.mixtures.file import is_mixture, load_mixture
from studio.models import load_pipeline
from studio.models.blocks import block_weight
from studio.models.single_file import save_single_file

log = logging.getLogger(__name__)


@dataclass
class MixReport:
    path: Path
    modules: int
    ranks: list[int]
    energy_kept: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"{self.path}: {self.modules} modules, rank {min(self.ranks)}-{max(self.ranks)}"
        if self.energy_kept:
            values = list(self.energy_kept.values())
            text += f"; energy kept min {min(values):.4f}, mean {sum(values) / len(values):.4f}"
        return text


def _check_mix(mix: list[tuple[Path, float]]) -> None:
    """Refuse an empty mix, one over the cap, or a weight that is not a finite number."""
    if not mix:
        raise StudioError("Give at least one adapter (FILE[:WEIGHT]).")
    MIX_ADAPTERS.check(len(mix), f"This mix has {len(mix)} adapters")
    for path, weight in mix:
        if not math.isfinite(weight):
            raise StudioError(f"The weight of {Path(path).name} is {weight}; give a finite number such as 0.8.")


def _load_mix(mix: list[tuple[Path, float]]) -> tuple[str, list[tuple[AdapterFile, float, str, dict | None]]]:
    """(family, [(adapter, weight, name, gates by LBW block or None)]): a mixture file in
    the mix stands for its members, each with its gates (only a step- and prompt-independent
    mixture has one weight per layer; any other is refused with the reason)."""
    _check_mix(mix)
    loaded = []
    for path, weight in mix:
        if not is_mixture(path):
            loaded.append((load_adapter(path), weight, Path(path).stem, None))
            continue
        mixture = load_mixture(path)
        why = mixture.why_not_constant()
        if why is not None:
            raise StudioError(f"{Path(path).name} cannot be written as one plain LoRA: {why}, and a LoRA has one "
                              "weight per layer. Generate with the mixture itself.")
        for member, gates in zip(mixture.members, mixture.constant_gates().tolist()):
            blocks = get_family(mixture.family).blocks.full
            loaded.append((load_adapter(member.path), weight, member.path.stem, dict(zip(blocks, gates))))
    families = {get_family(adapter.family).name for adapter, *_ in loaded}
    if len(families) > 1:
        raise StudioError(f"The adapters are for different model families ({', '.join(sorted(families))}); "
                          "a mix must be for one.")
    for adapter, _, name, _ in loaded:
        if any(m.is_dora for m in adapter.modules.values()):
            raise StudioError(f"{name} is a DoRA adapter: its update depends on the base weights, so it cannot be "
                              "baked into a plain LoRA. Fuse it into a checkpoint instead (lora-studio fuse).")
    return families.pop(), loaded


def module_factors(adapter: AdapterFile, name: str) -> Factors | None:
    """The scaled factor pair of a LoRA/LoCon module; None for LoHa/LoKr (use the delta)."""
    module = adapter.modules[name]
    if module.kind != LORA:
        return None
    up = module.up.float() * module.scale
    return Factors(up, module.down.float())


def _layer_shapes(family: str, adapter: AdapterFile) -> dict[str, torch.Size]:
    _, models = fitting_models(adapter)
    table = name_table(family, models)
    return {name: torch.Size(table[name].weight_shape) for name in adapter.modules}


def module_blocks(family: str, adapter: AdapterFile) -> dict[str, str | None]:
    """The LBW block of each module (BASE for the text encoders, None outside the blocks),
    as the engine assigns it."""
    _, models = fitting_models(adapter)
    table = name_table(family, models)
    fam = get_family(family)
    denoiser = models[fam.denoiser]
    return {name: fam.blocks.module_block(table[name].module_path, denoiser.config)
            if table[name].attr == fam.denoiser else "BASE" for name in adapter.modules}


def bake(mix: list[tuple[Path, float]], out: str | Path, *, rank: int | None = None,
         dtype: torch.dtype = torch.float32) -> MixReport:
    """One LoRA file equal to the weighted mix: exact (ranks concatenated) or, with
    `rank`, the best rank-N approximation of each module's summed update."""
    family, loaded = _load_mix(mix)

    names = sorted({n for adapter, *_ in loaded for n in adapter.modules})
    modules, energy = {}, {}
    shapes: dict[int, dict[str, torch.Size]] = {}
    blocks = {index: module_blocks(family, adapter) for index, (adapter, _, _, gates) in enumerate(loaded) if gates}
    for name in names:
        parts = []
        for index, (adapter, weight, _, gates) in enumerate(loaded):
            if name not in adapter.modules:
                continue
            if gates:
                weight = weight * block_weight(gates, blocks[index][name])
            if weight == 0:
                continue
            factors = module_factors(adapter, name)
            if factors is None:  # LoHa / LoKr: exact factors of the full delta
                if index not in shapes:
                    shapes[index] = _layer_shapes(family, adapter)
                full = factors_of_delta(adapter.modules[name].delta(shapes[index][name]),
                                        rank=min(shapes[index][name][:2]))
                factors = full.factors
            parts.append((factors, weight))
        if not parts:
            continue
        merged = concat(parts)
        if rank is not None:
            squeezed = squeeze(merged, rank=rank)
            merged, energy[name] = squeezed.factors, squeezed.energy_kept
        modules[name] = LoraModule(merged.down, merged.up, float(merged.rank))
    if not modules:
        raise StudioError("Every adapter in the mix has weight 0: nothing to bake.")
    metadata = {
        "ss_output_name": Path(out).stem,
        "ss_network_module": "networks.lora",
        "ss_base_model_version": get_family(family).ss_base_model_version,
        "ss_network_dim": str(max(m.rank for m in modules.values())),
        "ss_network_alpha": str(max(m.rank for m in modules.values())),
        "modelspec.sai_model_spec": "1.0.1",
        # the members' base model variant (FLUX.1 dev / schnell), where their files say it
        "modelspec.architecture": loaded[0][0].metadata.get("modelspec.architecture",
                                                            get_family(family).lora_architecture),
        "modelspec.title": Path(out).stem,
        "modelspec.merged_from": ", ".join(f"{name}:{weight:g}" for _, weight, name, _ in loaded),
        "lora_studio_mix": json.dumps({"adapters": [{"name": name, "weight": weight, **({"gates": gates} if gates else {})}
                                                    for _, weight, name, gates in loaded],
                                       "rank": rank or "exact"}),
    }
    path = save_adapter(out, AdapterFile(modules, metadata, family), dtype=dtype)
    return MixReport(Path(path), len(modules), sorted({m.rank for m in modules.values()}), energy)


def resize(src: str | Path, out: str | Path, *, dtype: torch.dtype = torch.float32, **rule) -> MixReport:
    """Reduce an adapter's rank by one rule (rank / sv_ratio / sv_fro / sv_cumulative);
    reports the share of each module's energy (sum of sigma^2) kept."""
    check_rule(**rule)
    family, loaded = _load_mix([(Path(src), 1.0)])
    if loaded[0][3] is not None:
        raise StudioError(f"{Path(src).name} is a mixture; bake it into one LoRA first, then resize that.")
    adapter = loaded[0][0]
    shapes = None
    modules, energy = {}, {}
    for name, module in adapter.modules.items():
        factors = module_factors(adapter, name)
        if factors is None:
            shapes = shapes or _layer_shapes(family, adapter)
            result = factors_of_delta(module.delta(shapes[name]), **rule)
        else:
            result = squeeze(factors, **rule)
        modules[name] = LoraModule(result.factors.down, result.factors.up, float(result.factors.rank))
        energy[name] = result.energy_kept
    metadata = dict(adapter.metadata)
    ranks = sorted({m.rank for m in modules.values()})
    metadata.update({"ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(ranks)),
                     "ss_network_module": "networks.lora",
                     "lora_studio_resize": json.dumps({"from": Path(src).name, **rule})})
    path = save_adapter(out, AdapterFile(modules, metadata, family), dtype=dtype)
    return MixReport(Path(path), len(modules), ranks, energy)


def fuse(model: str, mix: list[tuple[Path, float]], out: str | Path, *, allow_pickle: bool = False,
         workspace=None) -> Path:
    """A full single-file checkpoint (the family's single-file layout: SD1.5 / SDXL's LDM,
    FLUX.1's transformer alone in the BFL layout) with the weighted updates merged into the base weights (DoRA
    included, through its own merge rule; a fused layer's update split over the diffusers
    modules it stacks). A model name is found among those pulled into `workspace`."""
    _check_mix(mix)
    pipe = load_pipeline(model, allow_pickle=allow_pickle, workspace=workspace)
    table = name_table(family_of_pipeline(pipe).name, pipeline_models(pipe))
    with torch.no_grad():
        for path, weight in mix:
            adapter = load_adapter(path)
            missing = [n for n in adapter.modules if n not in table]
            if missing:
                raise StudioError(f"{Path(path).name} does not fit {model}: e.g. {missing[0]} has no layer there.")
            for name, module in adapter.modules.items():
                target = table[name]
                base = target.base_weight().float()
                delta = module.delta(base.shape)
                if module.dora_scale is not None:
                    delta = dora_merge(base, delta, module.dora_scale.float()) - base
                fused = base + weight * delta
                for piece, start, stop in target.rows():
                    piece.layer.weight.copy_(fused[start:stop].to(piece.layer.weight.dtype))
    return save_single_file(pipe, out)
