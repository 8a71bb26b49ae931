"""Low-memory training options: refused without CUDA before any model loads (config,
run creation, trainer, CLI); the float8 storage math checked on the CPU."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from studio.errors import StudioError
from tests.conftest import demo_config, run_cli

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")

CUDA_ONLY = {
    "bf16": (("training", "mixed_precision", "bf16"), "training.mixed_precision = 'bf16' needs one, set it to 'no'"),
    "adamw8bit": (("training", "optimizer", "adamw8bit"), "training.optimizer = 'adamw8bit'"),
    "qlora": (("training", "base_weights", "nf4"), "training.base_weights = 'nf4' (QLoRA / QDoRA"),
    "qdora": (("training", "base_weights", "nf4"), "training.base_weights = 'nf4' (QLoRA / QDoRA"),
    "fp8": (("training", "base_weights", "fp8"), "training.base_weights = 'fp8' (float8 base storage) needs one"),
}


def _cuda_only_config(option: str):
    (section, key, value), _ = CUDA_ONLY[option]
    config = demo_config(max_steps=2)
    setattr(getattr(config, section), key, value)
    if option == "qdora":
        config.network.use_dora = True
    return config


@no_cuda
@pytest.mark.parametrize("option", list(CUDA_ONLY))
def test_cuda_only_option_refused_before_any_model_loads(option, workspace, monkeypatch):
    from studio.config import check_device_support
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    config = _cuda_only_config(option)
    expected = CUDA_ONLY[option][1]
    with pytest.raises(StudioError, match="^No CUDA GPU on this machine: ") as refused:
        check_device_support(config)
    assert expected in str(refused.value) and "\n" not in str(refused.value)

    with pytest.raises(StudioError, match="No CUDA GPU"):
        create_run(config, workspace)
    assert not workspace.runs_dir.exists() or not any(workspace.runs_dir.iterdir())

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the CUDA check")

    monkeypatch.setattr("trainers.trainer.load_pipeline", no_loading)  # where the trainer looks it up
    run_dir = workspace.runs_dir / "made-elsewhere"
    with pytest.raises(StudioError, match=re.escape(expected)):
        AdapterTrainer(run_dir, config, show_progress=False).run()


@no_cuda
@pytest.mark.slow(seconds=8)
def test_cli_train_refuses_cuda_only_options_in_one_line(tmp_path):
    from studio.config import save_config

    config = _cuda_only_config("qlora")
    config.training.optimizer = "adamw8bit"
    save_config(config, tmp_path / "qlora.toml")
    result = run_cli("train", tmp_path / "qlora.toml", "--workspace", tmp_path / "ws", "--quiet")
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: No CUDA GPU on this machine: ")
    assert "training.base_weights = 'nf4'" in line and "training.optimizer = 'adamw8bit'" in line
    assert not (tmp_path / "ws" / "runs").exists() or not any((tmp_path / "ws" / "runs").iterdir())


@pytest.mark.parametrize("network,message", [
    ({"type": "loha", "rank": 4, "alpha": 4.0}, "works with lora, locon and tlora networks, not loha"),
    ({"init": "pissa"}, "network.init = 'pissa' rewrites the base weights"),
])
def test_nf4_refuses_adapters_it_cannot_carry(network, message):
    from studio.config import parse_config

    data = {"network": network, "training": {"base_weights": "nf4"}}
    with pytest.raises(StudioError, match=message):
        parse_config(data)
    parse_config({"network": network, "training": {"base_weights": "fp8"}})


@pytest.mark.parametrize("storage", ["fp8", "bf16"])
def test_low_precision_storage_matches_full_precision_compute_on_rounded_weights(storage):
    """The float8 / bfloat16 layers give the output and input gradient of the same layer with
    its weights rounded to that dtype, and keep no full-precision copy of the weight."""
    from trainers.low_memory import STORAGE, store_frozen_weights

    dtype = STORAGE[storage]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(2),
                                torch.nn.Linear(36, 5))
    adapter = torch.nn.Linear(5, 5)  # a trainable layer after the frozen ones, as an adapter would be
    model.requires_grad_(False)
    reference = torch.nn.Sequential(*[torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(2),
                                      torch.nn.Linear(36, 5)])
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    with torch.no_grad():
        for layer in (reference[0], reference[2]):
            layer.weight.copy_(layer.weight.to(dtype).float())
    assert store_frozen_weights(model, dtype) == 2
    assert model[0].weight.dtype == dtype and model[2].weight.dtype == dtype and model[2].bias.dtype == torch.float32

    x = torch.randn(2, 4, 6, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = model(x), reference(x_ref)
    assert torch.allclose(out, out_ref, atol=1e-5)
    adapter(out).square().sum().backward()
    grad_adapter = adapter.weight.grad.clone()
    adapter.zero_grad()
    adapter(out_ref).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(grad_adapter, adapter.weight.grad, atol=1e-5)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16


def test_fp8_storage_keeps_the_familys_full_precision_layers():
    """The layers a family names (a UNet's conv_in and conv_out) stay in full precision."""
    from trainers.low_memory import FP8, store_frozen_weights

    from studio.models.families import get_family

    model = torch.nn.ModuleDict({"conv_in": torch.nn.Conv2d(4, 8, 3), "mid": torch.nn.Linear(8, 8),
                                 "conv_out": torch.nn.Conv2d(8, 4, 3)}).requires_grad_(False)
    assert store_frozen_weights(model, FP8, keep=get_family("sd15").full_precision_modules) == 1
    assert model["mid"].weight.dtype == FP8
    assert model["conv_in"].weight.dtype == model["conv_out"].weight.dtype == torch.float32


@no_cuda
@pytest.mark.parametrize("native", [False, True])
def test_bf16_base_weights_are_allowed_on_a_cpu_with_a_note_that_compute_stays_fp32(native, workspace,
                                                                                  monkeypatch):
    from studio.config import check_device_support
    from studio.jobs.runs import check_training

    monkeypatch.setattr("studio.config._cpu_has_native_bf16", lambda: native)
    config = demo_config(max_steps=2)
    config.training.base_weights = "bf16"
    check_device_support(config)
    check = check_training(config, workspace)
    assert not check.problems
    notes = [w for w in check.warnings if "base_weights = 'bf16'" in w]
    assert len(notes) == 1 and "half the memory" in notes[0] and "computes in fp32" in notes[0]
    assert ("no native bf16" in notes[0]) is not native
    config.training.base_weights = "full"
    assert not [w for w in check_training(config, workspace).warnings if "bf16" in w]


@pytest.mark.slow(seconds=20)
def test_bf16_base_weights_store_the_frozen_denoiser_and_text_encoders_and_train(workspace):
    """bf16 storage: the frozen Linear / Conv2d weights of the denoiser (but the family's
    full-precision modules) and of the text encoders in bfloat16, the adapter in fp32; the
    loss on fixed draws is the full-precision base's within bf16 rounding, and a step trains."""
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    losses = {}
    for base_weights in ("full", "bf16"):
        config = demo_config(max_steps=1)
        config.training.base_weights = base_weights
        trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
        trainer.setup()
        losses[base_weights] = trainer.loss(0).item()
    frozen = {path: module.weight.dtype for path, module in trainer.denoiser.named_modules()
              if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and not module.weight.requires_grad}
    keep = trainer.family.full_precision_modules
    assert keep and all(frozen[path] == torch.float32 for path in keep)
    assert {dtype for path, dtype in frozen.items() if path not in keep} == {torch.bfloat16}
    assert all(module.weight.dtype == torch.bfloat16 for encoder in trainer.text_encoders
               for module in encoder.modules() if type(module) is torch.nn.Linear)
    assert trainer.trainable and all(p.dtype == torch.float32 for p in trainer.trainable)
    assert losses["bf16"] == pytest.approx(losses["full"], rel=0.02), losses
    before = [p.detach().clone() for p in trainer.trainable]
    trainer.train_step(0)
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.trainable))


