"""``cls_attention`` and the feature views through the service (Triton + gateway, started once for this
module): equal to the in-process ones; ``vitserve viz`` writes a PNG of them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from contract.names import ATTENTION_OUTPUT
from tests.serving.conftest import MAX_BATCH_SIZE, ExportedModel

pytestmark = pytest.mark.slow

ATT, PLAIN = "fmnist_att", "fmnist_plain"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportedModel:
    """One repository with the same random-init encoder exported twice: with and without ``--attention``."""
    import torch

    from export.options import ExportOptions, TritonOptions
    from export.repository import export_entries
    from export.sources import EncoderSource
    from training.backbone import FASHION_MNIST_MEAN, FASHION_MNIST_STD, create_encoder

    torch.manual_seed(0)
    model, spec = create_encoder(mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    model.eval()
    repository = tmp_path_factory.mktemp("attention_repository")
    triton = TritonOptions(max_batch_size=MAX_BATCH_SIZE)
    export_entries(EncoderSource(model, spec), repository, ATT, ExportOptions(triton=triton, attention=True))
    export_entries(EncoderSource(model, spec), repository, PLAIN, ExportOptions(triton=triton))
    return ExportedModel(model, spec, repository, ATT, MAX_BATCH_SIZE)


def in_process(exported: ExportedModel, images: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch outputs of the attention export's selection (``cls``, ``patch_tokens``, ``cls_attention``)."""
    from export.gate import reference_outputs
    from export.outputs import OutputSelection

    return reference_outputs(exported.model, exported.spec, images, 64, OutputSelection(attention=True))


def test_features_return_cls_attention_equal_to_in_process(client, exported, fmnist_test_images) -> None:
    images = fmnist_test_images[:20]  # > max batch size: split by the gateway, joined again
    res = client.features(images, model=ATT, outputs=[ATTENTION_OUTPUT])
    ref = in_process(exported, images)
    heads = exported.model.blocks[-1].attn.num_heads
    assert res.cls_attention.shape == (20, heads, exported.spec.num_patches)
    err = float(np.abs(res.cls_attention - ref[ATTENTION_OUTPUT]).max())
    print(f"service vs in-process cls_attention max abs error {err:.2e}")
    assert err <= 1e-5
    np.testing.assert_allclose(res.features, ref["patch_tokens"].reshape(res.features.shape), atol=1e-4)
    assert list(res.layers) == ["patch_tokens"]  # cls_attention is not a patch-token layer
    rows = res.cls_attention.sum(axis=-1)
    assert np.all(res.cls_attention >= 0) and np.all(rows <= 1 + 1e-5) and np.all(rows > 0)
    assert client.features(images[:2], model=ATT).cls_attention is None  # only when asked by name


def test_model_info_says_which_model_has_it(client) -> None:
    assert ATTENTION_OUTPUT in client.get_model(ATT).outputs
    assert ATTENTION_OUTPUT not in client.get_model(PLAIN).outputs


def test_a_model_without_it_refuses_with_invalid_argument(client, fmnist_test_images) -> None:
    from clients.client import VitServeError

    with pytest.raises(VitServeError) as e:
        client.features(fmnist_test_images[:1], model=PLAIN, outputs=[ATTENTION_OUTPUT])
    assert e.value.code.name == "INVALID_ARGUMENT"
    assert "--attention" in e.value.details and PLAIN in e.value.details


def test_views_through_the_service_equal_the_in_process_ones(client, exported, fmnist_test_images) -> None:
    from clients.viz import feature_views
    from vitserve.viz_cli import fetch_views

    images = fmnist_test_images[:4]
    served = fetch_views(client, list(images), ATT, foreground=True).views
    ref = in_process(exported, images)
    grid = ref["patch_tokens"].reshape(4, *exported.spec.grid_size, -1)
    local = feature_views(grid, ref[ATTENTION_OUTPUT], foreground=True)
    errors = {"pca": float(np.abs(served.pca - local.pca).max()),
              "attention": float(np.abs(served.attention - local.attention).max()),
              "attention_heads": float(np.abs(served.attention_heads - local.attention_heads).max())}
    print(f"service vs in-process views, max abs error: {errors}")
    assert errors["pca"] <= 1e-3 and errors["attention"] <= 1e-4 and errors["attention_heads"] <= 1e-4
    assert np.array_equal(served.foreground, local.foreground)


def _write_pngs(directory: Path, images: np.ndarray) -> list[Path]:
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        paths.append(directory / f"item{i}.png")
        Image.fromarray(image[..., 0]).save(paths[-1])
    return paths


def test_viz_command_writes_the_views_png(gateway, exported, fmnist_test_images, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from vitserve import viz_cli

    paths = _write_pngs(tmp_path, fmnist_test_images[:3])
    out = tmp_path / "views" / "v.png"
    code = viz_cli.main([*map(str, paths), "--target", gateway.target, "--model", f"{ATT},{PLAIN}",
                         "--out", str(out), "--foreground"])
    assert code == 0, capsys.readouterr().err
    heads = exported.model.blocks[-1].attn.num_heads
    columns = 3 + 1 + heads  # input, PCA, foreground, attention mean, one per head
    png = np.asarray(Image.open(out).convert("RGB"))
    step, height = viz_cli.PANEL + 4, viz_cli.TITLE + viz_cli.PANEL + 4
    assert png.shape == (3 * 2 * height, viz_cli.LABEL_WIDTH + columns * step, 3)

    def panel(row: int, column: int) -> np.ndarray:
        y, x = row * height + viz_cli.TITLE, viz_cli.LABEL_WIDTH + column * step
        return png[y:y + viz_cli.PANEL, x:x + viz_cli.PANEL]

    for row in range(6):
        for column in range(columns if row % 2 == 0 else 3):  # odd rows: the model without attention
            assert panel(row, column).std() > 0, (row, column)
        if row % 2:
            assert (panel(row, 3) == 255).all()  # no attention panels: blank
    assert f"{ATT}: grid 7x7" in capsys.readouterr().out


def test_viz_command_errors(gateway, fmnist_test_images, tmp_path: Path, capsys) -> None:
    from vitserve import viz_cli

    (path,) = _write_pngs(tmp_path, fmnist_test_images[:1])
    code = viz_cli.main([str(path), "--target", gateway.target, "--model", "nope", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 1 and "NOT_FOUND" in err and "nope" in err
    assert viz_cli.main([str(path), "--target", gateway.target, "--out", str(tmp_path / "x.jpg")]) == 2
    assert "--out must name a .png" in capsys.readouterr().err
    assert viz_cli.main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "x.png")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_features_command_saves_the_attention(gateway, exported, fmnist_test_images, tmp_path: Path, capsys) -> None:
    from clients.commands import features_main

    paths = _write_pngs(tmp_path, fmnist_test_images[:2])
    out = tmp_path / "f.npy"
    code = features_main([*map(str, paths), "--target", gateway.target, "--model", ATT,
                          "--output", ATTENTION_OUTPUT, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    attention = np.load(tmp_path / "f.cls_attention.npy")
    np.testing.assert_allclose(attention, in_process(exported, fmnist_test_images[:2])[ATTENTION_OUTPUT], atol=1e-5)
    assert np.load(out).shape == (2, *exported.spec.grid_size, exported.spec.embed_dim)
