"""DreamBooth-style adapter training on the denoiser (and optionally the text encoders) of a
base model of any family, driven by accelerate. The family (studio.models.families) says
which denoiser and text encoders the pipeline has, how captions condition it, how it is
called and its training objective (noise schedule, target, loss weighting, timestep
sampling); the method (studio.adapters.methods) says what the adapter is. This loop names
neither.

Read top to bottom: load -> data -> caches -> adapters -> optimizer -> resume -> loop.
Every step's randomness (noise, timesteps, latent sampling, dropout, crops, flips, data
order) comes from generators seeded by (seed, micro-step), so a resumed run repeats
exactly what an uninterrupted one would have done.

Data parallel (`training.num_processes` > 1, started by `accelerate launch`): the global
batch of a step and all its random draws come from (seed, step) in the order one process
draws them, and each process keeps its slice, so N processes with batch b train what one
process with batch N*b trains (and one process trains as before data parallelism came). Only the main process writes events, checkpoints, samples and the
adapter; the others wait at those points.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from studio.adapters import read_checked_header, training_metadata
from studio.adapters.formats.embeddings import save_embedding
from studio.adapters.methods import get_method
from studio.config import TrainConfig, check_device_support, device_notes, load_config, steps_for_epochs
from studio.datasets import caption_with_trigger, load_items, open_mask
from studio.errors import StudioError
from studio.fsutil import remove_stale_temp_files
from studio.models.families import get_family
from studio.jobs.runs import (CONFIG_FILE, EMBEDDINGS_DIR, SAMPLES_DIR, EventLog, adapters_dir, check_training,
                              checkpoint_dir, class_pictures, dataset_folder, iter_events, preview_sample,
                              run_workspace)
from studio.models import AS_STORED, load_pipeline, resolve_model
from trainers.cache import VAE_DECODER, DiskCache, file_digest, module_digest, vocabulary_digest
from trainers.cache import key as cache_key
from trainers.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from trainers.data import (BatchOrder, Example, caption_variant, center_crop_offsets, choose_bucket, epochs_done,
                           micro_generator, prepare_image, prepare_mask, random_crop_offsets, sample_generator,
                           validation_indices)
from trainers.low_memory import STORAGE, nf4_quantization, own_storage, store_frozen_weights, store_loaded_weights
from trainers.pivotal import PivotalTokens
from trainers.tensorboard import TensorBoardLog

log = logging.getLogger(__name__)


# (noise, timestep) draws per held-out picture in the validation loss: enough that its value
# follows the weights rather than which timesteps were drawn.
VALIDATION_DRAWS = 4
# The micro-generator stream of the batches a method measures the base model on before
# training (Training.prepare): apart from training's (0) and validation's (2).
PREPARE_STREAM = 3
# A phase's progress (caching latents, drawing samples) is written at most this often: a real
# model's picture takes seconds, the tiny model caches hundreds a second.
PHASE_EVERY_S = 1.0


@dataclass
class Batch:
    """This process's share of a global micro-batch, ready for the denoiser."""

    latents: torch.Tensor                  # [b, C, h, w], scaled as the denoiser sees them
    conditioning: dict[str, torch.Tensor]  # the family's text (and size) conditioning, batch-first
    mask: torch.Tensor | None              # [b, h, w] loss weights (dataset.masked_loss)
    count: int                             # samples in the global micro-batch
    places: list[int]                      # this share's places in it

    def join(self, other: "Batch") -> "Batch":
        """Both batches as one denoiser pass (instance and class pictures of one bucket):
        `other`'s places follow this batch's samples."""
        def cat(a, b):
            return None if a is None else torch.cat([a, b])

        return Batch(cat(self.latents, other.latents),
                     {key: cat(value, other.conditioning[key]) for key, value in self.conditioning.items()},
                     cat(self.mask, other.mask), self.count + other.count,
                     self.places + [self.count + p for p in other.places])


class TrainingFailed(StudioError):
    """The run stopped for a reason a person can act on (NaN loss, out of memory)."""


class TrainingCancelled(Exception):
    """SIGTERM/SIGINT asked the run to stop; a checkpoint was saved first."""


