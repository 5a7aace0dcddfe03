"""The usage tap: `envoy.service.ext_proc.v3.ExternalProcessor/Process` on the gRPC port.
Envoy streams it each metered request's headers and its response (headers, then the body
as it passes); the tap reads the usage the upstream reported (extauthz/usage_meter.py) and
settles the request's reservation exactly as ReportUsage would, under the request id
Check gave it (`x-virtual-key-request-id`), so a tap and a reporting load balancer charge
once between them.

Groundwork of issue 12: response metering only. It changes nothing in the request or the
response (every message is answered CONTINUE), and is not yet in the shipped envoy.yaml;
tests/e2e/test_usage_tap.py runs it behind a real Envoy configured for it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extauthz.metrics import Metrics
from extauthz.usage_meter import Metered, ResponseMeter
from keys import keygen
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.model import UsageReport
from keys.money import nanos_to_usd
from keys.pricing import PriceTable
from keys.store import KeyStore

log = logging.getLogger("extauthz.tap")
SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
KEY_ID_HEADER = "x-virtual-key-id"
REQUEST_ID_HEADER = "x-virtual-key-request-id"
_CONTINUE = ext_proc.CommonResponse()


def _headers(message: ext_proc.HttpHeaders) -> dict[str, str]:
    return {
        h.key.lower(): h.raw_value.decode(errors="replace") if h.raw_value else h.value
        for h in message.headers.headers
    }


class _Exchange:
    """One request and its response, as the tap sees them."""

    def __init__(self) -> None:
        self.key_id = ""
        self.request_id = ""
        self.status = 0
        self.meter: ResponseMeter | None = None

    def request(self, headers: dict[str, str]) -> None:
        key_id = headers.get(KEY_ID_HEADER, "")
        self.key_id = key_id if keygen.is_key_id(key_id) else ""
        self.request_id = headers.get(REQUEST_ID_HEADER, "")

    def response(self, headers: dict[str, str]) -> None:
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        self.meter = ResponseMeter(
            headers.get("content-type", ""), headers.get("content-encoding", "")
        )


class UsageTap:
    def __init__(self, store: KeyStore, prices: PriceTable, metrics: Metrics) -> None:
        self.store = store
        self.prices = prices
        self.metrics = metrics

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self.Process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=ext_proc.ProcessingResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),)
        )

    async def Process(
        self,
        requests: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        exchange = _Exchange()
        async for message in requests:
            phase = message.WhichOneof("request")
            if phase == "request_headers":
                exchange.request(_headers(message.request_headers))
                yield ext_proc.ProcessingResponse(
                    request_headers=ext_proc.HeadersResponse(response=_CONTINUE)
                )
            elif phase == "response_headers":
                exchange.response(_headers(message.response_headers))
                if message.response_headers.end_of_stream:
                    await self._settle(exchange)
                yield ext_proc.ProcessingResponse(
                    response_headers=ext_proc.HeadersResponse(response=_CONTINUE)
                )
            elif phase == "response_body":
                if exchange.meter is not None:
                    exchange.meter.feed(message.response_body.body)
                if message.response_body.end_of_stream:
                    await self._settle(exchange)
                yield ext_proc.ProcessingResponse(
                    response_body=ext_proc.BodyResponse(response=_CONTINUE)
                )
            elif phase == "request_body":
                yield ext_proc.ProcessingResponse(
                    request_body=ext_proc.BodyResponse(response=_CONTINUE)
                )
            elif phase in ("request_trailers", "response_trailers"):
                yield ext_proc.ProcessingResponse(
                    **{phase: ext_proc.TrailersResponse(header_mutation=None)}
                )

    async def _release(self, exchange: _Exchange) -> None:
        try:
            await self.store.release(exchange.key_id, exchange.request_id, self.store.clock())
        except StoreUnavailable:
            log.warning("tap could not release", extra={"key_id": exchange.key_id})

    async def _settle(self, exchange: _Exchange) -> None:
        """Charge what the response reported, once, under the request's id."""
        if not exchange.key_id or not exchange.request_id or exchange.meter is None:
            return
        metered: Metered = exchange.meter.finish()
        exchange.meter = None
        usage = metered.usage
        if usage is None:
            self.metrics.tap_unmetered.labels(metered.unmetered or "no_usage").inc()
            if exchange.status >= 400 and metered.content_chars == 0:
                # the upstream refused or failed and generated nothing: give the
                # reservation and its slot back now rather than after the TTL (a 2xx whose
                # usage cannot be read keeps it: something may have been generated)
                await self._release(exchange)
            return
        model = metered.model
        try:
            cost = self.prices.cost_nanos(model, usage.prompt_tokens, usage.completion_tokens)
            report = UsageReport(
                exchange.key_id,
                exchange.request_id,
                model,
                "tap",
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.total_tokens,
                cost,
                family=self.prices.family(model),
            )
            result = await self.store.report_usage(report)
        except (InvalidArgument, NotFound, StoreUnavailable) as exc:
            self.metrics.tap_unmetered.labels(type(exc).__name__.lower()).inc()
            log.warning("tap could not charge", extra={"key_id": exchange.key_id})
            return
        if not result.duplicate:
            self.metrics.count_usage(
                exchange.key_id,
                self.prices.label(model),
                usage.total_tokens,
                nanos_to_usd(result.cost_nanos),
            )
