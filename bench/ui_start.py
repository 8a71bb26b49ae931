"""Seconds from starting `lora-studio` to a page that answers a click.

    python bench/ui_start.py [--runs 3]

Each run starts `lora-studio ui` on a fresh workspace as a subprocess (the clock starts
here), waits for the page to be served, opens it in headless Chromium (started before the
clock), and clicks the first image of the demo dataset; the clock stops when the caption
editor shows that image's caption (a round trip through the server). Prints the time to
the first HTTP answer, to the loaded page and to the answered click, and the median.
Target: <= 3 s (issue 25). Needs /usr/bin/chromium and the playwright package.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TARGET_S = 3.0
# Both checked on every animation frame: `locator.wait_for` re-checks at growing intervals and
# noticed the loaded page 100-450 ms late here (the page's own clock against Playwright's).
LOADED_JS = ("() => { const s = document.querySelector('#ds-stats'); "
             "return !!s && s.textContent.includes('training image'); }")
CLICK_ANSWERED_JS = ("() => { const t = document.querySelector('#ds-caption textarea'); "
                     "return !!t && t.value.length > 0; }")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(workspace: Path, port: int) -> list[str]:
    exe = shutil.which("lora-studio")
    base = [exe] if exe else [sys.executable, "-m", "studio"]
    return [*base, "ui", "--workspace", str(workspace), "--port", str(port)]


def _stop(proc: subprocess.Popen, workspace: Path) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):  # the detached supervisor this run started
        os.kill(json.loads((workspace / "supervisor.lock").read_text())["pid"], signal.SIGTERM)


def one_run(page, workdir: Path) -> dict[str, float]:
    workspace = workdir / "ws"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(_command(workspace, port), cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lora-studio exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except OSError:
                time.sleep(0.02)
        served = time.perf_counter() - start
        page.goto(url)
        page.wait_for_function(LOADED_JS, polling="raf", timeout=60_000)
        loaded = time.perf_counter() - start
        page.locator("#ds-gallery .thumbnail-item").first.click()
        page.wait_for_function(CLICK_ANSWERED_JS, polling="raf", timeout=60_000)
        clicked = time.perf_counter() - start
    finally:
        _stop(proc, workspace)
    return {"served_s": served, "loaded_s": loaded, "click_answered_s": clicked}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    results = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for index in range(args.runs):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            with tempfile.TemporaryDirectory(prefix="ui-start-") as tmp:
                result = one_run(page, Path(tmp))
            page.close()
            results.append(result)
            print(f"run {index + 1}: served {result['served_s']:.2f} s, page loaded {result['loaded_s']:.2f} s, "
                  f"click answered {result['click_answered_s']:.2f} s", flush=True)
        browser.close()
    median = statistics.median(r["click_answered_s"] for r in results)
    print(f"ui_start: {median:.2f} s from `lora-studio` to a page that answers a click "
          f"(median of {len(results)}, {os.cpu_count()} CPUs; target <= {TARGET_S:.0f} s)")
    return {"click_answered_s": median, "runs": results}


if __name__ == "__main__":
    main()
