"""`make run` picks its Redis in the server's order and says in its banner whose it is."""

from __future__ import annotations

import pytest

from devstack import __main__ as devstack_main
from devstack import processes as p
from devstack.redis_target import RedisTarget, choose

pytestmark = pytest.mark.unit


def test_redis_url_wins_over_host_port_and_db() -> None:
    target = choose(
        {"REDIS_URL": "redis://cache:6380/2", "REDIS_HOST": "other", "REDIS_PORT": "1"},
        local_redis_answers=True,
        own_dir=".run/redis",
    )
    assert (target.url, target.start_own) == ("redis://cache:6380/2", False)
    assert target.whose == "named by REDIS_URL"


def test_host_port_and_db_name_the_redis() -> None:
    env = {"REDIS_HOST": "cache.internal", "REDIS_PORT": "6380", "REDIS_DB": "3"}
    target = choose(env, local_redis_answers=True, own_dir=".run/redis")
    assert target.url == "redis://cache.internal:6380/3"
    assert not target.start_own


def test_port_alone_keeps_the_servers_defaults_for_host_and_db() -> None:
    target = choose({"REDIS_PORT": "7000"}, local_redis_answers=False, own_dir=".run/redis")
    assert (target.url, target.start_own) == ("redis://localhost:7000/0", False)
    assert target.whose == "named by REDIS_PORT"


def test_a_named_redis_reaches_the_server_through_the_users_own_variables() -> None:
    """No REDIS_URL is added, so the server builds its URL from REDIS_HOST/PORT/DB itself."""
    target = choose({"REDIS_HOST": "cache"}, local_redis_answers=False, own_dir=".run/redis")
    assert target.env == {}


def test_a_redis_already_on_6379_is_used_and_called_not_ours() -> None:
    target = choose({}, local_redis_answers=True, own_dir=".run/redis")
    assert (target.url, target.start_own) == ("redis://127.0.0.1:6379/0", False)
    assert target.described() == (
        "redis://127.0.0.1:6379/0 (already running, not started by make run)"
    )
    assert target.env == {"REDIS_URL": "redis://127.0.0.1:6379/0"}


def test_with_nothing_named_and_nothing_on_6379_make_run_starts_its_own() -> None:
    target = choose({}, local_redis_answers=False, own_dir=".run/redis")
    assert target.start_own
    assert target.described() == (
        "redis://127.0.0.1:6379/0 (started by make run, data in .run/redis)"
    )


def test_empty_variables_name_nothing() -> None:
    target = choose(
        {"REDIS_URL": "", "REDIS_HOST": ""}, local_redis_answers=False, own_dir=".run/redis"
    )
    assert target.start_own


def test_the_banner_masks_a_password_in_redis_url() -> None:
    target = choose(
        {"REDIS_URL": "redis://app:s3cret-pw@cache:6379/0"},
        local_redis_answers=False,
        own_dir=".run/redis",
    )
    text = devstack_main.banner(p.ENVOY_PORTS, 9192, target, True, "adm")
    assert "s3cret-pw" not in text
    assert "redis://app:***@cache:6379/0 (named by REDIS_URL)" in text


LOCAL = RedisTarget("redis://127.0.0.1:6379/0", "already running, not started by make run")


def test_the_banner_says_ready_and_whose_redis_when_redis_answers() -> None:
    text = devstack_main.banner(p.ENVOY_PORTS, 9192, LOCAL, True, "adm")
    assert "\nready: Envoy on http://127.0.0.1:10000" in text
    assert "Redis: redis://127.0.0.1:6379/0 (already running, not started by make run)" in text


def test_the_banner_says_once_that_redis_cannot_be_reached_instead_of_ready() -> None:
    text = devstack_main.banner(p.ENVOY_PORTS, 9192, LOCAL, False, "adm")
    assert "ready:" not in text
    assert text.count("cannot be reached") == 1
    assert "Redis at redis://127.0.0.1:6379/0" in text and "keeps retrying" in text
