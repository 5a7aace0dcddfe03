"""Hostile input against the real server process (real gRPC, real Redis), property-based.

Check: whatever the headers and body, the server answers (never an RPC error, which Envoy
would turn into a bare status without a body) with either OK or a DeniedHttpResponse whose
body is the SPEC's OpenAI-shaped JSON and whose HTTP status matches the SPEC's table. A
malformed or wrong key is always 401 `invalid_api_key`; a key restricted to ["gpt-4"] lets
a request through only when the body (read with Python's `json`, last "model" wins) names
exactly "gpt-4", or when there is no body at all.

Admin and usage calls: wrong values of every type the proto lets through get OK or a
client error (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED), never
INTERNAL or UNKNOWN; a rejected call stores or charges nothing.

The Lua half of the constant-time digest compare (`same_digest` in keys/lua/_lib.lua)
runs here against the real Redis; the Python half and the design review of the Lua source
are in tests/unit/test_constant_time.py.

Hypothesis keeps failing examples in `.hypothesis/` (which it git-ignores itself) and tries
them first on the next run.
"""

from __future__ import annotations

import base64
import json
import math
import secrets
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from keys.keyspace import INDEX_ALL
from keys.v1 import keys_pb2
from tests.conftest import Server
from tests.helpers import Clients, bearer, chat_body, check_request

pytestmark = pytest.mark.integration


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


# SPEC, "The Check decision": error.code -> HTTP status.
STATUS_OF_CODE = {
    "invalid_api_key": 401,
    "key_revoked": 401,
    "key_expired": 401,
    "model_not_allowed": 403,
    "budget_exceeded": 402,
    "rate_limit_exceeded": 429,
    "auth_unavailable": 503,
}
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}
KEY_HEADERS = ("authorization", "x-api-key", "api-key")
PARTIAL = "x-envoy-auth-partial-body"
# Headers whose presence changes the decision on purpose; junk headers never use them.
MEANINGFUL = {
    *KEY_HEADERS,
    PARTIAL,
    "content-length",
    "transfer-encoding",
    "content-type",
    "x-preferred-model",
    ":method",
}
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
ALNUM = string.ascii_letters + string.digits
UTF8 = st.characters(codec="utf-8")  # every code point protobuf strings can carry


# --- what a Check answer must look like ---------------------------------------------------


@dataclass(frozen=True)
class Answer:
    allowed: bool
    status: int = 0  # HTTP status of a denial
    code: str = ""  # error.code of a denial


