"""Usage read from an LLM response as it streams past: the groundwork of the usage tap
(Envoy ext_proc, issue 12), free of any protocol so it can be tested byte by byte.

`ResponseMeter` is fed the response body in whatever chunks the proxy delivers and, at the
end, says what the upstream reported (`usage`), or, where it reported nothing, how much
content passed through (to estimate from, never to charge $0 for a response that produced
content). It understands:

- JSON bodies: chat completions and completions (`prompt_tokens`, `completion_tokens`),
  embeddings (`prompt_tokens`), the Responses API (`input_tokens`, `output_tokens`), with
  `prompt_tokens_details.cached_tokens` / `input_tokens_details.cached_tokens` and
  `completion_tokens_details.reasoning_tokens` / `output_tokens_details.reasoning_tokens`;
- SSE streams (`text/event-stream`): the chunk whose `usage` is set (chat, completions with
  `stream_options.include_usage`) or the Responses API's `response.completed` event; events
  may be split across chunks at any byte, and lines may end in `\\n`, `\\r\\n` or `\\r`;
- `Content-Encoding: gzip` (or `x-gzip`, `deflate`), inflated incrementally, with a bound
  on the inflated size.

Anything it cannot read leaves `usage` None and says why (`unmetered`).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Final

MAX_JSON_BYTES: Final = 16 << 20  # a non-streamed body kept for parsing at its end
MAX_INFLATED_BYTES: Final = 256 << 20  # a compressed body inflated past this is a bomb
MAX_EVENT_BYTES: Final = 4 << 20  # one SSE event


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
    unmetered: str = ""  # why `usage` is None: no_usage, unreadable, too_large, encoding
    model: str = ""  # the model the response says answered ("" when it names none)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_of(document: object) -> MeteredUsage | None:
    """The `usage` object of a response (or of a stream chunk), in any of the shapes above."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        response = document.get("response")  # Responses API: response.completed
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    total = _count(usage.get("total_tokens")) or prompt + completion
    prompt_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    completion_details = usage.get("completion_tokens_details") or usage.get(
        "output_tokens_details"
    )
    cached = _count(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (
        _count(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else 0
    )
    return MeteredUsage(prompt, completion, max(total, prompt + completion), cached, reasoning)


def model_of(document: object) -> str:
    """The `model` a response or chunk names (the Responses API: its `response.model`)."""
    if not isinstance(document, dict):
        return ""
    model = document.get("model")
    if not isinstance(model, str):
        response = document.get("response")
        model = response.get("model") if isinstance(response, dict) else None
    return model if isinstance(model, str) and len(model) <= 256 else ""


def content_chars(document: object) -> int:
    """Generated text in a response or stream chunk: what an estimate is made from."""
    if not isinstance(document, dict):
        return 0
    chars = 0
    if isinstance(delta := document.get("delta"), str):  # Responses API text deltas
        chars += len(delta)
    choices = document.get("choices")
    if isinstance(choices, list):
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            for holder in (choice.get("delta"), choice.get("message")):
                if isinstance(holder, dict) and isinstance(holder.get("content"), str):
                    chars += len(holder["content"])
            if isinstance(choice.get("text"), str):
                chars += len(choice["text"])
    return chars


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
        self._buffer = bytearray()
        self._usage: MeteredUsage | None = None
        self._chars = 0
        self._model = ""

    def feed(self, chunk: bytes) -> None:
        if self._unmetered or not chunk:
            return
        try:
            data = self._inflater.feed(chunk)
        except (zlib.error, ValueError):
            self._unmetered = "unreadable"
            return
        self._buffer += data
        if self.stream:
            self._events()
        elif len(self._buffer) > MAX_JSON_BYTES:
            self._unmetered = "too_large"
            self._buffer.clear()

    def _events(self) -> None:
        """Every complete event in the buffer (a blank line ends one)."""
        raw, hold = bytes(self._buffer), b""
        if raw.endswith(b"\r"):  # the \r of a \r\n split across chunks: one line end
            raw, hold = raw[:-1], b"\r"
        normalised = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *complete, rest = normalised.split(b"\n\n")
        for event in complete:
            self._event(event)
        self._buffer = bytearray(rest + hold)
        if len(self._buffer) > MAX_EVENT_BYTES:
            self._unmetered = "too_large"
            self._buffer.clear()

    def _event(self, event: bytes) -> None:
        data = b"\n".join(
            line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not data or data.strip() == b"[DONE]":
            return
        try:
            document = json.loads(data)
        except ValueError:
            return  # one unreadable event does not hide the others
        self._chars += content_chars(document)
        self._model = model_of(document) or self._model
        usage = usage_of(document)
        if usage is not None:
            self._usage = usage

    def finish(self) -> Metered:
        if self._unmetered:
            return Metered(None, self._chars, self._unmetered, self._model)
        if self.stream:
            tail = bytes(self._buffer).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if tail.strip():
                self._event(tail)  # a stream that ended without a blank line
        elif self._buffer:
            try:
                document = json.loads(bytes(self._buffer))
            except ValueError:
                return Metered(None, 0, "unreadable")
            self._chars = content_chars(document)
            self._model = model_of(document)
            self._usage = usage_of(document)
        if self._usage is None:
            return Metered(None, self._chars, "no_usage", self._model)
        return Metered(self._usage, self._chars, model=self._model)
