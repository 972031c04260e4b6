"""The standard gRPC health service with ``Watch`` fixed for many watchers of one service.

grpcio-health-checking's ``grpc_health.v1.health.aio.HealthServicer.Watch`` deletes the service's
condition when *any* of its watchers ends, so every other stream watching that service stops
receiving changes (it keeps its last status for ever). With clients balancing over replicas
(``round_robin`` with ``healthCheckConfig``), every client channel watches the vitserve service:
one client going away would leave the others believing a draining or Triton-less replica is
SERVING. Here the condition lives while at least one watcher does.
"""

from __future__ import annotations

import collections

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.aio.HealthServicer):
    """``health.aio.HealthServicer`` whose ``Watch`` streams all keep receiving status changes."""

    def __init__(self) -> None:
        super().__init__()
        self._watchers: collections.Counter[str] = collections.Counter()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context) -> None:  # noqa: N802, ANN001
        service = request.service
        self._watchers[service] += 1  # before the condition is looked up: no await in between
        condition = self._server_watchers[service]
        last_status = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
                    if status != last_status:  # a change missed in between is fine: peers want the latest
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last_status = status
                    await condition.wait()
        finally:
            self._watchers[service] -= 1
            if self._watchers[service] <= 0:  # the last watcher: no condition kept for unknown names
                del self._watchers[service]
                self._server_watchers.pop(service, None)
