"""Instant adapters: a LoRA for a base model from pictures of a concept or a description of
it, in one forward pass of a hypernetwork (studio.instant.network), with no training.

The result is an ordinary kohya-layout LoRA / LoCon file in the library (blends, LoRA
Block Weight, export, ComfyUI and A1111 treat it as any other); its metadata names the
generator (`lora_studio_generator`, its version and the sha256 of its weights) and its
input (`lora_studio_generator_input`: the pictures' sha256 or the description). The
trigger word (`modelspec.trigger_phrase`) is the one the hypernetwork was trained with
unless another is asked for: then the file bundles an embedding of that name whose vectors
are the trained trigger's (A1111 and this studio load bundled embeddings; ComfyUI does
not, so there use the trained trigger).

A base model has a hypernetwork when its folder holds one in `hyperlora/` (the built-in
model ships assets/builtin/hyperlora, trained by toyworld/train_hyperlora.py) made for these
very denoiser weights. Imports torch only inside the functions that need it.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import json
import re
from pathlib import Path

from studio.datasets import DEFAULT_MAX_PIXELS, open_image, training_items
from studio.errors import StudioError
from studio.models import ModelRef, resolve_model
from studio.models.families import get_family
from studio.workspace import Workspace, check_name

HYPERNETWORK_FOLDER = "hyperlora"
GENERATOR = "lora-studio instant"
MAX_PICTURES = 64            # the first 64 pictures (by name) of a larger folder are read
MAX_DESCRIPTION_CHARS = 300


def hypernetwork_folder(model_ref: ModelRef) -> Path:
    """The hypernetwork of a base model (its folder's `hyperlora/`); StudioError when it has none."""
    folder = model_ref.path / HYPERNETWORK_FOLDER if model_ref.path.is_dir() else None
    if folder is None or not folder.is_dir():  # a folder without its files: HyperLoRA.load says which
        raise StudioError(f"No instant-adapter hypernetwork for the base model {model_ref.display_name!r}: instant "
                          "adapters work with the built-in model, or with a model folder holding one in "
                          f"{HYPERNETWORK_FOLDER}/ (`python -m toyworld.train_hyperlora --model MODEL --concepts DIR`).")
    return folder


@functools.lru_cache(maxsize=2)
def _load_hypernetwork(folder: Path, stamp: tuple[int, int]):
    from studio.instant.network import HyperLoRA

    return HyperLoRA.load(folder)


@functools.lru_cache(maxsize=4)
def _model_hashes(model_ref: ModelRef, stamp: tuple) -> dict[str, str]:
    from studio.adapters.api import base_model_hashes

    return base_model_hashes(model_ref)


def model_hashes(model_ref: ModelRef) -> dict[str, str]:
    """`base_model_hashes` of the model (its denoiser weights' sha256 for a folder), computed
    once while its files are unchanged: a full-size model's weights take seconds to hash."""
    files = sorted((model_ref.path / "unet").glob("*.safetensors")) if model_ref.path.is_dir() else [model_ref.path]
    return _model_hashes(model_ref, tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


def load_hypernetwork(model_ref: ModelRef):
    """The model's hypernetwork (cached while its weights file is unchanged), refused when it
    was trained on other denoiser weights than the model's."""
    from studio.instant.network import WEIGHTS_FILE

    folder = hypernetwork_folder(model_ref)
    weights = folder / WEIGHTS_FILE
    stat = weights.stat() if weights.is_file() else None
    network = _load_hypernetwork(folder, (stat.st_mtime_ns, stat.st_size) if stat else (0, 0))
    trained_on = network.config.base_model.get("denoiser_sha256")
    if trained_on != model_hashes(model_ref).get("ss_new_sd_model_hash"):
        raise StudioError(f"The hypernetwork in {folder} was trained for other weights of "
                          f"{model_ref.display_name!r} (denoiser sha256 {str(trained_on)[:12]}...); train it again "
                          "for this model with `python -m toyworld.train_hyperlora`.")
    return network


def read_pictures(source: str | Path | list[str | Path]) -> tuple[list, list[str]]:
    """The pictures of a folder (its training pictures, not reg/; the first MAX_PICTURES by
    name) or of a list of files, as RGB images, with their files' sha256. A folder without
    pictures, or any picture that cannot be read, is refused in one line."""
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if not folder.is_dir():
            raise StudioError(f"{folder} is not a folder of pictures; give a folder with .png / .jpg / .webp / .bmp "
                              "pictures of the concept.")
        items, skipped = training_items(folder)
        if skipped:
            raise StudioError(skipped[0].message)
        paths = [item.path for item in items if not item.is_regularisation][:MAX_PICTURES]
        if not paths:
            raise StudioError(f"{folder} has no pictures (.png, .jpg, .webp, .bmp); add one or more pictures of "
                              "the concept.")
    else:
        paths = [Path(p) for p in source][:MAX_PICTURES]
        if not paths:
            raise StudioError("No pictures given; give one or more pictures of the concept.")
    images = [open_image(path, max_pixels=DEFAULT_MAX_PIXELS) for path in paths]
    hashes = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths]
    return images, hashes


def check_description(network, description: str) -> str:
    """The description, stripped; refused in one line when empty, too long, or with words the
    hypernetwork never read (it would guess) or none that says what the concept is."""
    text = " ".join(description.split())
    if not text:
        raise StudioError("The description is empty; say what the concept is, e.g. 'a purple star'.")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise StudioError(f"The description has {len(text)} characters; keep it under {MAX_DESCRIPTION_CHARS} "
                          "(a few words: 'a purple star').")
    known = sorted(set(network.config.vocab[2:]) - set(network.config.stop_words))
    unknown = network.unknown_words(text)
    if unknown:
        raise StudioError(f"The hypernetwork does not know the word(s) {', '.join(repr(w) for w in unknown)}; "
                          f"describe the concept with: {', '.join(known)}.")
    if not network.content_words(text):
        raise StudioError(f"The description {text!r} does not say what the concept is; name it with: "
                          f"{', '.join(known)}.")
    return text


def instant_code(network, *, images: list | None = None, description: str | None = None):
    """The hypernetwork's code of the concept: the mean over the pictures' codes, or the description's."""
    import torch

    from studio.instant.network import to_pixels

    with torch.no_grad():
        if images is not None:
            return network.encode_images(to_pixels(images, network.config.resolution), [len(images)])[0]
        return network.encode_text(network.tokenize([description]))[0]


def make_instant_adapter(workspace: Workspace, name: str, *, pictures: str | Path | list | None = None,
                         description: str | None = None, model: str = "builtin", trigger: str | None = None,
                         overwrite: bool = False) -> Path:
    """Write `adapters/<name>.safetensors`: the LoRA the model's hypernetwork makes from the
    pictures (a folder or files) or the description (exactly one of them), for `trigger`
    (default: the hypernetwork's). Every refusal is one line and writes nothing."""
    from studio.adapters import AdapterFile, save_adapter

    if (pictures is None) == (description is None):
        raise StudioError("Give pictures of the concept or a description of it (one of the two).")
    stem = check_name(name, "adapter name")
    target = workspace.adapters_dir / f"{stem}.safetensors"
    if target.exists() and not overwrite:
        raise StudioError(f"An adapter named {stem!r} is already in the library; choose another name or delete the "
                          "old one first.")
    model_ref = resolve_model(model)
    network = load_hypernetwork(model_ref)
    trigger = network.config.trigger if trigger is None else trigger.strip()
    family = get_family(model_ref.family)
    embeddings = _trigger_embeddings(network, model_ref, trigger)
    if pictures is not None:
        images, hashes = read_pictures(pictures)
        code = instant_code(network, images=images)
        given = {"pictures": hashes}
    else:
        description = check_description(network, description)
        code = instant_code(network, description=description)
        given = {"description": description}
    adapter = AdapterFile(network.adapter_modules(code), {}, family.name, embeddings=embeddings)
    adapter.metadata = instant_metadata(network, model_ref, adapter, stem, trigger, given)
    workspace.adapters_dir.mkdir(parents=True, exist_ok=True)
    return save_adapter(target, adapter)


def _trigger_embeddings(network, model_ref: ModelRef, trigger: str) -> dict:
    """{} for the trained trigger; else {trigger: the trained trigger's vectors}, after
    checking that the word can be a new token of every tokenizer of the base model."""
    if trigger == network.config.trigger:
        return {}
    if not re.fullmatch(r"[a-z0-9]+", trigger):  # CLIP lower-cases prompts: an upper-case token would never match
        raise StudioError(f"The trigger word {trigger!r} must be one lower-case word of letters and digits, e.g. 'sks'.")
    from transformers import CLIPTokenizer

    family = get_family(model_ref.family)
    for attr in family.tokenizers:
        vocab = CLIPTokenizer.from_pretrained(model_ref.path / attr, local_files_only=True).get_vocab()
        if trigger in vocab or f"{trigger}</w>" in vocab:
            raise StudioError(f"The trigger word {trigger!r} is already a word of the base model's tokenizer; "
                              f"choose a rarer one, or the hypernetwork's own {network.config.trigger!r}.")
    return {trigger: [v.clone() for v in network.trigger_embedding()]}


def instant_metadata(network, model_ref: ModelRef, adapter, name: str, trigger: str, given: dict) -> dict[str, str]:
    """sd-scripts / modelspec metadata of an instant adapter, naming its generator and input."""
    family = get_family(model_ref.family)
    kind = adapter.adapter_type
    rank = network.config.rank
    conv = any(m.is_conv_kernel for m in adapter.modules.values())
    resolution = network.config.resolution
    return {
        "ss_output_name": name,
        "ss_base_model_version": family.ss_base_model_version,
        "ss_network_module": kind.ss_network_module,
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps(kind.ss_network_args(conv_dim=rank if conv else None,
                                                           conv_alpha=rank if conv else None)),
        "ss_sd_model_name": model_ref.display_name,
        **model_hashes(model_ref),
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.lora_architecture,
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "modelspec.trigger_phrase": trigger,
        "lora_studio_adapter_type": kind.label,
        "lora_studio_generator": GENERATOR,
        "lora_studio_generator_version": json.dumps({"hypernetwork": network.config.version,
                                                     "weights_sha256": network.weights_sha256}),
        "lora_studio_generator_input": json.dumps(given),
    }
