"""The console against hostile data: markup in every field an API answer can carry (a key's
name, metadata, user and team ids, models, a model name a key's holder sends, an error
message) must render as text, run no script and break no CSP rule."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, expect

from tests.conftest import Envoy, Server
from tests.e2e.test_console import DESKTOP, Console, admin, browser, complete  # noqa: F401

pytestmark = pytest.mark.e2e

PAYLOAD = "<img src=x onerror=\"window.__pwned='{0}'\"><script>window.__pwned='{0}'</script>"


@pytest.fixture
def hostile(browser: Browser, envoy: Envoy) -> Iterator[Console]:  # noqa: F811
    context = browser.new_context(viewport=DESKTOP)
    opened = Console(context, envoy)
    yield opened
    context.close()


def test_markup_in_every_field_renders_as_text(
    hostile: Console, envoy: Envoy, server: Server
) -> None:
    tag = secrets.token_hex(3)
    team = f"x{tag}"
    key = admin(
        envoy,
        server,
        "POST",
        "/api/keys",
        {
            "name": PAYLOAD.format("name"),
            "user_id": f"u{tag}",
            "team_id": team,
            "metadata": {PAYLOAD.format("mkey"): PAYLOAD.format("mval")},
            "max_budget": 5,
        },
    )
    admin(envoy, server, "PUT", f"/api/budgets/team/{team}", {"max_budget": 3})
    # an unpriced model name is refused before any charge: model names are the operator's
    assert complete(envoy, key["key"], "<svg onload=window.__pwned='model'>") == 403
    page = hostile.sign_in(server.admin_token)
    for fragment in (
        f"#/keys?team={team}",
        f"#/keys/{key['key_data']['id']}",
        f"#/budgets/team/{team}",
        "#/budgets",
        "#/keys/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E",
    ):
        page.goto(f"{hostile.base}/ui/{fragment}")
        expect(page.locator("main")).to_have_attribute("aria-busy", "false")
        page.wait_for_timeout(300)
        assert page.evaluate("window.__pwned") is None, fragment
        assert page.locator("main img, main script").count() == 0, fragment
    page.goto(f"{hostile.base}/ui/#/keys/{key['key_data']['id']}")
    expect(page.locator("h1")).to_have_text(PAYLOAD.format("name"))
    assert page.evaluate("window.__pwned") is None
    assert hostile.problems == []
