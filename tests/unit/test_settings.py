from __future__ import annotations

import pytest

from extauthz.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def test_defaults_follow_spec() -> None:
    s = Settings.from_env({})
    assert (s.grpc_port, s.http_port, s.bind) == (9191, 9192, "0.0.0.0")
    assert (s.key_prefix, s.default_tpm, s.default_rpm, s.max_expires_days) == (
        "sk-mp",
        10_000,
        60,
        365,
    )
    assert s.default_budget_nanos == 100 * 10**9 and s.redis_url == "redis://localhost:6379/0"
    assert s.public_paths == frozenset({"/healthz", "/metrics"}) and not s.fail_open


def test_redis_url_is_built_from_the_guides_variables() -> None:
    s = Settings.from_env({"REDIS_HOST": "cache", "REDIS_PORT": "6380", "REDIS_DB": "2"})
    assert s.redis_url == "redis://cache:6380/2"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"VIRTUAL_KEY_DEFAULT_TPM": "3000000000"}, "VIRTUAL_KEY_DEFAULT_TPM"),
        ({"EXTAUTHZ_GRPC_PORT": "abc"}, "EXTAUTHZ_GRPC_PORT"),
        ({"EXTAUTHZ_FAIL_OPEN": "maybe"}, "EXTAUTHZ_FAIL_OPEN"),
        ({"VIRTUAL_KEY_DEFAULT_BUDGET": "-1"}, "VIRTUAL_KEY_DEFAULT_BUDGET"),
        ({"VIRTUAL_KEY_PREFIX": "sk mp"}, "VIRTUAL_KEY_PREFIX"),
        ({"REDIS_URL": "http://localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:notaport/0"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:6379/0?socket_timeout=abc"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:6379/x"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://h:6379/0?bogus=1"}, "REDIS_URL"),
    ],
)
def test_unusable_values_are_refused_naming_the_variable(env: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env(env)


def test_interface_doc_lists_every_setting_with_its_default() -> None:
    """docs/interface.md is the users' contract: a new setting must be documented there."""
    from pathlib import Path

    from extauthz.settings import VARIABLES

    doc = (Path(__file__).resolve().parents[2] / "docs" / "interface.md").read_text()
    rows = {line.split("|")[1]: line for line in doc.splitlines() if line.startswith("| `")}
    for variable in VARIABLES:
        row = next((r for names, r in rows.items() if f"`{variable.env}`" in names), None)
        assert row is not None, f"{variable.env} is not in docs/interface.md"
        if variable.default:
            assert f"`{variable.default}`" in row, f"{variable.env}'s default differs"


def test_workers_and_reuse_port_are_settings() -> None:
    s = Settings.from_env({"EXTAUTHZ_WORKERS": "3", "EXTAUTHZ_REUSE_PORT": "true"})
    assert (s.workers, s.reuse_port) == (3, True)
    assert Settings.from_env({}).reuse_port is False
    with pytest.raises(SettingsError, match="EXTAUTHZ_WORKERS"):
        Settings.from_env({"EXTAUTHZ_WORKERS": "0"})


@pytest.mark.parametrize(
    "url",
    [
        "redis://:hunter2@h:6379/0",
        "redis://u:hunter2@h:6379/0",
        "redis://h:6379/0?password=hunter2",
        "rediss://h:6379/0?ssl_password=hunter2&ssl_cert_reqs=none",
        "redis+cluster://:hunter2@h:7000?password=hunter2",
    ],
)
def test_a_redis_url_is_shown_without_any_password(url: str) -> None:
    from keys.connection import redacted

    shown = redacted(url)
    assert "hunter2" not in shown and "***" in shown
    assert (shown.split("://")[0] == url.split("://")[0] and "@h:" in shown) or "//h:" in shown


def test_no_ledger_database_by_default() -> None:
    assert Settings.from_env({}).ledger_database_url == ""


@pytest.mark.parametrize(
    "url", ["postgresql://ledger:hunter2@db:5432/ledger", "postgres://db/ledger?sslmode=require"]
)
def test_a_postgresql_ledger_url_is_kept_and_not_shown_in_repr(url: str) -> None:
    s = Settings.from_env({"LEDGER_DATABASE_URL": url})
    assert s.ledger_database_url == url
    assert "hunter2" not in repr(s) and "ledger_database_url" not in repr(s)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://ledger:hunter2@db/ledger",
        "postgresql://",
        "db:5432 user=ledger password=hunter2",
        "redis://:hunter2@db:6379/0",
    ],
)
def test_a_ledger_url_that_is_not_postgresql_is_refused_without_echoing_it(url: str) -> None:
    with pytest.raises(SettingsError, match="LEDGER_DATABASE_URL") as refused:
        Settings.from_env({"LEDGER_DATABASE_URL": url})
    assert "hunter2" not in str(refused.value) and "postgresql://" in str(refused.value)


def test_alert_thresholds_are_basis_points_sorted_once_each() -> None:
    assert Settings.from_env({}).alert_thresholds == (5000, 8000, 10000)
    env = {"EXTAUTHZ_ALERT_THRESHOLDS": " 1.0, 0.25,0.2500 ,10, 0.0001"}
    assert Settings.from_env(env).alert_thresholds == (1, 2500, 10000, 100000)


@pytest.mark.parametrize("raw", ["0", "-0.5", "10.0001", "0.00001", "half", "0.5,,1", "nan"])
def test_alert_thresholds_outside_0_to_10_or_finer_than_four_decimals_are_refused(
    raw: str,
) -> None:
    with pytest.raises(SettingsError, match="EXTAUTHZ_ALERT_THRESHOLDS"):
        Settings.from_env({"EXTAUTHZ_ALERT_THRESHOLDS": raw})


@pytest.mark.parametrize(
    "url", ["ftp://hooks.example/x", "hooks.example/x", "http:///x", "https://h:port/x"]
)
def test_a_webhook_url_must_be_http_or_https_and_is_never_echoed(url: str) -> None:
    with pytest.raises(SettingsError, match="EXTAUTHZ_ALERT_WEBHOOK_URL") as raised:
        Settings.from_env({"EXTAUTHZ_ALERT_WEBHOOK_URL": url})
    assert url not in str(raised.value)


def test_the_webhook_url_and_alert_secret_stay_out_of_the_settings_repr() -> None:
    s = Settings.from_env(
        {
            "EXTAUTHZ_ALERT_WEBHOOK_URL": "https://hooks.example/services/T0/B0/tok3n",
            "EXTAUTHZ_ALERT_SECRET": "whsec-hunter2",
        }
    )
    assert s.alert_webhook_url.endswith("tok3n") and s.alert_secret == "whsec-hunter2"
    assert "tok3n" not in repr(s) and "hunter2" not in repr(s)
