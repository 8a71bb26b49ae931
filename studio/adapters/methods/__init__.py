"""Adapter methods: one module per method (its docstring states its formula, its options
model holds the network options it takes), and the one list of them, `METHODS`. base.py says
what a method provides and holds the peft machinery the peft-based ones share; options.py
the options every method takes and the groups several take.

A method is how an adapter trains (network.type); the file kind (lora, loha, lokr in
studio.adapters.formats) is what it is on disk. Adding a method: its module (with its options
model), its tests, and its entry in METHODS below; studio.config's [network] and the Train
tab's form follow. Nothing outside the method modules branches on a method's name.
"""
from __future__ import annotations

from studio.errors import StudioError
from studio.adapters.methods.adalora import AdaLoRA
from studio.adapters.methods.base import FORMAT_KEY, Method, NativeFileMethod, Training
from studio.adapters.methods.locon import LoCon
from studio.adapters.methods.loha import LoHa
from studio.adapters.methods.lokr import LoKr
from studio.adapters.methods.lora import LoRA
from studio.adapters.methods.lora_fa import LoRAFA
from studio.adapters.methods.options import NetworkOptions
from studio.adapters.methods.singlora import SingLoRA
from studio.adapters.methods.tlora import TLoRA
from studio.adapters.methods.vera import VeRA

# network.type -> method, in the order the Train tab offers them: one line per method.
METHODS: dict[str, Method] = {m.name: m for m in (
    LoRA(),
    LoCon(),
    LoHa(),
    LoKr(),
    TLoRA(),
    LoRAFA(),
    VeRA(),
    SingLoRA(),
    AdaLoRA(),
)}
# The method of a [network] that names no type.
DEFAULT_METHOD = "lora"

__all__ = ["DEFAULT_METHOD", "FORMAT_KEY", "METHODS", "Method", "NativeFileMethod", "NetworkOptions", "Training",
           "get_method", "native_method"]


def get_method(name: str) -> Method:
    """The method a network.type names."""
    try:
        return METHODS[name]
    except KeyError:
        raise StudioError(f"Unknown network type {name!r}; choose one of {', '.join(METHODS)}.") from None


def native_method(file_format: str | None) -> NativeFileMethod | None:
    """The method whose own file layout `file_format` names (a header's FORMAT_KEY, or an
    AdapterFile's source_format), or None for the shared kohya / diffusers / peft layouts."""
    for method in METHODS.values():
        if isinstance(method, NativeFileMethod) and method.native_format == file_format:
            return method
    return None
