"""Caller policies that need no RPC context: what an x-user-id scope lets a call see."""

from __future__ import annotations

import pytest

from extauthz.access import listable_user

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("scope", "asked", "filter_by"),
    [(None, "", ""), (None, "v", "v"), ("u", "", "u"), ("u", "u", "u"), ("u", "v", None)],
)
def test_list_keys_filter_follows_the_scope(
    scope: str | None, asked: str, filter_by: str | None
) -> None:
    assert listable_user(scope, asked) == filter_by
