"""The mixture file: one .safetensors, so a mixture travels, imports and is named
(`<lora:name>`) like any adapter, and its gates are tensors in the file's own format.

Header metadata `lora_studio_mixture` (JSON):

    {"version": 1, "gate": "block" | "block_timestep" | "prompt" | "arrow",
     "members": [{"name": stem, "sha256": data hash}, ...], "family": ...,
     "bands": B, "timesteps": T, "top_k": k, "temperature": tau}

Members are referenced by the sha256 of their tensor data (A1111's `sshs_model_hash`, what
the library reports), so renaming a member file or editing its metadata keeps the mixture
valid, and a different file with the member's name is never used in its place. They are
looked up beside the mixture (the library folder): first the file of the recorded name,
then any file there with that hash.

Gate tensors (K members, N blocks in the family's `blocks.full` order: BASE = text encoders,
then the denoiser's blocks; N = 26 on the UNet families: BASE, IN00..IN11, M00, OUT00..OUT11):

    block           gate.block [K, N]: a fixed weight per member and block
    block_timestep  gate.base [K] (the text encoders run once, before the steps) and
                    gate.bands [K, B, N - 1]: band b holds timesteps t with floor(t B / T) = b
    prompt          gate.weight [K, N, D], gate.bias [K, N]: g = 2 sigmoid(W e + b), e the
                    prompt embedding (gates.prompt_embedding); 1 (the plain sum) at W = b = 0
    arrow           no tensors (a placeholder gate.none [0]): routing per token, training-free
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from studio.adapters.api import load_adapter
from studio.adapters.formats.files import file_data_sha256, read_checked_header
from studio.adapters.formats.header_keys import MIXTURE_KEY
from studio.errors import StudioError
from studio.fsutil import atomic_write_bytes
from studio.limits import MIX_ADAPTERS
from studio.models.families import get_family

GATE_KINDS = ("block", "block_timestep", "prompt", "arrow")
STEP_OR_PROMPT = {"block_timestep": "its gates change with the denoising timestep",
                  "prompt": "its gates depend on the prompt",
                  "arrow": "it routes each token to members by the token's own input"}
_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> data sha256


@dataclass
class Member:
    name: str
    sha256: str
    path: Path | None = None  # where it was found (None until resolved)


@dataclass
class Mixture:
    """Members, gate kind and gate tensors (see the module doc)."""

    members: list[Member]
    gate: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    family: str | None = None
    bands: int = 1
    timesteps: int = 1000
    top_k: int = 2
    temperature: float = 1.0
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def step_and_prompt_free(self) -> bool:
        return self.why_not_constant() is None

    def why_not_constant(self) -> str | None:
        """None when the gates are one weight per member and block, else why not."""
        if self.gate == "block_timestep" and self.bands > 1:
            bands = self.tensors["gate.bands"]
            if not torch.equal(bands, bands[:, :1].expand_as(bands)):
                return STEP_OR_PROMPT[self.gate]
        if self.gate in ("prompt", "arrow"):
            return STEP_OR_PROMPT[self.gate]
        return None

    def constant_gates(self) -> torch.Tensor:
        """[K, 26] gates of a step- and prompt-independent mixture."""
        why = self.why_not_constant()
        if why is not None:
            raise StudioError(f"This {self.gate!r} mixture has no single weight per block: {why}.")
        if self.gate == "block":
            return self.tensors["gate.block"].float()
        return torch.cat([self.tensors["gate.base"].float()[:, None], self.tensors["gate.bands"][:, 0].float()], 1)


def data_hash(path: Path) -> str:
    """The library's hash of an adapter file (sha256 of the tensor data), cached per file state."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_data_sha256(path)
    return _HASHES[key]


