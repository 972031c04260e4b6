"""Prometheus metrics of the gateway, on their own registry and HTTP port (``--metrics-port``).

Names: ``vitserve_requests_total`` and ``vitserve_request_errors_total`` {rpc, model, code},
``vitserve_request_latency_seconds`` {rpc, model} (histogram), ``vitserve_request_images``
{rpc, model} (images per request), ``vitserve_triton_batch_size`` {model} (images per Triton call,
after the gateway splits a request by ``max_batch_size``), ``vitserve_requests_in_flight``,
``vitserve_stream_frames_total`` {model, outcome: ran / skipped / error}; with an embedded Triton,
``vitserve_triton_restarts_total`` (restarts by the launcher's supervisor) and ``vitserve_triton_up``
(1 while the embedded tritonserver runs, 0 while it is down and being restarted); the HTTP API's
``vitserve_http_requests_total`` {route, method, status} and ``vitserve_http_request_latency_seconds``
{route}.

Autoscaling signals (what an HPA scales replicas on; CPU is a poor one for an inference server):

- ``vitserve_inflight_ratio`` (gauge): RPCs in flight / ``--max-in-flight``, read at scrape time. At 1
  the replica refuses new calls RESOURCE_EXHAUSTED, so scale well before: the HPA in ``deploy/``
  targets an average of 0.5 per pod (``autoscaling/v2``, ``type: Pods``, metric
  ``vitserve_inflight_ratio``, ``target.averageValue: "500m"``, exposed to the HPA by
  prometheus-adapter).
- ``vitserve_queue_wait_seconds`` {model} (histogram): how long requests waited in Triton's queue
  before Triton started them (dynamic batcher and busy instances). Read from Triton's own statistics
  (``queue`` count and ns per model, polled every ``QUEUE_POLL_S``; ``serving.queue_stats``), since
  the gateway itself never queues (past ``--max-in-flight`` it refuses) and only Triton knows when it
  started a request. Triton reports totals, not one figure per request, so each request of a poll
  interval is counted at that interval's mean: ``_sum`` and ``_count`` are exact (the mean queue wait
  ``rate(_sum[1m]) / rate(_count[1m])`` is the figure to alert or scale on, e.g. above 50 ms), the
  buckets are those of the per-interval means.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from serving.triton_events import DOWN_EVENTS, EVENT_RESTARTED

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
QUEUE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                 10.0)


class InFlightLimitLike(Protocol):
    in_flight: int
    limit: int


class GatewayMetrics:
    """The gateway's counters, histograms and gauge; ``serve_http`` exposes them for scraping."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("vitserve_requests", "RPCs answered, by RPC, model and status code",
                                ["rpc", "model", "code"], registry=r)
        self.errors = Counter("vitserve_request_errors", "RPCs answered with a status other than OK",
                              ["rpc", "model", "code"], registry=r)
        self.latency = Histogram("vitserve_request_latency_seconds", "RPC latency in the gateway",
                                 ["rpc", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.request_images = Histogram("vitserve_request_images", "images per request",
                                        ["rpc", "model"], buckets=BATCH_BUCKETS, registry=r)
        self.batch_size = Histogram("vitserve_triton_batch_size", "images per Triton inference call",
                                    ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.stream_frames = Counter("vitserve_stream_frames", "StreamFeatures frames by outcome",
                                     ["model", "outcome"], registry=r)
        self.in_flight = Gauge("vitserve_requests_in_flight", "RPCs being handled (a stream counts once)",
                               registry=r)
        self.triton_restarts = Counter("vitserve_triton_restarts", "restarts of the embedded tritonserver "
                                       "after it died", registry=r)
        self.triton_up = Gauge("vitserve_triton_up", "1 while the embedded tritonserver runs", registry=r)
        self.http_requests = Counter("vitserve_http_requests", "HTTP API requests answered, by route, method "
                                     "and HTTP status", ["route", "method", "status"], registry=r)
        self.http_latency = Histogram("vitserve_http_request_latency_seconds", "HTTP API latency in the gateway",
                                      ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight_ratio = Gauge("vitserve_inflight_ratio", "RPCs in flight / --max-in-flight (the "
                                    "autoscaling signal)", registry=r)
        self.queue_wait = Histogram("vitserve_queue_wait_seconds", "time requests waited in Triton's queue "
                                    "before it started them (Triton's statistics; each request of a poll "
                                    "interval at the interval's mean)", ["model"], buckets=QUEUE_BUCKETS,
                                    registry=r)
        self.port: int | None = None  # the /metrics port once serve_http ran
        self._http: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def observe_call(self, rpc: str, model: str, code: str, seconds: float) -> None:
        self.requests.labels(rpc, model, code).inc()
        if code != "OK":
            self.errors.labels(rpc, model, code).inc()
        self.latency.labels(rpc, model).observe(seconds)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        self.http_requests.labels(route, method, str(status)).inc()
        self.http_latency.labels(route).observe(seconds)

    def track_in_flight(self, limit: "InFlightLimitLike") -> None:
        """Read ``vitserve_inflight_ratio`` from the server's in-flight limit at each scrape."""
        self.inflight_ratio.set_function(lambda: limit.in_flight / limit.limit)

    def observe_queue_wait(self, model: str, mean_seconds: float, requests: int) -> None:
        """``requests`` requests of ``model`` that waited ``mean_seconds`` on average in Triton's queue."""
        child = self.queue_wait.labels(model)
        for _ in range(requests):
            child.observe(mean_seconds)

    def observe_triton_batch(self, model: str, images: int) -> None:
        self.batch_size.labels(model).observe(images)

    def observe_stream_frame(self, model: str, outcome: str) -> None:
        self.stream_frames.labels(model, outcome).inc()

    def observe_triton_event(self, event: str) -> None:
        """A supervision event of ``serving.triton_supervisor`` (down / restarted / ...)."""
        if event == EVENT_RESTARTED:
            self.triton_restarts.inc()
            self.triton_up.set(1)
        elif event in DOWN_EVENTS:
            self.triton_up.set(0)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread; returns the port."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