class AdapterTrainer:
    def __init__(self, run_dir: Path, config: TrainConfig | None = None, *, show_progress: bool = True):
        self.run_dir = Path(run_dir)
        self.config = config or load_config(self.run_dir / CONFIG_FILE)
        # accelerate launch / torchrun number the processes in RANK; the Accelerator agrees.
        self.is_main = os.environ.get("RANK", "0") == "0"
        self.events = EventLog(self.run_dir, write=self.is_main)
        # opened by the training loop, which knows the step it starts at
        self.tensorboard = TensorBoardLog(self.run_dir, write=False, start_step=0)
        self.show_progress = show_progress
        self.pivotal = None  # the trigger's trained embedding (network.pivotal_vectors), made by _setup

    # ---------------------------------------------------------------- set-up
    def setup(self) -> None:
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        cfg = self.config
        if cfg.training.num_threads:
            torch.set_num_threads(cfg.training.num_threads)
        check_device_support(cfg)
        for note in device_notes(cfg):
            log.warning(note)
        self.accelerator = Accelerator(
            gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
            mixed_precision=cfg.training.mixed_precision,
            cpu=not torch.cuda.is_available(),
        )
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if self.world != cfg.training.num_processes:
            raise StudioError(f"training.num_processes is {cfg.training.num_processes} but {self.world} processes "
                              "were started; start the run with `lora-studio train` or the queue, which launch "
                              "the number the config asks for.")
        device = self.accelerator.device
        self.events.emit("phase", phase="loading")
        self.model_ref = resolve_model(cfg.base_model, workspace=run_workspace(self.run_dir))
        self.family = get_family(self.model_ref.family)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.training.mixed_precision, torch.float32)
        base_weights = cfg.training.base_weights
        pipe = load_pipeline(self.model_ref, denoiser_dtype=self.weight_dtype,
                             torch_dtype=AS_STORED if base_weights == "bf16" else None,
                             denoiser_quantization=nf4_quantization(self.weight_dtype) if base_weights == "nf4" else None)
        self.pipe = pipe
        self.objective = self.family.objective(pipe)
        self.vae, self.denoiser = pipe.vae, getattr(pipe, self.family.denoiser)
        self.text_encoders = [getattr(pipe, attr) for attr in self.family.text_encoders]
        self.tokenizers = [getattr(pipe, attr) for attr in self.family.tokenizers]
        for module in (self.vae, self.denoiser, *self.text_encoders):
            module.requires_grad_(False)
            module.to(device)
        if base_weights == "bf16":  # narrowed from the file's dtype as loaded: never widened whole first
            self.vae.to(dtype=self.weight_dtype)
            store_loaded_weights(self.denoiser, STORAGE[base_weights], self.weight_dtype,
                                 keep=self.family.full_precision_modules)
            for encoder in self.text_encoders:
                store_loaded_weights(encoder, STORAGE[base_weights],
                                     torch.float32 if cfg.network.train_text_encoder else self.weight_dtype)
        elif self.weight_dtype != torch.float32:
            self.vae.to(dtype=self.weight_dtype)
            if not cfg.network.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.to(dtype=self.weight_dtype)

        # data
        folder = self._dataset_folder()
        items = load_items(folder)
        instance = [it for it in items if not it.is_regularisation]
        if not instance:  # the dataset changed since the run was queued: say what is wrong as the check does
            check_training(cfg, run_workspace(self.run_dir)).raise_problems()
        examples = [self._example(it.path, self.caption(it.caption), it.repeats, it.size) for it in instance]
        held_out = validation_indices(len(examples), cfg.dataset.validation_split, cfg.seed)
        if held_out and len(held_out) >= len(examples):
            raise StudioError(f"dataset.validation_split = {cfg.dataset.validation_split:g} holds out every one of the "
                              f"{len(examples)} training pictures; lower it or add pictures.")
        self.validation = [examples[i] for i in held_out]
        self.instance = [example for i, example in enumerate(examples) if i not in held_out]
        global_batch = cfg.training.batch_size * self.world
        self.instance_order = BatchOrder(self.instance, global_batch, cfg.seed)
        if cfg.training.max_epochs:  # from here on the run is max_steps long, in its events and metadata too
            cfg.training.max_steps = steps_for_epochs(cfg.training.max_epochs, self.instance_order.batches_per_epoch,
                                                      cfg.training.gradient_accumulation_steps)
        self.class_examples = [self._example(item.path, item.caption, 1, item.size)
                               for item in class_pictures(cfg, run_workspace(self.run_dir))]
        if self.class_examples:
            class_batch = (cfg.dataset.class_batch_size or cfg.training.batch_size) * self.world
            self.class_order = BatchOrder(self.class_examples, class_batch, cfg.seed + 1)
        self.cache_latents = cfg.training.cache_latents and cfg.dataset.center_crop
        if cfg.training.cache_latents and not cfg.dataset.center_crop:
            log.warning("latent caching is off: random crops need a fresh VAE pass per step")
        # Shuffled tags make more variants than are worth caching: those captions are encoded
        # every step. Dropout has one variant, the empty caption, which is cached.
        self.cache_text = (cfg.training.cache_text_embeddings and not cfg.network.train_text_encoder
                           and not cfg.dataset.shuffle_tags and not cfg.network.pivotal_vectors)
        # The trigger word's tag (first, by caption_with_trigger) never moves.
        self.keep_tags = max(cfg.dataset.keep_tokens, 1 if cfg.dataset.trigger_word.strip() else 0)
        self._latent_cache: dict[tuple[Path, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_cache: dict[tuple[Path, bool], torch.Tensor] = {}
        if cfg.dataset.masked_loss:
            self._check_masks()
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self.disk_cache = (DiskCache(run_workspace(self.run_dir).cache_dir)
                           if cfg.training.cache_to_disk else None)
        if self.cache_latents:
            self._fill_latent_cache()
        if self.cache_text:
            self._fill_text_cache()
        if self.disk_cache is not None and (self.cache_latents or self.cache_text):
            entries, size = self.disk_cache.usage()
            self.events.emit("cache", from_disk=self.disk_cache.hits, encoded=self.disk_cache.misses,
                             folder=str(self.disk_cache.folder), entries=entries, bytes=size)

        # adapters: the method (network.type) injects itself and names what trains
        net = cfg.network
        self.adapter = self._new_adapter()
        denoiser_name = self.family.denoiser
        # the text encoders a text-encoder adapter trains: the family's choice (FLUX.1: CLIP-L, not T5)
        adapted = [(component, encoder) for component, encoder in zip(self.family.text_encoders, self.text_encoders)
                   if net.train_text_encoder and component in self.family.text_encoder_lora]
        measured = self.adapter.prepare({denoiser_name: self.denoiser, **dict(adapted)},
                                        lambda i: self.loss(i, stream=PREPARE_STREAM))
        if measured is not None:
            self.events.emit("adapter_prepared", **measured)
        self.adapter.unadapted_sections = tuple(section for section, weight in self.block_lr_weights().items()
                                                if weight == 0)
        torch.manual_seed(cfg.seed)  # the adapters' initial weights are a function of the seed
        params = self.block_groups(self.adapter.add(denoiser_name, self.denoiser, cfg.training.learning_rate))
        for component, encoder in adapted:
            params += self.adapter.add(component, encoder, cfg.training.text_encoder_lr or cfg.training.learning_rate)
        if net.pivotal_vectors:  # the trigger's embedding, at its own learning rate
            self.pivotal = PivotalTokens(cfg.dataset.trigger_word.strip(), net.pivotal_vectors, self.tokenizers,
                                         self.text_encoders, init_word=net.pivotal_init, seed=cfg.seed)
            params.append({"params": self.pivotal.parameters(),
                           "lr": cfg.training.embedding_lr or cfg.training.learning_rate})
        if base_weights == "fp8":  # after the adapters are injected: PiSSA / OLoRA read full-precision weights
            store_frozen_weights(self.denoiser, STORAGE[base_weights], keep=self.family.full_precision_modules)
        if base_weights in STORAGE:
            own_storage(self.vae, self.denoiser, *self.text_encoders)  # lets a loaded folder's file mappings go
        self.trainable = [p for group in params for p in group["params"]]
        for p in self.trainable:
            p.data = p.data.float()
        t = cfg.training
        if t.ema_decay is not None and t.ema_start_step >= t.max_steps:
            raise StudioError(f"training.ema_start_step is {t.ema_start_step} but the run is {t.max_steps} steps "
                              "long; start the EMA earlier or unset training.ema_decay.")
        self.ema: list[torch.Tensor] | None = None
        self._update_ema(0)
        if cfg.training.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()

        optimizer = self._optimizer(params)
        lr_scheduler = get_scheduler(cfg.training.lr_scheduler, optimizer=optimizer,
                                     num_warmup_steps=cfg.training.lr_warmup_steps,
                                     num_training_steps=cfg.training.max_steps)
        # Models prepared without DDP: gradients are averaged by _average_gradients, which also
        # covers T-LoRA's parameters (outside the UNet's module tree, attached by hooks). The
        # LR scheduler is not handed to accelerate, whose wrapper steps it once per process.
        self.denoiser = self.accelerator.prepare_model(self.denoiser, evaluation_mode=True)
        self.optimizer, self.lr_scheduler = self.accelerator.prepare_optimizer(optimizer), lr_scheduler
        if net.train_text_encoder:
            self.text_encoders = [self.accelerator.prepare_model(encoder, evaluation_mode=True)
                                  for encoder in self.text_encoders]

    def _new_adapter(self):
        """What this run trains: the method network.type names (a studio.adapters.methods.Training)."""
        cfg = self.config
        return get_method(cfg.network.type).training(cfg.network, seed=cfg.seed, max_steps=cfg.training.max_steps)

    def _dataset_folder(self) -> Path:
        folder = dataset_folder(self.config, run_workspace(self.run_dir))
        if not folder.is_dir():
            check_training(self.config, run_workspace(self.run_dir)).raise_problems()
        return folder

    def caption(self, caption: str) -> str:
        ds = self.config.dataset
        return caption_with_trigger(caption.strip() or ds.instance_prompt.strip(), ds.trigger_word.strip())

    def block_lr_weights(self) -> dict[str, float]:
        """The denoiser's sections (its family's) -> training.block_lr_<key>."""
        t = self.config.training
        return {section: getattr(t, f"block_lr_{key}") for key, section in self.family.sections.items()}

    def block_groups(self, groups: list[dict]) -> list[dict]:
        """The UNet adapter's parameter groups split by UNet section: a parameter in the down
        blocks trains at its group's lr x training.block_lr_down, in the mid block x
        block_lr_mid, in the up blocks x block_lr_up; elsewhere (conv_in, time embedding,
        conv_out) at its group's lr. Each group says its section under "block". With every
        multiplier 1 the groups stay as the method made them (earlier runs' checkpoints resume)."""
        weights = self.block_lr_weights()
        if all(w == 1.0 for w in weights.values()):
            return groups
        section = {id(p): name.split(".")[0] for name, p in self.adapter.named_parameters(self.family.denoiser)}
        split = []
        for group in groups:
            by_section: dict[str, list] = {}
            for p in group["params"]:
                by_section.setdefault(section[id(p)] if section[id(p)] in weights else "other", []).append(p)
            split += [{**group, "params": params, "block": name, "lr": group["lr"] * weights.get(name, 1.0)}
                      for name, params in by_section.items()]
        for group in split:
            if group["lr"] == 0:  # no gradient either: the backward pass stops short of those blocks
                for p in group["params"]:
                    p.requires_grad_(False)
        return split

    def _optimizer(self, params):
        """The configured optimizer over the adapter's parameter groups. Every choice is stepped
        by the one LR schedule (training.lr_scheduler), which scales each group's `lr`:

        - prodigy: the update is lr * d, d being Prodigy's running estimate of the distance to
          the solution (times d_coef); lr = 1 is its authors' setting, so the schedule is a
          multiplier of d, one for every group (the config refuses groups at other rates).
          Adam's bias correction on, as kohya's Prodigy recipes for diffusion LoRAs set it;
          with warm-up, safeguard_warmup keeps the small early lr out of d's estimate.
        - adafactor: relative_step off, the configured lr and schedule, no parameter scaling
          (scale_parameter off) and no first moment (beta1 None): kohya's and OneTrainer's
          LoRA recipe. Its own relative-step schedule (lr = min(1e-2, 1/sqrt(step)) x RMS(p))
          ignores training.learning_rate and was made for full-model training, where an
          adapter's B = 0 start would give it an RMS of zero to scale by.
        """
        t = self.config.training
        if t.optimizer == "prodigy":
            from prodigyopt import Prodigy

            return Prodigy(params, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon,
                           weight_decay=t.weight_decay, d_coef=t.prodigy_d_coef, use_bias_correction=True,
                           safeguard_warmup=t.lr_warmup_steps > 0)
        if t.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(params, lr=t.learning_rate, relative_step=False, scale_parameter=False,
                             warmup_init=False, beta1=None, weight_decay=t.weight_decay)
        kwargs = dict(betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay)
        if t.optimizer == "adamw8bit":
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise StudioError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
            return bnb.optim.AdamW8bit(params, **kwargs)
        # The fused kernel updates every tensor in one pass: ~10x cheaper than the default
        # per-tensor (foreach) AdamW on the CPU for the tiny model (bench/train_speed.py).
        return torch.optim.AdamW(params, fused=True, **kwargs)

    # ---------------------------------------------------------------- encoding
    def _example(self, path: Path, caption: str, repeats: int, size: tuple[int, int]) -> Example:
        ds = self.config.dataset
        bucket = choose_bucket(size, ds.resolution, enabled=ds.enable_bucket, no_upscale=ds.bucket_no_upscale)
        return Example(path, caption, repeats, size, bucket)

    def encode_text(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The family's text conditioning of `captions`; with pivotal tuning the trigger word
        is first written as its tokens."""
        if self.pivotal is not None:
            captions = self.pivotal.expand(captions, self.pipe)
        return self.family.encode_text(self.tokenizers, self.text_encoders, captions, self.accelerator.device)

    @torch.no_grad()
    def latent_dist(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(pixels.to(self.accelerator.device, self.weight_dtype)).latent_dist
        return dist.mean, dist.std

    def _fill_latent_cache(self) -> None:
        """Each picture's VAE posterior (mean, std) per flip, read from the disk cache
        (trainers.cache: keyed by the VAE encoder's weights, its dtype, the picture's bytes,
        bucket and flip) or encoded and written there; reported as a `phase` event (caching,
        done/total, eta_s) at most every PHASE_EVERY_S."""
        flips = (False, True) if self.config.dataset.random_flip else (False,)
        todo = list(dict.fromkeys((example, flip) for example in self.instance + self.class_examples + self.validation
                                  for flip in flips))
        phase = PhaseReport(self.events, "caching", len(todo))
        vae = None
        for example, flip in todo:
            if (example.path, flip) not in self._latent_cache:
                name = stored = None
                if self.disk_cache is not None:
                    vae = vae or module_digest(self.vae, exclude=VAE_DECODER)
                    name = cache_key("latents", vae, str(self.weight_dtype), file_digest(example.path),
                                     example.bucket, "center", flip)
                    stored = self.disk_cache.get("latents", name)
                if stored is not None:
                    self._latent_cache[(example.path, flip)] = (stored["mean"], stored["std"])
                else:
                    pixels, _ = prepare_image(example.path, example.bucket, center_crop=True, flip=flip,
                                              generator=None)
                    mean, std = self.latent_dist(pixels[None])
                    self._latent_cache[(example.path, flip)] = (mean[0], std[0])
                    if name is not None:
                        self.disk_cache.put("latents", name, {"mean": mean[0], "std": std[0]})
            phase.advance()

    @torch.no_grad()
    def _fill_text_cache(self) -> None:
        """Each caption's text conditioning (and the empty caption's, for caption dropout), read
        from the disk cache (keyed by the text encoders' weights, the tokenizers' vocabularies,
        the family and the caption) or encoded and written there."""
        cfg = self.config
        dropped = [""] if cfg.dataset.caption_dropout_rate else []
        captions = [example.caption for example in self.instance + self.class_examples + self.validation]
        encoders = None
        for caption in captions + dropped:
            if caption in self._text_cache:
                continue
            name = None
            if self.disk_cache is not None:
                encoders = encoders or cache_key(module_digest(*self.text_encoders), vocabulary_digest(self.tokenizers))
                name = cache_key("text", self.family.name, encoders, caption)
                stored = self.disk_cache.get("text", name)
                if stored is not None:
                    self._text_cache[caption] = stored
                    continue
            self._text_cache[caption] = {k: v[0] for k, v in self.encode_text([caption]).items()}
            if name is not None:
                self.disk_cache.put("text", name, self._text_cache[caption])

    def _check_masks(self) -> None:
        """Every picture's mask decodes and fits its picture (open_mask says what is wrong);
        an all-black mask is refused while unmasked_weight is 0: that picture would train nothing."""
        unmasked = 0
        for example in self.instance + self.class_examples + self.validation:
            mask = open_mask(example.path)
            if mask is None:
                unmasked += 1
            elif mask.getextrema()[1] == 0 and not self.config.dataset.unmasked_weight:
                raise StudioError(f"The mask of {example.path.name} is all black, so with dataset.masked_loss it "
                                  "would train nothing; paint what should train white, delete the mask, or set "
                                  "dataset.unmasked_weight above 0.")
        if unmasked:
            log.info("masked loss: %d pictures have no mask or alpha channel and train whole", unmasked)

    def _latent_mask(self, example: Example, crop: tuple[int, int], flip: bool, latent_size) -> torch.Tensor:
        """The loss weight of each latent cell of `example` cut at `crop`, mirrored with `flip`:
        u + (1 - u) x mask, u = dataset.unmasked_weight (prepare_mask); 1 without a mask.
        Kept per (picture, flip) with centre crops, where the crop never changes."""
        key = (example.path, flip)
        if key in self._mask_cache:
            return self._mask_cache[key]
        mask = open_mask(example.path)
        if mask is None:
            weight = torch.ones(tuple(latent_size))
        else:
            u = self.config.dataset.unmasked_weight
            weight = u + (1.0 - u) * prepare_mask(mask, example.size, example.bucket, crop, flip, latent_size)
        if self.config.dataset.center_crop:
            self._mask_cache[key] = weight
        return weight

    def _mine(self, count: int) -> list[int]:
        """This process's places in a global micro-batch of `count` samples: all of them for
        one process; else batch_size places from rank x batch_size on, wrapping around in a
        bucket's last short batch so that every process has batch_size samples."""
        if self.world == 1:
            return list(range(count))
        size = self.config.training.batch_size
        return [place % count for place in range(self.rank * size, (self.rank + 1) * size)]

    def batch(self, examples: list[Example], indices: list[int], generator: torch.Generator, *,
               varied_at: int | None = None, whole: bool = False) -> Batch:
        """Latents, the family's conditioning (text; SDXL's size too) and (dataset.masked_loss)
        the latent loss weights of this process's share of a global micro-batch (`whole`: of
        all of it), with the batch's size and the share's places in it. Every random choice
        (flips, crops, latent samples) is drawn for the
        whole global batch from the micro-step's generator, in the order one process draws
        them, and each process keeps its share's: so N processes train what one process with
        the whole batch trains. `varied_at` (the micro-step, for training pictures): caption
        dropout and tag order from each sample's own generator (sample_generator), apart
        from that stream."""
        cfg = self.config
        chosen = [examples[i] for i in indices]
        mine = list(range(len(chosen))) if whole else self._mine(len(chosen))
        flips = [bool(torch.rand((), generator=generator) < 0.5) if cfg.dataset.random_flip else False
                 for _ in chosen]
        if self.cache_latents:
            stats = [self._latent_cache[(chosen[p].path, flips[p])] for p in mine]
            mean = torch.stack([m for m, _ in stats])
            std = torch.stack([s for _, s in stats])
            crops = [center_crop_offsets(chosen[p].size, chosen[p].bucket) for p in mine]
        else:
            prepared = {}
            for place, (example, flip) in enumerate(zip(chosen, flips)):
                if place in mine:
                    prepared[place] = prepare_image(example.path, example.bucket, center_crop=cfg.dataset.center_crop,
                                                    flip=flip, generator=generator)
                elif not cfg.dataset.center_crop:  # the crop another process draws for it
                    random_crop_offsets(example.size, example.bucket, generator)
            mean, std = self.latent_dist(torch.stack([prepared[p][0] for p in mine]))
            crops = [prepared[p][1] for p in mine]
        eps = torch.randn((len(chosen), *mean.shape[1:]), generator=generator)[mine].to(mean.device, mean.dtype)
        latents = self._scaled_latents((mean + std * eps).float())
        captions = self._captions(chosen, mine, varied_at)
        if self.cache_text:
            cached = [self._text_cache[c] for c in captions]
            conditioning = {key: torch.stack([c[key] for c in cached]) for key in cached[0]}
        else:
            conditioning = self.encode_text(captions)
        conditioning.update(self.family.size_conditioning([chosen[p] for p in mine], crops))
        mask = None
        if cfg.dataset.masked_loss:
            mask = torch.stack([self._latent_mask(chosen[p], crop, flips[p], latents.shape[-2:])
                                for p, crop in zip(mine, crops)]).to(latents.device)
        return Batch(latents, conditioning, mask, len(chosen), mine)

    def _scaled_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """A VAE latent sample as the denoiser sees it: (z - shift) x scale, both from the VAE's
        config (SD's VAEs have no shift; FLUX.1's has one)."""
        vae = self.vae.config
        return (sample - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor

    def _captions(self, chosen: list[Example], mine: list[int], varied_at: int | None) -> list[str]:
        """The captions of this process's share of a micro-batch: as written, or (training
        pictures, `varied_at` = the micro-step) with caption dropout and tag order drawn
        from each sample's own generator."""
        cfg, ds = self.config, self.config.dataset
        return [chosen[p].caption if varied_at is None else
                caption_variant(chosen[p].caption, sample_generator(cfg.seed, varied_at, 0, p),
                                dropout_rate=ds.caption_dropout_rate, shuffle=ds.shuffle_tags, keep=self.keep_tags)
                for p in mine]

    # ---------------------------------------------------------------- loss
    def loss(self, micro_step: int, stream: int = 0) -> torch.Tensor:
        cfg = self.config
        generator = micro_generator(cfg.seed, micro_step, stream)
        # adapter dropout: its own stream per process
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)) + self.rank)
        instance = self.batch(self.instance, self.instance_order.batch(micro_step), generator, varied_at=micro_step)
        if not self.class_examples:
            return self.per_sample_loss(instance, generator).mean()
        prior = self.batch(self.class_examples, self.class_order.batch(micro_step), generator)
        weight = cfg.dataset.prior_loss_weight
        if instance.latents.shape[1:] == prior.latents.shape[1:]:  # same bucket: one denoiser pass
            per_sample = self.per_sample_loss(instance.join(prior), generator)
            n = len(instance.places)
            return per_sample[:n].mean() + weight * per_sample[n:].mean()
        return self.per_sample_loss(instance, generator).mean() + weight * self.per_sample_loss(prior, generator).mean()

    def predict(self, denoiser: torch.nn.Module, batch: Batch, noise: torch.Tensor,
                timesteps: torch.Tensor) -> torch.Tensor:
        """`denoiser`'s prediction for `batch`'s latents noised with `noise` at `timesteps` (the
        family's objective and call): how a test compares a denoiser with the trained one."""
        device = next(denoiser.parameters()).device
        latents, noise, timesteps = batch.latents.to(device), noise.to(device), timesteps.to(device)
        return self.family.predict(denoiser, self.objective.noisy(latents, noise, timesteps), timesteps,
                                   batch.conditioning)

    def per_sample_loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Per-sample loss of this process's share: noise (with training.noise_offset) and
        timesteps drawn for the whole global batch of `batch.count` samples (see _batch), the
        share's at `batch.places`; the noisy input, target and loss weight are the family
        objective's. With loss weights `batch.mask` [B, h, w] it is masked_mean's."""
        cfg = self.config
        device = self.accelerator.device
        latents, mine, count = batch.latents, batch.places, batch.count
        noise = torch.randn((count, *latents.shape[1:]), generator=generator)[mine]
        if cfg.training.noise_offset:
            noise += cfg.training.noise_offset * torch.randn((count, latents.shape[1], 1, 1), generator=generator)[mine]
        timesteps = self.objective.sample_timesteps(count, generator, cfg.training)[mine]
        noise, timesteps, latents = noise.to(device), timesteps.to(device), latents.to(device)
        noisy = self.objective.noisy(latents, noise, timesteps)
        prediction = self.family.predict(self.denoiser, noisy, timesteps, batch.conditioning)
        target = self.objective.target(latents, noise, timesteps)
        error = F.mse_loss(prediction.float(), target.float(), reduction="none")
        per_sample = error.mean(dim=(1, 2, 3)) if batch.mask is None else masked_mean(error, batch.mask)
        weight = self.objective.loss_weight(timesteps, cfg.training)
        return per_sample if weight is None else per_sample * weight

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Mean loss over the held-out pictures (dataset.validation_split), VALIDATION_DRAWS
        draws each (latent sample, noise, timestep, flip) from a generator of the picture's
        own (stream 2 of micro-generator i), captions as written, no adapter dropout: the
        same draws at every evaluation, so the value changes only with the weights."""
        models = [self.accelerator.unwrap_model(self.denoiser)] + [m for _, m in self.text_encoder_components()]
        modes = [model.training for model in models]
        for model in models:
            model.eval()
        losses = []
        for i in range(len(self.validation)):
            generator = micro_generator(self.config.seed, i, stream=2)
            losses.append(self.per_sample_loss(self.batch(self.validation, [i] * VALIDATION_DRAWS, generator,
                                                            whole=True), generator))
        for model, mode in zip(models, modes):
            model.train(mode)
        return float(torch.cat(losses).mean())

    def _validate(self, step: int) -> None:
        """The main process evaluates and writes the validation loss; all wait for it."""
        if self.is_main:
            loss = self.validation_loss()
            self.events.emit("validation", step=step, loss=loss)
            self.tensorboard.scalars(step, validation_loss=loss)
        self.accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- state
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in self.adapter.state().items()}

    def text_encoder_components(self) -> list[tuple[str, torch.nn.Module]]:
        """(pipeline attribute, model) of each text encoder."""
        return [(name, self.accelerator.unwrap_model(enc)) for name, enc in zip(self.family.text_encoders,
                                                                                 self.text_encoders)]

    def load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        self._replace_parameters(self.adapter.load_state(state))

    # ---------------------------------------------------------------- run
    def run(self, *, resume: bool = True) -> Path | None:
        started = time.time()
        try:
            self.setup()
            return self.train(resume=resume, started=started)
        except TrainingCancelled:
            raise
        except StudioError as error:  # the same in every process (config, data, NaN loss): written once
            self.events.emit("error", message=str(error))
            raise
        except torch.cuda.OutOfMemoryError:
            message = ("CUDA ran out of memory. Lower training.batch_size or dataset.resolution, or turn on "
                       "training.gradient_checkpointing.")
            self.events.emit("error", message=message)
            raise TrainingFailed(message) from None
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.events.emit("error", message=f"{type(error).__name__}: {error}")
                raise
            # Every write is atomic: the file being written is dropped, the last good one stays.
            message = (f"The disk is full ({error.filename or self.run_dir}). The last checkpoint is intact; "
                       "free some space, then resume the run.")
            self.events.emit("error", message=message)
            raise TrainingFailed(message) from None
        except Exception as error:
            if _is_peer_failure(error):
                message = (f"Another process of this run stopped ({type(error).__name__}: {error}); see "
                           "worker.log in the run folder. Resume continues from the last checkpoint.")
                if self.is_main and not _error_since_start(self.run_dir):
                    self.events.emit("error", message=message)
                raise TrainingFailed(message) from None
            self._emit_own_error(f"{type(error).__name__}: {error}")
            raise
        finally:
            self.tensorboard.close()

    def _emit_own_error(self, message: str) -> None:
        """This process's own error, written once: by the main process, or by another
        process that failed by itself (the main one then reports only that a peer stopped)."""
        if self.is_main:
            self.events.emit("error", message=message)
        elif getattr(self, "world", 1) > 1:
            EventLog(self.run_dir).emit("error", message=f"process {self.rank + 1} of {self.world}: {message}")

    def _check_checkpoint_fits(self, checkpoint: Path, state: dict) -> None:
        """A checkpoint resumes exactly only into the parameters it was saved from, group by
        group. Checked before anything loads: peft would quietly load the modules that match,
        then torch's optimizer refuse the rest with a bare ValueError."""
        saved = [len(group["params"]) for group in state["optimizer"]["param_groups"]]
        trained = [len(group["params"]) for group in self.optimizer.param_groups]
        if saved != trained:
            raise StudioError(
                f"Checkpoint {checkpoint.name} holds other trained parameters than this run's settings give "
                f"({sum(saved)} in {len(saved)} optimizer groups; the settings: {sum(trained)} in {len(trained)}). "
                "It was written before the run's settings changed, or by an older LoRA Studio (a block learning "
                "rate of 0 now leaves that section without an adapter). A resume is exact only into the "
                "parameters it was saved from: start the run again as a new run.")

    def train(self, *, resume: bool, started: float) -> Path | None:
        cfg = self.config
        if self.is_main:
            for folder in (checkpoint_dir(self.run_dir), self.run_dir / SAMPLES_DIR):
                for stale in remove_stale_temp_files(folder):
                    log.info("removed %s, left by a killed writer", stale)
        start_step = 0
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        if checkpoint is not None:
            state = load_checkpoint(checkpoint)
            self._check_checkpoint_fits(checkpoint, state)
            self.load_adapter_state(state["adapter"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            start_step = state["step"]
            random.setstate(state["python_rng"])
            if "ema" in state:
                self.ema = [e.to(p.device) for e, p in zip(state["ema"], self.trainable)]
            if self.pivotal is not None:
                self.pivotal.load_state(state["embeddings"])
            self.events.emit("resume", step=start_step, checkpoint=checkpoint.name)
            log.info("resumed from %s at step %d", checkpoint, start_step)
        else:
            self.events.emit("start", max_steps=cfg.training.max_steps, run_dir=str(self.run_dir),
                             base_model=cfg.base_model, images=len(self.instance),
                             validation_images=len(self.validation))
        self.tensorboard = TensorBoardLog(self.run_dir, write=self.is_main and cfg.training.tensorboard,
                                          start_step=start_step)
        progress = None
        if self.show_progress:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.training.max_steps, initial=start_step, desc=cfg.name, unit="step")
        window_loss = torch.zeros((), device=self.accelerator.device)
        window_steps = 0
        loop_start, steps_done = time.time(), 0
        log_every = cfg.training.log_every_n_steps
        stop = self._install_stop_handlers()
        for step in range(start_step, cfg.training.max_steps):
            window_loss += self.train_step(step)
            window_steps += 1
            steps_done += 1
            done = step + 1
            if progress is not None:
                progress.update(1)
            if done % log_every == 0 or done == cfg.training.max_steps:
                mean_loss = float(self.accelerator.reduce(window_loss.clone(), "mean")) / window_steps
                if not math.isfinite(mean_loss):
                    raise TrainingFailed(
                        f"Loss became {mean_loss} at step {done}; the run stopped and kept its last good "
                        "checkpoint. Lower training.learning_rate or turn off fp16, then resume.")
                elapsed = time.time() - loop_start
                rate = steps_done / elapsed if elapsed > 0 else 0.0
                lr = self.step_size()
                self.events.emit("progress", step=done, max_steps=cfg.training.max_steps, loss=mean_loss,
                                 lr=lr, it_s=round(rate, 3),
                                 eta_s=round((cfg.training.max_steps - done) / rate, 1) if rate else None)
                self.tensorboard.scalars(done, loss=mean_loss, lr=lr)
                if progress is not None:
                    progress.set_postfix(loss=f"{mean_loss:.4f}")
                window_loss.zero_()
                window_steps = 0
            saved = self._checkpoint_due(done)
            if saved:
                self._save_checkpoint(done)
            sample_every = cfg.sampling.every_n_steps
            if sample_every and done % sample_every == 0 and done < cfg.training.max_steps:
                self.sample(done)
            validate_every = cfg.training.validate_every_n_steps
            if self.validation and validate_every and done % validate_every == 0 and done < cfg.training.max_steps:
                self._validate(done)
            if self._stop_agreed(stop) and done < cfg.training.max_steps:
                if not saved:
                    self._save_checkpoint(done)
                self.events.emit("cancelled", step=done)
                raise TrainingCancelled(f"stopped at step {done}; resume continues from there")
        if progress is not None:
            progress.close()
        if self.validation:
            self._validate(cfg.training.max_steps)
        self.sample(cfg.training.max_steps)
        adapter_path = self.export(started) if self.is_main else None
        self.accelerator.wait_for_everyone()
        self.events.emit("done", step=cfg.training.max_steps, adapter=str(adapter_path),
                         seconds=round(time.time() - started, 1))
        return adapter_path

    def _checkpoint_due(self, done: int) -> bool:
        """After step `done` (not the last): every checkpoints.every_n_steps steps, and at the
        end of every checkpoints.every_n_epochs-th epoch."""
        cfg, order = self.config, self.instance_order
        if done >= cfg.training.max_steps:
            return False
        every, every_epochs = cfg.checkpoints.every_n_steps, cfg.checkpoints.every_n_epochs
        accumulation = cfg.training.gradient_accumulation_steps
        epoch_ended = every_epochs and (epochs_done(done, order.batches_per_epoch, accumulation) // every_epochs
                                        > epochs_done(done - 1, order.batches_per_epoch, accumulation) // every_epochs)
        return bool((every and done % every == 0) or epoch_ended)

    def step_size(self) -> float:
        """The current learning rate: training.learning_rate x the schedule's factor now (a
        group's lr / its initial lr, the same for every group), times d for Prodigy."""
        group = next(g for g in self.optimizer.param_groups if g["initial_lr"] > 0)
        return float(self.config.training.learning_rate * group["lr"] / group["initial_lr"] * group.get("d", 1.0))

    def _stop_agreed(self, stop: list[int]) -> bool:
        """Whether any process was asked to stop: all of them stop after the same step."""
        if self.world == 1:
            return bool(stop)
        flag = torch.tensor([float(bool(stop))], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item())

    def _average_gradients(self) -> None:
        """The mean gradient over the processes, in one all-reduce of every trainable
        parameter's gradient flattened together (a missing gradient counts as zero)."""
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for p, mean in zip(self.trainable, _unflatten_dense_tensors(flat, grads)):
            p.grad = mean

    def _install_stop_handlers(self) -> list[int]:
        """SIGTERM / SIGINT end the run after the current step, with a checkpoint.
        Returns a list that becomes non-empty when a stop was asked for."""
        import signal
        import threading

        stop: list[int] = []
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda signum, frame: stop.append(signum))
        return stop

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step (all its micro-batches); returns the mean loss on the device,
        so the loop syncs with the host only when it logs."""
        accum = self.config.training.gradient_accumulation_steps
        total = torch.zeros((), device=self.accelerator.device)
        for micro in range(accum):
            with self.accelerator.accumulate(self.denoiser):
                loss = self.loss(step * accum + micro)
                penalty = self.adapter.regularization()
                self.accelerator.backward(loss if penalty is None else loss + penalty)
                if self.accelerator.sync_gradients and self.world > 1:
                    self._average_gradients()
                if self.accelerator.sync_gradients and self.config.training.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.trainable, self.config.training.max_grad_norm)
                self.optimizer.step()
                if self.accelerator.sync_gradients:
                    self.lr_scheduler.step()
                    # with the step's gradients still held: AdaLoRA scores |θ ∂L/∂θ| from them
                    self._replace_parameters(self.adapter.after_step(step + 1))
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach().float() / accum
        self._update_ema(step + 1)
        return total

    def _replace_parameters(self, replaced: dict | None) -> None:
        """A method may replace parameters after a step or on resume (LoRA-Squeeze's smaller
        factors; old -> new): the new ones take the old ones' places in the optimizer's groups
        (so a checkpoint's optimizer state still lines up by position) and their state starts
        over, initialised by the optimizer at its next step."""
        if not replaced:
            return
        new = {id(old): p for old, p in replaced.items()}
        for old, p in replaced.items():  # a section frozen by block_lr_* = 0 stays frozen
            p.requires_grad_(old.requires_grad)
        for group in self.optimizer.param_groups:
            group["params"] = [new.get(id(p), p) for p in group["params"]]
        for old in replaced:
            self.optimizer.state.pop(old, None)
        self.trainable = [new.get(id(p), p) for p in self.trainable]

    @torch.no_grad()
    def _update_ema(self, done: int) -> None:
        """After `done` steps, with training.ema_decay d: the EMA becomes the weights θ at
        done = ema_start_step s, then ema = d·ema + (1 − d)·θ_done, so that
        ema_T = d^(T−s)·θ_s + Σ_{k=s+1..T} (1 − d)·d^(T−k)·θ_k."""
        t = self.config.training
        if t.ema_decay is None or done < t.ema_start_step:
            return
        weights = [p.detach() for p in self.trainable]
        if done == t.ema_start_step:
            self.ema = [w.clone() for w in weights]
        else:
            for ema, weight in zip(self.ema, weights):
                ema.lerp_(weight, 1.0 - t.ema_decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """The adapter holds the EMA weights inside the block, its own weights again after."""
        own = [p.detach().clone() for p in self.trainable]
        with torch.no_grad():
            for p, e in zip(self.trainable, self.ema):
                p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, w in zip(self.trainable, own):
                    p.copy_(w)

    def _save_checkpoint(self, step: int) -> None:
        """The main process writes it (every process holds the same state); all wait for it."""
        if self.is_main:
            path = save_checkpoint(self.run_dir, step, {
                "step": step,
                "adapter": self.adapter_state(),
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "python_rng": random.getstate(),
                **({"ema": [e.cpu() for e in self.ema]} if self.ema is not None else {}),
                **({"embeddings": self.pivotal.state()} if self.pivotal is not None else {}),
            }, keep_last=self.config.checkpoints.keep_last)
            self.events.emit("checkpoint", step=step, path=str(path))
        self.accelerator.wait_for_everyone()

    @torch.no_grad()
    def sample(self, step: int) -> None:
        if self.is_main:
            self.write_samples(step)
        self.accelerator.wait_for_everyone()

    def write_samples(self, step: int) -> None:
        cfg = self.config
        prompts = cfg.sampling.prompts or [self.instance[0].caption]
        sample_dir = self.run_dir / SAMPLES_DIR
        sample_dir.mkdir(exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.denoiser)
        denoiser.eval()
        setattr(self.pipe, self.family.denoiser, denoiser)
        for component, encoder in self.text_encoder_components():
            setattr(self.pipe, component, encoder)
        paths = []
        phase = PhaseReport(self.events, "sampling", len(prompts), step=step)
        for i, prompt in enumerate(prompts):
            image = self._sample_image(prompt, torch.Generator().manual_seed(cfg.sampling.seed + i))
            phase.advance()
            path = sample_dir / f"step-{step:06d}-{i}.png"
            image.save(path)
            self.tensorboard.image(f"samples/{i}", image, step)
            paths.append(str(path))
        denoiser.train()
        self.events.emit("sample", step=step, paths=paths, prompts=prompts)

    def _sample_image(self, prompt: str, generator: torch.Generator):
        """One sample picture of the run's current weights at the sampling settings."""
        cfg = self.config
        call = self.family.generation_kwargs(self.pipe, prompt, cfg.sampling.negative_prompt,
                                             cfg.sampling.guidance_scale, cfg.dataset.resolution, cfg.dataset.resolution)
        return self.pipe(**call, num_inference_steps=cfg.sampling.steps, generator=generator).images[0]

    def export(self, started: float) -> Path:
        """Write the trained adapter to adapters/<name>.safetensors; with an EMA
        (training.ema_decay), the EMA weights go there instead (ema_export "as_adapter") or
        to the adapter's name + "-ema" beside it ("beside")."""
        t = self.config.training
        folder = adapters_dir(self.run_dir)
        path = unique_adapter_path(folder, self.config.name, self.run_dir.name)
        if t.ema_decay is None:
            return self._export_adapter(started, path, ema=False, embedding_file=True)
        if t.ema_export == "as_adapter":
            with self.ema_weights():
                return self._export_adapter(started, path, ema=True, embedding_file=True)
        self._export_adapter(started, path, ema=False, embedding_file=True)
        with self.ema_weights():
            self._export_adapter(started, unique_adapter_path(folder, f"{path.stem}-ema", self.run_dir.name), ema=True)
        return path

    def _export_adapter(self, started: float, path: Path, *, ema: bool, embedding_file: bool = False) -> Path:
        """Write the adapter's current weights to `path` as its method exports them (the kohya
        / LyCORIS layout, or a layout of the method's own such as T-LoRA's), with ss_* /
        modelspec.* metadata. With pivotal tuning the trigger's embedding is bundled in it
        (A1111's bundle_emb.*) and, with `embedding_file`, also written as
        embeddings/<trigger>.safetensors in the run folder."""
        cfg = self.config
        adapter = self.adapter.export(self.model_ref.family)
        adapter.metadata = training_metadata(
            cfg, self.model_ref, dataset_folder=self._dataset_folder(), started=started, finished=time.time(),
            run_id=self.run_dir.name, adapter=adapter, thumbnail=preview_sample(self.run_dir),
            prediction_type=self.objective.prediction_type, ema=ema,
            denoiser_config=self.accelerator.unwrap_model(self.denoiser).config)
        if self.pivotal is not None:
            adapter.embeddings = {self.pivotal.name: self.pivotal.vectors()}
            if embedding_file:
                save_embedding(self.run_dir / EMBEDDINGS_DIR / f"{self.pivotal.name}.safetensors",
                               self.pivotal.vectors(), self.family,
                               {"name": self.pivotal.name, "lora_studio_adapter": path.name})
        return self.adapter.save(path, adapter)


class PhaseReport:
    """A phase of the run that is not a training step (caching latents, drawing samples), as
    `phase` events the Runs tab shows: one at its start (done 0), then after each item at most
    every PHASE_EVERY_S seconds and after the last, each with the ETA of the rest at the mean
    time per item so far."""

    def __init__(self, events: EventLog, phase: str, total: int, **fields):
        self.events, self.phase, self.total, self.fields = events, phase, total, fields
        self.done, self.started, self.shown = 0, time.monotonic(), time.monotonic()
        events.emit("phase", phase=phase, done=0, total=total, **fields)

    def advance(self) -> None:
        self.done += 1
        now = time.monotonic()
        if self.done < self.total and now - self.shown < PHASE_EVERY_S:
            return
        self.shown = now
        eta = (now - self.started) / self.done * (self.total - self.done)
        self.events.emit("phase", phase=self.phase, done=self.done, total=self.total, eta_s=round(eta, 1),
                         **self.fields)


def masked_mean(error: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of `error` [B, C, h, w] weighted by `weight` [B, h, w]:
    Σ_chw w·e / (C·Σ_hw w). Normalised by the weights' sum (OneTrainer's "normalize masked
    area loss"; kohya only multiplies), so an all-white mask gives exactly the plain mean and
    a small subject trains at the same loss scale as a whole picture. A sample whose weights
    are all 0 (a random crop outside its mask) has loss 0: it trains nothing."""
    total = (error * weight[:, None]).sum(dim=(1, 2, 3))
    return total / (error.shape[1] * weight.sum(dim=(1, 2))).clamp_min(1e-12)


def _is_peer_failure(error: BaseException) -> bool:
    """A collective failed because another process of the run died (gloo / NCCL)."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, getattr(dist, "DistError", ())) or (
        isinstance(error, RuntimeError) and any(w in text for w in ("gloo", "nccl", "connection closed by peer",
                                                                     "connection reset by peer")))


def _error_since_start(run_dir: Path) -> bool:
    """An error event after the last start/resume (another process wrote it)."""
    found = False
    for event in iter_events(run_dir):
        if event["type"] in ("start", "resume"):
            found = False
        elif event["type"] == "error":
            found = True
    return found


def unique_adapter_path(folder: Path, name: str, run_id: str) -> Path:
    """adapters/<name>.safetensors, or <name>-<run id> when another run already wrote that
    name: a finished adapter is never overwritten by a different run."""
    candidate = folder / f"{name}.safetensors"
    if candidate.exists():
        try:
            meta = read_checked_header(candidate)[1]
        except StudioError:
            meta = {}
        if meta.get("lora_studio_run_id") != run_id:
            candidate = folder / f"{name}-{run_id}.safetensors"
    return candidate
