"""Adapter methods: one module per method (its docstring states its formula, its options
model holds the network options it takes), and the one list of them, `METHODS`. base.py says
what a method provides and holds the peft machinery the peft-based ones share; options.py
the options every method takes and the groups several take.

A method is how an adapter trains (network.type); the file kind (lora, loha, lokr in
studio.adapters.formats) is what it is on disk. Adding a method: its module (with its options
model), its tests, and its entry in METHODS (registry.py); studio.config's [network] and the
Train tab's form follow. Nothing outside the method modules branches on a method's name.
"""
from __future__ import annotations

from studio.adapters.formats.header_keys import FORMAT_KEY
from studio.adapters.methods.base import Method, NativeFileMethod, Training
from studio.adapters.methods.options import NetworkOptions
from studio.adapters.methods.registry import DEFAULT_METHOD, METHODS, get_method, native_method

__all__ = ["DEFAULT_METHOD", "FORMAT_KEY", "METHODS", "Method", "NativeFileMethod", "NetworkOptions", "Training",
           "get_method", "native_method"]
