"""The hand-encoded allow response parses back, with the real message classes, to exactly
the message the protobuf API would build."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from extauthz import wire

pytestmark = pytest.mark.unit
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value), append_action=OVERWRITE
    )


def test_allow_response_equals_the_protobuf_built_message() -> None:
    upstream = [("x-virtual-key-id", "0123456789abcdef"), ("x-virtual-key-user-id", "ü-user")]
    remove = ["authorization", "x-api-key", "api-key", "x-virtual-key-team-id"]
    client = [("x-ratelimit-limit-rpm", "60"), ("x-ratelimit-reset-requests", "59.5s")]
    expected = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[option(k, v) for k, v in upstream],
            headers_to_remove=remove,
            response_headers_to_add=[option(k, v) for k, v in client],
        ),
    )
    parsed = external_auth_pb2.CheckResponse.FromString(
        wire.ok_check_response(upstream, remove, client)
    )
    assert parsed == expected
    assert parsed.HasField("status") and parsed.HasField("ok_response")


def test_long_values_use_multi_byte_lengths() -> None:
    value = "v" * 70_000  # lengths past one and two varint bytes
    parsed = external_auth_pb2.CheckResponse.FromString(
        wire.ok_check_response([("x-virtual-key-user-id", value)], [], [])
    )
    assert parsed.ok_response.headers[0].header.value == value


def test_empty_allow_is_a_bare_ok() -> None:
    parsed = external_auth_pb2.CheckResponse.FromString(wire.ok_check_response([], [], []))
    assert parsed.status.code == 0 and parsed.HasField("ok_response")


def test_dynamic_metadata_parses_back_as_the_struct_the_tap_reads() -> None:
    entries = [("model", "gpt-4o"), ("stream_usage", "add"), ("max_tokens", "40")]
    parsed = external_auth_pb2.CheckResponse.FromString(
        wire.ok_check_response([("x-virtual-key-id", "0123456789abcdef")], [], [], metadata=entries)
    )
    assert dict(parsed.dynamic_metadata.fields.items()) == {
        name: struct_pb2.Value(string_value=value) for name, value in entries
    }
    assert parsed.ok_response.headers[0].header.key == "x-virtual-key-id"


def test_an_allow_without_metadata_carries_no_metadata_field() -> None:
    parsed = external_auth_pb2.CheckResponse.FromString(wire.ok_check_response([], [], []))
    assert not parsed.HasField("dynamic_metadata")
