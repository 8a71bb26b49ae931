"""What an adapter method provides, and the shared peft machinery of the peft-based ones.

A method is how an adapter trains (network.type); a file kind is what its modules are on
disk (studio.adapters.formats: lora, loha, lokr). The two are separate axes: DoRA, PiSSA and the
plain form of a T-LoRA are all kind lora. A method

- checks the network settings that concern it (`check`, `check_base_weights`),
- injects itself into a run's models and names their trainable parameter groups
  (`training` -> a `Training`, which also holds the resumable state and exports the file),
- says what sd-scripts' `ss_network_module` / `ss_network_args` are for its file (`ss_network`).

A method with a file layout of its own (T-LoRA) is a `NativeFileMethod`: it also reads
that file as plain modules and attaches it for generation. Everything else attaches
through the file kinds (studio.adapters.attach_adapter).

Nothing here imports torch, peft or the formats at module level: studio.config lists
the methods, and the UI builds its form from studio.config without loading torch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

from studio.errors import StudioError

if TYPE_CHECKING:
    import torch

    from studio.adapters.formats.files import AdapterFile
    from studio.adapters.formats.modules import AdapterModule

# The header entry that names a method's own file layout ("tlora"); absent in kohya files.
FORMAT_KEY = "lora_studio.format"
# The peft adapter name a run trains under.
ADAPTER_NAME = "default"


class Training(ABC):
    """A method's adapter on one run's models: it adds itself to each model, and keeps the
    resumable state and the export of what it trained."""

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
        """Called after optimizer step `done` (1-based, gradients cleared): where a method
        prunes or reallocates ranks. What it changes must be in `state()` for exact resume.
        Returns the parameters it replaced (old -> new; their optimizer state restarts), or None."""

    @abstractmethod
    def export(self, family: str) -> "AdapterFile":
        """The trained adapter as file modules (kohya names), metadata still empty."""

    def save(self, path: Path, adapter: "AdapterFile") -> Path:
        """Write the exported adapter (with its metadata) to `path`."""
        from studio.adapters import save_adapter

        return save_adapter(path, adapter)


class Method(ABC):
    """One adapter method. `name` is its network.type value; `summary` its entry in that
    field's one-line help; `nf4` whether it trains on a 4-bit base (peft has 4-bit layers
    for it)."""

    name: str
    summary: str
    nf4: bool = True

    def check(self, net) -> None:
        """Raise ValueError for network settings this method cannot honour. The LoRA
        options (DoRA, rsLoRA, PiSSA / OLoRA init) are refused unless a method takes them."""
        if net.use_dora or net.use_rslora or net.init != "default":
            raise ValueError(f"use_dora, use_rslora and init apply to lora/locon, not {self.name}")
        self.refuse_rank_options(net)

    def refuse_rank_options(self, net) -> None:
        """Rank allocation and in-training squeeze apply to lora/locon only."""
        if net.rank_allocation != "none" or net.squeeze_rank is not None:
            raise ValueError(f"rank_allocation and squeeze_rank apply to lora/locon networks, not {self.name}")

    def check_base_weights(self, net, base_weights: str) -> None:
        """Raise ValueError when the method cannot train on this frozen base (training.base_weights)."""
        if base_weights == "nf4" and not self.nf4:
            raise ValueError(f"training.base_weights = 'nf4' works with lora, locon and tlora networks, not "
                             f"{self.name}; set base_weights = 'full' or 'fp8'")

    @abstractmethod
    def training(self, net, *, seed: int) -> Training:
        """The adapter a run with these network settings trains (not yet on any model)."""

    def param_groups(self, model: "torch.nn.Module", lr: float, net) -> list[dict]:
        """The trainable parameters of `model`, one group at `lr`."""
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise StudioError("No trainable parameters: network.target_modules matched no layer of the model.")
        if net.loraplus_lr_ratio:
            raise StudioError(f"loraplus_lr_ratio applies to lora/locon networks, not {self.name}.")
        return [{"params": params, "lr": lr}]

    def ss_network(self, net, adapter: "AdapterFile") -> tuple[str, dict[str, str]]:
        """sd-scripts' (ss_network_module, ss_network_args) for the exported file: what
        its file kind needs a kohya / LyCORIS loader to know, with LoCon's conv rank."""
        kind = adapter.adapter_type
        conv = [m for m in adapter.modules.values() if m.is_conv_kernel]
        args = kind.ss_network_args(conv_dim=conv[0].rank if conv and kind.network == "locon" else None,
                                    conv_alpha=conv[0].effective_alpha if conv else None)
        return kind.ss_network_module, args

    def label(self, adapter: "AdapterFile") -> str:
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

    def __init__(self, method: "PeftMethod", net):
        self.method, self.net = method, net
        self.models: dict[str, torch.nn.Module] = {}

    def add(self, component, model, lr):
        from studio.adapters.formats.peft_bridge import inject_peft_adapter

        text_encoder = component != "unet"
        try:
            inject_peft_adapter(model, self.peft_config(component), ADAPTER_NAME)
        except ValueError as error:  # peft: "Target modules ... not found in the base model"
            raise StudioError(f"network.{'text_encoder_' if text_encoder else ''}target_modules: {error}") from None
        self.models[component] = model
        self.injected(component, model)
        return self.method.param_groups(model, lr, self.net)

    def peft_config(self, component: str):
        """The peft config this run injects into `component`."""
        return self.method.peft_config(self.net, text_encoder=component != "unet")

    def injected(self, component: str, model: "torch.nn.Module") -> None:
        """Called right after the injection into `model`, before its parameters are grouped."""

    def named_parameters(self, component):
        return ((name, p) for name, p in self.models[component].named_parameters() if p.requires_grad)

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
        from studio.adapters import export_adapter

        return export_adapter(self.models, family=family, adapter_name=ADAPTER_NAME)


class PeftMethod(Method):
    """A method trained as a peft adapter and exported from its peft layers."""

    training_class: type[PeftTraining] = PeftTraining

    @abstractmethod
    def peft_config(self, net, *, text_encoder: bool):
        """The peft config for the UNet (text_encoder False) or a text encoder."""

    def training(self, net, *, seed):
        return self.training_class(self, net)

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
