"""export/model.py outside Triton: the pure batching function with ONNX Runtime, and execute() with a
stand-in for triton_python_backend_utils (the real one exists only inside Triton's stub process)."""

import ast
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from export import model as triton_model
from export.model import make_session, request_error, run_batched

MODEL_PY = Path(triton_model.__file__)


@pytest.fixture(scope="module")
def session(exported):
    return make_session(str(exported / "1" / "model.onnx"), intra_op_threads=1)


class CountingSession:
    def __init__(self, session):
        self.session, self.calls = session, []

    def run(self, names, feeds):
        self.calls.append(feeds["images"].shape)
        return self.session.run(names, feeds)


def test_run_batched_is_one_ort_run_split_per_request(session, fmnist_images):
    batches = [fmnist_images[:1], fmnist_images[1:4], fmnist_images[4:21]]  # 1, 3, 17 images
    counting = CountingSession(session)
    results = run_batched(counting, batches)
    assert counting.calls == [(21, 28, 28, 1)]
    assert len(results) == 3
    for batch, result in zip(batches, results):
        cls, patches = session.run(["cls", "patch_tokens"], {"images": batch})
        assert result["cls"].shape == (len(batch), 192)
        assert result["patch_tokens"].shape == (len(batch), 49, 192)
        np.testing.assert_allclose(result["cls"], cls, atol=1e-5)
        np.testing.assert_allclose(result["patch_tokens"], patches, atol=1e-5)


def test_run_batched_of_nothing_runs_nothing(session):
    counting = CountingSession(session)
    assert run_batched(counting, []) == [] and counting.calls == []


def test_request_error_messages():
    ok = np.zeros((2, 28, 28, 1), np.uint8)
    assert request_error(ok, (28, 28, 1)) is None
    assert "no 'images' input" in request_error(None, (28, 28, 1))
    assert "dtype float32" in request_error(ok.astype(np.float32), (28, 28, 1))
    assert "shape [2, 28, 28]" in request_error(ok[..., 0], (28, 28, 1))
    assert "no images" in request_error(ok[:0], (28, 28, 1))


def test_model_py_imports_only_what_the_triton_stub_has():
    allowed = {"__future__", "json", "os", "typing", "numpy", "onnxruntime",
               "triton_python_backend_utils"}
    tree = ast.parse(MODEL_PY.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= allowed, f"model.py imports {sorted(imported - allowed)}"


def test_model_py_copies_of_the_contract_names_match_it():
    from contract.names import DEFAULT_OUTPUTS, INPUT_NAME

    assert triton_model.INPUT_NAME == INPUT_NAME and triton_model.OUTPUT_NAMES == DEFAULT_OUTPUTS


def test_model_py_loads_standalone_without_torch_or_vitserve(tmp_path):
    standalone = tmp_path / "model.py"
    standalone.write_text(MODEL_PY.read_text())
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('m', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "bad = [n for n in ('torch', 'timm', 'export', 'training') if n in sys.modules]; "
            "sys.exit(f'imported {bad}' if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code, str(standalone)], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class FakeRequest(dict):
    """A request: its input tensors by name, and the outputs it asks for (none: all of them)."""

    def __init__(self, inputs=None, requested=()):
        super().__init__(inputs or {})
        self.requested = list(requested)

    def requested_output_names(self):
        return self.requested


class FakeResponse:
    def __init__(self, output_tensors=None, error=None):
        self.output_tensors, self.error = output_tensors or [], error


def fake_pb_utils():
    return types.SimpleNamespace(
        Tensor=FakeTensor,
        InferenceResponse=FakeResponse,
        TritonError=lambda message: message,
        get_input_tensor_by_name=lambda request, name: request.get(name),
        Logger=types.SimpleNamespace(log_info=lambda message: None),
    )


def test_execute_serves_good_requests_in_one_run_and_rejects_bad_ones(exported, fmnist_images,
                                                                      monkeypatch):
    monkeypatch.setattr(triton_model, "pb_utils", fake_pb_utils())
    config = {"parameters": {"intra_op_threads": {"string_value": "1"}}}
    m = triton_model.TritonPythonModel()
    m.initialize({"model_config": json.dumps(config), "model_repository": str(exported),
                  "model_version": "1", "model_name": "fmnist", "model_instance_kind": "CPU"})
    counting = CountingSession(m.session)
    m.session = counting
    requests = [
        FakeRequest({"images": FakeTensor("images", fmnist_images[:2])}),
        FakeRequest({"images": FakeTensor("images", fmnist_images[:1, :27])}),  # wrong shape
        FakeRequest(),  # no input
        FakeRequest({"images": FakeTensor("images", fmnist_images[2:5])}),
    ]
    responses = m.execute(requests)
    assert counting.calls == [(5, 28, 28, 1)]
    assert "shape [1, 27, 28, 1]" in responses[1].error and "no 'images'" in responses[2].error
    for response, n in ((responses[0], 2), (responses[3], 3)):
        assert response.error is None
        outputs = {t.name: t.array for t in response.output_tensors}
        assert outputs["cls"].shape == (n, 192) and outputs["patch_tokens"].shape == (n, 49, 192)


def test_execute_reports_an_ort_failure_to_every_request(exported, fmnist_images, monkeypatch):
    monkeypatch.setattr(triton_model, "pb_utils", fake_pb_utils())
    m = triton_model.TritonPythonModel()
    m.initialize({"model_config": "{}", "model_repository": str(exported), "model_version": "1"})

    class Broken:
        def run(self, names, feeds):
            raise RuntimeError("device lost")

    m.session = Broken()
    responses = m.execute([FakeRequest({"images": FakeTensor("images", fmnist_images[:1])})] * 2)
    assert all("device lost" in r.error for r in responses)


def test_execute_computes_and_returns_only_the_outputs_asked_for(exported, fmnist_images, monkeypatch):
    monkeypatch.setattr(triton_model, "pb_utils", fake_pb_utils())
    m = triton_model.TritonPythonModel()
    m.initialize({"model_config": "{}", "model_repository": str(exported), "model_version": "1"})
    names_run = []

    class Recording:
        def __init__(self, session):
            self.session = session

        def run(self, names, feeds):
            names_run.append(list(names))
            return self.session.run(names, feeds)

    m.session = Recording(m.session)
    images = FakeTensor("images", fmnist_images[:2])
    only_cls = m.execute([FakeRequest({"images": images}, ["cls"])] * 2)
    assert names_run == [["cls"]]
    assert [[t.name for t in r.output_tensors] for r in only_cls] == [["cls"], ["cls"]]
    # one request asking for cls, one for everything (no names): one run of every output, and
    # each request still gets only what it asked for
    mixed = m.execute([FakeRequest({"images": images}, ["cls"]), FakeRequest({"images": images})])
    assert names_run[-1] == ["cls", "patch_tokens"]
    assert [t.name for t in mixed[0].output_tensors] == ["cls"]
    assert [t.name for t in mixed[1].output_tensors] == ["cls", "patch_tokens"]
    expected_cls = m.session.session.run(["cls"], {"images": fmnist_images[:2]})[0]
    np.testing.assert_allclose(only_cls[0].output_tensors[0].array, expected_cls, atol=1e-6)


def test_requested_union_keeps_model_order_and_treats_no_names_as_all():
    names = ["cls", "patch_tokens", "registers"]
    assert triton_model.requested_union(names, [["registers"], ["cls"]]) == ["cls", "registers"]
    assert triton_model.requested_union(names, [["cls"], []]) == names
    assert triton_model.requested_union(names, []) == []  # no request: nothing to compute
