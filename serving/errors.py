"""The two errors of the serving stack: one that stops the gateway starting, one per request."""

from __future__ import annotations

import grpc


class GatewayError(RuntimeError):
    """The gateway cannot start: Triton unreachable, no models, or a model it cannot serve."""


class RequestError(Exception):
    """A request the gateway refuses or cannot answer: a gRPC status ``code`` and a ``message``.

    Raised by the gateway's request handling; unary RPCs turn it into ``context.abort``, the stream
    into a per-frame error (so one bad frame does not end a control loop's stream).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class UndecodableRequest(Exception):
    """A request's bytes are not the RPC's protobuf message (raised from a stream's request iterator)."""
