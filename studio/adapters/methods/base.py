"""What an adapter method provides, and the shared peft machinery of the peft-based ones.

A method is how an adapter trains (network.type); a file kind is what its modules are on
disk (studio.adapters.formats: lora, loha, lokr). The two are separate axes: DoRA, PiSSA and the
plain form of a T-LoRA are all kind lora. A method

- has its options model (`options`, a studio.adapters.methods.options.NetworkOptions with
  the options it takes and their checks), and checks them against the run's training
  settings (`check_training`),
- injects itself into a run's models and names their trainable parameter groups
  (`training` -> a `Training`, which also holds the resumable state and exports the file),
- says what sd-scripts' `ss_network_module` / `ss_network_args` are for its file (`ss_network`).

A method with a file layout of its own (T-LoRA) is a `NativeFileMethod`: it also reads
that file as plain modules and attaches it for generation. Everything else attaches
through the file kinds (studio.adapters.attach_adapter).

Methods whose update is a plain LoRA once trained but which peft cannot inject through
studio.adapters.formats.peft_bridge (VeRA, SingLoRA) train as `LinearHookTraining`: their own
parameters on each adapted Linear, applied by a forward hook, exported as that plain LoRA.

Nothing here imports torch, peft or the formats at module level: studio.config lists
the methods, and the UI builds its form from studio.config without loading torch.
"""
from __future__ import annotations

import re
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from studio.errors import StudioError
from studio.adapters.methods.options import NetworkOptions
from studio.models.families import FAMILIES

if TYPE_CHECKING:
    import torch

    from studio.adapters.formats.files import AdapterFile
    from studio.adapters.formats.modules import AdapterModule

# The peft adapter name a run trains under.
ADAPTER_NAME = "default"


def is_text_encoder(component: str) -> bool:
    """Whether a pipeline attribute is a text encoder, not a family's denoiser (unet,
    transformer): which of network.target_modules / text_encoder_target_modules it takes."""
    return component not in {f.denoiser for f in FAMILIES.values()}


class Training(ABC):
    """A method's adapter on one run's models: it adds itself to each model, and keeps the
    resumable state and the export of what it trained."""

    # Denoiser sections (a UNet's down_blocks, mid_block, up_blocks) the run does not train
    # (training.block_lr_* = 0), set before `add`: a method may leave them without an adapter,
    # as sd-scripts does (peft methods do); the trainer freezes whatever it adds there.
    unadapted_sections: tuple[str, ...] = ()

    def prepare(self, models: Mapping[str, "torch.nn.Module"], loss: Callable[[int], "torch.Tensor"]) -> dict | None:
        """Called once before `add`, on the frozen models the adapter will go on (component ->
        model) with `loss(i)`, the run's training loss on the i-th of a few batches of its own
        random stream: where a method measures the base model (Sensitivity-LoRA's ranks). It
        must give the same result on resume. Returns what the run's events record, or None."""
        return None

    @abstractmethod
    def add(self, component: str, model: "torch.nn.Module", lr: float) -> list[dict]:
        """Inject into `model` (the pipeline component `component`: unet, text_encoder,
        text_encoder_2) and return its optimizer parameter groups at learning rate `lr`."""

    @abstractmethod
    def named_parameters(self, component: str) -> "Iterator[tuple[str, torch.nn.Parameter]]":
        """The adapter's parameters on `component`, each named by the path of the module of
        that component it adapts (then the adapter's own names): what block-wise settings
        read."""

    @abstractmethod
    def state(self) -> dict[str, "torch.Tensor"]:
        """Every adapter tensor, keyed as the run's checkpoints store them."""

    @abstractmethod
    def load_state(self, state: Mapping[str, "torch.Tensor"]) -> "dict[torch.nn.Parameter, torch.nn.Parameter] | None":
        """Put back what `state` returned (resume). Returns the parameters it replaced (old ->
        new; LoRA-Squeeze's smaller factors), which the optimizer then holds instead, or None."""

    def regularization(self) -> "torch.Tensor | None":
        """A penalty the method adds to each micro-batch's loss (AdaLoRA's orthogonality,
        ARD-LoRA's sparsity), or None."""
        return None

    def after_step(self, done: int) -> "dict[torch.nn.Parameter, torch.nn.Parameter] | None":
        """Called after optimizer step `done` (1-based), before its gradients are cleared (each
        p.grad is what the step used: accumulated, averaged over the processes, clipped):
        where a method prunes or reallocates ranks. What it changes must be in `state()` for
        exact resume. Returns the parameters it replaced (old -> new; their optimizer state
        restarts), or None."""

    @abstractmethod
    def export(self, family: str) -> "AdapterFile":
        """The trained adapter as file modules (kohya names), metadata still empty."""

    def save(self, path: Path, adapter: "AdapterFile") -> Path:
        """Write the exported adapter (with its metadata) to `path`."""
        from studio.adapters.formats.files import save_adapter

        return save_adapter(path, adapter)


