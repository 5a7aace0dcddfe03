"""Hand-encoded protobuf for the allow CheckResponse, the hottest object we build.

Building ~13 HeaderValueOption messages through the protobuf API costs more per Check
than the rest of the decision in Python; the wire format of these few messages is
simple enough to write directly. Tests parse the bytes back with the real message
classes (tests/unit/test_wire.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

_APPEND_OVERWRITE = b"\x18\x02"  # append_action = OVERWRITE_IF_EXISTS_OR_ADD
_STATUS_OK = b"\x0a\x00"  # CheckResponse.status = google.rpc.Status{} (code 0)


# Every length under 16 KiB, pre-encoded: responses are built from many short strings.
_SMALL_VARINTS = [bytes([n]) for n in range(128)] + [
    bytes([(n & 0x7F) | 0x80, n >> 7]) for n in range(128, 16384)
]


def _varint(n: int) -> bytes:
    if n < 16384:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, data: bytes) -> bytes:
    """A length-delimited field (strings and embedded messages)."""
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def header_option(name: str, value: str) -> bytes:
    """HeaderValueOption{header: HeaderValue{key, value}, append_action: OVERWRITE...}."""
    return _field(1, _field(1, name.encode()) + _field(2, value.encode())) + _APPEND_OVERWRITE


@lru_cache(maxsize=16384)
def _option_field(number: int, name: str, value: str) -> bytes:
    """Most (header, value) pairs repeat across Checks (limits, remaining counts, whole
    seconds to reset, a key's identity): encode each once."""
    return _field(number, header_option(name, value))


@lru_cache(maxsize=1024)
def _string_field(number: int, value: str) -> bytes:
    return _field(number, value.encode())


@lru_cache(maxsize=4096)
def _metadata_entry(name: str, value: str) -> bytes:
    """Struct.fields[name] = Value{string_value: value}: a map entry."""
    return _field(1, _field(1, name.encode()) + _field(2, _field(3, value.encode())))


def metadata_struct(entries: Iterable[tuple[str, str]]) -> bytes:
    """google.protobuf.Struct{fields: {name: Value{string_value}}}, serialized."""
    return b"".join(_metadata_entry(k, v) for k, v in entries)


def ok_check_response(
    upstream: Iterable[tuple[str, str]],
    remove: Iterable[str],
    client: Iterable[tuple[str, str]],
    *,
    fresh: Iterable[tuple[str, str]] = (),
    metadata: Iterable[tuple[str, str]] = (),
) -> bytes:
    """CheckResponse{status: OK, ok_response: OkHttpResponse{headers (2),
    headers_to_remove (5), response_headers_to_add (6)}, dynamic_metadata (4)},
    serialized. `fresh` are more upstream headers whose values never repeat (a request
    id): not worth caching. `metadata`: string entries Envoy keeps as the ext_authz
    filter's dynamic metadata, for the filters after it (the usage tap)."""
    body = b"".join(
        [
            *[_option_field(2, k, v) for k, v in upstream],
            *[_field(2, header_option(k, v)) for k, v in fresh],
            *[_string_field(5, name) for name in remove],
            *[_option_field(6, k, v) for k, v in client],
        ]
    )
    reply = _STATUS_OK + _field(3, body)
    struct = metadata_struct(metadata)
    return reply + _field(4, struct) if struct else reply
