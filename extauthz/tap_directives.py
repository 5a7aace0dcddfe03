"""What Check tells the usage tap (extauthz/tap.py) about a request it allowed.

Check has read the body; the tap, which runs after it in Envoy, has not. Where the tap
must change the body, Check says so in the ext_authz filter's dynamic metadata (never
seen by the upstream or the client), and the tap asks Envoy for the body of those
requests only:

- `stream_usage: add` -- a streaming chat/completions or completions request that did
  not ask for its usage chunk: the tap sets `stream_options.include_usage` and removes
  that chunk from the client's stream;
- `max_tokens: <n>` -- Check allowed the request clamped to n output tokens (the route's
  `max_tokens_clamp` context extension): the tap lowers the body's output cap to n;
- `model: <name>` -- the model the body names, to price an estimate with where the
  response names none (a client that left before the response began);
- `request_bytes: <n>` -- the size of the body Check read, the estimate's prompt where no
  usage comes back: a chunked (HTTP/1.1) or HTTP/2 request may carry no content-length.
"""

from __future__ import annotations

from typing import Final

from extauthz.decision import Outcome, Verdict
from keys.model import BodyModel

NAMESPACE: Final = "envoy.filters.http.ext_authz"
STREAM_USAGE: Final = "stream_usage"
ADD: Final = "add"
MAX_TOKENS: Final = "max_tokens"
MODEL: Final = "model"
REQUEST_BYTES: Final = "request_bytes"
# the per-route ext_authz context extension that says the tap runs after Check
CLAMP_EXTENSION: Final = "max_tokens_clamp"
# the paths whose streams end with a usage chunk when asked (`stream_options`)
USAGE_OPTION_PATHS: Final = ("/chat/completions", "/completions")


def takes_stream_options(path: str) -> bool:
    return path.partition("?")[0].rstrip("/").endswith(USAGE_OPTION_PATHS)


def directives(outcome: Outcome, path: str) -> list[tuple[str, str]]:
    """The metadata entries for an allowed request."""
    if outcome.verdict is not Verdict.ALLOW or outcome.model is None:
        return []
    model = outcome.model
    entries = [(MODEL, model.name)] if model.kind is BodyModel.NAMED else []
    if model.stream_without_usage and takes_stream_options(path):
        entries.append((STREAM_USAGE, ADD))
    if outcome.clamped_to:
        entries.append((MAX_TOKENS, str(outcome.clamped_to)))
    if model.body_bytes > 0:
        entries.append((REQUEST_BYTES, str(model.body_bytes)))
    return entries


READABLE_ENCODINGS: Final = frozenset({"gzip", "x-gzip", "deflate", "identity"})


def readable_encodings(accept: str | None) -> str | None:
    """`accept-encoding` narrowed to the codings the meter inflates; None where it names
    no other (left as the client sent it)."""
    if accept is None:
        return None
    codings = [part.strip() for part in accept.split(",") if part.strip()]
    kept = [c for c in codings if c.partition(";")[0].strip().lower() in READABLE_ENCODINGS]
    if len(kept) == len(codings):
        return None
    return ", ".join(kept) or "identity"
