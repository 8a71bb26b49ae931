"""Gate values of a mixture: g[b, k, j] multiplies member k's update in LBW block j
(the family's `blocks.full` order, BASE = text encoders) for sample b. One module serves the engine
(under no_grad, one prompt and one step at a time) and the trainer (the gates learn)."""
from __future__ import annotations

import torch

from studio.errors import StudioError
from studio.adapters.mixtures.file import Mixture


def prompt_embedding(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    """[N, D]: the mean of the text encoder's input token embeddings over each prompt's
    words (start, end and padding tokens left out; zeros for an empty prompt).

    Why the input embeddings and not the encoder's pooled output: members with text-encoder
    modules change the encoder's output, so a gate computed from it would depend on the
    gates themselves and on what the engine merged for the previous request; the token
    embedding table is never adapted. The mean is linear in the prompt's words, so a
    linear gate sees a trigger word directly."""
    table = text_encoder.get_input_embeddings()
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
        words = [i for i in ids if i not in special]
        with torch.no_grad():
            if words:
                rows.append(table(torch.tensor(words, device=table.weight.device)).float().mean(0))
            else:
                rows.append(torch.zeros(table.weight.shape[1], device=table.weight.device))
    return torch.stack(rows)


class Gates(torch.nn.Module):
    """The mixture's gate parameters as torch parameters; `forward(timesteps, embedding)`
    -> [B, K, N], N the family's blocks (see studio.adapters.mixtures.file for each kind's formula)."""

    def __init__(self, mixture: Mixture):
        super().__init__()
        if mixture.gate == "arrow":
            raise StudioError("An arrow mixture routes per token and has no gates to compute or train.")
        self.kind, self.bands, self.timesteps = mixture.gate, mixture.bands, mixture.timesteps
        self.params = torch.nn.ParameterDict({k.replace(".", "_"): torch.nn.Parameter(v.detach().float().clone())
                                              for k, v in mixture.tensors.items()})

    def tensors(self) -> dict[str, torch.Tensor]:
        """The parameters under their file names (Mixture.tensors)."""
        return {k.replace("_", ".", 1): v.detach().cpu().clone() for k, v in self.params.items()}

    def band(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Band index floor(t B / T), clamped to [0, B - 1]."""
        return (timesteps.float() * self.bands / self.timesteps).floor().long().clamp(0, self.bands - 1)

    def forward(self, timesteps: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch = timesteps.shape[0]
        p = self.params
        if self.kind == "block":
            return p["gate_block"][None].expand(batch, -1, -1)
        if self.kind == "block_timestep":
            blocks = p["gate_bands"][:, self.band(timesteps).to(p["gate_bands"].device)].transpose(0, 1)
            base = p["gate_base"][None, :, None].expand(batch, -1, 1)
            return torch.cat([base, blocks], dim=2)
        if embedding is None:
            raise StudioError("A prompt-conditioned mixture needs the prompt to compute its gates.")
        logits = torch.einsum("knd,bd->bkn", p["gate_weight"], embedding.to(p["gate_weight"])) + p["gate_bias"][None]
        return 2 * torch.sigmoid(logits)