def well_formed(response: external_auth_pb2.CheckResponse) -> Answer:
    """Asserts the SPEC's shape of a Check answer and returns what it decided."""
    which = response.WhichOneof("http_response")
    if which == "ok_response":
        assert response.status.code == 0
        return Answer(allowed=True)
    assert which == "denied_response", response
    assert response.status.code != 0
    denied = response.denied_response
    document = json.loads(denied.body)
    assert isinstance(document, dict) and set(document) == {"error"}
    error = document["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None
    code = error["code"]
    assert code in STATUS_OF_CODE, code
    assert denied.status.code == STATUS_OF_CODE[code]
    headers = {h.header.key.lower(): h.header.value for h in denied.headers}
    assert headers.get("content-type") == "application/json"
    if code == "rate_limit_exceeded":
        assert headers["retry-after"].isdigit()
    return Answer(allowed=False, status=denied.status.code, code=code)


def rpc_code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def assert_client_outcome(code: grpc.StatusCode) -> None:
    assert code is grpc.StatusCode.OK or code in CLIENT_ERRORS, code


@pytest.fixture
def new_log(server: Server) -> Iterator[Callable[[], str]]:
    """What the server logged during this test; asserted free of crashes at the end."""
    start = len(server.process.log_text())

    def since_start() -> str:
        return server.process.log_text()[start:]

    yield since_start


def assert_log_clean(log: str) -> None:
    assert "Traceback" not in log
    assert "unexpected error" not in log.lower()


# --- keys under test ------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    full: str
    id: str

    @property
    def parts(self) -> tuple[str, str, str]:
        prefix, key_id, secret = self.full.rsplit("-", 2)
        return prefix, key_id, secret


def unlimited_key(clients: Clients, **fields: Any) -> Key:
    """No budget and no RPM/TPM limits: only the key itself and its models decide."""
    full, data = clients.create_key(max_budget=0, tpm_limit=0, rpm_limit=0, **fields)
    return Key(full, data.id)


@pytest.fixture(scope="module")
def open_key(clients: Clients) -> Key:
    return unlimited_key(clients, name="hostile: every model")


@pytest.fixture(scope="module")
def other_key(clients: Clients) -> Key:
    return unlimited_key(clients, name="hostile: another key")


@pytest.fixture(scope="module")
def gpt4_key(clients: Clients) -> Key:
    return unlimited_key(clients, name="hostile: gpt-4 only", allowed_models=["gpt-4"])


# --- headers ----------------------------------------------------------------------------------


def _repeat(char: str, times: int) -> str:
    return char * times


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """one_of with weights: each strategy is drawn `weight` times as often."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


huge_values = st.builds(
    _repeat,
    st.sampled_from(["a", "\x00", " ", ",", "é", "\U0001f600", "Bearer "]),
    st.sampled_from([0, 1, 255, 256, 257, 8_192, 65_536]),
)
header_values = st.one_of(st.text(UTF8, max_size=40), huge_values)
junk_names = st.one_of(
    st.from_regex(r"x-junk-[a-z0-9]{1,8}", fullmatch=True),
    st.sampled_from(["x-virtual-key-id", "x-virtual-key-user-id", "host", "x-model", ":path"]),
    st.text(UTF8, min_size=1, max_size=12),
).filter(lambda name: name.lower() not in MEANINGFUL)
junk_headers = st.dictionaries(junk_names, header_values, max_size=3)


@dataclass(frozen=True)
class Carrier:
    """How the key text reaches the server: which headers, repeated or not."""

    name: str  # a key header, "header_map" (Envoy's encode_raw_headers form)
    scheme: str = "Bearer"
    repeated: bool = False


carriers = st.builds(
    Carrier,
    st.sampled_from([*KEY_HEADERS, "header_map"]),
    st.sampled_from(["Bearer", "bearer", "BEARER"]),
    st.booleans(),
)


def build_check(
    carrier: Carrier,
    values: list[str],
    junk: dict[str, str],
    body: bytes,
    *,
    body_as_string: bool = False,
    extra: dict[str, str] | None = None,
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest carrying `values` in the carrier's header: one value, or all of
    them as a repeated header (Envoy joins repeated headers with ",")."""
    entries = [
        f"{carrier.scheme} {v}" if carrier.name in ("authorization", "header_map") else v
        for v in values
    ]
    headers = {**junk, **(extra or {})}
    if carrier.name == "header_map":
        request = check_request({}, body)
        http = request.attributes.request.http
        for name, value in headers.items():
            http.header_map.headers.add(key=name, raw_value=value.encode())
        http.header_map.headers.add(key="x-junk-raw", raw_value=b"\xff\xfe\x00\xc0\xed\xa0\x80")
        for entry in entries:
            http.header_map.headers.add(key="Authorization", raw_value=entry.encode())
    else:
        headers[carrier.name] = ",".join(entries)
        request = check_request(headers, body)
    if body_as_string:
        http = request.attributes.request.http
        http.raw_body = b""
        http.body = body.decode()
    return request


def check(clients: Clients, request: external_auth_pb2.CheckRequest) -> Answer:
    try:
        response = clients.authz.Check(request, timeout=10)
    except grpc.RpcError as err:  # pragma: no cover - the failure being tested for
        pytest.fail(f"Check answered with an RPC error: {err.code()} {err.details()}")
    return well_formed(response)


# --- bodies -----------------------------------------------------------------------------------

TRICKY_STRINGS = [
    "gpt-4",
    '"model": "gpt-4"',
    '{"model":"gpt-4"}',
    "model",
    "\\u0067pt-4",
    "\x00",
    "\u202egpt-4",
    "\ufeff",
]
MODEL_CANDIDATES = [
    "gpt-4",
    "gpt-4o",
    "GPT-4",
    " gpt-4",
    "gpt-4 ",
    "gpt-4\n",
    "\ngpt-4\n",
    "gpt-4\x00",
    "gpt-4\u200b",
    "",
    "*",
    "gpt-3.5-turbo",
    "g" * 300,
]
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),  # NaN and Infinity: Python's json reads them
    st.text(UTF8, max_size=12),
    st.sampled_from(TRICKY_STRINGS),
)
object_keys = st.one_of(
    st.sampled_from(["model", "Model", "MODEL", "model ", "messages", "stream"]),
    st.text(UTF8, max_size=6),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(object_keys, inner, max_size=3),
    max_leaves=8,
)
model_values = weighted(
    (4, st.sampled_from(["gpt-4", "gpt-4o"])),
    (2, st.sampled_from(MODEL_CANDIDATES)),
    (2, json_values),  # not a string, or a string hidden in a list or object
    (1, st.sampled_from([{"model": "gpt-4"}, ["gpt-4"]])),
)


def _member(name: str, value: Any) -> str:
    return f"{json.dumps(name)}:{json.dumps(value)}"


def _deep(depth: int) -> str:
    return '"deep":' + "[" * depth + "]" * depth


def _pad(size: int) -> str:
    return '"pad":"' + "x" * size + '"'


# Depths either far below or far above the recursion limit, so the test process and the
# server (different stack depths) agree on which ones parse.
special_members = st.one_of(
    st.builds(_deep, st.sampled_from([1, 10, 100, 5_000, 100_000])),
    st.builds(_pad, st.sampled_from([0, 100, 65_536, 250_000])),
)


@st.composite
def json_object_texts(draw: st.DrawFn) -> str:
    """An object text that may repeat "model" (the last one wins in Python's json)."""
    members = draw(
        st.lists(
            weighted(
                (2, st.builds(_member, st.just("model"), model_values)),
                (1, st.builds(_member, object_keys, json_values)),
            ),
            max_size=5,
        )
    )
    special = draw(st.none() | special_members)
    if special is not None:
        members.insert(draw(st.integers(0, len(members))), special)
    return "{" + ",".join(members) + "}"


top_level_texts = weighted(
    (4, json_object_texts()),
    (1, json_object_texts().map(lambda text: f"[{text}]")),
    (1, json_values.map(json.dumps)),
)


def _escape_text(text: str, how: str) -> str:
    if how == "escape gpt-4":  # "\u0067\u0070..." reads as "gpt-4"
        escaped = "".join(f"\\u{ord(c):04x}" for c in "gpt-4")
        return text.replace('"gpt-4"', f'"{escaped}"')
    if how == "escape model key":  # "\u006dodel" reads as "model"
        return text.replace('"model":', '"\\u006dodel":')
    if how == "whitespace":
        return f" \n\t{text}\r\n "
    return text


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-8-bom":
        return b"\xef\xbb\xbf" + text.encode()
    return text.encode(encoding)


encoded_bodies = st.builds(
    _encode,
    st.builds(
        _escape_text,
        top_level_texts,
        st.sampled_from(["", "escape gpt-4", "escape model key", "whitespace"]),
    ),
    st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-bom", "utf-16", "utf-16-le", "utf-32"]),
)


