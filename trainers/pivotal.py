"""Pivotal tuning: a new embedding for the trigger word, trained beside the adapter (as in
OneTrainer and diffusers' advanced DreamBooth script).

The trigger word `name` becomes n new tokens in every tokenizer (`name`, `name_1`, ...: the
names diffusers' `load_textual_inversion` gives a multi-vector embedding, so its
`maybe_convert_prompt` expands the word in prompts, here and at generation alike). Each text
encoder's token embedding is wrapped: ids below the base vocabulary read the frozen table,
the new ids read n trainable vectors. Only those vectors train (no copy of the whole table
and no optimizer state for it), and the text encoders stay frozen.
"""
from __future__ import annotations

import torch

from studio.adapters.formats.embeddings import token_names
from studio.errors import StudioError


class PivotalEmbedding(torch.nn.Module):
    """A token embedding whose ids >= `first` are rows of the trainable `vectors`."""

    def __init__(self, base: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.base = base
        self.first = base.num_embeddings
        self.vectors = torch.nn.Parameter(vectors.float())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first
        out = self.base(ids.clamp(max=self.first - 1))
        if not bool(new.any()):
            return out
        rows = self.vectors.to(out.dtype)[(ids - self.first).clamp(min=0)]
        return torch.where(new[..., None], rows, out)


class PivotalTokens:
    """The trained trigger embedding across a pipeline's tokenizers and text encoders."""

    def __init__(self, name: str, vectors: int, tokenizers, encoders, *, init_word: str, seed: int):
        self.name, self.tokens = name, token_names(name, vectors)
        self.tokenizers, self.layers = list(tokenizers), []
        generator = torch.Generator().manual_seed(seed + 3)
        for tokenizer, encoder in zip(self.tokenizers, encoders):
            base = encoder.get_input_embeddings()
            clash = [t for t in self.tokens if t in tokenizer.get_vocab()]
            if clash:
                raise StudioError(f"The trigger word {name!r} is already a token of the base model's tokenizer "
                                  f"({clash[0]!r}), so pivotal tuning cannot give it a new embedding; choose a "
                                  "rarer dataset.trigger_word.")
            if len(tokenizer) != base.num_embeddings:
                raise StudioError(f"The tokenizer has {len(tokenizer)} tokens but its text encoder "
                                  f"{base.num_embeddings} embeddings; pivotal tuning needs a base model whose "
                                  "tokenizer matches its text encoder.")
            tokenizer.add_tokens(self.tokens)
            if tokenizer.convert_tokens_to_ids(self.tokens) != list(range(base.num_embeddings,
                                                                          base.num_embeddings + vectors)):
                raise StudioError(f"The tokenizer did not number the new tokens {self.tokens} after its "
                                  f"{base.num_embeddings} known ones; pivotal tuning cannot train them.")
            start = self._initial(tokenizer, base, vectors, init_word, generator)
            layer = PivotalEmbedding(base, start)
            encoder.set_input_embeddings(layer)
            self.layers.append(layer)

    @staticmethod
    def _initial(tokenizer, base: torch.nn.Embedding, vectors: int, word: str, generator) -> torch.Tensor:
        """The starting vectors: the token embeddings of `word` (cycled over the n vectors),
        else N(0, σ²) with σ the vocabulary's per-entry standard deviation (the advanced
        DreamBooth script's random start), so the new tokens start at the scale of real ones."""
        weight = base.weight.detach().float()
        if word.strip():
            ids = tokenizer(word.strip(), add_special_tokens=False).input_ids
            if not ids:
                raise StudioError(f"network.pivotal_init {word!r} has no tokens; give a word such as the class name.")
            return torch.stack([weight[ids[i % len(ids)]] for i in range(vectors)]).clone()
        return torch.randn((vectors, weight.shape[1]), generator=generator) * weight.std()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [layer.vectors for layer in self.layers]

    def expand(self, captions: list[str], pipe) -> list[str]:
        """The captions with the trigger word written as its n tokens (diffusers' own
        maybe_convert_prompt, as the pipeline does it at generation)."""
        return pipe.maybe_convert_prompt(captions, self.tokenizers[0])

    def vectors(self) -> list[torch.Tensor]:
        """One [n, width] tensor per text encoder (detached copies on the CPU)."""
        return [layer.vectors.detach().float().cpu().clone() for layer in self.layers]

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}.{i}": v for i, v in enumerate(self.vectors())}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                layer.vectors.copy_(state[f"{self.name}.{i}"])
