"""Suggest adapters for a prompt (AutoLoRA-style): compare the prompt with what each
adapter in the library was trained on (trigger words, output name, most frequent caption
tags), through the base model's own CLIP text encoder, plus exact trigger-word hits.
A suggestion is a proposal the person accepts or not, never applied by itself."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from studio.adapters import load_adapter, read_checked_header
from studio.errors import StudioError


@dataclass(frozen=True)
class Suggestion:
    path: Path
    score: float
    weight: float
    reason: str


def adapter_profile(metadata: dict[str, str], stem: str) -> tuple[str, list[str]]:
    """(descriptive text, trigger words) of an adapter from its metadata."""
    triggers = [t.strip() for t in metadata.get("modelspec.trigger_phrase", "").split(",") if t.strip()]
    tags: dict[str, int] = {}
    try:
        for counts in json.loads(metadata.get("ss_tag_frequency", "{}")).values():
            for tag, n in counts.items():
                tags[tag] = tags.get(tag, 0) + int(n)
    except (ValueError, AttributeError, TypeError):
        pass
    top = [t for t, _ in sorted(tags.items(), key=lambda kv: -kv[1])[:8]]
    name = metadata.get("ss_output_name") or stem
    return ", ".join([*triggers, name.replace("-", " ").replace("_", " "), *top]), triggers


def _embed(pipe, texts: list[str]) -> torch.Tensor:
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(encoder.device)
    with torch.no_grad():
        pooled = encoder(ids)[1]
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def suggest(engine, prompt: str, adapters: list[Path], *, model: str = "builtin", top: int = 3,
            min_score: float = 0.5) -> list[Suggestion]:
    """Adapters ranked for `prompt`; weight grows with the match (0.6-1.0)."""
    if not prompt.strip():
        raise StudioError("Give a prompt to suggest adapters for.")
    profiles = []
    for path in adapters:
        try:
            metadata = read_checked_header(path)[1]
        except StudioError:
            continue
        profiles.append((path, *adapter_profile(metadata, path.stem)))
    if not profiles:
        return []
    pipe = engine.set_mix(model, [])  # the base text encoder, whatever mix the engine ran last
    vectors = _embed(pipe, [prompt] + [text for _, text, _ in profiles])
    similarity = (vectors[1:] @ vectors[0]).tolist()
    words = set(prompt.lower().replace(",", " ").split())
    out = []
    for (path, _, triggers), sim in zip(profiles, similarity):
        hits = [t for t in triggers if t.lower() in words]
        score = min(1.0, sim + (0.5 if hits else 0.0))
        if score < min_score:
            continue
        reason = f"trigger word {hits[0]!r} in the prompt" if hits else f"text similarity {sim:.2f}"
        out.append(Suggestion(path, round(score, 3), round(0.6 + 0.4 * score, 2), reason))
    return _without_twins(sorted(out, key=lambda s: -s.score), top)


#: Adapters whose weight changes point the same way as closely as this are copies of one another.
TWIN_SIMILARITY = 0.99


def _without_twins(ranked: list[Suggestion], top: int) -> list[Suggestion]:
    """The best `top` suggestions, an adapter that makes (nearly) the same change to the
    model as a better-ranked one left out: accepting both would apply it twice. The kept
    one's reason says so."""
    kept: list[Suggestion] = []
    loaded: dict[Path, dict | None] = {}
    for suggestion in ranked:
        twin = next((i for i, k in enumerate(kept) if _same_change(k.path, suggestion.path, loaded)), None)
        if twin is not None:
            first = kept[twin]
            kept[twin] = replace(first, reason=f"{first.reason}; {suggestion.path.stem} makes the same change and "
                                               "is not proposed (both would double the effect)")
        elif len(kept) < top:
            kept.append(suggestion)
    return kept


def _same_change(a: Path, b: Path, loaded: dict[Path, dict | None]) -> bool:
    """Whether two adapter files change the model the same way up to rounding (a copy, or
    a copy saved at another precision or layout): the same modules, and a cosine similarity
    of their weight changes ΔW (all modules together) of at least TWIN_SIMILARITY.

    ΔW, not the stored factors: two LoRAs trained from the same seed share their random
    down-projections, which outweigh the small trained up-projections, so their factors
    are alike (cosine > 0.99 after a short run) while ΔW = up·down·α/r, what the model
    gets, differs."""
    for path in (a, b):
        if path not in loaded:
            try:
                loaded[path] = load_adapter(path).modules
            except Exception:  # unreadable here: never a twin (the library reports the file)
                loaded[path] = None
    first, second = loaded[a], loaded[b]
    if not first or not second or first.keys() != second.keys():
        return False
    inner = sum(_inner(first[name], second[name]) for name in first)
    norms = sum(_inner(m, m) for m in first.values()) * sum(_inner(m, m) for m in second.values())
    return norms > 0 and inner / math.sqrt(norms) >= TWIN_SIMILARITY


def _inner(a, b) -> float:
    """The Frobenius inner product <ΔW_a, ΔW_b> of two modules of one layer. For two LoRA
    factorisations s·U·D it is s_a·s_b·Σ (U_aᵀU_b) ∘ (D_a D_bᵀ), r x r matrices, so a
    full-size model's layers are never multiplied out."""
    if _is_factor_pair(a) and _is_factor_pair(b):
        ua, da = a.up.float().flatten(1), a.down.float().flatten(1)
        ub, db = b.up.float().flatten(1), b.down.float().flatten(1)
        if ua.shape[0] != ub.shape[0] or da.shape[1] != db.shape[1]:
            return 0.0
        return a.scale * b.scale * float(((ua.T @ ub) * (da @ db.T)).sum())
    delta_a, delta_b = a.delta(), b.delta()
    return float(delta_a @ delta_b) if delta_a.shape == delta_b.shape else 0.0


def _is_factor_pair(module) -> bool:
    """Whether a module is stored as two factors, its delta() being scale·up·down."""
    return module.tensors.keys() == {"lora_up.weight", "lora_down.weight"}
