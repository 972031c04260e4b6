"""Where a client connects and how its channel behaves: targets, load balancing, retries, keepalive.

A target is one address (``host:port``), a comma list (``host:port,host:port``), a gRPC target URI
(``ipv4:10.0.0.1:50051,10.0.0.2:50051``, ``ipv6:[::1]:50051``) or a DNS name gRPC resolves and
re-resolves itself (``dns:///vitserve-headless.ns.svc:50051``, the Kubernetes headless Service).
Every channel balances with gRPC's own ``round_robin`` policy over all the addresses the target
names (for one address that is one connection, as before), skips a replica whose health service
says NOT_SERVING (gRPC's client-side health checking: a draining replica, one whose Triton is
down), reconnects to a replica that is back within ``MAX_RECONNECT_BACKOFF_MS``, and retries
``UNAVAILABLE`` only:

* ``UNAVAILABLE`` is what a call gets when its replica died or is draining, before the replica did
  any work a second attempt could repeat wrongly (gRPC retries only before response headers arrive,
  and our server sends headers with the answer). ``RESOURCE_EXHAUSTED`` (the replica is full) is
  not retried by the channel: the caller backs off or sheds load.
* gRPC keeps a copy of the request to send it again, and gives up retrying (silently) a call whose
  request outgrows that buffer, 256 KiB by default: one raw 518x518 RGB frame is 805 KB. The buffer
  here is the largest request the gateway accepts (``MAX_MESSAGE_BYTES``); memory is only used by
  calls that are in flight, for as long as they are.
* Retry throttling (gRPC's token bucket) stops retries when most calls fail, so that a fleet-wide
  outage does not multiply the load by the attempt count.

A comma list of host names is resolved once, when the client is made, into an ``ipv4:`` (or, when
no name has an IPv4 address, ``ipv6:``) target; use ``dns:///NAME:PORT`` to follow DNS changes.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass

from protos import vitserve_pb2

MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # the gateway's default --max-message-mb
SERVICE_FULL_NAME = vitserve_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name
HEALTH_SERVICE = "grpc.health.v1.Health"

RETRY_MAX_ATTEMPTS = 4  # the first attempt and three retries
RETRY_INITIAL_BACKOFF_S = 0.05
RETRY_MAX_BACKOFF_S = 1.0
# gRPC's token bucket: each failure costs 1 token, each success returns RETRY_TOKEN_RATIO; retries
# stop while fewer than half of RETRY_MAX_TOKENS are left (about 10 failures more than successes / 5).
RETRY_MAX_TOKENS = 20
RETRY_TOKEN_RATIO = 0.2
KEEPALIVE_TIME_MS = 30_000   # ping a connection that has calls in flight and no traffic for 30 s ...
KEEPALIVE_TIMEOUT_MS = 10_000  # ... and drop it (its calls end UNAVAILABLE, so retried) without an answer in 10 s

MAX_RECONNECT_BACKOFF_MS = 2_000

_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")


class TargetError(ValueError):
    """A target string that names no address (the message says which part and why)."""


@dataclass(frozen=True)
class Target:
    """A parsed target: ``uri`` for the channel; ``addresses`` the ``host:port`` of each replica when
    the target lists them (empty for ``dns:`` and other resolver schemes, which resolve later)."""

    text: str
    uri: str
    addresses: tuple[str, ...]


def _split_host_port(item: str, text: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TargetError(f"target {text!r}: {item!r} is not HOST:PORT")
    return host, int(port)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _resolve(host: str, port: int, text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise TargetError(f"target {text!r}: cannot resolve {host!r}: {e.strerror}") from None
    found = [ipaddress.ip_address(info[4][0]) for info in infos]
    v4 = [a for a in found if a.version == 4]
    return list(dict.fromkeys(v4 or found))  # IPv4 when there is one: one URI holds one family


def _uri(family: int, pairs: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]) -> str:
    if family == 4:
        return "ipv4:" + ",".join(f"{a}:{p}" for a, p in pairs)
    return "ipv6:" + ",".join(f"[{a}]:{p}" for a, p in pairs)


def parse_target(text: str) -> Target:
    """``Target`` of ``text`` (see the module docstring); ``TargetError`` says what is wrong with it."""
    text = text.strip()
    if not text:
        raise TargetError("the target is empty; give HOST:PORT, a comma list of them, or dns:///NAME:PORT")
    if text.startswith(("ipv4:", "ipv6:")):
        items = [i.strip() for i in text.split(":", 1)[1].split(",")]
        for item in items:
            host, _ = _split_host_port(item, text)
            if _literal(host) is None or _literal(host).version != int(text[3]):  # type: ignore[union-attr]
                raise TargetError(f"target {text!r}: {host!r} is not an IPv{text[3]} address")
        return Target(text, text, tuple(items))
    if text.startswith(_SCHEMES):
        return Target(text, text, ())
    items = [i.strip() for i in text.split(",") if i.strip()]
    pairs = [_split_host_port(item, text) for item in items]
    if len(pairs) == 1 and _literal(pairs[0][0]) is None:
        return Target(text, text, (text,))  # one name: gRPC's default resolver, as always
    resolved = [(address, port) for host, port in pairs
                for address in ([_literal(host)] if _literal(host) is not None else _resolve(host, port, text))]
    families = {a.version for a, _ in resolved}
    if len(families) > 1:
        raise TargetError(f"target {text!r} mixes IPv4 and IPv6 addresses; list one family, or use dns:///NAME:PORT")
    uri = _uri(families.pop(), resolved)  # type: ignore[arg-type]
    return Target(text, uri, tuple(items))


def replica_addresses(target: Target) -> tuple[str, ...]:
    """Every replica's ``host:port``: the listed ones, or for ``dns:`` what the name resolves to now
    (each A/AAAA record of a headless Service is one pod); other schemes: the target itself."""
    if target.addresses:
        return target.addresses
    if not target.text.startswith("dns:"):
        return (target.text,)
    name = target.text[4:]
    if name.startswith("//"):
        name = name[2:].split("/", 1)[1] if "/" in name[2:] else ""
    host, port = _split_host_port(name, target.text)
    return tuple(f"[{a}]:{port}" if a.version == 6 else f"{a}:{port}" for a in _resolve(host.strip("[]"), port, target.text))


def service_config(retries: bool = True) -> str:
    """The channel's service config (JSON): ``round_robin`` and, with ``retries``, the retry policy
    for ``UNAVAILABLE`` on the vitserve and health services plus retry throttling."""
    # healthCheckConfig: round_robin watches each replica's health service (grpc.health.v1 Watch) and
    # sends nothing to one that reports NOT_SERVING: a draining replica or one whose Triton is down.
    config: dict[str, object] = {"loadBalancingConfig": [{"round_robin": {}}],
                                 "healthCheckConfig": {"serviceName": SERVICE_FULL_NAME}}
    if retries:
        config["methodConfig"] = [{
            "name": [{"service": SERVICE_FULL_NAME}, {"service": HEALTH_SERVICE}],
            "retryPolicy": {"maxAttempts": RETRY_MAX_ATTEMPTS, "initialBackoff": f"{RETRY_INITIAL_BACKOFF_S}s",
                            "maxBackoff": f"{RETRY_MAX_BACKOFF_S}s", "backoffMultiplier": 2,
                            "retryableStatusCodes": ["UNAVAILABLE"]}}]
        config["retryThrottling"] = {"maxTokens": RETRY_MAX_TOKENS, "tokenRatio": RETRY_TOKEN_RATIO}
    return json.dumps(config)


def channel_options(retries: bool = True, retry_buffer_bytes: int = MAX_MESSAGE_BYTES,
                    max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, object]]:
    """gRPC channel arguments: message limits, the service config, retries and their buffer, keepalive."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", service_config(retries)),
            ("grpc.enable_retries", 1),  # without a retry policy only transparent retries (never-sent calls)
            # a request larger than this buffer is never retried (gRPC's default: 256 KiB)
            ("grpc.per_rpc_retry_buffer_size", retry_buffer_bytes),
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.keepalive_permit_without_calls", 0),
            # a replica that comes back (a restart on its old port) is tried again within this
            # (gRPC's default backoff grows to 120 s)
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]
