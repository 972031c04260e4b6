"""The vitserve API's messages on the client side: requests built from images and options, and
responses turned into numpy arrays and frozen dataclasses (grpcio-free; numpy, protobuf, contract).

Images may be uint8 arrays ``[H, W]``, ``[H, W, C]`` or a batch ``[N, H, W, C]`` (sent as raw frames),
``bytes`` of an encoded file (PNG/JPEG/WebP/BMP), or file paths (read and sent encoded), either one
image or a list of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Tuple, Union

import grpc
import numpy as np

from google.protobuf import json_format

from contract.tensors import tensor_to_numpy
from protos import vitserve_pb2

ImageLike = Union[np.ndarray, bytes, bytearray, memoryview, str, Path]
Images = Union[ImageLike, Sequence[ImageLike]]
Frame = Tuple[int, Images]  # (frame_id, the images of that control step)

_DTYPES = {"float32": vitserve_pb2.FLOAT32, "fp32": vitserve_pb2.FLOAT32,
           "float16": vitserve_pb2.FLOAT16, "fp16": vitserve_pb2.FLOAT16}
_LAYOUTS = {"grid": vitserve_pb2.FeaturesRequest.GRID, "tokens": vitserve_pb2.FeaturesRequest.TOKENS}
_Pooling = vitserve_pb2.EmbedRequest.Pooling
POOLINGS = {"cls": _Pooling.CLS, "mean": _Pooling.MEAN_PATCH, "both": _Pooling.CLS_AND_MEAN_PATCH}
LANES = {"": vitserve_pb2.LANE_UNSPECIFIED, "default": vitserve_pb2.LANE_UNSPECIFIED,
         "throughput": vitserve_pb2.THROUGHPUT, "latency": vitserve_pb2.LATENCY}
BUCKETS = {"": vitserve_pb2.BUCKET_UNSPECIFIED, "default": vitserve_pb2.BUCKET_UNSPECIFIED,
           "auto": vitserve_pb2.BUCKET_AUTO}
RESIZE_OPS = {"": vitserve_pb2.RESIZE_OP_UNSPECIFIED, "default": vitserve_pb2.RESIZE_OP_UNSPECIFIED,
              "resize": vitserve_pb2.RESIZE, "center_crop": vitserve_pb2.CENTER_CROP,
              "letterbox": vitserve_pb2.LETTERBOX}


@dataclass(frozen=True)
class FeaturesResult:
    """Dense patch features ``[N, h, w, D]`` (grid) or ``[N, h*w, D]`` (tokens) and what produced them."""

    features: np.ndarray
    cls: np.ndarray | None
    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int
    model: dict[str, str]
    preprocessing: dict[str, Any]
    timing: dict[str, float]
    source: str = ""
    # Every patch-token output asked for (``outputs=``), by name, in the request's layout.
    layers: dict[str, np.ndarray] = field(default_factory=dict)
    registers: np.ndarray | None = None  # [N, R, D] with include_registers
    # [N, heads, h*w] with "cls_attention" among ``outputs`` (a model exported with --attention)
    cls_attention: np.ndarray | None = None


@dataclass(frozen=True)
class ModelDescription:
    """One served model as ``ListModels`` reports it."""

    name: str
    version: str
    weights_sha256: str
    ready: bool
    input_size: tuple[int, int]
    input_channels: int
    embed_dim: int
    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int
    encoder_spec: dict[str, Any]
    manifest: dict[str, Any]
    probe_scores: dict[str, float] = field(default_factory=dict)
    max_batch_size: int = 0
    outputs: tuple[str, ...] = ()
    precision: str = ""
    base_model: str = ""
    variants: tuple[str, ...] = ()
    lane: str = ""
    lanes: dict[str, str] = field(default_factory=dict)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    default_resize_op: str = ""
    crop_pct: float = 1.0
    # Resolution buckets ``{"height", "width", "grid_height", "grid_width", "model"}`` and loaded versions.
    buckets: tuple[dict[str, Any], ...] = ()
    versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class EmbedResult:
    """Embeddings and what produced them (``VitServeClient.embed_result``)."""

    embeddings: np.ndarray
    model: dict[str, str]
    preprocessing: dict[str, Any]
    timing: dict[str, float]
    source: str


@dataclass(frozen=True)
class ModelControlResult:
    """The outcome of LoadModel / UnloadModel / ReloadModel."""

    model: str
    state: str
    info: "ModelDescription | None"
    elapsed_ms: float
    served_models: tuple[str, ...]

def _raw(array: np.ndarray) -> vitserve_pb2.Image:
    h, w, c = array.shape
    return vitserve_pb2.Image(raw=vitserve_pb2.RawFrame(
        data=np.ascontiguousarray(array).tobytes(), height=h, width=w, channels=c))


def _array_images(array: np.ndarray) -> list[vitserve_pb2.Image]:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (pixels 0..255), got {array.dtype}; "
                         f"convert with (x * 255).round().clip(0, 255).astype(np.uint8) if they are in [0, 1]")
    if array.ndim == 2:
        return [_raw(array[..., None])]
    if array.ndim == 3:
        if array.shape[-1] not in (1, 3):
            raise ValueError(f"a 3-D image array must be [H, W, C] with C = 1 or 3, got {array.shape}; "
                             f"a batch of grey images is [N, H, W, 1]")
        return [_raw(array)]
    if array.ndim == 4:
        if array.shape[-1] not in (1, 3):
            raise ValueError(f"a batch array must be [N, H, W, C] with C = 1 or 3, got {array.shape}")
        return [_raw(a) for a in array]
    raise ValueError(f"image arrays are [H, W], [H, W, C] or [N, H, W, C]; got shape {array.shape}")


def _one(item: ImageLike) -> list[vitserve_pb2.Image]:
    if isinstance(item, np.ndarray):
        return _array_images(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return [vitserve_pb2.Image(encoded=bytes(item))]
    if isinstance(item, (str, Path)):
        path = Path(item)
        try:
            return [vitserve_pb2.Image(encoded=path.read_bytes())]
        except OSError as e:
            raise ValueError(f"cannot read image file {path}: {e}") from e
    raise TypeError(f"unsupported image type {type(item).__name__}; pass a uint8 numpy array, "
                    f"encoded bytes or a file path")


def to_proto_images(images: Images) -> list[vitserve_pb2.Image]:
    """Request ``Image`` messages for one image or a sequence of them (arrays, bytes, paths)."""
    items: Iterable[ImageLike]
    if isinstance(images, (np.ndarray, bytes, bytearray, memoryview, str, Path)):
        items = [images]
    else:
        items = images
    out = [m for item in items for m in _one(item)]
    if not out:
        raise ValueError("no images given")
    return out


def _dtype(name: str) -> int:
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {name!r}") from None


def _layout(name: str) -> int:
    try:
        return _LAYOUTS[name.lower()]
    except KeyError:
        raise ValueError(f"layout must be 'grid' or 'tokens', got {name!r}") from None


def _message_dict(message: Any) -> dict[str, Any]:
    """A response message as a dict with every field (enums by name, nested messages as dicts)."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True)


