"""Adapter arithmetic on factor pairs: exact weighted sums (bake) and rank reduction
(squeeze) without ever forming or decomposing a full weight-sized matrix for a LoRA.

A factor pair is (up [out, r], down [r, in...]) with the scale already folded in, so
dW = up @ down.flatten(1). Conv factors keep their kernel dims on `down`
([r, in, kh, kw]) and 1x1 on `up` ([out, r, 1, 1]).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from studio.errors import StudioError


@dataclass
class Factors:
    up: torch.Tensor     # [out, r] or [out, r, 1, 1]
    down: torch.Tensor   # [r, in] or [r, in, kh, kw]

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The full update; for checks and small layers only."""
        return (self.up.flatten(1) @ self.down.flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:])


def concat(parts: list[tuple[Factors, float]]) -> Factors:
    """The exact weighted sum w1*dW1 + w2*dW2 + ...: ranks add up, nothing is lost
    (merging the A's and B's separately would create cross terms)."""
    if not parts:
        raise StudioError("Nothing to merge: give at least one adapter.")
    ups = [f.up.flatten(1).float() * w for f, w in parts]
    downs = [f.down.flatten(1).float() for f, _ in parts]
    first = parts[0][0]
    up = torch.cat(ups, dim=1)
    down = torch.cat(downs, dim=0)
    return Factors(up.reshape(first.up.shape[0], -1, *first.up.shape[2:]),
                   down.reshape(-1, *first.down.shape[1:]))


@dataclass
class Squeezed:
    factors: Factors
    energy_kept: float       # sum of kept sigma^2 / sum of all sigma^2
    singular_values: torch.Tensor


def singular_triplets(f: Factors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of up @ down through QR(up) and QR(down^T) and the SVD of the r x r core:
    exact, and costs O((out + in) r^2) instead of a full-matrix SVD."""
    up, down = f.up.flatten(1).double(), f.down.flatten(1).double()
    q_up, r_up = torch.linalg.qr(up)
    q_down, r_down = torch.linalg.qr(down.t())
    u, s, vh = torch.linalg.svd(r_up @ r_down.t())
    return q_up @ u, s, vh @ q_down.t()


def check_rule(*, rank: int | None = None, sv_ratio: float | None = None, sv_fro: float | None = None,
               sv_cumulative: float | None = None) -> None:
    """Refuse anything but exactly one rank rule with a value in its range (NaN and
    infinity included): checked before any file is read."""
    rules = [r for r in (rank, sv_ratio, sv_fro, sv_cumulative) if r is not None]
    if len(rules) != 1:
        raise StudioError("Give exactly one of --rank, --sv-ratio, --sv-fro, --sv-cumulative.")
    if rank is not None and not rank >= 1:
        raise StudioError(f"--rank must be at least 1 (got {rank}).")
    if sv_ratio is not None and not (math.isfinite(sv_ratio) and sv_ratio >= 1):
        raise StudioError(f"--sv-ratio must be a finite number of at least 1 (got {sv_ratio}).")
    for flag, share in (("--sv-fro", sv_fro), ("--sv-cumulative", sv_cumulative)):
        if share is not None and not 0 < share <= 1:
            raise StudioError(f"{flag} must be in (0, 1] (got {share}).")


def choose_rank(s: torch.Tensor, *, rank: int | None = None, sv_ratio: float | None = None,
                sv_fro: float | None = None, sv_cumulative: float | None = None) -> int:
    """How many singular values to keep (at least 1, at most all), by one rule:
    rank N; sv_ratio X keeps sigma >= sigma_max / X; sv_fro X keeps the fewest whose
    Frobenius share sqrt(sum kept sigma^2 / sum sigma^2) reaches X; sv_cumulative X keeps
    the fewest whose share of sum(sigma) reaches X."""
    check_rule(rank=rank, sv_ratio=sv_ratio, sv_fro=sv_fro, sv_cumulative=sv_cumulative)
    n = s.numel()
    if rank is not None:
        keep = rank
    elif sv_ratio is not None:
        keep = int((s >= s[0] / sv_ratio).sum())
    elif sv_fro is not None:
        share = (s.square().cumsum(0) / s.square().sum()).sqrt()
        keep = int((share < sv_fro - 1e-12).sum()) + 1
    else:
        share = s.cumsum(0) / s.sum()
        keep = int((share < sv_cumulative - 1e-12).sum()) + 1
    return max(1, min(keep, n))


def squeeze(f: Factors, **rule) -> Squeezed:
    """The best approximation of up @ down at the chosen rank (Eckart-Young), with
    sqrt(sigma) split evenly between the new up and down."""
    u, s, vh = singular_triplets(f)
    keep = choose_rank(s, **rule)
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).to(f.up.dtype)
    down = (root[:, None] * vh[:keep]).to(f.down.dtype)
    total = float(s.square().sum())
    kept = float(s[:keep].square().sum())
    return Squeezed(Factors(up.reshape(f.up.shape[0], keep, *f.up.shape[2:]),
                            down.reshape(keep, *f.down.shape[1:])),
                    kept / total if total > 0 else 1.0, s.float())


def factors_of_delta(delta: torch.Tensor, **rule) -> Squeezed:
    """Squeeze an update given as a full matrix (LoHa / LoKr, which are not low-rank
    factor pairs): one SVD of the delta itself."""
    flat = delta.flatten(1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = choose_rank(s, **rule)
    root = s[:keep].sqrt()
    up = (u[:, :keep] * root).float().reshape(delta.shape[0], keep, *([1] * (delta.dim() - 2)))
    down = (root[:, None] * vh[:keep]).float().reshape(keep, *delta.shape[1:])
    total = float(s.square().sum())
    return Squeezed(Factors(up, down), float(s[:keep].square().sum()) / total if total > 0 else 1.0, s.float())
