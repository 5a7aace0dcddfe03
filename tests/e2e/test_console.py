"""The web console (/ui) in a real browser: Playwright drives Debian's chromium against the
session's Envoy and server, as an operator would, with the mouse and with the keyboard alone.

Every page is saved as a screenshot in this module's tmp directory (the path is printed at
the end of the run with -s); with UPDATE_DOCS_SCREENSHOTS=1, the keys list and a key's page
are copied into docs/ (docs/console-keys.png, docs/console-key.png), as the README shows."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from devstack import processes as p
from tests.conftest import Envoy, Server
from tests.helpers import chat_body, fetch

pytestmark = pytest.mark.e2e

# Debian's chromium, never a browser of Playwright's own (the network is closed); flags that
# keep it from calling home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = ViewportSize(width=1280, height=800)
PHONE = ViewportSize(width=375, height=740)  # a phone's CSS width
DOCS = p.ROOT / "docs"


def chromium() -> str:
    found = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if found is None:
        raise FileNotFoundError("chromium not found; run `make install` (Debian's chromium)")
    return found


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("console-screenshots")
    yield directory
    print(f"\nconsole screenshots: {directory}")  # shown with -s


def screenshot(page: Page, shots: Path, name: str) -> Path:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("UPDATE_DOCS_SCREENSHOTS") and name in ("keys", "key"):
        shutil.copyfile(path, DOCS / f"console-{name}.png")
    return path


class Console:
    """One browser context on the console, with what its pages logged."""

    def __init__(self, context: BrowserContext, envoy: Envoy) -> None:
        self.context = context
        self.base = f"http://127.0.0.1:{envoy.port}"
        self.page = context.new_page()
        self.problems: list[str] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))

    def _console(self, message: ConsoleMessage) -> None:
        # The server's refusals show up as failed loads (a 401 for a wrong token); anything
        # else, a CSP violation above all, is a fault of the console.
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.problems.append(message.text)

    def open(self, fragment: str = "") -> Page:
        self.page.goto(f"{self.base}/ui/{fragment}")
        return self.page

    def sign_in(self, token: str) -> Page:
        page = self.open()
        page.get_by_label("Admin token").fill(token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("heading", level=1, name="Keys")).to_be_visible()
        return page


@pytest.fixture
def console(browser: Browser, envoy: Envoy) -> Iterator[Console]:
    context = browser.new_context(viewport=DESKTOP)
    context.grant_permissions(
        ["clipboard-read", "clipboard-write"], origin=f"http://127.0.0.1:{envoy.port}"
    )
    opened = Console(context, envoy)
    yield opened
    context.close()
    assert opened.problems == []


def complete(envoy: Envoy, key: str, model: str = "gpt-4") -> int:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return fetch(envoy.port, "POST", "/v1/chat/completions", headers, chat_body(model)).status


def admin(envoy: Envoy, server: Server, method: str, path: str, body: Any = None) -> Any:
    headers = {"authorization": f"Bearer {server.admin_token}", "content-type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    reply = fetch(envoy.port, method, path, headers, data)
    assert reply.status == 200, reply.body
    return reply.json()


def starts_with(prefix: str) -> re.Pattern[str]:
    """Text that starts with `prefix`, for Playwright's matchers."""
    return re.compile("^" + re.escape(prefix))


def no_horizontal_scroll(page: Page) -> bool:
    widths = page.evaluate(
        "[document.documentElement.scrollWidth, document.documentElement.clientWidth]"
    )
    return bool(widths[0] <= widths[1])


