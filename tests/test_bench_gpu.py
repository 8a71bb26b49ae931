"""bench/gpu.py is meant to run on a GPU machine that may be lent only briefly: every config it
trains must pass our validation, and without CUDA it refuses at once (issue 25)."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
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


def test_the_flux_row_is_full_size_flux_in_bf16_and_its_cases_fit(monkeypatch):
    """The FLUX.1 size builds every weighted part of the real architecture (12B transformer,
    T5-XXL, CLIP-L, VAE) and leaves out only fp32, whose weights alone are 67 GB."""
    from bench import gpu
    from studio.models.skeletons import skeleton_dir
    from toyworld.random_weights import skeleton_component, weighted_components

    size = gpu.SIZES["flux"]
    skeleton = skeleton_dir("flux")
    with torch.device("meta"):
        parameters = {c: sum(p.numel() for p in skeleton_component(skeleton, c).parameters())
                      for c in weighted_components(skeleton)}
    assert set(parameters) == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert 11.8e9 < parameters["transformer"] < 12.0e9 and 4.7e9 < parameters["text_encoder_2"] < 4.8e9
    assert size.storage == torch.bfloat16 and not size.reference
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [case.name for case in gpu.runnable_cases(size)] == [case.name for case in gpu.CASES[1:]]
    assert gpu.runnable_cases(gpu.SIZES["sdxl"]) == gpu.CASES


@pytest.mark.slow(seconds=20)
def test_the_tiny_bench_runs_both_families_through_the_same_code(capsys):
    """`--tiny` is the GPU bench's own code on the built-in models: SD 1.5 against the
    reference loop, FLUX.1 without one."""
    from bench import gpu

    rows = gpu.main(["--tiny", "--family", "sd15", "flux", "--steps", "1", "--warmup", "0"])
    assert [(row["size"], row["case"]) for row in rows] == [("sd15 64 px, batch 4", "fp32"),
                                                            ("flux 64 px, batch 4", "fp32")]
    assert rows[0]["reference"]["it_s"] > 0 and rows[1]["reference"] is None and rows[1]["ours"]["it_s"] > 0
