"""The page at / in a real headless browser: Playwright for Python driving Debian's chromium
(``executable_path``; a browser download cannot work here), against the real served app. Skipped,
with the reason, where chromium or Playwright is missing; CI installs both (.ci/run)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from index.build.build import build_memory
from index.ingest.job import embed_collection
from index.serve.client import Client

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "page-token"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo
LOAD = """
import json, time
from index.serve.client import Client
with Client({base!r}) as client:
    while True:
        started = time.time()
        answer = client.search(images=[{image!r}], k=10)
        print(json.dumps([started, [n.id for n in answer.results[0].neighbours]]), flush=True)
"""
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright)")


def png(colour, size=16, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    from ray import serve

    from index.serve import start
    from tests.conftest import free_port
    root = tmp_path_factory.mktemp("page")
    for label, colour in COLOURS.items():
        (root / "images" / label).mkdir(parents=True)
        for n in range(8):
            (root / "images" / label / f"{n}.png").write_bytes(png(colour, seed=n))
    embed_collection(str(root / "images"), "raw-pixels:4", str(root / "emb"), partition_size=12)
    build_memory(str(root / "emb"), str(root / "mem"), shards=2)
    for name, colour in (("query", COLOURS["red"]), ("purple", (150, 20, 160))):
        (root / f"{name}.png").write_bytes(png(colour, seed=99))
    port = free_port()
    serve.shutdown()                       # Serve keeps the port it first started on: start it afresh on ours
    start(str(root / "mem"), host="127.0.0.1", port=port, name="vismem-page",
          token_digest=hashlib.sha256(TOKEN.encode()).hexdigest())
    yield f"http://127.0.0.1:{port}", root
    serve.shutdown()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served):
    base, _ = served
    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())          # "remove every item labelled ...?"
    page.goto(f"{base}/")
    sync_api.expect(page.locator("#info")).to_contain_text("version")
    yield page
    page.close()


def status(page) -> str:
    page.wait_for_function("() => !['', 'searching…', 'editing…'].includes(document.getElementById('status').textContent)")
    return page.locator("#status").text_content()


def test_an_uploaded_image_shows_its_neighbours_decisions_and_thumbnails(page, served):
    base, root = served
    page.set_input_files("#file", str(root / "query.png"))
    cards = page.locator("#grid .card")
    sync_api.expect(cards).to_have_count(10)
    assert "10 neighbours" in status(page)
    assert cards.first.locator(".label").text_content() == "red"
    assert page.locator("#decision").text_content() == "decision (plurality): red"
    rows = page.locator("#rules tbody tr")
    sync_api.expect(rows).to_have_count(4)
    assert [rows.nth(i).locator("td").nth(1).text_content() for i in range(4)] == ["red"] * 4
    page.wait_for_function("() => [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)")
    expected = Client(base).classify(images=[str(root / "query.png")], k=10).results[0]
    assert [int(cards.nth(i).get_attribute("data-id")) for i in range(10)] == [n.id for n in expected.neighbours]

    page.fill("#k", "3")
    page.locator("#k").dispatch_event("change")
    sync_api.expect(cards).to_have_count(3)


def test_the_page_without_a_token_cannot_edit(page, served):
    base, root = served
    before = Client(base).versions().current
    page.set_input_files("#file", str(root / "query.png"))
    sync_api.expect(page.locator("#grid .card")).to_have_count(10)
    status(page)
    page.locator("#grid .card button", has_text="remove").first.click()
    sync_api.expect(page.locator("#status")).to_contain_text("remove failed: 401 needs the editing token")
    assert Client(base).versions().current == before


def test_with_the_token_the_page_removes_adds_and_rolls_back(page, served):
    base, root = served
    client = Client(base)
    start = client.info()
    page.fill("#token", TOKEN)
    page.set_input_files("#file", str(root / "query.png"))
    cards = page.locator("#grid .card")
    sync_api.expect(cards).to_have_count(10)
    status(page)
    first = int(cards.first.get_attribute("data-id"))
    # queries without pause while the page removes, from another process (a thread of this one stalls
    # Playwright's click while it runs); each line: when the query started (wall clock), the ids found
    load = subprocess.Popen([sys.executable, "-c", LOAD.format(base=base, image=str(root / "query.png"))],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        answering = load.stdout.readline()                 # a query before the click
        assert answering, "the query load did not start"
        cards.first.locator("button", has_text="remove").first.click()
        sync_api.expect(page.locator("#status")).to_contain_text(f"removed item {first}: version {start.version + 1}")
        acknowledged = time.time()                          # the page has shown the acknowledgement by now
        time.sleep(1.0)
    finally:
        load.terminate()
        rest = load.communicate(timeout=60)[0]
    seen = [json.loads(line) for line in [answering, *rest.splitlines()]]
    assert first in seen[0][1]                            # a query before the click found it
    late = [ids for started, ids in seen if started > acknowledged]
    assert late and not [ids for ids in late if first in ids], "a query started after the page's remove returned it"
    sync_api.expect(page.locator(f'#grid .card[data-id="{first}"]')).to_have_count(0)
    after = client.search(images=[str(root / "query.png")], k=30).results[0].neighbours
    assert first not in [n.id for n in after]                          # gone from the next answer
    with pytest.raises(urllib.error.HTTPError) as gone:                   # and so is its thumbnail
        urllib.request.urlopen(f"{base}/v1/thumbnail/{first}", timeout=60)
    assert gone.value.code == 404

    page.set_input_files("#add-files", str(root / "purple.png"))
    page.fill("#add-label", "purple")
    page.click("#add")
    sync_api.expect(page.locator("#status")).to_contain_text("added 1 under purple")
    assert client.classify(images=[str(root / "purple.png")], k=1).results[0].decision == "purple"

    page.click("#history")
    sync_api.expect(page.locator("#status")).to_contain_text(f"current version {start.version + 2}")
    sync_api.expect(page.locator("#log tbody tr")).to_have_count(start.version + 2)
    page.select_option("#rollback-version", str(start.version))
    page.click("#rollback")
    sync_api.expect(page.locator("#status")).to_contain_text(f"rolled back to {start.version}: version {start.version + 3}")
    assert client.info().count == start.count and client.log().log[-1]["operation"] == "rollback"
    sync_api.expect(page.locator("#log tbody tr")).to_have_count(start.version + 3)      # the log it shows follows


def test_thumbnails_are_served_for_the_memorys_own_ids_only(served):
    base, _ = served
    with urllib.request.urlopen(f"{base}/v1/thumbnail/0", timeout=60) as response:
        assert response.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(response.read())).size[0] > 0
    for path, code in (("/v1/thumbnail/999999", 404), ("/v1/thumbnail/-1", 422), ("/v1/thumbnail/abc", 422),
                       ("/v1/thumbnail/..%2F..%2Fetc%2Fpasswd", 404), ("/v1/thumbnail/%2Fetc%2Fpasswd", 404)):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}{path}", timeout=60)
        assert refused.value.code == code, path
