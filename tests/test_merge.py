"""Bake and squeeze math: exact sums, lossless full-rank squeeze, optimal truncation."""
from __future__ import annotations

import pytest
import torch

from studio.errors import StudioError
from studio.adapters.merge import Factors, choose_rank, concat, factors_of_delta, singular_triplets, squeeze


def _random(out=24, inp=20, r=6, conv=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if conv:
        return Factors(torch.randn(out, r, 1, 1, generator=g), torch.randn(r, inp, 3, 3, generator=g))
    return Factors(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g))


@pytest.mark.parametrize("conv", [False, True])
def test_concat_is_the_exact_weighted_sum(conv):
    a, b = _random(conv=conv, seed=1), _random(r=3, conv=conv, seed=2)
    baked = concat([(a, 0.7), (b, -1.3)])
    assert baked.rank == 9 and baked.up.dim() == a.up.dim() and baked.down.shape[1:] == a.down.shape[1:]
    assert torch.allclose(baked.delta(), 0.7 * a.delta() - 1.3 * b.delta(), atol=1e-5)


@pytest.mark.parametrize("conv", [False, True])
def test_squeeze_full_rank_is_lossless_and_rank_n_is_optimal(conv):
    f = _random(out=40, inp=12, r=8, conv=conv, seed=3)
    full = squeeze(f, rank=8)
    assert full.energy_kept == pytest.approx(1.0)
    assert torch.allclose(full.factors.delta(), f.delta(), atol=1e-4)
    # against a full SVD of the (small) delta: the same singular values and the best rank-3 fit
    flat = f.delta().flatten(1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    _, s_qr, _ = singular_triplets(f)
    assert torch.allclose(s_qr, s[:8], rtol=1e-5)
    best3 = (u[:, :3] * s[:3]) @ vh[:3]
    got3 = squeeze(f, rank=3)
    assert got3.factors.rank == 3
    assert torch.allclose(got3.factors.delta().flatten(1).double(), best3, atol=1e-4)
    assert got3.energy_kept == pytest.approx(float(s[:3].square().sum() / s.square().sum()), rel=1e-6)


def test_dynamic_rules():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert choose_rank(s, sv_ratio=4) == 2            # keeps sigma >= 2.5
    assert choose_rank(s, sv_ratio=5) == 3            # keeps sigma >= 2
    assert choose_rank(s, sv_cumulative=0.8) == 2     # 15/18.5 = 0.81
    assert choose_rank(s, sv_fro=0.99) == 3           # sqrt(129/130.25) = 0.995
    assert choose_rank(s, rank=99) == 5
    with pytest.raises(StudioError):
        choose_rank(s, rank=2, sv_fro=0.9)
    with pytest.raises(StudioError):
        choose_rank(s, sv_fro=1.5)


def test_squeeze_of_a_full_delta():
    delta = _random(out=16, inp=10, r=4, seed=5).delta()
    result = factors_of_delta(delta, rank=4)
    assert torch.allclose(result.factors.delta(), delta, atol=1e-4) and result.energy_kept == pytest.approx(1.0)
