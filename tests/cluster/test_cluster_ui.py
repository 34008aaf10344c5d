"""The operator page's Nodes panel in a real headless Chromium (Debian's package, driven by
Playwright), served by a real cluster node: every node with its heartbeat, devices and
loaded tiers, and the queues, asserted from the rendered DOM."""

from __future__ import annotations

import shutil

import httpx
import pytest

from tests.cluster.conftest import Cluster
from tests.cluster.test_cluster_jobs import post, wait_status
from tests.helpers import wait_until

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH: `make browser` installs Debian's package"
)


def test_the_nodes_panel_shows_every_node_and_the_queues(shared: Cluster) -> None:
    a, b = shared.nodes["a"], shared.nodes["b"]
    wait_status(a, post(a, "for the queue table"), "succeeded")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1250})
            page.goto(f"{b.url}/ui")
            page.wait_for_selector("#nodes-section:not([hidden])")
            for name in ("a", "b"):
                page.wait_for_selector(f'#nodes tr[data-node="{name}"][data-alive="yes"]')
                row = f'#nodes tr[data-node="{name}"]'
                assert page.inner_text(f"{row} .heartbeat").startswith("alive")
                assert page.inner_text(f"{row} .devices").startswith("cpu: ")
                assert " MB of " in page.inner_text(f"{row} .devices")
                assert "image" in page.inner_text(f"{row} .kinds")
            assert page.inner_text('#nodes tr[data-node="a"] .tiers') == "fast"
            assert page.inner_text('#nodes tr[data-node="b"] .tiers') == "–"
            assert "(this node)" in page.inner_text('#nodes tr[data-node="b"]')
            assert page.inner_text("#cluster-db") == "database ok"
            image = '#queues tr[data-queue="edison.image"]'
            page.wait_for_selector(image)
            assert page.inner_text(f"{image} .queued") == "0"
            assert int(page.inner_text(f"{image} .attempts")) >= 1
        finally:
            browser.close()


def test_one_host_shows_no_nodes_panel(live_server, make_settings) -> None:  # noqa: ANN001
    from app.main import create_app

    server = live_server(create_app(make_settings()))
    wait_until(lambda: httpx.get(f"{server.url}/ready").status_code == 200, timeout=60)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            with page.expect_response(lambda r: r.url.endswith("/system/cluster")) as asked:
                page.goto(f"{server.url}/ui")
            assert asked.value.status == 404  # no cluster here: the panel stays hidden
            page.wait_for_selector("#live.on")
            assert page.locator("#nodes-section").is_hidden()
            assert page.locator("#tiers").is_visible()
        finally:
            browser.close()
