"""Run the probes on one feature source and record the scores (``RUN_DIR/probes.json``).

``load_probe_data`` draws the images and the scene set once; ``probe_source`` extracts features from
a source and runs the k-NN, linear and dense probes on them; ``probes_record`` is the on-disk record
(format below), ``write_probes_json`` writes it atomically next to a run::

    {"format_version": 1,
     "scores": {"knn_cls_top1", "knn_mean_top1", "linear_cls_top1", "linear_mean_top1", "linear_last4_top1",
                "dense_patch_acc", "dense_miou"},      # percent, only what ran (knn_last4_top1 if asked)
     "skipped": {"last4": "<why this source cannot give it>"},          # poolings asked for but not given
     "n_train": 60000, "n_test": 10000, "full_split": true,             # the images behind the scores
     "protocol": {...}, "data": "fashion-mnist", "source": "...", "created": "<ISO UTC>"}

``full_split`` is true when the k-NN bank / linear-probe train set and the test set were the whole
Fashion-MNIST splits (60,000 / 10,000), false for subsets; files written before it existed lack it
(unknown).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from probes.dense import dense_probe, scene_patch_features
from probes.linear import LinearProtocol, linear_probe
from probes.scenes import SceneSpec, Scenes, make_scenes
from probes.sources import (DEFAULT_BATCH, POOLING_TENSORS, POOLINGS, FeatureSource, extract_pooled,
                            pooling_unavailable)
from training.knn import knn_accuracy

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PROBES_FILENAME = "probes.json"
PROBES = ("knn", "linear", "dense")
KNN_K = 20
KNN_T = 0.07
DATA_NAME = "fashion-mnist"
DEFAULT_TRAIN_SCENES = 2000
DEFAULT_TEST_SCENES = 1000
TRAIN_SCENE_SEED, TEST_SCENE_SEED = 0, 1
SUBSET_SEED = 0
HEADLINE = "cls"
KNN_POOLINGS = ("cls", "mean")  # DINO's eval_knn uses the final layer; last4 is a linear-eval input  # the global feature the summary leads with (what Embed returns by default)


@dataclass(frozen=True)
class ProbeData:
    """Images ``[N, 28, 28, 1]`` uint8 and labels of both splits, and the scene sets (None without dense)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_scenes: Scenes | None
    test_scenes: Scenes | None
    scene_spec: SceneSpec
    full_split: bool | None = None  # both splits whole (None: not known)

    def protocol(self) -> dict[str, Any]:
        return {"n_train": int(len(self.train_images)), "n_test": int(len(self.test_images)),
                "full_split": self.full_split, "subset_seed": SUBSET_SEED,
                "scenes": None if self.train_scenes is None else {
                    **self.scene_spec.to_dict(), "n_train_scenes": len(self.train_scenes),
                    "n_test_scenes": len(self.test_scenes), "train_seed": TRAIN_SCENE_SEED,
                    "test_seed": TEST_SCENE_SEED, "train_items_from": "train split",
                    "test_items_from": "test split",
                    "encoding": "each canvas encoded as tiles of tile_size px, tiles' patch grids "
                                "reassembled into the canvas grid"}}


