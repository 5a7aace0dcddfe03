"""The baseline: an ext_authz server that does nothing, and an ext_proc one (the usage
tap's baseline, row 12).

Same shape as ours (grpc.aio, an AuthorizationServicer with an async Check, on the same
event loop: uvloop where installed, as extauthz.server runs), but Check returns one
prebuilt OK CheckResponse without reading the request. Whatever ours costs above this
is what the product adds. Likewise `ExternalProcessor/Process` answers every message
with a prebuilt CONTINUE for its phase (an async generator over the request stream, as
extauthz/tap.py is), reading nothing and asking for no body.

    python -m bench.noop_server --port 9191 [--loop asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import signal
from collections.abc import AsyncIterator

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from google.rpc import code_pb2, status_pb2

OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=external_auth_pb2.OkHttpResponse(),
)


class NoopAuthorization(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(
        self,
        request: external_auth_pb2.CheckRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> external_auth_pb2.CheckResponse:
        return OK


_CONTINUE = ext_proc.CommonResponse()
CONTINUE = {
    "request_headers": ext_proc.ProcessingResponse(
        request_headers=ext_proc.HeadersResponse(response=_CONTINUE)
    ),
    "request_body": ext_proc.ProcessingResponse(
        request_body=ext_proc.BodyResponse(response=_CONTINUE)
    ),
    "response_headers": ext_proc.ProcessingResponse(
        response_headers=ext_proc.HeadersResponse(response=_CONTINUE)
    ),
    "response_body": ext_proc.ProcessingResponse(
        response_body=ext_proc.BodyResponse(response=_CONTINUE)
    ),
}


async def process(
    requests: AsyncIterator[ext_proc.ProcessingRequest],
    context: grpc.aio.ServicerContext[object, object],
) -> AsyncIterator[ext_proc.ProcessingResponse]:
    async for message in requests:
        reply = CONTINUE.get(message.WhichOneof("request"))
        if reply is not None:
            yield reply


def add_noop_processor(server: grpc.aio.Server) -> None:
    handler = grpc.stream_stream_rpc_method_handler(
        process,
        request_deserializer=ext_proc.ProcessingRequest.FromString,
        response_serializer=ext_proc.ProcessingResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}
            ),
        )
    )


async def serve(bind: str, port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(NoopAuthorization(), server)
    add_noop_processor(server)
    server.add_insecure_port(f"{bind}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def default_loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.noop_server", description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default=default_loop())
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.bind, args.port))
    else:
        asyncio.run(serve(args.bind, args.port))


if __name__ == "__main__":
    main()
