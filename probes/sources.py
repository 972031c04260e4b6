"""Feature sources: one small interface over everything that can turn images into tokens.

A source maps a batch of uint8 images ``[N, H, W, C]`` (the layout the exported model and the service
take) to ``TokenFeatures``: the global token ``cls [N, D]``, the patch tokens ``[N, h*w, D]`` and the
grid ``(h, w)``. The probes only see this interface, so the same numbers can be computed in process
(PyTorch), from the exported ONNX graph (ONNX Runtime on the CPU) or through a running vitserve service,
and against the two baselines (raw pixels, a randomly initialised encoder of the same architecture).

Global features come in named poolings (``POOLINGS``): ``cls``, ``mean`` and ``last4`` (DINOv2's
linear-evaluation input, below). Every source gives ``cls`` and ``mean``; ``last4`` needs the CLS token
of earlier blocks, which only the in-process encoder (and the random-init baseline) has.
``pooling_unavailable`` says why a source cannot give one, so callers skip it with a recorded reason.

``extract_pooled``, ``extract_global`` and ``extract_patches`` loop over a data set in batches with a
progress bar.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

DEFAULT_BATCH = 256
RANDOM_INIT_SEED = 0
LAST_BLOCKS = 4
POOLINGS = ("cls", "mean", "last4")
# Exactly which tensor each pooling is (recorded in probes.json's protocol).
POOLING_TENSORS = {
    "cls": "CLS token after the final norm [N, D] (a model without CLS: the mean patch token)",
    "mean": "mean of the patch tokens after the final norm [N, D]",
    "last4": "concat of the CLS tokens of the last 4 blocks, each through the final norm (oldest first), "
             "then the mean of the last block's normed patch tokens [N, 5D]: DINOv2's linear-eval input "
             "(n_last_blocks=4, avgpool=True); DINO's ViT-S protocol is the first 4D of it",
}


class SourceError(RuntimeError):
    """A feature source cannot be opened or used; the message says which and why."""


@dataclass(frozen=True)
class TokenFeatures:
    """One batch: ``cls [N, D]``, ``patch_tokens [N, h*w, D]`` (float32) on a ``grid`` of ``(h, w)``."""

    cls: np.ndarray
    patch_tokens: np.ndarray
    grid: tuple[int, int]


@runtime_checkable
class FeatureSource(Protocol):
    """Anything that turns uint8 images ``[N, H, W, C]`` of ``img_size`` into tokens."""

    name: str                   # what produced the features (recorded in probes.json)
    img_size: tuple[int, int]   # (H, W) the source accepts
    in_chans: int
    patch_size: tuple[int, int]
    grid: tuple[int, int]       # (h, w) patch grid of one image

    def features(self, images: np.ndarray) -> TokenFeatures: ...

    def pooled(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(cls [N, D], mean of patch tokens [N, D])``."""
        ...


