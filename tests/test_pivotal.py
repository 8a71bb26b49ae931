"""Pivotal tuning (network.pivotal_vectors): the trigger word's new embedding trains beside
the LoRA, is bundled in the adapter file as A1111 reads it (bundle_emb.*) and written as an
embedding file diffusers' load_textual_inversion loads; the engine loads the bundled
embedding with the adapter, so the trigger acts in generate. Tiny SD 1.5 and SDXL."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from studio.config import network_config
from tests.conftest import demo_config

VECTORS = 2
STEPS = 24


def _config(base_model: str = "builtin", **network):
    config = demo_config(max_steps=STEPS, every_n_steps=STEPS // 2, learning_rate=3e-3)
    config.base_model = base_model
    config.network.pivotal_vectors = VECTORS
    config.training.embedding_lr = 3e-2
    config.sampling.steps = 4
    config.sampling.prompts = ["a sks star on a white background"]
    config.network = network_config(like=config.network, **network)
    return config


def _fixed_loss(trainer) -> float:
    """The loss of the first four training pictures at fixed draws (no adapter dropout)."""
    from trainers.data import micro_generator

    with torch.no_grad():
        generator = micro_generator(7, 0, stream=5)
        batch = trainer.batch(trainer.instance, [0, 1, 2, 3], generator, whole=True)
        return float(trainer.per_sample_loss(batch, generator).mean())


def _train(config, workspace):
    from studio.jobs.runs import create_run
    from trainers.trainer import AdapterTrainer

    torch.manual_seed(0)
    trainer = AdapterTrainer(create_run(config, workspace), show_progress=False)
    trainer.setup()
    start = [v.clone() for v in trainer.pivotal.vectors()]
    before = _fixed_loss(trainer)
    adapter = trainer.train(resume=False, started=0.0)
    trainer.tensorboard.close()
    return trainer, adapter, start, before


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory):
    from studio.workspace import Workspace

    workspace = Workspace.open(tmp_path_factory.mktemp("pivotal") / "ws")
    return (*_train(_config(pivotal_init="star"), workspace), workspace)


@pytest.mark.slow(seconds=20)
def test_the_embedding_trains_and_the_loss_drops(sd15_run):
    trainer, adapter, start, before = sd15_run[:4]
    tokenizer = trainer.pipe.tokenizer
    star = trainer.pipe.text_encoder.get_input_embeddings().base.weight[tokenizer("star", add_special_tokens=False).input_ids[0]]
    assert torch.equal(start[0][0], star.detach().float())  # started from the init word
    trained = trainer.pivotal.vectors()[0]
    assert trained.shape == (VECTORS, 64) and (trained - start[0]).norm() > 0.05 * start[0].norm()
    assert _fixed_loss(trainer) < before
    # the text encoder itself did not change: only the new rows train
    assert not any(p.requires_grad for n, p in trainer.pipe.text_encoder.named_parameters() if "vectors" not in n)
    assert tokenizer.tokenize("a sks star") == ["a</w>", "sks", "star</w>"]


@pytest.mark.slow(seconds=10)
def test_the_bundle_and_the_embedding_file_load(sd15_run, tmp_path):
    from studio.adapters import load_adapter
    from studio.models import load_pipeline, resolve_model

    trainer, adapter = sd15_run[:2]
    trained = trainer.pivotal.vectors()[0]
    with safe_open(str(adapter), "pt") as handle:
        assert torch.equal(handle.get_tensor("bundle_emb.sks.string_to_param.*"), trained)
        assert sum(k.startswith("lora_unet_") for k in handle.keys()) > 0
    assert torch.equal(load_adapter(adapter).embeddings["sks"][0], trained)

    embedding_file = trainer.run_dir / "embeddings" / "sks.safetensors"
    with safe_open(str(embedding_file), "pt") as handle:
        assert list(handle.keys()) == ["emb_params"]
    pipe = load_pipeline(resolve_model("builtin"))
    pipe.load_textual_inversion(str(embedding_file), token="sks")
    ids = pipe.tokenizer.convert_tokens_to_ids(["sks", "sks_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], trained)
    assert pipe.maybe_convert_prompt("a sks star", pipe.tokenizer) == "a sks sks_1 star"


@pytest.mark.slow(seconds=15)
def test_generate_loads_the_bundled_embedding_and_reproduces_the_sample(sd15_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from studio.generation.engine import AdapterUse, Engine, GenerateRequest
    from tests.method_checks import assert_generate_reproduces_sample

    trainer, adapter = sd15_run[:2]
    assert_generate_reproduces_sample(trainer, adapter, tmp_path, step=STEPS)

    # The same adapter without its bundle: the trigger's embedding is what changes the picture.
    tensors = load_file(str(adapter))
    without = tmp_path / "no-bundle.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("bundle_emb.")}, str(without))
    engine = Engine()

    def draw(*paths, prompt="a sks star on a white background"):
        request = GenerateRequest(prompt=prompt, adapters=[AdapterUse(p) for p in paths], steps=4, seed=1)
        return np.asarray(engine.generate(request)[0], dtype=np.int16)

    base = draw()
    with_bundle = draw(adapter)
    assert np.abs(with_bundle - draw(without)).max() > 8
    assert np.abs(with_bundle - draw(adapter, prompt="a star on a white background")).max() > 8
    # Out of the mix, the embedding is gone without reloading the base model: the base again, bit for bit.
    assert np.array_equal(draw(), base) and "sks" not in engine.pipeline("builtin")[1].tokenizer.get_vocab()
    assert np.array_equal(draw(adapter), with_bundle) and engine.pipeline_loads == 1


@pytest.mark.slow(seconds=10)
def test_resume_restores_the_embedding_exactly(sd15_run):
    """A copy of the run resumed from its mid-run checkpoint ends with the same embedding."""
    import shutil

    from trainers.trainer import AdapterTrainer

    trainer = sd15_run[0]
    copy = trainer.run_dir.with_name(trainer.run_dir.name + "-resumed")
    shutil.copytree(trainer.run_dir, copy)
    assert sorted(p.name for p in (copy / "checkpoints").glob("*.pt")) == [f"step-{STEPS // 2:06d}.pt"]
    torch.manual_seed(1)  # resume must not depend on the global generator
    resumed = AdapterTrainer(copy, show_progress=False)
    resumed.run(resume=True)
    events = [json.loads(line) for line in (copy / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "resume"] == [STEPS // 2]
    for a, b in zip(resumed.pivotal.vectors(), trainer.pivotal.vectors()):
        assert torch.equal(a, b)


@pytest.mark.slow(seconds=25)
def test_sdxl_pivotal_tuning_trains_both_encoders_and_loads(tmp_path, workspace):
    from safetensors.torch import load_file

    from studio.adapters import load_adapter
    from studio.models import load_pipeline, resolve_model
    from tests.method_checks import assert_generate_reproduces_sample
    from tests.tiny_models import SDXL_TE1_HIDDEN, SDXL_TE2_HIDDEN, tiny_sdxl_pipeline

    model_dir = tmp_path / "tiny-sdxl"
    tiny_sdxl_pipeline(seed=0).save_pretrained(model_dir)
    trainer, adapter, start, before = _train(_config(str(model_dir)), workspace)
    trained = trainer.pivotal.vectors()
    assert [v.shape for v in trained] == [(VECTORS, SDXL_TE1_HIDDEN), (VECTORS, SDXL_TE2_HIDDEN)]
    assert all((v - s).norm() > 0.05 * s.norm() for v, s in zip(trained, start))
    assert _fixed_loss(trainer) < before
    tensors = load_file(str(adapter))
    assert torch.equal(tensors["bundle_emb.sks.clip_l"], trained[0]) and torch.equal(tensors["bundle_emb.sks.clip_g"], trained[1])
    assert [v.shape for v in load_adapter(adapter).embeddings["sks"]] == [v.shape for v in trained]

    file = load_file(str(trainer.run_dir / "embeddings" / "sks.safetensors"))
    pipe = load_pipeline(resolve_model(str(model_dir)))
    pipe.load_textual_inversion(file["clip_l"], token="sks", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(file["clip_g"], token="sks", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tokenizer, encoder, vectors in ((pipe.tokenizer, pipe.text_encoder, trained[0]),
                                        (pipe.tokenizer_2, pipe.text_encoder_2, trained[1])):
        ids = tokenizer.convert_tokens_to_ids(["sks", "sks_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], vectors)
    assert_generate_reproduces_sample(trainer, adapter, tmp_path, step=STEPS)


def test_pivotal_needs_a_one_word_trigger_and_a_kohya_layout():
    from studio.errors import StudioError
    from studio.config import parse_config

    config = _config().model_dump()
    config["dataset"]["trigger_word"] = ""
    with pytest.raises(StudioError, match="dataset.trigger_word to one word"):
        parse_config(config)
    config["dataset"]["trigger_word"] = "sks"
    config["network"] = {"type": "tlora", "pivotal_vectors": VECTORS}
    with pytest.raises(StudioError, match="cannot bundle an embedding"):
        parse_config(config)