def _mangle(body: bytes, how: str, at: int, byte: int) -> bytes:
    cut = 1 + at % max(len(body) - 1, 1)
    if how == "truncate":
        return body[:cut]
    if how == "invalid utf-8":
        return body[:cut] + bytes([0xFF]) + body[cut:]
    if how == "overlong utf-8":
        return body[:cut] + b"\xc0\xa2" + body[cut:]
    if how == "replace a byte":
        return body[: cut - 1] + bytes([byte]) + body[cut:]
    if how == "trailing data":
        return body + b' {"model":"gpt-4"}'
    return b"\x00" + body  # leading NUL


mangled_bodies = st.builds(
    _mangle,
    encoded_bodies,
    st.sampled_from(
        [
            "truncate",
            "invalid utf-8",
            "overlong utf-8",
            "replace a byte",
            "trailing data",
            "leading NUL",
        ]
    ),
    st.integers(0, 2**20),
    st.integers(0, 255),
)
bodies = weighted(
    (1, st.just(b"")),
    (1, st.binary(max_size=512)),
    (6, encoded_bodies),
    (3, mangled_bodies),
    (1, st.just(chat_body("gpt-4"))),
)


def python_reads_gpt4(body: bytes) -> bool:
    """The oracle: does the upstream (Python's json, last key wins) read model "gpt-4", and
    would a case-insensitive parser (Go's encoding/json) find no other "Model"?"""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(document, dict):
        return False
    ambiguous = any(k != "model" and k.casefold() == "model" for k in document)
    return not ambiguous and document.get("model") == "gpt-4"


# --- Check: keys ------------------------------------------------------------------------------

HOSTILE_CHARS = st.one_of(
    st.sampled_from(
        list(" \t\r\n\x00\x0b\x0c\x1f\x7f\u00a0\u2028\u200b\ufeff-_.,;:/+=\"'\\é\uff21\U0001f600")
    ),
    UTF8,
)


@st.composite
def wrong_keys(draw: st.DrawFn, key: Key, other: Key) -> str:
    """Every wrong shape of a key; none of them is the key (after trimming whitespace)."""
    prefix, key_id, secret = key.parts
    _, other_id, other_secret = other.parts
    full = key.full
    position = st.integers(1, len(full) - 1)  # inside the key, never at its ends
    variant: str = draw(
        st.one_of(
            st.text(UTF8, max_size=300),
            st.text(UTF8, max_size=40).map(lambda p: f"{p}-{key_id}-{secret}"),
            st.just(f"{prefix}-{key_id.upper()}-{secret}"),
            st.just(f"{prefix}-{key_id}-{secret.swapcase()}"),
            st.integers(0, len(secret) - 1).map(lambda n: f"{prefix}-{key_id}-{secret[:n]}"),
            st.text(ALNUM, min_size=1, max_size=300).map(lambda s: full + s),
            st.tuples(position, HOSTILE_CHARS).map(lambda p: full[: p[0]] + p[1] + full[p[0] :]),
            st.tuples(st.integers(0, len(full) - 1), st.sampled_from(ALNUM) | HOSTILE_CHARS).map(
                lambda p: full[: p[0]] + p[1] + full[p[0] + 1 :]
            ),
            st.sampled_from(["\x00", "x", "-", "é"]).map(lambda c: full + c),
            st.sampled_from(["\x00", "x", "-", "é"]).map(lambda c: c + full),
            st.just(f"{prefix}-{key_id}-{other_secret}"),
            st.just(f"{prefix}-{other_id}-{secret}"),
            st.just(f"{full} {full}"),
            st.just(full[:-1]),
            st.just(""),
            st.builds(_repeat, st.sampled_from(["A", full]), st.sampled_from([2, 300, 3_000])),
        )
    )
    assume(variant.strip() not in (full, other.full))
    return variant


@_settings(100)
@given(data=st.data(), carrier=carriers, junk=junk_headers, body=bodies)
def test_a_wrong_or_malformed_key_is_always_401_invalid_api_key(
    clients: Clients,
    open_key: Key,
    other_key: Key,
    new_log: Callable[[], str],
    data: st.DataObject,
    carrier: Carrier,
    junk: dict[str, str],
    body: bytes,
) -> None:
    wrong = data.draw(wrong_keys(open_key, other_key), label="wrong key")
    values = [wrong]
    if carrier.repeated:  # a repeated header with the right key in it is still refused
        values = data.draw(st.permutations([wrong, open_key.full]), label="repeated")
    answer = check(clients, build_check(carrier, values, junk, body))
    assert (answer.allowed, answer.status, answer.code) == (False, 401, "invalid_api_key")
    assert_log_clean(new_log())


@_settings(60)
@given(
    carrier=carriers,
    junk=junk_headers,
    body=bodies,
    padding=st.tuples(st.sampled_from(["", " ", "  \t"]), st.sampled_from(["", " ", "\t "])),
)
def test_the_right_key_passes_through_the_same_noise(
    clients: Clients,
    open_key: Key,
    new_log: Callable[[], str],
    carrier: Carrier,
    junk: dict[str, str],
    body: bytes,
    padding: tuple[str, str],
) -> None:
    """The control for the test above: the same headers and bodies with the right key
    (every model allowed, no limits) always pass."""
    presented = padding[0] + open_key.full + padding[1]
    one = Carrier(carrier.name, carrier.scheme, repeated=False)
    response = clients.authz.Check(build_check(one, [presented], junk, body), timeout=10)
    assert well_formed(response).allowed
    upstream = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert upstream["x-virtual-key-id"] == open_key.id
    assert_log_clean(new_log())


