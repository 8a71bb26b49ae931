"""Suggest adapters for a prompt (AutoLoRA-style): compare the prompt with what each
adapter in the library was trained on (trigger words, output name, most frequent caption
tags), through the base model's own CLIP text encoder, plus exact trigger-word hits.
A suggestion is a proposal the person accepts or not, never applied by itself."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

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
    from studio.adapters import read_checked_header

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
    return sorted(out, key=lambda s: -s.score)[:top]
