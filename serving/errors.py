"""The errors of the serving stack (the gateway or Triton cannot start, a request is refused) and the
deadline a request carries down to Triton."""

from __future__ import annotations

from typing import Callable

import grpc

Remaining = Callable[[], "float | None"]  # seconds left before the caller's deadline (None: none)


class GatewayError(RuntimeError):
    """The gateway cannot start: Triton unreachable, no models, or a model it cannot serve."""


class RequestError(Exception):
    """A request the gateway refuses or cannot answer: a gRPC status ``code`` and a ``message``.

    Raised by the request layer (``serving.service``, ``serving.admin``) and the Triton calls below it;
    the gRPC servicer turns it into a status in one place (``serving.servicer``), the stream into a
    per-frame error (so one bad frame does not end a control loop's stream).
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message


class TritonLaunchError(RuntimeError):
    """Triton could not be prepared, started, or did not get its models ready."""


class UndecodableRequest(Exception):
    """A request's bytes are not the RPC's protobuf message (raised from a stream's request iterator)."""
