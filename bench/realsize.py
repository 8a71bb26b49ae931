"""Real size, side by side: our trainer against kohya's sd-scripts (`train_network.py`,
`sdxl_train_network.py`) and the diffusers DreamBooth LoRA example
(`examples/dreambooth/train_dreambooth_lora.py`), on the full-size SD1.5 (and SDXL)
architecture with random weights, the same data and settings, interleaved in one run.

    python -m bench.realsize --sd-scripts DIR --diffusers-examples DIR [--work DIR]
                             [--rounds 2] [--steps 20] [--family sd15] [--only ours sd-scripts diffusers]
    python -m bench.realsize --ours-only --family sdxl      # SDXL: our trainer alone (memory)

The models: each family's real architecture with random weights (toyworld.random_weights;
speed and memory do not depend on the values), written by this bench as an A1111 single-file
checkpoint (studio.models.single_file.save_single_file; SD1.5 in fp32, SDXL in fp16 as its
files are shipped) and, for the diffusers example, which loads diffusers folders only, as
a diffusers folder of the same weights.

The other trainers run from their checkouts (`--sd-scripts`: a clone of kohya-ss/sd-scripts;
`--diffusers-examples`: a clone of huggingface/diffusers), each in a virtual environment of
its own that this bench builds under `--work` from the checkout's requirements (PyPI) and
this machine's torch wheel (the same torch build for all three; PyPI's Linux torch is the
CUDA build). What was changed in their requirements to install here is printed with the
versions and commits.

How each is measured (the same for all three: a `sitecustomize` on their PYTHONPATH records
timestamps; nothing of their code is changed):
- load: process start -> the first forward pass of any torch module (imports and model load);
- first step: process start -> the end of the first optimizer step;
- s/step: the median gap between optimizer steps, the first two and the one with a sample
  picture excluded;
- sample: the gap of the step followed by a sample picture, less the median step;
- peak: the high-water mark of the resident memory of the process tree (psutil, polled),
  and the process's own ru_maxrss (wait4), the larger; training peak: the polled high-water
  mark from the end of the first step on (what training holds once the model is loaded).
Every contender runs with OMP_WAIT_POLICY=PASSIVE (sd-scripts spins its OpenMP threads
otherwise) and torch's default thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from studio import ASSETS_DIR

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
RANK = 8
SAMPLE_AT = 10          # the step after which every contender draws its sample picture
DATASET_IMAGES = 10     # so that the diffusers example's first epoch (its sample) ends at SAMPLE_AT
PROMPT = "a sks shape on a white background"


# ------------------------------------------------------------------------------ models
def build_models(family: str, work: Path, *, diffusers_folder: bool) -> tuple[Path, Path | None]:
    """work/<family>.safetensors (and work/<family>-diffusers/), made once and reused."""
    import torch

    from studio.models.single_file import save_single_file
    from toyworld.random_weights import random_pipeline

    single = work / f"{family}.safetensors"
    folder = work / f"{family}-diffusers"
    if single.exists() and (folder.is_dir() or not diffusers_folder):
        return single, folder if diffusers_folder else None
    dtype = torch.float32 if family == "sd15" else torch.float16
    started = time.perf_counter()
    pipe = random_pipeline(family, dtype)
    if not single.exists():
        save_single_file(pipe, single)
    if diffusers_folder and not folder.is_dir():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp)
        tmp.rename(folder)
    print(f"built the random {family} model in {time.perf_counter() - started:.0f} s: {single}", flush=True)
    return single, folder if diffusers_folder else None


# ------------------------------------------------------------------------------ the harness
HOOK = '''"""Written by bench/realsize.py: timestamps of a training process for the bench."""
import os
import time

_path = os.environ.get("REALSIZE_EVENTS")
if _path:
    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _out = open(_path, "a", buffering=1)

    def _step(optimizer, args, kwargs):
        _out.write(f"step {type(optimizer).__name__} {time.time()}\\n")

    register_optimizer_step_post_hook(_step)

    def _forward(module, args):
        _out.write(f"forward {type(module).__name__} {time.time()}\\n")
        _handle.remove()

    _handle = register_module_forward_pre_hook(_forward)
'''


@dataclass
class Result:
    contender: str
    round: int
    load_s: float | None = None
    first_step_s: float | None = None
    step_s: float | None = None
    sample_s: float | None = None
    peak_gb: float | None = None
    wall_s: float | None = None
    steps: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)


def run_measured(name: str, round_: int, command: list[str], *, cwd: Path, env: dict, log: Path,
                 sample_at: int | None) -> Result:
    """Run `command` to its end, polling its process tree's memory, and read the hook's
    timestamps (see the module docstring)."""
    import psutil

    events = log.with_suffix(".events")
    events.unlink(missing_ok=True)
    hook_dir = log.parent / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    env = {**env, "REALSIZE_EVENTS": str(events), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH", "")]))}
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
        peak, samples = 0, []
        root = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
                samples.append((time.time(), rss))
            except psutil.Error:
                pass
            time.sleep(0.2)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - started
    if proc.returncode:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{name} failed ({proc.returncode}); {log}:\n" + "\n".join(tail))
    lines = [line.split() for line in events.read_text().splitlines()] if events.exists() else []
    forwards = [float(t) for kind, _, t in lines if kind == "forward"]
    by_type: dict[str, list[float]] = {}
    for kind, cls, t in lines:
        if kind == "step":
            by_type.setdefault(cls, []).append(float(t))
    inner = [ts for cls, ts in by_type.items() if cls != "AcceleratedOptimizer"] or list(by_type.values())
    steps = sorted(inner[0]) if inner else []
    result = Result(name, round_, wall_s=wall, steps=len(steps),
                    peak_gb=max(peak, usage.ru_maxrss * 1024) / 2**30)
    if forwards:
        result.load_s = forwards[0] - started
    if steps:
        result.first_step_s = steps[0] - started
        after = [rss for t, rss in samples if t >= steps[0]]
        if after:  # what training holds, without the load's high-water mark
            result.extra["training_peak_gb"] = round(max(after) / 2**30, 2)
        gaps = {i + 2: b - a for i, (a, b) in enumerate(zip(steps, steps[1:]))}  # step k+1 ends after gap k+1
        sampled = sample_at + 1 if sample_at else None
        plain = [g for k, g in gaps.items() if k > 2 and k != sampled]
        if plain:
            result.step_s = statistics.median(plain)
        if sampled in gaps and result.step_s:
            result.sample_s = gaps[sampled] - result.step_s
    return result


# ------------------------------------------------------------------------------ the data
def prepare_data(work: Path) -> dict[str, Path]:
    """The first DATASET_IMAGES demo pictures in each trainer's layout: captions beside the
    pictures (ours), kohya's `<repeats>_<name>` folder (sd-scripts), pictures alone (the
    diffusers example reads every file of its folder as a picture; its prompt is one
    instance prompt)."""
    data = work / "data"
    layouts = {"captioned": data / "captioned", "kohya": data / "kohya" / "1_sks", "pictures": data / "pictures"}
    for folder in layouts.values():
        folder.mkdir(parents=True, exist_ok=True)
    for picture in sorted((ASSETS_DIR / "demo-dataset").glob("sks_*.png"))[:DATASET_IMAGES]:
        caption = picture.with_suffix(".txt")
        for layout, folder in layouts.items():
            shutil.copyfile(picture, folder / picture.name)
            if layout != "pictures":
                shutil.copyfile(caption, folder / caption.name)
    layouts["kohya_root"] = data / "kohya"
    return layouts


def tokenizer_cache(work: Path, family: str) -> Path:
    """sd-scripts fetches its tokenizers from the Hub by name unless --tokenizer_cache_dir
    holds them (its offline option): the skeleton's tokenizers, saved under its names."""
    from transformers import CLIPTokenizer

    from studio.models.skeletons import skeleton_dir

    cache = work / "tokenizers"
    names = {"tokenizer": "openai/clip-vit-large-patch14", "tokenizer_2": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"}
    for attr, name in names.items():
        source = skeleton_dir(family) / attr
        target = cache / name.replace("/", "_")
        if source.is_dir() and not target.is_dir():
            CLIPTokenizer.from_pretrained(source).save_pretrained(target)
    return cache


# ------------------------------------------------------------------------------ contenders
@dataclass(frozen=True)
class Settings:
    family: str
    resolution: int
    steps: int
    sample_steps: int
    base_weights: str = "full"      # ours: full (fp32) or bf16
    train_text_encoder: bool = False


def our_command(settings: Settings, model: Path, data: dict, work: Path, name: str, *,
                workspace: Path) -> tuple[list[str], dict, Path, Path]:
    """The worker's command on a new run of `workspace` (whose cache/ the runs share), its
    environment, its working folder and the run folder."""
    from studio.config import TrainConfig, network_config
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace

    config = TrainConfig(name=name, base_model=str(model))
    config.dataset.path = str(data["captioned"])
    config.dataset.resolution = settings.resolution
    config.network = network_config("lora", rank=RANK, alpha=float(RANK), target_modules=ATTENTION,
                                    train_text_encoder=settings.train_text_encoder)
    t = config.training
    t.max_steps, t.batch_size, t.learning_rate, t.lr_scheduler = settings.steps, 1, 1e-4, "constant"
    t.log_every_n_steps = 1
    if settings.base_weights != "full":
        t.base_weights = settings.base_weights
    config.checkpoints.every_n_steps = 0
    config.sampling.every_n_steps = SAMPLE_AT
    config.sampling.prompts = [PROMPT]
    config.sampling.steps = settings.sample_steps
    config.sampling.guidance_scale = 7.5
    run_dir = create_run(config, Workspace.open(workspace))
    root = Path(__file__).resolve().parent.parent
    return ([sys.executable, "-m", "trainers", str(run_dir), "--quiet"],
            {**os.environ, "PYTHONPATH": str(root), "LORA_STUDIO_LOG_LEVEL": "WARNING"}, root, run_dir)


def sd_scripts_command(settings: Settings, checkout: Path, python: Path, model: Path, data: dict, work: Path,
                       name: str, init_weights: Path) -> tuple[list[str], dict, Path]:
    """train_network.py (sdxl_train_network.py) with the same modules as ours: its LoRA
    network adapts every Linear of a Transformer2DModel (attention, feed-forward, proj_in /
    out: 192 modules in SD1.5), so it starts from `init_weights` (our adapter: the 128
    attention modules) with --dim_from_weights, which builds exactly those."""
    out = work / "out" / name
    prompts = work / "sample-prompts.txt"
    prompts.write_text(f"{PROMPT} --w {settings.resolution} --h {settings.resolution} "
                       f"--s {settings.sample_steps} --l 7.5 --d 0\n")
    script = "sdxl_train_network.py" if settings.family == "sdxl" else "train_network.py"
    command = [str(python), script, "--pretrained_model_name_or_path", str(model),
               "--train_data_dir", str(data["kohya_root"]), "--caption_extension", ".txt",
               "--resolution", str(settings.resolution), "--output_dir", str(out), "--output_name", name,
               "--network_module", "networks.lora", "--network_dim", str(RANK), "--network_alpha", str(RANK),
               "--network_weights", str(init_weights), "--dim_from_weights", "--network_train_unet_only",
               "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--optimizer_type", "AdamW",
               "--max_train_steps", str(settings.steps), "--train_batch_size", "1",
               "--mixed_precision", "no", "--save_precision", "float", "--save_model_as", "safetensors",
               "--cache_latents", "--sdpa", "--seed", "42", "--max_data_loader_n_workers", "0",
               "--sample_every_n_steps", str(SAMPLE_AT), "--sample_prompts", str(prompts), "--sample_sampler", "ddim",
               "--tokenizer_cache_dir", str(tokenizer_cache(work, settings.family))]
    return command, {**os.environ, "HF_HUB_OFFLINE": "1"}, checkout


def diffusers_command(settings: Settings, examples: Path, python: Path, folder: Path, data: dict, work: Path,
                      name: str) -> tuple[list[str], dict, Path]:
    """train_dreambooth_lora.py (…_sdxl.py) at its defaults but for the shared settings. Its
    LoRA adapts the attention's to_q / to_k / to_v / to_out.0 (and add_k / add_v_proj, which
    SD1.5 has none of): the same 128 modules as ours. It encodes every picture with the VAE
    at every step (no latent cache) and samples at the model's own size (512 px for SD1.5)
    with 25/50 steps, after reloading the pipeline: its validation as written."""
    script = examples / ("train_dreambooth_lora_sdxl.py" if settings.family == "sdxl" else "train_dreambooth_lora.py")
    command = [str(python), str(script), "--pretrained_model_name_or_path", str(folder),
               "--instance_data_dir", str(data["pictures"]), "--instance_prompt", "a sks shape",
               "--output_dir", str(work / "out" / name), "--resolution", str(settings.resolution),
               "--train_batch_size", "1", "--max_train_steps", str(settings.steps), "--learning_rate", "1e-4",
               "--lr_scheduler", "constant", "--rank", str(RANK), "--seed", "42", "--mixed_precision", "no",
               "--validation_prompt", PROMPT, "--validation_epochs", "1", "--num_validation_images", "1",
               "--checkpointing_steps", "100000", "--dataloader_num_workers", "0", "--report_to", "tensorboard"]
    return command, {**os.environ, "HF_HUB_OFFLINE": "1"}, examples


# ------------------------------------------------------------------------------ environments
def build_env(work: Path, name: str, checkout: Path, installs: list[list[str]]) -> tuple[Path, dict]:
    """work/env-<name>: a virtual environment with this machine's torch wheel (the build ours
    runs on) and then `installs` (pip arguments, run in `checkout`); made once. Returns its
    python and what it holds (versions, the checkout's commit)."""
    import torch

    env = work / f"env-{name}"
    python = env / "bin" / "python"
    done = env / ".installed"
    if not done.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, f"torch=={torch.__version__}"], check=True)
        for args in installs:
            subprocess.run([*pip, *args], check=True, cwd=checkout)
        done.write_text("")
    # Both scripts import torchvision; PyPI's Linux torchvision is built against the CUDA torch
    # and fails to register its operators on the CPU build (this machine's index has no CPU one).
    check = subprocess.run([str(python), "-c", "import torch, torchvision.transforms"], capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"{name}: its environment {env} cannot import torch and torchvision ({last}); install the "
                         f"torchvision build that matches torch {torch.__version__} there, then run again.")
    freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    wanted = ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors")
    versions = {line.split("==")[0]: line.split("==")[-1] for line in freeze.splitlines()
                if line.split("==")[0].lower() in wanted}
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return python, {"versions": versions, "commit": commit}