def test_a_repeated_authorization_header_with_the_same_key_twice_is_answered(
    clients: Clients, open_key: Key
) -> None:
    """Envoy joins repeated headers with ","; the joined value is not a key. Whatever
    the server makes of it, it answers in the SPEC's shape."""
    for carrier in (Carrier("authorization", repeated=True), Carrier("header_map")):
        request = build_check(carrier, [open_key.full, open_key.full], {}, b"")
        well_formed(clients.authz.Check(request, timeout=5))


# --- Check: the model rule --------------------------------------------------------------------


def expected_to_pass_gpt4_only(body: bytes, headers: dict[str, str]) -> bool:
    """SPEC: the model step passes a key restricted to ["gpt-4"] only for a body whose
    model is "gpt-4", or for no body at all (nothing declared and nothing sent)."""
    if headers.get(PARTIAL, "").lower() == "true":
        return False  # Envoy cut the body: a second "model" may hide after the cut
    if not body:
        declared = headers.get("content-length", "0").strip()
        return declared in ("", "0") and "transfer-encoding" not in headers
    return python_reads_gpt4(body)


body_headers = st.fixed_dictionaries(
    {},
    optional={
        PARTIAL: st.sampled_from(["true", "TRUE", "True", "false", "", "1"]),
        "content-length": st.sampled_from(["0", "", "12", " 5 ", "1048576"]),
        "transfer-encoding": st.just("chunked"),
    },
)


@_settings(250)
@given(body=bodies, headers=body_headers, junk=junk_headers, as_string=st.booleans())
def test_a_gpt4_only_key_passes_exactly_when_the_body_names_gpt4(
    clients: Clients,
    gpt4_key: Key,
    new_log: Callable[[], str],
    body: bytes,
    headers: dict[str, str],
    junk: dict[str, str],
    as_string: bool,
) -> None:
    try:
        body.decode()
    except UnicodeDecodeError:
        as_string = False  # Envoy's string `body` field carries UTF-8 only
    request = build_check(
        Carrier("authorization"),
        [gpt4_key.full],
        junk,
        body,
        body_as_string=as_string,
        extra=headers,
    )
    answer = check(clients, request)
    expected = expected_to_pass_gpt4_only(body, headers)
    event("allowed" if expected else "denied")
    assert answer.allowed is expected, (body[:200], headers)
    if not answer.allowed:
        assert (answer.status, answer.code) == (403, "model_not_allowed")
    assert_log_clean(new_log())


def _gpt4(model: str = "gpt-4") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "headers", "allowed"),
    [
        (b"", {}, True),  # GET /v1/models
        (chat_body("gpt-4"), {}, True),
        (b'{"model":"gpt-4o","model":"gpt-4"}', {}, True),  # last wins
        (b'{"model":"gpt-4","model":"gpt-4o"}', {}, False),
        (b'{"model":"gpt-4","model":4}', {}, False),
        (b'{"model":"\\u0067\\u0070\\u0074\\u002d\\u0034"}', {}, True),
        (b'{"\\u006dodel":"gpt-4"}', {}, True),
        (b'{"messages":[{"content":"\\"model\\": \\"gpt-4\\""}]}', {}, False),
        (b'{"x":{"model":"gpt-4"}}', {}, False),
        (b'[{"model":"gpt-4"}]', {}, False),
        (b'"gpt-4"', {}, False),
        (b'{"model":["gpt-4"]}', {}, False),
        (b'{"model":null}', {}, False),
        (b'{"model":"gpt-4"', {}, False),  # truncated
        (b'{"model":"gpt-4"} {"model":"gpt-4"}', {}, False),  # trailing data
        (b'{"model":"gpt-4","x":"\xff"}', {}, False),  # not UTF-8
        (b'{"model":"gpt-4","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}", {}, False),
        (json.dumps(_gpt4()).encode(), {PARTIAL: "true"}, False),
        (b"", {PARTIAL: "true"}, False),
        (b"", {"content-length": "42"}, False),  # a body Envoy did not forward
        (b"", {"transfer-encoding": "chunked"}, False),
        (json.dumps({**_gpt4(), "pad": "x" * 1_000_000}).encode(), {}, True),  # ~1 MB
        (json.dumps({"pad": "x" * 1_000_000, **_gpt4()}).encode(), {}, True),
        (json.dumps({**_gpt4(), "pad": "x" * 1_000_000}).encode()[:1_000_000], {}, False),
    ],
    ids=lambda value: repr(value)[:40] if not isinstance(value, bytes) else None,
)
def test_gpt4_only_named_bodies(
    clients: Clients,
    gpt4_key: Key,
    new_log: Callable[[], str],
    body: bytes,
    headers: dict[str, str],
    allowed: bool,
) -> None:
    assert expected_to_pass_gpt4_only(body, headers) is allowed  # the oracle agrees
    request = build_check(Carrier("authorization"), [gpt4_key.full], {}, body, extra=headers)
    answer = check(clients, request)
    assert answer.allowed is allowed
    if not allowed:
        assert (answer.status, answer.code) == (403, "model_not_allowed")
    assert_log_clean(new_log())


SURROGATE_BODIES = [
    b'{"model": "\\ud800"}',  # a lone surrogate escape: valid JSON to Python
    b'{"model": "gpt-4\\udfff"}',
    b'{"model": "\xed\xa0\x80"}',  # the same, UTF-8-encoded (json decodes surrogatepass)
]


