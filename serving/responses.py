"""The response messages of Embed and Features, built from a model, its prepared batch and its outputs.

Pure functions (numpy arrays in, protobuf messages out); the request layer (``serving.service``)
calls them once Triton has answered.
"""

from __future__ import annotations

import time
from typing import Sequence

import grpc
import numpy as np

from contract.names import ATTENTION_OUTPUT, CLS_OUTPUT, PATCH_OUTPUT, REGISTERS_OUTPUT
from contract.tensors import to_tensor
from protos import vitserve_pb2
from serving.catalog import ServedModel
from serving.errors import RequestError
from serving.pooling import pool_embeddings
from serving.preprocess import PreparedBatch

_PATCH_SOURCE = "patch tokens of the last block after the final norm"
GRID = vitserve_pb2.FeaturesRequest.GRID


def layer_outputs(model: ServedModel, request: vitserve_pb2.FeaturesRequest) -> list[str]:
    """The patch-token outputs a Features request asks for (INVALID_ARGUMENT if not exported);
    ``cls_attention`` among the names is checked here but is not one of them."""
    wanted = [o for o in dict.fromkeys(request.outputs) if o != ATTENTION_OUTPUT] or [PATCH_OUTPUT]
    available = model.token_outputs
    unknown = [o for o in wanted if o not in available]
    if unknown:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"model {model.name!r} exports no patch-token output {', '.join(map(repr, unknown))}; "
                           f"it has {', '.join(available)} (export with --layers to add layers)")
    if request.include_registers and REGISTERS_OUTPUT not in model.outputs:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"model {model.name!r} exports no register tokens (export it with --registers; "
                           f"it has {model.num_prefix_tokens} prefix token(s))")
    if wants_attention(request) and ATTENTION_OUTPUT not in model.outputs:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"model {model.name!r} exports no {ATTENTION_OUTPUT!r} (export it with --attention; "
                           f"it has {', '.join(model.outputs)})")
    return wanted


def wants_attention(request: vitserve_pb2.FeaturesRequest) -> bool:
    """Whether a Features request names ``cls_attention`` among its outputs."""
    return ATTENTION_OUTPUT in request.outputs


def features_outputs(layers: Sequence[str], request: vitserve_pb2.FeaturesRequest) -> list[str]:
    """Every model output a Features request reads: its layers, then CLS, registers and the CLS
    attention if asked for."""
    names = list(layers)
    if request.include_cls:
        names.append(CLS_OUTPUT)
    if request.include_registers:
        names.append(REGISTERS_OUTPUT)
    if wants_attention(request):
        names.append(ATTENTION_OUTPUT)
    return names


def preprocessing(model: ServedModel, batch: PreparedBatch) -> vitserve_pb2.Preprocessing:
    """What was done to the request's images to make them the model's input."""
    g = model.geometry
    return vitserve_pb2.Preprocessing(height=g.height, width=g.width, channels=g.channels,
                                      resized=batch.resized, converted=batch.converted,
                                      resize_mode=model.preprocess.interpolation,
                                      normalization=model.normalization, resize_op=batch.resize_op,
                                      images=batch.images, crop_pct=model.preprocess.crop_pct)


Stamps = tuple[float, float, float, float]  # time.perf_counter() at arrival, start, decoded, inferred


def timing(stamps: Stamps) -> vitserve_pb2.Timing:
    """Queue, decode and inference times of a request, and its total until now."""
    arrived, t0, t1, t2 = stamps
    return vitserve_pb2.Timing(queue_ms=1e3 * (t0 - arrived), decode_ms=1e3 * (t1 - t0),
                               inference_ms=1e3 * (t2 - t1), total_ms=1e3 * (time.perf_counter() - arrived))


def embed_response(model: ServedModel, batch: PreparedBatch, out: dict[str, np.ndarray],
                   request: vitserve_pb2.EmbedRequest, pooling: int, stamps: Stamps) -> vitserve_pb2.EmbedResponse:
    """Global vectors pooled from ``out`` (CLS and/or patch tokens) as an ``EmbedResponse``."""
    emb, source = pool_embeddings(out.get(CLS_OUTPUT), out.get(PATCH_OUTPUT), pooling, request.l2_normalize)
    return vitserve_pb2.EmbedResponse(
        embeddings=to_tensor(emb, request.dtype), model=model.ref(),
        preprocessing=preprocessing(model, batch), source=source, pooling=pooling,
        l2_normalized=request.l2_normalize, timing=timing(stamps))


def features_response(model: ServedModel, batch: PreparedBatch, out: dict[str, np.ndarray],
                      request: vitserve_pb2.FeaturesRequest, layers: Sequence[str],
                      stamps: Stamps) -> vitserve_pb2.FeaturesResponse:
    """Patch features of ``layers`` (``[N, h, w, D]`` in the GRID layout, ``[N, h*w, D]`` as TOKENS),
    plus CLS and registers when asked for."""
    layout = request.layout or GRID
    tensors = []
    for name in layers:
        tokens = out[name]  # [N, h*w, D]
        if layout == GRID:
            tokens = tokens.reshape(len(tokens), model.grid[0], model.grid[1], model.embed_dim)
        tensors.append(to_tensor(tokens, request.dtype))
    first = model.output_entry(layers[0]).get("description")
    response = vitserve_pb2.FeaturesResponse(
        features=tensors[0], grid_height=model.grid[0], grid_width=model.grid[1], patch_size=model.patch_size,
        num_prefix_tokens=model.num_prefix_tokens, layout=layout, model=model.ref(),
        preprocessing=preprocessing(model, batch),
        source=first or (_PATCH_SOURCE if layers[0] == PATCH_OUTPUT else layers[0]))
    for name, tensor in zip(layers, tensors):
        entry = model.output_entry(name)
        response.layers.add(name=name, block=int(entry.get("block", -1)),
                            final_norm=bool(entry.get("final_norm", name == PATCH_OUTPUT)),
                            description=str(entry.get("description", "")), features=tensor)
    if request.include_cls:
        response.cls.CopyFrom(to_tensor(out[CLS_OUTPUT], request.dtype))
    if request.include_registers:
        response.registers.CopyFrom(to_tensor(out[REGISTERS_OUTPUT], request.dtype))
    if wants_attention(request):
        response.cls_attention.CopyFrom(to_tensor(out[ATTENTION_OUTPUT], request.dtype))  # [N, heads, h*w]
    response.timing.CopyFrom(timing(stamps))
    return response
