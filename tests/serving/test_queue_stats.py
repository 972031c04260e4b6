"""vitserve_queue_wait_seconds from Triton's cumulative queue statistics."""

from prometheus_client import CollectorRegistry

from serving.metrics import GatewayMetrics
from serving.queue_stats import observe_interval, queue_totals


def _stats(count: int, ns: int) -> dict:
    return {"model_stats": [{"name": "m", "version": "1", "inference_stats": {"queue": {"count": count, "ns": ns}}},
                            {"name": "m", "version": "2", "inference_stats": {}}]}


def _sample(metrics: GatewayMetrics, suffix: str) -> float:
    return metrics.registry.get_sample_value(f"vitserve_queue_wait_seconds_{suffix}", {"model": "m"}) or 0.0


def test_each_interval_adds_its_requests_at_their_mean_wait():
    metrics = GatewayMetrics(CollectorRegistry())
    first, second = queue_totals(_stats(10, 5_000_000)), queue_totals(_stats(14, 45_000_000))
    assert first == {"m": (10, 5_000_000)}
    observe_interval(metrics, first, second)  # 4 requests, 40 ms in all: 10 ms each
    assert _sample(metrics, "count") == 4
    assert abs(_sample(metrics, "sum") - 0.040) < 1e-9
    assert metrics.registry.get_sample_value("vitserve_queue_wait_seconds_bucket", {"model": "m", "le": "0.005"}) == 0
    assert metrics.registry.get_sample_value("vitserve_queue_wait_seconds_bucket", {"model": "m", "le": "0.01"}) == 4


def test_a_restarted_triton_starts_a_new_baseline():
    metrics = GatewayMetrics(CollectorRegistry())
    observe_interval(metrics, queue_totals(_stats(100, 10**9)), queue_totals(_stats(3, 3_000_000)))
    assert _sample(metrics, "count") == 3  # counted from zero, not as -97
    assert abs(_sample(metrics, "sum") - 0.003) < 1e-9


def test_inflight_ratio_reads_the_limit_at_scrape_time():
    from serving.interceptors import InFlightLimit

    metrics = GatewayMetrics(CollectorRegistry())
    limit = InFlightLimit(8)
    metrics.track_in_flight(limit)
    assert metrics.registry.get_sample_value("vitserve_inflight_ratio") == 0.0
    limit.in_flight = 2
    assert metrics.registry.get_sample_value("vitserve_inflight_ratio") == 0.25
