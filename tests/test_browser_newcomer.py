"""A newcomer's first session in headless Chromium, on the built-in model, in short steps:
import a folder, fix a caption, check and start two tiny runs, watch them finish in Runs,
generate with an adapter at 1 and at 0, blend two, make a grid, export from the Library.
It asserts what the person sees, and that the browser console stays free of errors.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.live_server import running_server
from tests.test_browser import (ARTIFACTS, browser_page, clipped, close_toasts, expect_toast, field,
                                make_images, pick, set_value, shot, tab, wait_value)

sync_api = pytest.importorskip("playwright.sync_api")

STEPS = 4          # training steps per run: what is tested is the path, not what it learns
SAMPLE_STEPS = 2
GEN = {"gen-steps": 3, "gen-seed": 11}


def result_image(page) -> bytes:
    """The picture Generate shows (the file it saved), once it is shown."""
    image = page.locator("#gen-results img").first
    image.wait_for()
    return page.request.get(image.get_attribute("src")).body()


def generate(page, previous: str | None) -> str:
    """Press Generate; returns the note under the results once it names a new picture.
    (While a request runs Gradio shows a timer over the old note, so "differs from the
    previous text" alone would catch the old note.)"""
    page.locator("#gen-go").click()
    info = page.locator("#gen-info")
    page.wait_for_function(
        """([prev]) => {
            const t = document.querySelector('#gen-info').innerText;
            const saved = (text) => (text || '').match(/[0-9-]+\.png/g)?.join() ?? null;
            return t.includes('Saved 1 image') && !/^\s*[0-9.]+s\b/.test(t) && saved(t) !== saved(prev);
        }""", arg=[previous], timeout=120_000)
    return info.inner_text()


@pytest.mark.browser
@pytest.mark.slow(seconds=190)
def test_a_newcomers_first_session(tmp_path):
    workspace = tmp_path / "ws"
    console_errors: list[str] = []
    with running_server(workspace) as server, sync_api.sync_playwright() as p:
        with browser_page(p, server, "newcomer", console_errors, accept_downloads=True) as page:
            _walk(page, server, workspace, tmp_path)
        assert console_errors == [], console_errors
        assert server.alive() and "Traceback" not in server.log_text()


def _walk(page, server, workspace: Path, tmp_path: Path) -> None:
    page.goto(server.url + "/")
    page.locator("#ds-stats", has_text="training image").wait_for()
    # the demo dataset: its pictures first, no false alarms about their (right) size
    assert "[class image]" not in page.locator("#ds-gallery .caption-label").first.inner_text()
    page.locator("#ds-stats", has_text="no problems found").wait_for()

    # --- Datasets: import a folder, fix a caption
    folder = tmp_path / "my-squares"
    make_images(folder)
    page.get_by_text("+ New dataset / add images").click()
    set_value(page, "ds-new-name", "squares")
    set_value(page, "ds-folder", folder)
    page.locator("#ds-import").click()
    expect_toast(page, "Imported 3 images")
    gallery = page.locator("#ds-gallery")
    gallery.locator("img").nth(2).wait_for()
    gallery.locator(".thumbnail-item").first.click()
    wait_value(page, "ds-caption", "a square, red")
    field(page, "ds-caption").fill("sks, a square, red")
    page.locator("#ds-save-caption").click()
    expect_toast(page, "Saved the caption")
    assert (workspace / "datasets" / "squares" / "square_0.txt").read_text() == "sks, a square, red"
    shot(page, "newcomer-1-datasets")
    close_toasts(page)

    # --- Train: the new dataset names the adapter; the time is measured here; check, start
    tab(page, "2 · Train")
    pick(page, "train-dataset", "squares")
    wait_value(page, "train-name", "squares")
    set_value(page, "train-training-max-steps", STEPS)
    set_value(page, "train-sampling-prompts", "a sks square")
    page.get_by_text("All settings", exact=True).click()
    page.get_by_text("Sample images", exact=True).click()
    set_value(page, "train-sampling-steps", SAMPLE_STEPS)
    hint = page.locator("#train-hint", has_text=f"for {STEPS} steps on this machine")
    hint.wait_for(timeout=120_000)
    assert "measured on this machine" in hint.inner_text()
    page.locator("#train-check").click()
    expect_toast(page, "Settings are valid")
    page.locator("#train-launch").click()
    expect_toast(page, "Queued squares-")
    close_toasts(page)
    # a second, different adapter to blend with: the same pictures, another seed
    tab(page, "2 · Train")
    set_value(page, "train-name", "squares-b")
    page.get_by_text("General", exact=True).click()
    set_value(page, "train-seed", 7)
    page.locator("#train-launch").click()
    expect_toast(page, "Queued squares-b-")
    close_toasts(page)

    # --- Runs: both finish; a row click shows that run at once; the log's newest line is first
    status = page.locator("#runs-status")
    status.locator(".run-name", has_text="squares-b-").wait_for()
    status.locator(".badge", has_text="finished").wait_for(timeout=180_000)
    table = page.locator("#runs-table")
    table.get_by_text("done").nth(1).wait_for(timeout=180_000)
    first_run = table.get_by_text(re.compile(r"^squares-\d")).first
    first_run.click()
    status.locator(".run-name", has_text=re.compile(r"^squares-\d")).wait_for()
    status.locator(".badge", has_text="finished").wait_for()
    assert f"{STEPS} / {STEPS}" in status.inner_text()
    page.wait_for_function("() => document.querySelector('#runs-log textarea').value.split('\\n')[0]"
                           ".includes('done')")
    assert (workspace / "adapters" / "squares.safetensors").is_file()
    assert (workspace / "adapters" / "squares-b.safetensors").is_file()
    shot(page, "newcomer-2-runs")

    # --- Generate: the adapter at 1, then at 0 (a different picture: the base model's)
    page.locator("#runs-open").click()
    wait_value(page, "gen-adapter-1", "squares")
    for elem_id, value in GEN.items():
        set_value(page, elem_id, value)
    note = generate(page, None)
    assert "<lora:squares:1>" in note, note
    with_adapter = result_image(page)
    shown = page.locator("#gen-results img").first
    # the 64-px picture is drawn pixel for pixel and is not cut off at the bottom
    page.wait_for_function("() => document.querySelector('#gen-results img').classList.contains('pixel-exact')"
                           " && getComputedStyle(document.querySelector('#gen-results img')).imageRendering"
                           " === 'pixelated'")
    box, frame = shown.bounding_box(), page.locator("#gen-results").bounding_box()
    assert box["y"] + box["height"] <= frame["y"] + frame["height"] + 1
    set_value(page, "gen-weight-1", 0)
    note = generate(page, note)
    assert "<lora:" not in note.split("Steps:")[0], note
    assert result_image(page) != with_adapter

    # --- Blend two adapters
    set_value(page, "gen-weight-1", 1)
    pick(page, "gen-adapter-2", "squares-b")
    set_value(page, "gen-weight-2", 0.5)
    note = generate(page, note)
    assert "<lora:squares:1>" in note and "<lora:squares-b:0.5>" in note, note
    shot(page, "newcomer-3-generate")

    # --- Mix grid: adapter 1's weight from column to column, the seed from row to row
    page.get_by_text("Mix grid", exact=False).first.click()
    pick(page, "gen-grid-y", "Seed")
    set_value(page, "gen-grid-y-values", "1, 2, 3")
    page.locator("#gen-grid-go").click()
    page.locator("#gen-grid-sheet img").wait_for(timeout=120_000)
    page.locator("#gen-grid-info", has_text="Saved the grid").wait_for()
    grids = [p for p in (workspace / "outputs").rglob("grid-*.png") if re.fullmatch(r"grid-\d+\.png", p.name)]
    assert len(grids) == 1 and len(list(grids[0].parent.glob(f"{grids[0].stem}-*.png"))) == 9
    # the single images lie as in the grid (3 columns), the ninth whole (the gallery grows), and
    # their captions ("squares: 0.5 · seed 2") are whole under them
    images = page.locator("#gen-grid-cells img")
    images.nth(8).wait_for()
    first, fourth, ninth = (images.nth(i).bounding_box() for i in (0, 3, 8))
    cells = page.locator("#gen-grid-cells").bounding_box()
    assert fourth["x"] == first["x"] and ninth["x"] > first["x"], (first, fourth, ninth)
    assert ninth["height"] > 20 and ninth["y"] + ninth["height"] <= cells["y"] + cells["height"] + 1, (ninth, cells)
    assert clipped(page, "#gen-grid-cells .caption-label") == []
    shot(page, "newcomer-4-grid")

    # --- Library: export the adapter
    tab(page, "5 · Library")
    page.locator("#lib-table").get_by_text("squares", exact=True).first.click()
    page.locator("#lib-details h3", has_text=re.compile(r"^\s*squares\s*$")).wait_for()
    with page.expect_download() as download_info:
        page.locator("#lib-export").click()
    target = ARTIFACTS / "newcomer-exported.safetensors"
    download_info.value.save_as(target)
    assert target.read_bytes() == (workspace / "adapters" / "squares.safetensors").read_bytes()