def sd_scripts_env(work: Path, checkout: Path):
    """Its requirements.txt as written (`-e .` installs its library from the checkout)."""
    return build_env(work, "sd-scripts", checkout, [["-r", "requirements.txt"]])


def diffusers_env(work: Path, repo: Path):
    """The library from the checkout (the examples track its main branch: the script checks
    the version) and examples/dreambooth/requirements.txt."""
    return build_env(work, "diffusers", repo, [["."], ["-r", "examples/dreambooth/requirements.txt"]])


# ------------------------------------------------------------------------------ the run
def _fmt(value, digits=1, suffix=""):
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _cache(counts: dict | None) -> str:
    return f"{counts['from_disk']} / {counts['encoded']}" if counts else "-"


def table(results: list[Result]) -> str:
    lines = ["| contender | round | load s | first step s | s/step (median) | sample s | peak GB | training peak GB "
             "| wall s | steps | cache read / encoded |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.contender} | {r.round} | {_fmt(r.load_s)} | {_fmt(r.first_step_s)} | {_fmt(r.step_s, 2)} "
                     f"| {_fmt(r.sample_s)} | {_fmt(r.peak_gb, 2)} | {_fmt(r.extra.get('training_peak_gb'), 2)} "
                     f"| {_fmt(r.wall_s, 0)} | {r.steps} "
                     f"| {_cache(r.extra.get('cache'))} |")
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    """Ours / theirs, round by round (each pair ran side by side), for each of our variants."""
    lines = []
    ours_names = sorted({r.contender for r in results if r.contender.startswith("ours")})
    theirs_names = sorted({r.contender for r in results if not r.contender.startswith("ours")})
    for mine in ours_names:
        for theirs in theirs_names:
            for attr, label in (("step_s", "s/step"), ("first_step_s", "first step"), ("peak_gb", "peak")):
                pairs = [(a, b) for a in results for b in results if a.contender == mine and b.contender == theirs
                         and a.round == b.round and getattr(a, attr) and getattr(b, attr)]
                if pairs:
                    values = ", ".join(f"{getattr(a, attr) / getattr(b, attr):.2f}" for a, b in pairs)
                    lines.append(f"{mine} / {theirs}, {label}: {values} (round by round)")
    return "\n".join(lines)


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", type=Path, help="a clone of kohya-ss/sd-scripts")
    parser.add_argument("--diffusers-examples", type=Path, help="a clone of huggingface/diffusers")
    parser.add_argument("--work", type=Path, default=Path("realsize-work"),
                        help="models, environments, data and outputs (kept: the next run reuses them)")
    parser.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--ours", nargs="+", default=["full"], choices=["full", "bf16"],
                        help="our variants: base weights full (fp32) and/or bf16 storage")
    parser.add_argument("--only", nargs="+", default=["ours", "sd-scripts", "diffusers"],
                        choices=["ours", "sd-scripts", "diffusers"])
    parser.add_argument("--ours-only", action="store_true", help="the same as --only ours")
    parser.add_argument("--train-text-encoder", action="store_true", help="ours: a text-encoder LoRA too")
    args = parser.parse_args(argv)
    if args.ours_only:
        args.only = ["ours"]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    run_dirs = work / "runs"
    run_dirs.mkdir(exist_ok=True)
    import torch

    print(f"bench.realsize: {args.family} at {args.resolution} px, batch 1, rank {RANK}, U-Net attention LoRA, "
          f"fp32 compute, cached latents, {args.steps} steps, a sample after step {SAMPLE_AT}; "
          f"torch {torch.__version__}, {os.cpu_count()} cores; load {os.getloadavg()}", flush=True)
    single, folder = build_models(args.family, work, diffusers_folder="diffusers" in args.only)
    data = prepare_data(work)
    setups = {}
    if "sd-scripts" in args.only:
        setups["sd-scripts"] = sd_scripts_env(work, args.sd_scripts.resolve())
    if "diffusers" in args.only:
        repo = args.diffusers_examples.resolve()
        repo = next(p for p in (repo, *repo.parents) if (p / "setup.py").exists())
        setups["diffusers"] = diffusers_env(work, repo)
    for name, (_, info) in setups.items():
        print(f"{name}: commit {info['commit']}, {info['versions']}", flush=True)
    results: list[Result] = []
    init_weights = None
    for round_ in range(1, args.rounds + 1):
        for contender in args.only:
            variants = args.ours if contender == "ours" else [None]
            for variant in variants:
                settings = Settings(args.family, args.resolution, args.steps, args.sample_steps,
                                    base_weights=variant or "full", train_text_encoder=args.train_text_encoder)
                name = contender if variant in (None, "full") else f"{contender}-{variant}"
                tag = f"{name}-{args.family}-r{round_}-{int(time.time())}"
                run_dir = None
                if contender == "ours":
                    command, env, cwd, run_dir = our_command(settings, single, data, work, tag,
                                                             workspace=work / "workspace")
                elif contender == "sd-scripts":
                    if init_weights is None:
                        raise SystemExit("sd-scripts starts from our adapter's modules: list ours before it")
                    command, env, cwd = sd_scripts_command(settings, args.sd_scripts.resolve(), setups[contender][0],
                                                           single, data, work, tag, init_weights)
                else:
                    examples = repo / "examples" / "dreambooth"
                    command, env, cwd = diffusers_command(settings, examples, setups[contender][0], folder, data,
                                                          work, tag)
                print(f"round {round_}: {name} (load {os.getloadavg()[0]:.1f})", flush=True)
                result = run_measured(name, round_, command, cwd=cwd, env=env, log=run_dirs / f"{tag}.log",
                                      sample_at=SAMPLE_AT)
                if run_dir is not None:  # latents and captions read from the disk cache / encoded
                    from studio.jobs.runs import iter_events

                    result.extra["cache"] = {k: e[k] for e in iter_events(run_dir) if e["type"] == "cache"
                                             for k in ("from_disk", "encoded")}
                if contender == "ours" and init_weights is None:
                    init_weights = max((work / "workspace" / "adapters").glob("*.safetensors"),
                                       key=lambda p: p.stat().st_mtime)
                results.append(result)
                print(json.dumps(result.__dict__), flush=True)
    print(f"\nload average at the end: {os.getloadavg()}")
    print(table(results))
    print(ratios(results))
    return results


if __name__ == "__main__":
    main()
