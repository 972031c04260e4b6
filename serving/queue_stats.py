"""``vitserve_queue_wait_seconds`` from Triton's statistics: how long requests waited in its queue.

Triton counts, per model, the requests it started and the nanoseconds they spent queued (cumulative
since it started). ``poll_queue_wait`` reads those totals every ``QUEUE_POLL_S`` seconds and feeds
each interval's new requests, at the interval's mean wait, into the histogram. A Triton that
restarted (totals went down) starts a new baseline.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from serving.metrics import GatewayMetrics
from serving.triton_backend import TritonBackend

log = logging.getLogger(__name__)

QUEUE_POLL_S = 1.0


def queue_totals(statistics: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{model: (requests queued, queue ns)}`` summed over versions, from Triton's statistics JSON."""
    totals: dict[str, tuple[int, int]] = {}
    for entry in statistics.get("model_stats", []):
        queue = entry.get("inference_stats", {}).get("queue", {})
        count, ns = totals.get(entry["name"], (0, 0))
        totals[entry["name"]] = (count + int(queue.get("count", 0)), ns + int(queue.get("ns", 0)))
    return totals


def observe_interval(metrics: GatewayMetrics, before: dict[str, tuple[int, int]],
                     now: dict[str, tuple[int, int]]) -> None:
    """Feed the requests between two readings of ``queue_totals`` into the histogram."""
    for model, (count, ns) in now.items():
        count0, ns0 = before.get(model, (0, 0))
        if count < count0 or ns < ns0:  # Triton restarted: its totals begin again from zero
            count0, ns0 = 0, 0
        if count > count0:
            metrics.observe_queue_wait(model, (ns - ns0) / (count - count0) / 1e9, count - count0)


async def poll_queue_wait(backend: TritonBackend, metrics: GatewayMetrics, interval: float = QUEUE_POLL_S) -> None:
    """Run until cancelled: read Triton's queue totals every ``interval`` seconds into ``metrics``."""
    before: dict[str, tuple[int, int]] | None = None
    while True:
        try:
            now = queue_totals(await backend.client.get_inference_statistics(as_json=True, client_timeout=5.0))
        except Exception as e:  # noqa: BLE001 - Triton down or restarting: health reports it; try again
            log.debug("triton statistics unavailable: %s", e)
        else:
            if before is not None:
                observe_interval(metrics, before, now)
            before = now
        await asyncio.sleep(interval)
