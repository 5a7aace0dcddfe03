"""The vkeys admin CLI as a real subprocess against a real server."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.processes import executable, free_port
from keys.v1 import keys_pb2
from tests.conftest import Server, start_server
from tests.helpers import Clients

pytestmark = pytest.mark.integration

KEY_RE = re.compile(r"sk-mp-[0-9a-f]{16}-[A-Za-z0-9]{32,}")


def vkeys(server: Server, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {
        **os.environ,
        "EXTAUTHZ_ADDR": server.address,
        "EXTAUTHZ_ADMIN_TOKEN": server.admin_token,
        **env,
    }
    return subprocess.run(
        [str(executable("vkeys")), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(server: Server, *args: str) -> str:
    result = vkeys(server, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def ok_json(server: Server, *args: str) -> Any:
    return json.loads(ok(server, "--json", *args))


def one_line_error(result: subprocess.CompletedProcess[str], code: str) -> str:
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"vkeys: {code}: ")
    return lines[0]


def unique_user() -> str:
    return f"cli-{uuid.uuid4().hex[:12]}"


def create(server: Server, *args: str) -> dict[str, Any]:
    reply: dict[str, Any] = ok_json(server, "create", "--name", "cli key", *args)
    return reply


def test_create_prints_the_full_key_once_with_a_warning(server: Server, clients: Clients) -> None:
    out = ok(server, "create", "--name", "printed", "--user-id", "u1")
    keys = KEY_RE.findall(out)
    assert len(keys) == 1
    assert "shown only once" in out
    assert clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=keys[0])).valid


def test_create_json_has_the_key_and_the_fields_sent(server: Server) -> None:
    reply = create(
        server,
        "--user-id=u1",
        "--team-id=t1",
        "--model=gpt-4",
        "--model=gpt-3.5-turbo",
        "--max-budget=2.5",
        "--tpm=1000",
        "--rpm=7",
        "--expires-days=3",
        "--metadata=env=prod",
        "--metadata=owner=ops",
    )
    data = reply["key_data"]
    assert reply["key"].startswith(f"sk-mp-{data['id']}-")
    assert (data["name"], data["user_id"], data["team_id"]) == ("cli key", "u1", "t1")
    assert data["allowed_models"] == ["gpt-4", "gpt-3.5-turbo"]
    assert (data["max_budget"], data["tpm_limit"], data["rpm_limit"]) == (2.5, 1000, 7)
    assert data["metadata"] == {"env": "prod", "owner": "ops"}


def test_create_without_limit_flags_takes_the_server_defaults(server: Server) -> None:
    data = create(server, "--user-id=u1")["key_data"]
    assert (data["max_budget"], data["tpm_limit"], data["rpm_limit"]) == (25.5, 5000, 40)


def test_create_with_max_budget_zero_has_no_budget(server: Server, clients: Clients) -> None:
    data = create(server, "--user-id=u1", "--max-budget", "0")["key_data"]
    assert data["max_budget"] == 0 and "budget_remaining" not in data
    assert not clients.get_key(data["id"]).HasField("budget_remaining")


def test_list_filters_by_user_id(server: Server) -> None:
    user = unique_user()
    mine = [create(server, f"--user-id={user}")["key_data"]["id"] for _ in range(2)]
    other = create(server, f"--user-id={unique_user()}")["key_data"]["id"]
    out = ok(server, "list", "--user-id", user)
    assert all(key_id in out for key_id in mine) and other not in out
    assert out.splitlines()[0].split() == [
        "id", "name", "user", "team", "status", "spent/budget", "rpm", "tpm", "expires",
    ]  # fmt: skip


def test_list_all_follows_every_page(server: Server) -> None:
    user = unique_user()
    created = [create(server, f"--user-id={user}")["key_data"]["id"] for _ in range(5)]
    reply = ok_json(server, "list", "--user-id", user, "--page-size", "2", "--all")
    assert [k["id"] for k in reply["keys"]] == created
    assert reply["next_page_token"] == ""


def test_list_without_all_shows_one_page_and_how_to_go_on(server: Server) -> None:
    user = unique_user()
    for _ in range(3):
        create(server, f"--user-id={user}")
    reply = ok_json(server, "list", "--user-id", user, "--page-size", "2")
    assert len(reply["keys"]) == 2 and reply["next_page_token"]
    assert "--page-token" in ok(server, "list", "--user-id", user, "--page-size", "2")


def test_show_prints_every_key_field(server: Server) -> None:
    data = create(server, "--user-id=u1", "--model=gpt-4", "--metadata=env=prod")["key_data"]
    out = ok(server, "show", data["id"])
    labels = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(keys_pb2.KeyData.DESCRIPTOR.fields_by_name) <= labels
    assert "gpt-4" in out and "env=prod" in out and "cli key" in out


def test_update_changes_only_the_field_sent(server: Server, clients: Clients) -> None:
    data = create(server, "--user-id=u1", "--rpm=5", "--tpm=900", "--model=gpt-4")["key_data"]
    ok(server, "update", data["id"], "--rpm", "9")
    after = clients.get_key(data["id"])
    assert after.rpm_limit == 9
    assert (after.name, after.tpm_limit, list(after.allowed_models)) == ("cli key", 900, ["gpt-4"])


def test_update_model_replaces_the_allowed_list(server: Server, clients: Clients) -> None:
    data = create(server, "--user-id=u1", "--model=gpt-4")["key_data"]
    ok(server, "update", data["id"], "--model", "claude-3", "--model", "o1")
    assert list(clients.get_key(data["id"]).allowed_models) == ["claude-3", "o1"]


def test_update_metadata_replaces_the_whole_map(server: Server, clients: Clients) -> None:
    data = create(server, "--user-id=u1", "--metadata=a=1", "--metadata=b=2")["key_data"]
    ok(server, "update", data["id"], "--metadata", "c=3")
    assert dict(clients.get_key(data["id"]).metadata) == {"c": "3"}


def test_update_without_field_flags_is_a_one_line_error(server: Server) -> None:
    data = create(server, "--user-id=u1")["key_data"]
    result = vkeys(server, "update", data["id"])
    assert result.returncode == 1
    assert result.stderr.startswith("vkeys: nothing to update") and result.stderr.count("\n") == 1


def test_revoke_then_show_says_revoked(server: Server) -> None:
    data = create(server, "--user-id=u1")["key_data"]
    ok(server, "revoke", data["id"])
    assert ok_json(server, "show", data["id"])["status"] == "revoked"
    assert re.search(r"^status\s+revoked$", ok(server, "show", data["id"]), re.MULTILINE)


def test_rotate_prints_a_new_key_and_the_old_one_stops(server: Server, clients: Clients) -> None:
    reply = create(server, "--user-id=u1")
    old, key_id = reply["key"], reply["key_data"]["id"]
    out = ok(server, "rotate", key_id, "--grace-seconds", "0")
    [new] = KEY_RE.findall(out)
    assert new != old and new.startswith(f"sk-mp-{key_id}-")
    assert clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=new)).valid
    assert not clients.keys.ValidateKey(keys_pb2.ValidateKeyRequest(key=old)).valid


def test_delete_then_show_is_a_one_line_not_found(server: Server) -> None:
    data = create(server, "--user-id=u1")["key_data"]
    assert data["id"] in ok(server, "delete", data["id"], "--yes")
    line = one_line_error(vkeys(server, "show", data["id"]), "NOT_FOUND")
    assert data["id"] in line


def test_validate_names_why_a_key_is_invalid(server: Server) -> None:
    reply = create(server, "--user-id=u1")
    ok(server, "revoke", reply["key_data"]["id"])
    result = vkeys(server, "validate", reply["key"])
    assert result.returncode == 1 and "key_revoked" in result.stdout
    assert reply["key"] not in result.stdout + result.stderr


def day_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"\d{4}-\d{2}-\d{2}( |$)", line)]


def test_usage_charts_only_the_day_with_usage(server: Server, clients: Clients) -> None:
    key_id = create(server, "--user-id=u1")["key_data"]["id"]
    clients.report(key_id, "cli-usage-1", model="gpt-4", prompt_tokens=100, cost=0.25)
    out = ok(server, "usage", key_id, "--days", "7")
    today = dt.datetime.now(dt.UTC).date().isoformat()
    [today_line] = day_lines(out)
    assert today_line.startswith(today)
    assert "█" in today_line and "$0.25" in today_line
    assert re.search(r"^gpt-4\s+1\s+100\s+0\s+\$0\.25$", out, re.MULTILINE)


def test_usage_all_days_charts_every_day_of_the_range(server: Server, clients: Clients) -> None:
    key_id = create(server, "--user-id=u1")["key_data"]["id"]
    clients.report(key_id, "cli-usage-3", model="gpt-4", prompt_tokens=100, cost=0.25)
    lines = day_lines(ok(server, "usage", key_id, "--days", "7", "--all-days"))
    assert len(lines) == 7
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert [line for line in lines if "█" in line] == [
        line for line in lines if line.startswith(today)
    ]


def test_usage_json_is_the_get_usage_response(server: Server, clients: Clients) -> None:
    key_id = create(server, "--user-id=u1")["key_data"]["id"]
    clients.report(key_id, "cli-usage-2", model="gpt-4", prompt_tokens=10, cost=0.5)
    reply = ok_json(server, "usage", key_id)
    assert reply["totals"]["cost"] == 0.5 and reply["key_ids"] == [key_id]
    assert [(r["model"], r["cost"]) for r in reply["rows"]] == [("gpt-4", 0.5)]


def test_usage_csv_writes_a_row_per_day_and_model(server: Server, clients: Clients) -> None:
    key_id = create(server, "--user-id=u1")["key_data"]["id"]
    clients.report(key_id, "cli-csv-1", model="gpt-4", prompt_tokens=10, cost=0.123456789)
    clients.report(key_id, "cli-csv-2", model="gpt-4o", completion_tokens=5, cost=0.5)
    rows = list(csv.reader(io.StringIO(ok(server, "usage", key_id, "--csv"))))
    today = dt.datetime.now(dt.UTC).date().isoformat()
    assert rows == [
        ["date", "model", "requests", "prompt_tokens", "completion_tokens", "cost"],
        [today, "gpt-4", "1", "10", "0", "0.123456789"],
        [today, "gpt-4o", "1", "0", "5", "0.5"],
    ]


def test_export_writes_every_key_of_a_team_since_a_date(server: Server, clients: Clients) -> None:
    team = f"export-{secrets.token_hex(4)}"
    first = create(server, "--user-id=u1", f"--team-id={team}", "--name=one")["key_data"]["id"]
    second = create(server, "--user-id=u2", f"--team-id={team}", "--name=two")["key_data"]["id"]
    create(server, "--user-id=u3", "--team-id=another-team")
    clients.report(first, "cli-export-1", model="gpt-4", prompt_tokens=10, cost=0.25)
    clients.report(second, "cli-export-2", model="gpt-4", prompt_tokens=20, cost=0.75)
    today = dt.datetime.now(dt.UTC).date()
    since = (today - dt.timedelta(days=3)).isoformat()
    rows = list(csv.reader(io.StringIO(ok(server, "export", "--since", since, "--team-id", team))))
    assert rows[0][:4] == ["key_id", "key_name", "user_id", "team_id"]
    assert sorted(rows[1:]) == sorted(
        [
            [first, "one", "u1", team, today.isoformat(), "gpt-4", "1", "10", "0", "0.25"],
            [second, "two", "u2", team, today.isoformat(), "gpt-4", "1", "20", "0", "0.75"],
        ]
    )


def test_export_refuses_a_date_it_cannot_read(server: Server) -> None:
    result = vkeys(server, "export", "--since", "last tuesday")
    assert result.returncode != 0 and "YYYY-MM-DD" in result.stderr


def test_user_flag_scopes_calls_to_that_user(server: Server) -> None:
    data = create(server, "--user-id=alice")["key_data"]
    one_line_error(vkeys(server, "--user", "bob", "show", data["id"]), "NOT_FOUND")
    assert ok_json(server, "--user", "alice", "show", data["id"])["id"] == data["id"]


def test_wrong_token_is_a_one_line_unauthenticated(server: Server) -> None:
    line = one_line_error(vkeys(server, "list", EXTAUTHZ_ADMIN_TOKEN="wrong"), "UNAUTHENTICATED")
    assert "the admin token is wrong; set EXTAUTHZ_ADMIN_TOKEN or pass --token" in line


def test_missing_token_says_how_to_give_one(server: Server) -> None:
    line = one_line_error(vkeys(server, "list", EXTAUTHZ_ADMIN_TOKEN=""), "UNAUTHENTICATED")
    assert "no admin token; set EXTAUTHZ_ADMIN_TOKEN or pass --token" in line


def test_token_flag_wins_over_the_environment(server: Server) -> None:
    result = vkeys(server, "list", "--token", server.admin_token, EXTAUTHZ_ADMIN_TOKEN="wrong")
    assert result.returncode == 0, result.stderr


def test_unreachable_server_is_a_one_line_error(server: Server) -> None:
    line = one_line_error(vkeys(server, "list", EXTAUTHZ_ADDR="127.0.0.1:1"), "UNAVAILABLE")
    assert "cannot reach 127.0.0.1:1" in line
    assert "Redis" not in line


@pytest.fixture(scope="module")
def server_without_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server up and answering, pointed at a Redis port where nothing listens."""
    srv = start_server(f"redis://127.0.0.1:{free_port()}/0", tmp_path_factory.mktemp("no-redis"))
    yield srv
    srv.process.stop()


def test_server_without_redis_is_blamed_on_redis_not_the_address(
    server_without_redis: Server,
) -> None:
    line = one_line_error(vkeys(server_without_redis, "list"), "UNAVAILABLE")
    addr = server_without_redis.address
    assert f"the server at {addr} cannot reach Redis; try again shortly" in line
    assert f"cannot reach {addr}" not in line
