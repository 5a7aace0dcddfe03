"""The one table from domain errors to gRPC status codes, applied at the RPC boundary."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from keys.errors import InvalidArgument, NotFound, StoreUnavailable, VkError

log = logging.getLogger("extauthz.rpc")

GRPC_CODES: Final[dict[type[VkError], grpc.StatusCode]] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
}

R = TypeVar("R")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]


def grpc_code(exc: VkError) -> grpc.StatusCode:
    for kind, code in GRPC_CODES.items():
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class Undecodable:
    """What `lenient` hands a servicer for bytes that are not its request message."""


UNDECODABLE = Undecodable()


def lenient(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: grpc would answer a DecodeError (e.g. a
    string field that is not UTF-8, which Envoy's transcoder lets through from a query
    parameter) with UNKNOWN and a Python class name; `rpc_errors` answers
    INVALID_ARGUMENT instead."""

    def parse(data: bytes) -> Any:
        try:
            return message.FromString(data)
        except DecodeError:
            return UNDECODABLE

    return parse


def add_servicer(server: grpc.aio.Server, service: Any, servicer: Any) -> None:
    """Registers every method of `service` (a protobuf ServiceDescriptor) on `servicer`,
    with lenient request parsing (the generated add_*_to_server, but for that)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=lenient(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )


def rpc_errors(handler: Handler[R]) -> Handler[R]:
    """Turns domain errors into their status code; anything else is INTERNAL, logged once."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        if request is UNDECODABLE:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "the request is not a valid message (is every string valid UTF-8?)",
            )
        try:
            return await handler(self, request, context)
        except VkError as exc:
            code = grpc_code(exc)
            if code is grpc.StatusCode.UNAVAILABLE:
                log.warning("store unavailable", extra={"rpc": handler.__name__})
            await context.abort(code, str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unexpected error", extra={"rpc": handler.__name__})
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable")  # pragma: no cover  # abort() always raises

    return wrapper
