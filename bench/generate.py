"""Generation cost of blending: per denoising step with 0, 1 and 3 adapters in the engine's
mix vs the same 3 adapters fused into a checkpoint (`lora-studio fuse`) loaded as a base
model, and the time to switch between mixes of loaded adapters, on the built-in model. Targets: <= 10% overhead for 3 adapters over
the fused model; switch <= 0.3 s.

    python -m bench.generate [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def run_seconds(pipe, steps: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        pipe("a red circle on a white background", num_inference_steps=steps, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0))
    return time.perf_counter() - t0


def per_step_seconds(setups: dict, repeats: int, steps: int = 20) -> dict[str, float]:
    """For each labelled setup (a function returning a ready pipeline): (time of `steps`
    steps - time of 1 step) / (steps - 1), the denoising step alone without text encoding
    and VAE decoding. Setups take turns within each repeat, so a machine that slows down
    or speeds up during the run affects them alike."""
    long = {label: [] for label in setups}
    short = {label: [] for label in setups}
    for setup in setups.values():
        run_seconds(setup(), 2)
    for _ in range(repeats):
        for label, setup in setups.items():
            pipe = setup()
            long[label].append(run_seconds(pipe, steps))
            short[label].append(run_seconds(pipe, 1))
    return {label: (statistics.median(long[label]) - statistics.median(short[label])) / (steps - 1)
            for label in setups}


def main(argv=None) -> dict:
    from toyworld.fidelity import train
    from studio.generation.engine import AdapterUse, Engine
    from studio.adapters.mixing import fuse
    from studio.workspace import Workspace

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        workspace = Workspace.open(tmp)
        adapters = [train(workspace, name=f"bench-{i}", steps=10, rank=8 * (i + 1), type="lora",
                          prior_preservation=False) for i in range(3)]
        engine = Engine()
        mixes = {"0 adapters": [], "1 adapter": [AdapterUse(adapters[0], 0.8)],
                 "3 adapters": [AdapterUse(a, w) for a, w in zip(adapters, (0.8, 0.5, -0.3))]}
        t0 = time.perf_counter()
        engine.set_mix("builtin", mixes["3 adapters"])
        first_load = time.perf_counter() - t0
        fused_file = fuse("builtin", [(use.path, use.weight) for use in mixes["3 adapters"]], f"{tmp}/fused.safetensors")
        fused_engine = Engine()
        setups = {label: (lambda mix=mix: engine.set_mix("builtin", mix)) for label, mix in mixes.items()}
        setups["fused (3 merged)"] = lambda: fused_engine.set_mix(str(fused_file), [])
        cost = per_step_seconds(setups, args.repeats)
        switches = []
        for i in range(10):
            mix = mixes["1 adapter"] if i % 2 else mixes["3 adapters"]
            t0 = time.perf_counter()
            engine.set_mix("builtin", mix)
            switches.append(time.perf_counter() - t0)
    fused = cost["fused (3 merged)"]
    print(f"generate  built-in model, 64x64, CFG 5, threads={torch.get_num_threads()}")
    for label, seconds in cost.items():
        print(f"  {label:>17}: {1000 * seconds:6.1f} ms/step  ({seconds / fused:.2f}x fused)")
    overhead = cost["3 adapters"] / fused - 1
    switch = statistics.median(switches)
    print(f"  overhead of 3 blended adapters vs fused: {100 * overhead:.1f}% (target <= 10%)")
    print(f"  switch a mix: {1000 * switch:.1f} ms median (target <= 300 ms); first load of 3 adapters "
          f"{first_load:.2f} s; base model loads: {engine.pipeline_loads}")
    return {"per_step": cost, "overhead": overhead, "switch_s": switch, "first_load_s": first_load}


if __name__ == "__main__":
    main()
