"""`lora-studio` command line: a stable contract for people, tests and other tools.

Bad arguments or inputs print one line (what is wrong, how to fix) and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from studio.errors import StudioError
from studio.exposure import serving_auth
from studio.fsutil import check_output_file
from studio.generation.engine import Engine, GenerateRequest, parse_adapter_arg, parse_prompt_loras, save_png
from studio.generation.grid import Axis, xy_grid
from studio.models import hub, load_pipeline
from studio.workspace import Workspace

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def _finite(text: str) -> float:
    """A float argument; NaN and infinity are refused here, where they enter."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_mix_arg(text: str) -> tuple[Path, float]:
    """`FILE[:WEIGHT]` of bake, fuse and mixture (generate's adapter argument) as (path, weight)."""
    use = parse_adapter_arg(text)
    return use.path, use.weight


def _workspace_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="workspace folder (default: $LORA_STUDIO_WORKSPACE or ./workspace)")


def build_parser() -> argparse.ArgumentParser:
    from studio.datasets.captioning import BUILTIN_CAPTIONER, DEFAULT_THRESHOLD, MODES as CAPTION_MODES

    parser = _Parser(prog="lora-studio", description="Make LoRA adapters for Stable Diffusion 1.5 and SDXL.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser("train", help="train an adapter from a TOML config")
    train.add_argument("config", type=Path, help="training config (.toml), e.g. presets/tiny-demo.toml, or a shipped preset by name (tiny-demo)")
    train.add_argument("--resume", action="store_true", help="continue the newest unfinished run of this config")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.add_argument("--processes", type=int, default=None, metavar="N",
                       help="train on N processes, data parallel (sets training.num_processes)")
    _workspace_arg(train)

    gen = sub.add_parser("generate", help="generate images with a base model and adapters")
    gen.add_argument("--model", default="builtin",
                     help="'builtin', a diffusers folder, a .safetensors checkpoint or a pulled model name (org/name)")
    gen.add_argument("--prompt", required=True, help="prompt; <lora:name:weight> tags load adapters from the workspace")
    gen.add_argument("--negative", default="", help="negative prompt")
    gen.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]", help="adapter file and weight")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=20)
    gen.add_argument("--guidance", type=_finite, default=5.0, help="CFG scale")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--scheduler", default=None, help="the sampler: ddim, euler, euler_a or dpmpp_2m_karras for SD "
                     "1.5 / SDXL (default ddim), euler for FLUX.1 (flow matching, its default)")
    gen.add_argument("--allow-pickle", action="store_true", help="allow loading a .ckpt base model (can run code)")
    gen.add_argument("--route", action="store_true",
                     help="route each token to the adapters whose top singular directions it projects on most "
                          "(arrow, training-free) instead of summing them")
    gen.add_argument("--lbw", default=None, metavar="VECTOR",
                     help="LoRA Block Weights for every adapter: a preset (ALL, INS, IND, MIDD, OUTD, OUTS, ...) "
                          "or 17 (SD1.5) / 12 (SDXL) / 26 comma-separated values")
    gen.add_argument("--out", type=Path, required=True, help="output PNG")
    _workspace_arg(gen)

    inst = sub.add_parser("instant", help="make an adapter from pictures or a description, without training")
    given = inst.add_mutually_exclusive_group(required=True)
    given.add_argument("--images", metavar="DIR", help="a folder of pictures of the concept, or a dataset's name")
    given.add_argument("--describe", metavar="TEXT", help="a short description of the concept, e.g. 'a purple star'")
    inst.add_argument("--name", required=True, help="the adapter's name in the library")
    inst.add_argument("--model", default="builtin", help="base model with a hypernetwork (default: the built-in one)")
    inst.add_argument("--trigger", default=None, help="trigger word (default: the hypernetwork's own, sks)")
    inst.add_argument("--overwrite", action="store_true", help="replace an adapter of the same name")
    _workspace_arg(inst)

    ins = sub.add_parser("inspect", help="show an adapter file's layout and metadata")
    ins.add_argument("file", type=Path, help="adapter .safetensors (kohya, LyCORIS, diffusers) or peft folder")
    ins.add_argument("--json", action="store_true", help="machine-readable output")

    conv = sub.add_parser("convert", help="convert an adapter between layouts / precisions, or edit its metadata")
    conv.add_argument("src", type=Path, metavar="IN", help="adapter file or peft folder")
    conv.add_argument("dst", type=Path, metavar="OUT", help="output file (a folder for --format peft); may equal IN")
    conv.add_argument("--format", choices=("kohya", "diffusers", "peft"), default="kohya",
                      help="kohya/LyCORIS (A1111, Forge, ComfyUI, CivitAI; default), diffusers or peft")
    conv.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default=None,
                      help="tensor precision (default: keep the source's)")
    conv.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="set a metadata entry (KEY= removes it); repeatable. Alone it rewrites only the header, "
                           "so sshs_model_hash stays the same")
    conv.add_argument("--model", default=None,
                      help="base model ('builtin', a diffusers folder or a .safetensors checkpoint); needed to "
                           "convert DoRA between kohya and diffusers/peft, or for architectures not shipped")

    ds = sub.add_parser("dataset", help="import, check and caption datasets")
    ds_sub = ds.add_subparsers(dest="dataset_command", parser_class=_Parser)
    imp = ds_sub.add_parser("import", help="import a folder, a zip or image files into the workspace")
    imp.add_argument("sources", nargs="+", type=Path, metavar="SRC")
    imp.add_argument("--name", required=True, help="dataset name")
    imp.add_argument("--mode", choices=("new", "add", "overwrite"), default="new",
                     help="new: refuse an existing dataset; add: keep files already there; overwrite: replace them")
    _workspace_arg(imp)
    chk = ds_sub.add_parser("check", help="validation report of a dataset")
    chk.add_argument("name", help="dataset name in the workspace, or a folder path")
    chk.add_argument("--json", action="store_true")
    chk.add_argument("--resolution", type=int, default=None,
                     help="training resolution: report the images smaller than it")
    _workspace_arg(chk)
    cap = ds_sub.add_parser("caption", help="write captions with a captioning model (never a download)")
    cap.add_argument("name", help="dataset name in the workspace, or a folder path")
    cap.add_argument("--model", default=BUILTIN_CAPTIONER,
                     help="'builtin' (the toy-world captioner), a local transformers image-to-text folder "
                          "(BLIP, GIT, Florence-2), a WD14 tagger folder (model.onnx + selected_tags.csv) or a "
                          "captioner pulled with `models pull` (org/name)")
    cap.add_argument("--mode", choices=CAPTION_MODES, default="fill",
                     help="fill: only pictures without a caption; overwrite: replace every caption; "
                          "prepend / append: add the new text before / after the caption (tags it has are not repeated)")
    cap.add_argument("--threshold", type=_finite, default=None,
                     help=f"WD14 tagger: keep general tags at least this probable (default {DEFAULT_THRESHOLD})")
    cap.add_argument("--prompt", default=None,
                     help="transformers model: text given with each picture (default: its task token, if it needs one)")
    cap.add_argument("--trigger", default=None, help="then put this trigger word first in every caption written")
    cap.add_argument("--include-reg", action="store_true", help="caption class / regularisation pictures too")
    cap.add_argument("--quiet", action="store_true", help="no progress bar")
    _workspace_arg(cap)

    models = sub.add_parser("models", help="pull base models, captioners and LoRAs by name; list them")
    models_sub = models.add_subparsers(dest="models_command", parser_class=_Parser)
    pull = models_sub.add_parser("pull", help="fetch a model once into the workspace (then used offline by name)")
    pull.add_argument("name", help="org/name[@revision] (Hugging Face repo), org/name/path/file.safetensors, "
                                   "civitai:VERSION_ID or an https:// address (#sha256=HEX to check it)")
    pull.add_argument("--quiet", action="store_true", help="no progress line")
    _workspace_arg(pull)
    listing = models_sub.add_parser("list", help="the models pulled into the workspace and the curated ones")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    _workspace_arg(listing)

    bake = sub.add_parser("bake", help="bake a mix of adapters into one LoRA file")
    bake.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    bake.add_argument("--out", type=Path, required=True)
    bake.add_argument("--rank", type=int, default=None, help="compress to this rank (default: exact, ranks add up)")
    bake.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")

    mix = sub.add_parser("mixture", help="make a mixture of adapters (one file; gates start at the weights)")
    mix.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]", help="member adapters, kept beside the mixture")
    mix.add_argument("--out", type=Path, required=True, help="MIXTURE.safetensors, in the members' folder")
    mix.add_argument("--gate", choices=("block", "block_timestep", "arrow"), default="block",
                     help="a weight per member and block, per block and timestep band, or arrow routing per token "
                          "(prompt gates come from training: [mixture] gate = 'prompt' in a run config)")
    mix.add_argument("--bands", type=int, default=4, help="timestep bands of a block_timestep gate")
    mix.add_argument("--top-k", type=int, default=2, help="arrow: members each token is routed to")
    mix.add_argument("--temperature", type=float, default=1.0, help="arrow: softmax temperature of the scores")

    fuse = sub.add_parser("fuse", help="merge a mix into a full single-file checkpoint")
    fuse.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    fuse.add_argument("--model", default="builtin", help="base model: 'builtin', a folder or a .safetensors file")
    fuse.add_argument("--out", type=Path, required=True, help="CHECKPOINT.safetensors")
    fuse.add_argument("--allow-pickle", action="store_true")

    rsz = sub.add_parser("resize", help="reduce an adapter's rank (SVD through QR, never a full-matrix SVD)")
    rsz.add_argument("file", type=Path)
    rsz.add_argument("--out", type=Path, required=True)
    rule = rsz.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rank", type=int)
    rule.add_argument("--sv-ratio", type=_finite, help="keep singular values >= largest / X")
    rule.add_argument("--sv-fro", type=_finite, help="keep the fewest reaching this share of the Frobenius norm")
    rule.add_argument("--sv-cumulative", type=_finite, help="keep the fewest reaching this share of sum(sigma)")
    rsz.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16")

    grid = sub.add_parser("grid", help="an X/Y plot over adapter weights, prompts or seeds")
    grid.add_argument("--prompt", required=True)
    grid.add_argument("--adapter", action="append", default=[], metavar="FILE[:WEIGHT]")
    grid.add_argument("--x", required=True, help="adapterN=0,0.5,1 | seed=1,2,3 | prompt=first|second")
    grid.add_argument("--y", default=None, help="a second axis, same forms")
    grid.add_argument("--model", default="builtin")
    grid.add_argument("--steps", type=int, default=20)
    grid.add_argument("--guidance", type=_finite, default=5.0)
    grid.add_argument("--seed", type=int, default=0)
    grid.add_argument("--out", type=Path, required=True, help="grid PNG; single images go beside it")

    sug = sub.add_parser("suggest", help="suggest library adapters for a prompt")
    sug.add_argument("--prompt", required=True)
    sug.add_argument("--model", default="builtin")
    sug.add_argument("--top", type=int, default=3)
    _workspace_arg(sug)

    ui = sub.add_parser("ui", help="start the browser studio (default command)")
    ui.add_argument("--host", default="127.0.0.1", help="address to serve on (default: this machine only)")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--listen", action="store_true", help="serve on all interfaces (0.0.0.0); needs --auth")
    ui.add_argument("--share", action="store_true", help="a public Gradio share link; needs --auth")
    ui.add_argument("--auth", metavar="USER:PASSWORD", default=None,
                    help="require this login (or set LORA_STUDIO_AUTH)")
    ui.add_argument("--allow-pickle", action="store_true", help="allow .ckpt base models (can run code)")
    _workspace_arg(ui)
    return parser


