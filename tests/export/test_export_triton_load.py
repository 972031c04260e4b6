"""The real embedded Triton loads entries with chosen outputs, buckets and lanes and serves every output."""

import numpy as np
import pytest
import torch

from export.options import ExportOptions, TritonOptions
from export.outputs import OutputSelection
from export.repository import export_entries
from export.sources import EncoderSource
from tests.export.conftest import read_manifest
from training.backbone import create_encoder

pytestmark = pytest.mark.slow


def test_triton_serves_extra_outputs_of_every_bucket_and_lane(tmp_path):
    import onnxruntime as ort
    import tritonclient.grpc as grpcclient

    from serving.triton_launcher import TritonLauncher

    torch.manual_seed(0)
    model, spec = create_encoder("vit_small_patch14_reg4_dinov2",
                                 {"img_size": 28, "depth": 2, "embed_dim": 96, "num_heads": 2})
    selection = OutputSelection(layers=(-2,), final_norm=False, registers=True, mean_patch=True)
    repo = tmp_path / "repo"
    paths = export_entries(EncoderSource(model.eval(), spec), repo, "d", ExportOptions(
        outputs=selection, resolutions=[(28, 28), (42, 42)], lanes=True,
        triton=TritonOptions(max_batch_size=8, intra_op_threads=1)))
    assert [p.name for p in paths] == ["d", "d_latency", "d_r42", "d_r42_latency"]
    with TritonLauncher(repo) as triton:
        client = grpcclient.InferenceServerClient(triton.grpc_url.replace("grpc://", ""))
        for path in paths:
            manifest = read_manifest(path)
            names = list(manifest["outputs"])
            h, w = manifest["encoder_spec"]["img_size"]
            images = np.random.default_rng(0).integers(0, 256, (3, h, w, 3), np.uint8)
            inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
            inp.set_data_from_numpy(images)
            result = client.infer(path.name, [inp], outputs=[grpcclient.InferRequestedOutput(n) for n in names])
            session = ort.InferenceSession(str(path / "1/model.onnx"), providers=["CPUExecutionProvider"])
            for name, expected in zip(names, session.run(names, {"images": images})):
                got = result.as_numpy(name)
                assert list(got.shape) == [3, *manifest["outputs"][name]["shape"][1:]], (path.name, name)
                np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{path.name}:{name}")
            config = client.get_model_config(path.name).config
            assert [o.name for o in config.output] == names
