"""Training a mixture's gates (MoLE / X-LoRA style): the member adapters frozen and applied
live (studio.adapters.mixtures.live), only the gates learn, with the diffusion loss of
trainers/trainer.py on the run's data (by default the members' own pictures and captions).

`MixtureTrainer` is the LoRA `AdapterTrainer` with a different adapter: data, loss, the random
draws per (seed, step), checkpoints, exact resume, events, samples and EMA are the same
code. What differs: the trainable parameters are the gates (`MixtureTraining`), the UNet's
gates are computed before each UNet call from its timesteps (and, for prompt gates, from the
captions of that call's samples), and the output is a mixture file.

The text encoders run with their member modules at the gates' initial BASE value (the
member weight; 1 for prompt gates, whose BASE row is left at zero): they are encoded
before the steps and cached, so their gates do not train; the engine applies the same
BASE gate to them."""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from studio.adapters import load_adapter, read_checked_header
from studio.adapters.library import find_adapter
from studio.adapters.mixtures.file import new_mixture, save_mixture
from studio.adapters.mixtures.gates import Gates, prompt_embedding
from studio.adapters.mixtures.live import LiveMembers, per_sample
from studio.errors import StudioError
from studio.jobs.runs import run_workspace
from trainers.trainer import AdapterTrainer


