"""Squeeze (resize) speed and error: our QR + r x r SVD vs a full-matrix SVD of every
delta, on an SDXL-size rank-128 LoRA with random weights (the shapes of SDXL's attention
and feed-forward layers), reduced to rank 32.

    python -m bench.resize [--modules 8] [--rank 128] [--to 32]
"""
from __future__ import annotations

import argparse
import time

import torch

from studio.adapters.merge import Factors, squeeze

# (out, in) of SDXL UNet attention / feed-forward linears, cycled through.
SDXL_SHAPES = [(640, 640), (640, 2048), (1280, 1280), (1280, 2048), (5120, 640), (640, 2560),
               (10240, 1280), (1280, 5120)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modules", type=int, default=8, help="modules to squeeze (SDXL has 722 in the UNet)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--to", type=int, default=32)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    layers = []
    for i in range(args.modules):
        out, inp = SDXL_SHAPES[i % len(SDXL_SHAPES)]
        layers.append(Factors(torch.randn(out, args.rank, generator=g) / args.rank ** 0.5,
                              torch.randn(args.rank, inp, generator=g) / inp ** 0.5))

    t0 = time.perf_counter()
    ours = [squeeze(f, rank=args.to).factors for f in layers]
    ours_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    reference = []
    for f in layers:
        u, s, vh = torch.linalg.svd(f.delta().double(), full_matrices=False)
        reference.append(((u[:, :args.to] * s[:args.to]) @ vh[:args.to]).float())
    full_s = time.perf_counter() - t0

    max_err = max(float((o.delta() - r).abs().max()) for o, r in zip(ours, reference))
    scale = max(float(r.abs().max()) for r in reference)
    print(f"resize  {args.modules} SDXL-size modules, rank {args.rank} -> {args.to}")
    print(f"  ours (QR + {args.rank}x{args.rank} SVD): {ours_s:.2f} s")
    print(f"  full-matrix SVD:                 {full_s:.2f} s")
    print(f"  speed-up: {full_s / ours_s:.1f}x   max abs error vs full SVD: {max_err:.2e} (entries up to {scale:.2f})")
    return {"ours_s": ours_s, "full_svd_s": full_s, "speedup": full_s / ours_s, "max_error": max_err}


if __name__ == "__main__":
    main()