def cmd_train(args) -> int:
    from studio.config import load_config, parse_config
    from studio.jobs.runs import create_run, latest_unfinished_run

    config = load_config(args.config)
    if args.processes is not None:
        config = parse_config({**config.model_dump(mode="json", exclude_none=True),
                               "training": {**config.training.model_dump(mode="json", exclude_none=True),
                                            "num_processes": args.processes}}, "--processes")
    workspace = Workspace.open(args.workspace, create=False)  # create_run checks before it makes anything
    run_dir = latest_unfinished_run(config, workspace) if args.resume else None
    if args.resume and run_dir is None:
        print(f"No unfinished run of {config.name!r} to resume; starting a new one.", file=sys.stderr)
    if run_dir is None:
        run_dir = create_run(config, workspace)
    print(f"run: {run_dir}", file=sys.stderr)
    return _run_worker(run_dir, quiet=args.quiet, verbose=args.verbose)


def _run_worker(run_dir: Path, *, quiet: bool, verbose: bool) -> int:
    """Train the run in its worker process(es), started as the queue starts them (`python -m
    trainers`, or accelerate's launcher for several processes); the outcome comes from the
    run's events. The worker ends with this command: it gets SIGTERM (and saves a
    checkpoint) when this process dies, and a SIGTERM or SIGINT sent here is passed on."""
    import signal
    import subprocess

    from studio.jobs.runs import prepare_class_images, run_config, run_outcome, worker_command

    made = prepare_class_images(run_dir)  # the worker only reads its inputs
    if made:
        print(f"generated {made} class images", file=sys.stderr)
    command = worker_command(run_dir, run_config(run_dir))
    if not quiet:
        command.remove("--quiet")
    env = {**os.environ, "LORA_STUDIO_LOG_LEVEL": "DEBUG" if verbose else "WARNING"}
    worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                              preexec_fn=_end_with_parent)
    forward = {sig: signal.signal(sig, lambda signum, frame: worker.send_signal(signum))
               for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = worker.wait()
    finally:
        for sig, handler in forward.items():
            signal.signal(sig, handler)
    state, message, adapter = run_outcome(run_dir)
    if state == "done":
        print(adapter)
        return 0
    if state == "cancelled":
        print(f"cancelled: {message}; continue with --resume", file=sys.stderr)
        return 130
    if state == "failed":  # the worker said why on stderr
        return 2
    raise StudioError(f"the worker stopped without a word (exit status {code}); see {run_dir}/events.jsonl, "
                      "then continue with --resume")


def _end_with_parent() -> None:
    """In the worker, before it starts: SIGTERM when the CLI process dies (Linux), so a
    killed CLI leaves no training behind; the worker saves a checkpoint and stops."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def cmd_generate(args) -> int:
    check_output_file(args.out)

    adapters = [parse_adapter_arg(a) for a in args.adapter]
    prompt, tagged = parse_prompt_loras(args.prompt, lambda name: _resolve_adapter_name(name, args.workspace))
    if args.lbw:
        from dataclasses import replace

        adapters = [replace(use, block_weights=args.lbw) for use in adapters]
        tagged = [replace(use, block_weights=args.lbw) for use in tagged]
    request = GenerateRequest(prompt=prompt, model=args.model, negative_prompt=args.negative,
                              adapters=adapters + tagged, seed=args.seed, steps=args.steps,
                              guidance_scale=args.guidance, width=args.width, height=args.height,
                              scheduler=args.scheduler, route=args.route)

    engine = Engine(allow_pickle=args.allow_pickle, workspace=Workspace.open(args.workspace, create=False))
    image = engine.generate(request)[0]
    print(save_png(image, args.out))
    return 0


def _resolve_adapter_name(name: str, workspace_dir) -> Path:
    from studio.adapters.library import find_adapter

    return find_adapter(Workspace.open(workspace_dir), name)


def cmd_instant(args) -> int:
    from studio.instant import make_instant_adapter

    workspace = Workspace.open(args.workspace)
    pictures = None if args.images is None else Path(args.images)
    if pictures is not None and not pictures.is_dir():  # a dataset of the workspace, by name
        try:
            pictures = workspace.dataset_dir(args.images) if workspace.dataset_dir(args.images).is_dir() else pictures
        except StudioError:  # not a dataset name either: the folder's own message follows
            pass
    print(make_instant_adapter(workspace, args.name, pictures=pictures, description=args.describe, model=args.model,
                               trigger=args.trigger, overwrite=args.overwrite))
    return 0


def cmd_mixture(args) -> int:
    from studio.adapters.mixtures.file import find_member, new_mixture, save_mixture

    members = [parse_mix_arg(a) for a in args.adapters]
    mixture = new_mixture([path for path, _ in members], args.gate, weights=[w for _, w in members], bands=args.bands,
                          top_k=args.top_k, temperature=args.temperature)
    for member in mixture.members:  # found where the engine will look: beside the mixture
        find_member(args.out.parent, member, args.out.name)
    print(save_mixture(args.out, mixture))
    return 0


def cmd_inspect(args) -> int:
    from studio.adapters.library import describe_adapter
    from studio.adapters.mixtures.file import is_mixture, load_mixture

    if is_mixture(args.file):
        mixture = load_mixture(args.file)
        info = {"file": str(args.file), "mixture": mixture.gate, "family": mixture.family,
                "members": [{"name": m.name, "sha256": m.sha256, "file": str(m.path)} for m in mixture.members],
                "gates": {k: list(v.shape) for k, v in mixture.tensors.items()}}
        print(json.dumps(info, indent=2))
        return 0
    info = describe_adapter(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    facts = [("file", info["file"]), ("format", info["format"]), ("family", info["family"]),
             ("type", info["type"]), ("modules", f"{info['modules']} ({info['tensors']} tensors, "
                                                 f"{info['parameters']:,} parameters)"),
             ("prefixes", ", ".join(f"{k}: {v}" for k, v in info["prefixes"].items())),
             ("kinds", ", ".join(f"{k}: {v}" for k, v in info["kinds"].items())),
             ("ranks", info["ranks"]), ("alphas", info["alphas"]), ("conv", info["conv_modules"])]
    if "dora_convention" in info:
        facts.append(("dora", info["dora_convention"]))
    if "sshs_model_hash" in info:
        state = {True: "matches the header", False: "DIFFERS from the header", None: "not in the header"}
        facts.append(("data hash", f"{info['sshs_model_hash']} ({state[info['sshs_model_hash_matches']]})"))
    for key, value in facts:
        print(f"{key:>10}: {value}")
    print("  metadata:")
    for key, value in sorted(info["metadata"].items()):
        text = value if len(value) <= 200 else value[:197] + "..."
        print(f"    {key} = {text}")
    return 0


def cmd_convert(args) -> int:
    if args.format != "peft" and Path(args.dst).resolve() != Path(args.src).resolve():
        check_output_file(args.dst)
    from studio.adapters import adapter_models, convert_adapter, parse_assignments

    models = None
    if args.model:
        models = adapter_models(load_pipeline(args.model))
    out = convert_adapter(args.src, args.dst, format=args.format, precision=args.precision,
                          set_metadata=parse_assignments(args.set), models=models)
    print(out)
    return 0


def cmd_dataset(args) -> int:
    from studio.datasets import check_dataset, import_dataset

    if args.dataset_command is None:
        raise StudioError("Say what to do: `lora-studio dataset import SRC --name NAME`, `dataset check NAME` "
                          "or `dataset caption NAME`.")
    workspace = Workspace.open(args.workspace)
    if args.dataset_command == "import":
        report = import_dataset(args.sources, args.name, workspace, mode=args.mode)
        print(report.summary())
        return 0
    folder = Path(args.name) if Path(args.name).is_dir() else workspace.dataset_dir(args.name)
    if not folder.is_dir():
        raise StudioError(f"No dataset {args.name!r} in {workspace.datasets_dir}; import one first.")
    if args.dataset_command == "caption":
        from studio.datasets.captioning import caption_dataset

        report = caption_dataset(folder, args.model, mode=args.mode, threshold=args.threshold, prompt=args.prompt,
                                 trigger=args.trigger, include_regularisation=args.include_reg,
                                 progress=None if args.quiet else _stderr_progress("captioning", "pictures"),
                                 workspace=workspace)
        print(report.summary())
        return 0
    report = check_dataset(folder, resolution=args.resolution)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    return 0


def cmd_models(args) -> int:
    if args.models_command is None:
        raise StudioError("Say what to do: `lora-studio models pull NAME` or `lora-studio models list`.")
    if args.models_command == "pull":
        workspace = Workspace.open(args.workspace)
        line = _StderrBytes(args.name)
        try:
            entry, fetched = hub.pull(args.name, workspace, progress=None if args.quiet else line.show)
        finally:
            line.end()
        print(f"{'pulled' if fetched else 'already pulled'}: {args.name} -> {entry.location(workspace)} "
              f"({hub.KIND_LABELS[entry.kind]}, {entry.size / 1e6:.1f} MB)")
        return 0
    workspace = Workspace.open(args.workspace, create=False)
    pulled = {name: entry for name, entry in hub.read_index(workspace).items()
              if entry.location(workspace).exists()}
    curated = hub.curated()
    if args.json:
        print(json.dumps({"pulled": [{**vars(e), "location": str(e.location(workspace))} for e in pulled.values()],
                          "curated": [{**vars(c), "pulled": c.name in pulled} for c in curated]}, indent=2))
        return 0
    print(f"pulled into {workspace.root}:" if pulled else f"nothing pulled into {workspace.root} yet")
    for name, entry in pulled.items():
        print(f"  {name}  ->  {entry.path}  ({hub.KIND_LABELS[entry.kind]}, {entry.size / 1e6:.1f} MB)")
    print("curated (lora-studio models pull NAME):")
    for model in curated:
        print(f"  {'*' if model.name in pulled else ' '} {model.name}  [{model.use}] {model.note}")
    return 0


class _StderrBytes:
    """A progress line for bytes on stderr (`show(done, total)`), ended by a newline when
    complete or, if cut short, by `end()` (so an error starts a line of its own)."""

    def __init__(self, what: str, width: int = 30):
        self.what, self.width, self.open = what, width, False

    def show(self, done: int, total: int) -> None:
        filled = self.width * done // total if total else self.width
        self.open = done < total
        print(f"\rpulling {self.what} [{'#' * filled}{'.' * (self.width - filled)}] {done / 1e6:.1f}/"
              f"{total / 1e6:.1f} MB", end="" if self.open else "\n", file=sys.stderr, flush=True)

    def end(self) -> None:
        if self.open:
            print(file=sys.stderr, flush=True)
            self.open = False


def _stderr_progress(what: str, unit: str, width: int = 30):
    """A progress(done, total) callback drawing one bar on stderr, ended by a newline."""

    def show(done: int, total: int) -> None:
        filled = width * done // total if total else width
        end = "\n" if done >= total else ""
        print(f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {unit}", end=end,
              file=sys.stderr, flush=True)

    return show


def cmd_bake(args) -> int:
    check_output_file(args.out)
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.mixing import bake

    report = bake([parse_mix_arg(a) for a in args.adapters], args.out, rank=args.rank,
                  dtype=PRECISIONS[args.precision])
    print(report.summary())
    return 0


def cmd_fuse(args) -> int:
    check_output_file(args.out)
    from studio.adapters.mixing import fuse

    print(fuse(args.model, [parse_mix_arg(a) for a in args.adapters], args.out, allow_pickle=args.allow_pickle))
    return 0


def cmd_resize(args) -> int:
    check_output_file(args.out)
    from studio.adapters.formats.files import PRECISIONS
    from studio.adapters.mixing import resize

    rule = {k: v for k, v in (("rank", args.rank), ("sv_ratio", args.sv_ratio), ("sv_fro", args.sv_fro),
                              ("sv_cumulative", args.sv_cumulative)) if v is not None}
    report = resize(args.file, args.out, dtype=PRECISIONS[args.precision], **rule)
    print(report.summary())
    for name, kept in sorted(report.energy_kept.items(), key=lambda kv: kv[1])[:10]:
        print(f"  {kept:.4f}  {name}")
    return 0


def cmd_grid(args) -> int:
    check_output_file(args.out)

    request = GenerateRequest(prompt=args.prompt, model=args.model, adapters=[parse_adapter_arg(a) for a in args.adapter],
                              seed=args.seed, steps=args.steps, guidance_scale=args.guidance)
    sheet, rows = xy_grid(Engine(), request, Axis.parse(args.x), Axis.parse(args.y) if args.y else None)
    for j, row in enumerate(rows):
        for i, image in enumerate(row):
            save_png(image, args.out.with_name(f"{args.out.stem}-{j}-{i}.png"))
    print(save_png(sheet, args.out))
    return 0


def cmd_suggest(args) -> int:
    from studio.adapters.library import list_adapters
    from studio.generation.suggest import suggest

    found = suggest(Engine(), args.prompt, list_adapters(Workspace.open(args.workspace)), model=args.model, top=args.top)
    if not found:
        print("No adapter in the library matches this prompt.")
    for s in found:
        print(f"<lora:{s.path.stem}:{s.weight:g}>  score {s.score:.2f}  ({s.reason})")
    return 0


def cmd_ui(args) -> int:
    host = "0.0.0.0" if args.listen else args.host
    auth = serving_auth(host, share=args.share, auth=args.auth)
    from ui.app import launch

    launch(workspace=args.workspace, host=host, port=args.port, auth=auth, share=args.share,
           allow_pickle=args.allow_pickle)
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "instant": cmd_instant, "inspect": cmd_inspect,
            "bake": cmd_bake, "mixture": cmd_mixture, "fuse": cmd_fuse, "resize": cmd_resize, "grid": cmd_grid,
            "suggest": cmd_suggest, "convert": cmd_convert, "dataset": cmd_dataset, "models": cmd_models, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `lora-studio` (or only global flags) means `ui`
        args = parser.parse_args([*argv, "ui"])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command not in ("models", "ui"):  # pulling a model is their one use of the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no notes about torchvision we never use
    try:
        status = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's clean-up at exit
        return status
    except StudioError as error:
        for line in str(error).splitlines():  # several problems: one line each
            print(f"error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _reader_went_away()


def _reader_went_away() -> int:
    """The reader of our output closed the pipe (`inspect F | head`): stop quietly, like any
    Unix tool, with the status of a process ended by SIGPIPE. Output still buffered goes
    to /dev/null, so Python does not complain about it at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