def test_a_key_made_in_the_console_is_listed_used_charged_and_revoked(
    console: Console, envoy: Envoy, server: Server, shots: Path
) -> None:
    team = f"console-{secrets.token_hex(3)}"
    page = console.sign_in(server.admin_token)
    assert console.page.evaluate("sessionStorage.getItem('extauthz.admin-token')") == (
        server.admin_token
    )
    assert server.admin_token not in page.url
    expect(page.locator("#health")).to_have_text("Server: ready")

    page.get_by_role("link", name="Create key").first.click()
    expect(page.get_by_role("heading", level=1, name="Create a key")).to_be_visible()
    page.get_by_label("Name", exact=True).fill("Support bot")
    page.get_by_label("User ID").fill("user_console")
    page.get_by_label("Team ID").fill(team)
    page.get_by_label("Max budget (USD)").fill("2")
    page.get_by_label("Requests per minute").fill("100")
    page.get_by_label("Budget period").fill("30d")
    screenshot(page, shots, "create")
    page.get_by_role("button", name="Create key").click()

    secret_box = page.get_by_label("The key")
    expect(secret_box).to_have_value(starts_with("sk-mp-"))
    secret = secret_box.input_value()
    expect(page.get_by_role("button", name="Copy")).to_be_focused()
    page.get_by_role("button", name="Copy").click()
    expect(page.get_by_text("Copied to the clipboard.")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == secret
    screenshot(page, shots, "created")

    # a second key of the team, so the list has more than one row
    admin(
        envoy,
        server,
        "POST",
        "/api/keys",
        {"name": "Batch jobs", "user_id": "user_batch", "team_id": team},
    )
    page.get_by_role("link", name="Keys", exact=True).click()
    page.get_by_label("Team ID").fill(team)
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#results-count")).to_have_text("Page 1: 2 keys.")
    row = page.get_by_role("row").filter(has_text="Support bot")
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("user_console")
    assert "team=" in page.url and server.admin_token not in page.url

    page.get_by_label("Team ID").fill("")
    page.get_by_label("Name or key ID").fill("support B")  # any case, part of the name
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("link", name="Support bot").first).to_be_visible()

    for model in ("gpt-4", "gpt-4", "gpt-4o"):
        assert complete(envoy, secret, model) == 200
    page.get_by_role("link", name="Support bot").first.click()
    expect(page.get_by_role("heading", level=1, name="Support bot")).to_be_visible()
    per_model = page.locator("table.per-model")
    for _ in range(50):  # the usage tap charges as the response ends: a moment later
        if per_model.count() and "gpt-4o" in per_model.inner_text():
            break
        page.wait_for_timeout(200)
        page.reload()
        page.locator("#usage-totals, .usage-body .error").first.wait_for()
    expect(page.locator("#usage-totals")).to_contain_text("3 requests")
    expect(per_model.get_by_role("row").filter(has_text="gpt-4o")).to_contain_text("1")
    expect(page.locator("svg.chart rect.day[height]").first).to_be_attached()
    tall = page.locator("svg.chart rect.day").evaluate_all(
        "bars => bars.filter(b => Number(b.getAttribute('height')) > 0).length"
    )
    assert tall == 1  # today's bar
    expect(page.get_by_role("img", name=starts_with("$"))).to_be_visible()  # the budget bar
    screenshot(page, shots, "key")

    page.get_by_role("button", name="Revoke key").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Revoke this key?")
    expect(dialog.get_by_role("button", name="Cancel")).to_be_focused()
    dialog.get_by_role("button", name="Revoke").click()
    expect(page.get_by_role("status").filter(has_text="Key revoked")).to_be_visible()
    expect(page.locator(".facts .badge")).to_have_text("revoked")
    expect(page.get_by_role("button", name="Revoke key")).to_be_disabled()
    assert complete(envoy, secret) == 401
    screenshot(page, shots, "revoked")

    page.goto(f"{console.base}/ui/#/keys?team={team}")  # the team's keys, revoked one too
    expect(page.get_by_role("row").filter(has_text="Support bot")).to_contain_text("revoked")
    expect(page.get_by_role("row").filter(has_text="Support bot")).to_contain_text("$0.001425")
    screenshot(page, shots, "keys")


def test_keys_page_by_page_with_the_apis_cursor(
    console: Console, envoy: Envoy, server: Server
) -> None:
    team = f"paged-{secrets.token_hex(3)}"
    for n in range(27):
        admin(
            envoy,
            server,
            "POST",
            "/api/keys",
            {"name": f"k{n:02}", "user_id": "u", "team_id": team},
        )
    page = console.sign_in(server.admin_token)
    page.goto(f"{console.base}/ui/#/keys?team={team}")
    count = page.locator("#results-count")
    expect(count).to_have_text("Page 1: 25 keys.")
    expect(page.get_by_role("button", name="Previous page")).to_be_disabled()
    page.get_by_role("button", name="Next page").click()
    expect(count).to_have_text("Page 2: 2 keys.")
    expect(count).to_be_focused()
    expect(page.get_by_role("link", name="k26")).to_be_visible()  # oldest first
    expect(page.get_by_role("button", name="Next page")).to_be_disabled()
    page.get_by_role("button", name="Previous page").click()
    expect(count).to_have_text("Page 1: 25 keys.")
    expect(page.get_by_role("link", name="k00")).to_be_visible()


