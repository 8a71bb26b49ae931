"""Concurrency through a real server: eight generate calls with different adapter mixes at
once; each image equals, pixel for pixel, the same request made alone afterwards; every
image is kept on disk; the server keeps answering."""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import demo_config
from tests.live_server import Api, running_server

pytestmark = pytest.mark.slow

A, B = "ink_a", "ink_b"
STEPS = 3

# (prompt, [(adapter row, weight), ...], seed, sampler, images)
MIXES = [
    ("a sks star", [], 7, "ddim", 1),
    ("a sks star", [(A, 1.0)], 7, "ddim", 1),
    ("a sks star", [(B, 1.0)], 7, "ddim", 1),
    ("a sks star", [(A, 0.5), (B, -0.7)], 7, "ddim", 1),
    (f"a sks star <lora:{A}:0.8>", [], 7, "ddim", 1),
    (f"a sks star <lora:{A}:1> on black", [(B, 0.3)], 8, "euler", 1),
    ("a sks star", [], 8, "euler_a", 1),
    (f"<lora:{B}:-1> a sks star", [], 7, "dpmpp_2m_karras", 2),
]


def _train_adapters(workspace) -> None:
    """Two small, different adapters, trained for real (different seeds and learning rates)."""
    from studio.jobs.runs import create_run
    from studio.workspace import Workspace
    from trainers.trainer import AdapterTrainer

    ws = Workspace.open(workspace)
    for name, seed, lr in ((A, 1, 2e-3), (B, 2, 5e-3)):
        config = demo_config(max_steps=20)
        config.name, config.seed, config.training.learning_rate = name, seed, lr
        config.sampling.prompts = []
        config.training.num_threads = 1
        path = AdapterTrainer(create_run(config, ws), show_progress=False).run()
        assert path.name == f"{name}.safetensors"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("concurrency") / "ws"
    with running_server(workspace, meanwhile=lambda: _train_adapters(workspace)) as live:
        yield live


def _values(mix) -> dict:
    prompt, rows, seed, sampler, count = mix
    values = {"gen-prompt": prompt, "gen-steps": STEPS, "gen-seed": seed, "gen-scheduler": sampler,
              "gen-count": count}
    for index, (name, weight) in enumerate(rows, start=1):
        values[f"gen-adapter-{index}"] = name
        values[f"gen-weight-{index}"] = weight
    return values


def _generate(api: Api, mix) -> list[tuple[str, np.ndarray]]:
    result = api.call("generate", _values(mix))
    assert result.error is None and not result.warnings, (mix, result)
    images = []
    for item in result.output[0]:
        response = api.http.get(item["image"]["url"])
        assert response.status_code == 200, item
        images.append((item["image"]["path"], np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))))
    return images


def test_concurrent_generations_equal_solo_ones(server):
    api = Api(server.url)
    with ThreadPoolExecutor(len(MIXES)) as pool:
        together = list(pool.map(lambda mix: _generate(api, mix), MIXES))
    alone = [_generate(api, mix) for mix in MIXES]

    for mix, got, want in zip(MIXES, together, alone):
        assert len(got) == len(want) == mix[4]
        for (_, image), (_, reference) in zip(got, want):
            assert image.shape == reference.shape
            assert np.array_equal(image, reference), f"{mix}: differs from the same request made alone"

    base, with_a, with_b = (alone[i][0][1] for i in range(3))
    # the adapters change the picture: a mix applied to the wrong request would be caught
    assert not np.array_equal(base, with_a) and not np.array_equal(base, with_b)
    assert not np.array_equal(with_a, with_b)

    # nothing lost: every image has its own file in outputs/, none replaced another
    paths = [path for images in together + alone for path, _ in images]
    assert len(set(paths)) == len(paths) == 2 * sum(m[4] for m in MIXES)
    on_disk = sorted(p for p in (server.workspace / "outputs").rglob("*.png"))
    assert len(on_disk) == len(paths)
    assert not list((server.workspace / "outputs").rglob("*.tmp"))

    # the server keeps answering
    assert server.alive()
    assert httpx.get(server.url + "/", timeout=10).status_code == 200
    assert _generate(api, MIXES[1])[0][1].shape == base.shape


def test_a_request_does_not_depend_on_the_one_before():
    """In process: Euler after DPM++ Karras is Euler (the Karras sigmas used to stay on)."""
    from studio.generation.engine import Engine, GenerateRequest

    def image(engine, scheduler):
        request = GenerateRequest("a sks star", seed=3, steps=3, scheduler=scheduler)
        return np.asarray(engine.generate(request)[0])

    fresh = image(Engine(), "euler")
    engine = Engine()
    image(engine, "dpmpp_2m_karras")
    assert np.array_equal(image(engine, "euler"), fresh)


def test_same_name_images_never_replace_each_other(tmp_path):
    from studio.generation.engine import save_new_png

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    paths = [save_new_png(red, tmp_path, "120000-7"), save_new_png(blue, tmp_path, "120000-7")]
    assert [p.name for p in paths] == ["120000-7.png", "120000-7-2.png"]
    assert Image.open(paths[0]).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(paths[1]).getpixel((0, 0)) == (0, 0, 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["120000-7-2.png", "120000-7.png"]  # no temp files left
