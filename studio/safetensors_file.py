"""Looking at model files without loading them: what format a file is (by its bytes,
never its name) and a checked safetensors header. Used by every loader, so a truncated,
hostile or pickle file gets the same clear error everywhere."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from studio.errors import StudioError
from studio.fsutil import open_regular

_MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Bits per element, for checking that a tensor's byte range fits its shape (sub-byte types are not checked).
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "I16": 16, "U16": 16, "I32": 32, "U32": 32, "I64": 64, "U64": 64,
               "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64}
_SAFETENSORS_DTYPES = {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F16", "BF16", "F32", "F64",
    "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "U1",
}

FileFormat = Literal["safetensors", "pickle", "zip-pickle", "gguf", "unknown"]
#: The names pickle checkpoints go by (refused unless allow_pickle).
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


def sniff_format(path: str | os.PathLike) -> FileFormat:
    """What a file holds, judged by its first bytes (never by its name): a safetensors
    header, a pickle (legacy torch.save), a zip archive (torch.save >= 1.6), GGUF, or unknown."""
    with open_regular(path) as handle:
        head = handle.read(16)
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 2 <= header_len <= _MAX_HEADER_BYTES:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip-pickle"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head[:4] == b"GGUF":
        return "gguf"
    return "unknown"


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """The tensor table (`{name: {"dtype", "shape", "data_offsets"}}`) and the metadata of a
    safetensors file, checked for consistency (a truncated or damaged file raises a
    StudioError saying so) without reading any tensor data."""
    path = Path(path)
    damaged = f"{path} is not a valid safetensors file"
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise StudioError(f"{damaged}: it is only {size} bytes long. Download it again.")
        header_len = int.from_bytes(handle.read(8), "little")
        if header_len > _MAX_HEADER_BYTES:
            raise StudioError(f"{damaged}: its header claims {header_len} bytes. Download it again.")
        if 8 + header_len > size:
            raise StudioError(
                f"{path} is truncated: its header alone needs {8 + header_len} bytes but the file "
                f"has {size}. The download or copy was cut short; get the file again."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise StudioError(f"{damaged}: its header is not valid JSON ({exc}). Download it again.") from exc
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise StudioError(f"{damaged}: its __metadata__ must be a JSON object of text values, but it is "
                          f"{_json_kind(metadata)}. The file was damaged or written by a broken tool; get it again.")
    data_end = 0
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = info["shape"]
            ok = (
                info["dtype"] in _SAFETENSORS_DTYPES
                and isinstance(begin, int) and isinstance(end, int)
                and 0 <= begin <= end
                and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and (info["dtype"] not in _DTYPE_BITS or end - begin == math.prod(shape) * _DTYPE_BITS[info["dtype"]] // 8)
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise StudioError(f"{damaged}: the entry for tensor {name!r} is malformed. Download it again.")
        data_end = max(data_end, end)
    expected = 8 + header_len + data_end
    if size < expected:
        raise StudioError(
            f"{path} is truncated: it should be {expected} bytes but has {size}. "
            "The download or copy was cut short; get the file again."
        )
    return header, {str(k): str(v) for k, v in metadata.items()}


#: safetensors dtype names -> torch dtype attribute names (the types torch can hold)
_TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
                 "U16": "uint16", "U32": "uint32", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
                 "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def read_safetensors(path: str | os.PathLike, *, dtype: Any = None, skip_prefixes: tuple[str, ...] = ()) -> dict:
    """Every tensor of a safetensors file (but those whose names start with `skip_prefixes`)
    in memory of its own, read one at a time; floating tensors converted to `dtype` as they
    are read (None: as stored). Unlike safetensors' `load_file`, whose tensors view one
    mapping of the whole file (every page read stays resident while any tensor views it),
    the process holds the result and one tensor of the file: loading a full-size SDXL file
    (fp16, 6.9 GB) in fp32 peaks at the fp32 model instead of the model plus the file."""
    import torch

    path = Path(path)
    header, _ = read_safetensors_header(path)
    tensors = {}
    with open_regular(path) as handle:
        start = 8 + int.from_bytes(handle.read(8), "little")
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            if name.startswith(skip_prefixes):
                continue
            stored = getattr(torch, _TORCH_DTYPES.get(info["dtype"], ""), None)
            if stored is None:
                raise StudioError(f"{path}: tensor {name!r} is stored as {info['dtype']}, which torch cannot hold; "
                                  "convert the file to fp16, bf16 or fp32.")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            if handle.readinto(raw.numpy()) != end - begin:
                raise StudioError(f"{path} is truncated at tensor {name!r}; get the file again.")
            tensor = raw.view(stored).reshape(info["shape"])
            tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def _json_kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true or false", int: "a number", float: "a number",
            dict: "an object with values that are not text"}.get(type(value), type(value).__name__)


def refuse_pickle(path: Path, fmt: str) -> StudioError:
    named = ""
    if path.suffix.lower() == ".safetensors":
        named = " although its name ends in .safetensors"
    return StudioError(
        f"{path} is a pickle ({'torch zip archive' if fmt == 'zip-pickle' else 'pickle stream'}){named}. "
        "Pickle files can run arbitrary code when loaded, so they are refused. Use a .safetensors "
        "version of this model, or opt in explicitly (allow_pickle=True / --allow-pickle) if you "
        "trust where it came from."
    )