class Method(ABC):
    """One adapter method. `name` is its network.type value and `options` the model of its
    network options (whose `type` is Literal[name]); `summary` its entry in network.type's
    one-line help; `nf4` whether it trains on a 4-bit base (peft has 4-bit layers for it)."""

    name: str
    summary: str
    options: type[NetworkOptions]
    nf4: bool = True

    def check_training(self, net, training) -> None:
        """Raise ValueError for network options this method cannot honour with the run's
        training settings (`training`, studio.config.TrainingConfig): here, a 4-bit base."""
        if training.base_weights == "nf4" and not self.nf4:
            raise ValueError(f"training.base_weights = 'nf4' works with lora, locon and tlora networks, not "
                             f"{self.name}; set base_weights = 'full' or 'fp8'")

    @abstractmethod
    def training(self, net, *, seed: int, max_steps: int | None = None) -> Training:
        """The adapter a run of `max_steps` optimizer steps with these network settings trains
        (not yet on any model); methods that schedule by the run's length (AdaLoRA, ARD-LoRA)
        need max_steps."""

    def param_groups(self, model: "torch.nn.Module", lr: float, net) -> list[dict]:
        """The trainable parameters of `model`, one group at `lr`."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
        return [{"params": params, "lr": lr}]

    def ss_network(self, net, adapter: "AdapterFile") -> tuple[str, dict[str, str]]:
        """sd-scripts' (ss_network_module, ss_network_args) for the exported file: what
        its file kind needs a kohya / LyCORIS loader to know, with LoCon's conv rank."""
        kind = adapter.adapter_type
        conv = [m for m in adapter.modules.values() if m.is_conv_kernel]
        args = kind.ss_network_args(conv_dim=conv[0].rank if conv and kind.network == "locon" else None,
                                    conv_alpha=conv[0].effective_alpha if conv else None)
        return kind.ss_network_module, args

    def label(self, net, adapter: "AdapterFile") -> str:
        """`lora_studio_adapter_type`: what was trained, in the file's terms (lora, locon+dora, ...)."""
        return adapter.adapter_type.label

    def foreign_file(self, name: str, parts: set[str]) -> str | None:
        """Why a file of this method written by another tool (its tensors' part names
        `parts`) cannot be read here, or None when the parts are not such a file's."""
        return None


class NativeFileMethod(Method):
    """A method whose files have a layout of their own, named by `FORMAT_KEY` in the header."""

    native_format: str

    @abstractmethod
    def plain_modules(self, path: Path, family: str) -> dict[str, "AdapterModule"]:
        """The file as plain file modules (kohya names): what other tools can load."""

    @abstractmethod
    def plain_metadata(self, metadata: Mapping[str, str], adapter: "AdapterFile", source: str) -> dict[str, str]:
        """The metadata of the file's plain form (a conversion), without what only the native layout means."""

    @abstractmethod
    def attach_file(self, pipe, path: Path):
        """Attach the native file to the pipeline for generation; returns the attached
        adapter, whose `use(AdapterUse | None)` weights it per request (None: off)."""


# --------------------------------------------------------------------------------------
# peft-based methods
# --------------------------------------------------------------------------------------


