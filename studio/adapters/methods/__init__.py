"""Adapter methods: one module per method (its docstring states its formula), and the one
list of them, `METHODS`. base.py says what a method provides and holds the peft machinery
the peft-based ones share.

A method is how an adapter trains (network.type); the file kind (lora, loha, lokr in
studio.adapters.formats) is what it is on disk. Adding a method: its module, its tests, and its
entry in METHODS (registry.py). Nothing outside the method modules branches on a method's name.
"""
from __future__ import annotations

from studio.adapters.formats.header_keys import FORMAT_KEY
from studio.adapters.methods.base import Method, NativeFileMethod, Training
from studio.adapters.methods.registry import METHODS, get_method, native_method

__all__ = ["FORMAT_KEY", "METHODS", "Method", "NativeFileMethod", "Training", "get_method", "native_method"]