@pytest.mark.parametrize("body", SURROGATE_BODIES)
@pytest.mark.parametrize("which", ["open", "gpt-4 only", "wrong secret"])
def test_a_lone_surrogate_model_is_answered_not_crashed(
    clients: Clients,
    open_key: Key,
    gpt4_key: Key,
    new_log: Callable[[], str],
    body: bytes,
    which: str,
) -> None:
    key = {"open": open_key.full, "gpt-4 only": gpt4_key.full}.get(which, "")
    if which == "wrong secret":  # well-formed, so the model is read before the lookup
        key = open_key.full[:-1] + ("Y" if open_key.full.endswith("Z") else "Z")
    answer = check(clients, check_request({"authorization": f"Bearer {key}"}, body))
    expected = {
        "open": (True, 0, ""),
        "gpt-4 only": (False, 403, "model_not_allowed"),
        "wrong secret": (False, 401, "invalid_api_key"),
    }[which]
    assert (answer.allowed, answer.status, answer.code) == expected
    assert_log_clean(new_log())


# --- admin calls --------------------------------------------------------------------------

NAN, INF = math.nan, math.inf
int32s = st.one_of(
    st.sampled_from([-(2**31), -1, 0, 1, 89, 90, 91, 365, 500, 501, INT32_MAX - 1, INT32_MAX]),
    st.integers(-(2**31), INT32_MAX),
)
int64s = st.one_of(
    st.sampled_from(
        [-(2**63), -1, 0, 1, 10**12, 10**12 + 1, INT32_MAX + 1, 2**53 + 1, 2**62, INT64_MAX]
    ),
    st.integers(-(2**63), INT64_MAX),
)
doubles = st.one_of(
    st.sampled_from(
        [
            NAN,
            INF,
            -INF,
            -0.0,
            0.0,
            5e-324,
            -5e-324,
            1e-12,
            0.1,
            1e9,
            math.nextafter(1e9, INF),
            9.3e18,
            1.8e308,
        ]
    ),
    st.floats(),
)
hostile_texts = st.one_of(
    st.text(UTF8, max_size=30),
    st.sampled_from(
        [
            "",
            " ",
            "\x00",
            "a\x00b",
            "\n",
            "a\nb",
            "\t",
            "\u202e",
            "\u200b",
            "\ufeff",
            "{vkidx}",
            "vk:{x}",
            "*",
            "../../etc/passwd",
            "%s%n",
            "a" * 256,
            "a" * 257,
            "é" * 256,
            "\U0001f600" * 300,
        ]
    ),
    st.builds(_repeat, st.sampled_from(["a", "é"]), st.sampled_from([1_024, 1_025, 10_000])),
)
key_id_texts = st.one_of(
    hostile_texts,
    st.from_regex(r"[0-9a-f]{16}", fullmatch=True),  # well-formed, almost surely unknown
    st.from_regex(r"[0-9a-fA-F]{15,17}", fullmatch=True),
    st.sampled_from(["0123456789ABCDEF", "0123456789abcde\x00", "0123456789abcdef "]),
)


def mostly(
    valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid values 3 times in 4, so requests whose every field passes are common enough
    to check the OK path too."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda ok: valid if ok else hostile)


model_lists = st.one_of(
    st.lists(hostile_texts, max_size=4),
    st.sampled_from([[], ["*"], ["gpt-4", "*"], ["gpt-4"] * 3, [" gpt-4 "]]),
    st.builds(lambda n: [f"m{i}" for i in range(n)], st.sampled_from([1_000, 1_001, 10_000])),
)
metadata_maps = st.one_of(
    st.dictionaries(hostile_texts, hostile_texts, max_size=3),
    st.builds(
        lambda size: {"big": "v" * size},
        st.sampled_from([1_024, 1_025, 1 << 20]),  # 1 MB: under gRPC's 4 MB, over ours
    ),
    st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.sampled_from([64, 65, 10_000])),
)
names = mostly(
    st.sampled_from(["key", "My Production Key", "ключ", "\U0001f511 key"]), hostile_texts
)
limits = mostly(st.integers(0, 100_000), int32s)
expiries = mostly(st.integers(1, 90), int32s)  # VIRTUAL_KEY_MAX_EXPIRES_DAYS=90 in tests
budgets = mostly(st.floats(0, 1_000_000), doubles)
models = mostly(
    st.lists(st.sampled_from(["gpt-4", "gpt-4o", "claude-3", "*"]), max_size=3), model_lists
)
metadatas = mostly(
    st.dictionaries(
        st.sampled_from(["env", "owner", "ключ"]), st.text(UTF8, max_size=20), max_size=3
    ),
    metadata_maps,
)
durations = mostly(
    st.sampled_from(["", "1h", "24h", "8784h", "1d", "3660d", "1mo"]),
    st.sampled_from(["8785h", "3661d", "2mo", "0h", "1w", "-1d", "1.5h", "1 h"])
    # Up to 1,025 characters: a longer invalid one is echoed in the error past gRPC's
    # metadata limit (test_an_error_never_echoes_unbounded_input below).
    | hostile_texts.filter(lambda text: len(text) <= 1_025),
)
token_counts = mostly(st.integers(0, 100_000), int64s)
costs = mostly(st.floats(0, 100), doubles)
ascii_metadata = st.from_regex(r"[!-~]([ -~]{0,30}[!-~])?", fullmatch=True)
create_fields = st.fixed_dictionaries(
    {"name": names},
    optional={
        "team_id": mostly(st.sampled_from(["team-a", "team b"]), hostile_texts),
        "expires_days": expiries,
        "allowed_models": models,
        "max_budget": budgets,
        "tpm_limit": limits,
        "rpm_limit": limits,
        "metadata": metadatas,
        "budget_duration": durations,
    },
)


@pytest.fixture(scope="module")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def stored_key_count(redis_client: redis.Redis) -> int:
    """Every key ever created and not deleted (the store's all-keys index)."""
    return int(redis_client.zcard(INDEX_ALL))


