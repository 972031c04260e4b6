import json
import os
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import (DynamicBatching, InstanceGroup, TensorSpec, TritonConfigError,
                                  TritonModelConfig, parse_pbtxt, triton_dtype)

DATA = Path(__file__).parent / "data"
EXPECTED = DATA / "config_python_backend.pbtxt"
# VITSERVE_REGENERATE_EXPECTED=1 rewrites the saved file after an intended change (then review the diff).
REGENERATE = os.environ.get("VITSERVE_REGENERATE_EXPECTED") == "1"


def encoder_config(**changes) -> TritonModelConfig:
    base = dict(
        name="fmnist_vit",
        backend="python",
        max_batch_size=64,
        inputs=(TensorSpec("images", np.uint8, (28, 28, 1)),),
        outputs=(TensorSpec("cls", np.float32, (192,)),
                 TensorSpec("patch_tokens", np.float32, (49, 192))),
        dynamic_batching=DynamicBatching(max_queue_delay_microseconds=500, preferred_batch_size=(8, 32)),
        instance_groups=(InstanceGroup(count=2, kind="CPU"),),
        parameters={"vitserve_manifest": json.dumps({"name": "fmnist_vit", "version": 1}),
                    "intra_op_threads": "2"},
    )
    base.update(changes)
    return TritonModelConfig(**base)


def test_pbtxt_equals_saved_expected_file():
    text = encoder_config().to_pbtxt()
    if REGENERATE:
        EXPECTED.write_text(text)
    assert text == EXPECTED.read_text()


def test_saved_file_parses_back_to_the_same_message():
    parsed = text_format.Parse(EXPECTED.read_text(), mc.ModelConfig())
    assert parsed == encoder_config().to_proto()
    assert parsed == parse_pbtxt(EXPECTED.read_text())
    assert parsed.backend == "python" and parsed.max_batch_size == 64
    assert parsed.input[0].data_type == mc.TYPE_UINT8 and list(parsed.input[0].dims) == [28, 28, 1]
    assert [o.name for o in parsed.output] == ["cls", "patch_tokens"]
    assert list(parsed.output[1].dims) == [49, 192]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(parsed.dynamic_batching.preferred_batch_size) == [8, 32]
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert json.loads(parsed.parameters["vitserve_manifest"].string_value)["version"] == 1


def test_onnxruntime_backend_sets_platform_and_gpu_kind():
    config = encoder_config(backend="onnxruntime", instance_groups=(InstanceGroup(1, "GPU"),))
    parsed = parse_pbtxt(config.to_pbtxt())
    assert parsed.backend == "onnxruntime" and parsed.platform == "onnxruntime_onnx"
    assert parsed.default_model_filename == "model.onnx"
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_without_dynamic_batching_there_is_no_batcher():
    assert not parse_pbtxt(encoder_config(dynamic_batching=None).to_pbtxt()).HasField("dynamic_batching")


@pytest.mark.parametrize("changes, message", [
    ({"backend": "tensorflow"}, "backend"),
    ({"max_batch_size": 0}, "dynamic batching needs"),
    ({"inputs": (TensorSpec("images", np.uint8, (28, 0, 1)),)}, "invalid dims"),
    ({"inputs": (TensorSpec("cls", np.uint8, (28, 28, 1)),)}, "unique"),
    ({"inputs": (TensorSpec("images", np.complex64, (2,)),)}, "no Triton data type"),
    ({"dynamic_batching": DynamicBatching(preferred_batch_size=(128,))}, "preferred batch size"),
    ({"instance_groups": (InstanceGroup(count=0),)}, "instance group"),
])
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(TritonConfigError, match=message):
        encoder_config(**changes).to_pbtxt()


def test_dtype_names():
    assert triton_dtype(np.uint8) == "TYPE_UINT8"
    assert triton_dtype("float32") == "TYPE_FP32"
    assert triton_dtype(np.float16) == "TYPE_FP16"
