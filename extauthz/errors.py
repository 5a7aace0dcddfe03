"""The one table from domain errors to gRPC status codes, applied at the RPC boundary."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

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


def rpc_errors(handler: Handler[R]) -> Handler[R]:
    """Turns domain errors into their status code; anything else is INTERNAL, logged once."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
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
