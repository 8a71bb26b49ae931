"""bench/gpu.py is meant to run on a GPU machine that may be lent only briefly: every config it
trains must pass our validation, and without CUDA it refuses at once (issue 25)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_gpu_bench_case_is_a_valid_training_config(tmp_path, family):
    from bench import gpu

    for case in gpu.CASES:
        config = gpu.our_config(tmp_path, gpu.SIZES[family], case, steps=13)
        assert (config.training.mixed_precision, config.training.optimizer, config.training.base_weights) == (
            case.mixed_precision, case.optimizer, case.base_weights)
        assert config.training.batch_size == gpu.SIZES[family].batch_size
        assert config.training.max_steps == 13


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without CUDA")
def test_without_cuda_the_full_size_bench_refuses_in_one_line(capsys):
    from bench import gpu

    with pytest.raises(SystemExit) as stopped:
        gpu.main([])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err