def list_count(clients: Clients, user_id: str) -> int:
    reply = clients.keys.ListKeys(
        keys_pb2.ListKeysRequest(user_id=user_id, page_size=500),
        metadata=bearer(clients.admin_token),
        timeout=5,
    )
    return len(reply.keys)


@_settings(120)
@given(
    fields=create_fields,
    user_id=mostly(st.none(), hostile_texts),
    scope=mostly(st.sampled_from([None, "same"]), ascii_metadata),
)
def test_create_key_with_hostile_fields_stores_nothing_unless_ok(
    clients: Clients,
    redis_client: redis.Redis,
    new_log: Callable[[], str],
    fields: dict[str, Any],
    user_id: str | None,
    scope: str | None,
) -> None:
    unique_user = user_id is None
    if user_id is None:
        user_id = "hostile-" + secrets.token_hex(8)
    if scope == "same":
        scope = user_id if unique_user else None
    metadata = bearer(clients.admin_token) + ((("x-user-id", scope),) if scope else ())
    before = stored_key_count(redis_client)
    request = keys_pb2.CreateKeyRequest(user_id=user_id, **fields)
    reply: list[keys_pb2.CreateKeyResponse] = []
    code = rpc_code(lambda: reply.append(clients.keys.CreateKey(request, metadata=metadata)))
    assert_client_outcome(code)
    event(code.name)
    created = 1 if code is grpc.StatusCode.OK else 0
    assert stored_key_count(redis_client) == before + created
    if unique_user:
        assert list_count(clients, user_id) == created
    if created:
        data = reply[0].key_data
        assert 0 <= data.tpm_limit <= INT32_MAX and 0 <= data.rpm_limit <= INT32_MAX
        assert math.isfinite(data.max_budget) and data.max_budget >= 0
        assert data.name == data.name.strip() and data.name
        assert 0 < data.expires_at.ToSeconds() - data.created_at.ToSeconds() <= 90 * 86_400
        assert reply[0].key.startswith(f"sk-mp-{data.id}-")
    assert_log_clean(new_log())


def test_create_key_with_a_1mb_metadata_value_is_invalid_argument(
    clients: Clients, redis_client: redis.Redis
) -> None:
    user_id = "hostile-" + secrets.token_hex(8)
    before = stored_key_count(redis_client)
    request = keys_pb2.CreateKeyRequest(
        name="big", user_id=user_id, metadata={"big": "v" * (1 << 20)}
    )
    code = rpc_code(
        lambda: clients.keys.CreateKey(request, metadata=bearer(clients.admin_token), timeout=5)
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert stored_key_count(redis_client) == before
    assert list_count(clients, user_id) == 0


update_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": names,
        "allowed_models": models.map(lambda values: keys_pb2.ModelList(models=values)),
        "max_budget": budgets,
        "tpm_limit": limits,
        "rpm_limit": limits,
        "expires_days": expiries,
        "metadata": metadatas.map(lambda entries: keys_pb2.Metadata(entries=entries)),
        "budget_duration": durations,
    },
)


@_settings(80)
@given(fields=update_fields, target=mostly(st.none(), key_id_texts))
def test_update_key_with_hostile_fields_changes_nothing_unless_ok(
    clients: Clients,
    new_log: Callable[[], str],
    fields: dict[str, Any],
    target: str | None,
) -> None:
    _, data = clients.create_key(name="to update", user_id="hostile-update")
    key_id = data.id if target is None else target
    before = clients.get_key(data.id)
    request = keys_pb2.UpdateKeyRequest(id=key_id, **fields)
    code = rpc_code(
        lambda: clients.keys.UpdateKey(request, metadata=bearer(clients.admin_token), timeout=5)
    )
    assert_client_outcome(code)
    event(code.name)
    if code is not grpc.StatusCode.OK or key_id != data.id:
        assert clients.get_key(data.id) == before
    assert_log_clean(new_log())


report_fields = st.fixed_dictionaries(
    {
        "request_id": mostly(st.just("req-1"), hostile_texts),  # a fresh key each time
        "prompt_tokens": token_counts,
        "completion_tokens": token_counts,
        "model": mostly(st.sampled_from(["gpt-4", "gpt-4o"]), st.just("unpriced") | hostile_texts),
    },
    optional={
        "provider": mostly(st.sampled_from(["openai", "azure"]), hostile_texts),
        "total_tokens": mostly(st.just(0), token_counts),  # 0: their sum
        "cost": costs,
        "cached_tokens": token_counts,  # clamped to prompt_tokens when priced
        "reasoning_tokens": token_counts,  # clamped to completion_tokens
    },
)


def _tpm_used(clients: Clients, key: str) -> int:
    reply = clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=key), timeout=5)
    return int(reply.rate_limit_info.tpm.current)


