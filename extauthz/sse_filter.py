"""The usage chunk taken back out of a stream the client did not ask usage for (issue 12).

To charge a streaming chat or completions request from the upstream's own count, the tap
adds `stream_options.include_usage: true` to a request that lacked it; the upstream then
sends one chunk more, `usage` set and `choices` empty, that the client never asked for (and
that a client reading `choices[0]` of every chunk would trip on). `UsageChunkFilter` removes
exactly that event and passes every other byte on unchanged and in order.

It reads the body as sent, so only an identity-encoded stream can be filtered. An event ends
at a blank line; lines end in `\\n`, `\\r\\n` or `\\r`, and a `\\r\\n` may be split across
chunks. An event not yet ended is held back (it may be the usage chunk) up to
MAX_EVENT_BYTES; past that the filter gives up and passes everything on: it must never
break a stream.
"""

from __future__ import annotations

import re
from typing import Final

from extauthz.usage_meter import MAX_EVENT_BYTES, sse_document

_LINE_END: Final = re.compile(rb"\r\n|\r|\n")
# A line end, then the empty line's own: an event's end. Atomic, so that a \r\n is never
# read as a \r line end followed by an empty \n line.
_BLANK_LINE: Final = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")


def is_usage_chunk(event: bytes) -> bool:
    """The chunk include_usage adds: `usage` an object and `choices` an empty list."""
    if b"usage" not in event and b"\\u" not in event:  # the key, plain or escaped, or no parse
        return False
    document = sse_document(event)
    if not isinstance(document, dict):
        return False
    choices = document.get("choices")
    return isinstance(document.get("usage"), dict) and isinstance(choices, list) and not choices


class UsageChunkFilter:
    """Feed it the stream as it passes; pass on what `feed` returns, and at the end of the
    stream what `finish` returns."""

    def __init__(self) -> None:
        self._held = bytearray()  # the start of an event that has not ended yet
        self._searched = 0  # where in `_held` the search for its end resumes
        self._drop_lf = False  # the event dropped last ended in a \r: a \n next is its half
        self._passing = False  # past the bound: everything passes from now on

    def feed(self, chunk: bytes) -> bytes:
        if self._passing:
            return chunk
        if chunk and self._drop_lf:
            self._drop_lf = False
            chunk = chunk.removeprefix(b"\n")
        self._held += chunk
        out = bytearray()
        start = 0
        while (end := self._event_end(start)) is not None:
            event = bytes(self._held[start:end])
            if is_usage_chunk(event):
                self._drop_lf = end == len(self._held) and event.endswith(b"\r")
            else:
                out += event
            start = end
        del self._held[:start]
        self._searched = max(self._searched - start, 0)
        if len(self._held) > MAX_EVENT_BYTES:
            out += self._held
            self._held.clear()
            self._passing = True
        return bytes(out)

    def _event_end(self, start: int) -> int | None:
        """Where the event at `start` ends (after its blank line); None: it has not yet."""
        if start >= len(self._held):
            return None
        lone = _LINE_END.match(self._held, start)
        if lone is not None:  # an empty line with no event before it: passed on as it is
            return lone.end()
        # A blank line the bytes searched before lacked begins in their last 3 (a \r\n).
        found = _BLANK_LINE.search(self._held, max(start, self._searched))
        if found is None:
            self._searched = max(start, len(self._held) - 3)
            return None
        return found.end()

    def finish(self) -> bytes:
        """The event held back when the stream ended without its blank line, unless it is
        the usage chunk."""
        held, self._held, self._searched = bytes(self._held), bytearray(), 0
        return b"" if is_usage_chunk(held) else held