def test_limits_changed_in_the_console_are_the_keys_limits(
    console: Console, envoy: Envoy, server: Server
) -> None:
    created = admin(
        envoy, server, "POST", "/api/keys", {"name": "Limited", "user_id": "u", "rpm_limit": 10}
    )
    key_id = created["key_data"]["id"]
    console.sign_in(server.admin_token)
    page = console.open(f"#/keys/{key_id}")
    expect(page.get_by_role("heading", level=1, name="Limited")).to_be_visible()
    page.get_by_label("Requests per minute").fill("7")
    page.get_by_label("Allowed models").fill("gpt-4, gpt-4o")
    page.get_by_role("button", name="Save limits").click()
    expect(page.get_by_role("status").filter(has_text="Limits saved.")).to_be_visible()
    data = admin(envoy, server, "GET", f"/api/keys/{key_id}")
    assert data["rpm_limit"] == 7 and data["allowed_models"] == ["gpt-4", "gpt-4o"]
    assert data["max_budget"] == created["key_data"]["max_budget"]  # not sent, not changed

    page.get_by_label("Requests per minute").fill("-1")
    page.get_by_role("button", name="Save limits").click()
    expect(page.get_by_role("alert")).to_have_text("Requests per minute must be 0 or more.")


def test_a_rotated_secret_is_shown_once_and_the_old_one_stops(
    console: Console, envoy: Envoy, server: Server
) -> None:
    created = admin(envoy, server, "POST", "/api/keys", {"name": "Rotating", "user_id": "u"})
    console.sign_in(server.admin_token)
    page = console.open(f"#/keys/{created['key_data']['id']}")
    page.get_by_role("button", name="Rotate secret").click()
    page.get_by_role("dialog").get_by_role("button", name="Rotate").click()
    fresh = page.get_by_label("The key")
    expect(fresh).to_have_value(starts_with(f"sk-mp-{created['key_data']['id']}-"))
    assert fresh.input_value() != created["key"]
    assert complete(envoy, created["key"]) == 401
    assert complete(envoy, fresh.input_value()) == 200


def test_a_key_deleted_after_confirming_is_gone_and_a_cancel_keeps_it(
    console: Console, envoy: Envoy, server: Server
) -> None:
    key_id = admin(envoy, server, "POST", "/api/keys", {"name": "Doomed", "user_id": "u"})[
        "key_data"
    ]["id"]
    console.sign_in(server.admin_token)
    page = console.open(f"#/keys/{key_id}")
    page.get_by_role("button", name="Delete key").click()
    page.keyboard.press("Escape")
    expect(page.get_by_role("dialog")).to_be_hidden()
    admin(envoy, server, "GET", f"/api/keys/{key_id}")  # still there
    page.get_by_role("button", name="Delete key").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status").filter(has_text="Key Doomed deleted.")).to_be_visible()
    page.goto(f"{console.base}/ui/#/keys/{key_id}")
    expect(page.get_by_role("alert")).to_contain_text("Not found")
    expect(page.get_by_role("alert")).to_contain_text("(HTTP 404, NOT_FOUND)")


def test_a_team_budget_set_in_the_console_is_the_teams_budget(
    console: Console, envoy: Envoy, server: Server, shots: Path
) -> None:
    team = f"team-{secrets.token_hex(3)}"
    page = console.sign_in(server.admin_token)
    page.get_by_role("link", name="Budgets").click()
    expect(page.get_by_role("heading", level=1, name="Budgets")).to_be_visible()
    page.get_by_label("Scope").select_option("team")
    page.get_by_label("ID", exact=True).fill(team)
    page.get_by_label("Max budget (USD)").fill("50")
    page.get_by_label("Budget period").fill("1mo")
    page.get_by_label("Requests in flight").fill("3")
    page.get_by_role("button", name="Set budget").click()
    expect(page.get_by_role("heading", level=1, name=f"Team budget: {team}")).to_be_visible()
    expect(page.get_by_role("status").filter(has_text="saved")).to_be_visible()
    budget = admin(envoy, server, "GET", f"/api/budgets/team/{team}")
    assert budget["max_budget"] == 50 and budget["budget_duration"] == "1mo"
    assert budget["max_parallel_requests"] == 3 and budget["rpm_limit"] == 0
    expect(page.get_by_role("img", name=starts_with("$0.00 spent"))).to_be_visible()
    screenshot(page, shots, "budget")

    page.get_by_role("link", name="Budgets", exact=True).click()
    expect(page.get_by_role("link", name=team)).to_be_visible()
    screenshot(page, shots, "budgets")