@_settings(120)
@given(
    fields=report_fields,
    target=mostly(st.none(), key_id_texts),
    as_admin=st.booleans(),
)
def test_report_usage_with_hostile_fields_charges_nothing_unless_ok(
    clients: Clients,
    new_log: Callable[[], str],
    fields: dict[str, Any],
    target: str | None,
    as_admin: bool,
) -> None:
    key, data = clients.create_key(user_id="hostile-usage", max_budget=0, tpm_limit=0)
    key_id = data.id if target is None else target
    token = clients.admin_token if as_admin else clients.usage_token
    request = keys_pb2.ReportUsageRequest(key_id=key_id, **fields)
    reply: list[keys_pb2.ReportUsageResponse] = []
    code = rpc_code(
        lambda: reply.append(clients.usage.ReportUsage(request, metadata=bearer(token), timeout=5))
    )
    assert_client_outcome(code)
    event(code.name)
    prompt, completion = fields["prompt_tokens"], fields["completion_tokens"]
    total = fields.get("total_tokens") or prompt + completion
    parts = (fields.get("cached_tokens", 0), fields.get("reasoning_tokens", 0))
    if min(prompt, completion, total, *parts) < 0 or max(prompt, completion, total) > INT64_MAX:
        assert code is grpc.StatusCode.INVALID_ARGUMENT  # rejected, never wrapped
    after = clients.get_key(data.id)
    if code is not grpc.StatusCode.OK or key_id != data.id:
        assert (after.spent, _tpm_used(clients, key)) == (0, 0)
    else:
        charged = reply[0]
        assert not charged.queued  # Redis is up: a journaled report means the script failed
        assert not charged.duplicate
        assert charged.total_tokens == total and _tpm_used(clients, key) == total
        assert math.isfinite(charged.cost) and charged.cost >= 0
        assert after.spent == charged.spent == charged.cost
        usage = clients.usage.GetUsage(
            keys_pb2.GetUsageRequest(key_id=data.id),
            metadata=bearer(clients.admin_token),
            timeout=5,
        )
        assert usage.totals.requests == 1 and usage.totals.cost == charged.cost
    assert_log_clean(new_log())


