"""The official `openai` Python SDK through real Envoy, as an application would use it:
completions streamed and not, and each denial as the SDK exception an application handles.
The session's Envoy runs the usage tap (the shipped envoy.yaml); `untapped` is the same
Envoy without it, for the same answers with and without."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from devstack.mock_upstream import MockUpstream
from tests.conftest import Envoy, Server, start_envoy
from tests.helpers import Clients, eventually

pytestmark = pytest.mark.e2e
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]
REPLY = "Hello from the mock."


@pytest.fixture(scope="module")
def untapped(
    server: Server, upstream: MockUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Envoy]:
    envoy = start_envoy(
        server.grpc_port, upstream.port, tmp_path_factory.mktemp("untapped"), tap=False
    )
    yield envoy
    envoy.process.stop()


def client(envoy: Envoy, key: str) -> openai.OpenAI:
    # no retries: each call is exactly one request (the SDK would retry a 429 by itself)
    return openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{envoy.port}/v1", max_retries=0)


def test_a_completion_reads_like_openais(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(max_budget=10)
    completion = client(envoy, key).chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        max_tokens=5,
    )
    assert completion.choices[0].message.content == REPLY
    assert completion.usage is not None and completion.usage.completion_tokens == 5


def test_a_streamed_completion_arrives_chunk_by_chunk(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(max_budget=10)
    stream = client(envoy, key).chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len(chunks) > 2
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


def streamed_text(envoy: Envoy, key: str, **options: object) -> tuple[str, list[object]]:
    stream = client(envoy, key).chat.completions.create(
        model="gpt-4o",
        messages=HELLO,
        max_tokens=5,
        stream=True,
        **options,  # type: ignore[call-overload]
    )
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_a_stream_through_the_tap_reads_as_without_it(
    envoy: Envoy, untapped: Envoy, clients: Clients
) -> None:
    """The tap asks the upstream for usage and takes the usage chunk back out: the SDK
    sees the chunks it would see without the tap, and the key is charged."""
    key, data = clients.create_key(max_budget=10)
    tapped_text, tapped_chunks = streamed_text(envoy, key)
    plain_text, plain_chunks = streamed_text(untapped, key)
    assert tapped_text == plain_text == REPLY
    assert len(tapped_chunks) == len(plain_chunks)
    assert all(c.choices and c.usage is None for c in tapped_chunks)  # type: ignore[attr-defined]
    assert eventually(lambda: clients.get_key(data.id).spent > 0)


def test_a_bad_key_is_an_authentication_error(envoy: Envoy) -> None:
    with pytest.raises(openai.AuthenticationError) as raised:
        client(envoy, "sk-mp-0000000000000000-" + "x" * 43).chat.completions.create(
            model="gpt-4o",
            messages=HELLO,
        )
    assert raised.value.code == "invalid_api_key"


def test_a_model_the_key_may_not_use_is_permission_denied(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(allowed_models=["gpt-4"])
    with pytest.raises(openai.PermissionDeniedError) as raised:
        client(envoy, key).chat.completions.create(model="gpt-4o", messages=HELLO)
    assert raised.value.code == "model_not_allowed"


def test_the_rate_limit_is_a_rate_limit_error(envoy: Envoy, clients: Clients) -> None:
    key, _ = clients.create_key(rpm_limit=1)
    sdk = client(envoy, key)
    sdk.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1)
    assert raised.value.code == "rate_limit_exceeded"


def test_a_spent_budget_is_a_402_the_sdk_does_not_retry(envoy: Envoy, clients: Clients) -> None:
    key, data = clients.create_key(max_budget=0.001)
    clients.report(data.id, "earlier", cost=0.001)
    sdk = openai.OpenAI(api_key=key, base_url=f"http://127.0.0.1:{envoy.port}/v1", max_retries=2)
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=1)
    assert raised.value.status_code == 402 and raised.value.code == "budget_exceeded"
    assert not isinstance(raised.value, openai.RateLimitError | openai.InternalServerError)
