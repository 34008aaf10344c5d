"""The operator page in a real headless Chromium (Debian's package, driven by Playwright):
what a person sees is asserted from the rendered DOM, not from the JSON behind it."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.main import create_app
from tests.helpers import wait_until

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's package"
)
# Set to a path to keep the screenshot taken during a generation (docs/ui.png is one).
SCREENSHOT = os.environ.get("EDISON_UI_SCREENSHOT")


@pytest.fixture
def page_settings(make_settings, tiny_dir, tiny_pipelines):
    """The demo config's shape: fast and medium loaded at start, a tiny image pipeline."""

    def build(**extra: Any):
        return make_settings(
            models={
                "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256},
                "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256},
                "deep": {"path": str(tiny_dir / "deep.gguf"), "n_ctx": 256, "preload": False},
                "n_threads": 1,
            },
            generation={
                "image": {
                    "pipeline": str(tiny_pipelines["image"]),
                    "required_ram_mb": 64,
                    "default_steps": 4,
                }
            },
            **extra,
        )

    return build


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def tier_state(page: Any, tier: str) -> str:
    return page.inner_text(f'#tiers tr[data-tier="{tier}"] .state')


def test_the_page_shows_memory_models_a_running_job_and_unloads(
    page_settings, live_server, browser, step_gate, tmp_path: Path
) -> None:
    server = live_server(create_app(page_settings()))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    page = browser.new_page(viewport={"width": 1400, "height": 1250})
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#live.on")  # the event stream is connected
    assert tier_state(page, "fast").startswith("loaded")
    assert tier_state(page, "medium").startswith("loaded")
    assert tier_state(page, "deep").startswith("unloaded")
    assert page.inner_text("#heavy-slot") == "medium"
    assert "RAM" in page.inner_text("#device")  # no GPU here: the RAM view
    for tier in ("fast", "medium"):  # each loaded model is a segment of the memory bar
        segment = page.locator(f'#bars .segment[data-kind="model"][data-name="{tier}"]')
        held = server.app.state.models.tiers[tier].model.reservation.mb
        assert float(segment.get_attribute("data-mb")) == pytest.approx(held, abs=0.1)
        item = page.inner_text(f'#bars li[data-kind="model"][data-name="{tier}"]')
        assert item.startswith(f"{tier} ")

    # A generation, held at its first step: it shows as running, with its progress.
    threading.Thread(
        target=httpx.post,
        args=(f"{server.url}/generate-image",),
        kwargs={"json": {"prompt": "a lighthouse", "width": 64, "height": 64}, "timeout": 120},
        daemon=True,
    ).start()
    step_gate.wait_held()
    running = page.wait_for_selector('#jobs tr[data-status="running"]')
    assert running.inner_text().startswith("running")
    page.wait_for_selector('#bars .segment[data-kind="task"]')  # its reservation
    page.wait_for_function("document.querySelector('#gate-state').textContent === 'busy'")
    shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    step_gate.release()
    done = page.wait_for_selector('#jobs tr[data-status="succeeded"]')
    assert "image 64x64" in done.inner_text()
    assert page.inner_text('#pipelines tr[data-kind="image"]').startswith("image")
    assert "enough memory" in page.inner_text("#decisions")

    # The operator unloads medium from the page.
    page.click('button[data-action="unload"][data-tier="medium"]')
    page.wait_for_function(
        """document.querySelector('#tiers tr[data-tier="medium"] .state')
             .textContent.startsWith('unloaded')"""
    )
    assert server.app.state.models.tiers["medium"].model is None
    assert page.inner_text("#heavy-slot") == "empty"


def test_the_page_asks_for_the_api_key_and_keeps_it_out_of_urls(
    page_settings, live_server, browser
) -> None:
    key = "correct-horse-battery"
    server = live_server(create_app(page_settings(server={"api_key": key})))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    page = browser.new_page()
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#keyform:not([hidden])")
    assert page.is_hidden("#main")
    page.fill("#key", "wrong-key-here")
    page.click("#keyform button")
    page.wait_for_function("document.querySelector('#keyerror').textContent.includes('refused')")
    page.fill("#key", key)
    page.click("#keyform button")
    page.wait_for_selector("#live.on")
    assert tier_state(page, "fast").startswith("loaded")
    assert all(key not in u for u in urls)
    assert page.evaluate("sessionStorage.getItem('edison-api-key')") == key


def test_the_page_works_with_no_models_configured(make_settings, live_server, browser) -> None:
    server = live_server(create_app(make_settings()))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    page = browser.new_page()
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#live.on")
    assert page.locator("#tiers tbody tr").count() == 0
    assert page.inner_text("#heavy-slot") == "empty"
    assert page.locator('#bars .segment[data-kind="usable"]').count() == 1
    assert page.is_visible("#no-jobs") and page.is_visible("#no-pipelines")


def test_the_page_shows_a_bar_line_and_heavy_slot_per_device(
    make_settings, tiny_dir, live_server, browser
) -> None:
    """Two GPUs that report given figures (a fake probe; two cards cannot exist here):
    one bar per card, each with its own line and heavy slot."""
    from tests.helpers import FakeGpuProbe

    settings = make_settings(
        memory={"devices": "auto", "reserve_vram_mb": 1024},
        models={
            "fast": {"path": str(tiny_dir / "fast.gguf"), "n_ctx": 256, "device": 0},
            "medium": {"path": str(tiny_dir / "medium.gguf"), "n_ctx": 256, "device": 1},
            "n_threads": 1,
        },
    )
    server = live_server(create_app(settings, probe=FakeGpuProbe(total_mb=24_576, gpus=2)))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    page = browser.new_page(viewport={"width": 1400, "height": 1250})
    page.goto(f"{server.url}/ui")
    page.wait_for_selector("#live.on")
    assert "2 devices: cuda:0, cuda:1" in page.inner_text("#device")
    assert page.locator("#bars .bar").count() == 2
    assert page.locator('#bars .segment[data-kind="usable"]').count() == 2
    second = page.inner_text('#bars .barlabel[data-device="cuda:1"]')
    assert "line idle, 0 waiting" in second and "heavy slot medium" in second
    assert "heavy slot empty" in page.inner_text('#bars .barlabel[data-device="cuda:0"]')
    # Each card's bar holds its own model.
    bars = page.locator("#bars .bar")
    assert bars.nth(0).locator('.segment[data-name="fast"]').count() == 1
    assert bars.nth(1).locator('.segment[data-name="medium"]').count() == 1
    assert bars.nth(0).locator('.segment[data-name="medium"]').count() == 0
