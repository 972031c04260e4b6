"""The page at ``GET /`` in a real headless Chromium: the models table, an image uploaded through the
file input, the PCA map drawn (checked pixel by pixel on a planted image: an item on a plain
background), the embedding shown equal to the API's, the CLS attention panels for a model exported
with ``cls_attention``; a screenshot goes to the test's temporary directory, or to the file that
``VITSERVE_PAGE_SCREENSHOT`` names (docs/HTTP_PAGE.png was taken with it set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.serving.browser import chrome_driver
from tests.serving.conftest import MAX_BATCH_SIZE, build_model_repository
from tests.serving.http_calls import call, data_url, png

pytestmark = pytest.mark.slow

PLAIN, ATTENTION = "fmnist_tiny", "fmnist_attention"
ITEM = (slice(8, 20), slice(8, 20))  # rows/cols of the planted item: patch cells 2..4 (patch 4, grid 7x7)


def _export_attention_model(repository: Path) -> None:
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(1)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    model.eval()
    export_entries(EncoderSource(model, spec), repository, ATTENTION,
                   ExportOptions(attention=True, triton=TritonOptions(max_batch_size=MAX_BATCH_SIZE)))


@pytest.fixture(scope="module")
def page_gateway(tmp_path_factory):
    from serving.gateway import embedded_service
    from serving.grpc_server import ServerOptions

    repository = tmp_path_factory.mktemp("page_repository")
    build_model_repository(repository, PLAIN)
    _export_attention_model(repository)
    with embedded_service(repository, ServerOptions(http_port=0)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    """A textured bright item on a plain dark background, 28x28 grey."""
    image = np.full((28, 28, 1), 12, np.uint8)
    yy, xx = np.mgrid[0:12, 0:12]
    image[ITEM] = (150 + 8 * ((yy + xx) % 8))[..., None].astype(np.uint8)
    path = tmp_path_factory.mktemp("page_images") / "planted.png"
    path.write_bytes(png(image))
    return path


@pytest.fixture(scope="module")
def browser():
    driver = chrome_driver(1500, 1150)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(browser, script: str, timeout: float = 90.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: d.execute_script(script))


def _pixels(browser, selector: str) -> np.ndarray:
    """The RGBA pixels of the canvas ``selector`` as drawn in the page (``getImageData``)."""
    flat = browser.execute_script(
        "const c = document.querySelector(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);", selector)
    size = int(round((len(flat) / 4) ** 0.5))
    return np.asarray(flat, np.uint8).reshape(size, size, 4)


@pytest.fixture(scope="module")
def shown(browser, page_gateway, planted, tmp_path_factory):
    """The page with the planted image uploaded, both models side by side when both are served."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(f"{page_gateway.http_url}/")
    _wait(browser, "return document.getElementById('model-a').dataset.loaded === '1'")
    Select(browser.find_element(By.ID, "model-a")).select_by_value(PLAIN)
    Select(browser.find_element(By.ID, "model-b")).select_by_value(ATTENTION)
    browser.find_element(By.ID, "file").send_keys(str(planted))
    _wait(browser, "return document.getElementById('panels').dataset.done === '1' "
                   "|| document.getElementById('status').textContent.length > 20")
    assert browser.find_element(By.ID, "status").text == ""
    screenshot = Path(os.environ.get("VITSERVE_PAGE_SCREENSHOT") or tmp_path_factory.mktemp("page") / "page.png")
    browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000, screenshot
    return browser


