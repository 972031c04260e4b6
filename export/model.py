"""Triton Python-backend model: ONNX Runtime on the ``model.onnx`` next to this file.

Copied verbatim into ``REPO/<name>/<version>/model.py``. It runs inside Triton's Python stub process,
so it imports only the standard library, numpy, onnxruntime and ``triton_python_backend_utils``
(the last one only exists there, hence the guarded import). The batching logic is the pure function
``run_batched`` so it can be tested without Triton.

Why one ORT run per ``execute``: Triton's dynamic batcher hands ``execute`` all the requests it
gathered; concatenating their images into one ``[sum N_i, H, W, C]`` run is what turns many small
requests into one efficient matrix product.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

try:  # present only inside Triton's Python backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - exercised only outside Triton
    pb_utils = None

# Copies of contract.names.INPUT_NAME and DEFAULT_OUTPUTS: this file runs inside Triton's Python stub,
# copied alone into each model repository, where vitserve is not installed, so it imports no project module.
INPUT_NAME = "images"
OUTPUT_NAMES = ("cls", "patch_tokens")
THREADS_PARAMETER = "intra_op_threads"  # config.pbtxt string parameter; "0" or absent: ORT default


def make_session(onnx_path: str | bytes, intra_op_threads: int = 0, providers: Sequence[Any] | None = None,
                 ) -> ort.InferenceSession:
    """An ORT session of a model file's path or bytes; ``intra_op_threads=0``: one thread per physical core."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(intra_op_threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return ort.InferenceSession(onnx_path, options, providers=list(providers or ["CPUExecutionProvider"]))


def item_shape(session: ort.InferenceSession, input_name: str = INPUT_NAME) -> tuple[int, ...]:
    """Per-image input shape ``(H, W, C)`` declared by the ONNX graph (batch axis dropped)."""
    for inp in session.get_inputs():
        if inp.name == input_name:
            return tuple(int(d) for d in inp.shape[1:])
    raise ValueError(f"ONNX graph has no input named {input_name!r}")


def request_error(images: np.ndarray | None, expected: Sequence[int]) -> str | None:
    """Why ``images`` cannot be served (``None`` when it can): needs uint8 ``[N >= 1, *expected]``."""
    if images is None:
        return f"request has no '{INPUT_NAME}' input"
    want = "uint8 [N, " + ", ".join(str(d) for d in expected) + "]"
    if images.dtype != np.uint8:
        return f"'{INPUT_NAME}' must be {want}, got dtype {images.dtype}"
    if images.ndim != len(expected) + 1 or tuple(images.shape[1:]) != tuple(expected):
        return f"'{INPUT_NAME}' must be {want}, got shape {list(images.shape)}"
    if images.shape[0] == 0:
        return f"'{INPUT_NAME}' holds no images"
    return None


def run_batched(
    session: ort.InferenceSession,
    batches: Sequence[np.ndarray],
    input_name: str = INPUT_NAME,
    output_names: Sequence[str] = OUTPUT_NAMES,
) -> list[dict[str, np.ndarray]]:
    """Run several requests' images ``[N_i, H, W, C]`` as ONE ORT call, then split per request.

    Returns, per request, ``{output: array [N_i, ...]}`` in the order given.
    """
    if not batches:
        return []
    sizes = [len(b) for b in batches]
    images = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
    outputs = session.run(list(output_names), {input_name: np.ascontiguousarray(images)})
    bounds = np.cumsum(sizes)[:-1]
    per_output = [np.split(out, bounds, axis=0) for out in outputs]
    return [{name: parts[i] for name, parts in zip(output_names, per_output)}
            for i in range(len(batches))]


def requested_union(output_names: Sequence[str], requested: Sequence[Sequence[str]]) -> list[str]:
    """The outputs one ORT run must compute for requests asking for ``requested`` (model order).

    A request that names no output gets every output (Triton's rule), so it pulls in all of them.
    Computing only what was asked spares copying unasked tensors (a ViT-S/16 ``patch_tokens`` is
    300 KB an image) through the stub's shared memory when a client wants only ``cls``.
    """
    if any(len(r) == 0 for r in requested):
        return list(output_names)
    wanted = {name for r in requested for name in r}
    return [name for name in output_names if name in wanted]


def _parameter(model_config: dict[str, Any], key: str, default: str) -> str:
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    return value if value.strip() else default


class TritonPythonModel:
    """Triton entry point: ``initialize`` opens the session, ``execute`` serves a gathered batch."""

    def initialize(self, args: dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        here = os.path.join(args.get("model_repository", ""), args.get("model_version", ""))
        if not os.path.isfile(os.path.join(here, "model.onnx")):
            here = os.path.dirname(os.path.abspath(__file__))
        providers: list[Any] = ["CPUExecutionProvider"]
        if (args.get("model_instance_kind") == "GPU"
                and "CUDAExecutionProvider" in ort.get_available_providers()):
            device_id = int(args.get("model_instance_device_id", 0))
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        threads = int(_parameter(model_config, THREADS_PARAMETER, "0"))
        self.session = make_session(os.path.join(here, "model.onnx"), threads, providers)
        self.item_shape = item_shape(self.session)
        # cls, patch_tokens and whatever outputs were chosen at export (layers, registers, mean_patch)
        self.output_names = [o.name for o in self.session.get_outputs()]
        pb_utils.Logger.log_info(
            f"vitserve model {args.get('model_name')}: ORT {ort.__version__} on "
            f"{self.session.get_providers()[0]}, intra-op threads {threads or 'default'}, "
            f"input [N, {', '.join(map(str, self.item_shape))}]")

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        good: list[int] = []
        arrays: list[np.ndarray] = []
        asked: list[list[str]] = []
        for i, request in enumerate(requests):
            tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
            images = None if tensor is None else tensor.as_numpy()
            error = request_error(images, self.item_shape)
            if error is not None:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(error))
            else:
                good.append(i)
                arrays.append(images)
                asked.append([n for n in request.requested_output_names() if n in self.output_names])
        if arrays:
            names = requested_union(self.output_names, asked)
            try:
                results = run_batched(self.session, arrays, output_names=names)
            except Exception as e:  # ORT failure: every request of this batch gets the message
                message = f"ONNX Runtime failed on a batch of {sum(map(len, arrays))} images: {e}"
                for i in good:
                    responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
                return responses
            for i, want, outputs in zip(good, asked, results):
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()
                                    if not want or name in want])
        return responses

    def finalize(self) -> None:
        self.session = None
