"""Usage read from an LLM response as it streams past: the groundwork of the usage tap
(Envoy ext_proc, issue 12), free of any protocol so it can be tested byte by byte.

`ResponseMeter` is fed the response body in whatever chunks the proxy delivers and, at the
end, says what the upstream reported (`usage`), or, where it reported nothing, how much
content passed through (to estimate from, never to charge $0 for a response that produced
content). It understands:

- generated content wherever a response carries it: text, refusals, reasoning
  (`reasoning_content` / `reasoning`), tool and function calls, Responses API deltas and output
  items, and embedding vectors or images (`data`), counted as items: `Metered.produced` says
  whether anything was generated, so that such a response is never given back for free;
- JSON bodies: chat completions and completions (`prompt_tokens`, `completion_tokens`),
  embeddings (`prompt_tokens`), the Responses API (`input_tokens`, `output_tokens`), with
  `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens` and
  `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`;
- SSE streams (`text/event-stream`): the chunk whose `usage` is set (chat, completions with
  `stream_options.include_usage`) or the Responses API's `response.completed` event; events
  may be split across chunks at any byte, and lines may end in `\\n`, `\\r\\n` or `\\r`;
- `Content-Encoding: gzip` (or `x-gzip`, `deflate`), inflated incrementally, with a bound
  on the inflated size.

Anything it cannot read leaves `usage` None and says why (`unmetered`); a usage with a count
over MAX_TOKENS is junk, not a bill (`absurd`). No input makes it raise: an event it cannot
read is skipped and the others still count.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Final

MAX_JSON_BYTES: Final = 16 << 20  # a non-streamed body kept for parsing at its end
MAX_INFLATED_BYTES: Final = 256 << 20  # a compressed body inflated past this is a bomb
MAX_EVENT_BYTES: Final = 4 << 20  # one SSE event
MAX_TOKENS: Final = 10**9  # a count above this is junk, never a bill

# Where a delta or message (or a Responses API output item) carries generated text.
_TEXT_FIELDS: Final = ("content", "refusal", "reasoning_content", "reasoning")
# What a `data` item holds when a response produced vectors or images rather than text.
_ITEM_FIELDS: Final = ("embedding", "b64_json", "url")


@dataclass(frozen=True, slots=True)
class MeteredUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, served from the provider's cache
    reasoning_tokens: int = 0  # of the completion tokens


@dataclass(frozen=True, slots=True)
class Metered:
    usage: MeteredUsage | None
    content_chars: int  # generated text that passed through (for an estimate)
    unmetered: str = ""  # why `usage` is None: no_usage, unreadable, too_large, encoding, absurd
    model: str = ""  # the model the response says answered ("" when it names none)
    content_events: int = 0  # SSE events that carried generated content (a JSON body: 0 or 1)
    items: int = 0  # embedding vectors (or images) in `data`: content with no text to count

    @property
    def produced(self) -> bool:
        """Whether the upstream generated anything: such a response is never given back free."""
        return self.content_chars > 0 or self.content_events > 0 or self.items > 0


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _absurd(value: object) -> bool:
    """A count no usage honestly reports: over MAX_TOKENS, negative, or not a whole number
    (a float, a string, a bool). Read as zero it would charge $0 for what the response
    generated; an absent count (missing or null) is zero."""
    if value is None:
        return False
    return isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS


def _usage_object(document: object) -> dict[str, object] | None:
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        response = document.get("response")  # Responses API: response.completed
        usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) else None


def _read_usage(document: object) -> tuple[MeteredUsage | None, bool]:
    """The document's usage, and whether the one it carried was too absurd to use (then None)."""
    usage = _usage_object(document)
    if usage is None:
        return None, False
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    raw = (
        usage.get("prompt_tokens", usage.get("input_tokens")),
        usage.get("completion_tokens", usage.get("output_tokens")),
        usage.get("total_tokens"),
        prompt_details.get("cached_tokens") if isinstance(prompt_details, dict) else 0,
        completion_details.get("reasoning_tokens") if isinstance(completion_details, dict) else 0,
    )
    prompt, completion, total, cached, reasoning = (_count(value) for value in raw)
    total = max(total, prompt + completion)
    if total > MAX_TOKENS or any(_absurd(value) for value in raw):
        return None, True
    return MeteredUsage(prompt, completion, total, cached, reasoning), False


def usage_of(document: object) -> MeteredUsage | None:
    """The `usage` object of a response (or of a stream chunk), in any of the shapes above;
    None also when a count in it is absurd (over MAX_TOKENS)."""
    return _read_usage(document)[0]


def model_of(document: object) -> str:
    """The `model` a response or chunk names (the Responses API: its `response.model`)."""
    if not isinstance(document, dict):
        return ""
    model = document.get("model")
    if not isinstance(model, str):
        response = document.get("response")
        model = response.get("model") if isinstance(response, dict) else None
    return model if isinstance(model, str) and len(model) <= 256 else ""


def _chars(value: object) -> int:
    return len(value) if isinstance(value, str) else 0


def _text(value: object) -> int:
    """A string, or a list of content parts (`[{"type": "output_text", "text": ...}]`)."""
    if not isinstance(value, list):
        return _chars(value)
    return sum(
        _chars(part.get("text")) + _chars(part.get("refusal"))
        for part in value
        if isinstance(part, dict)
    )


def _function_chars(function: object) -> int:
    """A tool or function call is generated too: its name and its arguments."""
    if not isinstance(function, dict):
        return 0
    return _chars(function.get("name")) + _chars(function.get("arguments"))