class MixtureTraining:
    """The gates of a mixture on a run's denoiser: the `Training` protocol of
    studio.adapters.methods (prepare, add, named_parameters, state, load_state,
    regularization, after_step); the trainer writes the mixture file itself."""

    def __init__(self, mixture, members, family):
        self.mixture, self.members = mixture, members
        self.family, self.denoiser, self.blocks = family.name, family.denoiser, family.blocks.full
        self.gates = Gates(mixture)
        self.current: torch.Tensor | None = None   # [B, K, N blocks] of the denoiser call in progress
        self.pending: list[torch.Tensor] = []      # prompt embeddings of batches not yet through the UNet
        self.sample_embedding: torch.Tensor | None = None

    def prepare(self, models, loss) -> None:
        """Nothing to measure on the base model: the gates start as the plain sum."""
        return None

    def add(self, component: str, model: torch.nn.Module, lr: float) -> list[dict]:
        if component != self.denoiser:
            raise StudioError("A mixture run trains the denoiser's gates only; set network.train_text_encoder = false.")
        device = next(model.parameters()).device
        self.gates.to(device)
        LiveMembers(self.family, {component: model}, self.members).install(per_sample(lambda: self.current))
        model.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)
        # no weight decay: a gate's neutral value is the member's weight, not 0
        return [{"params": list(self.gates.parameters()), "lr": lr, "weight_decay": 0.0}]

    def _before_denoiser(self, _module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
        self.current = self.gates(timesteps, self._embeddings(batch) if self.mixture.gate == "prompt" else None)

    def _embeddings(self, batch: int) -> torch.Tensor:
        """The prompt embeddings of the `batch` samples now entering the UNet: the sample
        prompt's, or the oldest pending batches' (a prior-preservation step joins two)."""
        if self.sample_embedding is not None:
            return self.sample_embedding.expand(batch, -1)
        taken, rows = [], 0
        while rows < batch and self.pending:
            taken.append(self.pending.pop(0))
            rows += taken[-1].shape[0]
        if rows != batch:
            raise RuntimeError(f"prompt gates: {rows} caption embeddings for a UNet batch of {batch}")
        return torch.cat(taken)

    def named_parameters(self, component: str):
        return ((f"gates.{name}", p) for name, p in self.gates.named_parameters()) if component == self.denoiser else iter(())

    def state(self) -> dict[str, torch.Tensor]:
        return {f"gates.{name}": p for name, p in self.gates.named_parameters()}

    def load_state(self, state) -> None:
        with torch.no_grad():
            for name, p in self.gates.named_parameters():
                p.copy_(state[f"gates.{name}"])

    def regularization(self) -> None:
        return None

    def after_step(self, done: int) -> None:
        return None

    def base_gates(self) -> torch.Tensor:
        """[1, K, N blocks] holding the text encoders' (BASE) gate at the start of the run."""
        with torch.no_grad():
            if self.mixture.gate == "block":
                base = self.mixture.tensors["gate.block"][:, 0]
            elif self.mixture.gate == "block_timestep":
                base = self.mixture.tensors["gate.base"]
            else:
                base = torch.ones(len(self.members))
        gates = torch.zeros(1, len(self.members), len(self.blocks))
        gates[0, :, 0] = base
        return gates


class MixtureTrainer(AdapterTrainer):
    """The LoRA trainer training a mixture's gates (see the module doc)."""

    def _mixture_parts(self):
        """(mixture with fresh gates, member AdapterFiles), made once from config.mixture."""
        if not hasattr(self, "_parts"):
            cfg = self.config.mixture
            workspace = run_workspace(self.run_dir)
            paths = [find_adapter(workspace, name) for name in cfg.members]
            dim = self.text_encoders[0].get_input_embeddings().weight.shape[1]
            mixture = new_mixture(paths, cfg.gate, bands=cfg.bands, embedding_dim=dim)
            mixture.timesteps = self.objective.timesteps
            self._parts = (mixture, [load_adapter(path) for path in paths])
        return self._parts

    def _new_adapter(self) -> MixtureTraining:
        mixture, members = self._mixture_parts()
        self._members_on_text_encoders()
        return MixtureTraining(mixture, members, self.family)

    def _members_on_text_encoders(self) -> None:
        """The members' text-encoder modules, live at their BASE gate, before any encoding."""
        if getattr(self, "_text_members", None) is None:
            mixture, members = self._mixture_parts()
            fixed = MixtureTraining(mixture, members, self.family).base_gates()
            models = dict(zip(self.family.text_encoders, self.text_encoders))
            self._text_members = LiveMembers(self.family.name, models, members).install(per_sample(lambda: fixed))

    def encode_text(self, captions):
        self._members_on_text_encoders()
        return super().encode_text(captions)

    def _captions(self, chosen, mine, varied_at):
        captions = super()._captions(chosen, mine, varied_at)
        if self._mixture_parts()[0].gate == "prompt":
            self.adapter.pending.append(prompt_embedding(self.tokenizers[0], self.text_encoders[0], captions))
        return captions

    def _sample_image(self, prompt, generator):
        if self.adapter.mixture.gate != "prompt":
            return super()._sample_image(prompt, generator)

        self.adapter.sample_embedding = prompt_embedding(self.tokenizers[0], self.text_encoders[0], [prompt])
        try:
            return super()._sample_image(prompt, generator)
        finally:
            self.adapter.sample_embedding = None

    def _export_adapter(self, started: float, path: Path, *, ema: bool, embedding_file: bool = False) -> Path:
        """The mixture file with the trained gates, beside its members in the library (a
        mixture trains no embedding: the config refuses pivotal_vectors with members, so
        there is no embedding file to write)."""
        cfg = self.config
        mixture = self.adapter.mixture
        triggers = []
        for member in mixture.members:
            for word in read_checked_header(member.path)[1].get("modelspec.trigger_phrase", "").split(","):
                if word.strip() and word.strip() not in triggers:
                    triggers.append(word.strip())
        finished = time.time()
        metadata = {
            "ss_output_name": cfg.name, "modelspec.title": cfg.name, "lora_studio_run_id": self.run_dir.name,
            "modelspec.date": datetime.datetime.fromtimestamp(finished, datetime.timezone.utc).isoformat(timespec="seconds"),
            "lora_studio_mixture_training": json.dumps({"steps": cfg.training.max_steps, "learning_rate":
                                                        cfg.training.learning_rate, "seed": cfg.seed,
                                                        "seconds": round(finished - started, 1), "ema": ema}),
            **({"modelspec.trigger_phrase": ", ".join(triggers)} if triggers else {}),
        }
        return save_mixture(path, replace(mixture, tensors=self.adapter.gates.tensors(), metadata=metadata))