def load_probe_data(limit_train: int | None = None, limit_test: int | None = None,
                    train_scenes: int | None = None, test_scenes: int | None = None,
                    scene_spec: SceneSpec = SceneSpec(), dense: bool = True,
                    data_dir: str | Path | None = None) -> ProbeData:
    """Fashion-MNIST (``limit_*``: seeded random subsets) and the scene sets drawn from those images.

    Scene counts default to 2000 train / 1000 test, capped at a quarter of the (limited) image count so
    that a subset run encodes about as many tiles for dense as images for the global probes.
    Raises ``training.data.DataError`` when the data set is missing.
    """
    from training.data import load_fashion_mnist

    full_train, full_test = load_fashion_mnist("train", data_dir), load_fashion_mnist("test", data_dir)
    train, test = full_train.subset(limit_train, SUBSET_SEED), full_test.subset(limit_test, SUBSET_SEED)
    full_split = len(train) == len(full_train) and len(test) == len(full_test)
    tr_scenes = te_scenes = None
    if dense:
        n_tr = train_scenes if train_scenes is not None else min(DEFAULT_TRAIN_SCENES, max(1, len(train) // 4))
        n_te = test_scenes if test_scenes is not None else min(DEFAULT_TEST_SCENES, max(1, len(test) // 4))
        tr_scenes = make_scenes(train.images, train.labels, n_tr, scene_spec, TRAIN_SCENE_SEED)
        te_scenes = make_scenes(test.images, test.labels, n_te, scene_spec, TEST_SCENE_SEED)
    return ProbeData(train.images, train.labels, test.images, test.labels, tr_scenes, te_scenes, scene_spec,
                     full_split)


@dataclass
class ProbeReport:
    """Scores (percent), details (chosen L2s, per-class IoU, ...), timings (seconds) and the poolings
    asked for that the source cannot give (pooling -> reason) of one source."""

    source: str
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _parse_choices(text: str | Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    """A comma list (or sequence) of names from ``allowed``, in ``allowed``'s order; ValueError naming
    the unknown ones (``what``: "probe", "pooling")."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {unknown or names}; choose from {', '.join(allowed)}")
    return [p for p in allowed if p in names]


def parse_probes(text: str | Sequence[str]) -> list[str]:
    """``"knn,linear"`` -> ``["knn", "linear"]``; ValueError naming an unknown probe."""
    return _parse_choices(text, PROBES, "probe")


def parse_poolings(text: str | Sequence[str]) -> list[str]:
    """``"cls,last4"`` -> ``["cls", "last4"]``; ValueError naming an unknown pooling."""
    return _parse_choices(text, POOLINGS, "pooling")


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _record(report: ProbeReport, name: str, start: tuple[float, float]) -> None:
    """``NAME_s`` (wall, includes contention on a shared machine) and ``NAME_cpu_s`` (this process's CPU)."""
    report.timings[name] = time.perf_counter() - start[0]
    report.timings[name[:-2] + "_cpu_s"] = time.process_time() - start[1]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch intra-op threads (``None``/0: leave torch's setting), then restore.

    On a loaded machine one thread is much faster than two (a 60k x 192 linear probe took 33 s
    wall with 1 thread and 242 s with 2 beside other jobs on this 2-core CPU: threads that wait for
    each other at every operation lose to the scheduler).
    """
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def probe_source(source: FeatureSource, data: ProbeData, probes: Sequence[str] = PROBES,
                 protocol: LinearProtocol = LinearProtocol(), batch: int = DEFAULT_BATCH,
                 threads: int | None = None, poolings: Sequence[str] = POOLINGS,
                 knn_poolings: Sequence[str] = KNN_POOLINGS) -> ProbeReport:
    """Extract features from ``source`` and run ``probes`` on them (with ``threads`` torch threads).

    The linear probe runs on each of ``poolings``, the k-NN on each of ``knn_poolings`` (by default
    the final layer's, as DINO's ``eval_knn``; last4 is a linear-evaluation input), where the source
    can give them; the others are skipped and their reasons recorded in ``report.skipped``.
    """
    cpu0 = time.process_time()
    with torch_threads(threads):
        report = _probe_source(source, data, probes, protocol, batch, poolings, knn_poolings)
    report.timings["process_cpu_s"] = time.process_time() - cpu0  # wall times above include contention
    return report


def _probe_source(source: FeatureSource, data: ProbeData, probes: Sequence[str], protocol: LinearProtocol,
                  batch: int, poolings: Sequence[str], knn_poolings: Sequence[str]) -> ProbeReport:
    report = ProbeReport(source.name)
    tag = source.name.split(":")[0]
    if "knn" in probes or "linear" in probes:
        wanted = set(knn_poolings if "knn" in probes else ()) | set(poolings if "linear" in probes else ())
        for p in (p for p in POOLINGS if p in wanted):
            if (reason := pooling_unavailable(source, p)) is not None:
                report.skipped[p] = reason
                log.info("%s: skipping the %s pooling: %s", source.name, p, reason)
        usable = tuple(p for p in POOLINGS if p in wanted and p not in report.skipped)
        t0 = _clock()
        train = extract_pooled(source, data.train_images, usable, batch, f"{tag} train features")
        test = extract_pooled(source, data.test_images, usable, batch, f"{tag} test features")
        _record(report, "global_features_s", t0)
        for pooling in usable:
            tr, te = train[pooling], test[pooling]
            if "knn" in probes and pooling in knn_poolings:
                t0 = _clock()
                acc = knn_accuracy(tr, data.train_labels, te, data.test_labels, KNN_K, KNN_T)
                report.scores[f"knn_{pooling}_top1"] = 100.0 * acc
                _record(report, f"knn_{pooling}_s", t0)
            if "linear" in probes and pooling in poolings:
                t0 = _clock()
                res = linear_probe(tr, data.train_labels, te, data.test_labels, protocol)
                report.scores[f"linear_{pooling}_top1"] = 100.0 * res.accuracy
                report.details[f"linear_{pooling}"] = res.summary()
                _record(report, f"linear_{pooling}_s", t0)
            log.info("%s %s: %s", source.name, pooling,
                     ", ".join(f"{k}={v:.2f}" for k, v in report.scores.items() if f"_{pooling}_" in k))
    if "dense" in probes:
        if data.train_scenes is None or data.test_scenes is None:
            raise ValueError("the dense probe needs scene sets: load_probe_data(dense=True)")
        t0 = _clock()
        ftr = scene_patch_features(source, data.train_scenes, batch, f"{tag} train scenes")
        fte = scene_patch_features(source, data.test_scenes, batch, f"{tag} test scenes")
        _record(report, "dense_features_s", t0)
        t0 = _clock()
        res = dense_probe(ftr, data.train_scenes.patch_labels, fte, data.test_scenes.patch_labels, protocol)
        _record(report, "dense_probe_s", t0)
        report.scores["dense_patch_acc"] = 100.0 * res.patch_accuracy
        report.scores["dense_miou"] = 100.0 * res.miou
        report.details["dense"] = {"l2": res.l2, "val_accuracy": {f"{k:g}": v for k, v in res.val_accuracy.items()},
                                   "iou_per_class": [None if np.isnan(v) else float(v) for v in res.iou]}
        log.info("%s dense: patch acc %.2f, mIoU %.2f", source.name, report.scores["dense_patch_acc"],
                 report.scores["dense_miou"])
    return report


def protocol_record(data: ProbeData, probes: Sequence[str], protocol: LinearProtocol,
                    poolings: Sequence[str] = POOLINGS, knn_poolings: Sequence[str] = KNN_POOLINGS) -> dict[str, Any]:
    """The ``protocol`` entry of ``probes.json``: every setting that shapes the scores."""
    used = [p for p in POOLINGS if p in set(poolings) | set(knn_poolings)]
    return {"probes": list(probes), "knn": {"k": KNN_K, "temperature": KNN_T, "similarity": "cosine",
                                            "votes": "exp(sim / T) weighted", "poolings": list(knn_poolings)},
            "linear": {**protocol.to_dict(), "poolings": list(poolings)},
            "dense_classifier": "the linear protocol on per-patch tokens",
            "global_features": {**{p: POOLING_TENSORS[p] for p in used}, "headline": HEADLINE},
            **data.protocol()}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def probes_record(report: ProbeReport, protocol: dict[str, Any]) -> dict[str, Any]:
    """The ``probes.json`` object of one source (module docstring)."""
    return {"format_version": FORMAT_VERSION, "scores": {k: float(v) for k, v in report.scores.items()},
            "skipped": dict(report.skipped), "n_train": protocol.get("n_train"), "n_test": protocol.get("n_test"),
            "full_split": protocol.get("full_split"),
            "protocol": protocol, "data": DATA_NAME, "source": report.source, "created": utc_now()}


def write_probes_json(run_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``RUN_DIR/probes.json`` atomically (``training.run_dir.write_json``)."""
    from training.run_dir import write_json

    return write_json(Path(run_dir) / PROBES_FILENAME, record)