class PeftTraining(Training):
    """A peft adapter named ADAPTER_NAME on each model it was added to. Checkpoints key its
    tensors `<component>.<peft state key>`."""

    def __init__(self, method: "PeftMethod", net, max_steps: int | None = None):
        self.method, self.net, self.max_steps = method, net, max_steps
        self.models: dict[str, torch.nn.Module] = {}

    def add(self, component, model, lr):
        from studio.adapters.formats.peft_bridge import inject_peft_adapter

        text_encoder = is_text_encoder(component)
        unmatched = unmatched_targets(model, self.method.targets(self.net, text_encoder=text_encoder))
        if unmatched:  # peft adapts the names that match and says nothing of the others
            raise StudioError(
                f"{self.method.name}: {', '.join(unmatched)} match no module of this base model's {component} (the "
                f"network's {'text_encoder_' if text_encoder else ''}target modules"
                f"{'' if text_encoder else ' and conv targets'}); remove them, or choose a method whose "
                "targets it has (a transformer has no ResNet convs: lora rather than locon).")
        try:
            with warnings.catch_warnings():  # conv patterns of an unadapted section (its downsamplers) match nothing
                if self.unadapted_sections:
                    warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match")
                inject_peft_adapter(model, self.peft_config(component), ADAPTER_NAME)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise StudioError(f"network.{'text_encoder_' if text_encoder else ''}target_modules: {error}") from None
        self.models[component] = model
        self.injected(component, model)
        return self.method.param_groups(model, lr, self.net)

    def peft_config(self, component: str):
        """The peft config this run injects into `component` (none in its unadapted sections:
        their frozen adapters would still cost a forward pass each step, 8% of the demo's)."""
        return self.without_unadapted(component, self.method.peft_config(self.net, text_encoder=is_text_encoder(component)))

    def without_unadapted(self, component: str, config):
        """`config` excluding the run's unadapted sections of the denoiser."""
        if not is_text_encoder(component) and self.unadapted_sections:
            config.exclude_modules = rf"^(?:{'|'.join(map(re.escape, self.unadapted_sections))})\..*"
        return config

    def injected(self, component: str, model: "torch.nn.Module") -> None:
        """Called right after the injection into `model`, before its parameters are grouped."""

    def named_parameters(self, component):
        # by name, not requires_grad: a section frozen by block_lr_* = 0 is still the adapter's
        return ((name, p) for name, p in self.models[component].named_parameters()
                if f".{ADAPTER_NAME}." in name or name.endswith(f".{ADAPTER_NAME}"))

    def state(self):
        from peft.utils import get_peft_model_state_dict

        return {f"{component}.{k}": v for component, model in self.models.items()
                for k, v in get_peft_model_state_dict(model).items()}

    def load_state(self, state):
        from peft.utils import set_peft_model_state_dict

        for component, model in self.models.items():
            prefix = component + "."
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                set_peft_model_state_dict(model, part)

    def export(self, family):
        from studio.adapters.formats.files import export_adapter

        return export_adapter(self.models, family=family, adapter_name=ADAPTER_NAME)


class PeftMethod(Method):
    """A method trained as a peft adapter and exported from its peft layers."""

    training_class: type[PeftTraining] = PeftTraining

    @abstractmethod
    def peft_config(self, net, *, text_encoder: bool):
        """The peft config for the denoiser (text_encoder False) or a text encoder."""

    def training(self, net, *, seed, max_steps=None):
        return self.training_class(self, net, max_steps)

    def rank_patterns(self, net, *, text_encoder: bool) -> dict:
        """peft's rank_pattern and alpha_pattern (first matching pattern wins): the UNet's
        attention layers (network.target_modules) in its down blocks, mid block and up blocks
        at block_rank_down / _mid / _up where set, as sd-scripts' block_dims; alpha stays
        network.alpha, so each block scales by alpha / its rank."""
        import re

        if text_encoder:
            return {"rank_pattern": {}, "alpha_pattern": {}}
        targets = "|".join(re.escape(name) for name in net.target_modules)
        sections = (("down_blocks", net.block_rank_down), ("mid_block", net.block_rank_mid),
                    ("up_blocks", net.block_rank_up))
        return {"rank_pattern": {rf"^{section}\..*\.(?:{targets})$": rank for section, rank in sections if rank},
                "alpha_pattern": {}}

    def targets(self, net, *, text_encoder: bool) -> list[str]:
        """The module names peft adapts."""
        return list(net.text_encoder_target_modules if text_encoder else net.target_modules)


# --------------------------------------------------------------------------------------
# methods with their own Linear layers, applied by forward hooks
# --------------------------------------------------------------------------------------


def unmatched_targets(model: "torch.nn.Module", targets: list[str]) -> list[str]:
    """The names of `targets` that no module path of `model` is or ends with ("." + name,
    peft's rule)."""
    paths = [path for path, _ in model.named_modules()]
    return [t for t in targets if not any(path == t or path.endswith("." + t) for path in paths)]