@pytest.mark.slow(seconds=30)
def test_bf16_base_weights_narrow_an_fp16_file_as_it_is_loaded(workspace, tmp_path):
    """A single file stored in fp16 (as SDXL's are shipped) is loaded as stored and narrowed in
    place: never a full-precision copy of the whole model. The result is what full precision
    gives within bf16 rounding, and sensitivity-LoRA, which needs the base weights' gradients,
    still measures them through the narrowed layers."""
    from studio.jobs.run_folder import read_events
    from studio.jobs.runs import create_run
    from studio.models import load_pipeline
    from studio.models.single_file import save_single_file
    from trainers.trainer import AdapterTrainer

    path = save_single_file(load_pipeline("builtin"), tmp_path / "half.safetensors", dtype=torch.float16)
    losses, events = {}, {}
    for base_weights in ("full", "bf16"):
        config = demo_config(max_steps=1)
        config.base_model = str(path)
        config.training.base_weights = base_weights
        config.network.rank_allocation = "sensitivity"
        trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
        trainer.setup()
        losses[base_weights] = trainer.loss(0).item()
        events[base_weights] = [e for e in read_events(trainer.run_dir)[0] if e["type"] == "adapter_prepared"][0]
    keep = trainer.family.full_precision_modules
    narrowed = {path: module.weight.dtype for path, module in trainer.denoiser.named_modules()
                if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and path not in keep
                and not module.weight.requires_grad}
    assert len(narrowed) > 50 and set(narrowed.values()) == {torch.bfloat16}
    others = {p.dtype for model in (trainer.denoiser, trainer.vae, *trainer.text_encoders) for p in model.parameters()
              if p.dtype != torch.bfloat16}
    assert others == {torch.float32}  # norms, biases, embeddings, the VAE widened from fp16 exactly
    assert losses["bf16"] == pytest.approx(losses["full"], rel=0.02), losses
    full, bf16 = (events[k]["sensitivity"] for k in ("full", "bf16"))
    assert full.keys() == bf16.keys() and all(v > 0 for v in bf16.values())
    assert sum(abs(full[k] - bf16[k]) for k in full) <= 0.05 * sum(full.values()), (full, bf16)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_own_storage_lets_the_loaded_files_mapping_go(tmp_path):
    """A model loaded from a safetensors file views the file's mapping until its tensors own
    their memory (what keeps a bf16-stored base's original file resident)."""
    import gc

    from safetensors.torch import load_file, save_file

    from trainers.low_memory import own_storage

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    file = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(file))
    loaded = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    loaded.load_state_dict(load_file(str(file)), assign=True)
    gc.collect()

    def mapped() -> bool:
        return str(file) in Path("/proc/self/maps").read_text()

    assert mapped()
    own_storage(loaded)
    gc.collect()
    assert not mapped()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
