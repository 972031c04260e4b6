"""The demo's dense side: feature views of test images through the running service (``.demo/features.png``)
and the dense probe (``probes.dense``) of the served encoder against raw pixels and a random-init encoder
of the same architecture on a small scene set.

Both go through the service: the views with ``vitserve.viz_cli`` (the ``vitserve viz`` code), the
probe's features with ``probes.sources.ServiceSource`` (``Features`` in the tokens layout). The scene
set is ``probes.scenes`` at the seeds ``vitserve probe`` uses, only smaller (docs/PROBES.md).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEMO_TRAIN_SCENES = 400  # x 4 tiles x 49 patches = 78,400 training patches
DEMO_TEST_SCENES = 200
# A shorter L2 grid and iteration budget than the full protocol's (9 strengths x 300 iterations):
# on this scale the probe otherwise takes minutes of the demo's 10.
DEMO_L2_GRID = (1e-2, 1e-4, 1e-6)
DEMO_MAX_ITER = 100


def write_feature_views(client, model: str, images: np.ndarray, out: Path) -> Path:
    """The ``vitserve viz --foreground`` PNG of ``images`` (uint8 ``[N, H, W(, C)]``) from ``model``."""
    from vitserve.viz_cli import fetch_views, write_views_png

    views = fetch_views(client, list(images), model, foreground=True)
    return write_views_png(out, list(images), [f"test[{i}]" for i in range(len(images))], [views])


@dataclass(frozen=True)
class DenseFigures:
    """mIoU and patch accuracy (percent) of the served encoder, raw pixels and a random-init encoder."""

    encoder_miou: float
    encoder_patch_acc: float
    raw_miou: float
    raw_patch_acc: float
    random_miou: float
    random_patch_acc: float
    n_train_scenes: int
    n_test_scenes: int
    seconds: float


def dense_probe_figures(target: str, model: str, train_set, test_set,
                        n_train: int = DEMO_TRAIN_SCENES, n_test: int = DEMO_TEST_SCENES) -> DenseFigures:
    """Per-patch linear probe on scenes of ``train_set`` / ``test_set`` items (``LabelledImages``): the
    service's patch tokens of ``model`` against raw-pixel patches and the patch tokens of the same timm
    architecture at its random initialisation (``probes.sources.random_init_source``, in process)."""
    from probes.dense import dense_probe, scene_patch_features
    from probes.evaluate import TEST_SCENE_SEED, TRAIN_SCENE_SEED, torch_threads
    from probes.linear import LinearProtocol
    from probes.scenes import SceneSpec, make_scenes
    from probes.sources import RawPixelSource, ServiceSource, random_init_source
    from training.backbone import EncoderSpec

    t0 = time.monotonic()
    spec = SceneSpec()
    train = make_scenes(train_set.images, train_set.labels, n_train, spec, TRAIN_SCENE_SEED)
    test = make_scenes(test_set.images, test_set.labels, n_test, spec, TEST_SCENE_SEED)
    protocol = LinearProtocol(l2_grid=DEMO_L2_GRID, max_iter=DEMO_MAX_ITER)
    service = ServiceSource(target, model)
    results = {}
    try:
        with torch_threads(1):  # two threads that wait for each other lose on a shared 2-core machine
            random_init = random_init_source(EncoderSpec.from_dict(service.spec))
            for name, source in (("encoder", service), ("raw", RawPixelSource.like(service)),
                                 ("random", random_init)):
                ftr = scene_patch_features(source, train, 64, f"{name} train scenes")
                fte = scene_patch_features(source, test, 64, f"{name} test scenes")
                results[name] = dense_probe(ftr, train.patch_labels, fte, test.patch_labels, protocol)
    finally:
        service.close()
    enc, raw, rnd = results["encoder"], results["raw"], results["random"]
    return DenseFigures(100 * enc.miou, 100 * enc.patch_accuracy, 100 * raw.miou, 100 * raw.patch_accuracy,
                        100 * rnd.miou, 100 * rnd.patch_accuracy, n_train, n_test, time.monotonic() - t0)