def test_a_wrong_token_is_refused_in_words_and_not_kept(
    console: Console, server: Server, shots: Path
) -> None:
    page = console.open()
    page.get_by_label("Admin token").fill("not-the-admin-token")
    page.get_by_role("button", name="Sign in").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("The admin token was not accepted: admin token is wrong")
    expect(alert).to_contain_text("(HTTP 401, UNAUTHENTICATED)")
    assert "not-the-admin-token" not in alert.inner_text()
    assert page.evaluate("sessionStorage.length") == 0
    expect(page.get_by_role("heading", level=1, name="Sign in")).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_hidden()  # not signed in
    screenshot(page, shots, "wrong-token")

    page.get_by_label("Admin token").fill("")
    page.get_by_role("button", name="Sign in").click()
    expect(alert).to_have_text("Enter the admin token.")


def test_signing_in_and_out_works_from_the_keyboard_alone(
    console: Console, server: Server, shots: Path
) -> None:
    page = console.open()
    expect(page.get_by_label("Admin token")).to_be_focused()
    page.keyboard.type(server.admin_token)
    page.keyboard.press("Tab")
    sign_in = page.get_by_role("button", name="Sign in")
    expect(sign_in).to_be_focused()
    outline = sign_in.evaluate(
        "b => getComputedStyle(b).outlineStyle + ' ' + b.matches(':focus-visible')"
    )
    assert outline == "solid true"  # the focus can be seen
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Keys")).to_be_focused()
    # the page's heading takes the focus; before it come the header's controls, in order
    backwards = []
    for _ in range(6):
        page.keyboard.press("Shift+Tab")
        backwards.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert backwards == [
        "Sign out",
        "Budgets",
        "Create key",
        "Keys",
        "extauthz console",
        "Skip to content",
    ]
    expect(page.get_by_role("link", name="Skip to content")).to_be_visible()  # when focused
    page.keyboard.press("Enter")  # skips to the page's heading
    expect(page.get_by_role("heading", level=1, name="Keys")).to_be_focused()
    page.keyboard.press("Tab")
    expect(page.get_by_label("Name or key ID")).to_be_focused()  # then the page's controls
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("button", name="Sign out")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    screenshot(page, shots, "sign-in")


def test_a_phone_width_screen_has_no_horizontal_scroll(
    browser: Browser, envoy: Envoy, server: Server, shots: Path
) -> None:
    team = f"phone-{secrets.token_hex(3)}"
    created = admin(
        envoy,
        server,
        "POST",
        "/api/keys",
        {"name": "Phone key", "user_id": "user_phone", "team_id": team},
    )
    admin(envoy, server, "PUT", f"/api/budgets/team/{team}", {"max_budget": 5})
    context = browser.new_context(viewport=PHONE, is_mobile=True, has_touch=True)
    try:
        console = Console(context, envoy)
        page = console.sign_in(server.admin_token)
        key_name = page.get_by_role("heading", level=1, name="Phone key")
        pages = {  # each page, and what shows once it has loaded
            "phone-keys": (f"#/keys?team={team}", page.get_by_text("Page 1: 1 key.")),
            "phone-key": (f"#/keys/{created['key_data']['id']}", key_name),
            "phone-create": ("#/create", page.get_by_role("button", name="Create key")),
            "phone-budget": (f"#/budgets/team/{team}", page.locator("#usage-totals")),
            "phone-budgets": ("#/budgets", page.get_by_role("link", name=team)),
        }
        for name, (fragment, loaded) in pages.items():
            page.goto(f"{console.base}/ui/{fragment}")
            expect(loaded).to_be_visible()
            expect(page.locator("main")).to_have_attribute("aria-busy", "false")
            assert no_horizontal_scroll(page), name
            screenshot(page, shots, name)
        assert console.problems == []
    finally:
        context.close()


def test_the_console_through_envoy_is_the_servers_with_its_headers(envoy: Envoy) -> None:
    page = fetch(envoy.port, "GET", "/ui/")
    assert page.status == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"
    assert fetch(envoy.port, "GET", "/ui").headers["location"] == "/ui/"
    health = fetch(envoy.port, "GET", "/ui/health")
    assert health.status == 200 and health.json()["status"] == "ready"
    # Envoy normalizes the path before it routes: these are /metrics (a public path of the
    # upstream's), never the server's own metrics
    for escape in ("/ui/../metrics", "/ui/%2e%2e/metrics", "/ui/%2E%2E/metrics"):
        reply = fetch(envoy.port, "GET", escape)
        assert b"extauthz_" not in reply.body and b"ailb_key" not in reply.body, escape
