"""Models by name: pulled once into the workspace, then found offline by the same name.

A model name is one of:

- ``org/name[@revision]``: a Hugging Face repo. A diffusers pipeline (model_index.json) is a
  base model and lands in ``workspace/models/org--name``; a transformers image-to-text model
  (config.json) or a WD14 tagger (.onnx + selected_tags.csv) is a captioner and lands in
  ``workspace/captioners/org--name``.
- ``org/name/path/file.safetensors[@revision]``: one file of a Hugging Face repo.
- ``civitai:VERSION_ID``: a CivitAI model version (the number after ``modelVersionId=`` in
  the model page's address).
- an ``https://`` address of a file, optionally ending in ``#sha256=HEX``.

A single file is a base-model checkpoint (to workspace/models) or, when its header is an
adapter's (CivitAI types LORA / LoCon / DoRA), a LoRA for the library (workspace/adapters),
kept byte for byte.

`pull(name, workspace)` fetches it:

- Hugging Face through huggingface_hub, which honours HF_ENDPOINT, HF_TOKEN and
  HF_HUB_OFFLINE, resumes a dropped connection with HTTP Range and checks each file's size;
  its `verify_repo_checksums` then checks every file against the repo's LFS sha256 (git blob
  id for small files), which the download itself does not.
- CivitAI through its REST API (`GET /api/v1/model-versions/ID`: files[].downloadUrl,
  sizeKB, hashes.SHA256, metadata.format and the model's type) at
  $LORA_STUDIO_CIVITAI_ENDPOINT (default https://civitai.com), with $CIVITAI_TOKEN sent as
  a Bearer token; addresses with `download`, the same resumable downloader (sha256 computed
  while writing, checked against the size the server announces and the hash given).

Only what a pipeline or captioner loads is fetched: configs, tokenizer files and the plain
`.safetensors` weights (no pickles, no fp16 / ema variants, ONNX or Flax exports, pictures).
Everything is written in a staging folder (workspace/models/.pulling) and renamed into place
once complete and verified, so any failure (network, 401/403/404, a wrong hash, a pickle, a
full disk) keeps nothing and says why in one line. The index (workspace/models/index.json)
records each pulled name's path (relative to the workspace), kind, revision, the sha256 of
its files, source and size; `local_path` reads it with no network.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterator, Literal
from urllib.parse import unquote, urlsplit

from studio import ASSETS_DIR
from studio.errors import StudioError
from studio.fsutil import atomic_write_text
from studio.models.families import family_from_pipeline_class
from studio.models.single_file import UNET_PREFIX, detect_family
from studio.safetensors_file import PICKLE_SUFFIXES, read_safetensors_header, sniff_format
from studio.workspace import Workspace

ProgressFn = Callable[[int, int], None]  # (bytes fetched, bytes in all)
Use = Literal["base model", "captioner", "adapter"]

CIVITAI_ENDPOINT_ENV = "LORA_STUDIO_CIVITAI_ENDPOINT"
CIVITAI_TOKEN_ENV = "CIVITAI_TOKEN"
DEFAULT_CIVITAI_ENDPOINT = "https://civitai.com"
CURATED_FILE = ASSETS_DIR / "curated-models.toml"
INDEX_FILE = "index.json"
STAGING_DIR = ".pulling"
#: What each use accepts, by the kind the index records.
USE_KINDS: dict[str, tuple[str, ...]] = {"base model": ("diffusers", "single_file"), "captioner": ("captioner",),
                                         "adapter": ("adapter",)}
KIND_LABELS = {"diffusers": "a diffusers base model", "single_file": "a base-model checkpoint",
               "adapter": "an adapter (in the library)", "captioner": "a captioner"}
#: CivitAI model types pulled, and the kind their file must be.
CIVITAI_TYPES = {"LORA": "adapter", "LoCon": "adapter", "DoRA": "adapter", "Checkpoint": "single_file"}
PICKLES = tuple(sorted(PICKLE_SUFFIXES))
#: Suffixes of weight files: a "repo" named like this is a mistyped local path.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".onnx", *PICKLES)
#: Consecutive attempts without a new byte before a download gives up.
DOWNLOAD_ATTEMPTS = 5
REPORT_EVERY_S = 0.2
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HF_NAME = re.compile(rf"(?P<repo>{_REPO_PART}/{_REPO_PART})(?P<file>(?:/[^/@\s]+)*)"
                      r"(?:@(?P<revision>[A-Za-z0-9][A-Za-z0-9._/-]{0,199}))?")
_CIVITAI_NAME = re.compile(r"civitai:(?P<version>[0-9]{1,12})", re.IGNORECASE)


# --------------------------------------------------------------------------- names
@dataclass(frozen=True)
class ModelName:
    """A parsed model name; `key` is how the index records it."""

    source: Literal["huggingface", "civitai", "url"]
    key: str
    repo: str = ""       # huggingface: org/name
    file: str = ""       # huggingface: one file of the repo ("": the whole repo)
    revision: str = ""   # huggingface: branch, tag or commit ("": the default branch)
    version: int = 0     # civitai: the model-version id
    url: str = ""        # url: the address without its #sha256= fragment
    sha256: str = ""     # url: the hash given as #sha256=


def parse_name(text: str) -> ModelName | None:
    """The model name `text` spells, or None when it is none (a path, 'builtin'). A
    malformed address raises a StudioError."""
    text = (text or "").strip()
    if match := _CIVITAI_NAME.fullmatch(text):
        version = int(match["version"])
        return ModelName("civitai", f"civitai:{version}", version=version)
    if text.lower().startswith(("https://", "http://")):
        return _parse_url(text)
    match = _HF_NAME.fullmatch(text)
    if match is None:
        return None
    repo, file, revision = match["repo"], match["file"].lstrip("/"), match["revision"] or ""
    if repo.lower().endswith(WEIGHT_SUFFIXES) or ".." in repo:
        return None  # models/x.safetensors: a local path that is not there
    parts = file.split("/") if file else []
    if parts and ("." not in parts[-1] or any(part in (".", "..") for part in parts)):
        return None  # a folder path, not a repo's file
    key = repo + (f"/{file}" if file else "") + (f"@{revision}" if revision not in ("", "main") else "")
    return ModelName("huggingface", key, repo=repo, file=file, revision="" if revision == "main" else revision)


def _parse_url(text: str) -> ModelName:
    parts = _check_address(text)
    sha256 = ""
    if parts.fragment:
        found = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", parts.fragment)
        if found is None:
            raise StudioError(f"The end of {text!r} after '#' must be sha256= and the file's 64 hex digits.")
        sha256 = found.group(1).lower()
    url = parts._replace(fragment="").geturl()
    return ModelName("url", url, url=url, sha256=sha256)


def _check_address(text: str):
    """The parts of an https address (plain http only on this machine's loopback)."""
    parts = urlsplit(text)
    if not parts.hostname or parts.scheme.lower() not in ("https", "http"):
        raise StudioError(f"{text!r} is not a complete address; give https://HOST/PATH.")
    if parts.scheme.lower() == "http" and parts.hostname not in _LOOPBACK:
        raise StudioError(f"{text!r} is a plain http address; use https:// (plain http only for this machine).")
    return parts


def is_model_name(text: str) -> bool:
    """True when `text` names a model to pull (and is not a file or folder that exists)."""
    try:
        parsed = parse_name(text)
    except StudioError:
        return True  # a malformed address is still meant as one: pull says what is wrong
    return parsed is not None and not Path(text.strip()).expanduser().exists()


# --------------------------------------------------------------------------- the index
@dataclass(frozen=True)
class PulledModel:
    """One entry of the index: a name pulled into the workspace."""

    name: str
    kind: str            # diffusers, single_file, adapter or captioner
    path: str            # relative to the workspace root
    source: str          # where it came from
    revision: str = ""   # the repo's commit, the CivitAI version, "" for an address
    sha256: dict[str, str] = field(default_factory=dict)  # file (relative to `path`, or its name) -> sha256
    size: int = 0

    def location(self, workspace: Workspace) -> Path:
        return workspace.root / self.path


def _workspace(workspace: Workspace | None) -> Workspace:
    """The workspace given, else this process's ($LORA_STUDIO_WORKSPACE or ./workspace)."""
    return workspace if workspace is not None else Workspace.open(None, create=False)


def read_index(workspace: Workspace) -> dict[str, PulledModel]:
    """Every name the index records (whether or not its files are still there)."""
    path = workspace.models_dir / INDEX_FILE
    if not path.is_file():
        return {}
    try:
        models = json.loads(path.read_text(encoding="utf-8"))["models"]
        known = {f.name for f in fields(PulledModel)}
        return {key: PulledModel(**{k: v for k, v in entry.items() if k in known}) for key, entry in models.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise StudioError(f"{path} is damaged ({type(error).__name__}: {error}); delete it and pull the models "
                          "again (their files stay where they are).") from None


@contextlib.contextmanager
def _index_lock(workspace: Workspace) -> Iterator[None]:
    """One writer of the index at a time (two pulls from the page, or the page and the CLI):
    a lock on the models folder itself."""
    import fcntl

    workspace.models_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workspace.models_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _record(workspace: Workspace, entry: PulledModel) -> None:
    entries = read_index(workspace)
    entries[entry.name] = entry
    text = json.dumps({"version": 1, "models": {k: asdict(v) for k, v in sorted(entries.items())}}, indent=2)
    atomic_write_text(workspace.models_dir / INDEX_FILE, text + "\n")


def find_pulled(name: str, workspace: Workspace | None = None) -> PulledModel | None:
    """The index entry of `name` when it is pulled and its files are there; no network."""
    parsed = parse_name(name)
    if parsed is None:
        return None
    ws = _workspace(workspace)
    entry = read_index(ws).get(parsed.key)
    return entry if entry is not None and entry.location(ws).exists() else None


def local_path(name: str, workspace: Workspace | None = None, *, use: Use) -> Path:
    """Where the pulled `name` lies, for `use`; a StudioError when it is not pulled (saying
    how to pull it) or is of another kind. No network."""
    ws = _workspace(workspace)
    entry = find_pulled(name, ws)
    if entry is None:
        raise StudioError(f"{name!r} is no file or folder here and not pulled into {ws.root}: pull it first "
                          f"(`lora-studio models pull {name.strip()}`, or pick it in the page's {use} field).")
    if entry.kind not in USE_KINDS[use]:
        raise StudioError(f"{name!r} was pulled as {KIND_LABELS[entry.kind]} ({entry.path}), "
                          f"so it cannot be used as a {use}.")
    return entry.location(ws)


@dataclass(frozen=True)
class CuratedModel:
    name: str
    use: str
    note: str


def curated(use: Use | None = None) -> list[CuratedModel]:
    """The curated list (assets/curated-models.toml), for one use or all."""
    data = tomllib.loads(CURATED_FILE.read_text(encoding="utf-8"))
    found = [CuratedModel(item["name"], section.replace("_", " "), item.get("note", ""))
             for section, items in data.items() for item in items]
    return [model for model in found if use is None or model.use == use]


def choices(workspace: Workspace, use: Use) -> list[str]:
    """What a field offers for `use`: the names pulled, the curated names not pulled yet and,
    for a base model, the other diffusers folders and .safetensors checkpoints in
    workspace/models."""
    index = read_index(workspace)
    pulled = [e for e in index.values() if e.kind in USE_KINDS[use] and e.location(workspace).exists()]
    names = [e.name for e in pulled]
    names += [c.name for c in curated(use) if c.name not in names]
    models = workspace.models_dir
    if use == "base model" and models.is_dir():
        taken = {e.location(workspace) for e in index.values()}
        for entry in sorted(models.iterdir()):
            if entry not in taken and ((entry.is_dir() and (entry / "model_index.json").is_file())
                                       or entry.suffix.lower() == ".safetensors"):
                names.append(str(entry))
    return names


# --------------------------------------------------------------------------- pulling
@dataclass
class _Fetched:
    """What a source put in the staging folder, before it is checked and installed."""

    path: Path
    kind: str            # diffusers, captioner, or "file" (a checkpoint or an adapter, by its header)
    target: str          # the file or folder name wanted in place
    source: str
    revision: str
    sha256: dict[str, str]
    size: int
    declared: str = ""   # the kind the source says the file is (CivitAI's type)


class _Progress:
    """Bytes fetched, reported as report(done, total) once the total is known, at most every
    REPORT_EVERY_S and when done."""

    def __init__(self, report: ProgressFn | None):
        self.report, self.done, self.total, self._shown = report, 0, 0, 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.report and self.total and (now - self._shown >= REPORT_EVERY_S or self.done >= self.total):
            self._shown = now
            self.report(self.done, max(self.total, self.done))

    def bar(self, *args, **kwargs) -> "_Bar":
        return _Bar(self)


class _Bar:
    """The progress bar huggingface_hub's downloader drives (its `tqdm_class`), counting into _Progress."""

    def __init__(self, progress: _Progress):
        self.progress = progress

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def update(self, count: int | float | None = 1) -> None:
        self.progress.add(int(count or 0))

    def close(self) -> None:
        return None


def pull(name: str, workspace: Workspace, *, progress: ProgressFn | None = None) -> tuple[PulledModel, bool]:
    """Fetch the model `name` into `workspace` unless it is there already (then nothing
    touches the network). Returns its index entry and whether anything was fetched.
    `progress(done, total)` gets the bytes fetched."""
    parsed = parse_name(name)
    if parsed is None:
        text = (name or "").strip()
        if text in ("", "builtin") or Path(text).expanduser().exists():
            raise StudioError(f"{text or 'builtin'!r} is already on this machine; nothing to pull.")
        raise StudioError(f"{text!r} is not a model name: use org/name[@revision] (a Hugging Face repo), "
                          "org/name/path/file.safetensors, civitai:VERSION_ID or an https:// address.")
    existing = find_pulled(name, workspace)
    if existing is not None:
        return existing, False
    fetch = {"huggingface": _fetch_huggingface, "civitai": _fetch_civitai, "url": _fetch_url}[parsed.source]
    with _staging(workspace) as stage, _disk_errors(parsed.key):
        fetched = fetch(parsed, stage, _Progress(progress))
        return _install(workspace, parsed, fetched), True


@contextlib.contextmanager
def _staging(workspace: Workspace) -> Iterator[Path]:
    """A fresh folder in workspace/models/.pulling, removed afterwards whatever happens
    (what succeeded was renamed out of it). Folders of processes that died are removed too."""
    root = workspace.models_dir / STAGING_DIR
    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            root.rmdir()  # when no other pull is under way


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        raise StudioError(f"The workspace's disk is full: {what} could not be written and nothing was kept. "
                          "Free some space and pull again.") from None


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise StudioError(f"{what} needs {needed / 1e9:.2f} GB but the workspace's disk has {free / 1e9:.2f} GB "
                          "free; free some space and pull again. Nothing was kept.")


def captioner_folder_kind(folder: Path) -> str:
    """The kind of captioning model a folder holds (studio.datasets.captioning loads it): "tagger"
    (a .onnx model or selected_tags.csv), "toy" (the toy captioner's config and weights) or
    "transformers" (any other folder with config.json)."""
    if (folder / "selected_tags.csv").exists() or any(folder.glob("*.onnx")):
        return "tagger"
    if (folder / "config.json").is_file():
        return "toy" if (folder / "model.safetensors").is_file() and _is_toy_config(folder) else "transformers"
    raise StudioError(f"{folder} holds no captioning model: expected config.json (a transformers "
                      "image-to-text model) or model.onnx + selected_tags.csv (a WD14 tagger).")


def _is_toy_config(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("kind") == "toy-captioner"
    except (OSError, ValueError, AttributeError):
        return False


def _install(workspace: Workspace, name: ModelName, fetched: _Fetched) -> PulledModel:
    """Check what was fetched and rename it into place; record it in the index."""
    kind = fetched.kind
    label = f"{name.key} ({fetched.target})" if fetched.kind == "file" else name.key
    if kind == "file":
        kind = _file_kind(fetched.path, label)
        if fetched.declared and kind != fetched.declared:
            raise StudioError(f"{label} says it is {KIND_LABELS[fetched.declared]} but its file is "
                              f"{KIND_LABELS[kind]}; nothing was kept.")
    elif kind == "captioner":
        captioner_folder_kind(fetched.path)
    folder = {"diffusers": workspace.models_dir, "single_file": workspace.models_dir,
              "adapter": workspace.adapters_dir, "captioner": workspace.captioners_dir}[kind]
    target_name = _safe_file_name(fetched.target) if fetched.kind == "file" else fetched.target
    _fsync_all(fetched.path)
    with _index_lock(workspace):
        existing = find_pulled(name.key, workspace)
        if existing is not None:  # pulled meanwhile by another page or process
            return existing
        folder.mkdir(parents=True, exist_ok=True)
        target = _free_target(folder, target_name)
        _move(fetched.path, target)
        entry = PulledModel(name.key, kind, target.relative_to(workspace.root).as_posix(), fetched.source,
                            fetched.revision, fetched.sha256, fetched.size)
        _record(workspace, entry)
    return entry


def _file_kind(path: Path, label: str) -> str:
    """'single_file' (a base-model checkpoint) or 'adapter', from the file's bytes; anything
    else (a pickle, another format, a file of no supported model) is refused."""
    fmt = sniff_format(path)
    if fmt in ("pickle", "zip-pickle"):
        raise StudioError(f"{label} is a pickle, which can run code when loaded, so it was not kept. Pull a "
                          ".safetensors version of it (most models on Hugging Face and CivitAI have one).")
    if fmt != "safetensors":
        raise StudioError(f"{label} is not a safetensors file ({fmt}); only .safetensors checkpoints and adapters "
                          "can be pulled. Nothing was kept.")
    tensors, _ = read_safetensors_header(path)
    if any(key.startswith(UNET_PREFIX) for key in tensors):
        detect_family(path)
        return "single_file"
    from studio.adapters import load_adapter

    load_adapter(path)  # its StudioError says why the file is no adapter either
    return "adapter"


def _safe_file_name(file_name: str) -> str:
    """A downloaded file's name as the library names adapters (studio.workspace.check_name's
    rule: letters, digits, '.', '_', '-', spaces; no leading dot), for checkpoints too."""
    stem = file_name[: -len(".safetensors")] if file_name.lower().endswith(".safetensors") else file_name
    stem = re.sub(r"[^A-Za-z0-9._ -]+", "_", stem).strip("._ -")[:90] or "model"  # room for -2, -3...
    return f"{stem}.safetensors"


def _free_target(folder: Path, name: str) -> Path:
    """`folder/name`, or name-2, name-3, ... when that is taken."""
    stem, suffix = (name[: -len(".safetensors")], ".safetensors") if name.endswith(".safetensors") else (name, "")
    candidate, number = folder / name, 2
    while candidate.exists() or candidate.is_symlink():
        candidate, number = folder / f"{stem}-{number}{suffix}", number + 1
    return candidate


def _move(source: Path, target: Path) -> None:
    """Rename `source` to `target`; across file systems (a library folder linked elsewhere),
    copy beside the target and rename that."""
    try:
        os.rename(source, target)
        return
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        if source.is_dir():
            shutil.copytree(source, temp)
        else:
            shutil.copyfile(source, temp)
        os.rename(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


def _fsync_all(path: Path) -> None:
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text.replace("/", "--")).strip(".-")[:120] or "model"


# --------------------------------------------------------------------------- Hugging Face
def _fetch_huggingface(name: ModelName, stage: Path, progress: _Progress) -> _Fetched:
    import huggingface_hub
    from huggingface_hub import HfApi, constants, hf_hub_download

    if name.file:
        _refuse_by_name(name.file, name.key)
    if constants.is_offline_mode():
        raise StudioError(f"HF_HUB_OFFLINE is set, so {name.key} cannot be pulled: unset it (or set "
                          "HF_HUB_OFFLINE=0) and pull again.")
    huggingface_hub.utils.logging.set_verbosity_error()  # our progress line says what happens
    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")  # read now, not at import
    api = HfApi(endpoint=endpoint)
    files = stage / "files"

    def fetch(paths: list[str]) -> None:
        for path in paths:
            hf_hub_download(name.repo, path, revision=commit, local_dir=files, endpoint=endpoint,
                            tqdm_class=progress.bar)

    with _huggingface_errors(name, endpoint):
        commit = api.model_info(name.repo, revision=name.revision or constants.DEFAULT_REVISION).sha
        if name.file:
            tree = _files(api.get_paths_info(name.repo, [name.file], revision=commit))
            if name.file not in tree:
                raise StudioError(f"{name.repo} has no file {name.file} (revision {name.revision or 'main'}) "
                                  f"on {endpoint}; check the path (as in the repo's Files tab).")
            kind, first, small, weights = "file", [], [], [name.file]
        else:
            tree = _files(api.list_repo_tree(name.repo, recursive=True, revision=commit))
            if "model_index.json" in tree:
                kind, first = "diffusers", ["model_index.json"]
                fetch(first)
                small, weights = _pipeline_files(name, tree, files / "model_index.json")
            else:
                kind, first = "captioner", []
                small, weights = _captioner_files(name, tree)
        planned = first + small + weights
        progress.total = sum(tree[path].size for path in planned)
        _check_space(stage, progress.total - progress.done, name.key)
        fetch(small)
        if kind == "diffusers":
            detect_family(files)  # an unsupported pipeline is refused before its weights come
        fetch(weights)
        verified = api.verify_repo_checksums(name.repo, revision=commit, local_dir=files)
    broken = [m for m in verified.mismatches if m["path"] in planned]
    if broken:
        bad = broken[0]
        raise StudioError(f"{name.key}: {bad['path']} does not match the {bad['algorithm']} {endpoint} gives for it "
                          f"({bad['expected'][:16]}…, got {bad['actual'][:16]}…), so nothing was kept. Pull again; "
                          "if it fails again, the server or a proxy serves a damaged file.")
    missing = [path for path in planned if path in verified.missing_paths]
    if missing:
        raise StudioError(f"{name.key}: {missing[0]} did not arrive; nothing was kept. Pull again.")
    shutil.rmtree(files / ".cache", ignore_errors=True)  # huggingface_hub's own notes on the download
    sha256 = {path: tree[path].lfs.sha256 for path in planned if tree[path].lfs is not None}
    source = f"{endpoint}/{name.repo}"
    if kind == "file":
        return _Fetched(files / name.file, "file", Path(name.file).name, source, commit, sha256, progress.total)
    target = _slug(name.repo + (f"/{name.revision}" if name.revision else ""))
    return _Fetched(files, kind, target, source, commit, sha256, progress.total)


def _files(entries) -> dict:
    """The files of a tree listing by path, leaving out any path that would leave the
    download folder ('..', absolute)."""
    from huggingface_hub.hf_api import RepoFile

    return {e.path: e for e in entries if isinstance(e, RepoFile) and not e.path.startswith("/")
            and "\\" not in e.path and all(part not in ("", ".", "..") for part in e.path.split("/"))}


def _file_role(file_name: str) -> str:
    """What a repo file is to a loader: 'weights' (plain .safetensors, sharded or not),
    'variant' (fp16 / ema / non_ema .safetensors), 'pickle', 'config' (json, tokenizer
    files) or 'other' (ONNX, Flax, TF, pictures, code, READMEs)."""
    lower = file_name.lower()
    if lower.endswith(".safetensors"):
        return "variant" if "." in file_name[: -len(".safetensors")] else "weights"
    if lower.endswith(PICKLES):
        return "pickle"
    if lower.endswith(".safetensors.index.json"):
        return "variant" if "." in file_name[: -len(".safetensors.index.json")] else "config"
    if lower.endswith(".index.json"):
        return "other"  # the shard list of pickled or Flax weights
    if lower.endswith((".json", ".txt", ".model", ".jinja")):
        return "config"
    return "other"


def _pipeline_files(name: ModelName, tree: dict, index_path: Path) -> tuple[list[str], list[str]]:
    """(configs and tokenizer files, weights) of the components the pipeline loads; a
    component with weights but no plain .safetensors ones is refused."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        family = family_from_pipeline_class(str(index.get("_class_name", "")))
    except (OSError, ValueError, AttributeError) as error:
        raise StudioError(f"{name.key}'s model_index.json is not valid JSON ({error}); it is no diffusers "
                          "pipeline this studio can load.") from None
    skipped = {key for key, value in (family.pipeline_kwargs if family else {}).items() if value is None}
    components = {key for key, value in index.items() if not key.startswith("_") and isinstance(value, list)
                  and len(value) == 2 and value[0] is not None and key not in skipped}
    small, weights, others = [], [], {}
    for path in sorted(tree):
        folder, _, file_name = path.partition("/")
        if folder not in components or "/" in file_name:
            continue
        role = _file_role(file_name)
        if role == "config":
            small.append(path)
        elif role == "weights":
            weights.append(path)
        elif role in ("pickle", "variant"):
            others.setdefault(folder, []).append(file_name)
    unusable = [f"{folder}/ ({', '.join(names[:2])})" for folder, names in sorted(others.items())
                if not any(w.startswith(folder + "/") for w in weights)]
    if unusable:
        raise StudioError(f"{name.key} has no plain .safetensors weights for {'; '.join(unusable)}. Pickles can run "
                          "code when loaded and variants are not what the pipeline loads, so nothing was pulled: pick "
                          "a revision with .safetensors weights (NAME@refs/pr/N of a safetensors conversion) or "
                          "another repo, or name one checkpoint file: org/name/FILE.safetensors.")
    return small, weights


def _captioner_files(name: ModelName, tree: dict) -> tuple[list[str], list[str]]:
    """(configs and tokenizer files, weights) of a WD14 tagger or a transformers model at
    the repo's top level; anything else is refused, naming its .safetensors files."""
    top = sorted(path for path in tree if "/" not in path)
    models = [path for path in top if path.lower().endswith(".onnx")]
    if "selected_tags.csv" in top and models:
        if len(models) > 1 and "model.onnx" not in models:
            raise StudioError(f"{name.key} holds several ONNX models ({', '.join(models)}); a tagger has one "
                              "model.onnx. Download the one you want with its selected_tags.csv into a folder.")
        return ["selected_tags.csv"], ["model.onnx" if "model.onnx" in models else models[0]]
    if "config.json" in top:
        weights = [path for path in top if _file_role(path) == "weights"]
        if not weights:
            pickles = [path for path in top if _file_role(path) == "pickle"]
            raise StudioError(f"{name.key} has its weights only as {', '.join(pickles) or 'no weight files'}: pickles "
                              "can run code when loaded, so nothing was pulled. Pick a revision with model.safetensors "
                              "(NAME@refs/pr/N of a safetensors conversion) or another repo.")
        return [path for path in top if _file_role(path) == "config"], weights
    checkpoints = [path for path in sorted(tree) if path.lower().endswith(".safetensors")]
    pickles = [path for path in sorted(tree) if _file_role(path) == "pickle"]
    hint = (f"; to pull one checkpoint or adapter from it, name the file: {name.repo}/{checkpoints[0]}" if checkpoints
            else f"; its weights are pickles ({', '.join(pickles[:2])}), which are not pulled" if pickles else "")
    raise StudioError(f"{name.key} is no diffusers pipeline (model_index.json), transformers model (config.json) or "
                      f"WD14 tagger (.onnx + selected_tags.csv){hint}.")


@contextlib.contextmanager
def _huggingface_errors(name: ModelName, endpoint: str) -> Iterator[None]:
    """huggingface_hub's exceptions as one line each."""
    import httpx2
    from huggingface_hub import errors

    token = ("set HF_TOKEN to a token that can read it (and accept the model's licence on its page), "
             "then pull again")
    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise StudioError(f"HF_HUB_OFFLINE is set, so {name.key} cannot be pulled: unset it and pull again.") from None
    except errors.RevisionNotFoundError:
        raise StudioError(f"{name.repo} has no revision {name.revision!r} on {endpoint}; check the branch, tag or "
                          "commit after '@'.") from None
    except errors.RemoteEntryNotFoundError:
        raise StudioError(f"{name.repo} has no file {name.file or 'of that name'} on {endpoint}; "
                          "check the path.") from None
    except errors.HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if isinstance(error, errors.GatedRepoError) or status == 403:
            raise StudioError(f"{endpoint} refuses {name.repo} ({status}): it is gated or private; {token}.") from None
        if status == 401:
            raise StudioError(f"{endpoint} has no model {name.repo} that it shows without a login (401): check the "
                              f"name; if it is private or gated, {token}.") from None
        if status == 404 or isinstance(error, errors.RepositoryNotFoundError):
            raise StudioError(f"No model {name.repo} on {endpoint} (404); check the name (org/name, as in the "
                              "address of its page).") from None
        raise StudioError(f"{endpoint} answered {status} for {name.key}; nothing was kept. Try again later.") from None
    except (errors.LocalEntryNotFoundError, httpx2.HTTPError) as error:
        cause = error.__cause__ or error
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise StudioError(f"Could not download {name.key} from {endpoint} ({reason}); nothing was kept. Check the "
                          "connection (and HF_ENDPOINT), then pull again.") from None
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise
        reason = str(error).strip().splitlines()[0]
        raise StudioError(f"Downloading {name.key} failed ({reason}); nothing was kept. Pull again.") from None


def _refuse_by_name(file_name: str, what: str) -> None:
    """Pickles (by name) and other formats are refused before anything is downloaded."""
    lower = file_name.lower()
    if lower.endswith(PICKLES):
        raise StudioError(f"{what} is a pickle ({Path(file_name).suffix}), which can run code when loaded, so it is "
                          "not pulled. Pull a .safetensors version of it instead (most models have one), or convert "
                          "it yourself with a tool you trust.")
    if not lower.endswith(".safetensors"):
        raise StudioError(f"{what} is not a .safetensors file; only .safetensors checkpoints and adapters (or whole "
                          "repos: org/name) can be pulled.")


# --------------------------------------------------------------------------- CivitAI and addresses
def civitai_endpoint() -> str:
    return (os.environ.get(CIVITAI_ENDPOINT_ENV) or DEFAULT_CIVITAI_ENDPOINT).rstrip("/")


def _civitai_headers(url: str) -> dict[str, str]:
    """The CivitAI token, for addresses on the CivitAI endpoint only (httpx drops it when a
    download is redirected elsewhere, to the file's storage)."""
    token = os.environ.get(CIVITAI_TOKEN_ENV, "").strip()
    same = urlsplit(url)[:2] == urlsplit(civitai_endpoint())[:2]
    return {"Authorization": f"Bearer {token}"} if token and same else {}


def _client():
    import httpx

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, connect=15.0),
                        headers={"User-Agent": "lora-studio"})


def _fetch_civitai(name: ModelName, stage: Path, progress: _Progress) -> _Fetched:
    import httpx

    endpoint = civitai_endpoint()
    _check_address(endpoint)
    what = f"{name.key} on {endpoint}"
    api = f"{endpoint}/api/v1/model-versions/{name.version}"
    with _client() as client:
        try:
            response = client.get(api, headers=_civitai_headers(api))
        except httpx.TransportError as error:
            raise _network_error(what, error, CIVITAI_ENDPOINT_ENV) from None
        _check_status(response, what, api)
        try:
            version = response.json()
            model_type = str((version.get("model") or {}).get("type", ""))
            files = list(version.get("files") or [])
        except (ValueError, AttributeError, TypeError):
            raise StudioError(f"{endpoint} answered {name.key} with something that is not CivitAI's model-version "
                              "JSON; check LORA_STUDIO_CIVITAI_ENDPOINT.") from None
        if model_type not in CIVITAI_TYPES:
            raise StudioError(f"{name.key} is a {model_type or 'model of no type'} on CivitAI; only checkpoints and "
                              f"LoRA / LoCon / DoRA adapters can be pulled.")
        chosen = _civitai_file(name, files)
        file_name = Path(str(chosen["name"])).name
        _refuse_by_name(file_name, f"{name.key} ({file_name})")
        expected_sha = str((chosen.get("hashes") or {}).get("SHA256", "")).lower()
        size_kb = float(chosen.get("sizeKB") or 0)
        progress.total = int(size_kb * 1024)
        target = stage / "files" / "download.safetensors"
        target.parent.mkdir()
        url = str(chosen["downloadUrl"])
        got = download(client, url, target, headers=_civitai_headers(url), sha256=expected_sha, progress=progress,
                       what=what)
    if size_kb and abs(got.size - size_kb * 1024) > 1024:
        raise StudioError(f"{name.key}: {file_name} is {got.size} bytes but CivitAI gives its size as {size_kb} KB; "
                          "nothing was kept. Pull again.")
    return _Fetched(target, "file", file_name, f"{endpoint}/models/{version.get('modelId', '')}?modelVersionId="
                    f"{name.version}", str(name.version), {file_name: got.sha256}, got.size,
                    declared=CIVITAI_TYPES[model_type])


def _civitai_file(name: ModelName, files: list) -> dict:
    """The version's model file in safetensors format (the primary one first); a version
    offering only pickles is refused."""
    models = [f for f in files if isinstance(f, dict) and f.get("type", "Model") in ("Model", "Pruned Model")
              and f.get("downloadUrl") and f.get("name")]
    safe = [f for f in models if (f.get("metadata") or {}).get("format") == "SafeTensor"
            or str(f["name"]).lower().endswith(".safetensors")]
    if not safe:
        offered = ", ".join(str(f.get("name")) for f in models) or "no model file"
        raise StudioError(f"{name.key} offers {offered}, no .safetensors file: pickles can run code when loaded, so "
                          "nothing was pulled. Pick a version with a SafeTensor file.")
    return sorted(safe, key=lambda f: not f.get("primary"))[0]


def _fetch_url(name: ModelName, stage: Path, progress: _Progress) -> _Fetched:
    file_name = Path(unquote(urlsplit(name.url).path)).name
    if file_name.lower().endswith(PICKLES):
        _refuse_by_name(file_name, name.key)
    target = stage / "files" / "download.safetensors"
    target.parent.mkdir()
    with _client() as client:
        got = download(client, name.url, target, headers=_civitai_headers(name.url), sha256=name.sha256,
                       progress=progress, what=name.key)
    file_name = got.file_name or file_name
    if not file_name.lower().endswith(".safetensors"):
        file_name = (file_name or f"model-{got.sha256[:8]}") + ".safetensors"
    return _Fetched(target, "file", file_name, name.url, "", {file_name: got.sha256}, got.size)


@dataclass(frozen=True)
class Downloaded:
    size: int
    sha256: str
    file_name: str  # from Content-Disposition, "" when the server gives none


def download(client, url: str, target: Path, *, headers: dict[str, str] | None = None, sha256: str = "",
             progress: _Progress | None = None, what: str = "") -> Downloaded:
    """Fetch `url` into the new file `target`, resuming with an HTTP Range request after a
    dropped connection (DOWNLOAD_ATTEMPTS tries in a row without a new byte), the sha256
    computed while writing. The size the server announces and the `sha256` given are
    checked; a StudioError otherwise (the partial file is the caller's to delete)."""
    import httpx

    progress = progress or _Progress(None)
    what = what or url
    setting = CIVITAI_ENDPOINT_ENV if urlsplit(url)[:2] == urlsplit(civitai_endpoint())[:2] else ""
    digest, done, failures, announced, file_name = hashlib.sha256(), 0, 0, None, ""
    with open(target, "wb") as out:
        while True:
            asked = {**(headers or {}), **({"Range": f"bytes={done}-"} if done else {})}
            try:
                with client.stream("GET", url, headers=asked) as response:
                    if done and done == announced and response.status_code == 416:
                        break  # every byte had come before the connection dropped
                    _check_status(response, what, url)
                    if done and response.status_code != 206:  # the server ignored the range: start over
                        out.seek(0)
                        out.truncate()
                        progress.add(-done)
                        digest, done = hashlib.sha256(), 0
                    elif done and not response.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
                        raise StudioError(f"{what}: the server resumed at the wrong place "
                                          f"({response.headers.get('Content-Range')}); nothing was kept. Pull again.")
                    if announced is None:
                        announced = _announced_size(response, done)
                        if announced is not None:
                            progress.total = announced
                            _check_space(target.parent, announced - done, what)
                        file_name = _disposition_name(response.headers.get("Content-Disposition", ""))
                    for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing received
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        failures = 0
                        progress.add(len(chunk))
                break
            except httpx.TransportError as error:
                failures += 1
                if failures >= DOWNLOAD_ATTEMPTS:
                    raise _network_error(what, error, setting) from None
                time.sleep(min(2.0, 0.25 * 2 ** failures))
    if announced is not None and done != announced:
        raise StudioError(f"{what}: {done} bytes arrived but the server announced {announced}; nothing was kept. "
                          "Pull again.")
    actual = digest.hexdigest()
    if sha256 and actual != sha256.lower():
        raise StudioError(f"{what}: the file's sha256 is {actual[:16]}… but the source gives "
                          f"{sha256[:16].lower()}…, "
                          "so nothing was kept. Pull again; if it fails again, the source serves another file than "
                          "it describes.")
    return Downloaded(done, actual, file_name)


def _announced_size(response, done: int) -> int | None:
    if response.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    content_range = response.headers.get("Content-Range", "")
    if "/" in content_range and content_range.rsplit("/", 1)[1].isdigit():
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length", "")
    if not length.isdigit():
        return None
    return int(length) + (done if response.status_code == 206 else 0)


def _disposition_name(header: str) -> str:
    found = re.search(r"filename\*=UTF-8''([^;]+)", header, re.IGNORECASE)
    if found:
        return Path(unquote(found.group(1).strip('"'))).name
    found = re.search(r'filename="?([^";]+)"?', header, re.IGNORECASE)
    return Path(found.group(1)).name if found else ""


def _check_status(response, what: str, url: str) -> None:
    status = response.status_code
    if status < 400:
        return
    host = urlsplit(url).netloc
    if status in (401, 403) and host == urlsplit(civitai_endpoint()).netloc:
        raise StudioError(f"{host} refused {what} ({status}): it needs a login. Set {CIVITAI_TOKEN_ENV} to an API "
                          "key (CivitAI: account settings, API keys) and pull again.")
    if status in (401, 403):
        raise StudioError(f"{host} refused {what} ({status}): it needs a login the studio cannot give. Download "
                          "the file in a browser and use its path instead.")
    if status == 404:
        raise StudioError(f"{what} does not exist (404 from {host}); check the name (a CivitAI version id is the "
                          "number after modelVersionId= in the model page's address).")
    raise StudioError(f"{host} answered {status} for {what}; nothing was kept. Try again later.")


def _network_error(what: str, error: BaseException, setting: str = "") -> StudioError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    check = f"the connection (and {setting} if set)" if setting else "the connection and the address"
    return StudioError(f"Could not download {what} ({reason}); nothing was kept. Check {check}, then pull again.")


__all__ = ["CIVITAI_ENDPOINT_ENV", "CIVITAI_TOKEN_ENV", "CuratedModel", "ModelName", "PulledModel", "choices",
           "curated", "download", "find_pulled", "is_model_name", "local_path", "parse_name",
           "pull", "read_index"]
