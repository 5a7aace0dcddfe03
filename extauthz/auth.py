"""Who is calling an admin or usage RPC: bearer tokens from gRPC metadata."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from enum import Enum

import grpc

from keys.keygen import ParsedKey, parse_key


class Role(Enum):
    ADMIN = "admin"
    USAGE = "usage"  # may call ReportUsage and nothing else


def metadata_values(context: grpc.aio.ServicerContext[object, object], name: str) -> list[str]:
    """Every value of one metadata key, in order (Envoy passes repeated headers as such)."""
    pairs: Iterable[tuple[str, str | bytes]] = context.invocation_metadata() or ()
    return [
        value if isinstance(value, str) else value.decode(errors="replace")
        for key, value in pairs
        if key == name
    ]


def metadata_value(context: grpc.aio.ServicerContext[object, object], name: str) -> str | None:
    values = metadata_values(context, name)
    return values[0] if values else None


def bearer(context: grpc.aio.ServicerContext[object, object]) -> str | None:
    header = metadata_value(context, "authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, expected: str) -> bool:
    return bool(expected) and hmac.compare_digest(token.encode(), expected.encode())


def role_of(token: str | None, admin_token: str, usage_token: str) -> Role | None:
    if token is None:
        return None
    if _matches(token, admin_token):
        return Role.ADMIN
    if _matches(token, usage_token):
        return Role.USAGE
    return None


def bearer_key(context: grpc.aio.ServicerContext[object, object]) -> ParsedKey | None:
    """A virtual key used as the bearer token (self-service reads)."""
    token = bearer(context)
    return None if token is None else parse_key(token)
