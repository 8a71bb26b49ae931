"""The one list of adapter methods, `METHODS` (network.type -> method), and the lookups by
name and by a file's own layout. Adding a method: its module, its tests, and its entry in
METHODS below."""
from __future__ import annotations

from studio.errors import StudioError
from studio.adapters.methods.adalora import AdaLoRA
from studio.adapters.methods.base import Method, NativeFileMethod
from studio.adapters.methods.locon import LoCon
from studio.adapters.methods.loha import LoHa
from studio.adapters.methods.lokr import LoKr
from studio.adapters.methods.lora import LoRA
from studio.adapters.methods.lora_fa import LoRAFA
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