def _check_batch(source: FeatureSource, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    expected = (*source.img_size, source.in_chans)
    if images.dtype != np.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise SourceError(f"{source.name} takes uint8 images [N, {expected[0]}, {expected[1]}, {expected[2]}], "
                          f"got {images.dtype} {list(images.shape)}")
    return np.ascontiguousarray(images)


class _PooledFromFeatures:
    """``pooled`` computed from ``features`` (sources with a cheaper path override it)."""

    def pooled(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(images)  # type: ignore[attr-defined]
        return f.cls, f.patch_tokens.mean(axis=1, dtype=np.float32)


def _unknown_pooling(pooling: str) -> str | None:
    return None if pooling in POOLINGS else f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}"


class TorchEncoderSource(_PooledFromFeatures):
    """An in-process timm encoder: ``to_float_nchw`` then ``forward_features``, CLS = token 0 (or the
    mean patch token for a model without one) and patch tokens after the prefix — the same tensors as
    ``export.onnx_export.ExportableEncoder``."""

    def __init__(self, model, spec, name: str) -> None:
        self.model, self.spec, self.name = model.eval(), spec, name
        self.img_size = tuple(spec.img_size)
        self.in_chans = int(spec.in_chans)
        self.patch_size = tuple(spec.patch_size)
        self.grid = tuple(spec.grid_size)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path) -> "TorchEncoderSource":
        """The trained encoder of a run directory (``training.run_dir.load_encoder``)."""
        from training.run_dir import RunDirError, load_encoder

        try:
            model, spec = load_encoder(run_dir)
        except RunDirError as e:
            raise SourceError(str(e)) from e
        return cls(model, spec, f"torch:{Path(run_dir).resolve()}")

    def features(self, images: np.ndarray) -> TokenFeatures:
        import torch

        from training.data import to_float_nchw

        images = _check_batch(self, images)
        spec = self.spec
        with torch.inference_mode():
            tokens = self.model.forward_features(to_float_nchw(images, spec.mean, spec.std))  # [N, P+hw, D]
            patches = tokens[:, spec.num_prefix_tokens:]
            cls = tokens[:, 0] if spec.has_cls_token else patches.mean(dim=1)
        return TokenFeatures(cls.float().numpy(), patches.float().numpy(), self.grid)

    def pooling_unavailable(self, pooling: str) -> str | None:
        """Why this encoder cannot give ``pooling`` (None: it can)."""
        if pooling == "last4":
            blocks = len(getattr(self.model, "blocks", ()))
            if not self.spec.has_cls_token:
                return f"{self.name} has no CLS token (last4 concatenates the CLS token of the last 4 blocks)"
            if blocks < LAST_BLOCKS:
                return f"{self.name} has {blocks} blocks; last4 needs at least {LAST_BLOCKS}"
            if not hasattr(self.model, "forward_intermediates"):
                return f"{type(self.model).__name__} has no timm forward_intermediates"
        return _unknown_pooling(pooling)

    def pooled_features(self, images: np.ndarray, poolings: tuple[str, ...]) -> dict[str, np.ndarray]:
        """``{pooling: [N, D'] float32}`` for each of ``poolings`` from one forward pass (``POOLING_TENSORS``)."""
        import torch

        from training.data import to_float_nchw

        for p in poolings:
            if (reason := self.pooling_unavailable(p)) is not None:
                raise SourceError(reason)
        if "last4" not in poolings:
            cls, mean = self.pooled(images)
            return {p: {"cls": cls, "mean": mean}[p] for p in poolings}
        images = _check_batch(self, images)
        spec = self.spec
        with torch.inference_mode():
            x = to_float_nchw(images, spec.mean, spec.std)
            # final [N, P+hw, D] = forward_features; blocks: LAST_BLOCKS (patches [N, hw, D], prefix [N, P, D])
            final, blocks = self.model.forward_intermediates(x, indices=LAST_BLOCKS, norm=True, output_fmt="NLC",
                                                             return_prefix_tokens=True)
            patches = final[:, spec.num_prefix_tokens:]
            out = {"cls": final[:, 0], "mean": patches.mean(dim=1),
                   "last4": torch.cat([prefix[:, 0] for _, prefix in blocks] + [blocks[-1][0].mean(dim=1)], dim=1)}
        return {p: out[p].float().numpy() for p in poolings}


def random_init_source(spec, seed: int = RANDOM_INIT_SEED) -> TorchEncoderSource:
    """A randomly initialised encoder of ``spec``'s architecture (timm's init under ``seed``).

    The global torch RNG is forked, so building the baseline does not disturb the caller's stream.
    """
    import torch

    from training.backbone import build_from_spec

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_from_spec(spec)
    return TorchEncoderSource(model, spec, f"random-init:{spec.model_name} seed {seed}")


