import os
import threading

import pytest

from serving.triton_launcher import TritonLaunchError, TritonLauncher, free_port
from serving.triton_tree import prepare_server_tree


def test_server_tree_is_prepared_once_even_when_raced(tmp_path):
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(prepare_server_tree(tmp_path)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    tree = results[0]
    stub = tree / "backends" / "python" / "triton_python_backend_stub"
    assert stub.is_file() and os.access(stub, os.X_OK)
    assert os.access(tree / "bin" / "tritonserver", os.X_OK)
    assert not (tree / "python_backend_stubs").exists()
    assert [p.name for p in tmp_path.iterdir()] == [tree.name]  # no temporary leftovers


def test_command_binds_loopback_only(tmp_path):
    launcher = TritonLauncher(tmp_path, grpc_port=free_port())
    cmd = launcher.command(tmp_path / "tree")
    for kind in ("grpc", "http", "metrics"):
        assert f"--{kind}-address=127.0.0.1" in cmd
    assert f"--grpc-port={launcher.grpc_port}" in cmd
    assert len({launcher.grpc_port, launcher.http_port, launcher.metrics_port}) == 3
    assert "--exit-on-error=true" in cmd and f"--model-repository={tmp_path.resolve()}" in cmd


def test_missing_repository_is_reported(tmp_path):
    with pytest.raises(TritonLaunchError, match="is not a directory"):
        TritonLauncher(tmp_path / "nope").start()


def test_model_that_fails_to_load_surfaces_tritons_message(broken_repository):
    launcher = TritonLauncher(broken_repository)
    with pytest.raises(TritonLaunchError) as e:
        launcher.start(timeout=120)
    message = str(e.value)
    assert "failed to load 'broken' version 1" in message
    assert "deliberately broken model for a test" in message
    assert launcher.poll() is not None  # nothing left running
