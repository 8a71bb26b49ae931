"""Generation: one cached pipeline per base model, adapters loaded once and weighted per
request. Changing the adapter mix never reloads the base model or an unchanged file."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

from studio.adapters.methods import FORMAT_KEY, native_method
from studio.errors import StudioError
from studio.fsutil import _fsync_dir, atomic_path, create_temp_file
from studio.limits import MIX_ADAPTERS
from studio.models import load_pipeline, resolve_model
from studio.models.blocks import block_weight, parse_block_weights
from studio.models.families import FAMILIES, Family, family_of_pipeline

log = logging.getLogger(__name__)

#: Every sampler name of any family (a request's name is checked against its model's family
#: once the model is known: studio.models.families' `samplers`).
SAMPLER_NAMES = tuple(dict.fromkeys(name for family in FAMILIES.values() for name in family.samplers))
_LORA_TAG = re.compile(r"<lora:([^:>]+)((?::[^:>]*)*)>")


@dataclass(frozen=True)
class AdapterUse:
    """One adapter in a mix: its weight on the UNet, on the text encoder(s) (default: the
    same) and optional LoRA Block Weights (a preset name, the family's vector or its long form). A T-LoRA
    adapter applies its timestep rank mask unless `tlora_masked` is False (all ranks, as
    its plain-LoRA export).

    A schedule over the denoising steps scales the UNet weight per step: the adapter acts
    from step `start` (0-based) until before step `stop` (None: to the end), as the LoRA
    Block Weight extension's `start=` / `stop=`, and `curve` (multipliers placed evenly from
    the first to the last step, linear in between) shapes it: weight_i = weight x
    [start <= i < stop] x curve(i / (steps - 1)). The text encoders run once, before the
    steps, at `text_encoder_weight`; T-LoRA's rank mask applies on top, per timestep.

    `timestep_blocks` (B LBW vectors, set by a mixture with per-timestep-band gates)
    replaces `block_weights` step by step: step i with timestep t uses vector
    floor(t B / T), T the scheduler's training timesteps."""

    path: Path
    weight: float = 1.0
    te_weight: float | None = None
    block_weights: str | None = None
    tlora_masked: bool = True
    start: int = 0
    stop: int | None = None
    curve: tuple[float, ...] = ()
    timestep_blocks: tuple[str, ...] = ()

    @property
    def text_encoder_weight(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    @property
    def scheduled(self) -> bool:
        return self.start > 0 or self.stop is not None or bool(self.curve) or bool(self.timestep_blocks)

    def blocks_at(self, timestep: float, total: int) -> str | None:
        """The block weights at diffusion timestep `timestep` of `total` (see the class doc)."""
        if not self.timestep_blocks:
            return self.block_weights
        bands = len(self.timestep_blocks)
        return self.timestep_blocks[min(max(int(timestep * bands // total), 0), bands - 1)]

    def weight_at(self, step: int, steps: int) -> float:
        """The UNet weight at denoising step `step` of `steps` (see the class doc)."""
        if step < self.start or (self.stop is not None and step >= self.stop):
            return 0.0
        if not self.curve:
            return self.weight
        if len(self.curve) == 1 or steps == 1:
            return self.weight * self.curve[0]
        where = step / (steps - 1) * (len(self.curve) - 1)
        low = min(int(where), len(self.curve) - 2)
        frac = where - low
        return self.weight * (self.curve[low] * (1 - frac) + self.curve[low + 1] * frac)

    def check_schedule(self, where: str) -> None:
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise StudioError(f"In {where}: the steps start={self.start} stop={self.stop} leave no step; "
                              "give 0 <= start < stop.")
        if not all(math.isfinite(v) for v in self.curve):
            raise StudioError(f"In {where}: the curve {','.join(map(str, self.curve))} is not finite numbers.")


#: Ranges of a request's numbers (the page's fields refuse the same).
MAX_STEPS = 500
MAX_SIDE = 4096
MAX_BATCH_COUNT = 64
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1


@dataclass
class GenerateRequest:
    prompt: str
    model: str = "builtin"
    negative_prompt: str = ""
    adapters: list[AdapterUse] = field(default_factory=list)
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 5.0
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None  # a sampler of the model's family; None: the family's first
    batch_count: int = 1
    route: bool = False  # the adapters routed per token (arrow), not summed

    def validate(self) -> None:
        if self.scheduler is not None and self.scheduler not in SAMPLER_NAMES:
            raise StudioError(f"Unknown scheduler {self.scheduler!r}; choose one of {', '.join(SAMPLER_NAMES)}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise StudioError(f"steps must be between 1 and {MAX_STEPS} (got {self.steps}).")
        for side in (self.width, self.height):
            if side is not None and (side < 8 or side > MAX_SIDE or side % 8):
                raise StudioError(f"width and height must be multiples of 8 between 8 and {MAX_SIDE} (got {side}).")
        if not 1 <= self.batch_count <= MAX_BATCH_COUNT:
            raise StudioError(f"batch count must be between 1 and {MAX_BATCH_COUNT} (got {self.batch_count}).")
        if not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise StudioError(f"CFG scale must be a number between 0 and {MAX_GUIDANCE} (got {self.guidance_scale}).")
        MIX_ADAPTERS.check(len(self.adapters), f"This request mixes {len(self.adapters)} adapters")
        if not 0 <= self.seed <= MAX_SEED + 1 - self.batch_count:
            raise StudioError(f"seed must be a whole number between 0 and {MAX_SEED + 1 - self.batch_count} "
                              f"(got {self.seed}).")
        for use in self.adapters:
            for weight in (use.weight, use.text_encoder_weight):
                if not math.isfinite(weight):
                    raise StudioError(f"Adapter {Path(use.path).stem!r} has weight {weight}; give a finite "
                                      "number such as 0.8 or -0.5.")
            use.check_schedule(f"adapter {Path(use.path).stem!r}")


def parse_adapter_arg(text: str) -> AdapterUse:
    """`FILE[:WEIGHT]` from the command line."""
    path, sep, weight = text.rpartition(":")
    if sep and path and _is_float(weight):
        return AdapterUse(Path(path), _finite_weight(weight, text))
    return AdapterUse(Path(text), 1.0)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _finite_weight(text: str, where: str) -> float:
    """A weight that is a number; 'nan', 'inf' and overflowing numbers (1e999) would turn
    every pixel into NaN, so they are refused."""
    value = float(text)
    if not math.isfinite(value):
        raise StudioError(f"In {where!r}: the weight {text!r} is not a finite number; write e.g. 0.8 or -0.5.")
    return value


def parse_prompt_loras(prompt: str, resolve_name) -> tuple[str, list[AdapterUse]]:
    """Take A1111 `<lora:name:weight>` tags out of a prompt; `resolve_name(name) -> Path`.
    As in A1111, `<lora:name:te:unet>` gives the text-encoder and the UNet weight (the UNet
    weight defaults to the first), named `te=`, `unet=` override them, and `lbw=` (the LoRA
    Block Weight extension's) gives block weights: a preset or comma-separated values."""
    uses = []
    for match in _LORA_TAG.finditer(prompt):
        tag, name = match.group(0), match.group(1).strip()
        positional, named = [], {}
        for param in match.group(2).split(":")[1:]:
            key, eq, value = param.partition("=")
            if eq:
                named[key.strip()] = value.strip()
            else:
                positional.append(param.strip())
        unknown = set(named) - {"te", "unet", "lbw", "start", "stop", "curve"}
        if unknown:
            raise StudioError(f"In {tag!r}: unknown setting {sorted(unknown)[0]!r}; use te=, unet=, lbw=, start=, "
                              "stop= or curve=.")
        te = named.get("te", positional[0] if positional else "1")
        unet = named.get("unet", positional[1] if len(positional) > 1 else te)
        for weight in (te, unet):
            if not _is_float(weight):
                raise StudioError(f"In {tag!r}: the weight {weight!r} is not a number; write <lora:{name}:0.8>.")
        te_weight, unet_weight = _finite_weight(te, tag), _finite_weight(unet, tag)
        use = AdapterUse(resolve_name(name), unet_weight, te_weight if te_weight != unet_weight else None,
                         named.get("lbw") or None, **_tag_schedule(named, tag))
        use.check_schedule(repr(tag))
        uses.append(use)
    if "<lora:" in _LORA_TAG.sub("", prompt):
        raise StudioError("The prompt has a broken <lora:...> tag; write it as <lora:name:weight>.")
    return " ".join(_LORA_TAG.sub("", prompt).split()), uses


def _tag_schedule(named: dict[str, str], tag: str) -> dict:
    """start= / stop= (steps, whole numbers) and curve= (comma-separated multipliers) of a tag."""
    out: dict = {}
    for key in ("start", "stop"):
        if key in named:
            if not named[key].isdigit():
                raise StudioError(f"In {tag!r}: {key}={named[key]!r} is not a step number; write e.g. {key}=10.")
            out[key] = int(named[key])
    if "curve" in named:
        values = [v for v in named["curve"].split(",") if v.strip()]
        if not values or not all(_is_float(v) for v in values):
            raise StudioError(f"In {tag!r}: curve={named['curve']!r} is not numbers; write e.g. curve=1,0.5,0.")
        out["curve"] = tuple(_finite_weight(v, tag) for v in values)
    return out


def lora_tag(name: str, use: AdapterUse) -> str:
    """The A1111 tag that `parse_prompt_loras` reads back as `use`."""
    weights = f"{use.weight:g}" if use.te_weight is None else f"{use.te_weight:g}:{use.weight:g}"
    extra = (f":lbw={use.block_weights}" if use.block_weights else "") + (f":start={use.start}" if use.start else "") \
        + (f":stop={use.stop}" if use.stop is not None else "") \
        + (f":curve={','.join(f'{v:g}' for v in use.curve)}" if use.curve else "")
    return f"<lora:{name}:{weights}{extra}>"


def sampler_of(family: Family, name: str | None) -> str:
    """The family's sampler called `name` (None: its default); StudioError for one it has not."""
    name = name or family.default_sampler
    if name not in family.samplers:
        raise StudioError(f"{family.label} models sample with {', '.join(family.samplers)}, not {name!r}; "
                          "choose one of those.")
    return name


def pngtext_parameters(request: GenerateRequest, seed: int, size: tuple[int, int], model_name: str,
                       sampler_label: str) -> str:
    """The A1111 `parameters` text stored in each PNG."""
    prompt = request.prompt + "".join(f" {lora_tag(use.path.stem, use)}" for use in request.adapters)
    lines = [prompt.strip()]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join([
        f"Steps: {request.steps}", f"Sampler: {sampler_label}",
        f"CFG scale: {request.guidance_scale:g}", f"Seed: {seed}", f"Size: {size[0]}x{size[1]}",
        f"Model: {model_name}", *(["Routing: arrow"] if request.route else []),
    ]))
    return "\n".join(lines)


class Engine:
    """Pipelines cached per base model; adapters cached per (pipeline, file content)."""

    def __init__(self, *, allow_pickle: bool = False, workspace=None):
        self.allow_pickle = allow_pickle
        self.workspace = workspace  # where model names were pulled (None: this process's workspace)
        self._pipes: dict[str, object] = {}
        self._loaded: dict[str, dict[tuple, str]] = {}  # model key -> file key -> adapter name
        self._lock = threading.Lock()
        self._blocks: dict[tuple[int, str], str | None] = {}
        self._mixtures: dict[tuple, object] = {}
        self._routes: dict[str, tuple] = {}  # model key -> (routing key, hooked LiveMembers)
        self.pipeline_loads = 0

    def pipeline(self, model: str):
        ref = resolve_model(model, allow_pickle=self.allow_pickle, workspace=self.workspace)
        key = str(ref.path)
        if key not in self._pipes:
            self._pipes[key] = load_pipeline(ref, allow_pickle=self.allow_pickle)
            self._loaded[key] = {}
            self.pipeline_loads += 1
        return key, self._pipes[key]

    def _adapter_name(self, model_key: str, pipe, path: Path) -> str:
        from studio.adapters import attach_adapter, load_adapter, read_checked_header

        try:
            stat = path.stat()
        except FileNotFoundError:
            raise StudioError(f"Adapter file {path} not found.") from None
        file_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        loaded = self._loaded[model_key]
        if file_key not in loaded:
            name = "a" + hashlib.sha1(repr(file_key).encode()).hexdigest()[:12]
            _restore_original_weights(pipe)  # loading a DoRA file reads the base weights
            native = native_method(read_checked_header(path)[1].get(FORMAT_KEY))
            if native is not None:  # a layout of its own (T-LoRA): attached and weighted by its method
                if not hasattr(pipe, "_studio_native"):
                    pipe._studio_native = {}
                pipe._studio_native[name] = native.attach_file(pipe, path)
            else:
                try:
                    adapter = load_adapter(path)
                    attach_adapter(pipe, adapter, name)
                except StudioError as error:  # say which file, not the engine's internal name
                    raise StudioError(str(error).replace(f"Adapter {name!r}", f"Adapter {path.name}")) from None
                if adapter.embeddings:
                    pipe.__dict__.setdefault("_studio_bundled", {})[name] = (path.name, adapter.embeddings)
            loaded[file_key] = name
        return loaded[file_key]

    def _use_embeddings(self, pipe, mix: dict[str, AdapterUse]) -> None:
        """The embeddings bundled in the mix's adapter files are in the pipeline's tokenizers
        and text encoders (diffusers' load_textual_inversion, per text encoder), and no
        others: as in A1111, a bundled embedding acts while its adapter is in use. The base
        model is not reloaded; an unloaded embedding leaves the token table as it was."""
        from studio.adapters.formats.embeddings import token_names

        bundled = pipe.__dict__.get("_studio_bundled", {})
        active = pipe.__dict__.setdefault("_studio_embeddings", {})  # embedding name -> adapter name
        wanted: dict[str, str] = {}
        for name in mix:
            for embedding in bundled.get(name, (None, {}))[1]:
                if embedding in wanted:
                    raise StudioError(f"Adapters {bundled[wanted[embedding]][0]} and {bundled[name][0]} both bundle "
                                      f"an embedding named {embedding!r}; use one of them.")
                wanted[embedding] = name
        family = family_of_pipeline(pipe)
        pairs = [(getattr(pipe, t), getattr(pipe, e)) for t, e in zip(family.tokenizers, family.text_encoders)]
        for embedding, owner in list(active.items()):
            if wanted.get(embedding) != owner:
                vectors = bundled[owner][1][embedding][0].shape[0]
                for tokenizer, encoder in pairs:
                    pipe.unload_textual_inversion(token_names(embedding, vectors), tokenizer=tokenizer,
                                                  text_encoder=encoder)
                del active[embedding]
        for embedding, owner in wanted.items():
            if embedding not in active:
                for (tokenizer, encoder), vectors in zip(pairs, bundled[owner][1][embedding]):
                    try:
                        pipe.load_textual_inversion(vectors.to(encoder.dtype), token=embedding, tokenizer=tokenizer,
                                                    text_encoder=encoder)
                    except ValueError as error:  # a token of that name already, or another width
                        raise StudioError(f"The embedding {embedding!r} bundled in {bundled[owner][0]} cannot be "
                                          f"loaded into this base model: {error}") from None
                active[embedding] = owner

    def _activate(self, pipe, mix: dict[str, AdapterUse]) -> None:
        """Weight every adapter layer for this request: adapter weight x block weight on the
        UNet, text-encoder weight x BASE on the text encoders. Layers whose adapters in the
        mix have a linear delta (LoRA, LoCon, LoHa, LoKr) get the weighted sum of deltas
        merged into their weights, so a mix costs what the fused model costs per step;
        layers with DoRA in the mix run their adapters live; layers with nothing in the mix
        get their original weights back (an empty mix is the base model, bit for bit)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        from studio.adapters import adapter_models

        family = family_of_pipeline(pipe)
        lbw = {name: parse_block_weights(use.block_weights, family.name) if use.block_weights else None
               for name, use in mix.items()}
        wrappers: dict[int, list[tuple[BaseTunerLayer, dict[str, float]]]] = {}  # base layer -> its adapter layers
        for component, model in adapter_models(pipe).items():
            denoiser = component == family.denoiser
            for path, module in model.named_modules():
                if not isinstance(module, BaseTunerLayer):
                    continue
                block = self._block_of(family, model, path) if denoiser else "BASE"
                available = module._get_available_adapters()
                scales = {}  # in the mix's order, so live sums do not depend on which file loaded first
                for name, use in mix.items():
                    if name in available:
                        weight = use.weight if denoiser else use.text_encoder_weight
                        scales[name] = weight * block_weight(lbw[name], block)
                wrappers.setdefault(id(module.get_base_layer()), []).append((module, scales))
        for layers in wrappers.values():
            # Adapters of different types on one layer nest (a LoHa inside a LoRA) around one base weight.
            live = any(not _has_linear_delta(module, name) for module, scales in layers for name in scales)
            terms = [] if live else [(module, name, scale) for module, scales in layers
                                     for name, scale in scales.items() if scale != 0]
            base = layers[0][0].get_base_layer()
            _merge_deltas(base, terms)
            for module, scales in layers:
                if live and scales:
                    for name, scale in scales.items():
                        module.set_scale(name, scale)
                    module.enable_adapters(True)
                    module.set_adapter(list(scales))
                else:
                    module.enable_adapters(False)
                if live:
                    module.__dict__.pop("forward", None)
                else:  # every adapter here is merged or off: call the base layer (and its hooks, T-LoRA's
                    module.forward = base.__call__  # among them) without peft's per-call checks
        for name, adapter in self._native_of(pipe).items():
            adapter.use(mix.get(name))

    def _step_weights(self, pipe, mix: dict[str, AdapterUse], steps: int, size: tuple[int | None, int | None]):
        """For a mix with a schedule: a callback that, after each denoising step, weights the
        layers for the next step (only when a weight changes), having weighted them for step
        0; else None. The text encoders keep their weight: they ran before the steps."""
        if not any(use.scheduled for use in mix.values()):
            return None
        timesteps = [0.0] * steps
        if any(use.timestep_blocks for use in mix.values()):  # the timesteps the pipeline is about to run
            timesteps = family_of_pipeline(pipe).sampling_timesteps(pipe, steps, *size)
        total = pipe.scheduler.config.num_train_timesteps
        plan = [tuple((use.weight_at(step, steps), use.blocks_at(timesteps[step], total)) for use in mix.values())
                for step in range(steps)]

        def weigh(step: int) -> None:
            self._activate(pipe, {name: replace(use, weight=weight, te_weight=use.text_encoder_weight,
                                                block_weights=blocks, timestep_blocks=())
                                  for (name, use), (weight, blocks) in zip(mix.items(), plan[step])})

        def after_step(_pipe, step: int, _timestep, _kwargs) -> dict:
            if step + 1 < steps and plan[step + 1] != plan[step]:
                weigh(step + 1)
            return {}

        weigh(0)
        return after_step

    def _block_of(self, family, denoiser, path: str) -> str | None:
        """The LBW block of a denoiser module (the family's block table), cached per module."""
        key = (id(denoiser), path)
        if key not in self._blocks:
            self._blocks[key] = family.blocks.module_block(path, denoiser.config)
        return self._blocks[key]

    def _native_of(self, pipe) -> dict:
        """Adapters attached from a method's own file layout, by adapter name."""
        return getattr(pipe, "_studio_native", {})

    def set_mix(self, model: str, adapters: list[AdapterUse], prompt: str | None = None, route: bool = False):
        """Load what is missing and weight the adapters; returns the ready pipeline.
        Switching between mixes of loaded adapters only rescales layers. `prompt` is
        needed by prompt-conditioned mixtures; `route` routes the adapters per token."""
        with self._lock:
            return self._mix_pipeline(model, adapters, prompt, route)[0]

    def mixture(self, path: Path):
        """The mixture file at `path`, its members found, cached per file state."""
        from studio.adapters.mixtures.file import load_mixture

        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in self._mixtures:
            self._mixtures[key] = load_mixture(path)
        return self._mixtures[key]

    def _expand_mixtures(self, pipe, adapters: list[AdapterUse], prompt: str | None, route: bool):
        """(uses to merge, routed): each gated mixture as its members' uses
        (`mixture_uses`), adapters as they are; an arrow mixture, or with `route` all the
        plain adapters, as (mixture, member scales) to route per token."""
        from studio.adapters.mixtures.file import is_mixture, new_mixture

        out: list[AdapterUse] = []
        routed = []
        for use in adapters:
            if not is_mixture(use.path):
                out.append(use)
                continue
            mixture = self.mixture(use.path)
            if mixture.gate == "arrow":
                routed.append((mixture, [use.weight] * len(mixture.members)))
            else:
                out += mixture_uses(use, mixture, pipe, prompt)
        if route and out:
            key = tuple((str(use.path.resolve()), use.path.stat().st_mtime_ns) for use in out)
            if key not in self._mixtures:  # members checked and hashed once per set of file states
                self._mixtures[key] = new_mixture([use.path for use in out], "arrow")
            routed.append((self._mixtures[key], [use.weight for use in out]))
            out = []
        if len(routed) > 1:
            raise StudioError("Route one set of adapters at a time: give one arrow mixture, or route the "
                              "adapters of the request, not both.")
        MIX_ADAPTERS.check(len(out) + sum(len(m.members) for m, _ in routed),
                           f"This request loads {len(out) + sum(len(m.members) for m, _ in routed)} adapters")
        return out, routed[0] if routed else None

    def _set_routing(self, model_key: str, pipe, routed) -> None:
        """Hook the routed members onto the pipeline (studio.adapters.mixtures.live.routing),
        replacing the previous request's routing; None: no routing."""
        from studio.adapters import adapter_models, load_adapter
        from studio.adapters.mixtures.live import LiveMembers, routing

        key = None
        if routed is not None:
            mixture, scales = routed
            key = (tuple(m.sha256 for m in mixture.members), tuple(scales), mixture.top_k, mixture.temperature)
        current = self._routes.get(model_key)
        if current is not None and current[0] == key:
            return
        if current is not None:
            current[1].remove()
            del self._routes[model_key]
        if key is None:
            return
        members = [load_adapter(m.path) for m in mixture.members]
        for member, adapter in zip(mixture.members, members):
            if any(m.is_dora for m in adapter.modules.values()):
                raise StudioError(f"{member.path.name} is a DoRA adapter: its update depends on the base weight, so "
                                  "it cannot be routed per token; use it in a plain mix.")
        live = LiveMembers(family_of_pipeline(pipe).name, adapter_models(pipe), members)
        self._routes[model_key] = (key, live.install(routing(mixture.top_k, mixture.temperature, list(scales))))

    def _mix_pipeline(self, model: str, adapters: list[AdapterUse], prompt: str | None = None, route: bool = False):
        """(pipeline, {engine adapter name: use}) with the mix weighted (and routed)."""
        model_key, pipe = self.pipeline(model)
        mix: dict[str, AdapterUse] = {}
        uses, routed = self._expand_mixtures(pipe, adapters, prompt, route)
        self._set_routing(model_key, pipe, routed)
        for use in uses:
            name = self._adapter_name(model_key, pipe, use.path)
            if name in mix:
                raise StudioError(f"Adapter {use.path.name} is in the mix twice; give it one row.")
            mix[name] = use
        self._use_embeddings(pipe, mix)
        self._activate(pipe, mix)
        return pipe, mix

    def generate(self, request: GenerateRequest):
        """Images (PIL) for the request, each with its A1111 `parameters` text in `.info`."""
        import torch  # here, not at import: the UI imports this module for SAMPLER_NAMES before torch loads

        request.validate()
        with self._lock:
            pipe, mix = self._mix_pipeline(request.model, request.adapters, request.prompt, request.route)
            family = family_of_pipeline(pipe)
            sampler = sampler_of(family, request.scheduler)
            pipe.scheduler = _scheduler(pipe, family, sampler)
            call = family.generation_kwargs(pipe, request.prompt, request.negative_prompt, request.guidance_scale,
                                            request.width, request.height)
            images = []
            for index in range(request.batch_count):
                seed = request.seed + index
                generator = torch.Generator(device=pipe.device).manual_seed(seed)
                after_step = self._step_weights(pipe, mix, request.steps, (request.width, request.height))
                schedule = {"callback_on_step_end": after_step} if after_step else {}
                with torch.inference_mode():
                    image = pipe(**call, num_inference_steps=request.steps, generator=generator, **schedule).images[0]
                model_name = resolve_model(request.model, allow_pickle=self.allow_pickle,
                                           workspace=self.workspace).display_name
                image.info["parameters"] = pngtext_parameters(request, seed, image.size, model_name,
                                                              family.samplers[sampler].label)
                images.append(image)
            return images


def mixture_uses(use: AdapterUse, mixture, pipe, prompt: str | None) -> list[AdapterUse]:
    """A mixture's members as adapter uses: member k gets the mixture's weight, schedule and
    T-LoRA setting, and as LoRA Block Weights its gates (the family's long form, BASE = text encoders)
    times the mixture's own block weights. A gate per timestep band becomes
    `timestep_blocks`; a prompt-conditioned gate is computed from `prompt` here, once."""
    import torch

    from studio.adapters.mixtures.gates import Gates, prompt_embedding

    family = family_of_pipeline(pipe)
    blocks = family.blocks.full
    outer = torch.ones(len(blocks))
    if use.block_weights:
        given = parse_block_weights(use.block_weights, family.name)
        outer = torch.tensor([given.get(block, 1.0) for block in blocks])
    if mixture.gate == "prompt":
        if prompt is None:
            raise StudioError(f"{use.path.name} is a prompt-conditioned mixture; give the prompt.")
        with torch.no_grad():
            gates = [Gates(mixture)(torch.zeros(1), prompt_embedding(pipe.tokenizer, pipe.text_encoder, [prompt]))[0]]
    elif mixture.why_not_constant() is None:
        gates = [mixture.constant_gates()]
    else:  # per band: BASE from gate.base, the blocks from the band
        bands = mixture.tensors["gate.bands"]
        gates = [torch.cat([mixture.tensors["gate.base"][:, None], bands[:, b]], 1) for b in range(mixture.bands)]

    def vector(values) -> str:
        return ",".join(repr(float(v)) for v in values * outer)

    out = []
    for k, member in enumerate(mixture.members):
        vectors = tuple(vector(g[k]) for g in gates)
        out.append(replace(use, path=member.path, block_weights=vectors[0],
                           timestep_blocks=vectors if len(vectors) > 1 else ()))
    return out


def _has_linear_delta(module, name: str) -> bool:
    """Whether the adapter's effect on this layer is `x @ delta.T`, independent of the base
    weight and of other adapters (DoRA's norm and a trained bias are not)."""
    return (hasattr(module, "get_delta_weight") and name not in getattr(module, "lora_variant", {})
            and not getattr(module, "lora_bias", {}).get(name, False))


def _restore_original_weights(pipe) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from studio.adapters import adapter_models

    for model in adapter_models(pipe).values():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                _merge_deltas(module.get_base_layer(), [])


def _merge_deltas(base, terms: list[tuple[object, str, float]]) -> None:
    """Set the base layer's weight to its original plus the sum of scale x delta over the
    (adapter layer, adapter name, scale) terms, computed in float32 from an untouched copy
    of the original (kept on the CPU the first time the layer is merged), so any sequence
    of mixes ends where a fresh merge would."""
    import torch

    merged = tuple(sorted((name, scale) for _, name, scale in terms))
    if getattr(base, "_studio_merged", ()) == merged:
        return
    weight = base.weight
    original = getattr(base, "_studio_original", None)
    with torch.no_grad():
        if not terms:
            weight.copy_(original)
        else:
            if original is None:
                original = base._studio_original = weight.detach().to("cpu", copy=True)
            total = original.to(weight.device, torch.float32)
            for module, name, scale in sorted(terms, key=lambda term: term[1]):
                module.set_scale(name, scale)
                total = total + module.get_delta_weight(name).float()
            weight.copy_(total)
    base._studio_merged = merged


def _scheduler(pipe, family: Family, name: str):
    """The family's sampler `name` for this pipeline, made once from the pipeline's own
    scheduler config (never from the previous request's: DPM++ Karras would leave
    use_karras_sigmas on for Euler, and a request's image would depend on what ran before it)."""
    import diffusers

    made = pipe.__dict__.setdefault("_studio_schedulers", {})
    if name not in made:
        original = pipe.__dict__.setdefault("_studio_original_scheduler", pipe.scheduler)
        sampler = family.samplers[name]
        if type(original).__name__ == sampler.scheduler and all(original.config.get(k) == v
                                                                for k, v in sampler.settings.items()):
            made[name] = original
        else:
            made[name] = getattr(diffusers, sampler.scheduler).from_config(dict(original.config), **sampler.settings)
    return made[name]


def save_png(image, path: str | Path) -> Path:
    """Write a PNG atomically with its `parameters` text chunk (A1111's convention)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def save_new_png(image, folder: str | Path, stem: str) -> Path:
    """Like `save_png`, under a name no file has yet: `stem.png`, else `stem-2.png`, ...
    Images made in the same second with the same seed never replace each other, even when
    two processes save at once (the name is taken with a hard link, which fails if it exists)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = create_temp_file(folder, stem, ".png.tmp")
    try:
        save_png(image, tmp)  # complete and fsynced before it gets its name
        for number in range(1, 10_000):
            target = folder / (f"{stem}.png" if number == 1 else f"{stem}-{number}.png")
            try:
                os.link(tmp, target)
            except FileExistsError:
                continue
            except OSError:  # no hard links on this file system: reserve the name, then fill it
                try:
                    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
                os.replace(tmp, target)
            _fsync_dir(folder)
            return target
    finally:
        tmp.unlink(missing_ok=True)
    raise StudioError(f"{folder} already has 10000 images named {stem}*.png; move some away.")