class OnnxSource(_PooledFromFeatures):
    """An exported model: ``model.onnx`` (uint8 ``images`` -> ``cls``, ``patch_tokens``) on ONNX Runtime's CPU
    provider. The encoder spec comes from the graph's ``vitserve_encoder_spec`` metadata."""

    def __init__(self, path: str | Path, intra_op_threads: int = 0) -> None:
        import onnxruntime as ort

        path = Path(path)
        if path.is_dir():  # a model directory REPO/<name>: take its highest version
            versions = sorted((p for p in path.iterdir() if p.name.isdigit() and (p / "model.onnx").is_file()),
                              key=lambda p: int(p.name))
            if not versions:
                raise SourceError(f"{path} holds no <version>/model.onnx")
            path = versions[-1] / "model.onnx"
        if not path.is_file():
            raise SourceError(f"ONNX model {path} does not exist (export one with `vitserve export`)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise SourceError(f"ONNX Runtime cannot load {path}: {e}") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vitserve_encoder_spec" not in meta:
            raise SourceError(f"{path} has no vitserve_encoder_spec metadata; was it written by `vitserve export`?")
        from training.backbone import EncoderSpec

        self.spec = EncoderSpec.from_dict(json.loads(meta["vitserve_encoder_spec"]))
        self.name = f"onnx:{path.resolve()}"
        self.img_size = tuple(self.spec.img_size)
        self.in_chans = int(self.spec.in_chans)
        self.patch_size = tuple(self.spec.patch_size)
        self.grid = tuple(self.spec.grid_size)

    def features(self, images: np.ndarray) -> TokenFeatures:
        cls, patches = self.session.run(["cls", "patch_tokens"], {"images": _check_batch(self, images)})
        return TokenFeatures(cls, patches, self.grid)

    def pooling_unavailable(self, pooling: str) -> str | None:
        if pooling == "last4":
            return (f"{self.name}: the exported graph gives the final layer's cls and patch tokens (and patch "
                    "tokens of --layers), not the CLS token of earlier blocks that last4 needs; probe the run "
                    "directory (--run) for it")
        return _unknown_pooling(pooling)


class ServiceSource:
    """A running vitserve service, through ``clients.client.VitServeClient``: ``Features`` (tokens layout,
    with CLS) for dense features and ``Embed`` (``pooling="both"``) for the global ones."""

    def __init__(self, target: str, model: str, timeout: float = 60.0) -> None:
        from clients.client import TargetError, VitServeClient, VitServeError

        try:
            self.client = VitServeClient(target, timeout=timeout)  # several replicas: balanced, retried
        except TargetError as e:
            raise SourceError(f"--service: {e}") from e
        try:
            described = {m.name: m for m in self.client.list_models()}
        except VitServeError as e:
            self.client.close()
            raise SourceError(f"vitserve service at {target} did not answer ListModels: {e}") from e
        if model not in described:
            self.client.close()
            raise SourceError(f"the service at {target} serves no model {model!r} "
                              f"(it serves: {', '.join(sorted(described)) or 'none'})")
        m = described[model]
        self.model, self.description = model, m
        self.name = f"service:{target}/{model}"
        self.img_size = tuple(m.input_size)
        self.in_chans = int(m.input_channels)
        self.patch_size = (int(m.patch_size), int(m.patch_size))
        self.grid = tuple(m.grid)
        self.spec = m.encoder_spec

    def _call(self, fn, *args, **kw):
        from clients.client import VitServeError

        try:
            return fn(*args, **kw)
        except VitServeError as e:
            raise SourceError(f"{self.name}: {e}") from e

    def features(self, images: np.ndarray) -> TokenFeatures:
        res = self._call(self.client.features, _check_batch(self, images), model=self.model,
                         layout="tokens", include_cls=True)
        return TokenFeatures(res.cls, res.features, tuple(res.grid))

    def pooled(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        both = self._call(self.client.embed, _check_batch(self, images), model=self.model, pooling="both")
        d = both.shape[1] // 2
        return both[:, :d], both[:, d:]

    def pooling_unavailable(self, pooling: str) -> str | None:
        if pooling == "last4":
            return (f"{self.name}: Embed and Features return the final layer's CLS and patch tokens (and patch "
                    "tokens of exported layers), not the CLS token of earlier blocks that last4 needs; probe the "
                    "run directory (--run) for it")
        return _unknown_pooling(pooling)

    def close(self) -> None:
        self.client.close()


class RawPixelSource:
    """The raw-pixel baseline: ``cls`` is the whole image's pixels ``[N, H*W*C]`` in [0, 1]; each patch
    token is that patch's pixels ``[p*p*C]`` (row-major inside the patch), on the encoder's grid."""

    def __init__(self, img_size: tuple[int, int] = (28, 28), in_chans: int = 1,
                 patch_size: tuple[int, int] = (4, 4)) -> None:
        self.img_size, self.in_chans, self.patch_size = tuple(img_size), int(in_chans), tuple(patch_size)
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise SourceError(f"image size {self.img_size} is not a multiple of the patch size {self.patch_size}")
        self.grid = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.name = f"raw-pixels:{self.img_size[0]}x{self.img_size[1]}x{self.in_chans}"

    @classmethod
    def like(cls, source: FeatureSource) -> "RawPixelSource":
        return cls(source.img_size, source.in_chans, source.patch_size)

    def features(self, images: np.ndarray) -> TokenFeatures:
        x = _check_batch(self, images).astype(np.float32) / 255.0          # [N, H, W, C]
        n, (gh, gw), (ph, pw) = len(x), self.grid, self.patch_size
        patches = (x.reshape(n, gh, ph, gw, pw, self.in_chans)
                   .transpose(0, 1, 3, 2, 4, 5).reshape(n, gh * gw, ph * pw * self.in_chans))
        return TokenFeatures(x.reshape(n, -1), patches, self.grid)

    def pooled(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f = self.features(images)
        return f.cls, f.patch_tokens.mean(axis=1)

    def pooling_unavailable(self, pooling: str) -> str | None:
        if pooling == "last4":
            return "raw pixels have no transformer blocks, so no CLS token of the last 4 blocks"
        return _unknown_pooling(pooling)


def pooling_unavailable(source: FeatureSource, pooling: str) -> str | None:
    """Why ``source`` cannot give the global ``pooling`` (None: it can). Sources without a
    ``pooling_unavailable`` method give ``cls`` and ``mean`` only."""
    method = getattr(source, "pooling_unavailable", None)
    if method is not None:
        return method(pooling)
    if pooling in ("cls", "mean"):
        return None
    return _unknown_pooling(pooling) or f"{source.name} gives only the cls and mean poolings"


def pooled_features(source: FeatureSource, images: np.ndarray, poolings: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``{pooling: [N, D'] float32}`` of one batch; SourceError for a pooling the source cannot give."""
    method = getattr(source, "pooled_features", None)
    if method is not None:
        return method(images, tuple(poolings))
    for p in poolings:
        if (reason := pooling_unavailable(source, p)) is not None:
            raise SourceError(reason)
    cls, mean = source.pooled(images)
    return {p: {"cls": cls, "mean": mean}[p] for p in poolings}


def _batches(n: int, batch: int):
    return range(0, n, max(1, int(batch)))


def extract_pooled(source: FeatureSource, images: np.ndarray, poolings: tuple[str, ...] = ("cls", "mean"),
                   batch: int = DEFAULT_BATCH, desc: str = "features") -> dict[str, np.ndarray]:
    """``{pooling: [N, D'] float32}`` of ``images [N, H, W, C]`` for each of ``poolings``, batched."""
    parts: dict[str, list[np.ndarray]] = {p: [] for p in poolings}
    for i in tqdm(_batches(len(images), batch), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        for p, v in pooled_features(source, images[i:i + batch], tuple(poolings)).items():
            parts[p].append(np.asarray(v, dtype=np.float32))
    return {p: np.concatenate(v) for p, v in parts.items()}


def extract_global(source: FeatureSource, images: np.ndarray, batch: int = DEFAULT_BATCH,
                   desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """``(cls [N, D], mean-pooled patch tokens [N, D])`` of ``images [N, H, W, C]``, batched."""
    out = extract_pooled(source, images, ("cls", "mean"), batch, desc)
    return out["cls"], out["mean"]


def extract_patches(source: FeatureSource, images: np.ndarray, batch: int = DEFAULT_BATCH,
                    desc: str = "patch features") -> np.ndarray:
    """Patch tokens ``[N, h*w, D]`` of ``images [N, H, W, C]``, batched."""
    parts = []
    for i in tqdm(_batches(len(images), batch), desc=desc, unit="batch", dynamic_ncols=True, leave=False):
        f = source.features(images[i:i + batch])
        if tuple(f.grid) != tuple(source.grid):
            raise SourceError(f"{source.name} returned grid {f.grid}, expected {source.grid}")
        parts.append(np.asarray(f.patch_tokens, dtype=np.float32))
    return np.concatenate(parts)
