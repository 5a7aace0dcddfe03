"""The usage tap: `envoy.service.ext_proc.v3.ExternalProcessor/Process` on the gRPC port.

Envoy runs it after ext_authz on the LLM routes (envoy.yaml). Per request it sees:

- the request headers (always): the key id and request id Check added, and Check's
  directives (extauthz/tap_directives.py) in the ext_authz dynamic metadata. Only a
  request the tap must change asks Envoy for its body (`mode_override`): a stream that
  did not ask for its usage chunk gets `stream_options.include_usage: true`, a clamped
  request its lowered max_tokens;
- the response headers and then the response body as it streams (each chunk passes on
  as soon as the tap answers; nothing is buffered whole). It reads the usage the
  upstream reported (extauthz/usage_meter.py) and removes the usage chunk the client did
  not ask for (extauthz/sse_filter.py).

At the end of the response it settles the request's reservation exactly as ReportUsage
would, under the request id Check gave it (`x-virtual-key-request-id`), so a tap and a
reporting load balancer charge once between them. A response that reported no usage but
produced something is charged an estimate (`estimate_usage`), never $0; one that
produced nothing gives its reservation back. Charging runs off the response's path: the
client never waits for Redis, and a client that disconnects is still charged.

The tap never breaks a response: whatever it cannot read passes untouched, and Envoy's
`failure_mode_allow` lets responses through if the tap itself is unreachable.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Coroutine
from dataclasses import replace
from typing import Any, Final

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

from extauthz import tap_directives
from extauthz.metrics import Metrics
from extauthz.request import OUTPUT_CAP_FIELDS, header_count
from extauthz.responses import error_body
from extauthz.sse_filter import UsageChunkFilter
from extauthz.usage_meter import Metered, MeteredUsage, ResponseMeter
from keys import keygen
from keys.errors import InvalidArgument, NotFound, StoreUnavailable
from keys.journal import JournalFull, UsageJournal
from keys.model import Reason, UsageReport
from keys.money import nanos_to_usd
from keys.pricing import PriceTable
from keys.store import KeyStore

log = logging.getLogger("extauthz.tap")
SERVICE: Final = "envoy.service.ext_proc.v3.ExternalProcessor"
KEY_ID_HEADER: Final = "x-virtual-key-id"
REQUEST_ID_HEADER: Final = "x-virtual-key-request-id"
CLAMPED_HEADER: Final = "x-virtual-key-max-tokens-clamped"
CHARS_PER_TOKEN: Final = 4  # the estimate's rule of thumb for English text
PROVIDER: Final = "tap"

_Mode = processing_mode_pb2.ProcessingMode
_CONTINUE = ext_proc.CommonResponse()


def _mode(*, request_body: bool, response_body: bool) -> Any:
    """The whole processing mode (an override replaces all of it)."""
    return _Mode(
        request_header_mode=_Mode.SEND,
        response_header_mode=_Mode.SEND,
        request_body_mode=_Mode.BUFFERED if request_body else _Mode.NONE,
        response_body_mode=_Mode.STREAMED if response_body else _Mode.NONE,
        request_trailer_mode=_Mode.SKIP,
        response_trailer_mode=_Mode.SKIP,
    )


_READ_REQUEST_BODY: Final = _mode(request_body=True, response_body=True)
_SKIP_RESPONSE_BODY: Final = _mode(request_body=False, response_body=False)
_PASS: Final = ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse(response=_CONTINUE))


def _headers(message: ext_proc.HttpHeaders) -> dict[str, str]:
    return {
        h.key.lower(): h.raw_value.decode(errors="replace") if h.raw_value else h.value
        for h in message.headers.headers
    }


def _set_headers(*pairs: tuple[str, str]) -> ext_proc.HeaderMutation:
    return ext_proc.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
            for k, v in pairs
        ]
    )


ROLE_METADATA: Final = "x-extauthz-tap"
CLAMP_ROLE: Final = "clamp"


def _role(context: grpc.aio.ServicerContext[object, object]) -> str:
    """Which of envoy.yaml's two ext_proc filters calls: `clamp` (its initial metadata)
    or the metering tap."""
    for name, value in context.invocation_metadata() or ():
        if name == ROLE_METADATA:
            return str(value)
    return ""


def _directives(message: ext_proc.ProcessingRequest) -> dict[str, str]:
    """Check's entries in the ext_authz filter's dynamic metadata (strings only)."""
    namespace = message.metadata_context.filter_metadata.get(tap_directives.NAMESPACE)
    if namespace is None:
        return {}
    return {
        name: value.string_value
        for name, value in namespace.fields.items()
        if value.WhichOneof("kind") == "string_value"
    }


def _length(value: str) -> int:
    return header_count(value) or 0


def rewrite_request(body: bytes, path: str, *, add_usage: bool, max_tokens: int) -> bytes | None:
    """The request body with the usage chunk asked for and the output cap lowered to
    `max_tokens` (0: unchanged); None when it is not a JSON object (Check read it, so
    only a proxy bug gets here). Fields are read as leniently as Check read them: an
    output cap it cannot read as a number is replaced."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict):
        return None
    if add_usage:
        options = document.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["include_usage"] = True
        document["stream_options"] = options
    if max_tokens > 0:
        present = [name for name in OUTPUT_CAP_FIELDS if name in document]
        # Go's encoding/json also reads `MAX_TOKENS` (any case) as max_tokens, the last
        # one written winning: every spelling of a cap is lowered
        spellings = [k for k in document if k.casefold() in OUTPUT_CAP_FIELDS]
        for name in spellings:
            value = document[name]
            fits = isinstance(value, int) and not isinstance(value, bool) and value <= max_tokens
            document[name] = value if fits and value >= 0 else max_tokens
        if not present:  # (a strict or Python upstream reads the exact name only)
            document[_cap_field(path)] = max_tokens
    try:
        return json.dumps(document, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        # a lone surrogate (JSON allows "\ud800", and Check read it): not UTF-8, so
        # written back as the escape it came as
        return json.dumps(document).encode()


def _cap_field(path: str) -> str:
    """The output cap a body that names none gets: the Responses API's, else the one
    every OpenAI-compatible chat and completions server reads."""
    return (
        "max_output_tokens"
        if path.partition("?")[0].rstrip("/").endswith("/responses")
        else ("max_tokens")
    )


def estimate_usage(metered: Metered, request_bytes: int, response_bytes: int) -> MeteredUsage:
    """What a response that reported no usage is charged for (docs/design.md, "the usage
    tap"): the prompt at CHARS_PER_TOKEN bytes of request body per token, and the larger
    of the content events that passed (a streamed chunk carries about one token) and
    the content's characters per CHARS_PER_TOKEN; a body that could not be read at all,
    by its bytes. Never zero for a response that produced something."""
    prompt = math.ceil(request_bytes / CHARS_PER_TOKEN)
    if metered.produced:
        completion = max(metered.content_events, math.ceil(metered.content_chars / CHARS_PER_TOKEN))
    else:
        completion = math.ceil(response_bytes / CHARS_PER_TOKEN)
    completion = max(completion, 1)
    return MeteredUsage(prompt, completion, prompt + completion)


class _Exchange:
    """One request and its response, as the tap sees them."""

    def __init__(self) -> None:
        self.key_id = ""
        self.request_id = ""
        self.path = ""
        self.request_bytes = 0
        self.add_usage = False
        self.max_tokens = 0
        self.model = ""  # the model the request named (Check read it)
        self.clamped = False  # the body's output cap was lowered
        self.status = 0
        self.meter: ResponseMeter | None = None
        self.strip: UsageChunkFilter | None = None
        self.response_bytes = 0
        self.done = False  # settled (or nothing to settle)

    @property
    def metered(self) -> bool:
        return bool(self.key_id and self.request_id)

    def request(self, headers: dict[str, str], directives: dict[str, str]) -> None:
        key_id = headers.get(KEY_ID_HEADER, "")
        self.key_id = key_id if keygen.is_key_id(key_id) else ""
        self.request_id = headers.get(REQUEST_ID_HEADER, "")
        self.path = headers.get(":path", "")
        # the body's size as Check read it: a chunked or HTTP/2 request may declare none
        self.request_bytes = max(
            _length(headers.get("content-length", "")),
            _length(directives.get(tap_directives.REQUEST_BYTES, "")),
        )
        self.add_usage = directives.get(tap_directives.STREAM_USAGE) == tap_directives.ADD
        self.max_tokens = _length(directives.get(tap_directives.MAX_TOKENS, ""))
        self.model = directives.get(tap_directives.MODEL, "")

    def response(self, headers: dict[str, str]) -> None:
        status = headers.get(":status", "0")
        self.status = int(status) if status.isdigit() else 0
        content_type = headers.get("content-type", "")
        encoding = headers.get("content-encoding", "").strip().lower()
        self.meter = ResponseMeter(content_type, encoding)
        if self.add_usage and self.meter.stream and encoding in ("", "identity"):
            self.strip = UsageChunkFilter()


class UsageTap:
    def __init__(
        self,
        store: KeyStore,
        prices: PriceTable,
        metrics: Metrics,
        journal: UsageJournal | None = None,
    ) -> None:
        self.store = store
        self.prices = prices
        self.metrics = metrics
        self.journal = journal
        self._charging: set[asyncio.Task[None]] = set()

    def register(self, server: grpc.aio.Server) -> None:
        handler = grpc.stream_stream_rpc_method_handler(
            self.Process,
            request_deserializer=ext_proc.ProcessingRequest.FromString,
            response_serializer=ext_proc.ProcessingResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Process": handler}),)
        )

    async def drain(self) -> None:
        """Wait for the charges still being written (on shutdown)."""
        if self._charging:
            await asyncio.gather(*self._charging, return_exceptions=True)

    async def Process(
        self,
        requests: AsyncIterator[ext_proc.ProcessingRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:
        exchange = _Exchange()
        if _role(context) == CLAMP_ROLE:
            async for message in requests:
                yield self._clamp(exchange, message)
            return
        try:
            async for message in requests:
                reply = self._answer(exchange, message)
                # observability mode (envoy.yaml's `.meter` filter): Envoy waits for no
                # answer, and would ignore one
                if reply is not None and not message.observability_mode:
                    yield reply
        finally:
            # the response ended without its last chunk: the client went away, the
            # upstream cut the stream, or Envoy gave up on it
            if exchange.metered and not exchange.done:
                self._charge_later(exchange, cut=True)

    def _clamp(
        self, exchange: _Exchange, message: ext_proc.ProcessingRequest
    ) -> ext_proc.ProcessingResponse:
        """The fail-closed filter of a clamped request (envoy.yaml's
        `envoy.filters.http.ext_proc.clamp`): its body rewritten, or refused. The metering
        filter after it rewrites the same way again (which changes nothing) and meters."""
        if message.WhichOneof("request") == "request_headers":
            exchange.request(_headers(message.request_headers), _directives(message))
            return ext_proc.ProcessingResponse(
                request_headers=ext_proc.HeadersResponse(response=_CONTINUE)
            )
        if message.WhichOneof("request") == "request_body" and exchange.max_tokens:
            return self._request_body(exchange, message.request_body)
        return ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse(response=_CONTINUE))

    def _answer(
        self, exchange: _Exchange, message: ext_proc.ProcessingRequest
    ) -> ext_proc.ProcessingResponse | None:
        phase = message.WhichOneof("request")
        if phase == "request_headers":
            return self._request_headers(exchange, message)
        if phase == "request_body":
            return self._request_body(exchange, message.request_body)
        if phase == "response_headers":
            return self._response_headers(exchange, message.response_headers)
        if phase == "response_body":
            return self._response_body(exchange, message.response_body)
        if phase in ("request_trailers", "response_trailers"):
            return ext_proc.ProcessingResponse(**{phase: ext_proc.TrailersResponse()})
        return None

    def _request_headers(
        self, exchange: _Exchange, message: ext_proc.ProcessingRequest
    ) -> ext_proc.ProcessingResponse:
        headers = _headers(message.request_headers)
        exchange.request(headers, _directives(message))
        reply = ext_proc.ProcessingResponse(
            request_headers=ext_proc.HeadersResponse(response=_CONTINUE)
        )
        if not exchange.metered or message.request_headers.end_of_stream:
            # not a keyed request, or one without a body (GET /v1/models: Check opened no
            # reservation for it, and it generates nothing): nothing to meter
            exchange.done = True
            reply.mode_override.CopyFrom(_SKIP_RESPONSE_BODY)
            return reply
        wants_body = (exchange.add_usage or exchange.max_tokens) and not (
            message.request_headers.end_of_stream
        )
        if wants_body:
            reply.mode_override.CopyFrom(_READ_REQUEST_BODY)
        if exchange.add_usage and wants_body:
            # the usage chunk is cut from plain text only (Check already narrowed every
            # other request to encodings the meter reads)
            reply.request_headers.response.header_mutation.CopyFrom(
                _set_headers(("accept-encoding", "identity"))
            )
        return reply

    def _request_body(
        self, exchange: _Exchange, body: ext_proc.HttpBody
    ) -> ext_proc.ProcessingResponse:
        exchange.request_bytes = max(exchange.request_bytes, len(body.body))
        try:
            rewritten = rewrite_request(
                body.body,
                exchange.path,
                add_usage=exchange.add_usage,
                max_tokens=exchange.max_tokens,
            )
        except Exception as error:
            # a tap that raised here would let Envoy (failure_mode_allow) forward the body
            # unchanged: unclamped, and with no usage chunk asked for. (The error's type
            # only: its text may quote the prompt.)
            log.error(
                "tap could not rewrite a request",
                extra={"key_id": exchange.key_id, "error": type(error).__name__},
            )
            rewritten = None
        if rewritten is None:
            exchange.add_usage = False
            self.metrics.tap_unmetered.labels("request_unreadable").inc()
            if exchange.max_tokens:
                # the reservation covers the clamped answer only: never send the full one
                return self._refuse_unclamped(exchange)
            return ext_proc.ProcessingResponse(
                request_body=ext_proc.BodyResponse(response=_CONTINUE)
            )
        exchange.clamped = exchange.max_tokens > 0
        common = ext_proc.CommonResponse(
            header_mutation=_set_headers(("content-length", str(len(rewritten)))),
            body_mutation=ext_proc.BodyMutation(body=rewritten),
        )
        return ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse(response=common))

    def _refuse_unclamped(self, exchange: _Exchange) -> ext_proc.ProcessingResponse:
        self._charge_later(exchange, cut=False)  # releases: nothing was generated
        exchange.done = True
        body = error_body(
            Reason.BUDGET_EXCEEDED.value,
            "The budget covers a shorter answer only, and this request's max_tokens could "
            "not be lowered.",
            "insufficient_quota",
        )
        return ext_proc.ProcessingResponse(
            immediate_response=ext_proc.ImmediateResponse(
                status={"code": 402},
                headers=_set_headers(("content-type", "application/json")),
                body=body,
                details="usage_tap_clamp_failed",
            )
        )

    def _response_headers(
        self, exchange: _Exchange, headers: ext_proc.HttpHeaders
    ) -> ext_proc.ProcessingResponse:
        reply = ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse(response=_CONTINUE)
        )
        if exchange.done or not exchange.metered:
            # nothing to meter: a request Envoy refused before the tap saw it (ext_authz's
            # denial reaches every filter's response path), or one it skipped
            exchange.done = True
            reply.mode_override.CopyFrom(_SKIP_RESPONSE_BODY)
            return reply
        exchange.response(_headers(headers))
        if exchange.clamped:
            reply.response_headers.response.header_mutation.CopyFrom(
                _set_headers((CLAMPED_HEADER, str(exchange.max_tokens)))
            )
        if headers.end_of_stream:
            self._charge_later(exchange, cut=False)
        return reply

    def _response_body(
        self, exchange: _Exchange, body: ext_proc.HttpBody
    ) -> ext_proc.ProcessingResponse:
        if exchange.done or exchange.meter is None:
            return _PASS
        chunk = body.body
        exchange.response_bytes += len(chunk)
        exchange.meter.feed(chunk)
        reply = _PASS
        if exchange.strip is not None:
            out = exchange.strip.feed(chunk)
            if body.end_of_stream:
                out += exchange.strip.finish()
            if out != chunk:
                mutation = (
                    ext_proc.BodyMutation(body=out)
                    if out
                    else ext_proc.BodyMutation(clear_body=True)
                )
                reply = ext_proc.ProcessingResponse(
                    response_body=ext_proc.BodyResponse(
                        response=ext_proc.CommonResponse(body_mutation=mutation)
                    )
                )
        if body.end_of_stream:
            self._charge_later(exchange, cut=False)
        return reply

    def _charge_later(self, exchange: _Exchange, *, cut: bool) -> None:
        """Settle off the response's path, in a task the RPC's end cannot cancel."""
        exchange.done = True
        meter, exchange.meter = exchange.meter, None
        metered = meter.finish() if meter is not None else Metered(None, 0, "no_response")
        self._spawn(self._settle(exchange, metered, cut))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._charging.add(task)
        task.add_done_callback(self._charging.discard)

    async def _settle(self, exchange: _Exchange, metered: Metered, cut: bool) -> None:
        """Charge what the response reported, once, under the request's id; else an
        estimate for a response that produced something (or that the client left before
        it began: the upstream had the prompt); else give the reservation back."""
        if metered.usage is not None and metered.usage.total_tokens == 0 and metered.produced:
            # "0 tokens" for an answer that has content is not believed: estimated
            metered = replace(metered, usage=None, unmetered="zero_usage")
        usage = metered.usage
        log.debug(
            "tap settles",
            extra={
                "key_id": exchange.key_id,
                "status": exchange.status,
                "cut": cut,
                "usage": usage is not None,
                "unmetered": metered.unmetered,
                "produced": metered.produced,
            },
        )
        if usage is None:
            self.metrics.tap_unmetered.labels(self._unmetered_reason(exchange, metered, cut)).inc()
            if not self._produced(exchange, metered, cut):
                self.metrics.tap_responses.labels("released").inc()
                await self._release(exchange)
                return
            usage = estimate_usage(metered, exchange.request_bytes, exchange.response_bytes)
        basis = "usage" if metered.usage is not None else "estimate"
        model = metered.model if self._priced(metered.model) else exchange.model
        await self._charge(exchange, usage, model, basis)

    @staticmethod
    def _unmetered_reason(exchange: _Exchange, metered: Metered, cut: bool) -> str:
        if cut:
            return "cut"
        if exchange.status >= 400:
            return "upstream_error"
        return metered.unmetered or "no_usage"

    @staticmethod
    def _produced(exchange: _Exchange, metered: Metered, cut: bool) -> bool:
        if exchange.status >= 400:
            return metered.produced  # an upstream error: only what it generated counts
        if metered.produced:
            return True
        if metered.unmetered in ("unreadable", "encoding", "too_large"):
            return exchange.response_bytes > 0  # a body we could not read: by its size
        # cut before any content passed: the upstream had taken the prompt
        return cut

    def _priced(self, model: str) -> bool:
        return bool(model) and self.prices.lookup(model) is not None

    async def _release(self, exchange: _Exchange) -> None:
        try:
            await self.store.release(exchange.key_id, exchange.request_id, self.store.clock())
        except StoreUnavailable:
            log.warning("tap could not release", extra={"key_id": exchange.key_id})

    async def _charge(
        self, exchange: _Exchange, usage: MeteredUsage, model: str, basis: str
    ) -> None:
        try:
            cost = self.prices.cost_nanos(
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
            )
        except InvalidArgument:
            self._failed("model_not_priced", exchange)
            return
        report = UsageReport(
            exchange.key_id,
            exchange.request_id,
            model,
            PROVIDER,
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens,
            cost,
            family=self.prices.family(model),
        )
        try:
            result = await self.store.report_usage(report)
        except NotFound:
            self._failed("key_not_found", exchange)  # deleted while its request ran
            return
        except StoreUnavailable:
            self.metrics.redis_errors.labels("report_usage").inc()
            if not await self._journaled(report):
                self._failed("redis_unavailable", exchange)
            return
        self.metrics.tap_responses.labels(basis).inc()
        if result.duplicate:
            return
        if result.settled:
            self.metrics.reservations_settled.inc()
        self.metrics.count_usage(
            exchange.key_id,
            self.prices.label(model),
            usage.total_tokens,
            nanos_to_usd(result.cost_nanos),
        )

    async def _journaled(self, report: UsageReport) -> bool:
        """Redis is down: the charge waits in the journal, as a reported one would."""
        if self.journal is None:
            return False
        try:
            await self.journal.append_async(report)
        except JournalFull:
            return False
        self.metrics.usage_reports.labels("queued").inc()
        self.metrics.journal_depth.set(self.journal.pending)
        log.warning("tap charge journaled", extra={"key_id": report.key_id})
        return True

    def _failed(self, reason: str, exchange: _Exchange) -> None:
        self.metrics.tap_responses.labels("failed").inc()
        self.metrics.tap_unmetered.labels(reason).inc()
        log.warning("tap could not charge", extra={"key_id": exchange.key_id, "reason": reason})
