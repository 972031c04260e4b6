"""Client targets: one address, a comma list, ipv4:/ipv6:, dns:///; the channel's service config."""

import json

import pytest

from clients.client import VitServeClient
from clients.commands import embed_main
from clients.targets import (MAX_MESSAGE_BYTES, TargetError, channel_options, parse_target, replica_addresses,
                             service_config)


@pytest.mark.parametrize("text, uri, addresses", [
    ("127.0.0.1:50051", "ipv4:127.0.0.1:50051", ("127.0.0.1:50051",)),
    ("gateway.example:50051", "gateway.example:50051", ("gateway.example:50051",)),  # gRPC's resolver
    ("127.0.0.1:1, 127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2", ("127.0.0.1:1", "127.0.0.1:2")),
    ("localhost:1,127.0.0.2:2", "ipv4:127.0.0.1:1,127.0.0.2:2", ("localhost:1", "127.0.0.2:2")),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2", ("[::1]:1", "[::1]:2")),
    ("ipv4:10.0.0.1:5,10.0.0.2:5", "ipv4:10.0.0.1:5,10.0.0.2:5", ("10.0.0.1:5", "10.0.0.2:5")),
    ("dns:///vitserve.ns.svc:50051", "dns:///vitserve.ns.svc:50051", ()),
])
def test_targets_become_grpc_uris(text, uri, addresses):
    target = parse_target(text)
    assert (target.uri, target.addresses) == (uri, addresses)


@pytest.mark.parametrize("text, message", [
    ("", "empty"), ("nohost", "is not HOST:PORT"), ("127.0.0.1:0", "is not HOST:PORT"),
    ("127.0.0.1:1,", None), ("ipv4:gateway:1", "is not an IPv4 address"),
    ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"), ("no-such-host.invalid:1,127.0.0.1:2", "cannot resolve"),
])
def test_bad_targets_say_what_is_wrong(text, message):
    if message is None:  # a trailing comma is harmless
        assert parse_target(text).addresses == ("127.0.0.1:1",)
        return
    with pytest.raises(TargetError, match=message):
        parse_target(text)
    with pytest.raises(TargetError, match=message):
        VitServeClient(text)


def test_dns_targets_fan_out_to_what_the_name_resolves_to():
    assert replica_addresses(parse_target("dns:///localhost:7")) == ("127.0.0.1:7",)
    assert replica_addresses(parse_target("127.0.0.1:1,127.0.0.1:2")) == ("127.0.0.1:1", "127.0.0.1:2")


def test_service_config_balances_and_retries_unavailable_only():
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "vitserve.v1.VisionEncoder"}
    (method,) = config["methodConfig"]
    assert {"service": "vitserve.v1.VisionEncoder"} in method["name"]
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]  # never RESOURCE_EXHAUSTED
    assert 2 <= policy["maxAttempts"] <= 5
    assert config["retryThrottling"]["maxTokens"] > 0
    assert "methodConfig" not in json.loads(service_config(retries=False))
    options = dict(channel_options())
    assert options["grpc.per_rpc_retry_buffer_size"] == MAX_MESSAGE_BYTES  # the gateway's largest request
    assert options["grpc.keepalive_time_ms"] > 0


def test_cli_refuses_a_bad_target_with_exit_2(tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(b"x")
    assert embed_main([str(image), "--target", "127.0.0.1:1,[::1]:2"]) == 2
    assert "mixes IPv4 and IPv6" in capsys.readouterr().err
