"""A short bounded load test of ``vitserve serve`` (subprocess: gateway + its own Triton).

Concurrent clients mix Embed, Features, StreamFeatures and the HTTP API's embeddings and features for ``VITSERVE_LOAD_SECONDS`` (default 12);
every call must end correct (equal to in-process ONNX Runtime features within 1e-4) or with an
explicit RESOURCE_EXHAUSTED / DEADLINE_EXCEEDED, and the gateway's memory must stay bounded. The
longer run for docs/RELIABILITY.md is ``python tests/reliability/loadtest.py --duration 120``.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.loadtest import Load, Service, fashion_mnist_pool, onnx_reference, run_load

SECONDS = float(os.environ.get("VITSERVE_LOAD_SECONDS", "12"))
CLIENTS = int(os.environ.get("VITSERVE_LOAD_CLIENTS", "16"))


@pytest.mark.slow
def test_bounded_load_every_call_accounted_for(rel_exported):
    pool = fashion_mnist_pool(128)
    cls, tokens = onnx_reference(rel_exported.repository / rel_exported.name, pool)
    with Service(rel_exported.repository, max_in_flight=CLIENTS // 2) as service:
        load = Load(service.target, pool, cls, tokens, (7, 7), atol=1e-4, deadline_s=15.0,
                    http_url=service.http_url)
        report = run_load(load, CLIENTS, SECONDS, service.pid)
        assert service.stop() == 0  # SIGTERM after the load: a clean exit
    print("\nload:", report.summary())
    assert report.failures == [] and report.unaccounted == 0 and report.wrong == 0
    assert report.ok > 0 and set(report.by_rpc) == {"Embed", "Features", "StreamFeatures", "HTTP:embeddings",
                                                     "HTTP:features"}
    # Bounded memory: the gateway holds no per-request state after a call ends.
    assert report.rss_max_mb < report.rss_start_mb + 200, report.summary()
