"""`python -m bench.variants --quick` on two variants: each trains in its own process, is
judged from pixels, and its costs are the ones its method implies (LoRA-FA: B alone trains)."""
from __future__ import annotations

import pytest


def test_every_method_is_a_variant():
    from bench.variants import OPTIONS, variants
    from studio.adapters.methods import METHODS
    from studio.config import network_config

    assert list(variants()) == [*METHODS, *OPTIONS]
    for name in variants():  # every variant's settings are a valid network
        network_config(**{k: v for k, v in variants()[name].items() if k != "squeeze_rank"})


@pytest.mark.slow(seconds=60)
def test_quick_run_on_two_variants(capsys):
    from bench.variants import main

    result = main(["--quick", "--variants", "lora", "lora_fa"])
    rows = {r["variant"]: r for r in result["rows"]}
    assert rows.keys() == {"lora", "lora_fa"}
    lora, fa = rows["lora"], rows["lora_fa"]
    for row in (lora, fa):
        assert 0 <= row["purple"] <= 1 and 0 <= row["star"] <= 1 and row["prior_kept"] > 0.5
        assert row["steps_s"] > 0 and row["peak_rss_mb"] > 100 and row["file_kb"] > 10
    # the same rank and layers: the same file, but LoRA-FA trains and keeps Adam state for B only
    assert abs(lora["file_kb"] - fa["file_kb"]) < 0.02 * lora["file_kb"]
    assert fa["params"] < 0.6 * lora["params"]
    assert fa["optimizer_kb"] / lora["optimizer_kb"] == pytest.approx(fa["params"] / lora["params"], rel=0.01)
    table = capsys.readouterr().out
    assert "| lora |" in table and "| lora_fa |" in table and "optimizer state KB" in table
