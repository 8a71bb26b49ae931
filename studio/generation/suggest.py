"""Suggest adapters for a prompt (AutoLoRA-style): compare the prompt with what each
adapter in the library was trained on (trigger words, output name, most frequent caption
tags), through the base model's own CLIP text encoder, plus exact trigger-word hits.
A suggestion is a proposal the person accepts or not, never applied by itself."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from studio.adapters import read_checked_header
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


#: Adapters whose weights point the same way as closely as this are copies of one another.
TWIN_SIMILARITY = 0.99


def _without_twins(ranked: list[Suggestion], top: int) -> list[Suggestion]:
    """The best `top` suggestions, an adapter that holds (nearly) the same weights as a
    better-ranked one left out: accepting both would apply the same change twice. The
    kept one's reason says so."""
    kept: list[Suggestion] = []
    weights: dict[Path, dict[str, torch.Tensor] | None] = {}
    for suggestion in ranked:
        twin = next((i for i, k in enumerate(kept) if _same_weights(k.path, suggestion.path, weights)), None)
        if twin is not None:
            first = kept[twin]
            kept[twin] = replace(first, reason=f"{first.reason}; {suggestion.path.stem} holds the same weights and "
                                               "is not proposed (both would double the effect)")
        elif len(kept) < top:
            kept.append(suggestion)
    return kept


def _same_weights(a: Path, b: Path, cache: dict[Path, dict[str, torch.Tensor] | None]) -> bool:
    """Whether two adapter files hold the same tensors up to rounding (a copy, or a copy
    saved at another precision): same names and shapes, cosine similarity of all values."""
    for path in (a, b):
        if path not in cache:
            try:
                from safetensors.torch import load_file

                cache[path] = load_file(str(path))
            except Exception:  # unreadable here: never a twin (the library reports the file)
                cache[path] = None
    first, second = cache[a], cache[b]
    if not first or not second or first.keys() != second.keys():
        return False
    if any(first[k].shape != second[k].shape for k in first):
        return False
    x = torch.cat([first[k].float().flatten() for k in sorted(first)])
    y = torch.cat([second[k].float().flatten() for k in sorted(second)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0)) >= TWIN_SIMILARITY