def is_mixture(path: str | Path) -> bool:
    """Whether a file is a mixture (its header names one); False for anything else."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        return MIXTURE_KEY in read_checked_header(path)[1]
    except StudioError:
        return False


def new_mixture(members: list[Path], gate: str = "block", *, weights: list[float] | None = None, bands: int = 4,
                embedding_dim: int | None = None, top_k: int = 2, temperature: float = 1.0) -> Mixture:
    """A mixture of library adapter files whose gates start as the plain weighted sum
    (every gate = the member's weight; arrow: routing)."""
    if gate not in GATE_KINDS:
        raise StudioError(f"Unknown gate kind {gate!r}; choose one of {', '.join(GATE_KINDS)}.")
    if len(members) < 1:
        raise StudioError("A mixture needs at least one member adapter.")
    MIX_ADAPTERS.check(len(members), f"This mixture has {len(members)} members")
    paths = [Path(p) for p in members]
    for path in paths:
        if is_mixture(path):
            raise StudioError(f"{path.name} is itself a mixture; give its member adapters instead.")
    families = {get_family(load_adapter(path).family).name for path in paths}  # each checked to be an adapter
    if len(families) > 1:
        raise StudioError(f"The members are for different model families ({', '.join(sorted(families))}); "
                          "a mixture must be for one.")
    weights = list(weights) if weights is not None else [1.0] * len(paths)
    if len(weights) != len(paths):
        raise StudioError(f"Give one weight per member ({len(paths)}), not {len(weights)}.")
    family = families.pop()
    k, n = len(paths), len(get_family(family).blocks.full)
    w = torch.tensor(weights, dtype=torch.float32)
    if gate == "block":
        tensors = {"gate.block": w[:, None].repeat(1, n)}
    elif gate == "block_timestep":
        if not 1 <= bands <= 100:
            raise StudioError(f"bands must be between 1 and 100 (got {bands}).")
        tensors = {"gate.base": w.clone(), "gate.bands": w[:, None, None].repeat(1, bands, n - 1)}
    elif gate == "prompt":
        if not embedding_dim:
            raise StudioError("A prompt-conditioned mixture needs the text encoder's embedding size.")
        if any(x != 1.0 for x in weights):
            raise StudioError("Prompt-conditioned gates start at 1 (the plain sum); train them instead of weights.")
        tensors = {"gate.weight": torch.zeros(k, n, embedding_dim), "gate.bias": torch.zeros(k, n)}
    else:
        if top_k < 1 or not temperature > 0:
            raise StudioError(f"arrow routing needs top_k >= 1 and temperature > 0 (got {top_k}, {temperature}).")
        tensors = {"gate.none": torch.zeros(0)}
    mixture = Mixture([Member(p.stem, data_hash(p), p) for p in paths], gate, tensors,
                      family, bands if gate == "block_timestep" else 1, top_k=top_k, temperature=temperature)
    return mixture


def save_mixture(path: str | Path, mixture: Mixture) -> Path:
    """Write the mixture atomically (gates in float32)."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"A mixture is a .safetensors file; name it {path.stem}.safetensors.")
    header = {"version": 1, "gate": mixture.gate, "family": mixture.family,
              "members": [{"name": m.name, "sha256": m.sha256} for m in mixture.members],
              "bands": mixture.bands, "timesteps": mixture.timesteps, "top_k": mixture.top_k,
              "temperature": mixture.temperature}
    metadata = {k: v for k, v in mixture.metadata.items() if k != MIXTURE_KEY}
    metadata.setdefault("ss_output_name", path.stem)
    metadata.setdefault("modelspec.title", path.stem)
    if mixture.family:
        metadata.setdefault("ss_base_model_version", get_family(mixture.family).ss_base_model_version)
    metadata[MIXTURE_KEY] = json.dumps(header)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in mixture.tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    return path


def load_mixture(path: str | Path, *, resolve: bool = True) -> Mixture:
    """Read and check a mixture file; with `resolve`, find every member beside it."""
    from safetensors import safe_open

    path = Path(path)
    _, metadata = read_checked_header(path)
    if MIXTURE_KEY not in metadata:
        raise StudioError(f"{path.name} is an adapter, not a mixture.")
    try:
        head = json.loads(metadata[MIXTURE_KEY])
        members = [Member(str(m["name"]), str(m["sha256"])) for m in head["members"]]
        gate = str(head["gate"])
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key).float() for key in handle.keys()}
        mixture = Mixture(members, gate, tensors, head.get("family"), int(head.get("bands", 1)),
                          int(head.get("timesteps", 1000)), int(head.get("top_k", 2)),
                          float(head.get("temperature", 1.0)), dict(metadata))
    except (ValueError, KeyError, TypeError) as error:
        raise StudioError(f"{path.name}: the mixture header is broken ({error}); write the mixture again.") from None
    k, n = len(members), len(get_family(mixture.family).blocks.full)
    shapes = {"block": {"gate.block": (k, n)},
              "block_timestep": {"gate.base": (k,), "gate.bands": (k, mixture.bands, n - 1)},
              "prompt": {"gate.weight": (k, n, None), "gate.bias": (k, n)},
              "arrow": {}}.get(gate)
    if shapes is None:
        raise StudioError(f"{path.name}: unknown gate kind {gate!r} (this studio knows {', '.join(GATE_KINDS)}).")
    for name, shape in shapes.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.ndim != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
            got = "missing" if tensor is None else tuple(tensor.shape)
            raise StudioError(f"{path.name}: {name} should have shape {shape} for {k} members, not {got}.")
        if not torch.isfinite(tensor).all():
            raise StudioError(f"{path.name}: {name} holds NaN or infinite gates; the file is broken.")
    if not members:
        raise StudioError(f"{path.name}: the mixture has no members.")
    if resolve:
        for member in members:
            member.path = find_member(path.parent, member, path.name)
    return mixture


def find_member(folder: Path, member: Member, where: str) -> Path:
    """The file with the member's data hash in `folder`: its recorded name first, then any."""
    named = folder / f"{member.name}.safetensors"
    candidates = ([named] if named.is_file() else []) + sorted(p for p in folder.glob("*.safetensors") if p != named)
    for candidate in candidates:
        try:
            if data_hash(candidate) == member.sha256:
                return candidate
        except Exception:  # an unreadable neighbour is not the member
            continue
    raise StudioError(f"{where}: member {member.name!r} (sha256 {member.sha256[:12]}...) is not in {folder}; put "
                      "that adapter file beside the mixture (the library folder).")
