"""Every benchmark in one run, one table of figures measured side by side.

    python -m bench [--quick] [--skip NAME ...]

Each row compares ours with a reference measured in the same run (or states the target).
Figures for bench/RESULTS.md come from this command.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCHES = ("train_speed", "generate", "resize", "ui_start")


def main(argv=None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    parser.add_argument("--skip", nargs="*", default=[], choices=BENCHES)
    args = parser.parse_args(argv)
    started = time.time()
    rows: list[tuple[str, str, str, str]] = []

    if "train_speed" not in args.skip:
        from bench import train_speed

        r = train_speed.main(["--steps", "15" if args.quick else "40"])
        rows.append(("training steps/s, built-in model, batch 4", f"{r['ours']:.2f}",
                     f"{r['reference']:.2f} (diffusers DreamBooth loop)", f"{r['ratio']:.2f}x (target >= 2x)"))
        rows.append(("peak RSS of the bench process (MB)", f"{r['peak_rss_mb']:.0f}", "-", "-"))
    if "generate" not in args.skip:
        from bench import generate

        r = generate.main(["--repeats", "2" if args.quick else "5"])
        fused = r["per_step"]["fused (3 merged)"]
        rows.append(("generation ms/step, 3 blended adapters", f"{1000 * r['per_step']['3 adapters']:.1f}",
                     f"{1000 * fused:.1f} (fused weights)", f"{100 * r['overhead']:+.0f}% (target <= 10%)"))
        rows.append(("switch an adapter mix (ms)", f"{1000 * r['switch_s']:.1f}", "-", "target <= 300 ms"))
    if "resize" not in args.skip:
        from bench import resize

        r = resize.main(["--modules", "4" if args.quick else "8"])
        rows.append(("resize SDXL-size rank 128 -> 32 (s)", f"{r['ours_s']:.2f}",
                     f"{r['full_svd_s']:.2f} (full-matrix SVD)", f"{r['speedup']:.1f}x, max err {r['max_error']:.1e}"))
    if "ui_start" not in args.skip:
        from bench import ui_start

        r = ui_start.main(["--runs", "1" if args.quick else "3"])
        rows.append(("UI start to answered click (s)", f"{r['click_answered_s']:.2f}", "-",
                     f"target <= {ui_start.TARGET_S:.0f} s"))

    print()
    print(f"LoRA Studio benchmarks — {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, "
          f"{time.time() - started:.0f} s")
    widths = [max(len(row[i]) for row in rows + [("benchmark", "ours", "reference", "ratio / target")]) for i in range(4)]
    for row in [("benchmark", "ours", "reference", "ratio / target"), *rows]:
        print("  " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