def linear_targets(model: "torch.nn.Module", targets: list[str], method: str, setting: str) -> dict[str, "torch.nn.Module"]:
    """path -> layer for every module of `model` whose path is a target name or ends with
    "." + one (peft's rule); each must be a Linear. `setting` names the option in errors."""
    import torch

    found = {}
    for path, module in model.named_modules():
        if not any(path == t or path.endswith("." + t) for t in targets):
            continue
        if type(module) is not torch.nn.Linear:
            raise StudioError(f"{method} adapts Linear layers only; {setting} matches {path}, a "
                              f"{type(module).__name__}. Remove it from {setting}.")
        found[path] = module
    if not found:
        raise StudioError(f"{setting} {targets} matched no Linear layer of the model.")
    return found


class LinearHookTraining(Training):
    """An adapter of its own on the Linear layers of each model it is added to: per layer a
    few parameters (`create`), added to the layer's output by a forward hook as
    delta(x) (`delta`, dropout on x first), and written as the plain LoRA
    up @ down = delta's weight at scale 1 (`factors`, file alpha = rank). The parameters
    stay outside the models (as T-LoRA's), so the models' own state dicts are untouched;
    checkpoints key them `<component>.<module path>.<name>`. Initial values come from a
    generator seeded by the run's seed, one per component, drawn in module order."""

    def __init__(self, method: "Method", net, seed: int):
        self.method, self.net, self.seed = method, net, seed
        self.layers: dict[str, dict[str, "torch.nn.Module"]] = {}
        self.params: dict[str, dict[str, dict[str, "torch.nn.Parameter"]]] = {}
        self.denoiser_config = None

    @abstractmethod
    def create(self, component: str, layers: dict[str, "torch.nn.Module"],
               generator: "torch.Generator") -> dict[str, dict[str, "torch.Tensor"]]:
        """The initial trainable tensors of each layer (path -> name -> tensor, on the CPU)."""

    @abstractmethod
    def delta(self, component: str, path: str, x: "torch.Tensor") -> "torch.Tensor":
        """What the adapter adds to the output of layer `path` for input x [..., in]."""

    @abstractmethod
    def factors(self, component: str, path: str) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(down [r, in], up [out, r]) with up @ down the layer's update."""

    def add(self, component, model, lr):
        import torch

        text_encoder = is_text_encoder(component)
        setting = f"network.{'text_encoder_' if text_encoder else ''}target_modules"
        targets = list(self.net.text_encoder_target_modules if text_encoder else self.net.target_modules)
        layers = linear_targets(model, targets, self.method.name, setting)
        generator = torch.Generator().manual_seed(self.seed)
        device = next(model.parameters()).device
        initial = self.create(component, layers, generator)
        self.layers[component] = layers
        self.params[component] = {path: {name: torch.nn.Parameter(t.to(device)) for name, t in parts.items()}
                                  for path, parts in initial.items()}
        if not is_text_encoder(component):
            self.denoiser_config = model.config
        for path, layer in layers.items():
            layer.register_forward_hook(self._hook(component, path))
        return [{"params": [p for parts in self.params[component].values() for p in parts.values()], "lr": lr}]

    def _hook(self, component: str, path: str):
        import torch.nn.functional as F

        def hook(module, inputs, output):
            x = F.dropout(inputs[0], self.net.dropout, training=module.training) if self.net.dropout else inputs[0]
            dtype = next(iter(self.params[component][path].values())).dtype
            return output + self.delta(component, path, x.to(dtype)).to(output.dtype)

        return hook

    def named_parameters(self, component):
        return ((f"{path}.{name}", p) for path, parts in self.params.get(component, {}).items()
                for name, p in parts.items())

    def _param_state(self) -> dict[str, "torch.nn.Parameter"]:
        return {f"{component}.{name}": p for component in self.params for name, p in self.named_parameters(component)}

    def state(self):
        return self._param_state()

    def load_state(self, state):
        import torch

        with torch.no_grad():
            for key, p in self._param_state().items():
                if key not in state:
                    raise StudioError(f"The checkpoint has no {key}; it was saved by another network setting.")
                p.copy_(state[key])

    def export(self, family):
        from studio.adapters.formats.files import AdapterFile
        from studio.adapters.formats.modules import LoraModule
        from studio.adapters.formats.naming import path_to_name

        modules = {}
        for component, layers in self.layers.items():
            for path in layers:
                down, up = (t.detach().float().cpu().clone() for t in self.factors(component, path))
                config = self.denoiser_config if not is_text_encoder(component) else None
                modules[path_to_name(family, component, path, config)] = LoraModule(down, up, float(down.shape[0]))
        return AdapterFile(modules, {}, family)