@pytest.mark.parametrize(
    "tokens",
    [
        {"prompt_tokens": INT64_MAX, "completion_tokens": 1},
        {"prompt_tokens": 2**62, "completion_tokens": 2**62},
        {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": INT64_MAX},
        {"prompt_tokens": -1},
        {"completion_tokens": -(2**63)},
        {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": -5},
        {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 5},
    ],
)
def test_overflowing_or_negative_token_counts_are_rejected(
    clients: Clients, tokens: dict[str, int]
) -> None:
    key, data = clients.create_key(max_budget=0, tpm_limit=0)
    code = rpc_code(lambda: clients.report(data.id, "r1", **tokens))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert clients.get_key(data.id).spent == 0 and _tpm_used(clients, key) == 0


def test_a_charge_that_would_overflow_spent_is_rejected_not_lost(clients: Clients) -> None:
    _, data = clients.create_key(max_budget=0, tpm_limit=0)
    for n in range(9):  # $9e9 = 9e18 nano-USD, just under 2**63 - 1
        assert not clients.report(data.id, f"r{n}", cost=1e9).queued
    code = rpc_code(lambda: clients.report(data.id, "r9", cost=1e9))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert clients.get_key(data.id).spent == 9e9
    # The rejected request id was not used up: a smaller charge under it goes through.
    retry = clients.report(data.id, "r9", cost=1.0)
    assert not retry.duplicate and not retry.queued


LONG = 20_000  # characters: past gRPC's 16 KiB hard limit on received metadata


@pytest.mark.parametrize("call", ["CreateKey", "UpdateKey", "GetUsage scoped"])
def test_an_error_never_echoes_unbounded_input(clients: Clients, call: str) -> None:
    admin = bearer(clients.admin_token)
    if call == "CreateKey":
        request = keys_pb2.CreateKeyRequest(name="k", user_id="u", budget_duration="a" * LONG)
        code = rpc_code(lambda: clients.keys.CreateKey(request, metadata=admin, timeout=5))
        expected = grpc.StatusCode.INVALID_ARGUMENT
    elif call == "UpdateKey":
        _, data = clients.create_key()
        update = keys_pb2.UpdateKeyRequest(id=data.id, budget_duration="a" * LONG)
        code = rpc_code(lambda: clients.keys.UpdateKey(update, metadata=admin, timeout=5))
        expected = grpc.StatusCode.INVALID_ARGUMENT
    else:
        usage = keys_pb2.GetUsageRequest(user_id="u" * LONG)
        scoped = (*admin, ("x-user-id", "someone-else"))
        code = rpc_code(lambda: clients.usage.GetUsage(usage, metadata=scoped, timeout=5))
        expected = grpc.StatusCode.NOT_FOUND
    assert code is expected


def _page_tokens() -> st.SearchStrategy[str]:
    def encoded(raw: str) -> str:
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    raws = st.one_of(
        st.text(UTF8, max_size=40),
        st.tuples(
            st.one_of(
                st.integers().map(str),
                st.sampled_from(["9" * 4_000, "1e5", "nan", "inf", "-0", " 12 ", "١٢", "1_0"]),
            ),
            key_id_texts,
        ).map(lambda pair: f"{pair[0]}:{pair[1]}"),
    )
    return st.one_of(hostile_texts, raws.map(encoded), st.sampled_from(["=", "==", "!!!", "a"]))


@_settings(100)
@given(
    user_id=st.one_of(st.just(""), hostile_texts),
    team_id=st.one_of(st.just(""), hostile_texts),
    status=st.one_of(
        st.sampled_from(["", "active", "revoked", "expired", "ACTIVE"]), hostile_texts
    ),
    page_size=int32s,
    page_token=st.one_of(st.just(""), _page_tokens()),
    scope=st.one_of(st.none(), ascii_metadata),
)
def test_list_keys_with_hostile_filters_and_page_tokens(
    clients: Clients,
    new_log: Callable[[], str],
    user_id: str,
    team_id: str,
    status: str,
    page_size: int,
    page_token: str,
    scope: str | None,
) -> None:
    request = keys_pb2.ListKeysRequest(
        user_id=user_id,
        team_id=team_id,
        status=status,
        page_size=page_size,
        page_token=page_token,
    )
    metadata = bearer(clients.admin_token) + ((("x-user-id", scope),) if scope else ())
    code = rpc_code(lambda: clients.keys.ListKeys(request, metadata=metadata, timeout=5))
    assert_client_outcome(code)
    event(code.name)
    assert_log_clean(new_log())


OPEN_KEY_ID = "<the open key's id>"
usage_selectors = mostly(
    st.one_of(
        st.fixed_dictionaries({"key_id": st.just(OPEN_KEY_ID)}),
        st.fixed_dictionaries({"user_id": st.sampled_from(["user_123", "hostile-usage"])}),
        st.fixed_dictionaries({"team_id": st.sampled_from(["team-a", "no-such-team"])}),
    ),
    st.fixed_dictionaries(
        {}, optional={"key_id": key_id_texts, "user_id": hostile_texts, "team_id": hostile_texts}
    ),
)


@_settings(100)
@given(
    selector=usage_selectors,
    days=mostly(st.integers(0, 90), int32s),
    token=st.sampled_from(["admin", "admin", "key itself", "usage", "none", "garbage"]),
)
def test_get_usage_with_hostile_selectors(
    clients: Clients,
    open_key: Key,
    new_log: Callable[[], str],
    selector: dict[str, str],
    days: int,
    token: str,
) -> None:
    if selector.get("key_id") == OPEN_KEY_ID:
        selector = {**selector, "key_id": open_key.id}
    metadata = {
        "admin": bearer(clients.admin_token),
        "key itself": bearer(open_key.full),
        "usage": bearer(clients.usage_token),
        "none": (),
        "garbage": bearer("garbage-" + clients.admin_token),
    }[token]
    request = keys_pb2.GetUsageRequest(days=days, **selector)
    code = rpc_code(lambda: clients.usage.GetUsage(request, metadata=metadata, timeout=5))
    assert_client_outcome(code)
    event(f"{token}: {code.name}")
    if code is grpc.StatusCode.OK:  # only the admin, or a key reading itself
        assert token == "admin" or (token == "key itself" and selector == {"key_id": open_key.id})
    assert_log_clean(new_log())


@_settings(60)
@given(token=st.one_of(ascii_metadata, st.just("")), scheme=st.sampled_from(["Bearer", "Basic"]))
def test_admin_calls_with_a_wrong_token_are_unauthenticated_and_store_nothing(
    clients: Clients, redis_client: redis.Redis, token: str, scheme: str
) -> None:
    assume(token.strip() not in (clients.admin_token, clients.usage_token))
    before = stored_key_count(redis_client)
    metadata = (("authorization", f"{scheme} {token}".strip()),)
    request = keys_pb2.CreateKeyRequest(name="nope", user_id="hostile-auth")
    assert (
        rpc_code(lambda: clients.keys.CreateKey(request, metadata=metadata, timeout=5))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    report = keys_pb2.ReportUsageRequest(key_id="0123456789abcdef", request_id="r", cost=1.0)
    assert (
        rpc_code(lambda: clients.usage.ReportUsage(report, metadata=metadata, timeout=5))
        is grpc.StatusCode.UNAUTHENTICATED
    )
    assert stored_key_count(redis_client) == before


# --- the Lua constant-time compare, run by the real Redis -----------------------------------


def _budget_lua() -> str:
    from importlib import resources

    return resources.files("keys").joinpath("lua", "_lib.lua").read_text()


@pytest.fixture(scope="module")
def same_digest(redis_url: str) -> Iterator[Callable[..., bool]]:
    """keys/lua/_lib.lua's `same_digest`, called through EVAL on the real Redis."""
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    script = client.register_script(
        _budget_lua() + "\nreturn same_digest(ARGV[1], ARGV[2]) and 1 or 0\n"
    )
    missing = client.register_script(
        _budget_lua()
        + "\nreturn same_digest(ARGV[1], redis.call('HGET', KEYS[1], 'hash')) and 1 or 0\n"
    )

    def call(*args: bytes | str, stored_in: str | None = None) -> bool:
        if stored_in is not None:
            return int(missing(keys=[stored_in], args=list(args))) == 1
        return int(script(keys=[], args=list(args))) == 1

    yield call
    client.close()


DIGEST = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        (DIGEST, DIGEST, True),
        (DIGEST, "0" + DIGEST[1:], False),  # first byte differs
        (DIGEST, DIGEST[:-1] + "9", False),  # last byte differs
        (DIGEST, DIGEST[:32] + ("0" if DIGEST[32] != "0" else "1") + DIGEST[33:], False),
        (DIGEST, DIGEST[:-1], False),  # different lengths
        (DIGEST, DIGEST + "0", False),
        (DIGEST, DIGEST.upper(), False),
        ("", "", False),  # an empty stored hash (a blank prev_hash) never matches
        (DIGEST, "", False),
        ("", DIGEST, False),
        ("a", "a", True),
        ("\x00", "\x00", True),
        ("\x00", "\x01", False),
    ],
)
def test_lua_same_digest_is_correct(
    same_digest: Callable[..., bool], a: str, b: str, same: bool
) -> None:
    assert same_digest(a, b) is same


def test_lua_same_digest_with_nil_and_a_missing_stored_hash(
    same_digest: Callable[..., bool],
) -> None:
    assert same_digest(DIGEST) is False  # ARGV[2] is nil
    assert same_digest(DIGEST, stored_in="vk:{hostile-no-such-key}") is False  # HGET: false


@_settings(150)
@given(a=st.binary(max_size=80), b=st.binary(max_size=80), copy=st.booleans())
def test_lua_same_digest_agrees_with_equality(
    same_digest: Callable[..., bool], a: bytes, b: bytes, copy: bool
) -> None:
    if copy:
        b = a
    assert same_digest(a, b) is (a == b and len(a) > 0)