def _message_chars(message: object) -> int:
    """All a choice's delta or message generated: text, refusal, reasoning, tool calls."""
    if not isinstance(message, dict):
        return 0
    chars = sum(_text(message.get(field)) for field in _TEXT_FIELDS)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        chars += sum(_function_chars(c.get("function")) for c in calls if isinstance(c, dict))
    return chars + _function_chars(message.get("function_call"))  # the legacy single call


def _output_item_chars(item: object) -> int:
    """A Responses API output item: a message, a function call, or reasoning's summary."""
    if not isinstance(item, dict):
        return 0
    return _message_chars(item) + _function_chars(item) + _text(item.get("summary"))


def content_chars(document: object) -> int:
    """Generated text in a response or stream chunk: what an estimate is made from."""
    if not isinstance(document, dict):
        return 0
    chars = _chars(document.get("delta"))  # Responses API deltas (text, arguments, reasoning)
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                chars += _message_chars(choice.get("delta")) + _message_chars(choice.get("message"))
                chars += _chars(choice.get("text"))
    output = document.get("output")  # a Responses API body (a stream's deltas are counted)
    if isinstance(output, list):
        chars += sum(_output_item_chars(item) for item in output)
    return chars


def data_items(document: object) -> int:
    """Embedding vectors (or images) in a response's `data`: produced, though not text."""
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return 0
    return sum(
        1 for item in data if isinstance(item, dict) and any(f in item for f in _ITEM_FIELDS)
    )


def sse_document(event: bytes) -> object | None:
    """The JSON an SSE event's `data:` lines carry (None: no data, `[DONE]`, or not JSON).
    Never raises: one unreadable event must not hide the others."""
    lines = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    if not data or data.strip() == b"[DONE]":
        return None
    try:
        document: object = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, too big an int, too deep
        return None
    return document


class _Inflater:
    """Content-Encoding undone chunk by chunk, within MAX_INFLATED_BYTES."""

    def __init__(self, encoding: str) -> None:
        wbits = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": 0}
        self._inflate = zlib.decompressobj(wbits[encoding]) if encoding in wbits else None
        self.inflated = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._inflate is None:
            return chunk
        room = MAX_INFLATED_BYTES - self.inflated + 1
        out = self._inflate.decompress(chunk, room)
        self.inflated += len(out)
        if self.inflated > MAX_INFLATED_BYTES:
            raise ValueError("inflated past the bound")
        return out


class ResponseMeter:
    """Feed it the response body as it passes; `finish()` says what it carried."""

    def __init__(self, content_type: str = "", content_encoding: str = "") -> None:
        self.stream = content_type.partition(";")[0].strip().lower() == "text/event-stream"
        encoding = content_encoding.strip().lower()
        self._unmetered = ""
        if encoding not in ("", "identity", "gzip", "x-gzip", "deflate"):
            self._unmetered = "encoding"
        self._inflater = _Inflater(encoding)
        self._buffer = bytearray()  # a stream's: its incomplete event, line ends made \n
        self._cr = b""  # a \r that ended the bytes so far: maybe the first half of a \r\n
        self._usage: MeteredUsage | None = None
        self._absurd = False
        self._chars = 0
        self._events = 0
        self._items = 0
        self._model = ""

    def feed(self, chunk: bytes) -> None:
        if self._unmetered or not chunk:
            return
        try:
            data = self._inflater.feed(chunk)
        except (zlib.error, ValueError):
            self._unmetered = "unreadable"
            return
        if self.stream:
            self._sse(data)
            return
        self._buffer += data
        if len(self._buffer) > MAX_JSON_BYTES:
            self._unmetered = "too_large"
            self._buffer.clear()

    def _sse(self, data: bytes) -> None:
        """Every event the new bytes complete (a blank line ends one). Only the new bytes are
        normalised and searched, so an event fed in many small chunks costs linear time."""
        data, self._cr = self._cr + data, b""
        if data.endswith(b"\r"):
            data, self._cr = data[:-1], b"\r"
        seam = max(len(self._buffer) - 1, 0)
        self._buffer += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if self._buffer.find(b"\n\n", seam) >= 0:
            *complete, rest = bytes(self._buffer).split(b"\n\n")
            for event in complete:
                self._event(event)
            self._buffer = bytearray(rest)
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._unmetered = "too_large"
            self._buffer.clear()

    def _event(self, event: bytes) -> None:
        document = sse_document(event)
        if document is not None:
            self._document(document)

    def _document(self, document: object) -> None:
        """One JSON document: a stream event, or the whole body."""
        chars, items = content_chars(document), data_items(document)
        self._chars += chars
        self._items += items
        self._events += 1 if chars or items else 0
        self._model = model_of(document) or self._model
        usage, absurd = _read_usage(document)
        if usage is not None:
            self._usage = usage
        self._absurd |= absurd  # an absurd usage neither charges nor hides a good one

    def _end(self) -> None:
        """What is left at the end: a stream's last event (no blank line), or the JSON body;
        taken, so that a second `finish()` counts nothing twice."""
        rest, self._buffer, self._cr = bytes(self._buffer + self._cr), bytearray(), b""
        if self.stream:
            if rest.strip():
                self._event(rest)
            return
        if not rest:
            return
        try:
            document = json.loads(rest)
        except (ValueError, RecursionError):
            self._unmetered = "unreadable"
            return
        self._document(document)

    def finish(self) -> Metered:
        if not self._unmetered:
            self._end()
        usage = None if self._unmetered else self._usage
        reason = self._unmetered
        if usage is None and not reason:
            reason = "absurd" if self._absurd else "no_usage"
        return Metered(usage, self._chars, reason, self._model, self._events, self._items)
