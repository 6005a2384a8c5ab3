"""`clt serve` in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright with
`executable_path`, never Playwright's own browser downloads) opens circuit-tracer's viewer on a hand-made graph,
a click on a feature node shows the examples `clt features` wrote, and the page asks nothing of any other host.
Skipped where Playwright, a Chromium or circuit-tracer's frontend is missing."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from viewer_fixtures import SLUG, write_feature_dir, write_graph_dir

from clt_core.errors import ConfigError
from clt_core.viewer import ServeConfig, find_frontend, running

pytestmark = pytest.mark.slow

CLICKED = "1_5_2"  # layer 1, feature 5, position 2: a node of the fixture graph
PINNED = "0_3_1"


def _chromium() -> str:
    for name in (os.environ.get("CLT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    pytest.skip("no Chromium installed (apt-get install chromium), or set CLT_CHROMIUM")


def test_node_click_shows_the_features_examples(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    browser_path = _chromium()
    try:
        frontend = find_frontend()
    except ConfigError as err:
        pytest.skip(str(err))
    graphs = write_graph_dir(tmp_path / "graphs")
    features = write_feature_dir(tmp_path / "features")
    config = ServeConfig(port=0, frontend=str(frontend), features=str(features))
    with running(graphs, config) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, headless=True, args=["--no-proxy-server"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            requests: list[str] = []
            errors: list[str] = []
            page.on("request", lambda r: requests.append(r.url))
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(server.url, wait_until="load")
            page.wait_for_selector(".link-graph text.node", timeout=20_000)
            assert page.locator(".graph-prompt-select option").first.get_attribute("value") == SLUG

            def center(node_id: str) -> tuple[float, float]:
                box = page.evaluate(
                    """id => {
                      const node = d3.selectAll('.link-graph text.node').filter(d => d.nodeId === id).node()
                      const r = node.getBoundingClientRect()
                      return [r.x + r.width / 2, r.y + r.height / 2]
                    }""",
                    node_id,
                )
                return box[0], box[1]

            page.mouse.click(*center(CLICKED))
            examples = page.locator(".feature-example-list")
            examples.get_by_text("zebra1x5").first.wait_for(timeout=20_000)
            assert "Top activations" in examples.inner_text()
            assert page.get_by_text("up1x5").count() >= 1  # the record's top logits
            for pinned in (CLICKED, PINNED):  # pinned nodes make the subgraph, laid out by dagre
                page.keyboard.down("Control")
                page.mouse.click(*center(pinned))
                page.keyboard.up("Control")
            page.locator(".subgraph .supernode-container").nth(1).wait_for(timeout=20_000)
            assert page.locator(".subgraph .supernode-container").count() == 2
            page.locator("button.save-button").click()  # the view state (pins) into the graph file
            page.get_by_text("Saved!").wait_for(timeout=10_000)
            page.screenshot(path=str(tmp_path / "viewer.png"), full_page=True)
        finally:
            browser.close()
    assert requests and all(url.startswith(server.url) for url in requests), requests
    assert any(url.endswith(".json") and "/clt_features/" in url for url in requests)
    assert not errors, errors
    saved = json.loads((graphs / f"{SLUG}.json").read_text())["qParams"]
    assert set(saved["pinnedIds"].split(",")) == {CLICKED, PINNED}