def _enum(table: dict[str, int], name: str, what: str) -> int:
    try:
        return table[name.lower()]
    except KeyError:
        raise ValueError(f"{what} must be one of {', '.join(k for k in table if k)}, got {name!r}") from None


def features_result(response: vitserve_pb2.FeaturesResponse) -> FeaturesResult:
    return FeaturesResult(
        features=tensor_to_numpy(response.features),
        cls=tensor_to_numpy(response.cls) if response.HasField("cls") else None,
        grid=(response.grid_height, response.grid_width),
        patch_size=response.patch_size,
        num_prefix_tokens=response.num_prefix_tokens,
        model=_message_dict(response.model),
        preprocessing=_message_dict(response.preprocessing),
        timing=_message_dict(response.timing),
        source=response.source,
        layers={layer.name: tensor_to_numpy(layer.features) for layer in response.layers},
        registers=tensor_to_numpy(response.registers) if response.HasField("registers") else None,
        cls_attention=tensor_to_numpy(response.cls_attention) if response.HasField("cls_attention") else None)


class VitServeError(RuntimeError):
    """A call failed; ``code`` is the gRPC status code, ``details`` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class StreamResult:
    """The answer to one streamed frame: its features, or ``skipped`` (stale), or a per-frame ``error``."""

    frame_id: int
    skipped: bool
    features: FeaturesResult | None
    error: VitServeError | None = None


def stream_result(response: vitserve_pb2.StreamFeaturesResponse) -> StreamResult:
    error = None
    if response.error_code:
        code = next((c for c in grpc.StatusCode if c.value[0] == response.error_code), grpc.StatusCode.UNKNOWN)
        error = VitServeError(code, response.error_message)
    features = features_result(response.features) if response.HasField("features") else None
    return StreamResult(response.frame_id, response.skipped, features, error)


def model_description(info: vitserve_pb2.ModelInfo) -> ModelDescription:
    return ModelDescription(
        name=info.model.name, version=info.model.version, weights_sha256=info.model.weights_sha256,
        ready=info.ready, input_size=(info.input_height, info.input_width),
        input_channels=info.input_channels, embed_dim=info.embed_dim,
        grid=(info.grid_height, info.grid_width), patch_size=info.patch_size,
        num_prefix_tokens=info.num_prefix_tokens,
        encoder_spec=json.loads(info.encoder_spec_json or "{}"),
        manifest=json.loads(info.manifest_json or "{}"),
        probe_scores=dict(info.probe_scores), max_batch_size=info.max_batch_size, outputs=tuple(info.outputs),
        precision=info.precision, base_model=info.base_model, variants=tuple(info.variants), lane=info.lane,
        lanes=dict(info.lanes), preferred_batch_sizes=tuple(info.preferred_batch_sizes),
        max_queue_delay_us=info.max_queue_delay_us,
        default_resize_op=vitserve_pb2.ResizeOp.Name(info.default_resize_op), crop_pct=info.crop_pct,
        buckets=tuple(_message_dict(b) for b in info.buckets), versions=tuple(info.versions))


def control_result(response: vitserve_pb2.ModelControlResponse) -> ModelControlResult:
    return ModelControlResult(
        model=response.model, state=response.state,
        info=model_description(response.info) if response.HasField("info") else None,
        elapsed_ms=response.elapsed_ms, served_models=tuple(response.served_models))


def repository_models(response: vitserve_pb2.ListRepositoryResponse) -> list[dict[str, str]]:
    """Each repository entry as ``{"name", "version", "state", "reason"}``."""
    return [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in response.models]


def _pooling(name: str) -> int:
    try:
        return POOLINGS[name.lower()]
    except KeyError:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {name!r}") from None


def _version(version: str | int) -> str:
    text = str(version).strip()
    if text and (not text.isdigit() or int(text) < 1):
        raise ValueError(f"version must be an integer >= 1 (or empty for the newest), got {version!r}")
    return text


def embed_request(images: Images, model: str, l2_normalize: bool, dtype: str,
                  pooling: str = "cls", lane: str = "", resize_op: str = "", bucket: str = "",
                  version: str | int = "") -> vitserve_pb2.EmbedRequest:
    return vitserve_pb2.EmbedRequest(model=model, images=to_proto_images(images),
                                     l2_normalize=l2_normalize, dtype=_dtype(dtype), pooling=_pooling(pooling),
                                     lane=_enum(LANES, lane, "lane"),
                                     resize_op=_enum(RESIZE_OPS, resize_op, "resize_op"),
                                     bucket=_enum(BUCKETS, bucket, "bucket"), version=_version(version))


def features_request(images: Images, model: str, layout: str, include_cls: bool,
                     dtype: str, lane: str = "", resize_op: str = "", outputs: Sequence[str] = (),
                     include_registers: bool = False, bucket: str = "",
                     version: str | int = "") -> vitserve_pb2.FeaturesRequest:
    if isinstance(outputs, str):
        outputs = [outputs]
    return vitserve_pb2.FeaturesRequest(model=model, images=to_proto_images(images),
                                        layout=_layout(layout), include_cls=include_cls,
                                        dtype=_dtype(dtype), lane=_enum(LANES, lane, "lane"),
                                        resize_op=_enum(RESIZE_OPS, resize_op, "resize_op"),
                                        outputs=list(outputs), include_registers=include_registers,
                                        bucket=_enum(BUCKETS, bucket, "bucket"), version=_version(version))


def stream_request(frame: Frame, model: str, layout: str, include_cls: bool, dtype: str,
                   latest_only: bool, lane: str = "", resize_op: str = "", bucket: str = "",
                   version: str | int = "") -> vitserve_pb2.StreamFeaturesRequest:
    frame_id, images = frame
    return vitserve_pb2.StreamFeaturesRequest(
        frame_id=frame_id, latest_only=latest_only,
        request=features_request(images, model, layout, include_cls, dtype, lane, resize_op, bucket=bucket,
                                 version=version))


def embed_result(response: vitserve_pb2.EmbedResponse) -> EmbedResult:
    return EmbedResult(embeddings=tensor_to_numpy(response.embeddings), model=_message_dict(response.model),
                       preprocessing=_message_dict(response.preprocessing),
                       timing=_message_dict(response.timing), source=response.source)
