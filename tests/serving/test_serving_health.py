"""Health follows Triton: NOT_SERVING while it is down, SERVING (and calls work) once it is back.

Stops and restarts a real tritonserver (same ports) under a running gateway.
"""

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.client import VitServeClient, VitServeError
from serving.gateway import BackgroundGateway
from serving.grpc_server import ServerOptions
from serving.triton_launcher import TritonLauncher, free_port

SERVICE = "vitserve.v1.VisionEncoder"


def wait_for_status(channel: grpc.Channel, want: int, timeout: float) -> float:
    """Seconds until the gateway's health check reports ``want`` (fails after ``timeout``)."""
    stub = health_pb2_grpc.HealthStub(channel)
    t0 = time.monotonic()
    status = None
    while time.monotonic() - t0 < timeout:
        status = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
        if status == want:
            return time.monotonic() - t0
        time.sleep(0.05)
    pytest.fail(f"health stayed {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} for {timeout}s")


def test_health_follows_triton_down_and_back(exported, fmnist_test_images):
    launcher = TritonLauncher(exported.repository, grpc_port=free_port(), http_port=free_port(),
                              metrics_port=free_port(), stop_grace=5)
    try:
        launcher.start(timeout=120)
        options = ServerOptions(health_interval=0.2)
        with BackgroundGateway(launcher.grpc_url, options=options) as gw, \
                grpc.insecure_channel(gw.target) as channel, VitServeClient(gw.target, timeout=10) as client:
            wait_for_status(channel, health_pb2.HealthCheckResponse.SERVING, 60)
            assert client.embed(fmnist_test_images[:1]).shape[0] == 1

            launcher.stop()
            wait_for_status(channel, health_pb2.HealthCheckResponse.NOT_SERVING, 60)
            with pytest.raises(VitServeError) as e:
                client.embed(fmnist_test_images[:1])
            assert e.value.code == grpc.StatusCode.UNAVAILABLE

            launcher.start(timeout=120)
            wait_for_status(channel, health_pb2.HealthCheckResponse.SERVING, 60)
            assert client.embed(fmnist_test_images[:1]).shape[0] == 1
    finally:
        launcher.stop()
