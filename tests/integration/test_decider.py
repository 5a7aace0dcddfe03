"""The protocol-free decision (extauthz/decision.py), in process, against the real Redis."""

from __future__ import annotations

import pytest

from extauthz.decision import LARGE_BODY_BYTES, Decider, Verdict
from extauthz.metrics import Metrics
from keys import keygen
from keys.connection import RedisBridge
from keys.model import Reason, RequestedModel
from keys.pricing import PriceTable
from keys.store import KeyStore
from tests.conftest import ManualClock
from tests.helpers import key_spec

pytestmark = pytest.mark.integration
GPT4 = RequestedModel.named("gpt-4")


class BodyReader:
    """Stands where the body parse would run; records whether the decider ran it."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> RequestedModel:
        self.reads += 1
        return GPT4


def decider(store: KeyStore, *, fail_open: bool = False) -> Decider:
    return Decider(
        store,
        Metrics(),
        PriceTable.builtin(),
        public_paths=frozenset({"/healthz"}),
        fail_open=fail_open,
    )


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def refused_key(store: KeyStore, make: str) -> str:
    """A key Redis will not accept: `made-up` (well-formed, no such id), `revoked`, or
    `malformed` (never reaches Redis)."""
    full, key = await store.create(key_spec(), "sk-mp")
    if make == "revoked":
        await store.revoke(key.id)
        return full
    if make == "made-up":
        return keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    return "sk-mp-nope"


@pytest.mark.parametrize(
    ("make", "reason"), [("made-up", Reason.INVALID_API_KEY), ("revoked", Reason.KEY_REVOKED)]
)
async def test_a_refused_key_with_a_large_body_is_denied_without_reading_the_body(
    store: KeyStore, make: str, reason: Reason
) -> None:
    full = await refused_key(store, make)
    body = BodyReader()
    outcome = await decider(store).decide(
        "/v1/embeddings", bearer(full), body, method="POST", body_bytes=LARGE_BODY_BYTES + 1
    )
    assert outcome.decision.reason is reason
    assert body.reads == 0


async def test_accepted_key_with_a_large_body_reads_it_once_and_counts_once(
    store: KeyStore,
) -> None:
    full, _ = await store.create(key_spec(rpm_limit=5), "sk-mp")
    body = BodyReader()
    outcome = await decider(store).decide(
        "/v1/embeddings", bearer(full), body, method="POST", body_bytes=LARGE_BODY_BYTES + 1
    )
    assert outcome.verdict is Verdict.ALLOW and outcome.model == GPT4
    assert body.reads == 1
    assert outcome.decision.rpm.used == 1


async def test_small_body_is_read_before_redis_answers(store: KeyStore) -> None:
    made_up = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    body = BodyReader()
    await decider(store).decide(
        "/v1/chat/completions", bearer(made_up), body, method="POST", body_bytes=100
    )
    assert body.reads == 1  # one round trip: the model goes with the key


async def test_malformed_key_never_reads_the_body(store: KeyStore) -> None:
    body = BodyReader()
    outcome = await decider(store).decide(
        "/v1/chat/completions", bearer("sk-mp-nope"), body, method="POST", body_bytes=10
    )
    assert outcome.decision.reason is Reason.INVALID_API_KEY and body.reads == 0


@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
async def test_public_path_passes_get_and_head_without_a_key(store: KeyStore, method: str) -> None:
    outcome = await decider(store).decide("/healthz?x=1", {}, BodyReader(), method=method)
    assert outcome.verdict is Verdict.PUBLIC


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_public_path_with_another_method_needs_a_key(store: KeyStore, method: str) -> None:
    outcome = await decider(store).decide("/healthz", {}, BodyReader(), method=method)
    assert outcome.verdict is Verdict.DENY
    assert outcome.decision.reason is Reason.INVALID_API_KEY


async def test_redis_down_denies_with_auth_unavailable_or_fails_open(clock: ManualClock) -> None:
    dead = KeyStore(RedisBridge.from_url("redis://127.0.0.1:1/0", timeout_s=0.2), clock=clock)
    key = keygen.format_key("sk-mp", keygen.new_key_id(), keygen.new_secret())
    closed = await decider(dead).decide("/v1/x", bearer(key), BodyReader(), method="POST")
    assert closed.decision.reason is Reason.AUTH_UNAVAILABLE
    opened = await decider(dead, fail_open=True).decide(
        "/v1/x", bearer(key), BodyReader(), method="POST"
    )
    assert opened.verdict is Verdict.UNVERIFIED
    assert opened.decision.key_id == keygen.parse_key(key).key_id  # type: ignore[union-attr]
    await dead.redis.aclose()


async def test_key_first_phase_accepts_a_usable_key_and_counts_nothing(store: KeyStore) -> None:
    full, key = await store.create(key_spec(rpm_limit=1), "sk-mp")
    d = decider(store)
    for _ in range(3):
        outcome = await d.verify_key("/v1/chat/completions", bearer(full), method="POST")
        assert outcome.verdict is Verdict.KEY_VERIFIED
    assert (await store.get(key.id)).total_requests == 0
    allowed = await d.decide("/v1/chat/completions", bearer(full), BodyReader(), method="POST")
    assert allowed.verdict is Verdict.ALLOW  # the one request the RPM limit allows


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("made-up", Reason.INVALID_API_KEY),
        ("revoked", Reason.KEY_REVOKED),
        ("malformed", Reason.INVALID_API_KEY),
    ],
)
async def test_key_first_phase_refuses_what_check_would(
    store: KeyStore, make: str, reason: Reason
) -> None:
    full = await refused_key(store, make)
    outcome = await decider(store).verify_key("/v1/x", bearer(full), method="POST")
    assert outcome.verdict is Verdict.DENY and outcome.decision.reason is reason