def test_models_table_lists_the_served_models(shown, page_gateway):
    from selenium.webdriver.common.by import By

    rows = shown.find_elements(By.CSS_SELECTOR, "#models tbody tr")
    assert sorted(r.get_attribute("data-model") for r in rows) == sorted(page_gateway.models)
    plain = next(r for r in rows if r.get_attribute("data-model") == PLAIN)
    cells = [c.text for c in plain.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == PLAIN and cells[1] == "1" and cells[2] == "fp32"
    assert cells[3] == "28×28×1" and cells[4] == "7×7 / 4" and cells[5] == "192"
    assert "cls=" in cells[10] and "tol" in cells[10]  # parity figures from the manifest


def test_pca_map_is_drawn_and_separates_the_planted_item(shown):
    pixels = _pixels(shown, f".panel[data-model='{PLAIN}'] canvas.pca")[..., :3].astype(float)
    assert pixels.std(axis=(0, 1)).max() > 10, "the PCA map is constant"
    cell = pixels.shape[0] // 7  # the 7x7 grid, drawn as blocks
    colours = pixels[cell // 2::cell, cell // 2::cell][:7, :7]  # one pixel per patch cell
    item = np.zeros((7, 7), bool)
    item[2:5, 2:5] = True  # cells fully inside the item
    background = np.ones((7, 7), bool)
    background[1:6, 1:6] = False  # cells fully outside it
    gap = np.abs(colours[item].mean(axis=0) - colours[background].mean(axis=0)).sum()
    print(f"\nPCA colour gap item vs background: {gap:.1f} (sum over RGB of 0..255 means)")
    assert gap > 40


def test_embedding_shown_is_the_api_one(shown, page_gateway, planted):
    from selenium.webdriver.common.by import By

    panel = shown.find_element(By.CSS_SELECTOR, f".panel[data-model='{PLAIN}'] .embedding")
    answer = call(f"{page_gateway.http_url}/v1/embeddings", {"model": PLAIN, "input": [data_url(planted.read_bytes())]})
    vector = np.asarray(answer.body["data"][0]["embedding"], np.float64)
    assert int(panel.get_attribute("data-dim")) == vector.size
    assert abs(float(panel.get_attribute("data-norm")) - np.linalg.norm(vector)) <= 1e-6 * np.linalg.norm(vector)
    np.testing.assert_allclose(json.loads(panel.get_attribute("data-first")), vector[:8], atol=5.1e-5)
    assert f"‖e‖ = {np.linalg.norm(vector):.4f}" in panel.text


def test_nothing_is_loaded_from_outside(shown, page_gateway):
    resources = shown.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(page_gateway.http_url) for r in resources), resources


def test_attention_panels_for_a_model_with_cls_attention(shown, page_gateway):
    from selenium.webdriver.common.by import By

    info = call(f"{page_gateway.http_url}/v1/models/{ATTENTION}").body
    assert "cls_attention" in info["outputs"]
    panel = f".panel[data-model='{ATTENTION}']"
    heads = info["encoder_spec"].get("num_heads") or len(shown.find_elements(By.CSS_SELECTOR, f"{panel} canvas.attn-head"))
    assert len(shown.find_elements(By.CSS_SELECTOR, f"{panel} canvas.attn-head")) == heads > 0
    mean = _pixels(shown, f"{panel} canvas.attn-mean")[..., :3].astype(float)
    assert mean.std(axis=(0, 1)).max() > 10, "the mean attention map is constant"
    assert not shown.find_elements(By.CSS_SELECTOR, f".panel[data-model='{PLAIN}'] canvas.attn-mean")


def test_features_pass_cls_attention_through_like_grpc(page_gateway, planted):
    import base64

    import grpc

    from protos import vitserve_pb2, vitserve_pb2_grpc

    request = vitserve_pb2.FeaturesRequest(model=ATTENTION, images=[vitserve_pb2.Image(encoded=planted.read_bytes())],
                                           outputs=["cls_attention"], layout=vitserve_pb2.FeaturesRequest.TOKENS)
    with grpc.insecure_channel(page_gateway.target) as channel:
        expected = vitserve_pb2_grpc.VisionEncoderStub(channel).Features(request, timeout=60)
    answer = call(f"{page_gateway.http_url}/v1/features", {"model": ATTENTION, "input": [data_url(planted.read_bytes())],
                                                           "outputs": ["cls_attention"], "layout": "tokens"})
    assert answer.status == 200, answer.body
    got = answer.body["cls_attention"]
    assert got["shape"] == list(expected.cls_attention.shape) and got["shape"][0] == 1
    assert base64.b64decode(got["data"]) == expected.cls_attention.data
    assert base64.b64decode(answer.body["features"]["data"]) == expected.features.data
