"""Authorization.Check: Envoy's request attributes -> `Decider` -> a CheckResponse.

The decision itself is protocol-free (extauthz/decision.py), so nginx's /auth answers
exactly like Envoy's Check.
"""

from __future__ import annotations

from typing import Any

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from extauthz import responses
from extauthz.decision import Decider
from extauthz.request import requested_model
from extauthz.tap_directives import CLAMP_EXTENSION

PHASE_METADATA = "x-extauthz-phase"


def _key_first(context: grpc.aio.ServicerContext[object, object]) -> bool:
    """envoy.yaml's key_first filter sends `x-extauthz-phase: key` with its Check."""
    for name, value in context.invocation_metadata() or ():
        if name == PHASE_METADATA:
            return value == "key"
    return False


def http_headers(http: external_auth_pb2.AttributeContext.HttpRequest) -> dict[str, str]:
    """Envoy sends `headers`, or `header_map` when configured with encode_raw_headers."""
    if http.headers:
        return dict(http.headers)
    merged: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.raw_value.decode(errors="replace") if entry.raw_value else entry.value
        key = entry.key.lower()
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    return merged


# A CheckResponse message, or the bytes of one (xds-protos ships no type stubs).
CheckReply = Any


def _serialize(reply: CheckReply) -> bytes:
    """Allow answers arrive pre-encoded (extauthz/wire.py); the rest are messages."""
    return reply if isinstance(reply, bytes) else bytes(reply.SerializeToString())


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    SERVICE = "envoy.service.auth.v3.Authorization"

    def __init__(self, decider: Decider) -> None:
        self.decider = decider

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Like the generated add_AuthorizationServicer_to_server, with a serializer that
        also takes pre-encoded bytes."""
        handler = grpc.unary_unary_rpc_method_handler(
            self.Check,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
            response_serializer=_serialize,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(self.SERVICE, {"Check": handler}),)
        )

    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> CheckReply:
        http = request.attributes.request.http
        headers = http_headers(http)
        if _key_first(context):
            return responses.envoy(
                await self.decider.verify_key(http.path, headers, method=http.method), headers
            )
        # Reading raw_body copies it (up to 1 MiB): `size` (the body's length, as Envoy
        # buffered it) decides first whether the key is checked before the body is read.
        size = http.size if http.size >= 0 else len(http.raw_body or http.body)
        clamp = request.attributes.context_extensions.get(CLAMP_EXTENSION) == "true"
        outcome = await self.decider.decide(
            http.path,
            headers,
            lambda: requested_model(http.raw_body or http.body.encode(), headers, size),
            method=http.method,
            body_bytes=size,
            clamp=clamp,
        )
        return responses.envoy(outcome, headers, http.path)
