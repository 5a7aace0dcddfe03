"""Caller policies that need no RPC context: what an x-user-id scope lets a call see."""

from __future__ import annotations

import pytest

from extauthz.access import listable_user, scoped
from keys.errors import NotFound
from keys.model import VirtualKey

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("scope", "asked", "filter_by"),
    [(None, "", ""), (None, "v", "v"), ("u", "", "u"), ("u", "u", "u"), ("u", "v", None)],
)
def test_list_keys_filter_follows_the_scope(
    scope: str | None, asked: str, filter_by: str | None
) -> None:
    assert listable_user(scope, asked) == filter_by


def test_another_users_key_reads_as_missing() -> None:
    key = VirtualKey(
        **{f: 0 for f in ("created_at_ms", "expires_at_ms", "max_budget_nanos", "spent_nanos")},
        **{f: 0 for f in ("tpm_limit", "rpm_limit", "last_used_ms", "total_requests")},
        **{f: 0 for f in ("window_start_ms", "window_requests", "window_tokens")},
        id="0123456789abcdef",
        name="k",
        user_id="u1",
        team_id="",
        revoked=False,
        allowed_models=("*",),
        metadata={},
    )
    assert scoped(key, None) is key and scoped(key, "u1") is key
    with pytest.raises(NotFound):
        scoped(key, "u2")
