"""The real page in headless Chromium against a real server (`python -m studio ui`):
datasets -> caption -> train -> watch -> generate with two adapters -> export.

Screenshots of every tab land in test-artifacts/. Needs /usr/bin/chromium and the
`playwright` package (never `playwright install`: the system Chromium is used).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from tests.live_server import running_server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("needs /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (pip install playwright)")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TRAIN_STEPS = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("browser") / "ws"
    with running_server(workspace) as live:
        try:
            yield {"url": live.url + "/", "workspace": workspace, "proc": live.proc, "log": live.log}
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                (ARTIFACTS / "server.log").write_bytes(live.log.read_bytes())


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request):
    failed_before = request.session.testsfailed
    yield
    live = request.node.funcargs.get("page")
    if live is not None and request.session.testsfailed > failed_before:
        with contextlib.suppress(Exception):
            live.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)


@pytest.fixture(scope="module")
def page(server):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(90_000)  # a loaded 2-core CI machine
        page.goto(server["url"])
        page.locator("#ds-stats", has_text="training image").wait_for()  # the page's load event is done
        yield page
        browser.close()


# ------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def browser_page(playwright, server, name: str, console: list[str], kinds=("error",), **context):
    """A Chromium page at 1400x1000 waiting up to 90 s (a loaded 2-core CI machine), its
    console messages of `kinds` ("type: text") and page errors appended to `console`; on a
    failure, a screenshot and the server's log land in test-artifacts/ (FAILED-<name>.png,
    <name>-server.log)."""
    ARTIFACTS.mkdir(exist_ok=True)
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
    try:
        page = browser.new_context(viewport={"width": 1400, "height": 1000}, **context).new_page()
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in kinds else None)
        page.on("pageerror", lambda error: console.append(str(error)))
        page.set_default_timeout(90_000)
        try:
            yield page
        except Exception:
            with contextlib.suppress(Exception):
                page.screenshot(path=str(ARTIFACTS / f"FAILED-{name}.png"), full_page=True)
                (ARTIFACTS / f"{name}-server.log").write_text(server.log_text())
            raise
    finally:
        browser.close()


def tab(page, label: str) -> None:
    page.get_by_role("tab", name=label).click()


def field(page, elem_id: str):
    """The text input or textarea of a Gradio Textbox / Number."""
    return page.locator(f"#{elem_id}").locator("textarea, input:not([type=range])").first


def set_value(page, elem_id: str, value) -> None:
    box = field(page, elem_id)
    box.fill(str(value))
    box.press("Tab")


def pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in a Gradio dropdown as a person does: open it, click the option."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def wait_value(page, elem_id: str, text: str, *, exact: bool = True, timeout: float = 90_000) -> None:
    """Wait until the input of component `elem_id` holds `text` (or contains it)."""
    page.wait_for_function(
        """([id, text, exact]) => {
            const box = document.querySelector(`#${id} textarea, #${id} input:not([type=range])`);
            return !!box && (exact ? box.value === text : box.value.includes(text));
        }""", arg=[elem_id, text, exact], timeout=timeout)


def expect_toast(page, text: str, timeout: float = 90_000) -> None:
    page.locator(".toast-body", has_text=text).first.wait_for(timeout=timeout)


def close_toasts(page) -> None:
    for button in page.locator(".toast-close").all():
        with contextlib.suppress(Exception):
            button.click(timeout=1000)


def shot(page, name: str) -> None:
    page.wait_for_timeout(300)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def make_images(folder: Path) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, color in enumerate(["#d33", "#3a3", "#33d"]):
        image = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(image).rectangle([16, 16, 48, 48], fill=color)
        path = folder / f"square_{i}.png"
        image.save(path)
        paths.append(path)
    (folder / "square_0.txt").write_text("a square, red")
    return paths


# ------------------------------------------------------------------------ tests
def test_errors_are_clear_and_the_server_keeps_serving(page, server, tmp_path):
    tab(page, "5 · Library")
    junk = tmp_path / "broken.safetensors"
    junk.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json")
    page.locator("#lib-upload input[type=file]").set_input_files(str(junk))
    page.locator("#lib-upload", has_text="broken").wait_for()
    page.locator("#lib-import").click()
    expect_toast(page, "not a valid safetensors file")
    assert "Traceback" not in page.content()
    assert page.locator("#lib-upload", has_text="Error").count() == 0  # the page is not left in an error state
    page.locator("#lib-upload button[aria-label=Clear]").click()
    page.locator("#lib-upload input[type=file]").wait_for(state="attached")
    close_toasts(page)

    tab(page, "2 · Train")
    set_value(page, "train-training-learning-rate", 0)
    page.locator("#train-check").click()
    expect_toast(page, "Learning rate: Input should be greater than 0")  # the label the page shows
    set_value(page, "train-training-learning-rate", 0.001)
    close_toasts(page)
    assert server["proc"].poll() is None


def test_dataset_train_generate_export(page, server, tmp_path):
    workspace: Path = server["workspace"]

    # --- Datasets: upload images into a new dataset, edit a caption
    tab(page, "1 · Datasets")
    page.get_by_text("+ New dataset / add images").click()
    set_value(page, "ds-new-name", "squares")
    images = make_images(tmp_path / "upload")
    page.locator("#ds-upload input[type=file]").set_input_files([str(p) for p in images]
                                                                + [str(tmp_path / "upload" / "square_0.txt")])
    page.locator("#ds-upload", has_text="square_2").wait_for()
    page.locator("#ds-import").click()
    expect_toast(page, "Imported 3 images")
    gallery = page.locator("#ds-gallery")
    page.locator("#ds-gallery", has_text="square_2.png").wait_for()
    assert gallery.locator("img").count() == 3
    gallery.locator("button.thumbnail-item, .thumbnail-item").first.click()
    caption = field(page, "ds-caption")
    wait_value(page, "ds-caption", "red", exact=False)
    caption.fill("sks, a square, red, bold")
    page.locator("#ds-save-caption").click()
    expect_toast(page, "Saved the caption")
    assert (workspace / "datasets" / "squares" / "square_0.txt").read_text() == "sks, a square, red, bold"
    page.locator("#ds-tags", has_text="bold").wait_for()
    # auto-caption the two pictures without a caption with the built-in toy captioner
    page.get_by_text("Auto-caption with a model").click()
    page.locator("#ds-caption-run").click()
    expect_toast(page, "2 caption file(s) written")
    page.locator("#ds-cap-note", has_text="left as they were").wait_for()
    assert (workspace / "datasets" / "squares" / "square_2.txt").read_text() == "a blue square on a white background"
    assert (workspace / "datasets" / "squares" / "square_0.txt").read_text() == "sks, a square, red, bold"
    page.locator("#ds-tags", has_text="a green square on a white background").wait_for()
    # checked again: no missing caption now
    page.locator("#ds-issues-note").filter(has_text="3 usable").filter(has_not_text="missing").wait_for()
    shot(page, "1-datasets")
    close_toasts(page)

    # --- Train: the demo preset on the demo dataset, shortened
    tab(page, "2 · Train")
    page.locator("#train-hint", has_text="Time:").wait_for()
    set_value(page, "train-name", "star")
    set_value(page, "train-training-max-steps", TRAIN_STEPS)
    set_value(page, "train-sampling-prompts", "a sks star on a white background")
    page.get_by_text("All settings", exact=True).click()
    page.get_by_text("Sample images", exact=True).click()
    set_value(page, "train-sampling-steps", 4)
    page.locator("#train-hint", has_text=f"for {TRAIN_STEPS} steps").wait_for()
    shot(page, "2-train")
    page.locator("#train-launch").click()
    expect_toast(page, "Queued star-")
    close_toasts(page)

    # --- Runs: watch it reach done; loss chart and a sample appear
    status = page.locator("#runs-status")
    status.locator(".run-name", has_text="star-").wait_for()
    status.locator(".badge").filter(has_text=re.compile("finished|failed|cancelled")).wait_for(timeout=240_000)
    assert "finished" in status.locator(".badge").inner_text(), status.inner_text()
    page.locator("#runs-samples img").first.wait_for()
    page.locator("#runs-loss canvas, #runs-loss svg").first.wait_for()
    assert f"{TRAIN_STEPS} / {TRAIN_STEPS}" in status.inner_text()
    assert "finished" in field(page, "runs-log").input_value()
    adapter = workspace / "adapters" / "star.safetensors"
    assert adapter.is_file()
    shot(page, "3-runs")

    # --- Open in Generate puts the adapter in the first row
    page.locator("#runs-open").click()
    wait_value(page, "gen-adapter-1", "star")

    # --- Library: import the same file as a second adapter, use it in Generate
    tab(page, "5 · Library")
    page.locator("#lib-table", has_text="star").wait_for()
    page.locator("#lib-upload input[type=file]").set_input_files(str(adapter))
    page.locator("#lib-upload", has_text="star").wait_for()
    set_value(page, "lib-new-name", "star-copy")
    page.locator("#lib-import").click()
    expect_toast(page, "as 'star-copy'")
    page.locator("#lib-details", has_text="star-copy").wait_for()
    page.locator("#lib-thumb img").wait_for()  # the run's last sample
    shot(page, "5-library")
    close_toasts(page)
    page.locator("#lib-use").click()
    wait_value(page, "gen-adapter-2", "star-copy")

    # --- Generate with both adapters
    set_value(page, "gen-weight-2", 0.5)
    set_value(page, "gen-steps", 4)
    set_value(page, "gen-seed", 7)
    page.locator("#gen-go").click()
    page.locator("#gen-results img").first.wait_for(timeout=120_000)
    info = page.locator("#gen-info")
    info.get_by_text("Saved 1 image").wait_for()
    text = info.inner_text()
    assert "<lora:star:1>" in text and "<lora:star-copy:0.5>" in text, text
    outputs = list((workspace / "outputs").rglob("*.png"))
    assert len(outputs) == 1
    from PIL import Image

    with Image.open(outputs[0]) as image:
        assert "Seed: 7" in image.info["parameters"]
    shot(page, "4-generate")

    # --- Export (download) the adapter from the Library
    tab(page, "5 · Library")
    page.locator("#lib-table", has_text="star-copy").wait_for()
    page.locator("#lib-table").get_by_text("star", exact=True).first.click()
    page.locator("#lib-details h3", has_text=re.compile(r"^\s*star\s*$")).wait_for()
    with page.expect_download() as download_info:
        page.locator("#lib-export").click()
    download = download_info.value
    target = ARTIFACTS / "exported-star.safetensors"
    download.save_as(target)
    assert target.read_bytes() == adapter.read_bytes()
    assert server["proc"].poll() is None


def test_the_network_section_shows_the_chosen_methods_options(page):
    """The preset's LoCon shows conv_rank, not lokr_factor; LoKr the other way round; what
    was typed in either is there again when its method is; the empty optional boxes that
    were hidden and shown stay empty (the settings check passes)."""
    tab(page, "2 · Train")
    network = page.get_by_text("Network (adapter method)", exact=True)
    if not network.is_visible():  # "All settings" is closed
        page.locator("#train-all-settings").get_by_text("All settings").first.click()
    network.click()
    conv, lokr = page.locator("#train-network-conv-rank"), page.locator("#train-network-lokr-factor")
    conv.wait_for(state="visible")
    lokr.wait_for(state="hidden")
    set_value(page, "train-network-conv-rank", 3)
    pick(page, "train-network-type", "lokr")
    lokr.wait_for(state="visible")
    conv.wait_for(state="hidden")
    set_value(page, "train-network-lokr-factor", 4)
    pick(page, "train-network-type", "locon")
    conv.wait_for(state="visible")
    wait_value(page, "train-network-conv-rank", "3")
    pick(page, "train-network-type", "lokr")
    wait_value(page, "train-network-lokr-factor", "4")
    pick(page, "train-network-type", "locon")
    page.locator("#train-check").click()
    expect_toast(page, "Settings are valid", timeout=120_000)
    shot(page, "train-network-options")
    close_toasts(page)
    pick(page, "train-preset", "tiny-demo-quick")  # the preset's settings again


def test_generate_offers_builtin_flux_with_its_sampler_and_blocks(page):
    """Picking builtin-flux in the Generate tab offers its family's sampler (Euler) and LBW
    presets (DOUBLE); the SD 1.5 adapters still picked from the walk above are refused in one
    line; without them it draws a picture; picking builtin offers SD 1.5's again."""
    tab(page, "4 · Generate")
    pick(page, "gen-model", "builtin-flux")
    wait_value(page, "gen-scheduler", "Euler")
    page.locator("#gen-blocks-1 input").click()
    page.get_by_role("option", name="DOUBLE", exact=True).wait_for()
    page.keyboard.press("Escape")
    set_value(page, "gen-steps", 2)
    if field(page, "gen-adapter-1").input_value():
        page.locator("#gen-go").click()
        expect_toast(page, "trained on SD 1.5 but the base model is FLUX.1", timeout=120_000)
        close_toasts(page)
        for row in (1, 2):
            page.locator(f"#gen-adapter-{row} input").click()
            page.get_by_role("option").first.click()  # the empty choice
            wait_value(page, f"gen-adapter-{row}", "")
    page.locator("#gen-go").click()
    info = page.locator("#gen-info")
    info.get_by_text("Model: builtin-flux").wait_for(timeout=120_000)
    assert "Sampler: Euler" in info.inner_text()
    pick(page, "gen-model", "builtin")
    page.locator("#gen-blocks-1", has_text="SD 1.5").wait_for()
    wait_value(page, "gen-scheduler", "Euler")  # SD 1.5 has an Euler too: the pick stays
    pick(page, "gen-scheduler", "DDIM")
