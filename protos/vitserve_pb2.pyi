from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lane(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LANE_UNSPECIFIED: _ClassVar[Lane]
    THROUGHPUT: _ClassVar[Lane]
    LATENCY: _ClassVar[Lane]

class ResizeOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESIZE_OP_UNSPECIFIED: _ClassVar[ResizeOp]
    RESIZE: _ClassVar[ResizeOp]
    CENTER_CROP: _ClassVar[ResizeOp]
    LETTERBOX: _ClassVar[ResizeOp]

class BucketSelection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUCKET_UNSPECIFIED: _ClassVar[BucketSelection]
    BUCKET_AUTO: _ClassVar[BucketSelection]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
LANE_UNSPECIFIED: Lane
THROUGHPUT: Lane
LATENCY: Lane
RESIZE_OP_UNSPECIFIED: ResizeOp
RESIZE: ResizeOp
CENTER_CROP: ResizeOp
LETTERBOX: ResizeOp
BUCKET_UNSPECIFIED: BucketSelection
BUCKET_AUTO: BucketSelection
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT16: DType

class RawFrame(_message.Message):
    __slots__ = ("data", "height", "width", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "raw")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    raw: RawFrame
    def __init__(self, encoded: _Optional[bytes] = ..., raw: _Optional[_Union[RawFrame, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("data", "shape", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version", "weights_sha256", "lane", "bucket")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    weights_sha256: str
    lane: str
    bucket: ResolutionBucket
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., weights_sha256: _Optional[str] = ..., lane: _Optional[str] = ..., bucket: _Optional[_Union[ResolutionBucket, _Mapping]] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class ImagePreprocessing(_message.Message):
    __slots__ = ("original_height", "original_width", "original_channels", "op", "scale_x", "scale_y", "source_box", "target_box", "conversion")
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    SCALE_X_FIELD_NUMBER: _ClassVar[int]
    SCALE_Y_FIELD_NUMBER: _ClassVar[int]
    SOURCE_BOX_FIELD_NUMBER: _ClassVar[int]
    TARGET_BOX_FIELD_NUMBER: _ClassVar[int]
    CONVERSION_FIELD_NUMBER: _ClassVar[int]
    original_height: int
    original_width: int
    original_channels: int
    op: ResizeOp
    scale_x: float
    scale_y: float
    source_box: Box
    target_box: Box
    conversion: str
    def __init__(self, original_height: _Optional[int] = ..., original_width: _Optional[int] = ..., original_channels: _Optional[int] = ..., op: _Optional[_Union[ResizeOp, str]] = ..., scale_x: _Optional[float] = ..., scale_y: _Optional[float] = ..., source_box: _Optional[_Union[Box, _Mapping]] = ..., target_box: _Optional[_Union[Box, _Mapping]] = ..., conversion: _Optional[str] = ...) -> None: ...

class Preprocessing(_message.Message):
    __slots__ = ("height", "width", "channels", "resized", "converted", "resize_mode", "normalization", "resize_op", "images", "crop_pct")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    RESIZED_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    RESIZE_OP_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    CROP_PCT_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    channels: int
    resized: int
    converted: int
    resize_mode: str
    normalization: str
    resize_op: ResizeOp
    images: _containers.RepeatedCompositeFieldContainer[ImagePreprocessing]
    crop_pct: float
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., resized: _Optional[int] = ..., converted: _Optional[int] = ..., resize_mode: _Optional[str] = ..., normalization: _Optional[str] = ..., resize_op: _Optional[_Union[ResizeOp, str]] = ..., images: _Optional[_Iterable[_Union[ImagePreprocessing, _Mapping]]] = ..., crop_pct: _Optional[float] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("decode_ms", "inference_ms", "total_ms", "queue_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    inference_ms: float
    total_ms: float
    queue_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("model", "images", "l2_normalize", "dtype", "pooling", "lane", "resize_op", "bucket", "version")
    class Pooling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        POOLING_UNSPECIFIED: _ClassVar[EmbedRequest.Pooling]
        CLS: _ClassVar[EmbedRequest.Pooling]
        MEAN_PATCH: _ClassVar[EmbedRequest.Pooling]
        CLS_AND_MEAN_PATCH: _ClassVar[EmbedRequest.Pooling]
    POOLING_UNSPECIFIED: EmbedRequest.Pooling
    CLS: EmbedRequest.Pooling
    MEAN_PATCH: EmbedRequest.Pooling
    CLS_AND_MEAN_PATCH: EmbedRequest.Pooling
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    L2_NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_OP_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    l2_normalize: bool
    dtype: DType
    pooling: EmbedRequest.Pooling
    lane: Lane
    resize_op: ResizeOp
    bucket: BucketSelection
    version: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., l2_normalize: _Optional[bool] = ..., dtype: _Optional[_Union[DType, str]] = ..., pooling: _Optional[_Union[EmbedRequest.Pooling, str]] = ..., lane: _Optional[_Union[Lane, str]] = ..., resize_op: _Optional[_Union[ResizeOp, str]] = ..., bucket: _Optional[_Union[BucketSelection, str]] = ..., version: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("embeddings", "model", "preprocessing", "timing", "source", "pooling", "l2_normalized")
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    L2_NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    embeddings: Tensor
    model: ModelRef
    preprocessing: Preprocessing
    timing: Timing
    source: str
    pooling: EmbedRequest.Pooling
    l2_normalized: bool
    def __init__(self, embeddings: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., source: _Optional[str] = ..., pooling: _Optional[_Union[EmbedRequest.Pooling, str]] = ..., l2_normalized: _Optional[bool] = ...) -> None: ...

class FeaturesRequest(_message.Message):
    __slots__ = ("model", "images", "layout", "dtype", "include_cls", "lane", "resize_op", "outputs", "include_registers", "bucket", "version")
    class Layout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        LAYOUT_UNSPECIFIED: _ClassVar[FeaturesRequest.Layout]
        GRID: _ClassVar[FeaturesRequest.Layout]
        TOKENS: _ClassVar[FeaturesRequest.Layout]
    LAYOUT_UNSPECIFIED: FeaturesRequest.Layout
    GRID: FeaturesRequest.Layout
    TOKENS: FeaturesRequest.Layout
    MODEL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLS_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    RESIZE_OP_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_REGISTERS_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    images: _containers.RepeatedCompositeFieldContainer[Image]
    layout: FeaturesRequest.Layout
    dtype: DType
    include_cls: bool
    lane: Lane
    resize_op: ResizeOp
    outputs: _containers.RepeatedScalarFieldContainer[str]
    include_registers: bool
    bucket: BucketSelection
    version: str
    def __init__(self, model: _Optional[str] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., layout: _Optional[_Union[FeaturesRequest.Layout, str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., include_cls: _Optional[bool] = ..., lane: _Optional[_Union[Lane, str]] = ..., resize_op: _Optional[_Union[ResizeOp, str]] = ..., outputs: _Optional[_Iterable[str]] = ..., include_registers: _Optional[bool] = ..., bucket: _Optional[_Union[BucketSelection, str]] = ..., version: _Optional[str] = ...) -> None: ...

class LayerFeatures(_message.Message):
    __slots__ = ("name", "block", "final_norm", "description", "features")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    FINAL_NORM_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    name: str
    block: int
    final_norm: bool
    description: str
    features: Tensor
    def __init__(self, name: _Optional[str] = ..., block: _Optional[int] = ..., final_norm: _Optional[bool] = ..., description: _Optional[str] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class FeaturesResponse(_message.Message):
    __slots__ = ("features", "cls", "grid_height", "grid_width", "patch_size", "num_prefix_tokens", "layout", "model", "preprocessing", "timing", "source", "layers", "registers", "cls_attention")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CLS_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    REGISTERS_FIELD_NUMBER: _ClassVar[int]
    CLS_ATTENTION_FIELD_NUMBER: _ClassVar[int]
    features: Tensor
    cls: Tensor
    grid_height: int
    grid_width: int
    patch_size: int
    num_prefix_tokens: int
    layout: FeaturesRequest.Layout
    model: ModelRef
    preprocessing: Preprocessing
    timing: Timing
    source: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerFeatures]
    registers: Tensor
    cls_attention: Tensor
    def __init__(self, features: _Optional[_Union[Tensor, _Mapping]] = ..., cls: _Optional[_Union[Tensor, _Mapping]] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., patch_size: _Optional[int] = ..., num_prefix_tokens: _Optional[int] = ..., layout: _Optional[_Union[FeaturesRequest.Layout, str]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., preprocessing: _Optional[_Union[Preprocessing, _Mapping]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., source: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerFeatures, _Mapping]]] = ..., registers: _Optional[_Union[Tensor, _Mapping]] = ..., cls_attention: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "ready", "input_height", "input_width", "input_channels", "embed_dim", "grid_height", "grid_width", "patch_size", "num_prefix_tokens", "encoder_spec_json", "manifest_json", "probe_scores", "max_batch_size", "outputs", "precision", "base_model", "variants", "lane", "lanes", "preferred_batch_sizes", "max_queue_delay_us", "default_resize_op", "crop_pct", "buckets", "versions")
    class ProbeScoresEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LanesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    INPUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PROBE_SCORES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    VARIANTS_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LANES_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RESIZE_OP_FIELD_NUMBER: _ClassVar[int]
    CROP_PCT_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: ModelRef
    ready: bool
    input_height: int
    input_width: int
    input_channels: int
    embed_dim: int
    grid_height: int
    grid_width: int
    patch_size: int
    num_prefix_tokens: int
    encoder_spec_json: str
    manifest_json: str
    probe_scores: _containers.ScalarMap[str, float]
    max_batch_size: int
    outputs: _containers.RepeatedScalarFieldContainer[str]
    precision: str
    base_model: str
    variants: _containers.RepeatedScalarFieldContainer[str]
    lane: str
    lanes: _containers.ScalarMap[str, str]
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_delay_us: int
    default_resize_op: ResizeOp
    crop_pct: float
    buckets: _containers.RepeatedCompositeFieldContainer[ResolutionBucket]
    versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[_Union[ModelRef, _Mapping]] = ..., ready: _Optional[bool] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., input_channels: _Optional[int] = ..., embed_dim: _Optional[int] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., patch_size: _Optional[int] = ..., num_prefix_tokens: _Optional[int] = ..., encoder_spec_json: _Optional[str] = ..., manifest_json: _Optional[str] = ..., probe_scores: _Optional[_Mapping[str, float]] = ..., max_batch_size: _Optional[int] = ..., outputs: _Optional[_Iterable[str]] = ..., precision: _Optional[str] = ..., base_model: _Optional[str] = ..., variants: _Optional[_Iterable[str]] = ..., lane: _Optional[str] = ..., lanes: _Optional[_Mapping[str, str]] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_delay_us: _Optional[int] = ..., default_resize_op: _Optional[_Union[ResizeOp, str]] = ..., crop_pct: _Optional[float] = ..., buckets: _Optional[_Iterable[_Union[ResolutionBucket, _Mapping]]] = ..., versions: _Optional[_Iterable[str]] = ...) -> None: ...

class ResolutionBucket(_message.Message):
    __slots__ = ("height", "width", "grid_height", "grid_width", "model")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    GRID_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRID_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    grid_height: int
    grid_width: int
    model: str
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ..., grid_height: _Optional[int] = ..., grid_width: _Optional[int] = ..., model: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelControlRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelControlResponse(_message.Message):
    __slots__ = ("model", "state", "info", "elapsed_ms", "served_models")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: str
    info: ModelInfo
    elapsed_ms: float
    served_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., state: _Optional[str] = ..., info: _Optional[_Union[ModelInfo, _Mapping]] = ..., elapsed_ms: _Optional[float] = ..., served_models: _Optional[_Iterable[str]] = ...) -> None: ...

class ListRepositoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RepositoryModel(_message.Message):
    __slots__ = ("name", "version", "state", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    state: str
    reason: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListRepositoryResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RepositoryModel]
    def __init__(self, models: _Optional[_Iterable[_Union[RepositoryModel, _Mapping]]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class StreamFeaturesRequest(_message.Message):
    __slots__ = ("frame_id", "request", "latest_only")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LATEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    request: FeaturesRequest
    latest_only: bool
    def __init__(self, frame_id: _Optional[int] = ..., request: _Optional[_Union[FeaturesRequest, _Mapping]] = ..., latest_only: _Optional[bool] = ...) -> None: ...

class StreamFeaturesResponse(_message.Message):
    __slots__ = ("frame_id", "skipped", "features", "error_code", "error_message")
    FRAME_ID_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    frame_id: int
    skipped: bool
    features: FeaturesResponse
    error_code: int
    error_message: str
    def __init__(self, frame_id: _Optional[int] = ..., skipped: _Optional[bool] = ..., features: _Optional[_Union[FeaturesResponse, _Mapping]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ...) -> None: ...
