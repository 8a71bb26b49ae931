"""Config/tokenizer skeletons of the real SD 1.5 and SDXL base models, for offline loading.

diffusers' `from_single_file` needs a diffusers-format folder of configs (no weights) to
know what to build from a single `.safetensors` checkpoint; without one it asks the Hub.
`assets/skeletons/<family>/` holds those configs, written from the official
stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 repositories. The CLIP BPE
vocabulary is stored once, as OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped in the
open-clip-torch wheel), and each tokenizer folder's `vocab.json` / `merges.txt` are built
from it when a skeleton is first used.

`skeleton_dir(family)` returns a complete folder (configs + tokenizer files) in the cache
(`$LORA_STUDIO_CACHE/skeletons/`, default `~/.cache/lora-studio/skeletons/`), built once per
content version of the assets.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from studio import ASSETS_DIR
from studio.errors import StudioError
from studio.models.families import get_family

log = logging.getLogger(__name__)

SKELETONS_DIR = ASSETS_DIR / "skeletons"
BPE_VOCAB_GZ = SKELETONS_DIR / "bpe_simple_vocab_16e6.txt.gz"
CACHE_ENV = "LORA_STUDIO_CACHE"
CLIP_VOCAB_SIZE = 49408
_COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    """Where generated files live: $LORA_STUDIO_CACHE, else $XDG_CACHE_HOME/lora-studio,
    else ~/.cache/lora-studio."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lora-studio"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The CLIP tokenizer's vocabulary (49408 tokens) and BPE merges, built the way OpenAI's
    `clip/simple_tokenizer.py` does from `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.decompress(BPE_VOCAB_GZ.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:  # pragma: no cover - guards a corrupted asset
        raise StudioError(f"{BPE_VOCAB_GZ} gave {len(tokens)} tokens, expected {CLIP_VOCAB_SIZE}; restore the file.")
    return {tok: i for i, tok in enumerate(tokens)}, merges  # type: ignore[return-value]


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write CLIP's `vocab.json` and `merges.txt` (the slow-tokenizer files every
    transformers version reads) into `folder`."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )


def _source_files(family: str) -> list[Path]:
    root = SKELETONS_DIR / family
    return sorted(p for p in root.rglob("*") if p.is_file())


def _content_hash(family: str) -> str:
    digest = hashlib.sha256()
    for path in [*_source_files(family), BPE_VOCAB_GZ]:
        digest.update(str(path.relative_to(SKELETONS_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _materialise(family: str, target: Path) -> None:
    source = SKELETONS_DIR / family
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for tokenizer_dir in sorted(tmp.glob("tokenizer*")):
            config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
            if config.get("tokenizer_class") == "CLIPTokenizer":  # T5's sentencepiece vocabulary is not shipped
                write_clip_tokenizer_files(tokenizer_dir)
        (tmp / _COMPLETE_MARKER).write_text(family)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is complete).
            if not (target / _COMPLETE_MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _skeleton_dir_cached(family: str, root: str) -> Path:
    target = Path(root) / "skeletons" / f"{family}-{_content_hash(family)}"
    if not (target / _COMPLETE_MARKER).exists():
        if target.exists():  # a half-written folder from an older, killed run
            shutil.rmtree(target, ignore_errors=True)
        log.info("Building the %s config skeleton in %s", family, target)
        try:
            _materialise(family, target)
        except OSError as exc:
            raise StudioError(
                f"Could not write the {family} config skeleton to {target}: {exc}. "
                f"Set ${CACHE_ENV} to a writable folder."
            ) from exc
    return target


def skeleton_dir(family: str) -> Path:
    """A complete diffusers-format config folder (no weights) for the family named `family`
    (assets/skeletons/<name>): model_index.json, component configs and tokenizer files. Built in the cache on
    first use; pass it as `config=` to `from_single_file`."""
    return _skeleton_dir_cached(get_family(family).name, str(cache_root().resolve()))
